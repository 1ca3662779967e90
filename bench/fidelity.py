"""Fidelity benchmark: train a recipe on synthetic coloured-shape scenes for a fixed CPU budget,
then sample seen and held-out (colour, shape) combinations and score the layers.

    python -m bench.fidelity --out runs/fidelity                   # the s3-120 preset (120 CPU-minutes)
    python -m bench.fidelity --preset tiny-30 --out runs/tiny30      # the tiny preset, 30 CPU-minutes

A preset (``PRESETS``) names a model recipe, its training budget and the sampler it is scored
with; ``--minutes``, ``--eta``, ``--sample-steps`` and ``--model`` override it. ``s3-120`` is the
regression benchmark: the recipe that met every bar at 120 CPU-minutes (BENCHMARKS.md).

1. Shards: ``datagen.scenes.make_scene`` at the model's resolution, the held-out combinations
   (``split_combos``) excluded, through the product's synthetic-gt stages (truth backends,
   assemble) and shard writer (``OUT/data``; ``python -m manifests validate OUT/data`` checks it).
2. Train ``model.train`` in-process for ``minutes`` (the LR schedule is fitted to the budget).
3. Sample the prompts of unseen scenes (seeds apart from the training ones) whose objects are
   all seen, or all held-out, combinations; score every layer:

   - fg colour: the mean colour of the foreground inside its predicted mask is, of the palette,
     nearest to the prompted colour;
   - shape: ``classify_shape`` of the predicted mask is the prompted shape;
   - background: the background's pixels lie nearest the prompted colour's tones;
   - edge sharpness: of the pixels a layer's mask draws (alpha > 0.1), the share that is opaque
     (alpha >= 0.9) or lies on the mask's edge (within ``EDGE_BAND_PX`` of the alpha = 0.5
     contour): a soft edge (anti-aliasing, a matte's band) is sharp, a half-transparent interior,
     a haze or a blurred blob is not (``edge_counts``); pooled over the foreground layers;
   - edge width: the transition's mean width in px, the mask's pixels strictly between 0.1 and
     0.9 per px of its 0.5 contour (0 for a binary mask, about 2.6 sigma for a Gaussian-blurred
     edge); reported, no bar;
   - outside-mask: of a foreground layer's pixels, the share outside its predicted mask that
     the model painted as object: differing (by > 0.1) from the fill the training data shows
     there (``fg_fill``: nearest = the inside colour carried outwards, zero = black);
   - leak: composite pixels outside a layer's mask that have its prompted colour (a ghost of the
     object in the background layer), per pixel of the object.

   The same scores on the true layers of the same scenes give the ceiling of the measures.

Writes ``OUT/fidelity.json``, ``OUT/fidelity.md`` (colour and shape by objects per scene, and by
prompted shape with what the classifier called each layer; the machine and the budget's CPU seconds a
step), ``OUT/loss.png`` and sample grids. ``--snapshots 30 60`` also scores the model as it was
after 30 and 60 training minutes of the same run (on the same scenes): a learning curve.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.machine import describe_machine, machine_line
from datagen.config import RUN_KEYS, PipelineConfig, load_config
from datagen.format import LayerSample
from datagen.item import Item
from datagen.registry import STAGES
from datagen.writer import write_index, write_shard
from model.data import fill_outside, split_layers, to_example
from model.sampling import StepHook

BARS = {"fg_colour": (">=", 0.9), "shape": (">=", 0.8), "background": (">=", 0.95),
        "edge_sharpness": (">=", 0.95), "outside_mask": ("<=", 0.05)}
# Edge sharpness: alpha within NEAR_BINARY of 0 or 1 is transparent / opaque; intermediate alpha
# is an edge when it lies within EDGE_BAND_PX (px at EDGE_BAND_SIZE px, scaled with the mask's
# size) of a pixel on the other side of alpha = 0.5: the two pixel rings either side of the
# contour at the model's 32 px, which hold an anti-aliased or a slightly blurred (sigma <= 1 px)
# edge's whole transition.
NEAR_BINARY = 0.1
EDGE_BAND_PX = 2
EDGE_BAND_SIZE = 32
HELDOUT_GAP = 0.1
EVAL_SEED0 = 1_000_000  # evaluation scenes: seeds far from the training ones
SYNTHETIC_PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "synthetic-gt.yaml"

# Named presets: model recipe (model.configuration), training budget in CPU-minutes, sampler.
PRESETS: dict[str, dict[str, Any]] = {
    # The regression benchmark: every bar met (shape 0.81 / 0.87) at 120 CPU-minutes with eta 1, 100 steps.
    "s3-120": {"model": "tiny-s3", "minutes": 120.0, "eta": 1.0, "sample_steps": 100},
    # The tiny preset at 30 CPU-minutes, DDIM 25: every bar but shape (0.28 / 0.44).
    "tiny-30": {"model": "tiny", "minutes": 30.0, "eta": 0.0, "sample_steps": 25},
}


@dataclass
class FidelityConfig:
    """One benchmark run. ``model``, ``minutes``, ``eta`` and ``sample_steps`` left None take the
    ``preset``'s values."""

    out: str = "runs/fidelity"
    preset: str = "s3-120"
    model: str | None = None  # model.configuration preset trained (tiny, tiny-s3, ...)
    minutes: float | None = None  # training budget: CPU time of the training process (one thread)
    eta: float | None = None  # DDIM noise: 0 deterministic, 1 DDPM-like
    sample_steps: int | None = None
    train_scenes: int = 20_000
    shard_size: int = 2_000
    eval_scenes: int = 64  # per split (seen, held-out)
    holdout_fraction: float = 0.25
    objects: str = "1-3"  # objects per scene: "N" or "LO-HI" (at most the model's max_layers)
    # Object size relative to datagen's scenes: at 32 px their 3-8 px shapes are ambiguous (the
    # classifier is right on 82% of true masks); at 1.5x it is right on 97%.
    object_scale: float = 1.5
    # Every shape in one fixed rotation (datagen.scenes.UPRIGHT_ANGLES) instead of a random one: a
    # diagnostic, not the benchmark.
    upright: bool = False
    seed: int = 0
    guidance_scale: float = 3.0
    eval_batch: int = 32
    threads: int = 1
    device: str = "cpu"  # where the evaluation samples: cpu | cuda (training's device is its use_gpu)
    data: str | None = None  # existing shards (else generated under OUT/data)
    skip_train: bool = False  # score OUT/train/model as it is
    # Also score the model as it was after these training minutes of the same run (model.train's
    # snapshot_minutes; the LR schedule is still the one fitted to ``minutes``): a learning curve.
    snapshots: list[float] = field(default_factory=list)
    train_args: dict[str, Any] = field(default_factory=dict)  # model.train options over its defaults

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown fidelity preset {self.preset!r}; choose from {sorted(PRESETS)}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    @property
    def scene_args(self) -> dict[str, Any]:
        """The ``make_scene`` options of the benchmark's scenes (training and evaluation alike)."""
        return {"object_scale": self.object_scale, "upright": self.upright}


