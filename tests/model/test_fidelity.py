"""The fidelity benchmark: it refuses shards written for other scenes, and its report counts each prompted shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datagen.scenes import ShapeSpec, make_scene, shape_mask, split_combos
from model.fidelity import (
    FidelityConfig,
    check_scene_shards,
    markdown,
    scene_sample,
    score_sample,
    summarize,
    to_example,
    verdict,
    write_scene_shards,
)


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
    examples = [to_example(scene_sample(s, f"s{s.seed}"), 32, 3) for s in scenes]
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
