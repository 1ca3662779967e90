"""Rewrite a format-1 dataset as format 2, shard by shard (``python -m manifests upgrade OUT``).

Exactly-once like ``make dataset``: each shard's new tar and new manifest are written completely
under temporary names first, then the tar is renamed over the old one and the manifest last. A
shard in between (new tar, old manifest) is recognised on a rerun by the pending manifest, which
describes the new tar, and finished; every other shard is either still format 1 (upgraded again
from scratch) or already format 2 (kept). The index is rewritten when every shard is format 2.
Nothing is read from the sources: the pixels are the format-1 pixels (binary alpha is a special
case of soft alpha), so the recomposition and its recorded PSNR are unchanged.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from datagen.format import (
    SHARD_SCHEMA,
    FormatError,
    LayerSample,
    check_sample,
    iter_tar_samples,
    read_sample,
    schema_string,
    schema_version,
)
from datagen.hashing import file_sha256
from datagen.sources import provenance
from datagen.writer import write_index, write_json_atomic, write_tar
from manifests.layout import manifest_path, read_json, scan_dataset, shard_name, tar_path
from manifests.validate import find_setting

PENDING = ".tmp-upgrade"  # suffix of the pending tar and manifest of a shard being upgraded


class UpgradeError(RuntimeError):
    """The dataset (or one shard of it) cannot be upgraded; the message says where and why."""


@dataclass
class UpgradeReport:
    """What :func:`upgrade_dataset` did: shard numbers by outcome, and the samples rewritten."""

    upgraded: list[int] = field(default_factory=list)  # format 1 -> 2 in this run
    finished: list[int] = field(default_factory=list)  # a rename an interrupted run left undone
    kept: list[int] = field(default_factory=list)  # already format 2
    samples: int = 0


def layer_extent(config: Any) -> str:
    """The ``extent`` of format-1 layers, which did not record it: the synthetic-gt source wrote
    whole (amodal) shapes, every other source the visible parts."""
    return "amodal" if find_setting(config, "kind") == "synthetic-gt" else "visible"


def _integer_box(box: Any) -> Any:
    """Format 2 boxes are whole pixels: round outwards (format-1 writers stored integers already)."""
    if isinstance(box, list) and len(box) == 4 and all(isinstance(c, (int, float)) for c in box):
        x0, y0, x1, y1 = box
        return [max(0, math.floor(x0)), max(0, math.floor(y0)), math.ceil(x1), math.ceil(y1)]
    return box


def upgrade_sample(sample: LayerSample, extent: str) -> LayerSample:
    """The format-2 form of a format-1 sample: the same pixels, the json with ``extent`` on each
    layer and provenance (url, licence, caption, metadata) taken from format 1's ``source.meta``."""
    meta = copy.deepcopy(sample.meta)
    meta["schema"] = schema_string(2)
    for layer in meta.get("layers", []):
        if isinstance(layer, dict):
            layer.setdefault("extent", extent)
            layer["box"] = _integer_box(layer.get("box"))
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    origin = provenance(source.pop("meta", None))
    meta["source"] = {**origin, **{k: v for k, v in source.items() if k not in origin or isinstance(v, str)}}
    return LayerSample(key=sample.key, image=sample.image, background=sample.background,
                       foregrounds=sample.foregrounds, masks=sample.masks, caption=sample.caption, meta=meta)


def _pending(path: Path) -> Path:
    return path.with_name(f".{path.name}{PENDING}")


def _matches(manifest: Any, tar: Path) -> bool:
    if not isinstance(manifest, dict) or not tar.is_file():
        return False
    return manifest.get("bytes") == tar.stat().st_size and manifest.get("sha256") == file_sha256(tar, cache=False)


