"""Train a LayerDiff model on layered shards: ``python -m model.train [options]``.

Runs in-process (``--num-workers 0``) or on Ray Train's TorchTrainer with DDP (``--num-workers N``,
``--use-gpu``), locally or on a cluster::

    python -m model.train --data data --out runs/tiny                  # tiny config, one CPU worker
    ray job submit --working-dir . -- python -m model.train --model sd15 \\
        --data /shared/layered --out /shared/runs/sd15 --num-workers 8 --use-gpu

``OUT`` gets ``checkpoints/step-*.pt`` (every ``--ckpt-every`` steps, atomic, the last
``--keep-last`` kept; ``--resume`` continues from the newest), ``model/`` (the EMA weights,
``LayerDiffModel.from_pretrained``), ``samples/step-*.png`` (sampled grids), ``train_log.csv``
and TensorBoard events in ``tb/``; ``--snapshot-minutes 10 20`` also keeps the EMA model as it was
at those minutes of the budget clock in ``snapshots/minute-M/``. With several workers on several machines, OUT and the data
must be on storage every worker sees.

The loop in :func:`train` reads top to bottom: setup, model + EMA + optimizer + schedule, resume,
data, then the steps (gradient accumulation, mixed precision on GPU, clipping, EMA, logging,
checkpoints, grids).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import checkpoint as ckpt
from model.data import DataConfig, load_examples, make_loader
from model.trainlog import TrainLogger, grid_inputs, save_grid

BATCH_KEYS = ("layers", "present", "prompt", "layer_prompts")
TEXT_MODULES = ("text_encoder.", "prompt_enhancer.")  # parameters that --text-lr-scale applies to
LOGGED_LOSSES = ("loss", "loss_bg", "loss_fg", "loss_mask")  # means over each log interval


@dataclass
class TrainConfig:
    """Every option of a run (the CLI flags are these fields, ``_`` spelled ``-``)."""

    # data and output
    data: str = "data"  # dataset folder (manifest.json), shard path, brace pattern, or "a::b"
    out: str = "runs/tiny"
    # model
    model: str = "tiny"  # config preset: tiny | tiny-s3 | sd15
    model_args: dict[str, Any] = field(default_factory=dict)  # overrides, e.g. {"resolution": 32}
    init_from: str | None = None  # start from a save_pretrained folder instead of the preset
    # optimisation
    max_steps: int = 1500
    max_minutes: float = 0.0  # > 0: a time budget: stop after this long; the cosine follows elapsed time
    budget_clock: str = "wall"  # wall | cpu (this process's CPU time: steady on a shared machine)
    batch_size: int = 8  # per worker and micro-step; 8 beat 16 at equal CPU time (docs/research/fidelity.md)
    grad_accum: int = 1
    lr: float = 3e-3  # the tiny config from scratch; fine-tuning sd15 wants ~1e-5
    text_lr_scale: float = 0.3  # LR multiplier for the text encoder and prompt enhancer
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0
    # data pipeline
    loader_workers: int = 0  # DataLoader processes per training worker
    shuffle_buffer: int = 500
    epoch_samples: int = 10_000
    hflip: float = 0.5
    uncond_dropout: float = 0.1
    caption_dropout: float = 0.1
    layer_caption_dropout: float = 0.1
    fg_fill: str = "nearest"
    # logs, checkpoints, samples
    log_every: int = 10
    ckpt_every: int = 250
    keep_last: int = 3
    sample_every: int = 250
    grid_prompts: int = 6
    sample_steps: int = 25
    guidance_scale: float = 3.0
    tensorboard: bool = True
    progress: bool = True
    resume: bool = False
    # The EMA model is also saved as OUT/snapshots/minute-M when the budget clock passes M minutes: a
    # learning curve of one run (bench.fidelity scores each), without stopping or re-scheduling it.
    snapshot_minutes: list[float] = field(default_factory=list)
    # execution
    num_workers: int = 1  # Ray Train workers; 0 = run in this process without Ray
    use_gpu: bool = False
    cpus_per_worker: int = 1
    threads: int = 0  # torch threads per worker (0: leave as is)
    ray_address: str | None = None  # None: connect to RAY_ADDRESS or start a local Ray


# ---------------------------------------------------------------------------------------------
# pieces the loop uses


class EMA:
    """Exponential moving average of a model's trainable parameters."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: p.detach().clone().float() for k, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """shadow <- d * shadow + (1 - d) * weights, with d warming up as (1 + step) / (10 + step)."""
        d = min(self.decay, (1 + step) / (10 + step))
        params = dict(model.named_parameters())
        keys = [k for k in self.shadow if k in params]
        # One fused update over all tensors: per-tensor lerps were hundreds of kernel launches a step on GPU.
        torch._foreach_lerp_([self.shadow[k] for k in keys], [params[k].detach().float() for k in keys], 1 - d)

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model``."""
        params = dict(model.named_parameters())
        saved = {k: params[k].detach().clone() for k in self.shadow}
        with torch.no_grad():
            for k, v in self.shadow.items():
                params[k].copy_(v)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    params[k].copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


class WarmupCosine:
    """LR multiplier: linear warmup, then cosine decay to ``min_ratio`` at ``total_steps``.

    Under a time budget the loop sets ``time_fraction`` (the share of the budget used) before each
    step; warmup then ends by ``warmup_fraction`` of the budget at the latest, and the cosine
    follows whichever of steps and time is further along.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float, warmup_fraction: float = 0.05) -> None:
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        self.warmup_fraction, self.time_fraction = warmup_fraction, 0.0

    def __call__(self, step: int) -> float:
        warm = max((step + 1) / (self.warmup_steps + 1), self.time_fraction / self.warmup_fraction)
        if warm < 1:
            return warm
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(progress, self.time_fraction))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Dist:
    """Where this process sits: rank, world size, device, and whether Ray Train runs it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ray: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def detect_dist(use_gpu: bool) -> Dist:
    """Rank and device from Ray Train's context, torchrun's environment, or a single process."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        rank, world, local = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
        from ray.train.torch import get_device

        return Dist(rank, world, local, get_device() if use_gpu else torch.device("cpu"), ray=True)
    except (ImportError, RuntimeError, AttributeError, ValueError):
        pass
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device)


