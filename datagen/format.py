"""The layered dataset format, version 1 (docs/FORMAT.md): members, composition, checks.

This module is the single definition of the format. Writers, validators, previewers and the
model package all compose layers with :func:`compose_layers`.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from PIL import Image

SAMPLE_SCHEMA = "layerdiff/1"
SHARD_SCHEMA = "layerdiff-shard/1"
DATASET_SCHEMA = "layerdiff-dataset/1"
MIN_RECON_PSNR = 30.0
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
PSNR_CAP = 100.0  # identical images: report a finite number so JSON stays valid


def compose_layers(background: Any, foregrounds: Sequence[Any], alphas: Sequence[Any]) -> Any:
    """Composite foregrounds over a background, back (index 0) to front.

    ``I = bg; for n: I = a_n * fg_n + (1 - a_n) * I``. Works on numpy arrays and torch tensors
    alike (plain arithmetic only); every alpha must broadcast against the images and lie in
    [0, 1]. Use :func:`mask_to_alpha` for 8-bit masks in HWC layout.
    """
    if len(foregrounds) != len(alphas):
        raise ValueError(f"{len(foregrounds)} foregrounds but {len(alphas)} alphas")
    out = background
    for fg, alpha in zip(foregrounds, alphas, strict=False):
        out = alpha * fg + (1 - alpha) * out
    return out


def mask_to_alpha(mask: np.ndarray) -> np.ndarray:
    """8-bit L mask (H, W) to a float32 alpha (H, W, 1) in [0, 1]."""
    return (np.asarray(mask, dtype=np.float32) / 255.0)[..., None]


def compose_uint8(background: np.ndarray, foregrounds: Sequence[np.ndarray],
                  masks: Sequence[np.ndarray]) -> np.ndarray:
    """Compose 8-bit RGB layers with 8-bit masks into an 8-bit RGB image."""
    out = compose_layers(background.astype(np.float32),
                         [f.astype(np.float32) for f in foregrounds],
                         [mask_to_alpha(m) for m in masks])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """PSNR in dB between two 8-bit images, optionally only where a boolean (H, W) mask holds."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    if where is not None:
        diff = diff[where.astype(bool)]
    if diff.size == 0:
        return PSNR_CAP
    mse = float(np.mean(diff * diff))
    if mse <= 0:
        return PSNR_CAP
    return min(PSNR_CAP, 10.0 * math.log10(255.0 * 255.0 / mse))


