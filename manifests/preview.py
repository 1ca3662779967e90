"""Contact sheets of layered samples (``python -m manifests preview``).

One row per sample: image, background, each layer over a checkerboard (with its alpha), each
alpha, and the recomposition of background and layers. A header line above each row names
the sample and its layer phrases; a caption under each cell says what it shows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from datagen.format import LayerSample, compose_layers, iter_tar_samples, mask_to_alpha, psnr, read_sample
from manifests.layout import read_json, scan_dataset

PAD = 4  # pixels around and between cells
HEADER = 14  # text line above each row
CAPTION = 12  # text line under each row's cells
CHECKER = 8  # checkerboard square size
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


@dataclass
class PreviewSample:
    """A decoded sample and the shard it came from."""

    shard: int
    sample: LayerSample


def num_columns(num_layers: int) -> int:
    """Cells in a row for a sample with ``num_layers`` layers: image, bg, fgs, masks, recon."""
    return 3 + 2 * num_layers


def sheet_size(layer_counts: Sequence[int], cell: int) -> tuple[int, int]:
    """(width, height) of the sheet for samples with these layer counts and square ``cell``s."""
    cols = max((num_columns(k) for k in layer_counts), default=0)
    width = PAD + cols * (cell + PAD)
    height = PAD + len(layer_counts) * (HEADER + cell + CAPTION + PAD)
    return width, height


def cell_origin(row: int, col: int, cell: int) -> tuple[int, int]:
    """Top-left pixel (x, y) of the image area of cell ``col`` in row ``row``."""
    return PAD + col * (cell + PAD), PAD + row * (HEADER + cell + CAPTION + PAD) + HEADER


def checkerboard(height: int, width: int, square: int = CHECKER) -> np.ndarray:
    """A light grey checkerboard, uint8 (H, W, 3)."""
    yy, xx = np.mgrid[0:height, 0:width]
    light = ((yy // square + xx // square) % 2 == 0)
    board = np.where(light, 204, 153).astype(np.uint8)
    return np.repeat(board[..., None], 3, axis=2)


def over_checkerboard(fg: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A foreground layer composed over a checkerboard with its mask as alpha (uint8 RGB)."""
    board = checkerboard(*fg.shape[:2]).astype(np.float32)
    out = compose_layers(board, [fg.astype(np.float32)], [mask_to_alpha(mask)])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def row_cells(sample: LayerSample) -> list[tuple[str, np.ndarray]]:
    """(caption, uint8 RGB or L array) of each cell of a sample's row, left to right."""
    phrases = [str(layer.get("phrase", "")) for layer in sample.meta.get("layers", [])]
    phrases += [""] * (sample.num_layers - len(phrases))
    cells: list[tuple[str, np.ndarray]] = [("image", sample.image), ("background", sample.background)]
    for n, (fg, mask) in enumerate(zip(sample.foregrounds, sample.masks, strict=True)):
        cells.append((f"fg{n} {phrases[n]}", over_checkerboard(fg, mask)))
    for n, mask in enumerate(sample.masks):
        cells.append((f"alpha{n}", mask))
    recon = sample.recompose()
    cells.append((f"recomposed {psnr(recon, sample.image):.1f}dB", recon))
    return cells


def _fit(array: np.ndarray, cell: int) -> Image.Image:
    img = Image.fromarray(array).convert("RGB")
    scale = cell / max(img.size)
    if scale != 1:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR)
    return img


def _clip_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
               width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def contact_sheet(samples: Sequence[PreviewSample], cell: int = 128) -> Image.Image:
    """Render ``samples`` as a contact sheet (RGB image of :func:`sheet_size`)."""
    width, height = sheet_size([s.sample.num_layers for s in samples], cell)
    sheet = Image.new("RGB", (max(width, 1), max(height, 1)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, item in enumerate(samples):
        s = item.sample
        phrases = " | ".join(f"{n}: {layer.get('phrase', '')}"
                             for n, layer in enumerate(s.meta.get("layers", [])))
        x0, y0 = cell_origin(row, 0, cell)
        noun = "layer" if s.num_layers == 1 else "layers"
        header = f"{s.key} (shard {item.shard:06d}, {s.num_layers} {noun})  {phrases}"
        draw.text((x0, y0 - HEADER + 1), _clip_text(draw, header, font, width - 2 * PAD), fill=TEXT, font=font)
        for col, (caption, array) in enumerate(row_cells(s)):
            x, y = cell_origin(row, col, cell)
            sheet.paste(_fit(array, cell), (x, y))
            draw.text((x, y + cell + 1), _clip_text(draw, caption, font, cell), fill=TEXT, font=font)
    return sheet


def iter_dataset_samples(out: str | Path, shards: Iterable[int] | None = None) -> Iterator[PreviewSample]:
    """Decode the samples of ``out`` shard by shard, in tar order (undecodable ones are skipped)."""
    files = scan_dataset(out)
    for number in (sorted(files.tars) if shards is None else shards):
        path = files.tars.get(number)
        if path is None:
            raise FileNotFoundError(f"no tar for shard {number:06d} in {out}")
        for group in iter_tar_samples(path):
            if not group.key:
                continue
            try:
                yield PreviewSample(number, read_sample(group.members, key=group.key))
            except Exception:  # noqa: BLE001 - a preview shows what it can; validate reports it
                continue


def _shards_of(out: str | Path, keys: Sequence[str]) -> list[int] | None:
    """Shards whose manifests list any of ``keys`` (None: unknown, scan every tar)."""
    files = scan_dataset(out)
    wanted, shards = set(keys), []
    for number, path in sorted(files.manifests.items()):
        try:
            listed = read_json(path).get("keys") or []
        except (OSError, ValueError, AttributeError):
            return None
        if wanted & set(listed):
            shards.append(number)
            wanted -= set(listed)
    return shards if not wanted else None


def select_samples(out: str | Path, keys: Sequence[str] = (), shard: int | None = None,
                   n: int = 8) -> list[PreviewSample]:
    """The samples to preview: the given ``keys`` (in that order), else the first ``n`` of
    ``shard`` (or of the dataset). Raises KeyError naming keys that are not found."""
    if keys:
        shards = [shard] if shard is not None else _shards_of(out, keys)
        found = {p.sample.key: p for p in iter_dataset_samples(out, shards) if p.sample.key in set(keys)}
        missing = [k for k in keys if k not in found]
        if missing:
            raise KeyError(f"keys not found: {', '.join(missing)}")
        return [found[k] for k in keys]
    chosen: list[PreviewSample] = []
    if n <= 0:
        return chosen
    for item in iter_dataset_samples(out, None if shard is None else [shard]):
        chosen.append(item)
        if len(chosen) >= n:
            break
    return chosen


def write_preview(out: str | Path, path: str | Path, keys: Sequence[str] = (), shard: int | None = None,
                  n: int = 8, cell: int = 128) -> tuple[int, tuple[int, int]]:
    """Write a contact sheet PNG of the selected samples; returns (rows, (width, height))."""
    samples = select_samples(out, keys, shard, n)
    if not samples:
        raise ValueError(f"no samples to preview in {out}")
    sheet = contact_sheet(samples, cell)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return len(samples), sheet.size
