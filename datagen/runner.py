"""Run a pipeline: list source items, stream them through the stages, write complete shards.

Two engines over the same stage objects: ``ray`` (Ray Data, one actor pool per stage; the
default, locally or on a cluster) and ``local`` (a plain in-process loop, for debugging and as
the baseline of the pipeline benchmark).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from datagen.config import ConfigError, PipelineConfig
from datagen.item import Item
from datagen.registry import STAGES, get_backend
from datagen.sources import list_items
from datagen.writer import clean_temporaries, read_verified_manifest, write_index, write_shard

log = logging.getLogger("datagen")


@dataclass
class RunSummary:
    shards_written: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    samples: int = 0
    rejected: Counter = field(default_factory=Counter)  # (stage, reason) -> count
    seconds: float = 0.0
    index: dict[str, Any] = field(default_factory=dict)

    def report(self) -> str:
        lines = [f"shards written {len(self.shards_written)}, already complete {len(self.shards_skipped)}; "
                 f"dataset: {self.index.get('totals', {}).get('samples', 0)} samples in "
                 f"{len(self.index.get('shards', []))} shards",
                 f"this run: {self.samples} samples, {sum(self.rejected.values())} rejected, "
                 f"{self.seconds:.1f} s"]
        for (stage, reason), n in self.rejected.most_common(10):
            lines.append(f"  rejected x{n} at {stage}: {reason}")
        return "\n".join(lines)


def plan_items(cfg: PipelineConfig, out: Path) -> tuple[list[Item], dict[int, int], list[int]]:
    """Items of the shards still to build, items expected per shard, and the shards already done."""
    p = cfg.samples_per_shard
    refs = list_items(cfg.source, cfg.shards * p)
    if not refs:
        raise ConfigError(f"source {cfg.source.kind} {cfg.source.path or ''}: no items found")
    keys = Counter(r.key for r in refs)
    dup = [k for k, n in keys.items() if n > 1]
    if dup:
        raise ConfigError(f"source yields duplicate key {dup[0]!r}")
    n_shards = math.ceil(len(refs) / p)
    if n_shards < cfg.shards:
        log.warning("source has %d items: %d shard(s) instead of %d", len(refs), n_shards, cfg.shards)
    sha = cfg.sha256()
    done = [s for s in range(n_shards) if read_verified_manifest(out, s, sha) is not None]
    items, expected = [], {}
    for s in range(n_shards):
        if s in done:
            continue
        chunk = refs[s * p:(s + 1) * p]
        expected[s] = len(chunk)
        items += [Item(key=r.key, shard=s, index=i, uri=r.uri, source=r.descriptor) for i, r in enumerate(chunk)]
    return items, expected, done


def check_output(cfg: PipelineConfig, out: Path) -> None:
    """Refuse to mix samples of two configs in one OUT."""
    import json

    index = out / "manifest.json"
    if index.is_file():
        try:
            old = json.loads(index.read_text()).get("config_sha256")
        except (OSError, json.JSONDecodeError):
            return
        if old and old != cfg.sha256():
            raise ConfigError(f"{out} holds a dataset built with another config (config_sha256 {old[:12]}, "
                              f"now {cfg.sha256()[:12]}); choose another OUT or delete it")


def run_local(cfg: PipelineConfig, items: list[Item]) -> Iterator[Item]:
    """The plain in-process loop: every stage built once here, items in batches."""
    stages = []
    for name in STAGES:
        try:
            stages.append(cfg.build_stage(name))
        except Exception as err:  # noqa: BLE001 - a stage that cannot start stops the run, clearly
            raise PipelineError(f"{name} ({cfg.stages[name].backend}) could not start: "
                                f"{type(err).__name__}: {err}") from err
    bs = max(cfg.stages[s].batch_size for s in STAGES)
    for start in range(0, len(items), bs):
        batch = items[start:start + bs]
        for stage in stages:
            stage.run_items(batch)
        yield from batch


def init_ray(cfg: PipelineConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=True, configure_logging=False)


def run_ray(cfg: PipelineConfig, items: list[Item]) -> Iterator[Item]:
    """Ray Data streaming: one ``map_batches`` actor pool per stage; results back to the driver."""
    import ray

    init_ray(cfg)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows its own bar over items and shards
    ctx.verbose_stats_logs = False
    block = max(1, min(cfg.stages[s].batch_size for s in STAGES))
    ds = ray.data.from_items([{"record": it.to_bytes()} for it in items],
                             override_num_blocks=max(1, math.ceil(len(items) / block)))
    for stage in STAGES:
        sc = cfg.stages[stage]
        backend = get_backend(stage, sc.backend)
        remote_args: dict[str, Any] = {}
        runtime_env = getattr(backend, "runtime_env", None)
        if callable(runtime_env) and (env := runtime_env(sc.params)):
            remote_args["runtime_env"] = env
        ds = ds.map_batches(backend, fn_constructor_kwargs={"params": sc.params, "context": cfg.context(stage)},
                            compute=ray.data.ActorPoolStrategy(size=sc.actors), batch_size=sc.batch_size,
                            batch_format="numpy", num_cpus=sc.num_cpus, num_gpus=sc.num_gpus or None,
                            **remote_args)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for record in batch["record"]:
                yield Item.from_bytes(record)
    except Exception as err:  # noqa: BLE001 - items never raise (stages record them); this is a stage that cannot run
        raise PipelineError(_root_cause(err)) from err


class PipelineError(RuntimeError):
    """A stage could not run at all (e.g. its model failed to load): the run stops."""


def _root_cause(err: BaseException) -> str:
    """The last 'SomeError: message' line of a (Ray-wrapped) exception, and the stage it came from."""
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    cause = next((ln for ln in reversed(lines) if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", ln)),
                 lines[-1] if lines else type(err).__name__)
    stage = re.search(r"MapBatches\((\w+)\)", text)
    return f"{stage.group(1) + ' could not run: ' if stage else ''}{cause}"


def run(cfg: PipelineConfig, engine: str = "ray", progress: bool = True) -> RunSummary:
    """Build every missing shard of ``cfg`` and refresh the dataset index."""
    t0 = time.time()
    out = Path(cfg.output)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "manifests").mkdir(parents=True, exist_ok=True)
    check_output(cfg, out)
    clean_temporaries(out)
    items, expected, done = plan_items(cfg, out)
    summary = RunSummary(shards_skipped=done)
    sha, stages = cfg.sha256(), cfg.stage_identities()
    if items:
        stream = run_ray(cfg, items) if engine == "ray" else run_local(cfg, items)
        _write_as_completed(out, stream, expected, sha, stages, summary, progress, len(items))
    summary.index = write_index(out, cfg.to_dict(), sha)
    summary.seconds = time.time() - t0
    return summary


def _write_as_completed(out: Path, stream: Iterable[Item], expected: dict[int, int], sha: str,
                        stages: dict[str, Any], summary: RunSummary, progress: bool, total: int) -> None:
    buckets: dict[int, list[Item]] = defaultdict(list)
    started = time.time()
    bar = tqdm(total=total, unit="img", desc="items", disable=not progress, dynamic_ncols=True)
    for item in stream:
        buckets[item.shard].append(item)
        bar.update(1)
        if not item.ok:
            summary.rejected[(item.rejected["stage"], _reason_class(item.rejected["reason"]))] += 1
        if len(buckets[item.shard]) == expected[item.shard]:
            shard_items = buckets.pop(item.shard)
            manifest = write_shard(out, item.shard, shard_items, sha, stages, time.time() - started)
            summary.shards_written.append(item.shard)
            summary.samples += manifest["samples"]
            bar.set_postfix(shards=f"{len(summary.shards_written)}/{len(expected)}")
    bar.close()
    if buckets:
        missing = {s: expected[s] - len(v) for s, v in buckets.items()}
        raise RuntimeError(f"stream ended with incomplete shards (missing items per shard: {missing})")


def _reason_class(reason: str) -> str:
    """Group reasons for the summary: drop numbers and quoted details."""
    head = reason.split(":", 1)[0] if reason.startswith(("not a readable image", "format")) else reason
    return " ".join(w for w in head.split() if not any(c.isdigit() for c in w))[:80]
