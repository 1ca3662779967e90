"""The on-disk layout of a dataset: where shards, shard manifests and the index live.

``OUT/shards/NNNNNN.tar``, ``OUT/manifests/NNNNNN.json`` (written after its tar is complete)
and ``OUT/manifest.json``. Names containing ``.tmp`` are temporary files of a write in progress
(or of an interrupted one); they are never part of the dataset.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The writer owns the layout and the one "shard done" rule.
from datagen.writer import manifest_path, shard_done, shard_name, tar_path  # noqa: F401

SHARDS_DIR = "shards"
MANIFESTS_DIR = "manifests"
INDEX_NAME = "manifest.json"
TAR_NAME = re.compile(r"^([0-9]{6,})\.tar$")
MANIFEST_NAME = re.compile(r"^([0-9]{6,})\.json$")
TEMP_MARK = ".tmp"


def index_path(out: str | Path) -> Path:
    return Path(out) / INDEX_NAME


@dataclass
class DatasetFiles:
    """What a scan of ``OUT/shards`` and ``OUT/manifests`` found."""

    out: Path
    tars: dict[int, Path] = field(default_factory=dict)
    manifests: dict[int, Path] = field(default_factory=dict)
    temporary: list[Path] = field(default_factory=list)  # *.tmp* files: an unfinished write
    stray: list[Path] = field(default_factory=list)  # anything else that does not belong
    missing_dirs: list[str] = field(default_factory=list)

    @property
    def shards(self) -> list[int]:
        """Every shard number with a tar or a manifest, sorted."""
        return sorted(set(self.tars) | set(self.manifests))

    @property
    def index(self) -> Path:
        return index_path(self.out)


def scan_dataset(out: str | Path) -> DatasetFiles:
    """List the shard tars, shard manifests, temporary and stray files under ``out``."""
    files = DatasetFiles(Path(out))
    for sub, pattern, found in ((SHARDS_DIR, TAR_NAME, files.tars),
                                (MANIFESTS_DIR, MANIFEST_NAME, files.manifests)):
        folder = files.out / sub
        if not folder.is_dir():
            files.missing_dirs.append(sub)
            continue
        for path in sorted(folder.iterdir()):
            match = pattern.match(path.name)
            if TEMP_MARK in path.name:
                files.temporary.append(path)
            elif match and path.is_file():
                found[int(match.group(1))] = path
            else:
                files.stray.append(path)
    return files


def read_json(path: str | Path) -> Any:
    """Parse a JSON file (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)
