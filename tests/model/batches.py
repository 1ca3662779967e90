"""Synthetic training batches for the model tests."""

from __future__ import annotations

import torch

from model.layers import present_vector

MAX_LAYERS = 3


def make_batch(ks: list[int], resolution: int = 32, seed: int = 0) -> dict:
    """A training batch with K = ks[i] foregrounds in sample i; absent slots hold the padding values."""
    gen = torch.Generator().manual_seed(seed)
    present = torch.stack([present_vector(k, MAX_LAYERS) for k in ks])
    layers = torch.rand(len(ks), 1 + 2 * MAX_LAYERS, 3, resolution, resolution, generator=gen) * 2 - 1
    masks = torch.where(layers[:, 1 + MAX_LAYERS:, :1] > 0, 1.0, -1.0).expand(-1, -1, 3, -1, -1)
    layers[:, 1 + MAX_LAYERS:] = masks
    layers = torch.where(present[..., None, None, None], layers, torch.zeros_like(layers))
    colours = ["red", "green", "blue"]
    prompts = [" and ".join(f"a {colours[n]} circle" for n in range(k)) + " on a gray background" for k in ks]
    layer_prompts = [["a gray background"] + [f"a {colours[n]} circle" for n in range(k)] + [""] * (MAX_LAYERS - k)
                     for k in ks]
    return {"layers": layers, "present": present, "prompt": prompts, "layer_prompts": layer_prompts}
