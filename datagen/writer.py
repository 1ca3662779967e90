"""Shard writer: one tar per shard, written under a temporary name and renamed, then its manifest.

A shard is done exactly when its manifest exists and the tar's sha256 matches it, so a crash or
kill never leaves a shard that looks complete, and a rerun rebuilds only what is missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from datagen.format import DATASET_SCHEMA, SHARD_SCHEMA
from datagen.item import Item

TAR_MTIME = 0  # fixed member metadata: the same samples give byte-identical tars


def shard_name(shard: int) -> str:
    return f"{shard:06d}"


def tar_path(out: str | Path, shard: int) -> Path:
    return Path(out) / "shards" / f"{shard_name(shard)}.tar"


def manifest_path(out: str | Path, shard: int) -> Path:
    return Path(out) / "manifests" / f"{shard_name(shard)}.json"


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.bytes

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._f.write(data)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> tuple[str, int]:
    """Write samples (key, suffix -> bytes) to ``path`` as a tar, members contiguous in the order
    given, and flush it to disk; returns the tar's (sha256, size in bytes)."""
    with open(path, "wb") as raw:
        hashing = _HashingFile(raw)
        with tarfile.open(fileobj=hashing, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for key, members in samples:
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
                    tf.addfile(info, io.BytesIO(data))
        raw.flush()
        os.fsync(raw.fileno())
    return hashing.sha256.hexdigest(), hashing.bytes


def write_shard(out: Path, shard: int, items: list[Item], config_sha256: str,
                stages: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Write shard ``shard`` from its items (accepted and rejected, any order) and its manifest."""
    items = sorted(items, key=lambda it: it.index)
    accepted = [it for it in items if it.ok and it.members is not None]
    final = tar_path(out, shard)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        sha256, size = write_tar(tmp, ((it.key, it.members) for it in accepted))
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    layers = Counter(str(it.num_layers) for it in accepted)
    manifest = {
        "schema": SHARD_SCHEMA,
        "shard": shard,
        "sha256": sha256,
        "bytes": size,
        "samples": len(accepted),
        "keys": [it.key for it in accepted],
        "rejected": [{"source": it.uri, "key": it.key, **(it.rejected or {"stage": "assemble",
                     "reason": "no sample produced"})} for it in items if it not in accepted],
        "layers": dict(sorted(layers.items())),
        "config_sha256": config_sha256,
        "stages": stages,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
    }
    write_json_atomic(manifest_path(out, shard), manifest)
    return manifest


def read_verified_manifest(out: Path, shard: int, config_sha256: str | None = None) -> dict[str, Any] | None:
    """The shard's manifest if the shard is complete and intact, else None."""
    mpath, tpath = manifest_path(out, shard), tar_path(out, shard)
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("schema") != SHARD_SCHEMA or manifest.get("shard") != shard:
        return None
    if config_sha256 is not None and manifest.get("config_sha256") != config_sha256:
        return None
    if not tpath.is_file() or tpath.stat().st_size != manifest.get("bytes"):
        return None
    if file_sha256(tpath) != manifest.get("sha256"):
        return None
    return manifest


def clean_temporaries(out: Path) -> list[Path]:
    """Remove leftovers of an interrupted run (temporary tars and manifests)."""
    removed = []
    for folder in (out / "shards", out / "manifests", out):
        for p in folder.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def stage_identities(manifests: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each stage's distinct identities (backend, model, checkpoint, licence, version) over the
    shard manifests, in shard order: the index's record of which models made the dataset."""
    stages: dict[str, list[dict[str, Any]]] = {}
    for manifest in manifests:
        for stage, identity in (manifest.get("stages") or {}).items():
            seen = stages.setdefault(stage, [])
            if identity not in seen:
                seen.append(identity)
    return stages


def write_index(out: Path, config: dict[str, Any], config_sha256: str) -> dict[str, Any]:
    """Write OUT/manifest.json from every verified shard manifest present."""
    shards, totals = [], {"samples": 0, "rejected": 0, "bytes": 0}
    manifests = []
    for mpath in sorted((out / "manifests").glob("[0-9]*.json")):
        shard = int(mpath.stem)
        manifest = read_verified_manifest(out, shard, config_sha256)
        if manifest is None:
            continue
        shards.append({"shard": shard, "samples": manifest["samples"], "bytes": manifest["bytes"],
                       "sha256": manifest["sha256"]})
        totals["samples"] += manifest["samples"]
        totals["rejected"] += len(manifest["rejected"])
        totals["bytes"] += manifest["bytes"]
        manifests.append(manifest)
    index = {"schema": DATASET_SCHEMA, "config": config, "config_sha256": config_sha256,
             "shards": shards, "totals": totals, "stages": stage_identities(manifests)}
    write_json_atomic(out / "manifest.json", index)
    return index
