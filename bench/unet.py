"""Cost of the layered UNet: ``python -m bench.unet [--repeats N] [--batch B] [--markdown]``.

1. tiny, CPU, one thread: forward + backward of the layered UNet on (B, L) layers against the plain
   UNet (same weights) on B * L images, i.e. the overhead of layer-collaborative attention; plus the
   packed case, where absent layers of mixed-K batches are left out of the UNet batch.
2. sd15: parameter counts (built on the meta device from SD 1.5's configs, no weights), weight and
   optimiser memory, and forward FLOPs per sample (FLOP counter on meta tensors).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench.machine import describe_machine, machine_line
from model import LayerDiffModel
from model.configuration import get_config
from model.layers import present_vector

GIB = 2**30


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_tiny(batch: int = 8, repeats: int = 5) -> dict[str, Any]:
    """Forward + backward seconds: layered vs plain UNet on the same number of images."""
    torch.manual_seed(0)
    # The new modules at their zero initialisation run the same operations as trained ones.
    model = LayerDiffModel.from_config_name("tiny").train()
    cfg, layered, plain = model.config, model.unet, model.unet.unet
    num_slots, p = cfg.num_slots, cfg.patch_size
    x = torch.randn(batch, num_slots, *model.latent_shape)
    t = torch.randint(0, cfg.num_train_timesteps, (batch,))
    context = torch.randn(batch, num_slots, cfg.max_text_length, model.text_encoder.config.hidden_size)
    all_present = torch.ones(batch, num_slots, dtype=torch.bool)
    mixed = torch.stack([present_vector(1 + i % cfg.max_layers, cfg.max_layers) for i in range(batch)])

    def run_layered(present: torch.Tensor) -> None:
        model.zero_grad(set_to_none=True)
        layered(x, t, context, present).square().mean().backward()

    def run_plain() -> None:
        model.zero_grad(set_to_none=True)
        out = plain(F.pixel_unshuffle(x.flatten(0, 1), p), t.repeat_interleave(num_slots), context.flatten(0, 1))
        F.pixel_shuffle(out.sample, p).square().mean().backward()

    # Interleaved, and the ratio taken per round: other processes on the machine shift the absolute
    # times far more than they shift the ratio.
    runs = {"plain": run_plain, "layered": lambda: run_layered(all_present), "mixed": lambda: run_layered(mixed)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    with torch.no_grad(), FlopCounterMode(display=False) as layered_flops:
        layered(x, t, context, all_present)
    with torch.no_grad(), FlopCounterMode(display=False) as plain_flops:
        plain(F.pixel_unshuffle(x.flatten(0, 1), p), t.repeat_interleave(num_slots), context.flatten(0, 1))
    ratio = statistics.median(a / b for a, b in zip(times["layered"], times["plain"], strict=True))
    mixed_ratio = statistics.median(a / b for a, b in zip(times["mixed"], times["plain"], strict=True))
    return {"batch": batch, "layers": num_slots, "images": batch * num_slots,
            "plain_s": statistics.median(times["plain"]), "layered_s": statistics.median(times["layered"]),
            "overhead": ratio, "mixed_k_packed_s": statistics.median(times["mixed"]), "mixed_ratio": mixed_ratio,
            "mixed_k_images": int(mixed.sum()), "threads": torch.get_num_threads(), "repeats": repeats,
            "flop_ratio": layered_flops.get_total_flops() / plain_flops.get_total_flops(),
            "plain_gflop_per_image": plain_flops.get_total_flops() / 1e9 / (batch * num_slots)}


def bench_train_step(batch: int = 32, repeats: int = 3) -> dict[str, Any]:
    """A whole tiny training step: text encoder + enhancer + layered UNet + loss, backward, AdamW."""
    torch.manual_seed(0)
    model = LayerDiffModel.from_config_name("tiny").train()
    k = model.config.max_layers
    present = torch.stack([present_vector(1 + i % k, k) for i in range(batch)])
    layers = torch.rand(batch, model.config.num_slots, 3, model.config.resolution, model.config.resolution) * 2 - 1
    colours = ["red", "green", "blue"]
    data = {"layers": layers, "present": present,
            "prompt": [f"a {colours[i % 3]} circle on a gray background" for i in range(batch)],
            "layer_prompts": [["a gray background", f"a {colours[i % 3]} circle", "", ""] for i in range(batch)]}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(data, generator)["loss"].backward()
        optimizer.step()

    return {"batch": batch, "images": int(present.sum()), "step_s": _time(step, repeats)}


def bench_sd15() -> dict[str, Any]:
    """Parameter counts, memory of weights and AdamW state, forward TFLOPs for one sample of L layers."""
    model = LayerDiffModel.from_config(get_config("sd15"), device="meta")
    cfg = model.config

    def count(module: torch.nn.Module | None, trainable: bool = False) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters()
                                            if p.requires_grad or not trainable)

    new = count(model.unet.adapter) + count(model.prompt_enhancer)
    total, trainable = count(model), count(model, trainable=True)
    x = torch.empty(1, cfg.num_slots, *model.latent_shape, device="meta")
    context = torch.empty(1, cfg.num_slots, cfg.max_text_length, 768, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as layered_flops:
        model.unet(x, t, context, None)
    with torch.no_grad(), FlopCounterMode(display=False) as plain_flops:
        model.unet.unet(x.flatten(0, 1), t.expand(cfg.num_slots), context.flatten(0, 1))
    return {
        "unet_params": count(model.unet.unet), "adapter_params": count(model.unet.adapter),
        "enhancer_params": count(model.prompt_enhancer), "text_encoder_params": count(model.text_encoder),
        "vae_params": count(model.vae), "new_params": new, "total_params": total, "trainable_params": trainable,
        "weights_fp32_gib": total * 4 / GIB, "weights_fp16_gib": total * 2 / GIB,
        # fp32 weights + fp32 grads + two fp32 AdamW moments for the trainable part; frozen parts fp16.
        "train_state_fp32_adamw_gib": (trainable * 16 + (total - trainable) * 2) / GIB,
        "layered_fwd_tflop_per_sample": layered_flops.get_total_flops() / 1e12,
        "plain_fwd_tflop_per_sample": plain_flops.get_total_flops() / 1e12,
        "layers": cfg.num_slots, "latent": list(model.latent_shape),
    }


def markdown(tiny: dict[str, Any], train: dict[str, Any], sd15: dict[str, Any]) -> str:
    return "\n".join([
        "## Layered UNet cost",
        "",
        f"Measured with `python -m bench.unet` ({machine_line(describe_machine())}, "
        f"{tiny['threads']} thread, flush-denormal on).",
        "",
        f"Tiny config, forward + backward of the UNet, batch {tiny['batch']} x L={tiny['layers']} layers "
        f"({tiny['images']} images of 32x32), median of {tiny['repeats']} interleaved rounds (relative: "
        "median of the per-round ratios):",
        "",
        "| UNet | s / step | relative |",
        "| --- | ---: | ---: |",
        f"| plain UNet on B*L images | {tiny['plain_s']:.3f} | 1.00 |",
        f"| layered UNet, all layers present | {tiny['layered_s']:.3f} | {tiny['overhead']:.2f} |",
        f"| layered UNet, K = 1..3 mixed (packed: {tiny['mixed_k_images']} images) | "
        f"{tiny['mixed_k_packed_s']:.3f} | {tiny['mixed_ratio']:.2f} |",
        "",
        f"Forward FLOPs (load-independent): layered / plain = {tiny['flop_ratio']:.3f}; the plain UNet is "
        f"{tiny['plain_gflop_per_image']:.3f} GFLOP per 32x32 image.",
        "",
        f"Whole tiny training step (text encoder, enhancer, layered UNet, loss, backward, AdamW), batch "
        f"{train['batch']} with K = 1..3 mixed ({train['images']} present layers): **{train['step_s']:.2f} s**.",
        "",
        f"sd15 config (SD 1.5 component configs on the meta device; L={sd15['layers']}, latent "
        f"{tuple(sd15['latent'])}):",
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| UNet (base) parameters | {sd15['unet_params']:,d} |",
        f"| inter-layer attention + layer embeddings (new) | {sd15['adapter_params']:,d} |",
        f"| prompt enhancer (new) | {sd15['enhancer_params']:,d} |",
        f"| CLIP text encoder (frozen) | {sd15['text_encoder_params']:,d} |",
        f"| VAE (frozen) | {sd15['vae_params']:,d} |",
        f"| total / trainable | {sd15['total_params']:,d} / {sd15['trainable_params']:,d} |",
        f"| new modules vs base UNet | {sd15['new_params'] / sd15['unet_params']:.1%} |",
        f"| weights fp32 / fp16 | {sd15['weights_fp32_gib']:.2f} / {sd15['weights_fp16_gib']:.2f} GiB |",
        f"| training state, AdamW fp32 on trainable + fp16 frozen (no activations) | "
        f"{sd15['train_state_fp32_adamw_gib']:.1f} GiB |",
        f"| UNet forward per sample (L layers), layered / plain | {sd15['layered_fwd_tflop_per_sample']:.2f} / "
        f"{sd15['plain_fwd_tflop_per_sample']:.2f} TFLOP |",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", action="store_true", help="print the BENCHMARKS section")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    tiny, train, sd15 = bench_tiny(args.batch, args.repeats), bench_train_step(32, args.repeats), bench_sd15()
    if args.markdown:
        print(markdown(tiny, train, sd15))
    else:
        print({"tiny": tiny, "train_step": train, "sd15": sd15})


if __name__ == "__main__":
    main()
