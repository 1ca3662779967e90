"""The fidelity benchmark refuses existing shards written for other scenes than it scores on."""

from __future__ import annotations

from pathlib import Path

import pytest

from datagen.scenes import split_combos
from model.fidelity import FidelityConfig, check_scene_shards, write_scene_shards


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
