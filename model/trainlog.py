"""Training logs: loss to CSV and TensorBoard, and PNG grids of sampled layers.

A grid has one row per prompt: the background, each foreground over a checkerboard, each mask,
then the composite (``datagen.format.compose_layers`` of the background and the foregrounds under
their binarised masks). Absent layers are left blank.
"""

from __future__ import annotations

import csv
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from datagen.format import compose_layers
from model.data import split_layers

BLANK = 235  # grey of an empty cell


class TrainLogger:
    """Appends scalars to ``OUT/train_log.csv`` and TensorBoard events in ``OUT/tb``.

    Resuming appends to the same CSV (rows past the resumed step are dropped first).
    """

    def __init__(self, out_dir: str | os.PathLike, fields: Sequence[str], resume_step: int | None = None,
                 tensorboard: bool = True) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out / "train_log.csv"
        self.fields = ["step", *fields]
        rows: list[dict[str, str]] = []
        if resume_step is not None and self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self._file = open(self.csv_path, "w", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=self.fields, extrasaction="ignore")
        self._csv.writeheader()
        self._csv.writerows(rows)
        self._file.flush()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out / "tb"), purge_step=resume_step)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._csv.writerow({"step": step, **{k: f"{v:.6g}" for k, v in scalars.items()}})
        self._file.flush()
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(f"train/{name}", value, step)

    def log_image(self, step: int, name: str, path: str | os.PathLike) -> None:
        if self._tb is not None:
            image = np.asarray(Image.open(path).convert("RGB"))
            self._tb.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_log(path: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a train_log.csv as floats."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def checkerboard(size: int, cell: int = 4) -> torch.Tensor:
    """A (3, size, size) light/dark grey checkerboard in [0, 1]."""
    idx = torch.arange(size) // max(1, cell)
    board = ((idx[:, None] + idx[None, :]) % 2).float()
    return (0.6 + 0.25 * board)[None].expand(3, -1, -1)


def layer_cells(layers: torch.Tensor, present: torch.Tensor) -> list[torch.Tensor | None]:
    """One sample's (L, 3, H, W) in [-1, 1] -> the grid row's cells in [0, 1] (None = blank)."""
    k_max = (layers.shape[0] - 1) // 2
    parts = split_layers(layers)
    board = checkerboard(layers.shape[-1], max(2, layers.shape[-1] // 8))
    ks = [n for n in range(k_max) if bool(present[1 + n])]
    fg_cells: list[torch.Tensor | None] = [None] * k_max
    mask_cells: list[torch.Tensor | None] = [None] * k_max
    for n in ks:
        alpha = parts["alphas"][n][None]
        fg_cells[n] = compose_layers(board, [parts["foregrounds"][n]], [alpha])
        mask_cells[n] = parts["masks"][n][None].expand(3, -1, -1)
    composite = compose_layers(parts["background"], [parts["foregrounds"][n] for n in ks],
                               [parts["alphas"][n][None] for n in ks])
    return [parts["background"], *fg_cells, *mask_cells, composite]


def save_grid(path: str | os.PathLike, layers: torch.Tensor, present: torch.Tensor, prompts: Sequence[str],
              layer_prompts: Sequence[Sequence[str]] | None = None, cell: int = 96) -> Path:
    """Write a PNG grid of sampled layers (B, L, 3, H, W) in [-1, 1]; returns the path.

    Columns: background | foreground 1..K (over a checkerboard) | mask 1..K | composite; a text
    band under each row gives the prompt and the layer prompts.
    """
    layers, present = layers.detach().float().cpu(), present.cpu()
    b, n_layers = layers.shape[:2]
    k_max = (n_layers - 1) // 2
    cols, pad, text_h = 2 + 2 * k_max, 2, 28
    width = cols * (cell + pad) + pad
    height = b * (cell + pad + text_h) + pad + 16
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    heads = ["bg"] + [f"fg{n}" for n in range(k_max)] + [f"mask{n}" for n in range(k_max)] + ["composite"]
    for c, head in enumerate(heads):
        draw.text((pad + c * (cell + pad) + 2, 2), head, fill=(0, 0, 0))
    for r in range(b):
        top = 16 + pad + r * (cell + pad + text_h)
        for c, img in enumerate(layer_cells(layers[r], present[r])):
            if img is None:
                tile = Image.new("RGB", (cell, cell), (BLANK, BLANK, BLANK))
            else:
                arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                tile = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (pad + c * (cell + pad), top))
        text = prompts[r] or "(unconditional)"
        if layer_prompts is not None:
            text += "  |  " + " / ".join(p for p in layer_prompts[r] if p)
        lines = textwrap.wrap(text, width=max(20, width // 6))[:2]
        draw.text((pad, top + cell + 2), "\n".join(lines), fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def grid_inputs(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Prompts and presence of a few examples, as the sampler takes them."""
    return {
        "prompt": [e["prompt"] for e in examples],
        "layer_prompts": [list(e["layer_prompts"]) for e in examples],
        "present": torch.stack([e["present"] for e in examples]),
    }
