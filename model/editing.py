"""Layer-specific editing on top of ``ddim_sample`` step hooks.

- **Regenerate** one layer with a new prompt (RePaint-style): at every step the x0 estimate of the
  known slots is replaced by their clean values, so DDIM re-noises them from the clean values with
  the noise implied by x_t (deterministic RePaint: no resampling jumps, no fresh noise), while the
  edited slots are denoised freely, seeing the known layers through inter-layer attention.
- **Restyle** one layer (SDEdit-style): every slot is pinned to its clean value for the first
  ``(1 - strength)`` of the steps, so at the switch the edited slot is its clean value noised to
  that step's level; from there on it is denoised under the style prompt while the others stay
  pinned. (The pinned early steps still run the UNet: ``ddim_sample`` has no start step.)

Known slots are copied bit for bit into the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.layers import fg_slot, mask_slot
from model.modeling.layerdiff import LayerDiffModel
from model.sampling import SamplerStep


def layer_slots(layer: int | str, max_layers: int, with_mask: bool = True) -> list[int]:
    """Slots of ``layer``: "bg"/"background"/-1 -> [0]; n -> [fg slot n] (+ its mask slot)."""
    if layer in ("bg", "background", -1):
        return [0]
    n = int(layer)
    if not 0 <= n < max_layers:
        raise ValueError(f"layer {layer!r}: expected 'bg' or 0..{max_layers - 1}")
    return [fg_slot(n, max_layers)] + ([mask_slot(n, max_layers)] if with_mask else [])


def edit_mask(num_slots: int, slots: Sequence[int], batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, L) bool: True for the slots that are regenerated."""
    edit = torch.zeros(batch, num_slots, dtype=torch.bool, device=device)
    edit[:, list(slots)] = True
    return edit


class KnownLayers:
    """Step hook pinning the x0 of the known slots (``~edit``) to ``clean`` latents.

    ``free_from``: the step index from which the edited slots are free (0: regenerate; > 0: the
    SDEdit start of a restyle); before it every slot is pinned.
    """

    def __init__(self, clean: torch.Tensor, edit: torch.Tensor, free_from: int = 0) -> None:
        self.clean = clean.float()
        self.edit = edit
        self.free_from = free_from

    def __call__(self, step: SamplerStep) -> torch.Tensor:
        clean = self.clean.to(step.x0.device)
        if step.index < self.free_from:
            return clean.clone()
        edit = self.edit.to(step.x0.device)[..., None, None, None]
        return torch.where(edit, step.x0, clean)


def sdedit_start(num_steps: int, strength: float) -> int:
    """The step index where a restyle of ``strength`` (0: none, 1: from pure noise) starts."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return min(num_steps - 1, max(0, round((1.0 - strength) * num_steps)))


def encode_known(model: LayerDiffModel, layers: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Clean (B, L, 3, H, W) pixel layers -> latents (the VAE mean in latent configs)."""
    if model.vae is None:
        return model.encode_layers(layers, present).float()
    generator = torch.Generator(device=model.device).manual_seed(0)  # latent configs: a fixed draw
    return model.encode_layers(layers, present, generator=generator).float()


def paste_known(generated: torch.Tensor, clean: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
    """The output: generated pixels in the edited slots, the given clean pixels elsewhere (bit-exact)."""
    return torch.where(edit.to(generated.device)[..., None, None, None], generated, clean.to(generated))
