"""Shape probe: at which noise level does a trained model decide a layer's shape, and does the
prompt decide it?

    python -m bench.probe MODEL_DIR [--scenes 48] [--out probe.png]

On single-object scenes of the fidelity benchmark (seen combinations), for each timestep t:

- ``from_truth``: noise the *true* layers to t, predict x0, classify the predicted mask
  (``datagen.scenes.classify_shape``): how well the model finishes a shape it is shown;
- ``follows_prompt``: the same, with the shape word of the prompts swapped for another
  shape: the share of masks classified as the *prompted* (swapped) shape, i.e. how far the prompt
  overrides what the noisy image shows;
- ``prompt_effect``: mean |x0(swapped) - x0(true prompt)| over the mask slot.

Then it samples the same prompts (DDIM, CFG ``--guidance``) and records the shape class of the
mask's x0 estimate at every step (``trajectory``), with a PNG of the estimates (rows: steps,
columns: scenes, the true mask last). The fidelity benchmark's shape failures are read off here
(docs/research/fidelity.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.fidelity import EVAL_SEED0, FidelityConfig, eval_scenes, scene_samples
from model.data import to_example

PROBE_TIMESTEPS = (999, 950, 900, 850, 800, 700, 600, 400, 200)


def _mask_shapes(x0: torch.Tensor, model: Any) -> list[str | None]:
    """Shape class of every sample's first mask slot of an x0 estimate: inside where the latent is
    positive (true of a pixel-space mask under any input scale or mask encoding)."""
    from datagen.scenes import classify_shape

    k = model.config.max_layers
    return [classify_shape((m.float().mean(0) > 0).cpu().numpy()) for m in x0[:, 1 + k]]


@torch.no_grad()
def probe(model: Any, n_scenes: int = 48, timesteps: tuple[int, ...] = PROBE_TIMESTEPS, guidance_scale: float = 3.0,
          steps: int = 25, seed: int = 0, fg_fill: str = "nearest") -> dict[str, Any]:
    """The probe's figures (see the module docstring) for a pixel-space model."""
    from datagen.scenes import SHAPES, split_combos
    from model.sampling import ddim_sample

    if not model.config.pixel_space:
        raise ValueError("the shape probe reads masks straight from the latents: pixel-space models only")
    cfg = FidelityConfig()
    seen, _ = split_combos(cfg.holdout_fraction, seed=cfg.seed)
    res, k = model.config.resolution, model.config.max_layers
    scenes = eval_scenes(seen, n_scenes, res, (1, 1), EVAL_SEED0, **cfg.scene_args)
    examples = [to_example(s, res, k, fg_fill) for s in scene_samples(scenes, res, k)]
    shapes = [s.shapes[0] for s in scenes]
    others = [SHAPES[(SHAPES.index(s) + len(SHAPES) // 2) % len(SHAPES)] for s in shapes]
    layers = torch.stack([e["layers"] for e in examples])
    present = torch.stack([e["present"] for e in examples])
    prompts = [e["prompt"] for e in examples]
    layer_prompts = [e["layer_prompts"] for e in examples]
    # the other shape in the global and the layer prompts alike
    swapped_prompts = [p.replace(s, o) for p, s, o in zip(prompts, shapes, others)]
    swapped = [[p.replace(s, o) for p in lp] for lp, s, o in zip(layer_prompts, shapes, others)]
    x0 = model.encode_layers(layers, present)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    keep = present[..., None, None, None].to(x0.dtype)

    def estimate(context: torch.Tensor, t: int) -> torch.Tensor:
        tt = torch.full((len(examples),), t, dtype=torch.long)
        x_t = model.add_noise(x0, noise, tt) * keep
        out = model.predict(x_t, tt, context, present).float()
        alpha = torch.tensor(float(model.alphas_cumprod[t]), dtype=torch.float32)
        return model.clip_x0(model.predict_x0_eps(x_t, out, alpha)[0])

    context = model.encode_prompts(prompts, layer_prompts)
    context_swapped = model.encode_prompts(swapped_prompts, swapped)
    by_t = []
    for t in timesteps:
        a, b = estimate(context, t), estimate(context_swapped, t)
        a_bar = float(model.alphas_cumprod[t])
        by_t.append({
            "t": t, "snr": round(a_bar / max(1.0 - a_bar, 1e-12), 4),
            "from_truth": round(float(np.mean([p == s for p, s in zip(_mask_shapes(a, model), shapes)])), 3),
            "follows_prompt": round(float(np.mean([p == o for p, o in zip(_mask_shapes(b, model), others)])), 3),
            "prompt_effect": round(float((a - b)[:, 1 + k].abs().mean()), 4)})

    estimates: list[tuple[int, torch.Tensor]] = []

    def record(step: Any) -> None:
        estimates.append((step.timestep, model.clip_x0(step.x0)))

    final = ddim_sample(model, prompts, layer_prompts, present, steps, guidance_scale,
                        torch.Generator().manual_seed(seed + 777), step_hook=record, output_type="latents")
    trajectory = [{"t": t, "shape": _mask_shapes(x, model)} for t, x in estimates]
    final_shapes = _mask_shapes(final, model)
    return {"shapes": shapes, "by_t": by_t, "trajectory": trajectory, "final": final_shapes,
            "final_accuracy": round(float(np.mean([p == s for p, s in zip(final_shapes, shapes)])), 3),
            "_estimates": estimates, "_truth": x0}


def save_strip(report: dict[str, Any], model: Any, path: Path, columns: int = 12, every: int = 2) -> None:
    """PNG of the mask x0 estimates: a row per ``every``-th step, the true masks as the last row."""
    from PIL import Image

    k = model.config.max_layers
    rows = [x for _, x in report["_estimates"][::every]] + [report["_truth"]]
    tiles = []
    for x in rows:
        masks = (x[:columns, 1 + k].float().mean(1) / model.slot_scale(x.ndim)[0, 1 + k, 0]).clamp(-1, 1)
        tiles.append(torch.cat(list(masks), dim=1))
    img = ((torch.cat(tiles, dim=0) + 1) * 127.5).round().byte().numpy()
    Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    from model import LayerDiffModel

    parser = argparse.ArgumentParser(prog="python -m bench.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", default=None, help="PNG of the x0 estimates along the sampling trajectory")
    parser.add_argument("--json", default=None, help="write the whole report (with the trajectory) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    model = LayerDiffModel.from_pretrained(args.model_dir).eval()
    report = probe(model, args.scenes, guidance_scale=args.guidance, steps=args.steps)
    if args.out:
        save_strip(report, model, Path(args.out))
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in report.items() if not k.startswith("_")}) + "\n")
    for row in report["by_t"]:
        print(f"t={row['t']:4d} snr={row['snr']:<8} from truth {row['from_truth']:.2f}  "
              f"follows a swapped prompt {row['follows_prompt']:.2f}  prompt effect {row['prompt_effect']:.4f}")
    print("sampling: step t, masks whose x0 estimate already has its final class")
    for step in report["trajectory"]:
        settled = np.mean([a == b for a, b in zip(step["shape"], report["final"])])
        print(f"  t={step['t']:4d} {settled:.2f}")
    print(f"sampled: shape right on {report['final_accuracy']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
