"""Modeling: the layered UNet, the prompt enhancer, text components and the full model."""

from model.modeling.layer_attention import InterLayerAttention, LayerAdapter, LayeredUNet, transformer_blocks
from model.modeling.layerdiff import LayerDiffModel, make_noise_scheduler
from model.modeling.prompt_enhancer import PromptEnhancer

__all__ = ["InterLayerAttention", "LayerAdapter", "LayeredUNet", "LayerDiffModel", "PromptEnhancer",
           "make_noise_scheduler", "transformer_blocks"]
