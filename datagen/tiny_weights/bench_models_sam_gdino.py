"""Images/s of the ``groundingdino`` (ground) and ``sam`` (segment) stages.

By default on the tiny random checkpoints (built into ``--weights``, a temporary folder if not
given) on CPU; pass real files and ``--num-gpus 1`` to time the real models on a GPU::

    python -m datagen.tiny_weights.bench_models_sam_gdino --images 32 --batch 4 --threads 1
    python -m datagen.tiny_weights.bench_models_sam_gdino --num-gpus 1 --images 256 --batch 8 \\
        --sam-checkpoint weights/sam_vit_h_4b8939.pth --sam-model-type vit_h \\
        --gd-checkpoint weights/groundingdino/groundingdino_swint_ogc.pth \\
        --gd-config weights/groundingdino/GroundingDINO_SwinT_OGC.py --gd-text-encoder weights/bert-base-uncased

Inputs are synthetic scenes (``datagen.scenes``) at ``--size`` px with their captions. SAM gets
each scene's true object boxes (1-3 per image), so its timing does not depend on what the
(random) detector finds. One batch is run first as warm-up and not timed.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from datagen.item import Detection, Item


def make_items(n: int, size: int) -> list[Item]:
    """``n`` synthetic scenes as items, each with its true boxes as detections."""
    from datagen.scenes import make_scene

    items = []
    for i in range(n):
        scene = make_scene(i, size)
        dets = []
        for phrase, mask in zip(scene.phrases, scene.masks, strict=True):
            ys, xs = np.nonzero(mask)
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            dets.append(Detection(phrase, box, 1.0))
        items.append(
            Item(
                key=f"{i:06d}",
                shard=0,
                index=i,
                uri=f"scene://{i}",
                source={},
                image=scene.image,
                caption=scene.caption,
                phrases=list(scene.phrases),
                detections=dets,
            )  # fmt: skip
        )
    return items


def time_stage(process: Callable[[list[Item]], object], items: list[Item], batch: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) of ``process`` over
    ``items`` in batches, after one untimed warm-up batch. On a busy machine the second figure
    is what one dedicated core would give (with ``--threads 1``)."""
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, help="folder for the tiny weights (default: a temp folder)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4, help="stage batch size (YAML batch_size)")
    ap.add_argument("--size", type=int, default=256, help="image side (StageContext.image_size)")
    ap.add_argument("--threads", type=float, default=1, help="CPU share (num_cpus) of each stage")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="> 0 uses CUDA when available")
    ap.add_argument("--gd-short-side", type=int, nargs="+", default=[800, 256],
                    help="GroundingDINO resize targets to time (800 = official)")  # fmt: skip
    ap.add_argument("--sam-checkpoint")
    ap.add_argument("--sam-model-type", default="tiny")
    ap.add_argument("--gd-checkpoint")
    ap.add_argument("--gd-config")
    ap.add_argument("--gd-text-encoder")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args(argv)

    from datagen.stages.base import StageContext
    from datagen.stages.models.groundingdino import GroundingDinoParams, GroundingDinoStage
    from datagen.stages.models.sam import SamParams, SamStage

    tmp = None
    if not (args.sam_checkpoint and args.gd_checkpoint):
        from datagen.tiny_weights import groundingdino, sam

        folder = args.weights or Path(tmp := tempfile.mkdtemp(prefix="tiny_weights_"))
        if not args.sam_checkpoint:
            args.sam_checkpoint = str(sam.build(folder)["checkpoint"])
        if not args.gd_checkpoint:
            gd = groundingdino.build(folder)
            args.gd_checkpoint, args.gd_config, args.gd_text_encoder = (
                str(gd["checkpoint"]), str(gd["config"]), str(gd["text_encoder"]))  # fmt: skip
    ctx = StageContext(image_size=args.size, num_cpus=args.threads, num_gpus=args.num_gpus)
    items = make_items(args.images, args.size)
    print(f"{args.images} images of {args.size} px, batch {args.batch}, num_cpus {args.threads}, "
          f"num_gpus {args.num_gpus}")  # fmt: skip

    for short in args.gd_short_side:
        params = GroundingDinoParams(
            checkpoint=args.gd_checkpoint, config=args.gd_config, text_encoder=args.gd_text_encoder,
            image_short_side=short, precision=args.precision, reject_empty=False,
        )  # fmt: skip
        stage = GroundingDinoStage(params, ctx)
        rate, cpu_rate = time_stage(stage.process, items, args.batch)
        print(f"ground  groundingdino {Path(args.gd_checkpoint).name} short side {short}: "
              f"{rate:.2f} images/s ({cpu_rate:.2f} per CPU-s) on {stage.device}")  # fmt: skip

    params = SamParams(checkpoint=args.sam_checkpoint, model_type=args.sam_model_type, precision=args.precision,
                       encoder_batch=args.batch, min_pred_iou=0.0, min_stability=0.0, min_mask_area=0.0,
                       reject_empty=False)  # fmt: skip
    stage = SamStage(params, ctx)
    boxes = sum(len(it.detections) for it in items) / len(items)
    rate, cpu_rate = time_stage(stage.process, items, args.batch)
    print(f"segment sam {args.sam_model_type} ({boxes:.1f} boxes/image): {rate:.2f} images/s "
          f"({cpu_rate:.2f} per CPU-s) on {stage.device}")  # fmt: skip
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