# ---------------------------------------------------------------------------------------------
# scenes through the product's synthetic-gt path


def scene_pipeline(size: int, max_layers: int) -> PipelineConfig:
    """The product's synthetic-gt pipeline (pipelines/synthetic-gt.yaml) at ``size`` px."""
    return load_config(SYNTHETIC_PIPELINE, {"image": {"size": size}, "max_layers": max_layers})


def assemble_scenes(pipeline: PipelineConfig, scenes: Sequence[Any], shard: int = 0) -> list[Item]:
    """Scenes as ``datagen run`` stores them: each scene's true layers through the pipeline's stages
    after decoding (the scene is the decoded image); accepted items carry their tar ``members``."""
    items = [Item(key=f"scene-{scene.seed:08d}", shard=shard, index=i, uri=f"scene-gt:{scene.seed}",
                  source={"kind": "scene-gt", "seed": scene.seed}, image=scene.image, caption=scene.caption,
                  sha256=hashlib.sha256(scene.image.tobytes()).hexdigest(), truth=scene)
             for i, scene in enumerate(scenes)]
    for stage in STAGES[1:]:
        pipeline.build_stage(stage).run_items(items)
    return items


def scene_samples(scenes: Sequence[Any], size: int, max_layers: int) -> list[LayerSample]:
    """The stored form of each scene, read back (``LayerSample.from_members``)."""
    items = assemble_scenes(scene_pipeline(size, max_layers), scenes)
    bad = [it.rejected or it.key for it, scene in zip(items, scenes, strict=True)
           if not it.ok or it.num_layers != len(scene.masks)]
    if bad:  # the scores pair layer n with the scene's object n: every object must be stored
        raise ValueError(f"{len(bad)} scene(s) not stored whole by the synthetic-gt stages, e.g. {bad[0]}")
    return [LayerSample.from_members(it.key, it.members) for it in items]


