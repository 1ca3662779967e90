"""Re-read a whole dataset against its manifests and the format (``python -m manifests validate``).

Every tar is streamed once: its sha256 and size are computed while its samples are decoded and
checked, so validation costs one read of the data. Shards are independent and can be checked in
parallel processes (``jobs``); cross-shard checks (key uniqueness, the index) run afterwards.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from datagen.format import (
    LAYERS_MEMBER,
    FormatError,
    LayerSample,
    TarSample,
    check_sample,
    decode_png,
    iter_tar_samples,
    member_suffixes,
    read_sample,
    schema_version,
)
from datagen.hashing import HashingReader
from datagen.writer import stage_identities
from manifests.layout import read_json, scan_dataset, shard_name
from manifests.schemas import document_errors

AREA_TOLERANCE = 0.005  # |layers[n].area - mask coverage| allowed (fraction of the image)
BOX_TOLERANCE = 1.0  # pixels a box may stick out of the image
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
_LAYER_MEMBER = re.compile(r"^(?:fg|mask)\.([0-9]+)\.png$")


@dataclass(frozen=True)
class Violation:
    """One finding; ``shard`` and ``key`` say where (None for dataset-wide findings)."""

    message: str
    shard: int | None = None
    key: str | None = None
    level: str = "error"  # "error" or "warning"

    def where(self) -> str:
        parts = []
        if self.shard is not None:
            parts.append(f"shard {shard_name(self.shard)}")
        if self.key:
            parts.append(f"key {self.key}")
        return " ".join(parts) or "dataset"

    def __str__(self) -> str:
        return f"{self.level.upper()} {self.where()}: {self.message}"


@dataclass
class ShardResult:
    """What checking one shard found, plus what the cross-shard checks need."""

    shard: int
    violations: list[Violation] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # distinct sample keys, tar order
    manifest: dict[str, Any] | None = None  # None when missing or unreadable
    tar_samples: int = 0


@dataclass
class Report:
    """The outcome of :func:`validate_dataset`."""

    violations: list[Violation]
    shards: int = 0
    samples: int = 0

    @property
    def errors(self) -> list[Violation]:
        return [v for v in self.violations if v.level == "error"]

    @property
    def warnings(self) -> list[Violation]:
        return [v for v in self.violations if v.level == "warning"]

    def ok(self, strict: bool = False) -> bool:
        """No errors (and, when ``strict``, no warnings either)."""
        return not (self.violations if strict else self.errors)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok(), "shards": self.shards, "samples": self.samples,
                "errors": len(self.errors), "warnings": len(self.warnings),
                "violations": [asdict(v) for v in self.violations]}


# -- one sample ----------------------------------------------------------------------------------

def check_layer_meta(sample: LayerSample) -> list[str]:
    """Checks of layers[] against the pixels that neither the schema nor check_sample make:
    boxes inside the image with x0 <= x1, y0 <= y1, and area equal to the mask's coverage."""
    problems: list[str] = []
    layers = sample.meta.get("layers")
    if not isinstance(layers, list):
        return problems
    h, w = sample.image.shape[:2]
    for n, layer in enumerate(layers):
        if not isinstance(layer, dict):
            continue
        box = layer.get("box")
        if isinstance(box, list) and len(box) == 4 and all(isinstance(c, (int, float)) for c in box):
            x0, y0, x1, y1 = box
            if x0 > x1 or y0 > y1:
                problems.append(f"layers[{n}].box {box} has x0 > x1 or y0 > y1")
            if min(x0, y0) < -BOX_TOLERANCE or x1 > w + BOX_TOLERANCE or y1 > h + BOX_TOLERANCE:
                problems.append(f"layers[{n}].box {box} lies outside the {w}x{h} image")
        area = layer.get("area")
        if n < len(sample.masks) and isinstance(area, (int, float)) and sample.masks[n].shape == (h, w):
            coverage = float(np.count_nonzero(sample.masks[n])) / float(h * w)
            if abs(coverage - area) > AREA_TOLERANCE:
                problems.append(f"layers[{n}].area {area:.4f} != mask coverage {coverage:.4f}")
    return problems


