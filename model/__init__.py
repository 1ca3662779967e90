"""LayerDiff: a layer-collaborative diffusion model over the layered dataset format (model/README.md).

Exports are resolved lazily, so ``import model.layers`` (or a data module) does not pull in
diffusers and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LayerDiffConfig": "model.configuration",
    "get_config": "model.configuration",
    "LayerDiffModel": "model.modeling.layerdiff",
    "LayerAdapter": "model.modeling.layer_attention",
    "LayeredUNet": "model.modeling.layer_attention",
    "PromptEnhancer": "model.modeling.prompt_enhancer",
    "ddim_sample": "model.sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
