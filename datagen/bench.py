"""Pipeline benchmarks (BENCHMARKS.md).

``python -m datagen.bench`` (``make bench-pipeline``): the same stages as an in-process loop and
through Ray Data (stages fused into one actor pool) on the same demo items, and the shard
writer against plain ``tarfile`` writing the same bytes.

``python -m datagen.bench tar-read``: the first shard of a 200-item and of an 8,000-item tar (plain
and gzip): per-item read cost must not grow with the tar.

``python -m datagen.bench scale --items N`` (``make bench-scale``): N items from img2dataset-layout
tars through the real runner on Ray Data: items/s over time, driver and actor memory over time,
per-stage utilisation, and how to size the pools of a cluster from those figures.

``python -m datagen.bench photos --photos N``: the photo path alone: real photos through Ray Data
with the pipeline's ground (``matte``: the matting model) and with the classical ``contrast`` grounder.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import shutil
import statistics
import tarfile
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datagen.config import PipelineConfig, load_config
from datagen.item import Item
from datagen.runner import StageStats, init_ray, run, run_local, run_ray, stage_groups
from datagen.sources import list_items
from datagen.writer import write_shard


def _items(cfg: PipelineConfig, n: int) -> list[Item]:
    refs = list_items(cfg.source, n)
    return [Item(key=r.key, shard=0, index=i, uri=r.uri, source=r.descriptor) for i, r in enumerate(refs)]


def _timed(stream: Iterator[Item]) -> tuple[int, float, float, float]:
    """Items, wall seconds, images/s and seconds to the first result (start-up included)."""
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in stream]
    wall = stamps[-1] - t0
    return len(stamps), wall, len(stamps) / wall, stamps[0] - t0


def bench_photo_path(pipeline: str, n: int) -> list[tuple[str, int, float, float, int]]:
    """``n`` real photos (bundled and unseen, repeated) through Ray Data, 1 actor per stage: the
    pipeline as configured (its ground, ``matte``) and with the classical ``contrast`` ground."""
    from datagen.photobench import photo_sets
    from datagen.registry import get_backend

    sets = photo_sets()
    photos = list(sets["bundled"].values()) + list(sets["unseen"].values())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i in range(n):
            path, caption = photos[i % len(photos)]
            shutil.copy(path, folder / f"{i:04d}{path.suffix}")
            (folder / f"{i:04d}.txt").write_text(caption)
        cfg = load_config(pipeline, {"source_kind": "folder", "source_path": str(folder)})
        init_ray(cfg)
        classical = copy.deepcopy(cfg)
        classical.stages["ground"].backend = "contrast"
        classical.stages["ground"].params = get_backend("ground", "contrast").Params()
        for label, c in ((f"photos, ground {cfg.stages['ground'].backend}", cfg),
                         ("photos, ground contrast (classical)", classical)):
            accepted: list[bool] = []
            items = _items(c, n)

            def stream(cfg_=c, items_=items, acc=accepted):
                for item in run_ray(cfg_, items_):
                    acc.append(item.ok)
                    yield item

            count, _, rate, first = _timed(stream())
            rows.append((label, count, rate, first, sum(accepted)))
    return rows


def bench_engines(pipeline: str, n: int) -> list[tuple[str, int, float, float, float]]:
    """The loop and Ray Data over the same ``n`` items (Ray started before the clock: a job starts
    it once); the Ray row is the pipeline's own config: CPU stages fused into one pool."""
    cfg = load_config(pipeline)
    rows = [("in-process loop", *_timed(run_local(cfg, _items(cfg, n))))]
    t0 = time.perf_counter()
    init_ray(cfg)
    ray_start = time.perf_counter() - t0
    groups = " + ".join("/".join(g) for g in stage_groups(cfg))
    rows.append((f"Ray Data, pools: {groups}", *_timed(run_ray(cfg, _items(cfg, n)))))
    unfused = copy.deepcopy(cfg)
    unfused.ray.fuse = False
    rows.append(("Ray Data, one pool per stage (ray.fuse: false)", *_timed(run_ray(unfused, _items(unfused, n)))))
    print(f"(Ray start-up, not counted above: {ray_start:.1f} s)")
    return rows


