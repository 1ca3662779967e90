"""Self-mask guidance vs plain CFG on the fidelity benchmark's evaluation scenes, same prompts and
seeds for every mode:

    python -m bench.guidance MODEL_DIR [--scenes 64] [--guidance-scale 3] [--steps 25]

Prints one row per split and mode with the benchmark's scores (``bench.fidelity``); ``s_out`` is
SMG's scale where a layer is hidden (``model.guidance.SelfMaskGuidance``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from bench.fidelity import FidelityConfig, eval_splits, evaluate
from model import LayerDiffModel
from model.guidance import SelfMaskGuidance

MODES: tuple[tuple[str, float], ...] = (("cfg", 1.0), ("smg", 1.0), ("smg", 0.0))


def compare(model: LayerDiffModel, n: int = 64, guidance_scale: float = 3.0, steps: int = 25,
            modes: Sequence[tuple[str, float]] = MODES, fg_fill: str = "nearest") -> list[dict[str, Any]]:
    """Rows (split, guidance, s_out, seconds, scores) for each (guidance, SMG outside scale) of ``modes``."""
    cfg = FidelityConfig(preset="tiny-30", eval_scenes=n, guidance_scale=guidance_scale, sample_steps=steps,
                         eta=0.0)
    rows = []
    for split, scenes in eval_splits(cfg, model.config.resolution).items():
        for mode, outside in modes:
            hook = SelfMaskGuidance(model, outside_scale=outside) if mode == "smg" else None
            t0 = time.time()
            scores, _ = evaluate(model, scenes, cfg, fg_fill, step_hook=hook)
            rows.append({"split": split, "guidance": mode, "outside_scale": outside if mode == "smg" else None,
                         "seconds": round(time.time() - t0, 1), **scores})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.guidance", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--scenes", type=int, default=64, help="evaluation scenes per split")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    model = LayerDiffModel.from_pretrained(args.model_dir).eval()
    print(json.dumps(compare(model, args.scenes, args.guidance_scale, args.steps), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
