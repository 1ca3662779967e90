"""Fixtures for the training tests (shard writers in tests/train/shards.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.train.shards import write_dataset


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards of six 32 px samples with 1-2 rectangles each, with a manifest.json."""
    return write_dataset(tmp_path_factory.mktemp("layered"))


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
