"""DDIM sampling of layered images with classifier-free guidance (kept apart from the modeling code).

:func:`ddim_sample` runs deterministic DDIM (eta = 0 by default) on trailing timesteps, which start
at the last training step t = T - 1 (pure noise under a zero-terminal-SNR schedule), so sampling
begins exactly where training's noisiest examples are. Each step forms the x0 estimate, offers it to an
optional ``step_hook`` (where self-mask guidance plugs in), then takes the DDIM update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from model.modeling.layerdiff import LayerDiffModel


@dataclass
class SamplerStep:
    """What a ``step_hook`` sees at one DDIM step (latent space; (B, L, C, h, w) tensors).

    ``x0`` and ``eps`` are the guided estimates; ``output_cond`` / ``output_uncond`` the raw UNet outputs
    of the two CFG branches (``output_uncond`` is None when guidance is off). The hook may return a
    replacement for ``x0`` (or None to keep it); eps is then re-derived from x_t and the new x0.
    """

    index: int  # 0 .. num_steps - 1
    timestep: int
    alpha: float  # alpha_bar at this step
    alpha_prev: float  # alpha_bar the step lands on
    sample: torch.Tensor  # x_t
    x0: torch.Tensor
    eps: torch.Tensor
    output_cond: torch.Tensor
    output_uncond: torch.Tensor | None
    present: torch.Tensor  # (B, L) bool
    guidance_scale: float


StepHook = Callable[[SamplerStep], "torch.Tensor | None"]


def trailing_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """Evenly spaced timesteps that end at T - 1 ("trailing" spacing, Lin et al. 2023), descending."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    ratio = num_train_timesteps / num_steps
    return [int(round(num_train_timesteps - i * ratio)) - 1 for i in range(num_steps)]


@torch.no_grad()
def ddim_sample(model: LayerDiffModel, prompt: Sequence[str], layer_prompts: Sequence[Sequence[str]],
                present: torch.Tensor, num_steps: int | None = None, guidance_scale: float = 1.0,
                generator: torch.Generator | None = None, *, eta: float = 0.0, clip_sample: bool | None = None,
                step_hook: StepHook | None = None, output_type: str = "pixels",
                negative_prompt: Sequence[str] | None = None,
                negative_layer_prompts: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
    """Sample layers for B prompts -> (B, L, 3, H, W) pixels in [-1, 1] (decoded through the VAE).

    ``present`` (B, L) chooses each sample's number of foregrounds; absent slots come back as -1
    (a black foreground, an empty mask), so compositing all K_max layers gives the right image.
    ``guidance_scale`` 1 runs only the conditional branch; otherwise the unconditional branch uses
    empty global and layer prompts, or ``negative_prompt`` / ``negative_layer_prompts`` where given
    (diffusers' negative prompts: guidance then pushes away from them rather than from no prompt).
    ``clip_sample`` (default: on in pixel space) clamps x0 to each slot's range
    (:meth:`LayerDiffModel.clip_x0`).
    ``output_type="latents"`` returns the final latents instead of pixels.
    """
    config = model.config
    num_steps = num_steps or config.num_inference_steps
    if clip_sample is None:
        clip_sample = config.pixel_space
    device, dtype = model.device, model.dtype
    present = present.to(device=device, dtype=torch.bool)
    b, num_slots = present.shape
    if num_slots != config.num_slots or len(prompt) != b:
        raise ValueError(f"present must be ({len(prompt)}, {config.num_slots}), got {tuple(present.shape)}")
    keep = present[..., None, None, None]

    guided = guidance_scale != 1.0
    context = model.encode_prompts(prompt, layer_prompts)
    if guided:
        empty = [""] * (1 + config.max_layers)
        neg_prompt = list(negative_prompt) if negative_prompt is not None else [""] * b
        neg_layers = list(negative_layer_prompts) if negative_layer_prompts is not None else [empty] * b
        if len(neg_prompt) != b or len(neg_layers) != b:
            raise ValueError(f"negative prompts must be given for all {b} samples")
        context = torch.cat([context, model.encode_prompts(neg_prompt, neg_layers)])
        present_2 = torch.cat([present, present])

    rand_device = generator.device if generator is not None else device
    shape = (b, num_slots, *model.latent_shape)
    x = torch.randn(shape, generator=generator, device=rand_device, dtype=torch.float32).to(device)
    x = torch.where(keep, x, torch.zeros_like(x))
    alphas = model.alphas_cumprod.double().cpu()
    timesteps = trailing_timesteps(config.num_train_timesteps, num_steps)

    for i, t in enumerate(timesteps):
        a = float(alphas[t])
        a_prev = float(alphas[timesteps[i + 1]]) if i + 1 < num_steps else 1.0
        t_batch = torch.full((b,), t, device=device, dtype=torch.long)
        if guided:
            out = model.predict(torch.cat([x, x]).to(dtype), torch.cat([t_batch, t_batch]), context,
                                present_2).float()
            out_cond, out_uncond = out.chunk(2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        else:
            out_cond = out = model.predict(x.to(dtype), t_batch, context, present).float()
            out_uncond = None
        alpha = torch.tensor(a, device=device)
        x0, eps = model.predict_x0_eps(x, out, alpha)
        new_x0 = None
        if step_hook is not None:
            new_x0 = step_hook(SamplerStep(i, t, a, a_prev, x, x0, eps, out_cond, out_uncond, present,
                                           guidance_scale))
        if new_x0 is not None:
            x0 = new_x0.float()
        if clip_sample:
            x0 = model.clip_x0(x0)
        if new_x0 is not None or clip_sample:
            eps = (x - a**0.5 * x0) / (1.0 - a) ** 0.5  # the noise direction consistent with x_t and x0
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5 if eta > 0 else 0.0
        x = a_prev**0.5 * x0 + max(1.0 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * torch.randn(shape, generator=generator, device=rand_device).to(device)
        x = torch.where(keep, x, torch.zeros_like(x))

    if output_type == "latents":
        return x
    pixels = model.decode_layers(x.to(dtype), present).float().clamp(-1.0, 1.0)
    return torch.where(keep, pixels, torch.full_like(pixels, -1.0))