def encode_png(array: np.ndarray) -> bytes:
    """Encode an (H, W, 3) RGB or (H, W) L uint8 array as PNG."""
    if array.dtype != np.uint8:
        raise TypeError(f"expected uint8, got {array.dtype}")
    mode = "L" if array.ndim == 2 else "RGB"
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes, mode: str) -> np.ndarray:
    """Decode PNG bytes into a uint8 array, checking that it is stored in ``mode``."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format != "PNG":
            raise ValueError(f"not a PNG ({img.format})")
        if img.mode != mode:
            raise ValueError(f"PNG mode {img.mode}, expected {mode}")
        return np.asarray(img.convert(mode))


@dataclass
class LayerSample:
    """One layered sample, as stored in a shard.

    ``foregrounds[n]`` and ``masks[n]`` are layer n (0 = back-most). ``meta`` is the KEY.json
    document; :meth:`to_members` fills in the fields derivable from the arrays.
    """

    key: str
    image: np.ndarray
    background: np.ndarray
    foregrounds: list[np.ndarray]
    masks: list[np.ndarray]
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.foregrounds)

    def recompose(self) -> np.ndarray:
        return compose_uint8(self.background, self.foregrounds, self.masks)

    def to_members(self) -> dict[str, bytes]:
        """The sample's tar members, in the order they are written (suffix -> bytes)."""
        members: dict[str, bytes] = {
            "image.png": encode_png(self.image),
            "bg.png": encode_png(self.background),
        }
        for n, (fg, mask) in enumerate(zip(self.foregrounds, self.masks, strict=False)):
            members[f"fg.{n}.png"] = encode_png(fg)
            members[f"mask.{n}.png"] = encode_png(mask)
        members["txt"] = self.caption.encode("utf-8")
        members["json"] = json.dumps(self.meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        return members

    @classmethod
    def from_members(cls, key: str, members: Mapping[str, bytes]) -> LayerSample:
        """Decode a sample from its members (suffix -> bytes); raises ValueError on a violation."""
        for required in ("image.png", "bg.png", "txt", "json"):
            if required not in members:
                raise ValueError(f"sample {key}: missing member {key}.{required}")
        meta = json.loads(members["json"].decode("utf-8"))
        k = len(meta.get("layers", []))
        fgs, masks = [], []
        for n in range(k):
            for suffix in (f"fg.{n}.png", f"mask.{n}.png"):
                if suffix not in members:
                    raise ValueError(f"sample {key}: missing member {key}.{suffix}")
            fgs.append(decode_png(members[f"fg.{n}.png"], "RGB"))
            masks.append(decode_png(members[f"mask.{n}.png"], "L"))
        return cls(key=key, image=decode_png(members["image.png"], "RGB"),
                   background=decode_png(members["bg.png"], "RGB"), foregrounds=fgs,
                   masks=masks, caption=members["txt"].decode("utf-8"), meta=meta)


def check_sample(sample: LayerSample, max_layers: int | None = None,
                 members: Mapping[str, bytes] | None = None) -> list[str]:
    """Every way ``sample`` breaks the format (an empty list when it conforms)."""
    problems: list[str] = []
    key, meta = sample.key, sample.meta
    if not KEY_PATTERN.match(key):
        problems.append(f"key {key!r} is not [A-Za-z0-9_-]+ (no dots)")
    if meta.get("schema") != SAMPLE_SCHEMA:
        problems.append(f"json schema is {meta.get('schema')!r}, expected {SAMPLE_SCHEMA!r}")
    if meta.get("key") != key:
        problems.append(f"json key {meta.get('key')!r} != member key {key!r}")
    h, w = sample.image.shape[:2]
    if sample.image.ndim != 3 or sample.image.shape[2] != 3:
        problems.append(f"image shape {sample.image.shape} is not (H, W, 3)")
    if (meta.get("width"), meta.get("height")) != (w, h):
        problems.append(f"json size {meta.get('width')}x{meta.get('height')} != image {w}x{h}")
    if sample.background.shape != sample.image.shape:
        problems.append(f"bg shape {sample.background.shape} != image {sample.image.shape}")
    k = sample.num_layers
    if k < 1 or (max_layers is not None and k > max_layers):
        problems.append(f"{k} layers, expected 1..{max_layers or 'max_layers'}")
    if members is not None:
        extra = set(members) - set(member_suffixes(sample.num_layers))
        if extra:
            problems.append(f"unexpected members {sorted(extra)}")
    for n, (fg, mask) in enumerate(zip(sample.foregrounds, sample.masks, strict=False)):
        if fg.shape != sample.image.shape:
            problems.append(f"fg.{n} shape {fg.shape} != image {sample.image.shape}")
            continue
        if mask.shape != (h, w):
            problems.append(f"mask.{n} shape {mask.shape} != ({h}, {w})")
            continue
        if not mask.any():
            problems.append(f"mask.{n} is empty")
        if fg[mask == 0].any():
            problems.append(f"fg.{n} has non-zero pixels outside its mask")
    if sample.caption != meta.get("caption"):
        problems.append("txt differs from json caption")
    layers = meta.get("layers", [])
    for n, layer in enumerate(layers):
        if layer.get("index") != n:
            problems.append(f"json layers[{n}].index is {layer.get('index')}")
    if not problems:
        recon = psnr(sample.recompose(), sample.image)
        if recon < MIN_RECON_PSNR:
            problems.append(f"recomposition PSNR {recon:.1f} dB < {MIN_RECON_PSNR} dB")
        recorded = meta.get("quality", {}).get("recon_psnr")
        if recorded is None or abs(recorded - recon) > 0.05:
            problems.append(f"quality.recon_psnr {recorded} != measured {recon:.2f}")
    return problems


def member_suffixes(num_layers: int) -> list[str]:
    """The member suffixes of a sample with ``num_layers`` foregrounds, in write order."""
    suffixes = ["image.png", "bg.png"]
    for n in range(num_layers):
        suffixes += [f"fg.{n}.png", f"mask.{n}.png"]
    return suffixes + ["txt", "json"]


def split_member_name(name: str) -> tuple[str, str]:
    """``KEY.suffix`` -> (KEY, suffix); the suffix starts at the first dot, as in webdataset."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        raise ValueError(f"member {name!r} has no suffix")
    key, suffix = base.split(".", 1)
    return (name[: len(name) - len(base)] + key), suffix


@dataclass
class TarSample:
    """One sample's members as read from a shard (suffix -> bytes) and its grouping problems.

    ``key`` is empty for an entry that belongs to no sample (a directory, a name without a
    suffix); such a group has no members and one problem naming the entry.
    """

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def iter_tar_samples(source: str | os.PathLike[str] | IO[bytes]) -> Iterator[TarSample]:
    """Stream a shard's samples in tar order, one group per run of members sharing a key.

    Layout problems never raise; they are reported in the groups' ``problems``: a key whose
    members are not contiguous (the key is yielded again, flagged, each time it reappears), a
    member repeated within a sample (the first copy is kept), an entry that is not a regular
    file or has no suffix. A damaged tar raises ``tarfile.TarError`` (or ``OSError``).
    """
    if isinstance(source, (str, os.PathLike)):
        tar = tarfile.open(source, mode="r|")
    else:
        tar = tarfile.open(fileobj=source, mode="r|")
    seen: set[str] = set()
    current: TarSample | None = None
    with tar:
        for info in tar:
            if not info.isfile():
                yield TarSample("", {}, [f"tar entry {info.name!r} is not a regular file"])
                continue
            try:
                key, suffix = split_member_name(info.name)
            except ValueError as err:
                yield TarSample("", {}, [str(err)])
                continue
            handle = tar.extractfile(info)
            data = handle.read() if handle is not None else b""
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = TarSample(key)
                if key in seen:
                    current.problems.append(
                        f"members of {key} are not contiguous (the key reappears after other samples)")
                seen.add(key)
            if suffix in current.members:
                current.problems.append(f"duplicate member {info.name}")
            else:
                current.members[suffix] = data
    if current is not None:
        yield current