def write_scene_shards(out: Path, seeds: Sequence[int], size: int, exclude: Sequence[tuple[str, str]],
                       shard_size: int, n_objects: tuple[int, int] = (1, 3), max_layers: int = 3,
                       **scene_args: Any) -> Path:
    """Scenes of ``seeds`` as a dataset folder (OUT/shards, OUT/manifests, OUT/manifest.json) written
    by ``datagen.writer``; ``scene_args`` go to ``make_scene`` and, with the held-out combinations and
    objects per scene, into the index's ``config.scenes`` and its ``config_sha256``."""
    from datagen.scenes import make_scene

    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "manifests").mkdir(parents=True, exist_ok=True)
    pipeline = scene_pipeline(size, max_layers)
    scenes_doc = {"seeds": [int(seeds[0]), int(seeds[-1])] if len(seeds) else [],
                  "excluded_combos": [list(c) for c in exclude], "objects": list(n_objects), **scene_args}
    config = {**pipeline.to_dict(), "output": str(out), "shards": -(-len(seeds) // shard_size),
              "samples_per_shard": shard_size, "scenes": scenes_doc}
    sha = hashlib.sha256(json.dumps({k: v for k, v in config.items() if k not in RUN_KEYS},
                                    sort_keys=True).encode()).hexdigest()
    stages = pipeline.stage_identities()
    for s, start in enumerate(range(0, len(seeds), shard_size)):
        t0 = time.time()
        scenes = [make_scene(int(seed), size, n_objects=n_objects, exclude=exclude, **scene_args)
                  for seed in seeds[start:start + shard_size]]
        write_shard(out, s, assemble_scenes(pipeline, scenes, s), sha, stages, time.time() - t0)
    write_index(out, config, sha)
    return out


# ---------------------------------------------------------------------------------------------
# scoring


def background_colour(bg: np.ndarray, candidates: Sequence[str]) -> str:
    """The candidate whose two background tones (datagen.scenes) the (H, W, 3) uint8 pixels lie nearest."""
    from datagen.scenes import background_tones

    pixels = bg.reshape(-1, 3).astype(np.float64)
    best, best_d = candidates[0], float("inf")
    for name in candidates:
        a, b = background_tones(name)
        ab = b - a
        t = np.clip((pixels - a) @ ab / max(float(ab @ ab), 1e-9), 0, 1)
        d = float(np.linalg.norm(pixels - (a + t[:, None] * ab), axis=1).mean())
        if d < best_d:
            best, best_d = name, d
    return best


@dataclass(frozen=True)
class EdgeCounts:
    """Pixel counts of one soft mask behind edge sharpness and edge width (``edge_counts``)."""

    drawn: int  # pixels with alpha > NEAR_BINARY
    sharp: int  # of those, opaque (alpha >= 1 - NEAR_BINARY) or within the edge band
    transition: int  # pixels strictly between NEAR_BINARY and 1 - NEAR_BINARY
    contour: float  # length in px of the alpha = 0.5 contour

    @property
    def sharpness(self) -> float:
        """Share of the drawn pixels that are sharp; 1.0 for a mask that draws nothing."""
        return self.sharp / self.drawn if self.drawn else 1.0

    @property
    def width_px(self) -> float:
        """Mean width of the transition across the 0.5 contour in px; NaN without a contour."""
        return self.transition / self.contour if self.contour else float("nan")


def edge_band(mask: np.ndarray) -> np.ndarray:
    """Bool (H, W): pixels within the edge band of a soft (H, W) mask in [0, 1], the
    ``EDGE_BAND_PX`` (scaled with the mask's size) either side of its alpha = 0.5 contour; the frame
    is no edge."""
    from datagen.alpha import trimap

    band = max(1, round(EDGE_BAND_PX * max(mask.shape) / EDGE_BAND_SIZE))
    return trimap(np.where(mask >= 0.5, 255, 0).astype(np.uint8), band) == 128


def edge_counts(mask: np.ndarray) -> EdgeCounts:
    """Edge-sharpness counts of a soft (H, W) mask in [0, 1]: intermediate alpha is an edge within
    the band of the 0.5 contour (``edge_band``) and mush anywhere else."""
    from skimage.measure import find_contours

    mask = np.asarray(mask, np.float64)
    drawn = mask > NEAR_BINARY
    opaque = mask >= 1 - NEAR_BINARY
    sharp = drawn & (opaque | edge_band(mask))
    contour = sum(float(np.linalg.norm(np.diff(c, axis=0), axis=1).sum()) for c in find_contours(mask, 0.5))
    return EdgeCounts(drawn=int(drawn.sum()), sharp=int(sharp.sum()), transition=int((drawn & ~opaque).sum()),
                      contour=contour)


def score_sample(layers: torch.Tensor, present: torch.Tensor, scene: Any, fg_fill: str) -> dict[str, Any]:
    """Scores of one sample's (L, 3, H, W) layers in [-1, 1] against the scene it was prompted with."""
    from datagen.format import compose_layers
    from datagen.phrases import PALETTE, nearest_colour
    from datagen.scenes import BACKGROUND_COLOURS, classify_shape

    parts = split_layers(layers.float().cpu(), present.cpu())
    bg = (parts["background"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    record: dict[str, Any] = {"bg_ok": background_colour(bg, BACKGROUND_COLOURS) == scene.background_colour,
                              "layers": []}
    # the object is where its soft alpha reaches 0.5 (the measures below ask what is inside it);
    # the composite is the soft one, as the format stores and shows the layers
    insides = [a >= 0.5 for a in parts["alphas"]]
    composite = compose_layers(parts["background"], parts["foregrounds"], [a[None] for a in parts["alphas"]])
    for n, (fg, soft, inside) in enumerate(zip(parts["foregrounds"], parts["masks"], insides, strict=True)):
        colour, shape = scene.colours[n], scene.shapes[n]
        area = int(inside.sum())
        mean = (fg[:, inside].mean(1) * 255).tolist() if area else [0.0, 0.0, 0.0]
        expected = fill_outside(fg, inside, fg_fill) if area else fg
        painted = ((fg - expected).abs().amax(0) > 0.1) & ~inside
        target = torch.tensor(PALETTE[colour], dtype=torch.float32)[:, None, None] / 255
        comp_near = ((composite - target).norm(dim=0) < 40 / 255) & ~inside
        record["layers"].append({
            "colour": colour, "shape": shape,
            "colour_ok": area > 0 and nearest_colour(mean) == colour,
            "shape_pred": classify_shape(inside.numpy().astype(np.uint8) * 255),
            **dataclasses.asdict(edge_counts(soft.numpy())),
            "outside": float(painted.sum()) / max(1, area + int(painted.sum())),
            "leak": float(comp_near.sum()) / max(1, area),
        })
        record["layers"][-1]["shape_ok"] = record["layers"][-1]["shape_pred"] == shape
    return record


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean scores over samples / foreground layers, and fg colour and shape by objects per scene."""
    layers = [r for rec in records for r in rec["layers"]]
    mean = lambda xs: float(np.mean(xs)) if len(xs) else float("nan")  # noqa: E731
    by_k = {}
    for k in sorted({len(rec["layers"]) for rec in records}):
        ls = [r for rec in records if len(rec["layers"]) == k for r in rec["layers"]]
        by_k[str(k)] = {"fg_colour": round(mean([r["colour_ok"] for r in ls]), 3),
                        "shape": round(mean([r["shape_ok"] for r in ls]), 3), "fg_layers": len(ls)}
    called: dict[str, Counter[str]] = {}  # per prompted shape: what the classifier called its layers
    for r in layers:
        called.setdefault(r["shape"], Counter())[str(r["shape_pred"])] += 1
    by_shape = {name: {"shape": round(c[name] / c.total(), 3), "fg_layers": c.total(), "predicted": dict(c)}
                for name, c in sorted(called.items())}
    # edge figures pooled over the layers' pixels: a large mushy layer counts for all its pixels
    edges = EdgeCounts(*(sum(r[f.name] for r in layers) for f in dataclasses.fields(EdgeCounts)))
    return {
        "fg_colour": mean([r["colour_ok"] for r in layers]),
        "shape": mean([r["shape_ok"] for r in layers]),
        "background": mean([r["bg_ok"] for r in records]),
        "edge_sharpness": edges.sharpness if layers else float("nan"),
        "edge_width_px": edges.width_px,
        "outside_mask": mean([r["outside"] for r in layers]),
        "leak": mean([r["leak"] for r in layers]),
        "samples": len(records),
        "fg_layers": len(layers),
        "by_objects": by_k,
        "by_shape": by_shape,
    }


def eval_scenes(combos: Sequence[tuple[str, str]], n: int, size: int, n_objects: tuple[int, int],
                seed0: int, **scene_args: Any) -> list[Any]:
    """``n`` scenes whose objects all take combinations from ``combos`` (seeds from ``seed0``);
    ``scene_args`` go to ``make_scene`` (``FidelityConfig.scene_args``)."""
    from datagen.scenes import make_scene

    return [make_scene(seed0 + i, size, n_objects=n_objects, combos=set(combos), **scene_args)
            for i in range(n)]


def eval_splits(cfg: FidelityConfig, size: int) -> dict[str, list[Any]]:
    """The evaluation scenes: ``cfg.eval_scenes`` of seen and of held-out combinations, seeded apart
    from the training scenes and from each other."""
    from datagen.scenes import split_combos

    seen, held = split_combos(cfg.holdout_fraction, seed=cfg.seed)
    n_objects = parse_objects(cfg.objects)
    return {name: eval_scenes(combos, cfg.eval_scenes, size, n_objects, seed0, **cfg.scene_args)
            for name, combos, seed0 in (("seen", seen, EVAL_SEED0), ("held_out", held, 2 * EVAL_SEED0))}


def check_scene_shards(data: Path, cfg: FidelityConfig, held: Sequence[tuple[str, str]]) -> None:
    """Fail before training when existing shards (``--data``) were written for other scenes than
    ``cfg`` evaluates on (object scale, upright, objects per scene, held-out combinations): the
    scores would silently measure a mismatch."""
    written = json.loads((data / "manifest.json").read_text()).get("config", {}).get("scenes")
    if written is None:
        raise ValueError(f"{data}/manifest.json records no benchmark scenes (config.scenes): not written by "
                         f"bench.fidelity; leave out --data to write the benchmark's shards")
    wanted = {**cfg.scene_args, "objects": list(parse_objects(cfg.objects)),
              "excluded_combos": sorted(list(c) for c in held)}
    for key, value in wanted.items():
        have = written.get(key)
        if key == "excluded_combos" and have is not None:
            have = sorted(list(c) for c in have)
        if have != value:
            raise ValueError(f"{data}/manifest.json: shards written with {key}={have!r}, the benchmark "
                             f"asks for {key}={value!r} (a --data folder of other scenes)")


def parse_objects(text: str) -> tuple[int, int]:
    """ "1-3" -> (1, 3); "2" -> (2, 2)."""
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def evaluate(model: Any, scenes: Sequence[Any], cfg: FidelityConfig, fg_fill: str,
             grid_path: Path | None = None, step_hook: StepHook | None = None
             ) -> tuple[dict[str, float], dict[str, float]]:
    """(model scores, ground-truth scores) over ``scenes``, sampled with ``cfg``'s sampler (and
    ``step_hook``, e.g. self-mask guidance); writes a grid of the first samples to ``grid_path``."""
    from model.sampling import ddim_sample
    from model.trainlog import save_grid

    res, k_max = model.config.resolution, model.config.max_layers
    examples = [to_example(s, res, k_max, fg_fill) for s in scene_samples(scenes, res, k_max)]
    generator = torch.Generator().manual_seed(cfg.seed + 777)
    records, truth = [], []
    for start in range(0, len(examples), cfg.eval_batch):
        chunk = examples[start:start + cfg.eval_batch]
        present = torch.stack([e["present"] for e in chunk])
        with torch.no_grad():
            layers = ddim_sample(model, [e["prompt"] for e in chunk], [e["layer_prompts"] for e in chunk], present,
                                 num_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, generator=generator,
                                 eta=cfg.eta, step_hook=step_hook).float().cpu()
        for i, ex in enumerate(chunk):
            scene = scenes[start + i]
            records.append(score_sample(layers[i], ex["present"], scene, fg_fill))
            truth.append(score_sample(ex["layers"], ex["present"], scene, fg_fill))
        if start == 0 and grid_path is not None:
            save_grid(grid_path, layers[:8], present[:8], [e["prompt"] for e in chunk[:8]],
                      [e["layer_prompts"] for e in chunk[:8]])
    return summarize(records), summarize(truth)


# ---------------------------------------------------------------------------------------------
# the benchmark


def plot_loss(log_csv: Path, png: Path) -> list[tuple[int, float]]:
    """Plot train_log.csv's loss; returns (step, loss) at about ten points."""
    from model.trainlog import read_log

    rows = read_log(log_csv)
    steps, losses = [int(r["step"]) for r in rows], [r["loss"] for r in rows]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, losses)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (mean over log interval)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)
    except ImportError:
        pass
    pick = sorted({round(i * (len(rows) - 1) / 9) for i in range(10)}) if rows else []
    return [(steps[i], round(losses[i], 4)) for i in pick]


