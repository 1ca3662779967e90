"""The training loop: learning, exact resume, checkpoints, logs, grids, the CLI, and DDP on Ray Train."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from model import LayerDiffModel
from model import checkpoint as ckpt
from model.data import collate, load_examples
from model.train import TrainConfig, build_optimizer, build_state, parse_args, train, train_step
from model.trainlog import save_grid


def _fixed_batch(data: Path, n: int = 2) -> dict:
    return collate(load_examples(data, 32, 3, n))


def _repeat(batch: dict):
    while True:
        yield batch


@torch.no_grad()
def _fixed_loss(model: torch.nn.Module, batch: dict, seeds=range(6)) -> float:
    """The loss on ``batch`` averaged over fixed noise draws (deterministic)."""
    model.eval()
    total = sum(float(model.training_loss(batch, torch.Generator().manual_seed(s))["loss"]) for s in seeds)
    model.train()
    return total / len(seeds)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_data: Path) -> None:
    cfg = TrainConfig(lr=3e-3, warmup_steps=0, max_steps=100, batch_size=2)
    state = build_state(cfg, torch.device("cpu"))
    batch = _fixed_batch(tiny_data)
    before = _fixed_loss(state.model, batch)
    batches = _repeat(batch)
    for _ in range(10):
        train_step(state, state.model, batches, cfg, torch.device("cpu"), None, None)
    after = _fixed_loss(state.model, batch)
    assert after < 0.9 * before, (before, after)  # measured: 0.945 -> 0.798


def test_resume_restores_state_exactly(tiny_data: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(lr=2e-3, warmup_steps=2, max_steps=10, batch_size=2, grad_accum=2)
    cpu = torch.device("cpu")
    batches = _repeat(_fixed_batch(tiny_data))
    first = build_state(cfg, cpu)
    for _ in range(3):
        train_step(first, first.model, batches, cfg, cpu, None, None)
    path = ckpt.save_checkpoint(tmp_path, first.step, first.state_dict(cfg))
    expected = train_step(first, first.model, batches, cfg, cpu, None, None)

    second = build_state(TrainConfig(**{**cfg.__dict__, "seed": 99}), cpu)  # different init, overwritten
    second.load_state_dict(ckpt.load_checkpoint(path))
    assert second.step == 3
    got = train_step(second, second.model, batches, cfg, cpu, None, None)
    assert got == expected  # same loss, grad norm and LR, bit for bit
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for name, a in first.ema.shadow.items():
        assert torch.equal(a, second.ema.shadow[name]), name
    assert first.scheduler.state_dict() == second.scheduler.state_dict()


def test_checkpoints_are_atomic_and_pruned(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, {"x": torch.tensor(step)}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000003.pt", "step-00000004.pt"]
    assert int(ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["x"]) == 4

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ckpt.save_checkpoint(tmp_path, 5, {"x": Unpicklable()}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003.pt", "step-00000004.pt"]


def _small_run(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), num_workers=0, max_steps=4, batch_size=2, warmup_steps=1,
                log_every=1, ckpt_every=2, keep_last=1, sample_every=4, sample_steps=2, grid_prompts=2,
                progress=False, shuffle_buffer=4, threads=1)
    return TrainConfig(**{**base, **kw})


def _log_steps(out: Path) -> list[int]:
    with open(out / "train_log.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_train_writes_checkpoints_logs_grids_and_resumes(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(_small_run(tiny_data, out))
    assert result["step"] == 4
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-00000004.pt"]
    assert (out / "samples" / "step-00000004.png").is_file() and (out / "samples" / "reference.png").is_file()
    assert _log_steps(out) == [1, 2, 3, 4]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    from model import LayerDiffModel

    assert LayerDiffModel.from_pretrained(out / "model").config.max_layers == 3

    result = train(_small_run(tiny_data, out, max_steps=6, resume=True))
    assert result["step"] == 6
    assert _log_steps(out) == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-00000006.pt"]


def test_snapshot_is_the_ema_model_when_the_clock_passed_its_minute(tiny_data: Path, tmp_path: Path) -> None:
    import json

    from model.train import snapshot_dir

    out = tmp_path / "run"
    train(_small_run(tiny_data, out, max_steps=3, snapshot_minutes=[1e-9, 1e6]))  # passed after step 1; never
    snap = snapshot_dir(out, 1e-9)
    assert json.loads((snap / "snapshot.json").read_text())["step"] == 1
    assert not snapshot_dir(out, 1e6).exists()
    # the same run stopped after one step saves the same EMA weights as its model
    train(_small_run(tiny_data, tmp_path / "one", max_steps=1))
    snapshot = LayerDiffModel.from_pretrained(snap).state_dict()
    one_step = LayerDiffModel.from_pretrained(tmp_path / "one" / "model").state_dict()
    final = LayerDiffModel.from_pretrained(out / "model").state_dict()
    assert all(torch.equal(snapshot[k], one_step[k]) for k in one_step)
    assert not all(torch.equal(snapshot[k], final[k]) for k in final)  # and not the model of step 3


def test_grid_png(tmp_path: Path) -> None:
    from PIL import Image

    layers = torch.rand(2, 7, 3, 32, 32) * 2 - 1
    present = torch.tensor([[1, 1, 1, 0, 1, 1, 0], [1, 1, 0, 0, 1, 0, 0]], dtype=torch.bool)
    path = save_grid(tmp_path / "g.png", layers, present, ["a red square", ""], [["a", "b", "c", ""]] * 2, cell=48)
    with Image.open(path) as img:
        assert img.width == 8 * 50 + 2 and img.mode == "RGB"


def test_cli_flags() -> None:
    cfg = parse_args(["--max-steps", "5", "--model-arg", "max_layers=2", "--no-tensorboard", "--num-workers", "2",
                      "--use-gpu", "--lr", "1e-4", "--snapshot-minutes", "10", "20.5"])
    assert (cfg.max_steps, cfg.model_args, cfg.tensorboard, cfg.num_workers, cfg.use_gpu, cfg.lr) == \
        (5, {"max_layers": 2}, False, 2, True, 1e-4)
    assert cfg.snapshot_minutes == [10.0, 20.5]
    assert parse_args([]) == TrainConfig()


@pytest.mark.slow
def test_ddp_two_cpu_workers_on_ray_train(tiny_data: Path, tmp_path: Path) -> None:
    import ray

    from model.train import run_ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        out = tmp_path / "ddp"
        result = run_ray(_small_run(tiny_data, out, num_workers=2, max_steps=2, ckpt_every=2, sample_every=100,
                                    tensorboard=False))
    finally:
        ray.shutdown()
    assert result["step"] == 2 and result["world_size"] == 2 and result["ranks_in_sync"]
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-00000002.pt"]
    assert _log_steps(out) == [1, 2]


def test_warmup_cosine_follows_steps_or_time_budget() -> None:
    from model.train import WarmupCosine

    s = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert s(0) == pytest.approx(1 / 11) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55) and s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    s.time_fraction = 0.5  # half the time budget used: past warmup, halfway down the cosine
    assert s(0) == pytest.approx(0.55) and s(100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))


def test_optimizer_scales_the_text_side_lr_and_spares_1d_params_from_decay() -> None:
    model = LayerDiffModel.from_config_name("tiny")
    opt = build_optimizer(model, TrainConfig(lr=1e-3, text_lr_scale=0.25, weight_decay=0.1))
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert len(group_of) == len(model.trainable_parameters())  # every trainable parameter, once
    for name, p in model.named_parameters():
        g = group_of[id(p)]
        text = name.startswith(("text_encoder.", "prompt_enhancer."))
        assert g["lr"] == pytest.approx(2.5e-4 if text else 1e-3), name
        assert g["weight_decay"] == (0.1 if p.ndim >= 2 else 0.0), name
