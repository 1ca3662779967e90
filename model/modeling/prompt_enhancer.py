"""Layer-specific prompt enhancer: each layer prompt's tokens attend to the global prompt's tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn


class _EnhancerBlock(nn.Module):
    """Pre-norm cross-attention (layer tokens -> global tokens) and feed-forward, both residual with
    zero-initialised output projections, so a fresh block is the identity."""

    def __init__(self, dim: int, num_heads: int, ff_mult: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} does not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
        for layer in (self.to_out, self.ff[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) queries, context (B, T, D) keys/values -> (B, N, D)."""
        b, n, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, -1, self.num_heads, d // self.num_heads).transpose(1, 2)

        k, v = self.to_kv(self.norm_kv(context)).chunk(2, dim=-1)
        attn = F.scaled_dot_product_attention(heads(self.to_q(self.norm_q(x))), heads(k), heads(v))
        x = x + self.to_out(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.ff(self.norm_ff(x))


class PromptEnhancer(ModelMixin, ConfigMixin):
    """A small residual transformer over layer-prompt token embeddings, conditioned on the global
    prompt: ``enhanced = layer_tokens + f(layer_tokens, global_tokens)`` with f = 0 at initialisation."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, dim: int = 768, num_layers: int = 1, num_heads: int = 8, ff_mult: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList([_EnhancerBlock(dim, num_heads, ff_mult) for _ in range(num_layers)])

    def forward(self, layer_tokens: torch.Tensor, global_tokens: torch.Tensor) -> torch.Tensor:
        """layer_tokens (B, P, T, D) for P layer prompts, global_tokens (B, T', D) -> (B, P, T, D)."""
        b, p, t, d = layer_tokens.shape
        x = layer_tokens.reshape(b, p * t, d)  # one query sequence per sample: all its layer prompts
        for block in self.blocks:
            x = block(x, global_tokens)
        return x.reshape(b, p, t, d)
