"""Shard writer: one tar per shard, written under a temporary name and renamed, then its manifest.

A shard is done exactly when its manifest exists (same schema, shard and config) and its tar
matches it (:func:`read_verified_manifest`, the one "shard done" rule), so a crash or kill never
leaves a shard that looks complete, and a rerun rebuilds only what is missing. The tar is hashed
while it is written; its size and mtime go into the manifest so that a rerun trusts an untouched
tar without reading it again (``verify=True`` re-hashes).
"""

from __future__ import annotations

import errno
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from datagen.format import DATASET_SCHEMA, SHARD_SCHEMA
from datagen.hashing import ThreadedSha256, file_sha256
from datagen.item import Item

TAR_MTIME = 0  # fixed member metadata: the same samples give byte-identical tars


def shard_name(shard: int) -> str:
    return f"{shard:06d}"


def tar_path(out: str | Path, shard: int) -> Path:
    return Path(out) / "shards" / f"{shard_name(shard)}.tar"


def manifest_path(out: str | Path, shard: int) -> Path:
    return Path(out) / "manifests" / f"{shard_name(shard)}.json"


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tar_buffers(samples: Iterable[tuple[str, dict[str, bytes]]]) -> Iterator[bytes | memoryview]:
    """The bytes ``tarfile`` writes for these members (``USTAR_FORMAT``, ``addfile`` in order,
    then ``close``), as a sequence of buffers: each member's header, its data (the caller's
    object, not copied) and zero padding to a block, then two zero blocks and zero padding to a
    record. Framing it here lets :func:`write_tar` hand the buffers to the kernel in few calls."""
    offset = 0
    for key, members in samples:
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
            header = info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
            pad = -len(data) % tarfile.BLOCKSIZE
            yield header
            if data:
                yield data
            if pad:
                yield _ZEROS[:pad]
            offset += len(header) + len(data) + pad
    end = 2 * tarfile.BLOCKSIZE
    end += -(offset + end) % tarfile.RECORDSIZE
    yield _ZEROS[:end]


_ZEROS = memoryview(bytes(tarfile.RECORDSIZE + 2 * tarfile.BLOCKSIZE))
WRITE_BYTES = 1 << 20  # buffers gathered into one writev call up to about this many bytes ...
WRITE_BUFFERS = min(512, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16)  # ... or this many
# Ask the kernel to start writing a shard to disk every this many bytes, so that the final fsync
# waits only for the tail instead of the whole shard.
WRITEBACK_BYTES = 8 << 20


def _writev(fd: int, buffers: list[bytes | memoryview]) -> None:
    """Write every buffer, in order; a short write (a disk filling up) continues, and the next
    write raises."""
    while buffers:
        n = os.writev(fd, buffers)
        if n == 0:
            raise OSError(errno.EIO, "write made no progress")
        while buffers and n >= len(buffers[0]):
            n -= len(buffers[0])
            buffers = buffers[1:]
        if n:
            buffers = [memoryview(buffers[0])[n:], *buffers[1:]]


def _batches(buffers: Iterable[bytes | memoryview]) -> Iterator[tuple[list[bytes | memoryview], int]]:
    """Consecutive buffers gathered into lists of about WRITE_BYTES (at most WRITE_BUFFERS
    buffers), each with its byte count: one writev call each."""
    batch: list[bytes | memoryview] = []
    batched = 0
    for buf in buffers:
        batch.append(buf)
        batched += len(buf)
        if batched >= WRITE_BYTES or len(batch) >= WRITE_BUFFERS:
            yield batch, batched
            batch, batched = [], 0
    if batch:
        yield batch, batched


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> tuple[str, int]:
    """Write samples (key, suffix -> bytes) to ``path`` as a tar, members contiguous in the order
    given, byte-identical to ``tarfile`` (:func:`tar_buffers`), hashing while writing, and flush it
    to disk; returns the tar's (sha256, size in bytes)."""
    size = started = 0  # bytes written; bytes whose writeback was started
    with open(path, "wb", buffering=0) as raw, ThreadedSha256() as sha:
        fd = raw.fileno()
        for batch, batched in _batches(tar_buffers(samples)):
            sha.update(batch)  # hashed on a second core while this one writes
            _writev(fd, batch)
            size += batched
            if size - started >= WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
                # On Linux this starts writing the range back to disk (dirty pages stay cached).
                os.posix_fadvise(fd, started, size - started, os.POSIX_FADV_DONTNEED)
                started = size
        os.fsync(fd)
    if path.stat().st_size != size:  # the temporary file was replaced or truncated meanwhile
        raise OSError(f"{path} holds {path.stat().st_size} bytes, {size} were written")
    return sha.hexdigest(), size


def write_shard(out: Path, shard: int, items: list[Item], config_sha256: str,
                stages: dict[str, Any], seconds: float, source_end: list[int] | None = None) -> dict[str, Any]:
    """Write shard ``shard`` from its items (accepted and rejected, any order) and its manifest.
    ``source_end``: where the shard's items end in the source's listing (``datagen.sources.
    Position``), recorded so that a rerun lists the next shard from there."""
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
        "tar_mtime_ns": final.stat().st_mtime_ns,  # with bytes: lets a rerun trust the tar unread
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
    if source_end is not None:
        manifest["source_end"] = source_end
    write_json_atomic(manifest_path(out, shard), manifest)
    return manifest


def read_verified_manifest(out: Path, shard: int, config_sha256: str | None = None, verify: bool = False,
                           refresh: bool = False) -> dict[str, Any] | None:
    """The shard's manifest if the shard is done, else None: the one "shard done" rule.

    Done means: the manifest parses, has this format's schema and shard number (and
    ``config_sha256`` when given), and the tar has the recorded size and either the recorded
    mtime (trusted without reading) or the recorded sha256. ``verify=True`` always hashes.
    ``refresh=True`` records the mtime of a tar that hashed correctly (a moved OUT), so the
    next run trusts it without hashing again.
    """
    mpath, tpath = manifest_path(out, shard), tar_path(out, shard)
    try:
        manifest = json.loads(mpath.read_text())
        st = tpath.stat()
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("schema") != SHARD_SCHEMA or manifest.get("shard") != shard:
        return None
    if config_sha256 is not None and manifest.get("config_sha256") != config_sha256:
        return None
    if not tpath.is_file() or st.st_size != manifest.get("bytes"):
        return None
    if not verify and manifest.get("tar_mtime_ns") == st.st_mtime_ns:
        return manifest
    try:
        if file_sha256(tpath, cache=False) != manifest.get("sha256"):
            return None
    except OSError:
        return None
    if refresh and manifest.get("tar_mtime_ns") != st.st_mtime_ns:
        manifest["tar_mtime_ns"] = st.st_mtime_ns
        try:
            write_json_atomic(mpath, manifest)
        except OSError:  # a read-only OUT: still done, it is only hashed again next time
            pass
    return manifest


def shard_done(out: str | Path, shard: int, config_sha256: str | None = None, verify: bool = True) -> bool:
    """Whether shard ``shard`` of ``out`` is complete and intact (see :func:`read_verified_manifest`)."""
    return read_verified_manifest(Path(out), shard, config_sha256, verify=verify) is not None


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
