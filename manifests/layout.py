"""The on-disk layout of a dataset: where shards, shard manifests and the index live.

``OUT/shards/NNNNNN.tar``, ``OUT/manifests/NNNNNN.json`` (written after its tar is complete)
and ``OUT/manifest.json``. Names containing ``.tmp`` are temporary files of a write in progress
(or of an interrupted one); they are never part of the dataset.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from datagen.writer import manifest_path, shard_name, tar_path  # noqa: F401 - the writer owns the layout

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


class HashingReader:
    """A read-only file wrapper that hashes (sha256) and counts every byte read through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) whatever is left of the file."""
        while self.read(1 << 20):
            pass

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


def hash_file(path: str | Path) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, read in blocks."""
    with open(path, "rb") as raw:
        reader = HashingReader(raw)
        reader.drain()
    return reader.hexdigest(), reader.bytes


def shard_done(out: str | Path, shard: int) -> bool:
    """The resume rule (docs/FORMAT.md): a shard is done when its manifest exists, parses, and its tar's
    sha256 and size match the manifest. Anything else means the shard must be (re)written."""
    mpath, tpath = manifest_path(out, shard), tar_path(out, shard)
    if not mpath.is_file() or not tpath.is_file():
        return False
    try:
        manifest = read_json(mpath)
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict):
        return False
    digest, size = hash_file(tpath)
    return manifest.get("sha256") == digest and manifest.get("bytes", size) == size
