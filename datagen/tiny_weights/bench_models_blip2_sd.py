"""Images/s of the ``blip2`` and ``lavis`` (caption) and ``sd-inpaint`` (inpaint) stages.

By default on the tiny random checkpoints (built into ``--weights``, a temporary folder if not given) on
CPU; pass real folders and ``--num-gpus 1`` to time the real models on a GPU::

    python -m datagen.tiny_weights.bench_models_blip2_sd --images 16 --batch 4 --threads 1 --lavis
    python -m datagen.tiny_weights.bench_models_blip2_sd --num-gpus 1 --images 256 --batch 8 --size 512 \\
        --blip2-model weights/blip2-opt-2.7b --instructblip-model weights/instructblip-flan-t5-xl \\
        --sd-model weights/stable-diffusion-inpainting --steps 30 \\
        --lavis --lavis-model weights/lavis-blip2-opt2.7b-coco

Inputs are synthetic scenes (``datagen.scenes``) at ``--size`` px; sd-inpaint gets each scene's true
object masks (1-3 per image) as detections. One batch is run first as warm-up and not timed. ``--lavis``
times the LAVIS backend by running this same script under the LAVIS env's interpreter (``--only lavis``).
This module imports only the standard library and numpy at the top, so that it runs in both envs.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from datagen.item import Detection, Item

ROOT = Path(__file__).resolve().parents[2]


def make_items(n: int, size: int) -> list[Item]:
    """``n`` synthetic scenes as items, each with its true masks as detections."""
    from datagen.scenes import make_scene

    items = []
    for i in range(n):
        scene = make_scene(i, size)
        dets = []
        for phrase, mask in zip(scene.phrases, scene.masks, strict=True):
            ys, xs = np.nonzero(mask)
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            dets.append(Detection(phrase, box, 1.0, mask=mask.copy()))
        items.append(Item(key=f"{i:06d}", shard=0, index=i, uri=f"scene://{i}", source={}, image=scene.image,
                          caption="", phrases=list(scene.phrases), detections=dets))  # fmt: skip
    return items


def time_stage(process: Callable[[list[Item]], object], items: list[Item], batch: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) over ``items`` in batches,
    after one untimed warm-up batch."""
    process(copy.deepcopy(items[:batch]))
    work = copy.deepcopy(items)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(work), batch):
        process(work[i : i + batch])
    _sync()
    return len(work) / (time.perf_counter() - wall), len(work) / (time.process_time() - cpu)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _report(stage: str, what: str, rate: float, cpu_rate: float, device: str) -> None:
    print(f"{stage:8s} {what}: {rate:.2f} images/s ({cpu_rate:.2f} per CPU-s) on {device}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, help="folder for the tiny weights (default: a temp folder)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4, help="stage batch size (YAML batch_size)")
    ap.add_argument("--size", type=int, default=256, help="image side (StageContext.image_size)")
    ap.add_argument("--threads", type=float, default=1, help="CPU share (num_cpus) of each stage")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="> 0 uses CUDA when available")
    ap.add_argument("--only", choices=["blip2", "instructblip", "sd-inpaint", "lavis"], action="append")
    ap.add_argument("--blip2-model")
    ap.add_argument("--instructblip-model")
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--sd-model")
    ap.add_argument("--steps", type=int, nargs="+", default=[30, 10], help="sd-inpaint steps to time")
    ap.add_argument("--lavis", action="store_true", help="also time the lavis backend (in .venv-lavis)")
    ap.add_argument("--lavis-model")
    ap.add_argument("--lavis-python", help="the LAVIS env's interpreter (default: .venv-lavis/bin/python)")
    args = ap.parse_args(argv)
    only = set(args.only or ["blip2", "instructblip", "sd-inpaint"] + (["lavis"] if args.lavis else []))

    from datagen.stages.base import StageContext

    tmp = None
    folder = args.weights or Path(tmp := tempfile.mkdtemp(prefix="tiny_weights_"))
    ctx = StageContext(image_size=args.size, num_cpus=args.threads, num_gpus=args.num_gpus)
    device = "auto" if args.num_gpus > 0 else "cpu"
    items = make_items(args.images, args.size)
    print(f"{args.images} images of {args.size} px, batch {args.batch}, num_cpus {args.threads}, "
          f"num_gpus {args.num_gpus}, python {sys.version.split()[0]}", flush=True)  # fmt: skip

    if only & {"blip2", "instructblip"}:
        from datagen.stages.models.blip2 import Blip2Caption, Blip2Params

        if not (args.blip2_model and args.instructblip_model) and only & {"blip2", "instructblip"}:
            from datagen.tiny_weights import blip2

            tiny = blip2.build(folder / "blip2")
            args.blip2_model = args.blip2_model or str(tiny["blip2"])
            args.instructblip_model = args.instructblip_model or str(tiny["instructblip"])
        for kind, model in (("blip2", args.blip2_model), ("instructblip", args.instructblip_model)):
            if kind not in only:
                continue
            stage = Blip2Caption(
                Blip2Params(model=model, max_new_tokens=args.max_new_tokens, device=device), ctx
            )
            rate, cpu_rate = time_stage(stage.process, items, args.batch)
            _report("caption", f"{kind} {Path(model).name} ({args.max_new_tokens} new tokens max)", rate, cpu_rate,
                    f"{stage.device}/{str(stage.dtype).removeprefix('torch.')}")  # fmt: skip
            del stage

    if "sd-inpaint" in only:
        from datagen.stages.models.sd_inpaint import SdInpaint, SdInpaintParams

        if not args.sd_model:
            from datagen.tiny_weights import sd_inpaint

            args.sd_model = str(sd_inpaint.build(folder / "sd-inpaint")["sd_inpaint"])
        holes = sum(len(it.detections) for it in items) / len(items)
        for steps in args.steps:
            stage = SdInpaint(SdInpaintParams(model=args.sd_model, steps=steps, device=device), ctx)
            rate, cpu_rate = time_stage(stage.process, items, args.batch)
            _report("inpaint", f"sd-inpaint {Path(args.sd_model).name} {steps} steps at {stage.resolution} px "
                    f"({holes:.1f} masks/image)", rate, cpu_rate,
                    f"{stage.device}/{str(stage.dtype).removeprefix('torch.')}")  # fmt: skip
            del stage

    if "lavis" in only:
        if importlib.util.find_spec("lavis") is None:
            # Not in the LAVIS env: rerun this script there for the lavis rows only.
            from datagen.stages.models.lavis import default_python

            python = args.lavis_python or str(default_python())
            cmd = [python, "-W", "ignore", "-m", "datagen.tiny_weights.bench_models_blip2_sd", "--only", "lavis",
                   "--images", str(args.images), "--batch", str(args.batch), "--size", str(args.size),
                   "--threads", str(args.threads), "--num-gpus", str(args.num_gpus),
                   "--max-new-tokens", str(args.max_new_tokens), "--weights", str(folder)]  # fmt: skip
            if args.lavis_model:
                cmd += ["--lavis-model", args.lavis_model]
            subprocess.run(cmd, cwd=ROOT, check=True)
        else:
            from datagen.stages.models.lavis import LavisCaption, LavisParams

            if not args.lavis_model:
                from datagen.tiny_weights import lavis

                args.lavis_model = str(lavis.build(folder / "lavis")["lavis_blip2_opt"])
            for beams in (5, 1):
                params = LavisParams(model=args.lavis_model, num_beams=beams, max_length=args.max_new_tokens,
                                     device=device)  # fmt: skip
                stage = LavisCaption(params, ctx)
                rate, cpu_rate = time_stage(stage.process, items, args.batch)
                _report("caption", f"lavis {stage.spec.arch}/{stage.spec.model_type} ({Path(args.lavis_model).name}) "
                        f"{beams} beams, {args.max_new_tokens} tokens max", rate, cpu_rate, stage.device)  # fmt: skip
                del stage
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
