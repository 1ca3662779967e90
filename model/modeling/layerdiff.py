"""LayerDiffModel: text encoder + prompt enhancer + layered UNet (+ VAE), its loss and its I/O."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, Transformer2DModel, UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D
from torch import nn
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from model.configuration import LayerDiffConfig, get_config, unet_in_channels
from model.layers import (
    compose,
    corrupt_masks,
    distance_to_masks,
    masks_to_distance,
    slot_prompt_index,
    slot_roles,
)
from model.modeling.layer_attention import LayerAdapter, LayeredUNet
from model.modeling.prompt_enhancer import PromptEnhancer
from model.modeling.text import build_text_encoder, build_word_tokenizer

SUBFOLDERS = ("unet", "layer_adapter", "prompt_enhancer", "text_encoder", "tokenizer", "vae", "scheduler")


def make_noise_scheduler(config: LayerDiffConfig) -> DDPMScheduler:
    """The training noise schedule, as a diffusers scheduler (its config is what gets saved)."""
    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         beta_start=config.beta_start, beta_end=config.beta_end,
                         prediction_type=config.prediction_type,
                         rescale_betas_zero_snr=config.zero_terminal_snr, clip_sample=False,
                         timestep_spacing="trailing")


class LayerDiffModel(nn.Module):
    """LayerDiff on a diffusers UNet: layers (B, L, 3, H, W) in [-1, 1] <-> prompts.

    Build with :meth:`from_config_name` ("tiny" or "sd15") or :meth:`from_pretrained`; train with
    ``model(batch)`` (= :meth:`training_loss`, the form DDP wrappers need); sample with
    :func:`model.sampling.ddim_sample`.
    """

    def __init__(self, config: LayerDiffConfig, unet: UNet2DConditionModel, adapter: LayerAdapter,
                 prompt_enhancer: PromptEnhancer, text_encoder: CLIPTextModel, tokenizer: Any,
                 vae: AutoencoderKL | None = None):
        super().__init__()
        if config.pixel_space != (vae is None):
            raise ValueError("a pixel-space config takes no VAE; a latent config needs one")
        if adapter.config.max_layers != config.max_layers:
            raise ValueError(f"adapter max_layers {adapter.config.max_layers} != config {config.max_layers}")
        self.config = config
        self.unet = LayeredUNet(unet, adapter, config.patch_size, config.coord_channels)
        self.prompt_enhancer = prompt_enhancer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.noise_scheduler = make_noise_scheduler(config)
        # Not a buffer: model.half() must not round alpha_bar (0.9991 and 0.9996 are one fp16 step apart).
        self._alphas_cumprod = torch.as_tensor(self.noise_scheduler.alphas_cumprod, dtype=torch.float64)
        self.register_buffer("slot_prompt_index", slot_prompt_index(config.max_layers), persistent=False)
        self._check_shapes()
        if vae is not None:
            vae.requires_grad_(False)
        text_encoder.requires_grad_(config.train_text_encoder)
        unet.requires_grad_(config.train_unet)
        self.train(False)

    # ------------------------------------------------------------------ construction and I/O

    @classmethod
    def from_config_name(cls, name: str, **overrides: Any) -> LayerDiffModel:
        """A new model from the preset ``name`` ("tiny" or "sd15") with config ``overrides``;
        sd15 takes ``pretrained_path=`` (a local diffusers SD 1.5 folder, read offline)."""
        return cls.from_config(get_config(name, **overrides))

    @classmethod
    def from_config(cls, config: LayerDiffConfig, device: str | torch.device | None = None) -> LayerDiffModel:
        """Base components from ``config.pretrained_path`` if set, else built from the config's
        architecture dicts with random weights; new modules zero-initialised. ``device="meta"`` builds
        weightless (for parameter counts of an sd15 model without a checkpoint)."""
        meta = device is not None and torch.device(device).type == "meta"
        if config.tokenizer_type == "clip" and not config.pretrained_path and not meta:
            raise ValueError(f"config {config.name!r} uses the CLIP tokenizer: give pretrained_path")
        ctx = torch.device("meta") if meta else contextlib.nullcontext()
        path = config.pretrained_path
        with ctx:
            if path:
                kw = {"local_files_only": True}
                dkw = {**kw, "low_cpu_mem_usage": False}  # no accelerate in the environment
                unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **dkw)
                text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
                tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
                vae = None if config.pixel_space else AutoencoderKL.from_pretrained(path, subfolder="vae", **dkw)
            else:
                unet = UNet2DConditionModel(**config.unet)
                if config.zero_init_residuals:
                    zero_init_residuals(unet)
                vae = None if config.pixel_space else AutoencoderKL(**config.vae)
                if config.tokenizer_type == "words":
                    tokenizer = build_word_tokenizer(config.max_text_length)
                    text_encoder = build_text_encoder(tokenizer, config.max_text_length, **config.text_encoder)
                else:  # meta only: the real CLIP vocabulary is needed to tokenise, not to count
                    tokenizer = None
                    text_encoder = CLIPTextModel(CLIPTextConfig(**config.text_encoder))
            adapter = LayerAdapter.for_unet(unet, config.max_layers, config.inter_layer_heads,
                                            config.inter_layer_ff_mult)
            enhancer = PromptEnhancer(dim=text_encoder.config.hidden_size, num_layers=config.enhancer_layers,
                                      num_heads=config.enhancer_heads, ff_mult=config.enhancer_ff_mult)
            return cls(config, unet, adapter, enhancer, text_encoder, tokenizer, vae)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write every component to its subfolder (diffusers / transformers formats) + the config."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory)
        self.unet.unet.save_pretrained(directory / "unet")
        self.unet.adapter.save_pretrained(directory / "layer_adapter")
        self.prompt_enhancer.save_pretrained(directory / "prompt_enhancer")
        self.text_encoder.save_pretrained(directory / "text_encoder")
        self.tokenizer.save_pretrained(directory / "tokenizer")
        if self.vae is not None:
            self.vae.save_pretrained(directory / "vae")
        self.noise_scheduler.save_pretrained(directory / "scheduler")  # derived from the config
        index = {"_class_name": type(self).__name__, "components": [s for s in SUBFOLDERS
                                                                    if (directory / s).is_dir()]}
        (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, torch_dtype: torch.dtype | None = None) -> LayerDiffModel:
        """Load a folder written by :meth:`save_pretrained` (offline)."""
        directory = Path(directory)
        config = LayerDiffConfig.load(directory)
        kw: dict[str, Any] = {"local_files_only": True}
        dkw = {**kw, "low_cpu_mem_usage": False}  # no accelerate in the environment
        if torch_dtype is not None:  # diffusers says torch_dtype, transformers 4.57 dtype
            kw["dtype"] = dkw["torch_dtype"] = torch_dtype
        unet = UNet2DConditionModel.from_pretrained(directory / "unet", **dkw)
        adapter = LayerAdapter.from_pretrained(directory / "layer_adapter", **dkw)
        enhancer = PromptEnhancer.from_pretrained(directory / "prompt_enhancer", **dkw)
        text_encoder = CLIPTextModel.from_pretrained(directory / "text_encoder", **kw)
        tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer", local_files_only=True)
        vae = None if config.pixel_space else AutoencoderKL.from_pretrained(directory / "vae", **dkw)
        return cls(config, unet, adapter, enhancer, text_encoder, tokenizer, vae)

    def _check_shapes(self) -> None:
        unet_cfg = self.unet.unet.config
        if unet_cfg.cross_attention_dim != self.text_encoder.config.hidden_size:
            raise ValueError(f"UNet cross_attention_dim {unet_cfg.cross_attention_dim} != text encoder "
                             f"hidden size {self.text_encoder.config.hidden_size}")
        p = self.config.patch_size
        channels, size = self.latent_shape[0] * p * p, self.latent_shape[1]
        inputs = unet_in_channels(self.config, channels)
        if unet_cfg.in_channels != inputs or unet_cfg.out_channels != channels:
            extra = (", x2 in for self-conditioning" if self.config.self_conditioning else "") + (
                ", + 2 coordinate channels in" if self.config.coord_channels else "")
            raise ValueError(f"UNet channels {unet_cfg.in_channels}/{unet_cfg.out_channels} != {inputs}/{channels} "
                             f"(latent channels x patch_size^2{extra})")
        down = p * 2 ** (len(unet_cfg.block_out_channels) - 1)
        if size % down:
            raise ValueError(f"latent size {size} is not a multiple of the UNet's {down}x downsampling")

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return self.slot_prompt_index.device

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar(t) for t = 0 .. T-1 (float64, CPU)."""
        return self._alphas_cumprod

    @property
    def dtype(self) -> torch.dtype:
        # The first parameter's dtype: diffusers' ModelMixin.dtype walks every submodule (~2 ms a call
        # on the tiny UNet, several calls a training step).
        return next(self.unet.unet.parameters()).dtype

    @property
    def num_slots(self) -> int:
        return self.config.num_slots

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent layer."""
        size = self.config.resolution // self.vae_scale_factor
        channels = 3 if self.vae is None else self.vae.config.latent_channels
        return channels, size, size

    def slot_scale(self, ndim: int = 5) -> torch.Tensor:
        """Each slot's input scale (``role_input_scale`` by role), shaped (1, L, 1, ...) for ``ndim``-d
        latents: a latent is the VAE latent or the [-1, 1] image times it, so it is also the range
        that a pixel-space x0 is clipped to."""
        scale = torch.tensor(self.config.role_input_scale, dtype=torch.float32)[slot_roles(self.config.max_layers)]
        return scale.reshape(1, -1, *([1] * (ndim - 2))).to(self.device)

    def clip_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """An x0 estimate clipped to each slot's latent range ([-1, 1] times its input scale)."""
        bound = self.slot_scale(x0.ndim).to(x0.dtype)
        return torch.maximum(torch.minimum(x0, bound), -bound)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> LayerDiffModel:
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # frozen components stay in eval mode
        if not self.config.train_text_encoder:
            self.text_encoder.eval()
        return self

    # ------------------------------------------------------------------ text

    def _encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N,) strings -> (N, T, D) token embeddings; identical strings are encoded once."""
        unique = list(dict.fromkeys(texts))
        ids = self.tokenizer(unique, padding="max_length", max_length=self.config.max_text_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        grad = self.config.train_text_encoder and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            hidden = self.text_encoder(ids)[0]
        where = {text: i for i, text in enumerate(unique)}
        return hidden[torch.tensor([where[t] for t in texts], device=hidden.device)]

    def encode_prompts(self, prompt: Sequence[str], layer_prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        """Global prompts (B,) and layer prompts (B, 1 + K_max) -> cross-attention context (B, L, T, D).

        Each layer prompt is enhanced with its sample's global prompt; slot l reads the prompt of its
        layer (a mask shares its foreground's prompt).
        """
        b, p = len(prompt), 1 + self.config.max_layers
        if len(layer_prompts) != b or any(len(lp) != p for lp in layer_prompts):
            raise ValueError(f"layer_prompts must be {b} lists of {p} strings (background + K_max foregrounds)")
        hidden = self._encode_texts(list(prompt) + [s for lp in layer_prompts for s in lp])
        global_tokens = hidden[:b]
        layer_tokens = hidden[b:].reshape(b, p, *hidden.shape[1:])
        layer_tokens = self.prompt_enhancer(layer_tokens, global_tokens)
        return layer_tokens[:, self.slot_prompt_index].to(self.dtype)

    # ------------------------------------------------------------------ pixels <-> latents

    def encode_layers(self, pixels: torch.Tensor, present: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, L, 3, H, W) in [-1, 1] -> (B, L, C, h, w) latents; absent slots are zero."""
        pixels = pixels.to(self.device, self.dtype)
        scale = self.slot_scale(pixels.ndim).to(self.dtype)
        if self.vae is None:
            if self.config.mask_encoding == "distance":
                pixels = self._map_masks(pixels, masks_to_distance)
            return pixels * present.to(self.device)[..., None, None, None].to(pixels.dtype) * scale
        index = present.to(self.device).reshape(-1).nonzero().squeeze(1)
        flat = pixels.reshape(-1, *pixels.shape[2:]).index_select(0, index)
        with torch.no_grad():
            dist = self.vae.encode(flat.to(self.vae.dtype)).latent_dist
            z = dist.sample(generator)
        z = (z - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor
        out = z.new_zeros((pixels.shape[0] * pixels.shape[1], *z.shape[1:])).index_copy(0, index, z)
        return out.reshape(*pixels.shape[:2], *z.shape[1:]).to(self.dtype) * scale

    def _map_masks(self, layers: torch.Tensor, fn: Any) -> torch.Tensor:
        """``layers`` with ``fn(mask slots, mask_distance_width)`` in place of its mask slots."""
        k = self.config.max_layers
        return torch.cat([layers[:, : 1 + k], fn(layers[:, 1 + k:], self.config.mask_distance_width)], dim=1)

    def decode_layers(self, latents: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, L, C, h, w) latents -> (B, L, 3, H, W) pixels (unclamped; differentiable); absent = 0."""
        latents = latents / self.slot_scale(latents.ndim).to(latents.dtype)
        if self.vae is None:
            if self.config.mask_encoding == "distance":
                latents = self._map_masks(latents, distance_to_masks)
            return latents * present.to(latents.device)[..., None, None, None].to(latents.dtype)
        index = present.to(latents.device).reshape(-1).nonzero().squeeze(1)
        z = latents.reshape(-1, *latents.shape[2:]).index_select(0, index)
        z = z / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        x = self.vae.decode(z.to(self.vae.dtype)).sample
        out = x.new_zeros((latents.shape[0] * latents.shape[1], *x.shape[1:])).index_copy(0, index, x)
        return out.reshape(*latents.shape[:2], *x.shape[1:])

    # ------------------------------------------------------------------ diffusion

    def _alpha(self, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
        """alpha_bar at ``timesteps`` as float32, shaped to broadcast against an ``ndim`` tensor."""
        a = self._alphas_cumprod[timesteps.cpu()].to(device=timesteps.device, dtype=torch.float32)
        return a.reshape(-1, *([1] * (ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a = self._alpha(timesteps, x0.ndim).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to output: v = sqrt(a) eps - sqrt(1 - a) x0, eps, or x0 ("sample")."""
        if self.config.prediction_type == "epsilon":
            return noise
        if self.config.prediction_type == "sample":
            return x0
        a = self._alpha(timesteps, x0.ndim).to(x0.dtype)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def predict_x0_eps(self, x_t: torch.Tensor, model_output: torch.Tensor, alpha: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) estimates from the UNet output; ``alpha`` broadcasts against x_t."""
        sa, s1a = alpha.sqrt(), (1 - alpha).sqrt()
        if self.config.prediction_type == "epsilon":
            eps = model_output
            return (x_t - s1a * eps) / sa.clamp_min(1e-4), eps
        if self.config.prediction_type == "sample":
            x0 = self.logits_to_x0(model_output) if self.config.mask_logits else model_output
            return x0, (x_t - sa * x0) / s1a.clamp_min(1e-4)
        return sa * x_t - s1a * model_output, s1a * x_t + sa * model_output

    def logits_to_x0(self, model_output: torch.Tensor) -> torch.Tensor:
        """A ``mask_logits`` model's output with each mask slot's logits l as x0: scale * tanh(l / 2)."""
        k = self.config.max_layers
        masks = torch.tanh(model_output[:, 1 + k:] / 2) * self.slot_scale(model_output.ndim)[:, 1 + k:]
        return torch.cat([model_output[:, : 1 + k], masks.to(model_output.dtype)], dim=1)

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor | int, context: torch.Tensor,
                present: torch.Tensor, x0_prev: torch.Tensor | None = None) -> torch.Tensor:
        """The layered UNet's raw output (v, eps or x0: ``prediction_type``) for noisy latents (B, L, C, h, w).

        ``x0_prev``: the previous x0 estimate, for a self-conditioned model (None: zeros, "no estimate").
        """
        if self.config.self_conditioning:
            x_t = torch.cat([x_t, torch.zeros_like(x_t) if x0_prev is None else x0_prev.to(x_t)], dim=2)
        return self.unet(x_t.to(self.dtype), timesteps, context, present)

    def self_condition(self, x_t: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                       present: torch.Tensor) -> torch.Tensor:
        """A self-conditioned model's first x0 estimate (no gradient), to feed back as ``x0_prev``."""
        with torch.no_grad():
            out = self.predict(x_t, timesteps, context, present).float()
            x0, _ = self.predict_x0_eps(x_t.float(), out, self._alpha(timesteps, x_t.ndim))
        return self.clip_x0(x0) if self.config.pixel_space else x0

    def training_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None
                      ) -> dict[str, torch.Tensor]:
        """Diffusion loss over the present layers of a training batch (see model/README.md).

        Returns ``loss`` (scalar, differentiable) and detached diagnostics: ``loss_diffusion``,
        ``loss_bg`` / ``loss_fg`` / ``loss_mask`` (per-role MSE; the masks' cross-entropy with ``mask_logits``), ``loss_composite`` and
        ``loss_binarity`` when used.
        """
        present = batch["present"].to(self.device, torch.bool)
        _check_present(present, self.config.max_layers)
        x0 = self.encode_layers(batch["layers"], present, generator)
        b = x0.shape[0]
        gen_device = generator.device if generator is not None else self.device
        t = self._sample_timesteps(b, generator, gen_device)
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype)
        t, noise = t.to(self.device), noise.to(self.device)
        noise_in = noise  # the target below keeps the unperturbed noise
        if self.config.input_perturbation > 0:
            extra = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(self.device)
            noise_in = noise + self.config.input_perturbation * extra
        x_t = self.add_noise(self._corrupted_x0(batch["layers"], x0, present, t, generator, gen_device), noise_in, t)
        context = self.encode_prompts(batch["prompt"], batch["layer_prompts"])
        x0_prev = None
        if self.config.self_conditioning:  # half of the batches see the model's own first estimate
            coin = torch.rand((), generator=generator, device=gen_device)
            if float(coin) < 0.5:
                x0_prev = self.self_condition(x_t, t, context.detach(), present)
        pred = self.predict(x_t, t, context, present, x0_prev).float()

        numel = x0[0, 0].numel()
        # Errors in pixel units (a latent is the layer times its input scale), so scaling a role's
        # input moves its schedule without also shrinking its loss.
        sq_err = (pred - self.target(x0, noise, t).float()) ** 2 / self.slot_scale(x0.ndim) ** 2
        if self.config.mask_logits:  # the mask slots' error is the cross-entropy of their logits
            k = self.config.max_layers
            # Soft targets: the stored alpha itself (x0 is the mask times its slot's scale), no
            # re-thresholding, so soft edges are learnt as soft.
            alpha = ((x0[:, 1 + k:].float() / self.slot_scale(x0.ndim)[:, 1 + k:] + 1) / 2).clamp(0, 1)
            bce = F.binary_cross_entropy_with_logits(pred[:, 1 + k:], alpha, reduction="none")
            sq_err = torch.cat([sq_err[:, : 1 + k], bce], dim=1)
        per_slot = sq_err.sum(dim=(2, 3, 4)) / numel * present.float()  # (B, L)
        roles = slot_roles(self.config.max_layers).to(self.device)
        out = {}
        for name, role in (("bg", 0), ("fg", 1), ("mask", 2)):  # unweighted, comparable across recipes
            sel = present & (roles == role)
            out[f"loss_{name}"] = (per_slot[sel].sum() / sel.sum().clamp_min(1)).detach()
        # The loss: a weighted mean over present slots, by role and (optionally) by noise level.
        weight = present.float() * torch.tensor(self.config.role_loss_weights, device=self.device)[roles]
        norm = weight.sum().clamp_min(1e-8)  # noise-level weights stay out of it: they must not cancel
        if self.config.snr_gamma > 0:
            a = self._alpha(t, 2)
            snr = a / (1.0 - a).clamp_min(1e-8)  # (B, 1): the image's SNR
            # The objective's own x0-space weight (errors are in pixel units, so the image's SNR):
            # SNR + 1 for v, SNR for eps and 1 for x0; the wanted one is the v / eps weight capped at gamma.
            eps = self.config.prediction_type == "epsilon"
            own = torch.ones_like(snr) if self.config.prediction_type == "sample" else snr + (0 if eps else 1)
            if self.config.snr_per_role:  # a role's latents times s: its SNR times s^2
                snr = snr * self.slot_scale(3).reshape(1, -1) ** 2  # (B, L)
            wanted = snr + (0 if eps else 1)
            weight = weight * (wanted.clamp(max=self.config.snr_gamma) / own.clamp_min(1e-8))
        if self.config.mask_edge_weight > 0:
            k = self.config.max_layers
            edges = 1 + self.config.mask_edge_weight * mask_edges(batch["layers"][:, 1 + k:], x0.shape[-2:])
            sq_err = torch.cat([sq_err[:, : 1 + k], sq_err[:, 1 + k:] * edges.to(sq_err)], dim=1)
            per_slot = sq_err.sum(dim=(2, 3, 4)) / numel * present.float()
        loss = (per_slot * weight).sum() / norm
        out["loss_diffusion"] = loss.detach()

        if self.config.mask_binarity_weight > 0 or self.config.composite_loss_weight > 0:
            a = self._alpha(t, x0.ndim)
            x0_hat, _ = self.predict_x0_eps(x_t.float(), pred, a)  # what both terms below score
        if self.config.mask_binarity_weight > 0:
            k = self.config.max_layers
            masks_hat = (x0_hat[:, 1 + k:] / self.slot_scale(x0.ndim)[:, 1 + k:]).clamp(-1, 1)
            grey = (1 - masks_hat.abs()).mean(dim=(2, 3, 4))  # (B, K): 0 where binary
            low = (t < self.config.mask_binarity_max_t).float()[:, None]
            # The diffusion loss's slot weights and norm, so the weight is relative to the MSE pixel for pixel.
            binarity = (grey * low * weight[:, 1 + k:]).sum() / norm
            out["loss_binarity"] = binarity.detach()
            loss = loss + self.config.mask_binarity_weight * binarity

        if self.config.composite_loss_weight > 0:
            pixels_hat = self.decode_layers(x0_hat.to(self.dtype), present).float()
            pixels = batch["layers"].to(self.device, torch.float32)
            err = (compose(pixels_hat, present) - compose(pixels, present)) ** 2
            # Weighted by alpha_bar: near pure noise the x0 estimate is a blurred mean by design.
            composite = (err.mean(dim=(1, 2, 3)) * a.reshape(-1)).mean()
            out["loss_composite"] = composite.detach()
            loss = loss + self.config.composite_loss_weight * composite
        out["loss"] = loss
        return out

    def _corrupted_x0(self, layers: torch.Tensor, x0: torch.Tensor, present: torch.Tensor, t: torch.Tensor,
                      generator: torch.Generator | None, gen_device: torch.device | str) -> torch.Tensor:
        """``x0`` with a ``mask_corruption`` share of its present mask slots from imprecise copies of
        their masks, at timesteps >= ``mask_corruption_min_t`` (what the training input is noised
        from; the target stays ``x0``)."""
        p = self.config.mask_corruption
        if p <= 0:
            return x0
        k = self.config.max_layers
        masks = layers[:, 1 + k:].to(self.device, torch.float32)
        pick = torch.rand(masks.shape[:2], generator=generator, device=gen_device).to(self.device) < p
        pick &= present[:, 1 + k:] & (t >= self.config.mask_corruption_min_t)[:, None]
        if not bool(pick.any()):
            return x0
        bad = corrupt_masks(masks.reshape(-1, *masks.shape[2:]), generator, tuple(self.config.mask_corruption_blur),
                            self.config.mask_corruption_warp).reshape(masks.shape)
        masks = torch.where(pick[..., None, None, None], bad, masks)
        corrupted = self.encode_layers(torch.cat([layers[:, : 1 + k].to(masks), masks], dim=1), present)
        return torch.cat([x0[:, : 1 + k], corrupted[:, 1 + k:].to(x0.dtype)], dim=1)

    def _sample_timesteps(self, b: int, generator: torch.Generator | None, device: torch.device | str
                          ) -> torch.Tensor:
        """Training timesteps: uniform, with ``timestep_bias`` > 1 denser towards pure noise, or
        logit-normal (``timestep_logit_normal``)."""
        num = self.config.num_train_timesteps
        if self.config.timestep_logit_normal:
            mean, std = self.config.timestep_logit_normal
            n = torch.randn(b, generator=generator, device=device, dtype=torch.float64)
            return (num * torch.sigmoid(mean + std * n)).long().clamp(max=num - 1)
        if self.config.timestep_bias == 1.0:
            return torch.randint(0, num, (b,), generator=generator, device=device)
        u = torch.rand(b, generator=generator, device=device, dtype=torch.float64)
        return (num * u ** (1.0 / self.config.timestep_bias)).long().clamp(max=num - 1)

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Same as :meth:`training_loss`; call the model itself when it is wrapped in DDP."""
        return self.training_loss(batch, generator)


def zero_init_residuals(unet: UNet2DConditionModel) -> None:
    """Zero the last layer of every residual branch of ``unet`` (ResNet ``conv2``, transformer
    ``proj_out``) and its output convolution, so each block starts as the identity."""
    layers = [unet.conv_out]
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D):
            layers.append(module.conv2)
        elif isinstance(module, Transformer2DModel):
            layers.append(module.proj_out)
    for layer in layers:
        nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def mask_edges(masks: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """(B, K, 3, H, W) masks in [-1, 1] -> (B, K, 1, h, w): the share of each latent pixel's area
    that lies within one pixel of its mask's boundary (pixels whose 3x3 neighbourhood is mixed)."""
    b, k, _, h, w = masks.shape
    inside = (masks.float().mean(2) > 0).float().reshape(b * k, 1, h, w)
    grown = F.max_pool2d(inside, 3, stride=1, padding=1)
    shrunk = -F.max_pool2d(-inside, 3, stride=1, padding=1)
    band = F.adaptive_avg_pool2d(grown - shrunk, tuple(size))
    return band.reshape(b, k, 1, *band.shape[-2:])


def _check_present(present: torch.Tensor, max_layers: int) -> None:
    """The layout rule: background present; fg n and mask n together; fgs 0..K-1 without gaps."""
    if present.ndim != 2 or present.shape[1] != 1 + 2 * max_layers:
        raise ValueError(f"present must be (B, {1 + 2 * max_layers}), got {tuple(present.shape)}")
    fg, mask = present[:, 1 : 1 + max_layers], present[:, 1 + max_layers :]
    if not bool(present[:, 0].all()) or not torch.equal(fg, mask):
        raise ValueError("present: background must be present and mask n present iff foreground n is")
    if bool((fg[:, 1:] & ~fg[:, :-1]).any()):
        raise ValueError("present: foregrounds must be 0..K-1 without gaps")