def layer_layout(members: Mapping[str, bytes]) -> tuple[int, int]:
    """(layer count, format version) of a sample from its members: from its json when readable,
    else inferred (format 1 when fg/mask members are present, counted up to the highest index)."""
    indices = [int(m.group(1)) for m in map(_LAYER_MEMBER.match, members) if m]
    count, version = (min(max(indices) + 1, len(members)), 1) if indices else (0, 2)
    try:
        meta = json.loads(members["json"].decode("utf-8"))
        layers = meta.get("layers")
        if isinstance(layers, list):
            count = len(layers)
        version = schema_version(meta.get("schema"))
    except Exception:  # noqa: BLE001 - absent or unreadable json, unknown version: as inferred
        pass
    return count, version


def missing_members(members: Mapping[str, bytes]) -> list[str]:
    """The member suffixes a sample lacks, in write order (see :func:`layer_layout`)."""
    count, version = layer_layout(members)
    return [s for s in member_suffixes(count, version) if s not in members]


def _member_errors(key: str, members: Mapping[str, bytes]) -> list[str]:
    """Which members fail to decode, and why."""
    problems = []
    for suffix, data in members.items():
        try:
            if suffix.endswith(".png"):
                mode = "RGBA" if suffix == LAYERS_MEMBER else "L" if suffix.startswith("mask.") else "RGB"
                decode_png(data, mode)
            elif suffix == "txt":
                data.decode("utf-8")
            elif suffix == "json":
                json.loads(data.decode("utf-8"))
        except Exception as err:  # noqa: BLE001 - reported
            detail = _OBJECT_REPR.sub("", str(err)).strip()
            problems.append(f"member {key}.{suffix} is unreadable: {type(err).__name__}: {detail}")
    return problems


def check_members(key: str, members: Mapping[str, bytes], max_layers: int | None = None) -> list[str]:
    """Every format violation of one sample given its tar members (suffix -> bytes)."""
    missing = missing_members(members)
    if missing:
        return [f"missing member {key}.{suffix}" for suffix in missing]
    try:
        sample = read_sample(members, key=key)
    except Exception as err:  # noqa: BLE001 - any decoding failure is a finding
        problems = _member_errors(key, members)
        if not problems and isinstance(err, FormatError) and err.member != "json":
            problems = [err.located(shard=False, key=False)]
        if not problems:  # the members decode, so the json's content is to blame
            try:
                problems = [f"json {e}" for e in document_errors(json.loads(members["json"]), "sample")]
            except ValueError:
                problems = []
        detail = err.located(shard=False, key=False) if isinstance(err, FormatError) else \
            f"cannot decode: {type(err).__name__}: {err}"
        return problems or [detail]
    problems = [f"json {e}" for e in document_errors(sample.meta, "sample")]
    if not isinstance(sample.meta, dict):
        return problems
    try:
        problems += check_sample(sample, max_layers=max_layers, members=members)
        problems += check_layer_meta(sample)
    except Exception as err:  # noqa: BLE001 - malformed json values make the checks trip
        problems.append(f"cannot check: {type(err).__name__}: {err}")
    return problems


class _SampleChecker:
    """Checks a tar's samples as its groups stream by. A sample with missing members waits until
    the end of the tar, in case the rest of it comes later (non-contiguous members): the layout
    problem is reported once and the reassembled sample is still checked."""

    def __init__(self, max_layers: int | None, add: Callable[..., None], version: int | None = None) -> None:
        self.max_layers, self.add, self.version = max_layers, add, version
        self.keys: list[str] = []  # tar order of first appearance
        self.hist: Counter[int] = Counter()
        self.pending: dict[str, dict[str, bytes]] = {}
        self.done: set[str] = set()

    def feed(self, group: TarSample) -> None:
        key = group.key
        if not key:
            for p in group.problems:
                self.add(p)
            return
        for p in group.problems:
            self.add(p, key=key)
        if key in self.done:
            return  # a late fragment of a checked sample; the reader flagged it above
        members = group.members
        if key in self.pending:
            members = self.pending.pop(key)
            for suffix, data in group.members.items():
                if suffix in members:
                    self.add(f"duplicate member {key}.{suffix}", key=key)
                else:
                    members[suffix] = data
        else:
            self.keys.append(key)
        if missing_members(members):
            self.pending[key] = members
        else:
            self._check(key, members)

    def finish(self) -> None:
        for key, members in self.pending.items():
            self._check(key, members)
        self.pending.clear()

    def _check(self, key: str, members: dict[str, bytes]) -> None:
        self.done.add(key)
        for p in check_members(key, members, self.max_layers):
            self.add(p, key=key)
        count, version = layer_layout(members)
        if self.version is not None and version != self.version:
            self.add(f"sample is format {version} but its shard manifest is format {self.version} "
                     "(a shard holds one version; `python -m manifests upgrade` rewrites whole shards)", key=key)
        self.hist[count] += 1