def _read(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _converted(out: Path, shard: int, extent: str, max_layers: int | None) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of a format-1 shard in format 2 (key, members); UpgradeError names the first
    sample that is not valid format 1, and nothing is written."""
    samples = []
    where = f"{shard_name(shard)} ({tar_path(out, shard)})"
    for group in iter_tar_samples(tar_path(out, shard)):
        if group.problems:
            raise UpgradeError(f"shard {shard_name(shard)}, key {group.key or '?'}: {group.problems[0]}")
        try:
            sample = read_sample(group.members, key=group.key, where=where)
        except FormatError as err:
            raise UpgradeError(str(err)) from err
        if sample.version != 1:
            raise UpgradeError(f"shard {shard_name(shard)}, key {sample.key}: sample is format {sample.version} "
                               "in a format-1 shard")
        problems = check_sample(sample, max_layers, group.members)
        if problems:
            raise UpgradeError(f"shard {shard_name(shard)}, key {sample.key}: not valid format 1: {problems[0]}")
        new = upgrade_sample(sample, extent)
        samples.append((new.key, new.to_members()))
    return samples


def upgrade_shard(out: Path, shard: int, extent: str, max_layers: int | None = None) -> tuple[str, int]:
    """Bring one shard to format 2; returns (outcome, samples): "kept", "finished" or "upgraded"."""
    out = Path(out)
    mpath, tpath = manifest_path(out, shard), tar_path(out, shard)
    manifest = _read(mpath)
    name = shard_name(shard)
    if manifest is None:
        raise UpgradeError(f"shard {name}: manifest {mpath} missing or unreadable (the shard is not done)")
    try:
        version = schema_version(manifest.get("schema"), "shard")
    except FormatError as err:
        raise UpgradeError(f"shard {name}: {err.detail}") from None
    if version == 2 and _matches(manifest, tpath):
        return "kept", int(manifest.get("samples", 0))
    pending_manifest = _read(_pending(mpath))
    if pending_manifest is not None and _matches(pending_manifest, tpath):
        os.replace(_pending(mpath), mpath)  # an earlier run renamed the tar, then stopped
        return "finished", int(pending_manifest.get("samples", 0))
    if version != 1 or not _matches(manifest, tpath):
        raise UpgradeError(f"shard {name}: its tar does not match its format-{version} manifest; not "
                           "upgrading a damaged shard (run `python -m manifests validate`)")
    start = time.monotonic()
    samples = _converted(out, shard, extent, max_layers)
    if [key for key, _ in samples] != manifest.get("keys"):
        raise UpgradeError(f"shard {name}: the tar's keys differ from the manifest's")
    tmp_tar = _pending(tpath)
    try:
        sha256, size = write_tar(tmp_tar, samples)
        new_manifest = {**manifest, "schema": SHARD_SCHEMA, "sha256": sha256, "bytes": size,
                        "created": datetime.now(UTC).isoformat(timespec="seconds"),
                        "seconds": round(float(manifest.get("seconds", 0)) + time.monotonic() - start, 3),
                        "upgraded_from": {"schema": manifest.get("schema"), "sha256": manifest.get("sha256")}}
        write_json_atomic(_pending(mpath), new_manifest)
        os.replace(tmp_tar, tpath)  # from here the pending manifest is the truth about the tar ...
    finally:
        tmp_tar.unlink(missing_ok=True)
    os.replace(_pending(mpath), mpath)  # ... until it becomes the manifest
    return "upgraded", len(samples)


def upgrade_dataset(out: str | Path, log: Any = None) -> UpgradeReport:
    """Upgrade every shard of a complete dataset to format 2, then write the format-2 index.

    Rerun-safe: shards already in format 2 are kept, an interrupted shard is finished or redone.
    ``log`` (e.g. ``print``) gets one line per shard.
    """
    out = Path(out)
    files = scan_dataset(out)
    if files.missing_dirs:
        raise UpgradeError(f"{out}: {', '.join(files.missing_dirs)}/ missing: not a dataset")
    index = _read(files.index)
    if not isinstance(index, dict):
        raise UpgradeError(f"{out}: manifest.json missing or unreadable: finish the run (`make dataset`) first")
    try:
        schema_version(index.get("schema"), "dataset")
    except FormatError as err:
        raise UpgradeError(f"{out}/manifest.json: {err.detail}") from None
    config, config_sha256 = index.get("config"), index.get("config_sha256")
    if not isinstance(config, dict) or not isinstance(config_sha256, str):
        raise UpgradeError(f"{out}/manifest.json has no config / config_sha256")
    missing = sorted(set(files.tars) ^ set(files.manifests))
    if missing:
        raise UpgradeError(f"{out}: shards {', '.join(map(shard_name, missing))} lack a tar or a manifest "
                           "(an unfinished run): finish it first")
    extent = layer_extent(config)
    max_layers = find_setting(config, "max_layers")
    report = UpgradeReport()
    for shard in files.shards:
        outcome, count = upgrade_shard(out, shard, extent, max_layers if isinstance(max_layers, int) else None)
        getattr(report, outcome).append(shard)
        report.samples += count if outcome != "kept" else 0
        if log is not None:
            log(f"shard {shard_name(shard)}: {outcome} ({count} samples)")
    written = write_index(out, config, config_sha256)
    if len(written["shards"]) != len(files.shards):
        raise UpgradeError(f"{out}: only {len(written['shards'])} of {len(files.shards)} shards verify as format 2")
    return report
