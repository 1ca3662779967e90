"""Tiny layered shards for the training tests, written from plain arrays with tarfile.

The writer here follows docs/FORMAT.md directly (format 2: members KEY.image.png, KEY.bg.png,
KEY.layers.png (the RGBA layers stacked top to bottom), KEY.txt, KEY.json; format 1: KEY.fg.N.png
and KEY.mask.N.png instead of KEY.layers.png; contiguous per sample), independently of the
project's writers, so the loader is tested against the layout rather than against itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (50, 170, 70), "black": (25, 25, 25),
           "yellow": (240, 220, 40), "white": (245, 245, 245)}


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    mode = "L" if array.ndim == 2 else "RGB" if array.shape[2] == 3 else "RGBA"
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def make_members(key: str, size: int = 32, objects: Sequence[tuple[str, tuple[int, int, int, int]]] = (),
                 bg: str = "blue", version: int = 2) -> dict[str, bytes]:
    """One sample's members: a flat background and flat rectangles (colour, (y0, x0, y1, x1))."""
    background = np.zeros((size, size, 3), np.uint8) + np.array(COLOURS[bg], np.uint8)
    image = background.copy()
    members = {"image.png": b"", "bg.png": png(background)}
    layers, rgba = [], []
    for n, (colour, (y0, x0, y1, x1)) in enumerate(objects):
        mask = np.zeros((size, size), np.uint8)
        mask[y0:y1, x0:x1] = 255
        fg = np.zeros((size, size, 3), np.uint8)
        fg[mask > 0] = COLOURS[colour]
        image[mask > 0] = COLOURS[colour]
        if version == 1:
            members[f"fg.{n}.png"] = png(fg)
            members[f"mask.{n}.png"] = png(mask)
        rgba.append(np.dstack([fg, mask]))
        layers.append({"index": n, "phrase": f"{colour} square", "caption": f"a {colour} square",
                       "box": [x0, y0, x1, y1], "score": 1.0, "area": int((mask > 0).sum()), "extent": "visible"})
    if version == 2 and rgba:
        members["layers.png"] = png(np.concatenate(rgba))
    members["image.png"] = png(image)
    caption = " and ".join(f"a {c} square" for c, _ in reversed(objects)) + f" on a {bg} background"
    members["txt"] = caption.encode()
    members["json"] = json.dumps({"schema": f"layerdiff/{version}", "key": key, "width": size, "height": size,
                                  "caption": caption, "background": {"caption": f"a {bg} background"},
                                  "layers": layers, "quality": {"recon_psnr": 100.0}}).encode()
    return members


def write_tar(path: Path, samples: Sequence[tuple[str, dict[str, bytes]]]) -> Path:
    """Write samples (key, suffix -> bytes) as contiguous members, in the order given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def random_objects(rng: np.random.Generator, size: int, k: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    names = ["red", "green", "yellow", "white", "black"]
    out = []
    for n in range(k):
        h, w = (int(v) for v in rng.integers(size // 5, size // 2, 2))
        y0, x0 = (int(v) for v in rng.integers(0, size - max(h, w), 2))
        out.append((names[(n + int(rng.integers(5))) % 5], (y0, x0, y0 + h, x0 + w)))
    return out


def write_dataset(root: Path, shards: int = 2, per_shard: int = 6, size: int = 32, seed: int = 0,
                  max_k: int = 2) -> Path:
    """ROOT/shards/00000N.tar + ROOT/manifest.json, as `make dataset` lays them out."""
    rng = np.random.default_rng(seed)
    entries = []
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            key = f"s{s:02d}-{i:03d}"
            samples.append((key, make_members(key, size, random_objects(rng, size, 1 + i % max_k),
                                              bg=["blue", "white"][i % 2])))
        path = write_tar(root / "shards" / f"{s:06d}.tar", samples)
        data = path.read_bytes()
        entries.append({"shard": s, "samples": per_shard, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    (root / "manifest.json").write_text(json.dumps({"schema": "layerdiff-dataset/2", "shards": entries}))
    return root