# -- one shard -----------------------------------------------------------------------------------

def _compare_keys(found: list[str], listed: list[str], add: Callable[..., None]) -> None:
    if found == listed:
        return
    found_set, listed_set = set(found), set(listed)
    missing = [k for k in listed if k not in found_set]
    extra = [k for k in found if k not in listed_set]
    for k in missing:
        add("listed in the manifest but not in the tar", key=str(k))
    for k in extra:
        add("in the tar but not listed in the manifest", key=k)
    if not missing and not extra:
        pos = next(i for i, (a, b) in enumerate(zip(found, listed, strict=False)) if a != b)
        add(f"manifest keys are not in tar order (first difference at position {pos})", key=found[pos])


def validate_shard(shard: int, tar: Path | None, manifest: Path | None,
                   max_layers: int | None = None) -> ShardResult:
    """Check one shard: its manifest (schema, numbers) against its tar, and every sample in it."""
    result = ShardResult(shard)

    def add(message: str, key: str | None = None, level: str = "error") -> None:
        result.violations.append(Violation(message, shard, key, level))

    doc: Any = None
    if manifest is None:
        add("tar without manifest: the shard is not done (a resume rewrites it)")
    else:
        try:
            doc = read_json(manifest)
        except (OSError, ValueError) as err:
            add(f"manifest unreadable: {err}")
        else:
            for e in document_errors(doc, "shard"):
                add(f"manifest {e}")
            if isinstance(doc, dict):
                result.manifest = doc
                if doc.get("shard") != shard:
                    add(f"manifest says shard {doc.get('shard')!r} but is named {manifest.name}")
    if tar is None:
        add("manifest without tar")
        return result

    checker = _SampleChecker(max_layers, add, _version(result.manifest, "shard"))
    with open(tar, "rb") as raw:
        reader = HashingReader(raw)
        try:
            for group in iter_tar_samples(reader):
                checker.feed(group)
        except (tarfile.TarError, OSError, EOFError) as err:
            add(f"tar unreadable after {len(checker.keys)} samples: {type(err).__name__}: {err}")
        checker.finish()
        reader.drain()
    result.keys = checker.keys
    hist = checker.hist
    result.tar_samples = len(result.keys)

    doc = result.manifest
    if doc is None:
        return result
    if doc.get("sha256") != reader.hexdigest():
        add(f"tar sha256 {reader.hexdigest()} != manifest sha256 {doc.get('sha256')}")
    if doc.get("bytes") != reader.bytes:
        add(f"tar is {reader.bytes} bytes, manifest says {doc.get('bytes')}")
    if doc.get("samples") != result.tar_samples:
        add(f"tar holds {result.tar_samples} samples, manifest says {doc.get('samples')}")
    keys = doc.get("keys")
    if isinstance(keys, list) and all(isinstance(k, str) for k in keys):
        _compare_keys(result.keys, keys, add)
        if isinstance(doc.get("samples"), int) and doc["samples"] != len(keys):
            add(f"manifest samples {doc['samples']} != {len(keys)} keys listed")
    layers = doc.get("layers")
    if isinstance(layers, dict):
        listed = {str(k): v for k, v in layers.items() if v}
        actual = {str(k): v for k, v in sorted(hist.items())}
        if listed != actual:
            add(f"layers histogram {listed} != tar's {actual}")
    rejected = doc.get("rejected")
    if isinstance(rejected, list):
        stored = set(result.keys)
        for item in rejected:
            if isinstance(item, dict) and isinstance(item.get("key"), str) and item["key"] in stored:
                add("key is both stored and listed as rejected", key=str(item["key"]))
    return result


