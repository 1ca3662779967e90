"""Fixtures for the generation tests: one thread, no denormals, one tiny model saved once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import LayerDiffModel
from tests.model.helpers import perturb_new_modules


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model, new modules perturbed so they act, saved with save_pretrained."""
    torch.manual_seed(0)
    model = LayerDiffModel.from_config_name("tiny")
    perturb_new_modules(model, scale=0.05)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pipe(model_dir: Path):  # noqa: ANN201
    from model.pipeline import LayerDiffPipeline

    torch.set_flush_denormal(True)
    return LayerDiffPipeline.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def latent_pipe(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """An sd15-layout model (VAE latents) with tiny random weights, at 32 px."""
    from model.pipeline import LayerDiffPipeline
    from tests.model.helpers import make_sd15_folder

    torch.set_flush_denormal(True)
    folder = make_sd15_folder(tmp_path_factory.mktemp("sd15"))
    model = LayerDiffModel.from_config_name("sd15", pretrained_path=str(folder), resolution=32)
    perturb_new_modules(model, scale=0.05)
    return LayerDiffPipeline(model)