def verdict(seen: dict[str, float], held: dict[str, float]) -> dict[str, bool]:
    ok = {}
    for name, (op, bar) in BARS.items():
        ok[name] = all((m[name] >= bar) if op == ">=" else (m[name] <= bar) for m in (seen, held))
    ok["heldout_gap"] = all(abs(seen[k] - held[k]) <= HELDOUT_GAP for k in ("fg_colour", "shape"))
    return ok


def run(cfg: FidelityConfig) -> dict[str, Any]:
    """Generate data, train for the budget, evaluate; returns (and writes) the report."""
    from datagen.scenes import split_combos
    from model import LayerDiffModel, get_config
    from model.train import TrainConfig, train

    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seen, held = split_combos(cfg.holdout_fraction, seed=cfg.seed)
    train_cfg = TrainConfig(**{
        "out": str(out / "train"), "model": cfg.model, "num_workers": 0, "max_steps": 1_000_000,
        "max_minutes": cfg.minutes, "budget_clock": "cpu", "ckpt_every": 500, "sample_every": 1000,
        "threads": cfg.threads, "seed": cfg.seed, "progress": False, "snapshot_minutes": list(cfg.snapshots),
        **cfg.train_args})
    report: dict[str, Any] = {"config": dataclasses.asdict(cfg), "train_config": dataclasses.asdict(train_cfg),
                              "held_out_combos": [list(c) for c in held], "machine": describe_machine()}

    # 1. data
    data = Path(cfg.data) if cfg.data else out / "data"
    if not (data / "manifest.json").exists():
        t0 = time.time()
        model_cfg = get_config(cfg.model, **train_cfg.model_args)
        write_scene_shards(data, list(range(cfg.train_scenes)), model_cfg.resolution, held, cfg.shard_size,
                           parse_objects(cfg.objects), model_cfg.max_layers, **cfg.scene_args)
        report["data_seconds"] = round(time.time() - t0, 1)
        print(f"wrote {cfg.train_scenes} scenes to {data} in {report['data_seconds']} s", file=sys.stderr)
    check_scene_shards(data, cfg, held)
    train_cfg.data = str(data)

    # 2. train
    if not cfg.skip_train:
        t0 = time.time()
        result = train(train_cfg)
        report["train"] = {**result, "minutes": round((time.time() - t0) / 60, 2),
                           "budget_s_per_step": round(result["clock_s"] / max(result["step"], 1), 3)}
    report["loss_curve"] = plot_loss(out / "train" / "train_log.csv", out / "loss.png")

    # 3. evaluate the EMA model (and its snapshots) on the same scenes
    model = LayerDiffModel.from_pretrained(out / "train" / "model").eval().to(cfg.device)
    res = model.config.resolution
    t0 = time.time()
    scenes = eval_splits(cfg, res)
    for name, split in scenes.items():
        report[name], report[f"{name}_truth"] = evaluate(model, split, cfg, train_cfg.fg_fill,
                                                         out / f"samples-{name}.png")
    # a fresh run scores its own snapshots only (OUT may hold an earlier run's); --skip-train all there are
    report["snapshots"] = score_snapshots(out / "train", scenes, cfg, train_cfg.fg_fill,
                                          None if cfg.skip_train else cfg.snapshots)
    report["eval_minutes"] = round((time.time() - t0) / 60, 2)
    report["pass"] = verdict(report["seen"], report["held_out"])
    (out / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "fidelity.md").write_text(markdown(report))
    return report


