"""The one pipeline config schema: YAML -> validated ``PipelineConfig``, checked before any work.

Every key is known; an unknown key, an unknown backend, a bad value or a missing checkpoint is
a ``ConfigError`` naming the key (``stages.ground.params.box_threshold``) before data is read.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datagen.registry import STAGES, get_backend
from datagen.stages.base import StageContext, params_from_dict

SOURCE_KINDS = ("demo", "folder", "tars", "synthetic-gt")

DEFAULT_STAGES: dict[str, dict[str, Any]] = {
    # CPU shares sum to < 2 so the whole stream fits a 2-core laptop without oversubscription;
    # the matting model (ground, photos) is the one heavy step: it gets the largest share.
    "decode": {"backend": "pil", "num_cpus": 0.2, "batch_size": 8},
    "caption": {"backend": "sidecar", "num_cpus": 0.1, "batch_size": 8},
    "ground": {"backend": "matte", "num_cpus": 1.1, "batch_size": 4},
    "segment": {"backend": "grabcut", "num_cpus": 0.2, "batch_size": 4},
    "inpaint": {"backend": "opencv", "num_cpus": 0.2, "batch_size": 4},
    "assemble": {"backend": "layers", "num_cpus": 0.1, "batch_size": 8},
}

# Keys that say where and how big a run is, not what a sample is: excluded from config_sha256
# so that a larger SHARDS extends an existing dataset and OUT can be moved.
RUN_KEYS = ("shards", "output", "ray", "max_rejection_rate")


class ConfigError(ValueError):
    """A pipeline config problem, raised before any work starts."""


@dataclass
class StageConfig:
    """One stage: which backend, its actor pool, and its backend params."""

    backend: str
    actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 8
    params: Any = None  # the backend's Params dataclass instance


@dataclass
class SourceConfig:
    kind: str = "demo"
    path: str | None = None  # folder, or tar path / brace pattern
    photos: bool = True  # demo: include scikit-image's bundled photos (one in every 8 items)


@dataclass
class RayConfig:
    address: str | None = None  # None: a local Ray started in-process
    num_cpus: float | None = None  # local Ray only; default all cores
    fuse: bool = True  # consecutive CPU stages share one actor pool (GPU stages keep their own)


@dataclass
class PipelineConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    output: str = "data"
    shards: int = 2
    samples_per_shard: int = 32
    image_size: int = 256
    max_layers: int = 3
    max_rejection_rate: float = 0.5  # a shard rejecting more of its items fails instead of being written
    ray: RayConfig = field(default_factory=RayConfig)
    stages: dict[str, StageConfig] = field(default_factory=dict)

    def context(self, stage: str) -> StageContext:
        sc = self.stages[stage]
        return StageContext(image_size=self.image_size, max_layers=self.max_layers,
                            num_cpus=sc.num_cpus, num_gpus=sc.num_gpus)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form of the resolved config (recorded in the dataset index)."""
        return _jsonable(dataclasses.asdict(self))

    def sha256(self) -> str:
        """Hash of everything that shapes a sample (RUN_KEYS excluded)."""
        doc = {k: v for k, v in self.to_dict().items() if k not in RUN_KEYS}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def build_stage(self, stage: str) -> Any:
        """Instantiate a stage in this process (loads its model)."""
        sc = self.stages[stage]
        return get_backend(stage, sc.backend)(sc.params, self.context(stage))

    def stage_identities(self) -> dict[str, dict[str, Any]]:
        return {s: get_backend(s, sc.backend).identity(sc.params) for s, sc in self.stages.items()}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