def _version(doc: Any, kind: str) -> int | None:
    """The format version a document names, None when it names none that is known."""
    try:
        return schema_version(doc.get("schema"), kind) if isinstance(doc, dict) else None
    except FormatError:
        return None


def _validate_shard_args(args: tuple[int, Path | None, Path | None, int | None]) -> ShardResult:
    return validate_shard(*args)


# -- the dataset ---------------------------------------------------------------------------------

def find_setting(config: Any, name: str) -> Any:
    """The first value of ``name`` found in a nested config (depth first), or None."""
    if isinstance(config, dict):
        if name in config:
            return config[name]
        for value in config.values():
            found = find_setting(value, name)
            if found is not None:
                return found
    return None


def _identity_text(identity: Any) -> str:
    if not isinstance(identity, dict):
        return repr(identity)
    ckpt = identity.get("checkpoint")
    ckpt_text = f"{ckpt.get('name')}@{str(ckpt.get('sha256'))[:12]}" if isinstance(ckpt, dict) else "-"
    licence = f" licence={identity.get('licence')}" if identity.get("licence") else ""
    return (f"{identity.get('backend')} model={identity.get('model')} checkpoint={ckpt_text}{licence} "
            f"v{identity.get('version')}")


def _cross_shard(results: list[ShardResult], add: Callable[..., None], compare_configs: bool) -> None:
    owner: dict[str, int] = {}
    for r in results:
        for key in r.keys:
            if key in owner:
                add(f"duplicate key: also in shard {shard_name(owner[key])}", shard=r.shard, key=key)
            else:
                owner[key] = r.shard
    manifests = [r for r in results if r.manifest is not None]
    configs = Counter(str(r.manifest.get("config_sha256")) for r in manifests)  # type: ignore[union-attr]
    if compare_configs and len(configs) > 1:  # with an index, each shard is compared to it instead
        common = configs.most_common(1)[0][0]
        for r in manifests:
            if str(r.manifest.get("config_sha256")) != common:  # type: ignore[union-attr]
                add(f"config_sha256 {r.manifest.get('config_sha256')} differs from the other shards' "  # type: ignore[union-attr]
                    f"{common}", shard=r.shard)
    stage_ids: dict[str, Counter[str]] = {}
    for r in manifests:
        stages = r.manifest.get("stages")  # type: ignore[union-attr]
        if isinstance(stages, dict):
            for stage, identity in stages.items():
                stage_ids.setdefault(stage, Counter())[_identity_text(identity)] += 1
    for stage, ids in sorted(stage_ids.items()):
        if len(ids) > 1:
            seen = "; ".join(f"{text} ({n} shards)" for text, n in ids.most_common())
            add(f"stage {stage} ran with different backends/checkpoints across shards: {seen}",
                level="warning")


