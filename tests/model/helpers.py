"""Test helpers: a diffusers SD 1.5-format folder with tiny random weights,
and perturbation of the zero-initialised modules (so tests can see what they do)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

_WORDS = ["a", "red", "green", "blue", "circle", "square", "background", "on", "and", "the"]


def _write_clip_tokenizer(directory: Path, max_length: int) -> CLIPTokenizer:
    """A CLIP BPE tokenizer from hand-made vocab/merges: letters, the words above, the specials."""
    directory.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + letters + [f"{c}</w>" for c in letters]
    merges: list[str] = []
    for word in _WORDS:  # left-to-right merge chain that ends in the whole word
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            tokens.append(pieces[0])
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                              model_max_length=max_length, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def make_sd15_folder(path: str | Path, seed: int = 0, text_dim: int = 32) -> Path:
    """Write an SD 1.5-layout diffusers folder (unet, vae, text_encoder, tokenizer, scheduler) with
    tiny random weights: same classes, block types and file layout as the real checkpoint."""
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = _write_clip_tokenizer(path / "tokenizer", 77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=text_dim,
        attention_head_dim=2, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False)
    text_encoder.save_pretrained(path / "text_encoder")
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    scheduler.save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.39.0",
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    return path


@torch.no_grad()
def perturb_new_modules(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Add noise to every parameter of the new modules (adapter, prompt enhancer), zero-init ones
    included, so that they act: a stand-in for a trained model in tests and benchmarks."""
    gen = torch.Generator().manual_seed(seed)
    for module in (model.unet.adapter, model.prompt_enhancer):
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p) * scale)
