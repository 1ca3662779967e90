"""The shape probe (bench.probe) on an oracle model: it must report what the oracle does."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.fidelity import EVAL_SEED0, FidelityConfig, eval_scenes, scene_samples
from bench.probe import probe, save_strip
from datagen.scenes import split_combos
from model import LayerDiffModel
from model.data import to_example


def test_probe_reads_an_oracle_model(tmp_path: Path) -> None:
    model = LayerDiffModel.from_config_name("tiny").eval()
    cfg = FidelityConfig()
    seen, _ = split_combos(cfg.holdout_fraction, seed=cfg.seed)
    scenes = eval_scenes(seen, 4, 32, (1, 1), EVAL_SEED0, **cfg.scene_args)  # the probe's own scenes
    examples = [to_example(s, 32, 3) for s in scene_samples(scenes, 32, 3)]
    layers = torch.stack([e["layers"] for e in examples])
    present = torch.stack([e["present"] for e in examples])
    truth = model.encode_layers(layers, present)
    # x0-prediction oracle: the true layers whatever the noise and the prompt (CFG doubles the batch)
    model.predict = lambda x_t, *args: truth.repeat(x_t.shape[0] // truth.shape[0], 1, 1, 1, 1)
    report = probe(model, n_scenes=4, timesteps=(999, 500), steps=3)
    assert report["shapes"] == [s.shapes[0] for s in scenes]
    for row in report["by_t"]:  # shown the truth: right every time, deaf to the prompt
        assert row["from_truth"] == 1.0 and row["follows_prompt"] == 0.0 and row["prompt_effect"] == 0.0
    assert [step["t"] for step in report["trajectory"]] == [999, 666, 332]
    assert report["final"] == report["shapes"] and report["final_accuracy"] == 1.0
    save_strip(report, model, tmp_path / "strip.png", every=1)
    assert (tmp_path / "strip.png").stat().st_size > 0
