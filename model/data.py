"""A webdataset pipeline over layered shards (docs/FORMAT.md) that yields model training batches.

Shards are read straight from local paths, brace patterns (``data/shards/{000000..000009}.tar``),
URLs webdataset can open, or a dataset folder through its ``manifest.json``. Per sample:

1. decode the members (format 1 or 2) with :func:`datagen.format.read_sample` and check what the
   loader relies on; a violation raises :class:`ShardFormatError` naming the shard, key and member;
2. resize (short side) and crop to the model's resolution, identically for every layer; foregrounds
   are resized premultiplied by their alpha, so edges keep their colour;
3. flip horizontally, the whole layer stack at once (so every layer of a sample flips together);
4. present each foreground with its colour extended where it is transparent (``fg_fill="nearest"``):
   the format's black-outside foreground would make a black object indistinguishable from its
   surroundings; the mask layer carries the shape as the layer's continuous alpha;
5. pad K foregrounds to ``max_layers`` with a presence mask, and drop captions for classifier-free
   guidance (all prompts together, the global prompt alone, each layer prompt alone).

Layer order in a ``(L, 3, H, W)`` tensor, L = 1 + 2*K_max: 0 = background, 1..K_max =
foregrounds, K_max+1..2*K_max = masks (the 8-bit alpha replicated to 3 channels, -1 transparent /
+1 opaque, soft edges continuous: no re-thresholding).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from scipy import ndimage

from datagen.format import FormatError, LayerSample, iter_tar_samples, read_sample, schema_version

FG_FILLS = ("nearest", "mean", "contrast", "gray", "zero")
PAD_FOREGROUND = 0.0  # value of an absent foreground layer, in [-1, 1]
PAD_MASK = -1.0  # value of an absent mask layer: empty
VISIBLE_ALPHA = 1e-3  # where a resized layer's colour is its own (below: filled per fg_fill)


class ShardFormatError(ValueError):
    """A shard breaks the layered format (or cannot be read); the message names shard and key."""


@dataclass
class DataConfig:
    """How to read shards and turn samples into batches."""

    shards: str | Sequence[str]
    resolution: int
    max_layers: int
    batch_size: int = 8
    num_workers: int = 0  # DataLoader worker processes per training process
    resampled: bool = True  # infinite stream of shards drawn with replacement
    epoch_samples: int = 10_000  # samples per epoch over all ranks and workers
    shuffle_buffer: int = 500  # samples (still encoded) held for shuffling
    hflip: float = 0.5
    random_crop: bool = True
    uncond_dropout: float = 0.1  # drop every prompt of a sample (the unconditional branch of CFG)
    caption_dropout: float = 0.1  # drop the global prompt alone
    layer_caption_dropout: float = 0.1  # drop each layer prompt alone
    fg_fill: str = "nearest"
    seed: int = 0
    rank: int = 0
    world_size: int = 1


# ---------------------------------------------------------------------------------------------
# shard lists


def resolve_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard URLs from a dataset folder (its manifest.json), a manifest file, a brace pattern,
    a ``::``-separated list, a single path/URL, or a list of any of these."""
    if isinstance(spec, (list, tuple)):
        return [url for item in spec for url in resolve_shards(item)]
    spec = os.fspath(spec)
    path = Path(spec)
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return read_manifest(path / "manifest.json")
        found = sorted(str(p) for p in path.glob("shards/*.tar")) or sorted(str(p) for p in path.glob("*.tar"))
        if not found:
            raise FileNotFoundError(f"{spec}: no manifest.json, shards/*.tar or *.tar in this folder")
        return found
    if path.name.endswith(".json") and path.is_file():
        return read_manifest(path)
    urls = list(wds.shardlists.expand_urls(spec))
    for url in urls:
        if "://" not in url and not url.startswith("pipe:") and not os.path.exists(url):
            raise FileNotFoundError(f"shard {url} does not exist (from {spec!r})")
    if not urls:
        raise FileNotFoundError(f"no shards in {spec!r}")
    return urls