def _check_index(index: Any, results: list[ShardResult], add: Callable[..., None]) -> None:
    for e in document_errors(index, "dataset"):
        add(f"manifest.json {e}")
    if not isinstance(index, dict):
        return
    by_shard = {r.shard: r.manifest for r in results}
    listed = index.get("shards") if isinstance(index.get("shards"), list) else []
    numbers = [e["shard"] for e in listed if isinstance(e, dict) and isinstance(e.get("shard"), int)]
    if numbers != sorted(numbers):
        add("manifest.json shards are not in shard order")
    for shard, n in Counter(numbers).items():
        if n > 1:
            add(f"manifest.json lists shard {shard} {n} times")
    for entry in listed:
        if not isinstance(entry, dict) or not isinstance(entry.get("shard"), int):
            continue
        shard = entry["shard"]
        if shard not in by_shard:
            add(f"manifest.json lists shard {shard_name(shard)}, which has no files")
            continue
        manifest = by_shard[shard]
        if manifest is None:
            continue
        for name in ("samples", "bytes", "sha256"):
            if entry.get(name) != manifest.get(name):
                add(f"manifest.json says {name}={entry.get(name)!r}, shard manifest says "
                    f"{manifest.get(name)!r}", shard=shard)
    for shard in sorted(set(by_shard) - set(numbers)):
        add("shard is missing from manifest.json", shard=shard)
    manifests = [m for m in by_shard.values() if m is not None]
    index_version = _version(index, "dataset")
    for r in results:
        shard_version = _version(r.manifest, "shard")
        if index_version is not None and shard_version is not None and shard_version != index_version:
            add(f"shard manifest is format {shard_version} but manifest.json is format {index_version} "
                "(an unfinished `python -m manifests upgrade`? rerun it)", shard=r.shard)
    if index_version is not None and index_version >= 2 and isinstance(index.get("stages"), dict):
        expected_stages = stage_identities([by_shard[n] for n in sorted(by_shard) if by_shard[n] is not None])
        if index["stages"] != expected_stages:
            add("manifest.json stages differ from the stage identities the shard manifests record")
    config_sha = index.get("config_sha256")
    for r in results:
        if r.manifest is not None and r.manifest.get("config_sha256") != config_sha:
            add(f"config_sha256 {r.manifest.get('config_sha256')} != manifest.json's {config_sha}",
                shard=r.shard)
    totals = index.get("totals") if isinstance(index.get("totals"), dict) else {}

    def total(values: Iterable[Any]) -> int | None:
        values = list(values)
        return sum(values) if all(isinstance(v, int) for v in values) else None

    expected = {
        "samples": total(m.get("samples") for m in manifests),
        "rejected": total(len(m["rejected"]) if isinstance(m.get("rejected"), list) else None
                          for m in manifests),
        "bytes": total(m.get("bytes") for m in manifests),
    }
    for name, value in expected.items():
        if value is not None and totals.get(name) != value:
            add(f"manifest.json totals.{name}={totals.get(name)!r}, the shard manifests add up to {value}")


def validate_dataset(out: str | Path, max_layers: int | None = None, jobs: int = 1,
                     progress: bool = False) -> Report:
    """Check a whole dataset (see docs/FORMAT.md, "Validation"); never raises on bad data.

    ``max_layers`` defaults to the ``max_layers`` setting found in the index's config (no upper
    limit when absent). ``jobs`` > 1 checks shards in that many processes.
    """
    out = Path(out)
    violations: list[Violation] = []

    def add(message: str, shard: int | None = None, key: str | None = None, level: str = "error") -> None:
        violations.append(Violation(message, shard, key, level))

    if not out.is_dir():
        add(f"{out} is not a directory")
        return Report(violations)
    files = scan_dataset(out)
    for sub in files.missing_dirs:
        add(f"{sub}/ is missing")
    for path in files.temporary:
        add(f"temporary file {path.relative_to(out)} (left by an unfinished write; not part of the "
            "dataset, safe to delete once no writer runs)", level="warning")
    for path in files.stray:
        add(f"stray file {path.relative_to(out)} (not a shard tar or shard manifest)")
    index: Any = None
    if not files.index.is_file():
        add("manifest.json is missing: the run has not finished (or was interrupted)")
    else:
        try:
            index = read_json(files.index)
        except (OSError, ValueError) as err:
            add(f"manifest.json unreadable: {err}")
    if max_layers is None and isinstance(index, dict):
        setting = find_setting(index.get("config"), "max_layers")
        max_layers = setting if isinstance(setting, int) and setting > 0 else None
    if not files.shards and not files.missing_dirs:
        add("no shards")

    tasks = [(s, files.tars.get(s), files.manifests.get(s), max_layers) for s in files.shards]
    bar = dict(total=len(tasks), desc="validate", unit="shard", disable=not progress, leave=False)
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(tqdm(pool.map(_validate_shard_args, tasks), **bar))
    else:
        results = [validate_shard(*t) for t in tqdm(tasks, **bar)]
    for r in results:
        violations.extend(r.violations)
    _cross_shard(results, add, compare_configs=not isinstance(index, dict))
    if index is not None:
        _check_index(index, results, add)
    return Report(violations, shards=len(results), samples=sum(r.tar_samples for r in results))
