"""A tiny writer of datasets (format 2, or format 1 on request) for the manifests tests (no
pipeline involved).

Samples are synthetic: a flat background and one or two solid rectangles composed over it with
datagen.format.compose_uint8, optionally with a little noise so the recorded PSNR is finite. In
format 2 each rectangle has a soft (half-transparent) one-pixel rim; in format 1 it is binary.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from datagen.format import LayerSample, compose_uint8, psnr, schema_string
from datagen.writer import stage_identities

STAGE_IDS = {
    "decode": {"backend": "pil", "model": None, "checkpoint": None, "version": "1"},
    "caption": {"backend": "fixed", "model": None, "checkpoint": None, "version": "1"},
    "ground": {"backend": "color", "model": None, "checkpoint": None, "version": "1"},
    "segment": {"backend": "sam", "model": "vit_b",
                "checkpoint": {"name": "sam_vit_b.pth", "sha256": "ab" * 32}, "version": "2"},
    "inpaint": {"backend": "telea", "model": None, "checkpoint": None, "version": "1"},
    "assemble": {"backend": "default", "model": None, "checkpoint": None, "version": "1"},
}
STAGE_IDS_V2 = {**STAGE_IDS, "segment": {**STAGE_IDS["segment"], "licence": "Apache-2.0"}}
RIM_ALPHA = 128  # format 2: the alpha of each rectangle's one-pixel rim
CONFIG = {"image_size": 64, "max_layers": 3, "shard_size": 3}
CONFIG_SHA = hashlib.sha256(json.dumps(CONFIG, sort_keys=True).encode()).hexdigest()

MembersHook = Callable[[str, dict[str, bytes]], dict[str, bytes]]
OrderHook = Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]]


def make_sample(key: str, seed: int, num_layers: int = 2, size: int = 64, noise: bool = False,
                version: int = 2) -> LayerSample:
    """A flat background with ``num_layers`` solid rectangles (soft-rimmed in format 2); meta
    consistent with the pixels."""
    rng = np.random.default_rng(seed)
    bg = np.empty((size, size, 3), np.uint8)
    bg[:] = rng.integers(0, 256, 3)
    fgs, masks, layers = [], [], []
    for n in range(num_layers):
        x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
        x1, y1 = x0 + int(rng.integers(8, size // 2)), y0 + int(rng.integers(8, size // 2))
        mask = np.zeros((size, size), np.uint8)
        mask[y0:y1, x0:x1] = 255
        if version >= 2:
            mask[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = 255
            mask[[y0, y1 - 1], x0:x1] = RIM_ALPHA
            mask[y0:y1, [x0, x1 - 1]] = RIM_ALPHA
        fg = np.zeros_like(bg)
        fg[mask > 0] = rng.integers(0, 256, 3)
        fgs.append(fg)
        masks.append(mask)
        layers.append({"index": n, "phrase": f"box {n}", "caption": f"a box number {n}",
                       "box": [x0, y0, x1, y1], "score": 0.9,
                       "area": float(np.count_nonzero(mask)) / (size * size), "extra_number": 1})
        if version >= 2:
            layers[-1]["extent"] = "visible"
    image = compose_uint8(bg, fgs, masks)
    if noise:
        image = np.clip(image.astype(np.int16) + rng.integers(-2, 3, image.shape), 0, 255).astype(np.uint8)
    caption = f"{num_layers} boxes on a flat background"
    sample = LayerSample(key, image, bg, fgs, masks, caption)
    source = {"uri": f"file:///src/{key}.png", "sha256": hashlib.sha256(key.encode()).hexdigest()}
    if version >= 2:
        source.update(url=f"https://example.com/{key}.jpg", licence="CC-BY-4.0", caption=f"photo {key}",
                      metadata=json.dumps({"url": f"https://example.com/{key}.jpg"}))
    sample.meta = {
        "schema": schema_string(version), "key": key, "width": size, "height": size, "caption": caption,
        "background": {"caption": "a flat background"}, "layers": layers, "source": source,
        "quality": {"recon_psnr": round(psnr(sample.recompose(), image), 3)},
        "stages_extra": {"ground": {"threshold": 0.3}},
    }
    return sample


def write_tar(path: Path, samples: list[LayerSample], members_hook: MembersHook | None = None,
              order_hook: OrderHook | None = None) -> None:
    entries = []
    for s in samples:
        members = s.to_members()
        if members_hook is not None:
            members = members_hook(s.key, members)
        entries += [(f"{s.key}.{suffix}", data) for suffix, data in members.items()]
    if order_hook is not None:
        entries = order_hook(entries)
    with tarfile.open(path, "w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))


@dataclass
class Dataset:
    """A written dataset and the samples in it, shard by shard."""

    out: Path
    shards: list[list[LayerSample]]
    rejected: list[list[dict[str, str]]] = field(default_factory=list)

    def tar(self, shard: int) -> Path:
        return self.out / "shards" / f"{shard:06d}.tar"

    def manifest(self, shard: int) -> Path:
        return self.out / "manifests" / f"{shard:06d}.json"

    @property
    def samples(self) -> list[LayerSample]:
        return [s for shard in self.shards for s in shard]


def write_dataset(out: Path, shards: list[list[LayerSample]], rejected: list[list[dict[str, str]]] | None = None,
                  members_hook: MembersHook | None = None, order_hook: OrderHook | None = None,
                  index: bool = True) -> Dataset:
    """Write shards, their manifests and the index exactly as docs/FORMAT.md lays them out."""
    rejected = rejected if rejected is not None else [[] for _ in shards]
    version = next((s.version for shard in shards for s in shard), 2)
    stage_ids = STAGE_IDS_V2 if version >= 2 else STAGE_IDS
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "manifests").mkdir(parents=True, exist_ok=True)
    entries = []
    for number, samples in enumerate(shards):
        tar = out / "shards" / f"{number:06d}.tar"
        write_tar(tar, samples, members_hook, order_hook)
        data = tar.read_bytes()
        hist: dict[str, int] = {}
        for s in samples:
            hist[str(s.num_layers)] = hist.get(str(s.num_layers), 0) + 1
        manifest = {
            "schema": schema_string(version, "shard"), "shard": number, "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data), "samples": len(samples), "keys": [s.key for s in samples],
            "rejected": rejected[number], "layers": hist, "config_sha256": CONFIG_SHA,
            "stages": stage_ids, "created": "2026-01-02T03:04:05Z", "seconds": 1.5,
        }
        (out / "manifests" / f"{number:06d}.json").write_text(json.dumps(manifest, indent=1))
        entries.append({k: manifest[k] for k in ("shard", "samples", "bytes", "sha256")})
    if index:
        doc = {"schema": schema_string(version, "dataset"), "config": CONFIG, "config_sha256": CONFIG_SHA, "shards": entries,
               "totals": {"samples": sum(e["samples"] for e in entries),
                          "rejected": sum(len(r) for r in rejected),
                          "bytes": sum(e["bytes"] for e in entries)}}
        if version >= 2:
            doc["stages"] = stage_identities([{"stages": stage_ids}] * len(entries))
        (out / "manifest.json").write_text(json.dumps(doc, indent=1))
    return Dataset(out, shards, rejected)


def default_shards(version: int = 2) -> list[list[LayerSample]]:
    """Two shards of three samples, 1 or 2 layers, some noisy."""
    return [[make_sample(f"s{i:04d}", seed=i, num_layers=1 + i % 2, noise=i % 3 == 2, version=version)
             for i in range(j * 3, j * 3 + 3)] for j in range(2)]


DEFAULT_REJECTED = [
    [{"source": "file:///src/r0.png", "key": "r0000", "stage": "ground",
      "reason": "no detection above threshold 0.35 (ground.py:41)"}],
    [{"source": "file:///src/r1.png", "key": "r0001", "stage": "ground",
      "reason": "no detection above threshold 0.30 (ground.py:41)"},
     {"source": "file:///src/r2.png", "key": "r0002", "stage": "decode",
      "reason": "OSError: cannot identify image file '/src/r2.png'"}],
]


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Dataset]:
    """Factory: ``make_dataset(shards=None, **write_dataset kwargs)`` writes into tmp_path/out."""

    def make(shards: list[list[LayerSample]] | None = None, **kwargs: Any) -> Dataset:
        if shards is None:
            shards = default_shards()
            kwargs.setdefault("rejected", DEFAULT_REJECTED)
        return write_dataset(tmp_path / "out", shards, **kwargs)

    make.default_shards = default_shards  # type: ignore[attr-defined]
    return make


@pytest.fixture
def dataset(make_dataset: Callable[..., Dataset]) -> Dataset:
    """The default valid dataset: 2 shards x 3 samples, 3 rejections."""
    return make_dataset()


@pytest.fixture
def sample_factory() -> Callable[..., LayerSample]:
    return make_sample