def bench_writer(n_items: int = 128, repeats: int = 7, seed: int = 0) -> tuple[dict[str, float], int]:
    """Median MB/s of ``write_shard`` (tar + sha256 while writing + fsync + rename + manifest), of
    plain ``tarfile`` writing the same members, and of plain ``tarfile`` + fsync (the same
    durability), interleaved, each into a fresh file. Dirty pages are flushed (``os.sync``) before
    each timed write, so that no write pays for writing back an earlier one's bytes (the writer's
    fsync would otherwise wait for the plain tars the previous round left in the page cache).

    The members are incompressible random bytes in the sizes of real samples (PNG data is
    incompressible too), so the figure does not depend on running the stages first.
    """
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n_items):
        it = Item(key=f"bench-{i:06d}", shard=0, index=i, uri="", source={}, num_layers=1)
        it.members = {s: rng.bytes(int(rng.integers(20_000, 150_000)))
                      for s in ("image.png", "bg.png", "fg.0.png", "mask.0.png")}
        it.members.update(txt=b"a caption", json=b"{}")
        items.append(it)
    members = [(f"{it.key}.{s}", d) for it in items for s, d in it.members.items()]
    times: dict[str, list[float]] = {"ours": [], "plain": [], "plain+fsync": []}

    def plain(path: Path, sync: bool) -> None:
        with open(path, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
            if sync:
                f.flush()
                os.fsync(f.fileno())

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "shards").mkdir()
        (out / "manifests").mkdir()
        for r in range(repeats):
            os.sync()
            t0 = time.perf_counter()
            m = write_shard(out, r, items, "x", {}, 0.0)
            times["ours"].append(time.perf_counter() - t0)
            for name, sync in (("plain", False), ("plain+fsync", True)):
                os.sync()
                t0 = time.perf_counter()
                plain(out / f"{name}-{r}.tar", sync)
                times[name].append(time.perf_counter() - t0)
    return {k: m["bytes"] / 1e6 / statistics.median(v) for k, v in times.items()}, m["bytes"]


# -- scale -----------------------------------------------------------------------------------


