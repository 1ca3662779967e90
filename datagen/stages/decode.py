"""decode `pil`: read a source item and normalise it (EXIF transpose, RGB, 8-bit, square crop).

Everything that cannot be read as an image is rejected here with a reason; odd but valid
images (CMYK, 16-bit, palette, alpha, animated, rotated) are accepted and normalised.

An image with an alpha channel that is not all opaque keeps it: ``Item.alpha`` is the source's
8-bit alpha (cropped and resized with the image) and ``Item.image`` the source composited over
``alpha_background``, the picture the other stages look at. The segmenters then bound every layer
by that alpha (``datagen.alpha.apply_source_alpha``): transparent pixels are never an object,
and the layers' edges there are the source's own.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from datagen.item import Item
from datagen.registry import register
from datagen.sources import RawItem, SourceReadError, read_item
from datagen.stages.base import Stage, is_system_fault


@dataclass
class DecodeParams:
    max_pixels: int = 50_000_000  # larger images are rejected as decompression bombs
    max_file_bytes: int = 100_000_000
    min_side: int = 32  # smaller images are rejected as too small to decompose
    max_caption_chars: int = 2000  # longer captions are truncated (recorded in quality)
    alpha_background: tuple[int, int, int] = (255, 255, 255)  # transparent pixels look like this
    # to the stages (the source alpha itself is kept in Item.alpha)


@register
class PilDecoder(Stage):
    """Reads each item through ``datagen.sources.read_item`` and normalises it with Pillow."""

    stage = "decode"
    name = "pil"
    Params = DecodeParams

    def process(self, items: list[Item]) -> None:
        for item in items:
            try:
                raw = read_item(item.source, self.context.image_size)
                self._decode(item, raw)
            except SourceReadError as err:
                item.reject(self.stage, str(err))
            except OSError as err:
                if is_system_fault(err):
                    raise  # I/O trouble reading the source (a disk, the network): retried, not a rejection
                item.reject(self.stage, f"not a readable image: {type(err).__name__}: {_detail(err)}")
            except (ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning,
                    EOFError) as err:
                item.reject(self.stage, f"not a readable image: {type(err).__name__}: {_detail(err)}")

    def _decode(self, item: Item, raw: RawItem) -> None:
        p: DecodeParams = self.params
        if raw.array is not None:
            image = np.ascontiguousarray(raw.array, dtype=np.uint8)
            item.sha256 = hashlib.sha256(image.tobytes()).hexdigest()
            item.truth = raw.truth
        else:
            data = raw.data or b""
            if not data:
                raise SourceReadError("empty file (0 bytes)")
            if len(data) > p.max_file_bytes:
                raise SourceReadError(f"file too large ({len(data)} > {p.max_file_bytes} bytes)")
            item.sha256 = hashlib.sha256(data).hexdigest()
            image = self._normalise(load_image(data, p.max_pixels))
            if image.shape[2] == 4:
                alpha = image[..., 3]
                if (alpha < 255).any():
                    item.alpha = alpha.copy()
                    item.quality["source_alpha_share"] = round(float((alpha < 255).mean()), 4)
                    item.quality["alpha_background"] = list(p.alpha_background)
                image = flatten(image, p.alpha_background)
        item.image = image
        item.caption, item.source_meta = self._caption(raw, item)

    def _normalise(self, img: Image.Image) -> np.ndarray:
        w, h = img.size
        if min(w, h) < self.params.min_side:
            raise SourceReadError(f"image too small ({w}x{h}, min side {self.params.min_side})")
        size = self.context.image_size
        # Shorter side to `size`, then a centred square crop.
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
        return np.asarray(img, dtype=np.uint8).copy()

    def _caption(self, raw: RawItem, item: Item) -> tuple[str, dict[str, Any]]:
        caption = raw.caption
        if isinstance(caption, bytes):
            try:
                caption = caption.decode("utf-8")
            except UnicodeDecodeError:
                caption = caption.decode("utf-8", errors="replace")
                item.quality["caption_not_utf8"] = True
        caption = " ".join((caption or "").split())
        if len(caption) > self.params.max_caption_chars:
            caption = caption[: self.params.max_caption_chars]
            item.quality["caption_truncated"] = True
        meta: dict[str, Any] = {}
        if isinstance(raw.meta, dict):
            meta = raw.meta
        elif raw.meta:
            try:
                loaded = json.loads(raw.meta.decode("utf-8"))
                meta = loaded if isinstance(loaded, dict) else {"value": loaded}
            except (UnicodeDecodeError, json.JSONDecodeError):
                item.quality["source_json_invalid"] = True
        return caption, meta


def _detail(err: BaseException) -> str:
    return re.sub(r"\s*<[^>]*>", "", str(err))  # drop object reprs with addresses


def load_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode bytes into an RGB or RGBA Pillow image: first frame, EXIF-transposed, 8-bit; RGBA
    only when some pixel is not opaque."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = max_pixels
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise SourceReadError(f"decompression bomb: {w}x{h} > {max_pixels} pixels")
        img.seek(0)  # animated: the first frame
        img.load()  # truncated files fail here
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def flatten(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """uint8 (H, W, 4) straight RGBA -> uint8 (H, W, 3) composited over a flat ``background``."""
    a = rgba[..., 3:].astype(np.float32) / 255.0
    out = a * rgba[..., :3].astype(np.float32) + (1.0 - a) * np.asarray(background, np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, or RGBA when it has an alpha that is not all opaque
    (16-bit scaled, palette expanded)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        img = Image.fromarray(((arr - lo) / max(hi - lo, 1e-9) * 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        img = img.convert("RGBA")
        lo, _hi = img.getchannel("A").getextrema()
        return img if lo < 255 else img.convert("RGB")
    return img.convert("RGB")
