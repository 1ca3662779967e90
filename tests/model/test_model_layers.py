"""The (L, 3, H, W) layer layout: conversion from and to the dataset format's arrays, composites."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from datagen.format import compose_uint8
from model.layers import (
    arrays_to_layers,
    compose,
    fg_slot,
    layer_alphas,
    layers_to_arrays,
    mask_slot,
    present_vector,
    sample_to_layers,
    slot_prompt_index,
)
from model.layers import (
    compose_uint8 as compose_layers_uint8,
)


def _sample(k: int, size: int = 16, seed: int = 0) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    bg = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    fgs, masks = [], []
    for n in range(k):
        mask = np.zeros((size, size), np.uint8)
        mask[2 + n : 9 + n, 3 + 2 * n : 12] = 255
        fg = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) * (mask[..., None] > 0)
        fgs.append(fg.astype(np.uint8))
        masks.append(mask)
    return SimpleNamespace(background=bg, foregrounds=fgs, masks=masks)


def test_slot_layout() -> None:
    assert present_vector(2, 3).tolist() == [True, True, True, False, True, True, False]
    assert [fg_slot(n, 3) for n in range(3)] == [1, 2, 3]
    assert [mask_slot(n, 3) for n in range(3)] == [4, 5, 6]
    assert slot_prompt_index(3).tolist() == [0, 1, 2, 3, 1, 2, 3]  # a mask reads its foreground's prompt


def test_arrays_round_trip_with_padding() -> None:
    sample = _sample(2)
    layers, present = sample_to_layers(sample, max_layers=3)
    assert layers.shape == (7, 3, 16, 16) and present.tolist() == present_vector(2, 3).tolist()
    assert layers.min() >= -1 and layers.max() <= 1
    assert torch.all(layers[3] == 0) and torch.all(layers[6] == -1)  # absent fg / empty mask
    assert set(layers[4].unique().tolist()) == {-1.0, 1.0}
    bg, fgs, masks = layers_to_arrays(layers, present)
    np.testing.assert_array_equal(bg, sample.background)
    assert len(fgs) == len(masks) == 2
    for got, want in zip(fgs + masks, sample.foregrounds + sample.masks, strict=True):
        np.testing.assert_array_equal(got, want)


def test_layers_to_arrays_zeroes_fill_outside_mask() -> None:
    """The model may see colour outside a mask; arrays written back follow the format (0 outside)."""
    sample = _sample(1)
    filled = [np.full_like(sample.foregrounds[0], 200)]
    layers, present = arrays_to_layers(sample.background, filled, sample.masks, 3)
    _, (fg,), (mask,) = layers_to_arrays(layers, present)
    assert np.all(fg[mask == 0] == 0) and np.all(fg[mask > 0] == 200)


def test_compose_matches_dataset_composition() -> None:
    sample = _sample(3)
    layers, present = sample_to_layers(sample, 3)
    want = compose_uint8(sample.background, sample.foregrounds, sample.masks)
    got = compose_layers_uint8(layers, present)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    batched = compose(layers[None].repeat(2, 1, 1, 1, 1), present[None].repeat(2, 1))
    assert batched.shape == (2, 3, 16, 16)


def test_absent_layers_do_not_composite() -> None:
    sample = _sample(1)
    layers, present = sample_to_layers(sample, 3)
    layers[2] = 1.0  # garbage in an absent foreground slot ...
    layers[5] = 1.0  # ... and a full mask in its absent mask slot
    alphas = layer_alphas(layers, present)
    assert torch.all(alphas[1:] == 0)
    np.testing.assert_array_equal(compose_layers_uint8(layers, present),
                                  compose_uint8(sample.background, sample.foregrounds, sample.masks))
