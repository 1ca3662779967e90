"""A tiny random Stable Diffusion inpainting folder in diffusers' ``save_pretrained`` layout.

Same components and file names as runwayml/stable-diffusion-inpainting: a 9-channel
``UNet2DConditionModel`` (4 latent + 1 mask + 4 masked-image latent channels), ``AutoencoderKL``,
``CLIPTextModel`` with a ``CLIPTokenizer`` built from a hand-written vocabulary and merges, and the
PNDM scheduler config of SD 1.5. The VAE downsamples by 2 (the real one by 8) and the UNet works at 32x32
latents, so the model's resolution is 64 px. No safety checker.

    python -m datagen.tiny_weights.sd_inpaint OUT_DIR
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

SEED = 2024
_WORDS = ("empty", "background", "nothing", "object", "person", "text", "a", "photo", "of", "the", "blurry")


def clip_tokenizer(work: Path):  # -> transformers.CLIPTokenizer
    """CLIP BPE from a hand-made vocab: printable ASCII chars (plain and word-final ``</w>``) + ``_WORDS``."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab: dict[str, int] = {}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    for ch in chars:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[str] = []
    for word in _WORDS:
        cur = word[0]
        for i, ch in enumerate(word[1:], start=1):
            nxt = ch + ("</w>" if i == len(word) - 1 else "")
            merge = f"{cur} {nxt}"
            if merge not in merges:
                merges.append(merge)
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    vocab_file, merges_file = work / "vocab.json", work / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer(
        vocab_file=str(vocab_file),
        merges_file=str(merges_file),
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )


def clip_text_config(tokenizer, **sizes):  # -> transformers.CLIPTextConfig
    """A CLIP text config for ``tokenizer``'s vocabulary and special tokens, with ``sizes``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes)


def save_pipeline(folder: Path, unet, vae, text_encoder, tokenizer) -> None:
    """Write a ``StableDiffusionInpaintPipeline`` folder from its components, with SD 1.5's scheduler
    settings (as in runwayml/stable-diffusion-inpainting's scheduler_config.json) and no safety checker."""
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline

    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def build(out_dir: Path) -> dict[str, Path]:
    """Build ``out_dir/sd-inpaint-tiny``; returns ``{"sd_inpaint": folder}``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(out_dir) / "sd-inpaint-tiny"
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(Path(tmp))
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=9,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=4))
    save_pipeline(folder, unet, vae, text_encoder, tokenizer)
    return {"sd_inpaint": folder}


if __name__ == "__main__":
    for name, path in build(Path(sys.argv[1] if len(sys.argv) > 1 else "weights/tiny")).items():
        print(name, path)