def build_model(cfg: TrainConfig) -> nn.Module:
    """The preset (with overrides) or a saved model (``--init-from``)."""
    from model import LayerDiffModel

    if cfg.init_from:
        return LayerDiffModel.from_pretrained(cfg.init_from)
    return LayerDiffModel.from_config_name(cfg.model, **cfg.model_args)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on 1-d parameters (biases, norms); the text side at ``text_lr_scale``."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            text = name.startswith(TEXT_MODULES)
            groups.setdefault((text, p.ndim >= 2), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0,
          "lr": cfg.lr * (cfg.text_lr_scale if text else 1.0)} for (text, decay), ps in sorted(groups.items())],
        # foreach: one multi-tensor update instead of torch's CPU default, a Python loop over the
        # ~475 tensors (32-42 ms against 23 ms of a ~0.45 s tiny-config step, docs/research/fidelity.md).
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this run, None for fp32."""
    if device.type != "cuda" or cfg.precision == "fp32":
        return None
    if cfg.precision == "fp16":
        return torch.float16
    if cfg.precision in ("bf16", "auto"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    raise ValueError(f"precision {cfg.precision!r}: choose auto, fp32, bf16 or fp16")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The model's keys of a batch, tensors moved to ``device``."""
    return {k: (batch[k].to(device, non_blocking=True) if torch.is_tensor(batch[k]) else batch[k])
            for k in BATCH_KEYS}


def forever(loader: torch.utils.data.DataLoader) -> Iterator[dict[str, Any]]:
    """Batches from epoch after epoch of ``loader``."""
    while True:
        yield from loader


