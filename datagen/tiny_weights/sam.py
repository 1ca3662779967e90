"""Tiny random SAM in the format of the official ``sam_vit_*.pth`` (a bare ``Sam`` state dict).

The architecture is segment-anything's, shrunk: a 2-block, 32-wide ``ImageEncoderViT`` on 256-px
inputs (16x16 embedding), a 32-wide prompt encoder and two-way transformer. The ``sam`` stage
builds it for ``model_type: tiny`` through :func:`build_tiny_sam` and loads the file with the same
code as a real checkpoint. About 0.6 MB.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

CHECKPOINT = "sam_tiny.pth"
SEED = 0
IMG_SIZE = 256  # the encoder's input side: ResizeLongestSide target and padding size
PATCH = 16
PROMPT_DIM = 32  # prompt embedding width; PositionEmbeddingRandom gets half of it


def build_tiny_sam() -> Any:
    """An uninitialised-weights (PyTorch default init) tiny ``Sam``, in eval mode."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = IMG_SIZE // PATCH
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=IMG_SIZE,
            patch_size=PATCH,
            embed_dim=32,
            depth=2,
            num_heads=2,
            mlp_ratio=2,
            out_chans=PROMPT_DIM,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,  # block 0 windowed, block 1 global: both code paths of the real encoder
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(IMG_SIZE, IMG_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_DIM, mlp_dim=64, num_heads=2),
            transformer_dim=PROMPT_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def build(out_dir: Path) -> dict[str, Path]:
    """Write ``sam_tiny.pth`` (random init, seed 0) under ``out_dir``; returns ``{"checkpoint": path}``."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    sam = build_tiny_sam()
    path = out_dir / CHECKPOINT
    torch.save(sam.state_dict(), path)
    return {"checkpoint": path}


if __name__ == "__main__":
    import sys

    paths = build(Path(sys.argv[1] if len(sys.argv) > 1 else "weights/tiny"))
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
