"""``python -m model.info``: the architecture summary and parameter counts."""

from __future__ import annotations

import json

import pytest

from model.info import build_for_info, main, summarize


def test_tiny_summary_prints(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--config", "tiny"])
    text = capsys.readouterr().out
    assert "inter-layer attention" in text and "prompt enhancer" in text and "total" in text
    main(["--config", "tiny", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["slots"] == ["background", "fg0", "fg1", "fg2", "mask0", "mask1", "mask2"]
    assert 1_000_000 < info["total_params"] < 2_500_000  # "~1.5M parameters"


def test_sd15_counts_match_published_component_sizes() -> None:
    """Built on the meta device from SD 1.5's configs: the base components have their known sizes."""
    info = summarize(build_for_info("sd15"))
    params = info["parameters"]
    assert params["unet (base)"]["params"] == 859_520_964
    assert params["text encoder"]["params"] == 123_060_480 and params["text encoder"]["trainable"] == 0
    assert params["vae"]["params"] == 83_653_863
    assert info["transformer_blocks"] == 16 and info["latent_shape"] == [4, 64, 64]


def test_sd15_from_a_folder(sd15_folder) -> None:
    info = summarize(build_for_info("sd15", str(sd15_folder)))
    assert info["parameters"]["unet (base)"]["params"] < 1_000_000
