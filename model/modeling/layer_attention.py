"""Layer-collaborative attention on a diffusers ``UNet2DConditionModel``.

The UNet runs over the flattened (B * L) layers, as AnimateDiff runs an image UNet over frames. The
new weights live in a separate :class:`LayerAdapter` (like diffusers' ``MotionAdapter``), so the UNet
stays a plain diffusers UNet that loads from and saves to an SD 1.5 ``unet/`` folder unchanged.
:class:`LayeredUNet` joins the two with forward hooks:

- after every ``Transformer2DModel`` (spatial self-attention + cross-attention), an
  :class:`InterLayerAttention` lets each spatial position attend across its sample's layers;
- after the time embedding, a learned role + depth embedding of each layer is added (the same place
  a diffusers class embedding goes), so every ResNet knows which layer it is denoising.

Text-guided intra-layer attention needs no new weights: each layer's cross-attention simply gets its
own (enhanced) prompt as ``encoder_hidden_states``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.transformers.transformer_2d import Transformer2DModel, Transformer2DModelOutput
from torch import nn

from model.layers import NUM_ROLES, slot_depths, slot_roles


class InterLayerAttention(nn.Module):
    """Attention across the L layers of a sample at each spatial position, plus a feed-forward.

    Pre-LayerNorm (per token, so a padded layer cannot leak through normalisation statistics, as it
    would through AnimateDiff's GroupNorm over frames), a learned per-slot embedding, and output
    projections initialised to zero so the block starts as the identity.
    """

    def __init__(self, channels: int, num_slots: int, num_heads: int = 8, ff_mult: int = 2):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(channels)
        self.slot_embedding = nn.Parameter(torch.randn(num_slots, channels) * 0.02)
        self.to_qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.to_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)
        self.ff = None
        if ff_mult > 0:
            self.ff_norm = nn.LayerNorm(channels)
            self.ff = nn.Sequential(nn.Linear(channels, ff_mult * channels), nn.GELU(),
                                    nn.Linear(ff_mult * channels, channels))
            nn.init.zeros_(self.ff[-1].weight)
            nn.init.zeros_(self.ff[-1].bias)

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """(N, C, H, W) rows of present layers -> same shape, each row having attended to its sample's rows.

        ``positions`` (N,): the flat slot ``b * L + l`` of each row (the UNet's packed batch), or None
        when the rows are all ``batch_size * L`` slots in order. Per-token work (norms, projections,
        feed-forward) runs once over the present rows; only the attention itself is laid out as
        (B, L), with absent layers' keys masked out, so a padded layer can neither attend nor be
        attended to. One pass for every pattern of present layers: grouping samples by pattern cost
        a copy of every per-token op per group (docs/research/fidelity.md, "Compute").
        """
        n, c, h, w = hidden_states.shape
        num_slots, heads = self.slot_embedding.shape[0], self.num_heads
        flat = torch.arange(n, device=hidden_states.device) if positions is None else positions
        x = hidden_states.permute(0, 2, 3, 1).reshape(n, h * w, c)
        emb = self.slot_embedding.index_select(0, flat % num_slots)[:, None, :]
        qkv = self.to_qkv(self.norm(x) + emb)
        if positions is not None:
            qkv = qkv.new_zeros(batch_size * num_slots, h * w, 3 * c).index_copy(0, positions, qkv)
        # (B, L, HW, 3, heads, d) -> three (B, HW, heads, L, d): attention over each position's L layers.
        q, k, v = qkv.view(batch_size, num_slots, h * w, 3, heads, c // heads).permute(3, 0, 2, 4, 1, 5).unbind(0)
        scores = (q @ k.transpose(-1, -2)) * (c // heads) ** -0.5
        if positions is not None:
            absent = torch.ones(batch_size * num_slots, dtype=torch.bool, device=x.device).index_fill(0, positions, False)
            scores = scores.masked_fill(absent.view(batch_size, 1, 1, 1, num_slots), float("-inf"))
        attn = (scores.softmax(-1) @ v).permute(0, 3, 1, 2, 4).reshape(batch_size * num_slots, h * w, c)
        if positions is not None:
            attn = attn.index_select(0, positions)
        x = x + self.to_out(attn)
        if self.ff is not None:
            x = x + self.ff(self.ff_norm(x))
        return x.reshape(n, h, w, c).permute(0, 3, 1, 2)


class LayerAdapter(ModelMixin, ConfigMixin):
    """The new weights of the layered UNet: one inter-layer attention per transformer block of the
    UNet (in ``named_modules`` order) and the role / depth embeddings added to the time embedding."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, block_channels: tuple[int, ...] = (320,), max_layers: int = 3,
                 time_embed_dim: int = 1280, num_heads: int = 8, ff_mult: int = 2):
        super().__init__()
        num_slots = 1 + 2 * max_layers
        self.blocks = nn.ModuleList(
            [InterLayerAttention(c, num_slots, num_heads, ff_mult) for c in block_channels])
        # Zero-initialised: the pretrained time embedding is unchanged at the start; being additive,
        # they still get gradients from the first step.
        self.role_embedding = nn.Embedding(NUM_ROLES, time_embed_dim)
        self.depth_embedding = nn.Embedding(max_layers + 1, time_embed_dim)
        nn.init.zeros_(self.role_embedding.weight)
        nn.init.zeros_(self.depth_embedding.weight)
        self.register_buffer("slot_roles", slot_roles(max_layers), persistent=False)
        self.register_buffer("slot_depths", slot_depths(max_layers), persistent=False)

    @property
    def num_slots(self) -> int:
        return 1 + 2 * self.config.max_layers

    def slot_time_embedding(self, slots: torch.Tensor) -> torch.Tensor:
        """(N,) slot indices -> (N, time_embed_dim) embeddings to add to the UNet time embedding."""
        roles = self.slot_roles.to(slots.device)[slots]
        depths = self.slot_depths.to(slots.device)[slots]
        return self.role_embedding(roles) + self.depth_embedding(depths)

    @classmethod
    def for_unet(cls, unet: UNet2DConditionModel, max_layers: int, num_heads: int, ff_mult: int
                 ) -> LayerAdapter:
        """A zero-initialised adapter sized for ``unet``."""
        channels = [m.in_channels for m in transformer_blocks(unet)]
        time_embed_dim = unet.time_embedding.linear_2.out_features
        return cls(block_channels=tuple(channels), max_layers=max_layers, time_embed_dim=time_embed_dim,
                   num_heads=num_heads, ff_mult=ff_mult)


def transformer_blocks(unet: UNet2DConditionModel) -> list[Transformer2DModel]:
    """The UNet's transformer blocks in a fixed order (module registration order)."""
    return [m for m in unet.modules() if isinstance(m, Transformer2DModel)]


@dataclass
class _LayerBatch:
    """How the flattened UNet batch maps back to (B, L) during one forward."""

    batch_size: int
    num_slots: int
    positions: torch.Tensor | None  # (N,) flat slot b * L + l of each present layer; None = all B * L
    packed: bool  # the UNet rows are those present layers; False: all B * L slots, absent ones too
    slots: torch.Tensor  # slot index (0..L-1) of each UNet row


class LayeredUNet(nn.Module):
    """A diffusers UNet run over (B, L) layers with layer-collaborative attention.

    ``forward(sample (B, L, C, h, w), timestep (B,), encoder_hidden_states (B, L, T, D), present)``.
    Absent (padded) layers are left out of the UNet batch altogether (``pack=True``, the default) or
    run but masked out of inter-layer attention (``pack=False``); their outputs are zero either way.
    ``patch_size`` > 1 gives the UNet a space-to-depth stem: it sees (C * p * p, h / p, w / p) and its
    output is shuffled back, so the diffusion itself still runs on (C, h, w).
    """

    def __init__(self, unet: UNet2DConditionModel, adapter: LayerAdapter, patch_size: int = 1):
        super().__init__()
        self.unet = unet
        self.adapter = adapter
        self.patch_size = patch_size
        blocks = transformer_blocks(unet)
        channels = [m.in_channels for m in blocks]
        if list(adapter.config.block_channels) != channels:
            raise ValueError(f"adapter channels {list(adapter.config.block_channels)} != UNet transformer "
                             f"channels {channels}")
        self._batch: _LayerBatch | None = None
        # Hooks instead of new block classes keep the UNet's state dict and config those of a plain
        # diffusers UNet. functools.partial of a bound method survives deepcopy (EMA) and pickling.
        for i, block in enumerate(blocks):
            block.register_forward_hook(functools.partial(self._inter_layer_hook, i))
        unet.time_embedding.register_forward_hook(self._time_embedding_hook)

    @property
    def max_layers(self) -> int:
        return self.adapter.config.max_layers

    def _time_embedding_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self._batch is None:  # the UNet called on its own: a plain UNet
            return output
        return output + self.adapter.slot_time_embedding(self._batch.slots).to(output.dtype)

    def _inter_layer_hook(self, block_index: int, module: nn.Module, args: tuple, output):
        batch = self._batch
        if batch is None:
            return output
        hidden = output[0] if isinstance(output, tuple) else output.sample
        block = self.adapter.blocks[block_index]
        if batch.packed or batch.positions is None:
            hidden = block(hidden, batch.positions, batch.batch_size)
        else:  # unpacked with padding: absent rows pass through (their outputs are zeroed later)
            present = block(hidden.index_select(0, batch.positions), batch.positions, batch.batch_size)
            hidden = hidden.index_copy(0, batch.positions, present)
        if isinstance(output, tuple):
            return (hidden,) + tuple(output[1:])
        return Transformer2DModelOutput(sample=hidden)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, encoder_hidden_states: torch.Tensor,
                present: torch.Tensor | None = None, pack: bool = True) -> torch.Tensor:
        b, num_slots = sample.shape[:2]
        if num_slots != self.adapter.num_slots:
            raise ValueError(f"got {num_slots} layers, the adapter is built for {self.adapter.num_slots}")
        if present is not None:  # None: every layer present, with no data-dependent branch (meta-safe)
            present = present.to(device=sample.device, dtype=torch.bool)
            if not bool(present.any(dim=1).all()):
                raise ValueError("every sample needs at least one present layer")
        timestep = torch.as_tensor(timestep, device=sample.device)
        timestep = timestep.reshape(-1).expand(b) if timestep.numel() in (1, b) else timestep
        if timestep.shape != (b,):
            raise ValueError(f"timestep shape {tuple(timestep.shape)}, expected ({b},) or scalar")

        flat = sample.reshape((b * num_slots,) + sample.shape[2:])
        context = encoder_hidden_states.reshape((b * num_slots,) + encoder_hidden_states.shape[2:])
        timesteps = timestep.repeat_interleave(num_slots)
        slots = torch.arange(num_slots, device=sample.device).repeat(b)
        index = None
        if present is not None and not bool(present.all()):
            index = present.reshape(-1).nonzero().squeeze(1)
            if pack:
                flat, context = flat.index_select(0, index), context.index_select(0, index)
                timesteps, slots = timesteps.index_select(0, index), slots.index_select(0, index)

        if self.patch_size > 1:
            flat = F.pixel_unshuffle(flat, self.patch_size)
        self._batch = _LayerBatch(b, num_slots, index, pack, slots)
        try:
            out = self.unet(flat, timesteps, encoder_hidden_states=context, return_dict=False)[0]
        finally:
            self._batch = None  # a later direct call of self.unet is a plain UNet again
        if self.patch_size > 1:
            out = F.pixel_shuffle(out, self.patch_size)
        if index is not None and pack:
            out = out.new_zeros((b * num_slots,) + out.shape[1:]).index_copy(0, index, out)
        out = out.reshape((b, num_slots) + out.shape[1:])
        if present is None:
            return out
        return torch.where(present.reshape(b, num_slots, 1, 1, 1), out, torch.zeros_like(out))
