"""Fixtures for pipeline tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module (starting it costs ~10 s on 2 cores)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
