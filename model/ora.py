"""A minimal OpenRaster (.ora) writer: a layered file GIMP and Krita open.

Layout (OpenRaster 0.0.x baseline): ``mimetype`` first and stored uncompressed
("image/openraster"), ``stack.xml`` (layers listed top-most first), ``data/*.png`` (one RGBA PNG
per layer), ``mergedimage.png`` (the flattened image) and ``Thumbnails/thumbnail.png`` (at most
256 px a side).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import quoteattr

import numpy as np
from PIL import Image

MIMETYPE = "image/openraster"
THUMBNAIL_SIZE = 256


def _png(array: np.ndarray) -> bytes:
    mode = "L" if array.ndim == 2 else {3: "RGB", 4: "RGBA"}[array.shape[-1]]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def rgba(rgb: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 + optional (H, W) uint8 alpha -> (H, W, 4) uint8 (opaque without alpha)."""
    a = np.full(rgb.shape[:2], 255, np.uint8) if alpha is None else np.asarray(alpha, np.uint8)
    return np.concatenate([rgb.astype(np.uint8), a[..., None]], axis=-1)


def write_ora(path: str | Path, layers: Sequence[tuple[str, np.ndarray]], merged: np.ndarray) -> Path:
    """Write ``layers`` (name, (H, W, 4) RGBA uint8), **bottom first**, and the merged RGB(A) image.

    Returns the path. Layer names become ``data/NNN-name.png`` (sanitised).
    """
    path = Path(path)
    if not layers:
        raise ValueError("an OpenRaster file needs at least one layer")
    h, w = layers[0][1].shape[:2]
    entries = []
    for i, (name, image) in enumerate(layers):
        if image.shape != (h, w, 4) or image.dtype != np.uint8:
            raise ValueError(f"layer {name!r}: expected ({h}, {w}, 4) uint8, got {image.shape} {image.dtype}")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        entries.append((name, f"data/{i:03d}-{safe}.png", image))
    stack = ['<?xml version="1.0" encoding="UTF-8"?>',
             f'<image version="0.0.3" w="{w}" h="{h}" xres="72" yres="72">',
             '<stack>']
    for name, src, _ in reversed(entries):  # stack.xml lists the top-most layer first
        stack.append(f'<layer name={quoteattr(name)} src="{src}" x="0" y="0" opacity="1.000" '
                     'visibility="visible" composite-op="svg:src-over"/>')
    stack += ['</stack>', '</image>', '']
    thumb = Image.fromarray(np.ascontiguousarray(merged))
    thumb.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(zipfile.ZipInfo("mimetype"), MIMETYPE, compress_type=zipfile.ZIP_STORED)
        zf.writestr("stack.xml", "\n".join(stack))
        for _, src, image in entries:
            zf.writestr(src, _png(image), compress_type=zipfile.ZIP_STORED)  # PNG is compressed already
        zf.writestr("mergedimage.png", _png(np.asarray(merged)), compress_type=zipfile.ZIP_STORED)
        zf.writestr("Thumbnails/thumbnail.png", _png(np.asarray(thumb)), compress_type=zipfile.ZIP_STORED)
    tmp.replace(path)
    return path


def read_ora(path: str | Path) -> tuple[list[tuple[str, np.ndarray]], np.ndarray]:
    """Read back (layers bottom first as (name, RGBA array), merged image): for tests and checks."""
    import xml.etree.ElementTree as ET

    with zipfile.ZipFile(path) as zf:
        root = ET.fromstring(zf.read("stack.xml"))
        layers = []
        for el in reversed(root.find("stack").findall("layer")):
            with Image.open(io.BytesIO(zf.read(el.get("src")))) as im:
                layers.append((el.get("name"), np.asarray(im.convert("RGBA"))))
        with Image.open(io.BytesIO(zf.read("mergedimage.png"))) as im:
            merged = np.asarray(im.convert("RGB"))
    return layers, merged
