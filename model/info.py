"""Architecture summary and parameter counts: ``python -m model.info --config tiny|sd15``.

sd15 without ``--pretrained-path`` is built on the meta device from SD 1.5's published component
configs: exact parameter counts, no weights, no memory.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from model.configuration import PRESETS, get_config
from model.layers import ROLE_BACKGROUND, ROLE_FOREGROUND, slot_depths, slot_roles
from model.modeling.layer_attention import transformer_blocks
from model.modeling.layerdiff import LayerDiffModel


def _count(module: torch.nn.Module | None, trainable: bool = False) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def summarize(model: LayerDiffModel) -> dict[str, Any]:
    """Parameter counts per component and the facts of the layout, as a JSON-able dict."""
    cfg = model.config
    adapter = model.unet.adapter
    components = {
        "unet (base)": model.unet.unet,
        "inter-layer attention": adapter.blocks,
        "layer role/depth embeddings": torch.nn.ModuleList([adapter.role_embedding, adapter.depth_embedding]),
        "prompt enhancer": model.prompt_enhancer,
        "text encoder": model.text_encoder,
        "vae": model.vae,
    }
    counts = {name: {"params": _count(m), "trainable": _count(m, trainable=True)}
              for name, m in components.items() if m is not None}
    new = _count(adapter) + _count(model.prompt_enhancer)
    unet_cfg = model.unet.unet.config
    names = []
    for role, depth in zip(slot_roles(cfg.max_layers).tolist(), slot_depths(cfg.max_layers).tolist()):
        names.append("background" if role == ROLE_BACKGROUND
                     else f"{'fg' if role == ROLE_FOREGROUND else 'mask'}{depth - 1}")
    blocks = transformer_blocks(model.unet.unet)
    return {
        "config": cfg.name,
        "resolution": cfg.resolution,
        "pixel_space": cfg.pixel_space,
        "patch_size": cfg.patch_size,
        "latent_shape": list(model.latent_shape),
        "max_layers": cfg.max_layers,
        "slots": names,
        "prediction_type": cfg.prediction_type,
        "schedule": f"{cfg.beta_schedule}, T={cfg.num_train_timesteps}, zero terminal SNR={cfg.zero_terminal_snr}",
        "sampler": f"DDIM, trailing timesteps, {cfg.num_inference_steps} steps by default",
        "unet_blocks": {"down": list(unet_cfg.down_block_types), "mid": unet_cfg.mid_block_type,
                        "up": list(unet_cfg.up_block_types), "channels": list(unet_cfg.block_out_channels),
                        "layers_per_block": unet_cfg.layers_per_block},
        "transformer_blocks": len(blocks),
        "inter_layer_channels": list(adapter.config.block_channels),
        "inter_layer_heads": adapter.config.num_heads,
        "text": {"tokenizer": cfg.tokenizer_type, "max_length": cfg.max_text_length,
                 "hidden": model.text_encoder.config.hidden_size,
                 "layers": model.text_encoder.config.num_hidden_layers,
                 "vocab": model.text_encoder.config.vocab_size},
        "parameters": counts,
        "total_params": _count(model),
        "trainable_params": _count(model, trainable=True),
        "new_module_params": new,
    }


def format_summary(info: dict[str, Any]) -> str:
    lines = [f"LayerDiff model '{info['config']}'",
             f"  layers      {info['resolution']}x{info['resolution']} px, K_max={info['max_layers']}, "
             f"L={len(info['slots'])} slots: {', '.join(info['slots'])}",
             f"  latent      {'pixel space' if info['pixel_space'] else 'VAE'} {tuple(info['latent_shape'])}"
             + (f", UNet patch {info['patch_size']}x{info['patch_size']}" if info["patch_size"] > 1 else ""),
             f"  objective   {info['prediction_type']}; {info['schedule']}",
             f"  sampler     {info['sampler']}"]
    ub = info["unet_blocks"]
    lines += [f"  unet        channels {ub['channels']}, {ub['layers_per_block']} layer(s)/block",
              f"              down {ub['down']}", f"              mid  {ub['mid']}", f"              up   {ub['up']}",
              f"  inter-layer attention after each of {info['transformer_blocks']} transformer blocks, "
              f"{info['inter_layer_heads']} heads, channels {info['inter_layer_channels']}",
              f"  text        {info['text']['tokenizer']} tokenizer (vocab {info['text']['vocab']}, "
              f"{info['text']['max_length']} tokens), CLIP text encoder {info['text']['layers']} layers x "
              f"{info['text']['hidden']}",
              "", f"  {'component':30s} {'params':>14s} {'trainable':>14s}"]
    for name, c in info["parameters"].items():
        lines.append(f"  {name:30s} {c['params']:>14,d} {c['trainable']:>14,d}")
    lines += [f"  {'total':30s} {info['total_params']:>14,d} {info['trainable_params']:>14,d}",
              f"  new modules (adapter + enhancer): {info['new_module_params']:,d}"]
    return "\n".join(lines)


def build_for_info(name: str, pretrained_path: str | None = None) -> LayerDiffModel:
    """The model for ``name``; an sd15 without a checkpoint folder is built on the meta device."""
    config = get_config(name, **({"pretrained_path": pretrained_path} if pretrained_path else {}))
    meta = config.tokenizer_type == "clip" and not config.pretrained_path
    return LayerDiffModel.from_config(config, device="meta" if meta else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--pretrained-path", default=None, help="local diffusers SD 1.5 folder (sd15)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    info = summarize(build_for_info(args.config, args.pretrained_path))
    print(json.dumps(info, indent=2) if args.json else format_summary(info))


if __name__ == "__main__":
    main()