_TOP_KEYS = {"source", "output", "shards", "samples_per_shard", "image", "max_layers", "max_rejection_rate", "ray",
             "stages"}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, where: str) -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in strings; an unset VAR without default is an error."""
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(1) in os.environ:
            return os.environ[m.group(1)]
        if m.group(2) is not None:
            return m.group(2)
        raise ConfigError(f"{where}: environment variable {m.group(1)} is not set")

    return _ENV.sub(sub, value)


def _mapping(value: Any, where: str, known: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{where + '.' if where else ''}{unknown[0]}: unknown key (known: {sorted(known)})")
    return value


def _number(value: Any, where: str, kind: type, minimum: float, maximum: float | None = None) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ConfigError(f"{where}: {value} out of range [{minimum}, {maximum if maximum is not None else 'inf'}]")
    return kind(value)


def parse_config(doc: dict[str, Any] | None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Validate a config document (as loaded from YAML) plus CLI overrides into a PipelineConfig."""
    doc = _expand_env(copy.deepcopy(doc or {}), "")
    doc = _mapping(doc, "", _TOP_KEYS)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in ("source_kind", "source_path"):
            doc.setdefault("source", {})
            doc["source"] = dict(doc["source"] or {})
            doc["source"]["kind" if key == "source_kind" else "path"] = value
        else:
            doc[key] = value

    src = _mapping(doc.get("source"), "source", {"kind", "path", "photos"})
    source = SourceConfig(**src)
    if source.kind not in SOURCE_KINDS:
        raise ConfigError(f"source.kind: {source.kind!r} is not one of {SOURCE_KINDS}")
    if source.kind in ("folder", "tars"):
        if not source.path:
            raise ConfigError(f"source.path: required for source kind {source.kind!r}")
        if source.kind == "folder" and not _is_folder(source.path):
            raise ConfigError(f"source.path: folder {source.path!r} does not exist")

    image = _mapping(doc.get("image"), "image", {"size"})
    ray_doc = _mapping(doc.get("ray"), "ray", {"address", "num_cpus", "fuse"})
    if not isinstance(ray_doc.get("fuse", True), bool):
        raise ConfigError(f"ray.fuse: expected true or false, got {ray_doc['fuse']!r}")
    cfg = PipelineConfig(
        source=source,
        output=str(doc.get("output", "data")),
        shards=_number(doc.get("shards", 2), "shards", int, 1),
        samples_per_shard=_number(doc.get("samples_per_shard", 32), "samples_per_shard", int, 1),
        image_size=_number(image.get("size", 256), "image.size", int, 32, 4096),
        max_layers=_number(doc.get("max_layers", 3), "max_layers", int, 1, 16),
        max_rejection_rate=_number(doc.get("max_rejection_rate", 0.5), "max_rejection_rate", float, 0.0, 1.0),
        ray=RayConfig(address=ray_doc.get("address"), fuse=ray_doc.get("fuse", True),
                      num_cpus=None if ray_doc.get("num_cpus") is None
                      else _number(ray_doc["num_cpus"], "ray.num_cpus", float, 0.5)),
    )
    stages_doc = _mapping(doc.get("stages"), "stages", set(STAGES))
    for stage in STAGES:
        merged = dict(DEFAULT_STAGES[stage])
        given = _mapping(stages_doc.get(stage), f"stages.{stage}",
                         {"backend", "actors", "num_cpus", "num_gpus", "batch_size", "params"})
        if "backend" in given and given["backend"] != merged["backend"]:
            merged = {"backend": given["backend"]}  # defaults of another backend don't apply
        merged.update(given)
        where = f"stages.{stage}"
        try:
            backend = get_backend(stage, str(merged["backend"]))
        except KeyError as err:
            raise ConfigError(f"{where}.backend: {err.args[0]}") from None
        try:
            params = params_from_dict(backend.Params, merged.get("params"), f"{where}.params")
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None
        cfg.stages[stage] = StageConfig(
            backend=str(merged["backend"]),
            actors=_number(merged.get("actors", 1), f"{where}.actors", int, 1),
            num_cpus=_number(merged.get("num_cpus", 1.0), f"{where}.num_cpus", float, 0.0),
            num_gpus=_number(merged.get("num_gpus", 0.0), f"{where}.num_gpus", float, 0.0),
            batch_size=_number(merged.get("batch_size", 8), f"{where}.batch_size", int, 1),
            params=params,
        )
    return cfg


def _is_folder(path: str) -> bool:
    """A local folder, or a folder of an fsspec URL (``s3://bucket/raw``, ``memory://raw``)."""
    if "://" not in path:
        return Path(path).is_dir()
    import fsspec

    try:
        fs, inner = fsspec.core.url_to_fs(path)
        return bool(fs.isdir(inner))
    except (OSError, ValueError, ImportError):
        return False


def check_config(cfg: PipelineConfig) -> None:
    """Ask every backend to check its files (checkpoints) before any data is read."""
    for stage, sc in cfg.stages.items():
        try:
            get_backend(stage, sc.backend).check(sc.params)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"stages.{stage}.params: {err}") from None


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None,
                check: bool = True) -> PipelineConfig:
    """Load a pipeline YAML (None: all defaults), apply overrides, validate, check files."""
    doc: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"pipeline config {str(p)!r} does not exist")
        try:
            doc = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
    cfg = parse_config(doc, overrides)
    if check:
        check_config(cfg)
    return cfg
