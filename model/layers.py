"""The layer layout shared by the model, the training data and the sampler.

A composable image with K foregrounds becomes L = 1 + 2 * K_max slots, in this order:
``0`` background, ``1 .. K_max`` foregrounds 0..K_max-1 (back to front), ``K_max+1 .. 2*K_max``
masks 0..K_max-1. Pixel values are in [-1, 1]; a mask slot holds the mask on all three channels
(-1 transparent, +1 opaque, soft values between: alpha = (m + 1) / 2). ``present`` marks the slots a sample uses (background always; foreground
n and mask n iff n < K). Composites always go through :func:`datagen.format.compose_layers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from datagen.format import compose_layers

ROLE_BACKGROUND, ROLE_FOREGROUND, ROLE_MASK = 0, 1, 2
NUM_ROLES = 3


def num_slots(max_layers: int) -> int:
    return 1 + 2 * max_layers


def fg_slot(n: int, max_layers: int) -> int:
    """Slot of foreground n (0 = back-most)."""
    return 1 + n


def mask_slot(n: int, max_layers: int) -> int:
    """Slot of the mask of foreground n."""
    return 1 + max_layers + n


def slot_roles(max_layers: int) -> torch.Tensor:
    """(L,) role of each slot: background, foreground or mask."""
    return torch.tensor([ROLE_BACKGROUND] + [ROLE_FOREGROUND] * max_layers + [ROLE_MASK] * max_layers)


def slot_depths(max_layers: int) -> torch.Tensor:
    """(L,) depth of each slot: 0 for the background, n + 1 for foreground n and its mask."""
    fg = list(range(1, max_layers + 1))
    return torch.tensor([0] + fg + fg)


def slot_prompt_index(max_layers: int) -> torch.Tensor:
    """(L,) which layer prompt each slot reads: 0 background, n + 1 foreground n (a mask shares it)."""
    return slot_depths(max_layers)


def present_vector(num_foregrounds: int, max_layers: int) -> torch.Tensor:
    """(L,) bool: the slots used by a sample with ``num_foregrounds`` foregrounds."""
    if not 0 <= num_foregrounds <= max_layers:
        raise ValueError(f"{num_foregrounds} foregrounds, expected 0..{max_layers}")
    present = torch.zeros(num_slots(max_layers), dtype=torch.bool)
    present[0] = True
    present[1 : 1 + num_foregrounds] = True
    present[1 + max_layers : 1 + max_layers + num_foregrounds] = True
    return present


def num_foregrounds(present: torch.Tensor, max_layers: int) -> torch.Tensor:
    """Number of present foregrounds per sample, from a (..., L) present tensor."""
    return present[..., 1 : 1 + max_layers].sum(-1)


def _to_unit(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> uint8 (H, W, 3)."""
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round()
    return pixels.to(torch.uint8).permute(1, 2, 0).numpy()


def arrays_to_layers(background: np.ndarray, foregrounds: Sequence[np.ndarray],
                     masks: Sequence[np.ndarray], max_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit layers (bg (H, W, 3), fgs (H, W, 3), masks (H, W) 8-bit alphas) -> ((L, 3, H, W), present (L,)).

    Foregrounds are taken as given (whatever fill they carry outside their masks); masks keep their
    soft values (alpha 0..255 -> -1..1); absent slots are zero for foregrounds and -1 (empty) for masks.
    """
    if len(foregrounds) != len(masks):
        raise ValueError(f"{len(foregrounds)} foregrounds but {len(masks)} masks")
    k = len(foregrounds)
    present = present_vector(k, max_layers)
    h, w = background.shape[:2]
    layers = torch.zeros(num_slots(max_layers), 3, h, w)
    layers[1 + max_layers :] = -1.0
    layers[0] = _to_unit(background)
    for n, (fg, mask) in enumerate(zip(foregrounds, masks)):
        layers[fg_slot(n, max_layers)] = _to_unit(fg)
        alpha = torch.from_numpy(np.asarray(mask, np.float32) / 127.5 - 1.0)
        layers[mask_slot(n, max_layers)] = alpha.expand(3, h, w)
    return layers, present


def sample_to_layers(sample: Any, max_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A :class:`datagen.format.LayerSample` (or anything with background/foregrounds/masks)."""
    return arrays_to_layers(sample.background, sample.foregrounds, sample.masks, max_layers)


def layers_to_arrays(layers: torch.Tensor, present: torch.Tensor, zero_outside: bool = True
                     ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(L, 3, H, W) + present (L,) -> (bg uint8, [fg uint8], [8-bit alpha]), format-conforming.

    A mask's alpha is its channel mean mapped from [-1, 1] to 0..255, soft values kept (no
    binarisation); with ``zero_outside`` each foreground is set to 0 where its alpha is 0, as the
    dataset format requires.
    """
    max_layers = (layers.shape[0] - 1) // 2
    background = _to_uint8(layers[0])
    fgs, masks = [], []
    for n in range(int(num_foregrounds(present, max_layers))):
        m = layers[mask_slot(n, max_layers)].detach().float().mean(0).cpu().clamp(-1, 1)
        alpha = ((m + 1.0) * 127.5).round().to(torch.uint8).numpy()
        fg = _to_uint8(layers[fg_slot(n, max_layers)])
        if zero_outside:
            fg = np.where(alpha[..., None] > 0, fg, 0).astype(np.uint8)
        fgs.append(fg)
        masks.append(alpha)
    return background, fgs, masks


def layer_alphas(layers: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(..., L, 3, H, W) -> (..., K_max, 1, H, W) alphas in [0, 1] from the mask slots (0 if absent)."""
    max_layers = (layers.shape[-4] - 1) // 2
    masks = layers[..., 1 + max_layers :, :, :, :].mean(-3, keepdim=True)
    alpha = ((masks + 1.0) / 2.0).clamp(0.0, 1.0)
    keep = present[..., 1 + max_layers :].to(alpha.dtype)
    return alpha * keep[..., None, None, None]


def compose(layers: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Composite (..., L, 3, H, W) layers back to front -> (..., 3, H, W), with the format's function."""
    max_layers = (layers.shape[-4] - 1) // 2
    alphas = layer_alphas(layers, present)
    fgs = [layers[..., fg_slot(n, max_layers), :, :, :] for n in range(max_layers)]
    return compose_layers(layers[..., 0, :, :, :], fgs, [alphas[..., n, :, :, :] for n in range(max_layers)])


def compose_uint8(layers: torch.Tensor, present: torch.Tensor) -> np.ndarray:
    """Composite one sample's (L, 3, H, W) layers into an 8-bit (H, W, 3) image (soft alphas),
    exactly as the 8-bit layers :func:`layers_to_arrays` gives compose."""
    from datagen.format import compose_uint8 as compose_arrays

    return compose_arrays(*layers_to_arrays(layers, present, zero_outside=False))

