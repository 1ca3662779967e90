"""Generate layered images from text, or edit one layer of a generated sample.

    python -m model.generate --prompt "a red circle and a blue square on a green background" \\
        [--layers "a blue square|a red circle"] [--model runs/tiny/model] [--out samples] [--seed 0] \\
        [--num-images 2] [--steps 25] [--guidance-scale 3] [--guidance cfg|smg]
    python -m model.generate --edit samples/sample-000 --edit-layer 1 --edit-prompt "a yellow square" \\
        [--keep-mask] --out samples/edited
    python -m model.generate --edit samples/sample-000 --restyle-layer bg \\
        --style-prompt "a striped green background" --strength 0.6 --out samples/restyled

``--layers``: the foreground prompts separated by '|', back-most first (default: the prompt's object
phrases). Each sample goes to ``OUT/sample-NNN/`` (``datagen.export.export_sample``): ``bg.png``,
``fg.N.png``, ``mask.N.png`` (soft alpha), ``layer.N.png`` (RGBA), ``composite.png``, ``layers.ora``
(OpenRaster) and ``layers.psd`` (Photoshop), layers named by their prompts, plus ``prompts.json``. An edit reads the sample folder's layers and ``prompts.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DEFAULT_MODEL = "runs/tiny/model"  # where `make train` (model.train's default --out runs/tiny) puts the EMA model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="a save_pretrained folder")
    p.add_argument("--prompt", default="", help="the global prompt")
    p.add_argument("--layers", default="", help="foreground prompts, '|'-separated, back-most first")
    p.add_argument("--bg-prompt", default=None, help="background prompt (default: the prompt's background phrase)")
    p.add_argument("--out", default="samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--guidance", choices=("cfg", "smg"), default="cfg",
                   help="plain CFG, or self-mask guidance (less ghosting at high guidance scales, model/README)")
    p.add_argument("--smg-outside-scale", type=float, default=1.0,
                   help="SMG: CFG scale where a layer is hidden (fg outside its mask, bg under the fgs)")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--negative-prompt", default="", help="guidance pushes away from this global prompt")
    p.add_argument("--negative-layers", default="",
                   help="negative foreground prompts, '|'-separated, back-most first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--device", default=None)
    edit = p.add_argument_group("editing (of a sample folder written by this command)")
    edit.add_argument("--edit", default=None, metavar="SAMPLE_DIR")
    edit.add_argument("--edit-layer", default=None, help="regenerate this layer: bg or a foreground index")
    edit.add_argument("--edit-prompt", default=None, help="its new prompt")
    edit.add_argument("--keep-mask", action="store_true", help="keep the foreground's mask (recolour in place)")
    edit.add_argument("--restyle-layer", default=None, help="restyle this layer: bg or a foreground index")
    edit.add_argument("--style-prompt", default=None)
    edit.add_argument("--strength", type=float, default=0.6, help="restyle: 0 keeps the layer, 1 redraws it")
    return p.parse_args(argv)


def _layer_arg(value: str) -> int | str:
    return "bg" if value in ("bg", "background") else int(value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_flush_denormal(True)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from model.pipeline import LayerDiffPipeline, load_sample

    pipe = LayerDiffPipeline.from_pretrained(args.model, device=args.device)
    common = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale, "guidance": args.guidance,
              "smg_outside_scale": args.smg_outside_scale, "seed": args.seed}
    if args.edit:
        if (args.edit_layer is None) == (args.restyle_layer is None):
            raise SystemExit("--edit needs exactly one of --edit-layer / --restyle-layer")
        layers, present = load_sample(args.edit, pipe.max_layers)
        meta_path = Path(args.edit) / "prompts.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        prompt = args.prompt or meta.get("prompt", "")
        layer_prompts = [meta["layer_prompts"]] if "layer_prompts" in meta else None
        if args.edit_layer is not None:
            if args.edit_prompt is None:
                raise SystemExit("--edit-layer needs --edit-prompt")
            out = pipe.edit_layer(layers, present, _layer_arg(args.edit_layer), args.edit_prompt,
                                  global_prompt=prompt, layer_prompts=layer_prompts, keep_mask=args.keep_mask,
                                  **common)
        else:
            if args.style_prompt is None:
                raise SystemExit("--restyle-layer needs --style-prompt")
            out = pipe.restyle_layer(layers, present, _layer_arg(args.restyle_layer), args.style_prompt,
                                     strength=args.strength, global_prompt=prompt, layer_prompts=layer_prompts,
                                     **common)
    else:
        if not args.prompt:
            raise SystemExit("--prompt is required")
        layer_prompts = [s.strip() for s in args.layers.split("|")] if args.layers.strip() else None
        negative_layers = [s.strip() for s in args.negative_layers.split("|")] if args.negative_layers.strip() else None
        out = pipe(args.prompt, layer_prompts, background_prompt=args.bg_prompt, num_images=args.num_images,
                   eta=args.eta, negative_prompt=args.negative_prompt, negative_layer_prompts=negative_layers,
                   **common)
    folders = out.save(args.out)
    for folder, prompt, lp in zip(folders, out.prompts, out.layer_prompts, strict=True):
        (folder / "prompts.json").write_text(json.dumps({"prompt": prompt, "layer_prompts": lp,
                                                         "seed": args.seed, "guidance": args.guidance,
                                                         "guidance_scale": args.guidance_scale}, indent=1) + "\n")
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
