"""Random access to the samples of a dataset by key, for the browser (``python -m manifests serve``).

Each shard tar gets an index of its members' byte offsets (read from the tar headers, one pass,
data skipped) and a small record per sample for filtering and sorting (layer count, searchable
text, numeric quality fields), taken from the sample's json member. An index is built once per
tar and cached as JSON **outside OUT** (OUT is never written to): under ``cache_dir/<hash of
OUT's resolved path>/NNNNNN.json``, keyed by the tar's size, mtime and inode, so a rewritten tar
is re-indexed. With ``cache_dir=None`` the index lives in memory only.

Reading a sample then costs one ``pread`` per member instead of a scan of its tar.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen.format import split_member_name
from manifests.layout import read_json, scan_dataset

INDEX_VERSION = 1
DERIVED_FIELDS = ("layers", "min_layer_score", "min_layer_area")  # numbers computed from the json


def default_cache_dir() -> Path:
    """``$LAYERDIFF_CACHE/browse``, else ``$XDG_CACHE_HOME/layerdiff/browse`` (``~/.cache`` default)."""
    if os.environ.get("LAYERDIFF_CACHE"):
        return Path(os.environ["LAYERDIFF_CACHE"]) / "browse"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "layerdiff" / "browse"


def dataset_cache_dir(cache_dir: Path, out: Path) -> Path:
    """The cache folder of one dataset: named by a hash of OUT's resolved path."""
    resolved = str(Path(out).resolve())
    return Path(cache_dir) / hashlib.sha256(resolved.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def _tar_stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _numbers(doc: Any) -> dict[str, float]:
    """The finite numeric (not bool) values of a flat dict."""
    if not isinstance(doc, dict):
        return {}
    return {str(k): float(v) for k, v in doc.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")}


def sample_record(meta: Any) -> dict[str, Any]:
    """What filters and sorts need of a sample's json: layer count, lower-cased searchable text
    (caption, background caption, layer phrases and captions) and numeric fields (its
    ``quality`` numbers plus :data:`DERIVED_FIELDS`)."""
    meta = meta if isinstance(meta, dict) else {}
    layers = [layer for layer in meta.get("layers", []) if isinstance(layer, dict)] \
        if isinstance(meta.get("layers"), list) else []
    bg = meta.get("background") if isinstance(meta.get("background"), dict) else {}
    texts = [str(meta.get("caption", "")), str(bg.get("caption", ""))]
    texts += [str(layer.get(k, "")) for layer in layers for k in ("phrase", "caption")]
    numbers = _numbers(meta.get("quality"))
    numbers["layers"] = float(len(layers))
    for name, key in (("min_layer_score", "score"), ("min_layer_area", "area")):
        values = [v for layer in layers for v in _numbers({key: layer.get(key)}).values()]
        if values:
            numbers[name] = min(values)
    return {"layers": len(layers), "text": " | ".join(t for t in texts if t).lower(), "numbers": numbers}


def index_tar(path: Path) -> dict[str, Any]:
    """Index one shard tar: ``{"tar": stamp, "samples": [{"key", "members": {suffix: [offset, size]},
    "record"}], "problems": [...]}``. Samples are in tar order; a sample's first copy of a member
    wins (as in :func:`datagen.format.iter_tar_samples`); a damaged tar keeps what was read before
    the damage and names it in ``problems``."""
    stamp = _tar_stamp(path)
    samples: dict[str, dict[str, list[int]]] = {}
    problems: list[str] = []
    try:
        # "r:" (not the streaming "r|"): headers are read and the data is skipped by seeking.
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                try:
                    key, suffix = split_member_name(info.name)
                except ValueError as err:
                    problems.append(str(err))
                    continue
                samples.setdefault(key, {}).setdefault(suffix, [info.offset_data, info.size])
    except (OSError, tarfile.TarError) as err:
        problems.append(f"{path.name}: {type(err).__name__}: {err}")
    entries = []
    with open(path, "rb") as f:
        for key, members in samples.items():
            meta: Any = None
            if "json" in members:
                offset, size = members["json"]
                try:
                    meta = json.loads(os.pread(f.fileno(), size, offset).decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    problems.append(f"{key}: json member is not UTF-8 JSON")
            entries.append({"key": key, "members": members, "record": sample_record(meta)})
    return {"version": INDEX_VERSION, "tar": stamp, "samples": entries, "problems": problems}


@dataclass(slots=True)
class IndexedSample:
    """Where one sample's members are, and its filter record."""

    key: str
    shard: int
    members: dict[str, tuple[int, int]]
    layers: int
    text: str
    numbers: dict[str, float]
    position: int  # order in the dataset (shard, then tar order)


@dataclass
class ShardIndex:
    """Every indexed shard of a dataset and a key -> sample table; see the module docstring."""

    out: Path
    cache_dir: Path | None = None
    shards: dict[int, dict[str, Any]] = field(default_factory=dict)  # shard -> {"tar": stamp, "problems"}
    shard_samples: dict[int, list[IndexedSample]] = field(default_factory=dict)
    tars: dict[int, Path] = field(default_factory=dict)
    samples: list[IndexedSample] = field(default_factory=list)
    by_key: dict[str, IndexedSample] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def cache_folder(self) -> Path | None:
        return None if self.cache_dir is None else dataset_cache_dir(self.cache_dir, self.out)

    def _cached(self, shard: int, tar: Path) -> dict[str, Any] | None:
        folder = self.cache_folder
        if folder is None:
            return None
        try:
            doc = read_json(folder / f"{shard:06d}.json")
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("version") != INDEX_VERSION or doc.get("tar") != _tar_stamp(tar):
            return None
        return doc

    def _store(self, shard: int, doc: dict[str, Any]) -> None:
        folder = self.cache_folder
        if folder is None:
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "dataset.txt").write_text(f"{self.out.resolve()}\n")
            tmp = folder / f".{shard:06d}.json.tmp-{os.getpid()}-{threading.get_ident()}"
            tmp.write_text(json.dumps(doc, separators=(",", ":")))
            os.replace(tmp, folder / f"{shard:06d}.json")
        except OSError:
            pass  # an unwritable cache only costs a rebuild next time

    def refresh(self) -> list[int]:
        """Index new or changed tars (from the cache when it matches), forget removed ones;
        returns the shards (re)loaded."""
        with self._lock:
            tars = scan_dataset(self.out).tars
            changed = []
            for shard, tar in sorted(tars.items()):
                doc = self.shards.get(shard)
                try:
                    stamp = _tar_stamp(tar)
                except OSError:
                    continue
                if doc is not None and doc["tar"] == stamp:
                    continue
                doc = self._cached(shard, tar)
                if doc is None:
                    doc = index_tar(tar)
                    self._store(shard, doc)
                # Only the samples' compact records stay in memory, not the document.
                self.shard_samples[shard] = [
                    IndexedSample(e["key"], shard, {k: (v[0], v[1]) for k, v in e["members"].items()},
                                  e["record"]["layers"], e["record"]["text"], e["record"]["numbers"], 0)
                    for e in doc["samples"]]
                self.shards[shard] = {"tar": doc["tar"], "problems": doc["problems"]}
                changed.append(shard)
            removed = set(self.shards) - set(tars)
            for shard in removed:
                del self.shards[shard], self.shard_samples[shard]
            self.tars = dict(tars)
            if changed or removed:
                self._rebuild_table()
            return changed

    def _rebuild_table(self) -> None:
        samples: list[IndexedSample] = []
        by_key: dict[str, IndexedSample] = {}
        for shard in sorted(self.shard_samples):
            for s in self.shard_samples[shard]:
                if s.key in by_key:
                    continue  # a duplicate key across shards: the first one is browsable
                s.position = len(samples)
                samples.append(s)
                by_key[s.key] = s
        self.samples, self.by_key = samples, by_key

    def numeric_fields(self) -> list[str]:
        """Every numeric field some sample has, derived ones first."""
        names: set[str] = set()
        for s in self.samples:
            names.update(s.numbers)
        return [f for f in DERIVED_FIELDS if f in names] + sorted(names - set(DERIVED_FIELDS))

    def read_members(self, sample: IndexedSample, suffixes: Iterable[str] | None = None) -> dict[str, bytes]:
        """The bytes of a sample's members (all, or ``suffixes``), by offset. Raises LookupError when
        the tar changed since it was indexed (call :meth:`refresh`) or is gone."""
        tar = self.tars.get(sample.shard)
        doc = self.shards.get(sample.shard)
        if tar is None or doc is None:
            raise LookupError(f"shard {sample.shard:06d} is gone")
        wanted = sample.members if suffixes is None else {s: sample.members[s] for s in suffixes
                                                          if s in sample.members}
        with open(tar, "rb") as f:
            st = os.fstat(f.fileno())
            if {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino} != doc["tar"]:
                raise LookupError(f"shard {sample.shard:06d} changed since it was indexed")
            return {suffix: os.pread(f.fileno(), size, offset) for suffix, (offset, size) in wanted.items()}


def open_index(out: str | Path, cache_dir: Path | None = None) -> ShardIndex:
    """Index (or load the cached index of) every shard tar of ``out``."""
    index = ShardIndex(Path(out), cache_dir)
    index.refresh()
    return index
