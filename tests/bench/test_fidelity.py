"""The fidelity benchmark: its shards are the product's (validated, read back as the scenes), it refuses
shards written for other scenes, its report counts each prompted shape, it scores a run's snapshots as
their own models, the report names the machine, and its presets fill what a run leaves open. Edge
sharpness passes hard and soft edges and flags mushy masks, at any resolution."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench.fidelity import (
    BARS,
    EVAL_SEED0,
    PRESETS,
    FidelityConfig,
    check_scene_shards,
    edge_counts,
    eval_scenes,
    evaluate,
    markdown,
    scene_samples,
    score_sample,
    score_snapshots,
    summarize,
    to_example,
    verdict,
    write_scene_shards,
)
from bench.machine import describe_machine
from datagen.format import LayerSample, iter_tar_samples
from datagen.scenes import SHAPES, ShapeSpec, make_scene, shape_alpha, shape_mask, split_combos
from manifests.cli import main as manifests_main


def test_shards_are_written_by_the_product_writer_and_read_back_as_the_scenes(tmp_path: Path) -> None:
    cfg = FidelityConfig()
    _seen, held = split_combos(cfg.holdout_fraction, seed=cfg.seed)
    data = write_scene_shards(tmp_path / "data", [3, 4, 5], 32, held, shard_size=2, **cfg.scene_args)
    assert manifests_main(["validate", str(data)]) == 0
    assert sorted(p.name for p in (data / "shards").glob("*.tar")) == ["000000.tar", "000001.tar"]
    read = {g.key: LayerSample.from_members(g.key, g.members)
            for tar in sorted((data / "shards").glob("*.tar")) for g in iter_tar_samples(tar)}
    assert sorted(read) == ["scene-00000003", "scene-00000004", "scene-00000005"]
    for seed in (3, 4, 5):
        scene, sample = make_scene(seed, 32, exclude=held, **cfg.scene_args), read[f"scene-{seed:08d}"]
        assert all((c, s) not in held for c, s in zip(scene.colours, scene.shapes, strict=True))
        np.testing.assert_array_equal(sample.image, scene.image)
        np.testing.assert_array_equal(sample.background, scene.background)
        assert len(sample.masks) == len(scene.masks)
        for got, want in zip(sample.masks, scene.masks, strict=True):
            np.testing.assert_array_equal(got, want)
        assert [layer["caption"] for layer in sample.meta["layers"]] == scene.layer_captions


def test_presets_fill_what_the_run_leaves_open() -> None:
    assert FidelityConfig().preset == "s3-120"
    s3 = FidelityConfig()
    assert (s3.model, s3.minutes, s3.eta, s3.sample_steps) == ("tiny-s3", 120.0, 1.0, 100)
    quick = FidelityConfig(preset="tiny-30", minutes=2.0)
    assert (quick.model, quick.minutes, quick.eta, quick.sample_steps) == ("tiny", 2.0, 0.0, 25)
    assert set(PRESETS["s3-120"]) == set(PRESETS["tiny-30"])
    with pytest.raises(ValueError, match="unknown fidelity preset 'nope'"):
        FidelityConfig(preset="nope")


def test_existing_shards_must_match_the_benchmark_scenes(tmp_path: Path) -> None:
    cfg = FidelityConfig(upright=True)
    _seen, held = split_combos(cfg.holdout_fraction, seed=cfg.seed)
    data = write_scene_shards(tmp_path / "data", [0, 1, 2], 32, held, shard_size=2, **cfg.scene_args)
    check_scene_shards(data, cfg, held)  # the scenes it was written for: accepted
    with pytest.raises(ValueError, match="upright=True.*upright=False"):
        check_scene_shards(data, FidelityConfig(), held)
    with pytest.raises(ValueError, match="objects"):
        check_scene_shards(data, FidelityConfig(upright=True, objects="1"), held)
    with pytest.raises(ValueError, match="object_scale"):
        check_scene_shards(data, FidelityConfig(upright=True, object_scale=1.0), held)
    with pytest.raises(ValueError, match="excluded_combos"):
        check_scene_shards(data, cfg, held[1:])


def test_report_counts_each_prompted_shape_and_what_it_was_classified_as() -> None:
    scenes = [make_scene(seed, 32, object_scale=1.5) for seed in range(6)]
    examples = [to_example(s, 32, 3) for s in scene_samples(scenes, 32, 3)]
    # the first object of scene 0 (a triangle) drawn as a large disc instead: a wrong shape
    first = scenes[0].specs[0]
    assert first.shape != "circle"
    disc = shape_mask(ShapeSpec("circle", first.colour, 0.5, 0.5, 0.35, 0.0), 32)
    layers = examples[0]["layers"].clone()
    layers[1 + 3] = torch.from_numpy(disc).float()[None].expand(3, -1, -1) * 2 - 1
    records = [score_sample(layers, examples[0]["present"], scenes[0], "nearest")]
    records += [score_sample(e["layers"], e["present"], s, "nearest") for s, e in zip(scenes[1:], examples[1:])]
    report = summarize(records)

    by_shape = report["by_shape"]
    assert sum(v["fg_layers"] for v in by_shape.values()) == report["fg_layers"]
    right = sum(v["predicted"].get(name, 0) for name, v in by_shape.items())
    assert right / report["fg_layers"] == pytest.approx(report["shape"])
    assert by_shape[first.shape]["predicted"].get("circle", 0) >= 1  # the disc was counted as one
    assert by_shape[first.shape]["shape"] < 1.0
    for name, v in by_shape.items():
        assert sum(v["predicted"].values()) == v["fg_layers"]
        assert v["shape"] == round(v["predicted"].get(name, 0) / v["fg_layers"], 3)

    text = markdown({"seen": report, "held_out": report, "seen_truth": report, "held_out_truth": report,
                     "pass": verdict(report, report), "eval_minutes": 0.0, "loss_curve": []})
    line = next(row for row in text.splitlines() if row.startswith("- seen by prompted shape"))
    assert f"{first.shape} {by_shape[first.shape]['shape']} of {by_shape[first.shape]['fg_layers']} (" in line
    assert "circle" in line.split(f"{first.shape} ", 1)[1].split(")")[0]


def test_snapshots_are_scored_as_their_own_models_on_the_same_scenes(tmp_path: Path) -> None:
    import json

    from model import LayerDiffModel

    cfg = FidelityConfig(eval_scenes=2, sample_steps=2, eval_batch=2)
    seen, held = split_combos(cfg.holdout_fraction, seed=cfg.seed)
    scenes = {"seen": eval_scenes(seen, 2, 32, (1, 3), EVAL_SEED0, **cfg.scene_args),
              "held_out": eval_scenes(held, 2, 32, (1, 3), 2 * EVAL_SEED0, **cfg.scene_args)}
    models = {}
    for minute, seed in ((20.0, 2), (5.0, 1)):
        torch.manual_seed(seed)
        models[minute] = LayerDiffModel.from_config_name("tiny").eval()
        folder = tmp_path / "train" / "snapshots" / f"minute-{minute:g}"
        models[minute].save_pretrained(folder)
        (folder / "snapshot.json").write_text(json.dumps({"minute": minute, "step": int(minute * 10)}))

    rows = score_snapshots(tmp_path / "train", scenes, cfg, "nearest")
    assert [(r["minute"], r["step"]) for r in rows] == [(5.0, 50), (20.0, 200)]
    for row in rows:
        direct = evaluate(models[row["minute"]], scenes["seen"], cfg, "nearest")[0]
        assert row["seen"] == {k: direct[k] for k in row["seen"]}
    assert rows[0]["seen"] != rows[1]["seen"]  # two different models, told apart
    assert [r["minute"] for r in score_snapshots(tmp_path / "train", scenes, cfg, "nearest", [20.0])] == [20.0]

    examples = [to_example(s, 32, 3) for s in scene_samples(scenes["seen"], 32, 3)]
    report = summarize([score_sample(e["layers"], e["present"], s, "nearest") for s, e in zip(scenes["seen"], examples)])
    machine = describe_machine()
    text = markdown({"seen": report, "held_out": report, "seen_truth": report, "held_out_truth": report,
                     "pass": verdict(report, report), "eval_minutes": 0.0, "loss_curve": [], "snapshots": rows,
                     "train": {"step": 3000, "minutes": 30.5, "budget_s_per_step": 0.6}, "machine": machine})
    assert f"| 5 | 50 | {rows[0]['seen']['fg_colour']:.3f} / {rows[0]['held_out']['fg_colour']:.3f} |" in text
    # the budget is CPU time, so the report says which CPU spent it and what a step cost
    line = next(row for row in text.splitlines() if row.startswith("machine: "))
    assert machine["cpu"] and f"{os.cpu_count()} logical cores" in line
    assert f"({torch.backends.cpu.get_cpu_capability()} kernels)" in line and "0.6 s of the budget a step" in line


def test_cli_flags_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.fidelity as fidelity

    seen = []
    monkeypatch.setattr(fidelity, "run", lambda cfg: seen.append(cfg) or {})
    monkeypatch.setattr(fidelity, "markdown", lambda report: "")
    fidelity.main(["--minutes", "2.5", "--snapshots", "1", "2", "--upright", "--objects", "1",
                   "--train-arg", "batch_size=4"])
    fidelity.main(["--preset", "tiny-30", "--eta", "0.5"])
    cfg = seen[0]
    assert (cfg.minutes, cfg.snapshots, cfg.upright, cfg.objects, cfg.train_args) == \
        (2.5, [1.0, 2.0], True, "1", {"batch_size": 4})
    assert (cfg.preset, cfg.model, cfg.eta, cfg.sample_steps) == ("s3-120", "tiny-s3", 1.0, 100)
    assert (seen[1].preset, seen[1].model, seen[1].minutes, seen[1].eta) == ("tiny-30", "tiny", 30.0, 0.5)


def _binarity(mask: np.ndarray) -> float:
    """The measure edge sharpness replaced: share of ALL mask pixels within 0.1 of 0 or 1."""
    return float(((mask <= 0.1) | (mask >= 0.9)).mean())


def _alpha(shape: str, size: int, edges: str = "hard", sigma: float = 0.0, r: float = 0.2) -> np.ndarray:
    return shape_alpha(ShapeSpec(shape, "red", 0.5, 0.5, r, 0.4), size, edges, sigma) / 255.0


@pytest.mark.parametrize("shape", SHAPES)
def test_edge_sharpness_passes_hard_and_soft_edges(shape: str) -> None:
    bar = BARS["edge_sharpness"][1]
    hard = edge_counts(_alpha(shape, 32))
    assert hard.sharpness == 1.0 and hard.width_px == 0.0 and hard.drawn > 20
    # anti-aliased (4x4 coverage) and slightly blurred (sigma 1 px) edges are edges, not mush,
    # though the blurred edge's transition takes so many pixels that binarity fails
    antialias = _alpha(shape, 32, "antialias")
    assert edge_counts(antialias).sharpness == 1.0 and 0.3 < edge_counts(antialias).width_px < 1.2
    blurred = _alpha(shape, 32, "blur", 1.0)
    assert edge_counts(blurred).sharpness >= bar > _binarity(blurred)
    assert 1.8 < edge_counts(blurred).width_px < 3.5  # a Gaussian's 10-90% width: 2.56 sigma


@pytest.mark.parametrize("shape", SHAPES)
def test_edge_sharpness_flags_mushy_masks(shape: str) -> None:
    bar = BARS["edge_sharpness"][1]
    # (circumradius 0.3 of the frame, within the benchmark's objects; the pixels of a much thinner
    # shape all lie within the edge band, so its half-transparent interior counts less)
    hard = _alpha(shape, 32, r=0.3)
    blob = _alpha(shape, 32, "blur", 3.0, r=0.3)  # a heavily blurred blob
    half = np.where(hard > 0, 0.5, 0.0)  # the shape half transparent throughout
    haze = np.maximum(hard, 0.3)  # a haze over the whole frame
    for mush in (blob, half, haze):
        assert edge_counts(mush).sharpness < bar - 0.15, (shape, edge_counts(mush))
    # the shape's own edge is no excuse: a blurred blob is wider than any edge band
    assert edge_counts(blob).width_px > 2 * edge_counts(_alpha(shape, 32, "blur", 1.0, r=0.3)).width_px


def test_edge_band_scales_with_the_resolution() -> None:
    """The same edge at 256 px (sigma 8 px = 1 px at 32) is as sharp as at 32 px; a blob as mushy."""
    bar = BARS["edge_sharpness"][1]
    for size in (64, 256):
        scale = size / 32
        assert edge_counts(_alpha("star", size)).sharpness == 1.0
        assert edge_counts(_alpha("star", size, "blur", 1.0 * scale)).sharpness >= bar
        assert edge_counts(_alpha("star", size, "blur", 3.0 * scale, r=0.3)).sharpness < bar - 0.15
    # an empty mask draws nothing: nothing mushy (the shape measure fails it instead)
    assert edge_counts(np.zeros((32, 32))).sharpness == 1.0


def test_scores_true_layers_sharp_and_a_mushy_layer_not() -> None:
    scenes = [make_scene(seed, 32, object_scale=1.5) for seed in range(6)]
    examples = [to_example(s, 32, 3) for s in scene_samples(scenes, 32, 3)]
    truth = summarize([score_sample(e["layers"], e["present"], s, "nearest") for s, e in zip(scenes, examples)])
    assert truth["edge_sharpness"] == 1.0 and truth["edge_width_px"] == 0.0  # the ceiling
    assert truth["shape"] > 0.8

    # a faint haze (alpha 0.05) outside every mask is neither drawn nor the object: shape and colour
    # are those of the alpha >= 0.5 region, sharpness stays 1
    hazy = []
    for e in examples:
        layers = e["layers"].clone()
        layers[4:] = torch.where(layers[4:] < 0, torch.full_like(layers[4:], 2 * 0.05 - 1), layers[4:])
        hazy.append(layers)
    report = summarize([score_sample(h, e["present"], s, "nearest") for s, e, h in zip(scenes, examples, hazy)])
    assert (report["shape"], report["fg_colour"], report["edge_sharpness"]) == \
        (truth["shape"], truth["fg_colour"], 1.0)

    # every object's mask blurred into a blob (sigma 3 px), or every object at half opacity: the
    # figure fails its bar (counted over all 1024 pixels of each mask, half opacity would pass it)
    import cv2

    def mushy(transform: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
        records = []
        for scene, e in zip(scenes, examples):
            layers = e["layers"].clone()
            for n in range(3):
                if bool(e["present"][1 + n]):
                    unit = transform((layers[4 + n, 0].numpy() + 1) / 2)
                    layers[4 + n] = torch.from_numpy(unit * 2 - 1)[None].expand(3, -1, -1)
            records.append(score_sample(layers, e["present"], scene, "nearest"))
        return summarize(records)

    half = mushy(lambda unit: unit * 0.5)
    assert half["edge_sharpness"] < BARS["edge_sharpness"][1] - 0.2
    report = mushy(lambda unit: cv2.GaussianBlur(unit, (0, 0), 3.0, borderType=cv2.BORDER_CONSTANT))
    assert report["edge_sharpness"] < BARS["edge_sharpness"][1] - 0.2 and report["edge_width_px"] > 4
    assert not verdict(report, report)["edge_sharpness"]
    text = markdown({"seen": report, "held_out": truth, "seen_truth": truth, "held_out_truth": truth,
                     "pass": verdict(report, truth), "eval_minutes": 0.0, "loss_curve": []})
    row = next(r for r in text.splitlines() if r.startswith("| edge_sharpness |"))
    assert f"| {report['edge_sharpness']:.3f} | 1.000 | 1.000 / 1.000 | >= 0.95 | False |" in row
    assert "| edge_width_px |" in text and "binarity" not in text
