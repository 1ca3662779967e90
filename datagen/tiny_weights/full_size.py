"""Random checkpoints at the real models' sizes, in the real on-disk formats, for timing on a GPU.

No real weights can be downloaded here, but a stage's cost per image depends on the architecture,
not on the weights: SAM ViT-H runs the same encoder and decoder, Stable Diffusion inpainting the same
UNet steps, whatever the numbers in them. ``build(out)`` writes

* ``sam_vit_h_random.pth``: a ``segment_anything`` ViT-H state dict (as ``sam_vit_h_4b8939.pth``);
* ``groundingdino/``: ``GroundingDINO_SwinT_OGC.py`` (the config shipped in groundingdino-py),
  ``bert-base-random/`` (bert-base-uncased's sizes, the tiny WordPiece vocabulary) and
  ``groundingdino_swint_random.pth`` (``{"model": state_dict}``);
* ``sd-inpaint-random/``: a ``StableDiffusionInpaintPipeline`` folder with SD 1.5's UNet (9 input
  channels), VAE and a CLIP ViT-L/14-sized text encoder (tiny vocabulary).

Outputs are meaningless (random weights, and thresholds must be opened up for anything to pass);
timings are the real models'. About 4 GB in all.

    python -m datagen.tiny_weights.full_size OUT [--only sam|groundingdino|sd-inpaint]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

SEED = 0


def build_sam(out_dir: Path) -> dict[str, Path]:
    import torch

    from datagen.stages.models.sam import build_sam as build_untrained

    torch.manual_seed(SEED)
    path = out_dir / "sam_vit_h_random.pth"
    torch.save(build_untrained("vit_h").state_dict(), path)
    return {"sam": path}


def build_groundingdino(out_dir: Path) -> dict[str, Path]:
    import importlib.util

    import torch

    from datagen.stages.models.groundingdino import build_model, read_config
    from datagen.tiny_weights.groundingdino import build_text_encoder

    folder = out_dir / "groundingdino"
    # BertConfig's defaults are bert-base-uncased's sizes (768 wide, 12 layers); only the vocabulary is small.
    text_encoder = build_text_encoder(folder, "bert-base-random", sizes={})
    spec = importlib.util.find_spec("groundingdino")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("groundingdino-py is not installed")
    config = folder / "GroundingDINO_SwinT_OGC.py"
    shutil.copyfile(Path(spec.origin).parent / "config" / "GroundingDINO_SwinT_OGC.py", config)
    torch.manual_seed(SEED)
    model = build_model(read_config(config), text_encoder)
    checkpoint = folder / "groundingdino_swint_random.pth"
    torch.save({"model": model.state_dict()}, checkpoint)
    return {"checkpoint": checkpoint, "config": config, "text_encoder": text_encoder}


def build_sd_inpaint(out_dir: Path) -> dict[str, Path]:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from datagen.tiny_weights.sd_inpaint import clip_text_config, clip_tokenizer, save_pipeline

    folder = out_dir / "sd-inpaint-random"
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(Path(tmp))
    torch.manual_seed(SEED)
    # UNet2DConditionModel's defaults are SD 1.5's blocks (320/640/1280/1280, 2 layers per block).
    unet = UNet2DConditionModel(sample_size=64, in_channels=9, out_channels=4, cross_attention_dim=768,
                                attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                        block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    # CLIP ViT-L/14's text tower sizes (SD 1.5's text encoder).
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, hidden_size=768, intermediate_size=3072,
                                                  num_hidden_layers=12, num_attention_heads=12))
    save_pipeline(folder, unet, vae, text_encoder, tokenizer)
    return {"sd_inpaint": folder}


BUILDERS = {"sam": build_sam, "groundingdino": build_groundingdino, "sd-inpaint": build_sd_inpaint}


def build(out_dir: Path, only: list[str] | None = None) -> dict[str, Path]:
    """Write the checkpoints named in ``only`` (default all) under ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name in only or list(BUILDERS):
        paths.update(BUILDERS[name](out_dir))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datagen.tiny_weights.full_size", description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--only", action="append", choices=sorted(BUILDERS))
    args = parser.parse_args(argv)
    print(json.dumps({k: str(v) for k, v in build(Path(args.out), args.only).items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