def write_img2dataset_tars(folder: Path, n_items: int, per_tar: int = 1000, size: int = 256,
                           compress: bool = False) -> str:
    """img2dataset's output layout: ``00000.tar`` ... with ``{tar:05d}{i:04d}.jpg/.txt/.json`` per
    item (generated scenes as JPEG, their captions, img2dataset's json fields). Returns the
    brace pattern of the tars."""
    from PIL import Image

    from datagen.scenes import make_scene

    folder.mkdir(parents=True, exist_ok=True)
    n_tars = math.ceil(n_items / per_tar)
    suffix = ".tar.gz" if compress else ".tar"
    for t in range(n_tars):
        path = folder / f"{t:05d}{suffix}"
        if path.exists():
            continue
        tmp = path.with_name(f".{path.name}.tmp")
        with tarfile.open(tmp, "w:gz" if compress else "w") as tf:
            for i in range(t * per_tar, min(n_items, (t + 1) * per_tar)):
                key = f"{t:05d}{i - t * per_tar:04d}"
                scene = make_scene(i, size=size)
                buf = io.BytesIO()
                Image.fromarray(scene.image).save(buf, format="JPEG", quality=90)
                meta = {"url": f"http://example.invalid/{key}.jpg", "key": key, "status": "success",
                        "caption": scene.caption, "width": size, "height": size,
                        "original_width": size, "original_height": size, "error_message": None}
                for ext, data in (("jpg", buf.getvalue()), ("txt", scene.caption.encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        tmp.rename(path)
    return str(folder / f"{{{0:05d}..{n_tars - 1:05d}}}{suffix}")


@dataclass
class Sample:
    t: float
    items: int
    driver_mb: float
    actors_mb: float
    actors: int


@dataclass
class Monitor:
    """Samples items done and resident memory of the driver and of the stage actors."""

    stats: StageStats
    every: float = 2.0
    samples: list[Sample] = field(default_factory=list)
    marks: dict[int, float] = field(default_factory=dict)  # items -> driver MB when first reached

    def __post_init__(self) -> None:
        import psutil

        self._me = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = time.perf_counter()

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        import psutil

        actors = []
        for p in self._me.children(recursive=True):
            try:
                if "StageGroup" in " ".join(p.cmdline()):
                    actors.append(p.memory_info().rss)
            except psutil.Error:
                continue
        driver = self._me.memory_info().rss / 1e6
        s = Sample(time.perf_counter() - self._t0, self.stats.items, driver, sum(actors) / 1e6, len(actors))
        self.samples.append(s)
        for mark in (1000, 10_000):
            if s.items >= mark and mark not in self.marks:
                self.marks[mark] = driver


def bench_scale(n_items: int, raw: Path, out: Path, per_tar: int, samples_per_shard: int,
                pipeline: str, every: float) -> dict[str, Any]:
    """Run ``n_items`` from img2dataset tars through the runner on Ray Data, monitored."""
    t0 = time.perf_counter()
    pattern = write_img2dataset_tars(raw, n_items, per_tar)
    made = time.perf_counter() - t0
    shards = math.ceil(n_items / samples_per_shard)
    cfg = load_config(pipeline, {"source_kind": "tars", "source_path": pattern, "output": str(out),
                                 "shards": shards, "samples_per_shard": samples_per_shard})
    init_ray(cfg)
    stats = StageStats()
    with Monitor(stats, every=every) as mon:
        summary = run(cfg, engine="ray", progress=False, stats=stats)
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    return {"items": n_items, "tars_seconds": made, "summary": summary, "samples": mon.samples,
            "marks": mon.marks, "busy": stats.busy, "cfg": cfg, "cpus": cpus}


def report_scale(r: dict[str, Any]) -> str:
    cfg: PipelineConfig = r["cfg"]
    samples: list[Sample] = r["samples"]
    wall = samples[-1].t
    lines = [f"{r['items']} items, {len(cfg.stages)} stages in pools "
             f"{' + '.join('/'.join(g) for g in stage_groups(cfg))}, {r['cpus']:.0f} CPUs; "
             f"{wall:.0f} s, {r['items'] / wall:.1f} items/s overall "
             f"({r['summary'].samples} samples, {sum(r['summary'].rejected.values())} rejected)", "",
             "| t (s) | items | items/s (since last row) | driver RSS MB | actors | actors RSS MB |",
             "|---|---|---|---|---|---|"]
    step = max(1, len(samples) // 12)
    prev = Sample(0.0, 0, 0, 0, 0)
    for s in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        rate = (s.items - prev.items) / max(1e-9, s.t - prev.t)
        lines.append(f"| {s.t:.0f} | {s.items} | {rate:.1f} | {s.driver_mb:.0f} | {s.actors} | {s.actors_mb:.0f} |")
        prev = s
    if 1000 in r["marks"] and 10_000 in r["marks"]:
        lines.append(f"\ndriver RSS after 10,000 items / after 1,000: "
                     f"{r['marks'][10_000] / r['marks'][1000]:.2f}x (bar <= 1.2x)")
    elif 1000 in r["marks"]:
        lines.append(f"\ndriver RSS after 1,000 items {r['marks'][1000]:.0f} MB, at the end "
                     f"{samples[-1].driver_mb:.0f} MB ({samples[-1].driver_mb / r['marks'][1000]:.2f}x)")
    busy: Counter = r["busy"]
    total = sum(busy.values())
    # actor-seconds: the pool's size integrated over the run (actors start and stop on demand)
    actor_s = sum(b.actors * (b.t - a.t) for a, b in zip(samples, samples[1:], strict=False))
    lines += ["", "| stage | busy s (wall, in its actor) | per item | share of busy time | actors for 100 items/s |",
              "|---|---|---|---|---|"]
    for stage in cfg.stages:
        per = busy[stage] / r["items"]
        lines.append(f"| {stage} ({cfg.stages[stage].backend}) | {busy[stage]:.1f} | {per * 1000:.1f} ms | "
                     f"{busy[stage] / max(total, 1e-9):.0%} | {math.ceil(100 * per)} |")
    lines += ["", f"utilisation: the stages were busy {total:.0f} s of {actor_s:.0f} actor-seconds "
              f"({total / max(1e-9, actor_s):.0%}; the rest is start-up and waiting for input) on "
              f"{r['cpus']:.0f} CPUs. Sizing: a stage needs (target items/s) x (its seconds per item) actors "
              "at the same CPU share; fused CPU stages share one pool sized by their sum, a GPU stage "
              "gets its own pool sized from its GPU seconds per item."]
    return "\n".join(lines)


def bench_tar_read(small: int = 200, large: int = 8000, samples_per_shard: int = 32, size: int = 128,
                   pipeline: str = "pipelines/default.yaml", engine: str = "local",
                   repeats: int = 3) -> list[tuple[str, float]]:
    """Seconds for the first shard of a ``small``-item tar and of a ``large``-item tar (plain and
    gzip, best of ``repeats``): reading an item must not cost more in a larger tar."""
    import gzip
    import shutil

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (small, large):
            raw = Path(tmp) / f"raw-{n}"
            plain = write_img2dataset_tars(raw, n, per_tar=n, size=size)
            with open(raw / "00000.tar", "rb") as src, gzip.open(raw / "00000.tar.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            for pattern in (plain, plain.replace(".tar", ".tar.gz")):
                best = math.inf
                for r in range(repeats):  # the fastest of a few runs: the machine is shared
                    cfg = load_config(pipeline, {"source_kind": "tars", "source_path": pattern, "shards": 1,
                                                 "output": str(Path(tmp) / f"out-{n}-{len(rows)}-{r}"),
                                                 "samples_per_shard": samples_per_shard, "image": {"size": size}})
                    t0 = time.perf_counter()
                    run(cfg, engine=engine, progress=False)
                    best = min(best, time.perf_counter() - t0)
                rows.append((f"{n}-item {'.tar.gz' if pattern.endswith('.gz') else '.tar'}", best))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="pipeline", choices=("pipeline", "scale", "tar-read", "photos"))
    parser.add_argument("--pipeline", default="pipelines/default.yaml")
    parser.add_argument("-n", type=int, default=500, help="pipeline: items per engine run")
    parser.add_argument("--items", type=int, default=10_000, help="scale: items")
    parser.add_argument("--per-tar", type=int, default=1000, help="scale: items per source tar")
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--raw", type=Path, help="scale: keep the source tars here (default: a temp dir)")
    parser.add_argument("--photos", type=int, default=24, help="photos: real photos per run")
    parser.add_argument("--every", type=float, default=5.0, help="scale: seconds between samples")
    args = parser.parse_args()
    if args.command == "photos":
        photo_rows = bench_photo_path(args.pipeline, args.photos)
        print(f"\n| photo path ({args.photos} real photos, Ray Data, 1 actor/stage) | items | accepted | images/s "
              "(start-up included) | s to first result |\n|---|---|---|---|---|")
        for name, count, rate, first, ok in photo_rows:
            print(f"| {name} | {count} | {ok} | {rate:.2f} | {first:.1f} |")
        return
    if args.command == "tar-read":
        rows = bench_tar_read(pipeline=args.pipeline)
        base = {kind: t for name, t in rows[:2] for kind in [name.split(" ", 1)[1]]}
        print(f"\n| first shard (32 items, {args.pipeline}, --engine local, best of 3) | s | x 200-item tar |"
              "\n|---|---|---|")
        for name, t in rows:
            print(f"| {name} | {t:.1f} | {t / base[name.split(' ', 1)[1]]:.2f} |")
        return
    if args.command == "scale":
        with tempfile.TemporaryDirectory() as tmp:
            raw = args.raw or Path(tmp) / "raw"
            r = bench_scale(args.items, raw, Path(tmp) / "out", args.per_tar, args.samples_per_shard,
                            args.pipeline, args.every)
        print(f"(source tars written in {r['tars_seconds']:.0f} s, {os.cpu_count()} cores)\n")
        print(report_scale(r))
        return
    writer, size = bench_writer()
    rows = bench_engines(args.pipeline, args.n)
    loop_wall = rows[0][2]
    print(f"\n| engine ({args.n} demo items, {args.pipeline}) | items | wall s | x loop | images/s | "
          "s to first result |\n|---|---|---|---|---|---|")
    for name, count, wall, rate, first in rows:
        print(f"| {name} | {count} | {wall:.1f} | {wall / loop_wall:.2f} | {rate:.2f} | {first:.1f} |")
    print(f"\n| shard writer ({size / 1e6:.0f} MB shard, median of 7) | MB/s | writer / this |\n|---|---|---|\n"
          f"| datagen.writer.write_shard (sha256 while writing, fsync, rename, manifest) | {writer['ours']:.0f} | |")
    for name in ("plain", "plain+fsync"):
        print(f"| {name.replace('plain', 'plain tarfile, same members')} | {writer[name]:.0f} | "
              f"{writer['ours'] / writer[name]:.2f} |")


if __name__ == "__main__":
    main()