def read_manifest(manifest: str | os.PathLike) -> list[str]:
    """The shard paths listed by a dataset index (``OUT/manifest.json``), checked to exist."""
    manifest = Path(manifest)
    index = json.loads(manifest.read_text())
    try:
        schema_version(index.get("schema"), "dataset")
    except FormatError as err:
        raise ShardFormatError(f"{manifest}: {err.detail}") from None
    root, urls = manifest.parent, []
    for entry in index.get("shards", []):
        name = entry["shard"] if isinstance(entry, dict) else entry
        name = f"{name:06d}" if isinstance(name, int) else str(name)  # the writer stores the index
        candidates = [root / "shards" / f"{name}.tar", root / "shards" / name, root / name, root / f"{name}.tar"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{manifest}: shard {name!r} is listed but not found under {root}")
        if isinstance(entry, dict) and entry.get("bytes") is not None and found.stat().st_size != entry["bytes"]:
            raise ShardFormatError(f"shard {found}: {found.stat().st_size} bytes, but {manifest} lists "
                                   f"{entry['bytes']} (truncated or rewritten)")
        if isinstance(entry, dict) and entry.get("samples") == 0:
            continue
        urls.append(str(found))
    if not urls:
        raise FileNotFoundError(f"{manifest}: lists no non-empty shards")
    return urls


# ---------------------------------------------------------------------------------------------
# reading and decoding


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _read_shards(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Shard URLs -> raw samples (suffix -> bytes), any reading error re-raised naming the shard.

    Grouping is the format's own (:func:`datagen.format.iter_tar_samples`); an entry that is no
    sample (a directory) is skipped, a layout problem (a key that reappears) is an error."""
    for shard in src:
        url, last_key = shard["url"], None
        try:
            with _open_shard(url) as f:
                for group in iter_tar_samples(f):
                    if not group.key:
                        continue
                    if any("not contiguous" in p for p in group.problems):
                        raise ShardFormatError(f"shard {url}, sample {group.key}: key appears twice "
                                               "(a sample's members must be contiguous)")
                    if group.problems:
                        raise ShardFormatError(f"shard {url}, sample {group.key}: " + "; ".join(group.problems))
                    last_key = group.key
                    yield {"__key__": group.key, "__url__": url, **group.members}
        except ShardFormatError:
            raise
        except Exception as exn:
            where = f"after sample {last_key}" if last_key else "at its start"
            raise ShardFormatError(f"shard {url}: unreadable {where} ({type(exn).__name__}: {exn})") from exn


def _open_shard(url: str) -> Any:
    """A shard for reading: a local path, or an fsspec URL (``s3://``, ``gs://``, ``file://``)."""
    if "://" in url:
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def decode(raw: dict[str, Any], max_layers: int | None = None) -> LayerSample:
    """A raw webdataset sample -> LayerSample, checked; ShardFormatError names shard and key."""
    url, key = raw.get("__url__", "?"), os.path.basename(raw.get("__key__", "?"))
    try:
        sample = read_sample(raw, key=key, where=url)
    except FormatError as exn:  # bad PNG, bad JSON, missing member, unknown version, wrong size
        raise ShardFormatError(f"shard {url}, sample {key}: {exn.located(shard=False, key=False)}") from exn
    problems = light_check(sample, max_layers)
    if problems:
        raise ShardFormatError(f"shard {url}, sample {key}: " + "; ".join(problems))
    return sample


def light_check(sample: LayerSample, max_layers: int | None = None) -> list[str]:
    """The format rules the loader relies on (cheap; ``datagen.format.check_sample`` is the full check)."""
    problems = []
    h, w = sample.image.shape[:2]
    if sample.background.shape != (h, w, 3):
        problems.append(f"bg shape {sample.background.shape} != image ({h}, {w}, 3)")
    k = sample.num_layers
    if k < 1:
        problems.append("no foreground layers")
    if max_layers is not None and k > max_layers:
        problems.append(f"{k} foreground layers, the model takes at most {max_layers}")
    layers = sample.meta.get("layers", [])
    for n, (fg, mask) in enumerate(zip(sample.foregrounds, sample.masks, strict=True)):
        if fg.shape != (h, w, 3) or mask.shape != (h, w):
            problems.append(f"layer {n} colour/alpha shapes {fg.shape}/{mask.shape} != image ({h}, {w})")
        if n < len(layers) and layers[n].get("index") != n:
            problems.append(f"json layers[{n}].index is {layers[n].get('index')}")
    return problems


def layer_prompts(sample: LayerSample) -> list[str]:
    """[background prompt, foreground 0 prompt, ...] from the sample's JSON."""
    meta = sample.meta
    prompts = [str((meta.get("background") or {}).get("caption") or "")]
    for layer in meta.get("layers", []):
        prompts.append(str(layer.get("caption") or layer.get("phrase") or ""))
    return prompts


# ---------------------------------------------------------------------------------------------
# sample -> training example


def fill_outside(fg: torch.Tensor, inside: torch.Tensor, mode: str) -> torch.Tensor:
    """Colour a (3, H, W) foreground in [0, 1] outside the boolean (H, W) mask ``inside``.

    "nearest": the colour of the nearest inside pixel; "mean": the mean inside colour; "contrast":
    black or white, whichever is further from the object's mean luminance (the layer then shows
    the shape, and no object colour vanishes into its fill); "gray": 0.5; "zero": 0 (as stored).
    An empty mask leaves ``fg`` as it is.
    """
    if mode not in FG_FILLS:
        raise ValueError(f"fg_fill {mode!r}: choose one of {FG_FILLS}")
    if mode == "zero":
        return fg * inside
    if mode == "gray":
        return torch.where(inside, fg, torch.full_like(fg, 0.5))
    if not bool(inside.any()):
        return fg
    if mode in ("mean", "contrast"):
        mean = fg[:, inside].mean(dim=1)
        if mode == "contrast":
            luminance = float(mean @ torch.tensor([0.299, 0.587, 0.114]))
            mean = torch.full_like(mean, 0.0 if luminance > 0.5 else 1.0)
        return torch.where(inside, fg, mean[:, None, None].expand_as(fg))
    _, (iy, ix) = ndimage.distance_transform_edt(~inside.numpy(), return_indices=True)
    return fg[:, torch.from_numpy(iy), torch.from_numpy(ix)]


def _resize_crop(x: torch.Tensor, size: int, rng: random.Random | None) -> torch.Tensor:
    """Resize (C, H, W) so the short side is ``size``, then crop size x size (random if rng)."""
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
        h, w = nh, nw
    top = rng.randint(0, h - size) if rng is not None else (h - size) // 2
    left = rng.randint(0, w - size) if rng is not None else (w - size) // 2
    return x[:, top:top + size, left:left + size]


def to_example(sample: LayerSample, resolution: int, max_layers: int, fg_fill: str = "nearest",
               crop: random.Random | None = None, flip: bool = False) -> dict[str, Any]:
    """One sample -> {"layers" (L, 3, R, R) in [-1, 1], "present" (L,), "prompt", "layer_prompts"}.

    ``crop``: the random source of a random crop (None: centre crop); ``flip``: mirror every
    layer. Captions are not dropped here.
    """
    k = sample.num_layers
    if k > max_layers:
        raise ValueError(f"sample {sample.key}: {k} layers > max_layers {max_layers}")
    alphas = torch.tensor(np.stack(sample.masks)).float() / 255.0  # (K, H, W)
    fgs = torch.tensor(np.stack(sample.foregrounds)).permute(0, 3, 1, 2).float() / 255.0
    premult = (fgs * alphas[:, None]).flatten(0, 1)  # stored fg is 0 outside: premultiplied already
    bg = torch.tensor(sample.background).permute(2, 0, 1).float() / 255.0
    stack = _resize_crop(torch.cat([bg, premult, alphas]), resolution, crop)
    if flip:
        stack = stack.flip(-1)  # one flip of the whole stack: every layer of the sample together

    bg, premult, alphas = stack[:3], stack[3:3 + 3 * k].unflatten(0, (k, 3)), stack[3 + 3 * k:]
    layers = torch.empty(1 + 2 * max_layers, 3, resolution, resolution)
    layers[0] = bg
    layers[1:1 + max_layers] = (PAD_FOREGROUND + 1) / 2
    layers[1 + max_layers:] = (PAD_MASK + 1) / 2
    for n in range(k):
        # Straight colour wherever the layer has any alpha; the alpha itself is the mask target,
        # continuous (soft edges stay soft, binary format-1 alpha only blurs where resized).
        visible = alphas[n] > VISIBLE_ALPHA
        colour = premult[n] / alphas[n].clamp_min(VISIBLE_ALPHA)  # un-premultiply
        colour = torch.where(visible, colour, torch.zeros_like(colour)).clamp(0, 1)
        layers[1 + n] = fill_outside(colour, visible, fg_fill)
        layers[1 + max_layers + n] = alphas[n].clamp(0, 1)[None].expand(3, -1, -1)
    layers = layers * 2 - 1

    present = torch.zeros(1 + 2 * max_layers, dtype=torch.bool)
    present[0] = True
    present[1:1 + k] = True
    present[1 + max_layers:1 + max_layers + k] = True
    prompts = layer_prompts(sample)
    prompts = (prompts + [""] * (1 + max_layers))[: 1 + max_layers]
    return {"layers": layers, "present": present, "prompt": sample.caption, "layer_prompts": prompts,
            "key": sample.key}


def drop_captions(example: dict[str, Any], rng: random.Random, uncond: float, caption: float,
                  layer: float) -> dict[str, Any]:
    """Caption dropout for classifier-free guidance ("" = dropped), in place."""
    if rng.random() < uncond:
        example["prompt"] = ""
        example["layer_prompts"] = [""] * len(example["layer_prompts"])
        return example
    if rng.random() < caption:
        example["prompt"] = ""
    example["layer_prompts"] = [p if rng.random() >= layer else "" for p in example["layer_prompts"]]
    return example


def collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack examples into the model's batch dict."""
    return {
        "layers": torch.stack([e["layers"] for e in examples]),
        "present": torch.stack([e["present"] for e in examples]),
        "prompt": [e["prompt"] for e in examples],
        "layer_prompts": [list(e["layer_prompts"]) for e in examples],
        "key": [e["key"] for e in examples],
    }


# ---------------------------------------------------------------------------------------------
# the pipeline


def _stream_seed(cfg: DataConfig, salt: int) -> int:
    worker, _ = _worker_info()
    return (cfg.seed * 1_000_003 + cfg.rank * 1000 + worker) * 7 + salt


def _split_by_node(cfg: DataConfig) -> Callable[[Iterable[Any]], Iterator[Any]]:
    def split(src: Iterable[Any]) -> Iterator[Any]:
        for i, item in enumerate(src):
            if i % cfg.world_size == cfg.rank:
                yield item
    return split


def _shuffle(cfg: DataConfig) -> Callable[[Iterable[Any]], Iterator[Any]]:
    def shuffle(src: Iterable[Any]) -> Iterator[Any]:
        rng = random.Random(_stream_seed(cfg, 1))
        yield from wds.filters.shuffle(cfg.shuffle_buffer, initial=min(100, cfg.shuffle_buffer), rng=rng)(src)
    return shuffle


def _to_examples(cfg: DataConfig, train: bool) -> Callable[[Iterable[Any]], Iterator[Any]]:
    def convert(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = random.Random(_stream_seed(cfg, 2)) if train else None
        for raw in src:
            sample = decode(raw, cfg.max_layers)
            if rng is None:
                ex = to_example(sample, cfg.resolution, cfg.max_layers, cfg.fg_fill)
            else:
                ex = to_example(sample, cfg.resolution, cfg.max_layers, cfg.fg_fill,
                                crop=rng if cfg.random_crop else None, flip=rng.random() < cfg.hflip)
                drop_captions(ex, rng, cfg.uncond_dropout, cfg.caption_dropout, cfg.layer_caption_dropout)
            yield ex
    return convert


def make_dataset(cfg: DataConfig, train: bool = True) -> wds.DataPipeline:
    """The sample pipeline: shards -> (split) -> raw samples -> shuffle -> examples.

    Resampled: every rank and worker draws shards with replacement from its own seeded stream
    (no split needed; works with fewer shards than readers), cut into epochs of
    ``epoch_samples``. Otherwise each shard is read once per epoch: split_by_node, then
    split_by_worker. ``train=False``: one ordered pass, no shuffle, crop, flip or dropout.
    """
    urls = resolve_shards(cfg.shards)
    if train and cfg.resampled:
        source = wds.ResampledShards(urls, seed=cfg.seed, deterministic=True,
                                     worker_seed=lambda: _stream_seed(cfg, 0))
        stages: list[Any] = [source]
    else:
        if train and len(urls) < cfg.world_size:
            raise ValueError(f"{len(urls)} shards cannot be split over {cfg.world_size} ranks; "
                             "use the resampled stream")
        stages = [wds.SimpleShardList(urls), _split_by_node(cfg), wds.split_by_worker]
    stages.append(_read_shards)
    if train and cfg.shuffle_buffer > 1:
        stages.append(_shuffle(cfg))
    stages.append(_to_examples(cfg, train))
    pipeline = wds.DataPipeline(*stages)
    if train and cfg.resampled:
        readers = cfg.world_size * max(1, cfg.num_workers)
        pipeline = pipeline.with_epoch(math.ceil(cfg.epoch_samples / readers))
    return pipeline


def make_loader(cfg: DataConfig, train: bool = True, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader of collated batches over :func:`make_dataset`."""
    return torch.utils.data.DataLoader(
        make_dataset(cfg, train), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        collate_fn=collate, persistent_workers=cfg.num_workers > 0, drop_last=train, pin_memory=pin_memory,
        prefetch_factor=2 if cfg.num_workers > 0 else None)


def load_examples(shards: str | Sequence[str], resolution: int, max_layers: int, n: int,
                  fg_fill: str = "nearest") -> list[dict[str, Any]]:
    """The first ``n`` samples of the shards, in order, as evaluation examples (no augmentation)."""
    cfg = DataConfig(shards=shards, resolution=resolution, max_layers=max_layers, fg_fill=fg_fill)
    out = []
    for ex in make_dataset(cfg, train=False):
        out.append(ex)
        if len(out) >= n:
            break
    return out


# ---------------------------------------------------------------------------------------------
# model output -> format


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def split_layers(layers: torch.Tensor, present: torch.Tensor | None = None,
                 threshold: float | None = None) -> dict[str, Any]:
    """One (L, 3, H, W) tensor in [-1, 1] -> background, foregrounds, soft masks and alphas in [0, 1].

    ``alphas`` are the masks as the format stores them: soft (8-bit alpha), or binarised at
    ``threshold`` when one is given; only present foregrounds (all, if ``present`` is None) are
    returned.
    """
    k_max = (layers.shape[0] - 1) // 2
    ks = [n for n in range(k_max) if present is None or bool(present[1 + n])]
    unit = to_unit(layers)
    masks = [unit[1 + k_max + n].mean(0) for n in ks]
    return {
        "background": unit[0],
        "foregrounds": [unit[1 + n] for n in ks],
        "masks": masks,
        "alphas": [m if threshold is None else (m >= threshold).float() for m in masks],
    }
