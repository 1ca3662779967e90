"""Fixtures for the model tests: one thread, no denormals, small models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import LayerDiffModel
from tests.model.helpers import make_sd15_folder, perturb_new_modules


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # random weights make denormals, 10x slower on CPU


@pytest.fixture()
def tiny_model() -> LayerDiffModel:
    """A fresh tiny model (new modules at their zero initialisation)."""
    torch.manual_seed(0)
    return LayerDiffModel.from_config_name("tiny")


@pytest.fixture()
def active_model(tiny_model: LayerDiffModel) -> LayerDiffModel:
    """The tiny model with its new modules perturbed away from zero, so they act."""
    perturb_new_modules(tiny_model, scale=0.05)
    return tiny_model


@pytest.fixture(scope="session")
def sd15_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SD 1.5-layout diffusers folder with tiny random weights."""
    return make_sd15_folder(tmp_path_factory.mktemp("sd15"))
