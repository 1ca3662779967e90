"""Diagnostic (not the benchmark): the fidelity benchmark on single-object scenes whose placement is
simplified, to find which of position, size and rotation the model fails to generalise over.

    PYTHONPATH=. python scripts/placement_ladder.py MODE OUT [MINUTES] [JSON]

MODE (every scene one object; BENCHMARKS.md, "Session 5" and "Session 6"):
  CU  centred, one size (circumradius 0.3 of the image), upright
  CR  as CU with a random rotation
  FP  one size (circumradius 0.2), random position, upright
  FR  as FP with a random rotation
  CS  centred, random size (circumradius 0.15-0.3), upright
(triangle, star and diamond x1.2: ``datagen.scenes.circumradius``). JSON: more ``FidelityConfig`` fields,
e.g. '{"skip_train": true, "eta": 1.0}'; the keys of its "train_args" replace those of the default
'{"model_args": {"unet": {"block_out_channels": [16, 24, 32]}}}' (a "model_args" replaces the
default's whole, so give the widths again beside e.g. "role_input_scale").

It swaps ``datagen.scenes._place`` (a private function) for the simplified placement in this
process, so the training and evaluation scenes of ``model.fidelity.run`` both come from it.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence

import numpy as np

import datagen.scenes as scenes
from model.fidelity import FidelityConfig, run

MODES = ("CU", "CR", "FP", "FR", "CS")


def placement(mode: str):
    """A replacement for ``datagen.scenes._place`` drawing one object as ``mode`` says."""

    def place(rng: np.random.Generator, n: int, shapes: Sequence[str], colours: Sequence[str],
              object_scale: float = 1.0, upright: bool = False) -> list[scenes.ShapeSpec]:
        cx = cy = 0.5
        if mode in ("CU", "CR"):
            r = scenes.circumradius(shapes[0], 0.3)
        elif mode in ("FP", "FR"):
            r = scenes.circumradius(shapes[0], 0.2)
            lo, hi = r + 0.03, 1 - r - 0.03
            cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
        else:  # CS
            r = scenes.circumradius(shapes[0], float(rng.uniform(0.15, 0.3)))
        rotated = mode in ("CR", "FR")
        angle = float(rng.uniform(0, 2 * math.pi)) if rotated else scenes.UPRIGHT_ANGLES[shapes[0]]
        return [scenes.ShapeSpec(shapes[0], colours[0], cx, cy, r, angle)]

    return place


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in MODES:
        print(__doc__)
        return 2
    mode, out = argv[0], argv[1]
    minutes = float(argv[2]) if len(argv) > 2 else 15.0
    extra = json.loads(argv[3]) if len(argv) > 3 else {}
    train_args = {"model_args": {"unet": {"block_out_channels": [16, 24, 32]}}, **extra.pop("train_args", {})}
    scenes._place = placement(mode)
    run(FidelityConfig(out=out, minutes=minutes, objects="1", upright=mode not in ("CR", "FR"), train_args=train_args, **extra))
    print(open(f"{out}/fidelity.md").read())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