@dataclass
class TrainState:
    """Everything a checkpoint restores."""

    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: WarmupCosine
    generator: torch.Generator  # noise and timesteps of training_loss
    step: int = 0
    seconds: float = 0.0  # training time before this process (counts against --max-minutes)

    def state_dict(self, cfg: TrainConfig) -> dict[str, Any]:
        model_config = getattr(self.model, "config", None)
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "schedule": {"total_steps": self.schedule.total_steps, "time_fraction": self.schedule.time_fraction},
            "seconds": self.seconds,
            "generator": self.generator.get_state(),
            "rng": ckpt.rng_state(),
            "train_config": dataclasses.asdict(cfg),
            "model_config": model_config.to_dict() if hasattr(model_config, "to_dict") else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.total_steps = state["schedule"]["total_steps"]
        self.schedule.time_fraction = state["schedule"]["time_fraction"]
        self.seconds = state["seconds"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        ckpt.set_rng_state(state["rng"])
        self.step = state["step"]


def build_state(cfg: TrainConfig, device: torch.device, rank: int = 0) -> TrainState:
    """Model, EMA, optimizer and LR schedule for a fresh run (seeded)."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg).to(device)
    model.train()
    optimizer = build_optimizer(model, cfg)
    schedule = WarmupCosine(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed * 1000 + rank + 1)
    return TrainState(model, EMA(model, cfg.ema_decay), optimizer, scheduler, schedule, generator)


def train_step(state: TrainState, loss_module: nn.Module, batches: Iterator[dict[str, Any]], cfg: TrainConfig,
               device: torch.device, amp: torch.dtype | None, scaler: torch.amp.GradScaler | None) -> dict[str, float]:
    """One optimizer step over ``cfg.grad_accum`` micro-batches; returns loss, grad norm and LR."""
    ddp = isinstance(loss_module, nn.parallel.DistributedDataParallel)
    total, parts = 0.0, {}
    for micro in range(cfg.grad_accum):
        batch = to_device(next(batches), device)
        last = micro == cfg.grad_accum - 1
        sync = contextlib.nullcontext() if (last or not ddp) else loss_module.no_sync()
        autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with sync, autocast:
            out = loss_module(batch, generator=state.generator)
            loss = out["loss"] / cfg.grad_accum
        (scaler.scale(loss) if scaler else loss).backward()
        total += float(loss.detach())
        for k, v in out.items():
            if k != "loss" and torch.is_tensor(v) and v.numel() == 1:
                parts[k] = parts.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
    if scaler:
        scaler.unscale_(state.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip or float("inf"))
    lr = max(g["lr"] for g in state.optimizer.param_groups)
    if scaler:
        scaler.step(state.optimizer)
        scaler.update()
    else:
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    state.ema.update(state.model, state.step)
    state.step += 1
    return {"loss": total, "grad_norm": float(grad_norm), "lr": lr, **parts}


def sample_grid(state: TrainState, cfg: TrainConfig, grid: dict[str, Any], path: Path) -> Path:
    """Sample the grid prompts with the EMA weights (fixed seed) and write the PNG grid."""
    from model.sampling import ddim_sample

    model = state.model
    generator = torch.Generator(device=grid["present"].device).manual_seed(cfg.seed + 12345)
    with state.ema.applied_to(model), torch.no_grad():
        model.eval()
        layers = ddim_sample(model, grid["prompt"], grid["layer_prompts"], grid["present"],
                             num_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, generator=generator)
        model.train()
    return save_grid(path, layers, grid["present"], grid["prompt"], grid["layer_prompts"])


def snapshot_dir(out: Path, minute: float) -> Path:
    """Where the EMA model is saved when the budget clock passes ``minute`` (``snapshot_minutes``)."""
    return Path(out) / "snapshots" / f"minute-{minute:g}"


def save_snapshot(state: TrainState, out: Path, minute: float) -> Path:
    """The EMA model as it is now, with ``snapshot.json`` (minute, step, clock seconds) beside it."""
    info = {"minute": minute, "step": state.step, "clock_s": round(state.seconds, 1)}
    with state.ema.applied_to(state.model):
        return ckpt.atomic_save_pretrained(state.model, snapshot_dir(out, minute),
                                           {"snapshot.json": json.dumps(info) + "\n"})


def save_all(state: TrainState, cfg: TrainConfig, out: Path) -> None:
    """Checkpoint (atomic, keep-last-k) and the EMA model as ``OUT/model``."""
    ckpt.save_checkpoint(out / "checkpoints", state.step, state.state_dict(cfg), cfg.keep_last)
    with state.ema.applied_to(state.model):  # no copy of the model: swap the EMA weights in and back
        ckpt.atomic_save_pretrained(state.model, out / "model")
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    """Train; runs as a Ray Train worker (``cfg`` a dict) or in-process. Returns final metrics."""
    cfg = TrainConfig(**cfg) if isinstance(cfg, dict) else cfg
    torch.set_flush_denormal(True)  # random-weight models make denormals: 10x slower on CPU
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dist = detect_dist(cfg.use_gpu)
    out = Path(cfg.out)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)

    # model, EMA, optimizer, LR schedule; resume from the newest checkpoint if asked
    state = build_state(cfg, dist.device, dist.rank)
    latest = ckpt.latest_checkpoint(out / "checkpoints") if cfg.resume else None
    if latest is not None:
        # Loaded on the CPU: RNG states must stay CPU ByteTensors (a CUDA map_location broke --resume
        # on a GPU); the model, EMA and optimizer copy their tensors onto their own devices.
        state.load_state_dict(ckpt.load_checkpoint(latest))
        if dist.main:
            print(f"resumed from {latest} at step {state.step}", file=sys.stderr)
    elif cfg.resume and dist.main:
        print(f"--resume: no checkpoint in {out / 'checkpoints'}, starting fresh", file=sys.stderr)
    model_cfg = state.model.config
    loss_module: nn.Module = state.model  # its forward is training_loss: the form DDP needs
    if dist.world_size > 1:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        loss_module = nn.parallel.DistributedDataParallel(loss_module, device_ids=device_ids)
    amp = autocast_dtype(cfg, dist.device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    # data: a resampled, shuffled stream per rank; the seed moves on with the step on resume
    data_cfg = DataConfig(
        shards=cfg.data, resolution=model_cfg.resolution, max_layers=model_cfg.max_layers,
        batch_size=cfg.batch_size, num_workers=cfg.loader_workers, shuffle_buffer=cfg.shuffle_buffer,
        epoch_samples=cfg.epoch_samples, hflip=cfg.hflip, uncond_dropout=cfg.uncond_dropout,
        caption_dropout=cfg.caption_dropout, layer_caption_dropout=cfg.layer_caption_dropout,
        fg_fill=cfg.fg_fill, seed=cfg.seed + 7919 * state.step, rank=dist.rank, world_size=dist.world_size)
    batches = forever(make_loader(data_cfg, pin_memory=dist.device.type == "cuda"))

    # logs (rank 0): CSV + TensorBoard, fixed prompts for sample grids, progress bar
    logger, grid, bar = None, None, None
    if dist.main:
        logger = TrainLogger(out, [*LOGGED_LOSSES, "lr", "grad_norm", "samples_per_s", "elapsed_s", "clock_s"],
                             resume_step=state.step if latest is not None else None, tensorboard=cfg.tensorboard)
        examples = load_examples(cfg.data, model_cfg.resolution, model_cfg.max_layers, cfg.grid_prompts, cfg.fg_fill)
        grid = grid_inputs(examples)
        grid["present"] = grid["present"].to(dist.device)
        save_grid(out / "samples" / "reference.png", torch.stack([e["layers"] for e in examples]),
                  grid["present"].cpu(), grid["prompt"], grid["layer_prompts"])
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=None if cfg.max_minutes > 0 else cfg.max_steps, initial=state.step, desc="train",
                       dynamic_ncols=True)

    clock = {"wall": time.time, "cpu": time.process_time}[cfg.budget_clock]
    t0, t_wall, t_log, window = clock() - state.seconds, time.time(), time.time(), []
    samples_per_step = cfg.batch_size * cfg.grad_accum * dist.world_size
    budget_s, metrics = cfg.max_minutes * 60, {}
    snapshots = sorted(m for m in cfg.snapshot_minutes if m * 60 > state.seconds)  # those not yet passed
    while state.step < cfg.max_steps:
        if budget_s > 0:  # the cosine follows the time used (the same on every rank)
            state.schedule.time_fraction = _agree(min(1.0, (clock() - t0) / budget_s), dist)
            for group, base_lr in zip(state.optimizer.param_groups, state.scheduler.base_lrs, strict=True):
                group["lr"] = base_lr * state.schedule(state.scheduler.last_epoch)
        metrics = train_step(state, loss_module, batches, cfg, dist.device, amp, scaler)
        window.append(metrics)
        state.seconds = clock() - t0
        stop = budget_s > 0 and _agree(float(state.seconds >= budget_s), dist) > 0
        last = state.step >= cfg.max_steps or stop

        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        if logger is not None and (state.step % cfg.log_every == 0 or last):
            now = time.time()
            means = {k: sum(m.get(k, 0.0) for m in window) / len(window) for k in LOGGED_LOSSES}
            logger.log(state.step, {**means, "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
                                    "samples_per_s": samples_per_step * len(window) / max(now - t_log, 1e-9),
                                    "elapsed_s": now - t_wall, "clock_s": state.seconds})
            window, t_log = [], now
        while snapshots and state.seconds >= snapshots[0] * 60:
            minute = snapshots.pop(0)
            if dist.main:
                save_snapshot(state, out, minute)
        if dist.main and (state.step % cfg.ckpt_every == 0 or last):
            save_all(state, cfg, out)
        if dist.main and (state.step % cfg.sample_every == 0 or last):
            path = sample_grid(state, cfg, grid, out / "samples" / f"step-{state.step:08d}.png")
            logger.log_image(state.step, "samples", path)
        if stop:
            break

    if bar is not None:
        bar.close()
    if logger is not None:
        logger.close()
    result = {"step": state.step, "loss": metrics.get("loss", float("nan")), "out": str(out),
              "clock_s": round(state.seconds, 1),  # of budget_clock, over the whole run (resumes included)
              "world_size": dist.world_size, "ranks_in_sync": _ranks_in_sync(state.model, dist)}
    if dist.main:
        (out / "result.json").write_text(json.dumps(result) + "\n")
    return result


def _ranks_in_sync(model: nn.Module, dist: Dist) -> bool:
    """Whether every rank holds the same weights (DDP keeps them so); True on one rank."""
    if dist.world_size == 1:
        return True
    with torch.no_grad():
        checksum = torch.stack([p.double().sum() for p in model.parameters()]).sum().reshape(1)
    lo, hi = checksum.clone(), checksum.clone()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    return bool(lo == hi)


def _agree(value: float, dist: Dist) -> float:
    """The largest of the ranks' values, on every rank (so time-driven decisions agree)."""
    if dist.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


# ---------------------------------------------------------------------------------------------
# Ray Train and the CLI


def run_ray(cfg: TrainConfig) -> dict[str, Any]:
    """Run :func:`train` on a Ray Train TorchTrainer (DDP; gloo on CPU, NCCL on GPU)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        if cfg.ray_address is None and "RAY_ADDRESS" not in os.environ:
            # A Ray we start here runs its workers at niceness 0, not Ray's default 15: the training
            # worker is the work, and at 15 any other load on the machine starves it.
            os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address=cfg.ray_address, include_dashboard=False,  # no dashboard: quiet its state-API polling
                 logging_config=ray.LoggingConfig(log_level="ERROR"))
    trainer = TorchTrainer(
        train,
        train_loop_config=dataclasses.asdict(cfg),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=f"layerdiff-{Path(cfg.out).name}", storage_path=str(Path(cfg.out, "ray").resolve())),
    )
    trainer.fit()  # raises TrainingFailedError if a worker failed
    return json.loads(Path(cfg.out, "result.json").read_text())  # written by rank 0


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (a repeated CLI flag) -> {key: value}; a value is read as JSON when it
    is JSON (numbers, booleans, lists, objects), else kept as a string."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def add_field_flag(parser: argparse.ArgumentParser, flag: str, default: Any) -> None:
    """The CLI flag of a config field, typed by its default: --x / --no-x for a bool, a list of
    floats for a list (``--snapshot-minutes 10 20``), else int, float or str."""
    if isinstance(default, bool):
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
    elif isinstance(default, list):
        parser.add_argument(flag, type=float, nargs="*", default=default)
    else:
        parser.add_argument(flag, type={int: int, float: float}.get(type(default), str), default=default)


def add_config_flags(parser: argparse.ArgumentParser, config: Any, skip: tuple[str, ...] = ()) -> None:
    """A flag per field of the dataclass instance ``config`` (``_`` spelled ``-``, typed by
    :func:`add_field_flag`), but for the fields in ``skip``."""
    for f in dataclasses.fields(config):
        if f.name not in skip:
            add_field_flag(parser, "--" + f.name.replace("_", "-"), getattr(config, f.name))


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """CLI flags -> TrainConfig (booleans as --flag / --no-flag; --model-arg KEY=VALUE repeats)."""
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(parser, TrainConfig(), skip=("model_args",))
    parser.add_argument("--model-arg", dest="model_args", action="append", default=[], metavar="KEY=VALUE",
                        help="model config override (JSON value), e.g. max_layers=3")
    args = vars(parser.parse_args(argv))
    overrides = parse_overrides(args.pop("model_args"))
    return TrainConfig(**args, model_args=overrides)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    local_paths = "://" not in cfg.data and "::" not in cfg.data and not cfg.data.startswith("pipe:")
    if cfg.ray_address is None and "RAY_ADDRESS" not in os.environ:  # local: absolute paths for the workers
        cfg.out = str(Path(cfg.out).resolve())
        if local_paths:
            cfg.data = os.path.abspath(cfg.data)
    elif cfg.num_workers > 0 and not (Path(cfg.out).is_absolute() and (Path(cfg.data).is_absolute() or not local_paths)):
        print("warning: on a cluster give --out and --data as absolute paths on storage every node sees "
              "(relative ones land in each node's copy of the working dir)", file=sys.stderr)
    if cfg.init_from:
        cfg.init_from = str(Path(cfg.init_from).resolve())
    from model.data import resolve_shards

    resolve_shards(cfg.data)  # fail early, with the reason, before any worker starts
    result = train(cfg) if cfg.num_workers == 0 else run_ray(cfg)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
