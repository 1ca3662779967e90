"""The whole real-backend pipeline (BLIP-2, GroundingDINO, SAM, SD inpainting) on tiny checkpoints,
end to end through Ray, as `make dataset PIPELINE=pipelines/tiny.yaml` runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from datagen.config import ConfigError, load_config
from datagen.runner import PipelineError, run
from datagen.tiny_weights.__main__ import main as build_tiny_weights
from manifests.validate import validate_dataset
from tests.datagen.helpers import load_json


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-weights")
    assert build_tiny_weights([str(out)]) == 0
    return out


@pytest.mark.slow
def test_tiny_pipeline_through_ray(tmp_path: Path, tiny_weights: Path, monkeypatch, ray_local):
    monkeypatch.setenv("LAYERDIFF_TINY_WEIGHTS", str(tiny_weights))
    cfg = load_config("pipelines/tiny.yaml", {"output": str(tmp_path / "out"), "samples_per_shard": 4})
    summary = run(cfg, engine="ray", progress=False)
    assert summary.shards_written == [0]
    manifest = load_json(tmp_path / "out" / "manifests" / "000000.json")
    assert manifest["samples"] + len(manifest["rejected"]) == 4
    assert manifest["samples"] >= 1, manifest["rejected"]
    stages = manifest["stages"]
    assert {s: stages[s]["backend"] for s in stages} == {
        "decode": "pil", "caption": "blip2", "ground": "groundingdino", "segment": "sam",
        "inpaint": "sd-inpaint", "assemble": "layers"}
    for stage in ("caption", "ground", "segment", "inpaint"):
        assert len(str(stages[stage]["checkpoint"])) > 0 and "sha256" in str(stages[stage]["checkpoint"])
    assert validate_dataset(tmp_path / "out").ok()


def test_tiny_pipeline_without_weights_names_the_missing_file(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LAYERDIFF_TINY_WEIGHTS", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"stages\.\w+\.params: .*nowhere"):
        load_config("pipelines/tiny.yaml", {"output": str(tmp_path / "out")})
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ray", "local"])
def test_stage_that_cannot_load_its_model_stops_the_run(tmp_path: Path, tiny_weights: Path, monkeypatch,
                                                         ray_local, engine):
    """A checkpoint that passes the file check but is the wrong model: the run stops with the cause."""
    monkeypatch.setenv("LAYERDIFF_TINY_WEIGHTS", str(tiny_weights))
    cfg = load_config("pipelines/tiny.yaml", {"output": str(tmp_path / "out"), "samples_per_shard": 2})
    cfg.stages["segment"].params.checkpoint = str(tiny_weights / "groundingdino" / "groundingdino_tiny.pth")
    with pytest.raises(PipelineError, match="(SamStage|segment).*could not.*SAM checkpoint"):
        run(cfg, engine=engine, progress=False)
    assert not list((tmp_path / "out" / "shards").glob("*.tar"))
