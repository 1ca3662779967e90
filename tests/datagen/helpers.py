"""Helpers for pipeline tests: small configs and reading shards back."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datagen.config import PipelineConfig, parse_config

ROOT = Path(__file__).resolve().parents[2]


def small_config(out: Path, **doc: Any) -> PipelineConfig:
    """A fast config: synthetic-gt by default, 48 px, local Ray with 2 CPUs."""
    base: dict[str, Any] = {
        "source": {"kind": "synthetic-gt"}, "output": str(out), "shards": 2, "samples_per_shard": 6,
        "image": {"size": 48}, "ray": {"num_cpus": 2},
        "stages": {s: {"backend": "truth", "num_cpus": 0.25} for s in ("caption", "ground", "segment", "inpaint")},
    }
    base.update(doc)
    return parse_config(base)


def read_shard(path: Path) -> tuple[list[str], dict[str, dict[str, bytes]]]:
    """Member names in order, and samples (key -> suffix -> bytes), with plain tarfile."""
    names, samples = [], {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            names.append(m.name)
            key, suffix = m.name.split(".", 1)
            samples.setdefault(key, {})[suffix] = tf.extractfile(m).read()
    return names, samples


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


