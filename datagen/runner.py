"""Run a pipeline: list source items, stream them through the stages, write complete shards.

Two engines over the same stage objects: ``ray`` (Ray Data; consecutive CPU stages fused into
one actor pool, GPU stages in pools of their own; locally or on a cluster) and ``local`` (a
plain in-process loop). ``auto`` (the default) picks the loop for small runs on one machine.

Faults: an item's own problem is a recorded rejection; a system fault (memory, device, I/O) is
retried in the stage, then stops the run with the shard named and nothing written for it.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import math
import os
import re
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, groupby, islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from datagen.config import ConfigError, PipelineConfig, SourceConfig
from datagen.item import Item
from datagen.registry import STAGES, get_backend
from datagen.sources import Position, SourceRef, iter_source_from
from datagen.stages.base import Stage, StageContext, StageFault, batches, limit_threads
from datagen.writer import clean_temporaries, read_verified_manifest, shard_name, write_index, write_shard

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


class ShardPlanner:
    """A source's items, listed a shard at a time when the shard is asked for: shard s takes
    items [s*P, (s+1)*P) of the source's listing, and nothing past the shards asked for is read.

    Shards are asked for in about increasing order; todo shards listed on the way to a later
    one are kept until asked for. Where each shard starts is remembered, and done shards
    tell where they ended (their manifest's ``source_end``), so the shards after done ones,
    or one asked for again (a retried Ray read), are listed from there: the tars before are
    not opened.
    """

    def __init__(self, source: SourceConfig, samples_per_shard: int, todo: Iterable[int],
                 starts: dict[int, Position | None] | None = None) -> None:
        self.source, self.p, self.todo = source, samples_per_shard, set(todo)
        self.starts: dict[int, Position | None] = {0: None, **(starts or {})}
        self.sizes: dict[int, int] = {}  # items of each shard listed so far
        self._ahead: dict[int, list[Item]] = {}
        self._cursor: Iterator[tuple[SourceRef, Position]] | None = None
        self._at = 0  # the shard whose first item the cursor gives next

    def items(self, shard: int) -> list[Item]:
        """The items of ``shard`` ([] past the source's end)."""
        if shard in self._ahead:
            return self._ahead.pop(shard)
        begin = max(s for s in self.starts if s <= shard)
        if self._cursor is None or not begin <= self._at <= shard:
            self._cursor, self._at = iter_source_from(self.source, self.starts[begin]), begin
        while True:
            s, chunk = self._at, list(islice(self._cursor, self.p))
            self._at += 1
            if chunk:
                self.starts[self._at] = chunk[-1][1]
            items = [Item(key=r.key, shard=s, index=i, uri=r.uri, source=r.descriptor)
                     for i, (r, _) in enumerate(chunk)]
            self.sizes[s] = len(items)
            if s == shard:
                return items
            if s in self.todo and items:
                self._ahead[s] = items

    def info(self, shard: int) -> tuple[int, Position | None]:
        """A listed shard's item count and the source position after its last item."""
        return self.sizes[shard], self.starts.get(shard + 1)

    def listed(self) -> dict[int, int]:
        return dict(self.sizes)


@dataclass
class Plan:
    """The shards still to build (listed lazily by ``planner``), the done ones and their items."""

    todo: list[int]
    done: list[int]
    done_items: int
    planner: ShardPlanner

    def shards(self) -> Iterator[list[Item]]:
        """Each todo shard's items, listed as the stream needs them, until the source ends."""
        for s in self.todo:
            items = self.planner.items(s)
            if not items:
                return
            yield items


def plan_shards(cfg: PipelineConfig, out: Path, verify: bool = False) -> Plan:
    """Which shards are done (trusted by size and mtime; ``verify`` re-hashes them) and a lazy
    planner for the others; the source is not listed here."""
    sha = cfg.sha256()
    todo, done, done_items, starts = [], [], 0, {}
    for s in range(cfg.shards):
        manifest = read_verified_manifest(out, s, sha, verify, refresh=True)
        if manifest is None:
            todo.append(s)
            continue
        done.append(s)
        done_items += manifest["samples"] + len(manifest["rejected"])
        end = manifest.get("source_end")
        if isinstance(end, list) and len(end) == (2 if cfg.source.kind == "tars" else 1) and \
                all(isinstance(v, int) and v >= 0 for v in end):
            starts[s + 1] = end
    return Plan(todo, done, done_items, ShardPlanner(cfg.source, cfg.samples_per_shard, todo, starts))


def warn_if_short(cfg: PipelineConfig, plan: Plan, listed: dict[int, int]) -> None:
    """The "source has N items: M shards instead of K" warning, once the listing has found the
    source's end (a shard short of samples_per_shard)."""
    if not any(n < cfg.samples_per_shard for n in listed.values()):
        return
    items = plan.done_items + sum(listed.values())
    shards = len(plan.done) + sum(1 for n in listed.values() if n)
    if shards < cfg.shards:
        log.warning("source has %d items: %d shard(s) instead of %d", items, shards, cfg.shards)


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


LOCAL_MAX_ITEMS = 256  # auto: up to this many items on one machine, the in-process loop wins (no start-up)


def choose_engine(cfg: PipelineConfig, n_items: int) -> tuple[str, str]:
    """The engine ``auto`` picks, and why: Ray for a cluster, a GPU or its own environment, or
    enough items to pay for the actors' start-up; the in-process loop for small local runs."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return "ray", "a Ray cluster address is set"
    for stage, sc in cfg.stages.items():
        if sc.num_gpus > 0:
            return "ray", f"stage {stage} uses a GPU"
        if _runtime_env(stage, sc):
            return "ray", f"stage {stage} runs in its own Python environment"
    if n_items > LOCAL_MAX_ITEMS and (os.cpu_count() or 1) > 1:
        return "ray", f"{n_items} items: Ray Data runs the stages on every core"
    return "local", f"{n_items} items on one machine: the in-process loop starts faster than Ray"


def _runtime_env(stage: str, sc: Any) -> dict[str, Any] | None:
    runtime_env = getattr(get_backend(stage, sc.backend), "runtime_env", None)
    return runtime_env(sc.params) if callable(runtime_env) else None


class StageStartError(RuntimeError):
    """A stage could not be built (its model failed to load)."""


class StageGroup:
    """Consecutive stages run in one process, each over its own batch size: one Ray Data actor
    pool for the group (fused stages share an actor and pass items in memory), or the whole
    pipeline in the in-process loop. Records the seconds each stage was busy."""

    def __init__(self, specs: list[tuple[str, str, Any, StageContext, int]]) -> None:
        self.stages: list[tuple[str, Stage, int]] = []
        for stage, backend, params, context, batch_size in specs:
            try:
                obj = get_backend(stage, backend)(params, context)
            except Exception as err:  # noqa: BLE001 - a stage that cannot start stops the run, clearly
                raise StageStartError(f"{stage} ({backend}) could not start: {type(err).__name__}: {err}") from err
            limit_threads(context.num_cpus)  # again: the backend may have imported torch meanwhile
            self.stages.append((stage, obj, batch_size))

    @classmethod
    def of(cls, cfg: PipelineConfig, stages: list[str]) -> StageGroup:
        return cls(group_specs(cfg, stages))

    def run_items(self, items: list[Item], busy: Counter) -> None:
        for stage, obj, batch_size in self.stages:
            t0 = time.perf_counter()
            for batch in batches(items, batch_size):
                obj.run_items(batch)
            busy[stage] += time.perf_counter() - t0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The Ray Data adapter: ``{"record": pickled Items, "busy": JSON seconds per stage}``."""
        items = [Item.from_bytes(b) for b in batch["record"]]
        busy: Counter = Counter()
        self.run_items(items, busy)
        share = {stage: t / max(1, len(items)) for stage, t in busy.items()}
        rows = []
        for old in batch.get("busy", [None] * len(items)):
            row = Counter(json.loads(old)) if old else Counter()
            row.update(share)
            rows.append(json.dumps(row))
        return {"record": np.array([it.to_bytes() for it in items], dtype=object),
                "busy": np.array(rows, dtype=object)}


def group_specs(cfg: PipelineConfig, stages: list[str]) -> list[tuple[str, str, Any, StageContext, int]]:
    return [(s, cfg.stages[s].backend, cfg.stages[s].params, cfg.context(s), cfg.stages[s].batch_size)
            for s in stages]


def stage_groups(cfg: PipelineConfig) -> list[list[str]]:
    """Stages fused into actor pools: consecutive CPU stages of the driver's environment share
    one pool (``ray.fuse``); a GPU stage or one with its own environment keeps its own pool."""
    groups: list[list[str]] = []
    fusable_last = False
    for stage in STAGES:
        sc = cfg.stages[stage]
        fusable = cfg.ray.fuse and sc.num_gpus == 0 and not _runtime_env(stage, sc)
        if groups and fusable and fusable_last:
            groups[-1].append(stage)
        else:
            groups.append([stage])
        fusable_last = fusable
    return groups


@dataclass
class StageStats:
    """Seconds each stage was busy, summed over items (per-stage utilisation), and items done."""

    busy: Counter = field(default_factory=Counter)
    items: int = 0


def run_local(cfg: PipelineConfig, items: Iterable[Item], stats: StageStats | None = None) -> Iterator[Item]:
    """The plain in-process loop: every stage built once here, items in batches."""
    try:
        group = StageGroup.of(cfg, list(STAGES))
    except StageStartError as err:
        raise PipelineError(str(err)) from err
    busy = stats.busy if stats is not None else Counter()
    bs = max(cfg.stages[s].batch_size for s in STAGES)
    # batches never mix shards: a fault fails one shard, and each shard is written as soon as it is done
    for n_shard, (_, shard_items) in enumerate(groupby(items, key=lambda it: it.shard)):
        chunk = list(shard_items)
        for batch in batches(chunk, bs, first_one=n_shard == 0):
            try:
                group.run_items(batch, busy)
            except StageFault as err:
                raise PipelineError(str(err)) from err
            yield from batch


def init_ray(cfg: PipelineConfig) -> bool:
    """Connect to the configured cluster or start a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
    return True


# An actor that dies (killed, out of host memory) is restarted and its batch retried this many
# times; a deterministic crash then fails the run instead of looping forever.
ACTOR_RESTARTS = 3


# Ray Data takes its input whole, so a long run streams through in windows of about this many items
# (whole shards): the driver holds one window's serialised items (~190 MB per 100,000) and lists the
# next window only when this one is done; each window starts its actor pools afresh (seconds, plus a
# model stage's load), a few percent of a window's work even on a cluster.
RAY_WINDOW_ITEMS = 100_000


def run_ray(cfg: PipelineConfig, items: Iterable[Item], stats: StageStats | None = None) -> Iterator[Item]:
    """Ray Data streaming: one ``map_batches`` actor pool per stage group; results to the driver."""
    import ray

    init_ray(cfg)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows its own bar over items and shards
    ctx.verbose_stats_logs = False
    busy = stats.busy if stats is not None else Counter()
    window = max(1, RAY_WINDOW_ITEMS // cfg.samples_per_shard) * cfg.samples_per_shard
    # Items are serialised as they are listed: the driver keeps ~0.3 KB per item, not the Items.
    for records in batches((it.to_bytes() for it in items), window):
        try:
            for batch in _stages_dataset(cfg, records).iter_batches(batch_size=None, batch_format="numpy",
                                                                      prefetch_batches=0):
                for record, row in zip(batch["record"], batch["busy"], strict=True):
                    busy.update(json.loads(row))
                    yield Item.from_bytes(record)
        except Exception as err:  # noqa: BLE001 - items never raise (stages record them); a stage cannot run
            raise PipelineError(_root_cause(err)) from err
        del records
        _release_memory()


def _release_memory() -> None:
    """Hand a finished window's freed memory back to the system: without it glibc keeps the
    fragmented heap and the driver's RSS climbed ~75 MB per 100,000-item window (flat with it)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _stages_dataset(cfg: PipelineConfig, records: list[bytes]) -> Any:
    """The stages over these serialised items as a Ray Data dataset (lazy: nothing runs yet)."""
    import ray

    # One block per batch of the first pool: results stream out batch by batch.
    block = min(cfg.stages[s].batch_size for s in STAGES)
    ds = ray.data.from_items([{"record": r} for r in records],
                             override_num_blocks=max(1, math.ceil(len(records) / block)))
    for group in stage_groups(cfg):
        scs = [cfg.stages[s] for s in group]
        env = _runtime_env(group[0], scs[0])
        # Fused stages run one after the other in an actor: it needs the largest share, not the sum;
        # the pool grows from one actor (a fast first result) to the group's total actor count.
        size = sum(sc.actors for sc in scs)
        compute = ray.data.ActorPoolStrategy(min_size=1, max_size=size) if len(group) > 1 and size > 1 \
            else ray.data.ActorPoolStrategy(size=scs[0].actors)
        with warnings.catch_warnings():
            # Ray Data has no named parameter for bounded actor restarts yet (its default is unbounded)
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map_batches(StageGroup, fn_constructor_kwargs={"specs": group_specs(cfg, group)},
                                # a pool batches for its smallest stage (fused stages each chunk
                                # their own): a large batch would hold back the first results
                                compute=compute, batch_size=min(sc.batch_size for sc in scs),
                                batch_format="numpy", num_cpus=max(sc.num_cpus for sc in scs),
                                num_gpus=max(sc.num_gpus for sc in scs) or None, runtime_env=env or None,
                                max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)
    return ds


class PipelineError(RuntimeError):
    """The run stops: a stage could not start or run (a system fault), or a shard failed."""


def _root_cause(err: BaseException) -> str:
    """The last 'SomeError: message' line of a (Ray-wrapped) exception, and the stage it came from."""
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    cause = next((ln for ln in reversed(lines) if re.match(r"^[A-Za-z_.]*(Error|Exception|Fault)\b.*:", ln)),
                 lines[-1] if lines else type(err).__name__)
    cause = re.sub(r"^[A-Za-z_.]*\.(\w+(Error|Exception|Fault))\b", r"\1", cause)  # datagen.x.StageFault -> StageFault
    stage = re.search(r"MapBatches\((\w+)\)", text)
    return f"{stage.group(1) + ' could not run: ' if stage else ''}{cause}"


def run(cfg: PipelineConfig, engine: str = "auto", progress: bool = True, verify: bool = False,
        stats: StageStats | None = None) -> RunSummary:
    """Build every missing shard of ``cfg`` and refresh the dataset index.

    A shard is written only when every one of its items came through the stages and its
    rejection rate is within ``max_rejection_rate``; a failed shard leaves no tar and no manifest,
    and the run ends with a :class:`PipelineError` naming it (after the other shards when only
    the rejection rate failed it). ``verify`` re-hashes complete shards instead of trusting
    their recorded size and mtime. ``stats`` collects stage busy time and items done as they go.
    """
    t0 = time.time()
    out = Path(cfg.output)
    try:
        (out / "shards").mkdir(parents=True, exist_ok=True)
        (out / "manifests").mkdir(parents=True, exist_ok=True)
        check_writable(out)
    except OSError as err:
        raise PipelineError(f"output {out} ({describe_disk(out)}) is not writable: {err}") from err
    check_output(cfg, out)
    clean_temporaries(out)
    plan = plan_shards(cfg, out, verify=verify)
    summary = RunSummary(shards_skipped=plan.done)
    sha, stages = cfg.sha256(), cfg.stage_identities()
    failed: dict[int, str] = {}
    shards = plan.shards()
    first: list[list[Item]] = []  # the first shard (is there work?), or enough to choose the engine
    ended = False
    while not ended and (not first or engine == "auto" and sum(map(len, first)) <= LOCAL_MAX_ITEMS):
        shard_items = next(shards, None)
        ended = shard_items is None
        if shard_items is not None:
            first.append(shard_items)
    if not first and not plan.done:
        raise ConfigError(f"source {cfg.source.kind} {cfg.source.path or ''}: no items found")
    if first:
        planned = sum(map(len, first)) if ended else len(plan.todo) * cfg.samples_per_shard
        if engine == "auto":
            engine, why = choose_engine(cfg, planned)
            log.info("engine %s: %s", engine, why)
        try:
            started_ray = engine == "ray" and init_ray(cfg)
        except Exception as err:  # noqa: BLE001 - Ray's start-up raises bare Exceptions
            raise PipelineError(f"Ray could not start: {type(err).__name__}: {err}") from err
        stats = stats if stats is not None else StageStats()
        pending = chain.from_iterable(chain(first, shards))
        if engine == "ray":
            # listed a window of shards at a time (from where the done shards ended); the loop
            # lists a shard as it needs it
            stream = run_ray(cfg, pending, stats)
        else:
            stream = run_local(cfg, pending, stats)
        try:
            failed = _write_as_completed(out, stream, plan.planner.info, sha, stages, summary, progress,
                                         planned, cfg.max_rejection_rate, stats)
        finally:
            stream.close()  # stop the stages now: a failing run must end, not wait on a stream
            if started_ray:
                import ray

                ray.shutdown()
    warn_if_short(cfg, plan, plan.planner.listed())
    summary.index = write_index(out, cfg.to_dict(), sha)
    summary.seconds = time.time() - t0
    if failed:
        raise PipelineError("; ".join(f"shard {shard_name(s)} not written: {why}" for s, why in sorted(failed.items())))
    return summary


def check_writable(out: Path) -> None:
    """Fail now, not after the first shard's work, when OUT cannot take a file."""
    probe = out / "shards" / f".write-probe.tmp-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def describe_disk(path: Path) -> str:
    """``filesystem at /mnt (12.3 MB free)``: which disk a write failed on, for the message."""
    p = path.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    mount = p
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        st = os.statvfs(p)
        free = f", {st.f_bavail * st.f_frsize / 1e6:.1f} MB free"
    except OSError:
        free = ""
    return f"filesystem mounted at {mount}{free}"


def _write_as_completed(out: Path, stream: Iterable[Item], info: Callable[[int], tuple[int, Position | None]],
                        sha: str, stages: dict[str, Any], summary: RunSummary, progress: bool, total: int,
                        max_rejection_rate: float, stats: StageStats) -> dict[int, str]:
    """Write each shard as its last item arrives (``info``: a listed shard's item count and where
    its items end in the source); the shards that failed their rejection ceiling."""
    buckets: dict[int, list[Item]] = defaultdict(list)
    expected: dict[int, tuple[int, Position | None]] = {}
    failed: dict[int, str] = {}
    started = time.time()
    bar = tqdm(total=total, unit="img", desc="items", disable=not progress, dynamic_ncols=True)
    for item in stream:
        buckets[item.shard].append(item)
        bar.update(1)
        stats.items += 1
        if not item.ok:
            summary.rejected[(item.rejected["stage"], _reason_class(item.rejected["reason"]))] += 1
        if item.shard not in expected:
            expected[item.shard] = info(item.shard)
        if len(buckets[item.shard]) < expected[item.shard][0]:
            continue
        shard_items = buckets.pop(item.shard)
        source_end = expected.pop(item.shard)[1]
        rejected = Counter(_reason_class(it.rejected["reason"]) for it in shard_items if not it.ok)
        rate = sum(rejected.values()) / len(shard_items)
        if rate > max_rejection_rate:
            top = ", ".join(f"{reason} x{n}" for reason, n in rejected.most_common(3))
            failed[item.shard] = (f"{sum(rejected.values())} of {len(shard_items)} items rejected ({rate:.0%} > "
                                  f"max_rejection_rate {max_rejection_rate:.0%}; {top})")
            log.error("shard %s: %s", shard_name(item.shard), failed[item.shard])
            continue
        try:
            manifest = write_shard(out, item.shard, shard_items, sha, stages, time.time() - started, source_end)
        except OSError as err:
            raise PipelineError(f"shard {shard_name(item.shard)}: writing to {out} failed "
                                f"({describe_disk(out)}): {type(err).__name__}: {err}") from err
        summary.shards_written.append(item.shard)
        summary.samples += manifest["samples"]
        bar.set_postfix(shards=len(summary.shards_written))
    bar.close()
    if buckets:
        missing = {shard_name(s): expected[s][0] - len(v) for s, v in buckets.items()}
        raise PipelineError(f"stream ended with incomplete shards (missing items per shard: {missing})")
    return failed


def _reason_class(reason: str) -> str:
    """Group reasons for the summary: numbers become N, a decoder's details are dropped."""
    head = reason.split(":", 1)[0] if reason.startswith(("not a readable image", "format")) else reason
    return re.sub(r"\d+(?:\.\d+)?", "N", " ".join(head.split()))[:80]