def score_snapshots(train_out: Path, scenes: dict[str, Sequence[Any]], cfg: FidelityConfig, fg_fill: str,
                    minutes: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Score the models ``model.train`` saved under TRAIN_OUT/snapshots (those of ``minutes``, or all)
    on ``scenes``; rows sorted by minute."""
    from model import LayerDiffModel

    rows = []
    for folder in (train_out / "snapshots").glob("minute-*"):
        info = json.loads((folder / "snapshot.json").read_text())
        if minutes is not None and info["minute"] not in minutes:
            continue
        model = LayerDiffModel.from_pretrained(folder).eval().to(cfg.device)
        scores = {name: evaluate(model, split, cfg, fg_fill)[0] for name, split in scenes.items()}
        rows.append({**info, **{name: {k: s[k] for k in BARS} for name, s in scores.items()}})
    return sorted(rows, key=lambda r: r["minute"])


def markdown(report: dict[str, Any]) -> str:
    """The report's table (seen, held-out, truth ceiling, bar)."""
    rows = ["| measure | seen | held-out | true layers (seen / held-out) | bar | met |", "|---|---|---|---|---|---|"]
    for name in ("fg_colour", "shape", "background", "edge_sharpness", "edge_width_px", "outside_mask", "leak"):
        op, bar = BARS.get(name, ("", None))
        met = report["pass"].get(name, "")
        rows.append(f"| {name} | {report['seen'][name]:.3f} | {report['held_out'][name]:.3f} | "
                    f"{report['seen_truth'][name]:.3f} / {report['held_out_truth'][name]:.3f} | "
                    f"{op} {bar if bar is not None else '-'} | {met} |")
    rows.append(f"| held-out within {HELDOUT_GAP} of seen (fg colour, shape) | | | | | {report['pass']['heldout_gap']} |")
    rows.append("")
    for split in ("seen", "held_out"):
        by_k = ", ".join(f"{k} object(s): colour {v['fg_colour']}, shape {v['shape']} ({v['fg_layers']} layers)"
                         for k, v in report[split]["by_objects"].items())
        truth = ", ".join(f"{k}: {v['shape']}" for k, v in report[f"{split}_truth"]["by_objects"].items())
        rows.append(f"- {split} by objects per scene: {by_k}; shape on true layers: {truth}")
        by_shape = "; ".join(
            f"{name} {v['shape']} of {v['fg_layers']} ("
            + ", ".join(f"{p} {n}" for p, n in sorted(v["predicted"].items(), key=lambda kv: -kv[1])) + ")"
            for name, v in report[split]["by_shape"].items())
        rows.append(f"- {split} by prompted shape, right of layers (classified as): {by_shape}")
    if report.get("snapshots"):
        rows += ["", "| training minutes (snapshot) | step | " + " | ".join(f"{m} seen / held-out" for m in BARS) + " |",
                 "|---|---|" + "---|" * len(BARS)]
        for snap in report["snapshots"]:
            rows.append(f"| {snap['minute']:g} | {snap['step']} | " + " | ".join(
                f"{snap['seen'][m]:.3f} / {snap['held_out'][m]:.3f}" for m in BARS) + " |")
    train = report.get("train", {})
    rows.append("")
    rows.append(f"steps {train.get('step', '?')}, {train.get('minutes', '?')} min training, "
                f"eval {report['eval_minutes']} min; loss curve (step, loss): {report['loss_curve']}")
    if "machine" in report:  # the budget is CPU time: what it buys depends on the CPU
        per_step = f"; {train['budget_s_per_step']} s of the budget a step" if "budget_s_per_step" in train else ""
        rows.append(f"machine: {machine_line(report['machine'])}{per_step}")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    from model.train import add_config_flags, parse_overrides

    parser = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = FidelityConfig()
    preset_keys = tuple(PRESETS[defaults.preset])
    add_config_flags(parser, defaults, skip=("preset", "train_args", *preset_keys))
    parser.add_argument("--preset", choices=sorted(PRESETS), default=defaults.preset)
    for key in preset_keys:  # None: the chosen preset's value
        parser.add_argument("--" + key.replace("_", "-"), type=type(getattr(defaults, key)), default=None,
                            help="default: the preset's")
    parser.add_argument("--train-arg", dest="train_args", action="append", default=[], metavar="KEY=VALUE",
                        help="model.train option (JSON value) over its defaults, e.g. batch_size=32")
    args = vars(parser.parse_args(argv))
    train_args = parse_overrides(args.pop("train_args"))
    report = run(FidelityConfig(**args, train_args=train_args))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
