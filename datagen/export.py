"""Export layered samples as the files designers open: RGBA PNGs, OpenRaster and Photoshop.

:func:`export_sample` writes one sample's folder; ``make generate`` (``model.generate``) and
``python -m manifests export`` both go through it, so a generated sample and a dataset sample look
the same on disk:

    bg.png, fg.N.png, mask.N.png   the layers as the dataset stores them (RGB colours, 8-bit alpha)
    layer.bg.png, layer.N.png      each layer as one RGBA PNG (straight colours, soft alpha)
    composite.png                  the layers composited back to front (datagen.format)
    layers.ora                     OpenRaster: GIMP and Krita open it as a layer stack
    layers.psd                     Photoshop (and Photopea, Affinity, GIMP, Krita): the same stack
    layers.json                    the layer names (their captions), bottom first

OpenRaster layout (0.0.x baseline): ``mimetype`` first and stored uncompressed
("image/openraster"), ``stack.xml`` (layers listed top-most first), ``data/*.png`` (one RGBA PNG
per layer), ``mergedimage.png`` (the flattened image) and ``Thumbnails/thumbnail.png`` (at most
256 px a side). The PSD (written with ``psd-tools``) is 8-bit RGB with one pixel layer per layer,
its transparency channel the layer's alpha, named by its caption, bottom first; its merged image
is the composite.
"""

from __future__ import annotations

import io
import json
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


def write_psd(path: str | Path, layers: Sequence[tuple[str, np.ndarray]]) -> Path:
    """Write ``layers`` (name, (H, W, 4) RGBA uint8, straight colours), **bottom first**, as a
    layered 8-bit RGB Photoshop document. Returns the path."""
    from psd_tools import PSDImage

    path = Path(path)
    if not layers:
        raise ValueError("a PSD needs at least one layer")
    h, w = layers[0][1].shape[:2]
    psd = PSDImage.new("RGB", (w, h))
    for name, image in layers:
        if image.shape != (h, w, 4) or image.dtype != np.uint8:
            raise ValueError(f"layer {name!r}: expected ({h}, {w}, 4) uint8, got {image.shape} {image.dtype}")
        psd.create_pixel_layer_from_array(np.ascontiguousarray(image), name=name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    psd.save(tmp)  # also writes the merged image (what viewers without layer support show)
    tmp.replace(path)
    return path


def read_psd(path: str | Path) -> tuple[list[tuple[str, np.ndarray]], np.ndarray]:
    """Read back (layers bottom first as (name, (H, W, 4) RGBA on the full canvas), merged RGB)."""
    from psd_tools import PSDImage

    psd = PSDImage.open(path)
    h, w = psd.height, psd.width
    layers = []
    for layer in psd:
        canvas = np.zeros((h, w, 4), np.uint8)
        x0, y0, x1, y1 = layer.bbox
        if x1 > x0 and y1 > y0:
            canvas[y0:y1, x0:x1] = np.asarray(layer.topil().convert("RGBA"))
        layers.append((layer.name, canvas))
    return layers, np.asarray(psd.topil().convert("RGB"))


def export_sample(folder: str | Path, background: np.ndarray, foregrounds: Sequence[np.ndarray],
                  alphas: Sequence[np.ndarray], names: Sequence[str] | None = None) -> Path:
    """Write one layered sample's files (see the module docstring) into ``folder``.

    ``background`` (H, W, 3), ``foregrounds`` (H, W, 3) straight colours and ``alphas`` (H, W)
    uint8, back-most first; ``names``: the background's then each foreground's (default
    "background", "layer N"). Returns the folder.
    """
    from PIL import Image

    from datagen.format import compose_uint8

    if len(foregrounds) != len(alphas):
        raise ValueError(f"{len(foregrounds)} foregrounds but {len(alphas)} alphas")
    default = ["background"] + [f"layer {n}" for n in range(len(foregrounds))]
    given = list(names) if names is not None else []
    names = [str(given[i]) if i < len(given) and given[i] else default[i] for i in range(len(default))]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    composite = compose_uint8(background, foregrounds, alphas)
    stack = [(names[0], rgba(background))]
    Image.fromarray(background).save(folder / "bg.png")
    Image.fromarray(stack[0][1]).save(folder / "layer.bg.png")
    for n, (fg, alpha) in enumerate(zip(foregrounds, alphas, strict=True)):
        fg = np.where(np.asarray(alpha)[..., None] > 0, fg, 0).astype(np.uint8)
        Image.fromarray(fg).save(folder / f"fg.{n}.png")
        Image.fromarray(np.asarray(alpha, np.uint8)).save(folder / f"mask.{n}.png")
        stack.append((names[1 + n], rgba(fg, alpha)))
        Image.fromarray(stack[-1][1]).save(folder / f"layer.{n}.png")
    Image.fromarray(composite).save(folder / "composite.png")
    write_ora(folder / "layers.ora", stack, composite)
    write_psd(folder / "layers.psd", stack)
    (folder / "layers.json").write_text(json.dumps({"layers": [name for name, _ in stack]}, indent=1) + "\n")
    return folder
