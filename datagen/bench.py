"""`make bench-pipeline`: Ray's overhead and scaling against a plain loop, and the writer's speed.

Runs the same stage objects three ways over the same demo items (in-process loop; Ray Data with
1 and with 2 actors per stage) and times the shard writer against plain ``tarfile`` writing the
same bytes. Then the photo path alone: a folder of real photos through Ray Data with the pipeline's
ground (``matte``: the matting model) and with the classical ``contrast`` grounder, side by side.
Prints Markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import io
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from datagen.config import load_config
from datagen.item import Item
from datagen.runner import init_ray, run_local, run_ray
from datagen.sources import list_items
from datagen.writer import write_shard


def _items(cfg, n: int) -> list[Item]:
    refs = list_items(cfg.source, n)
    return [Item(key=r.key, shard=0, index=i, uri=r.uri, source=r.descriptor) for i, r in enumerate(refs)]


def _timed(stream) -> tuple[int, float, float]:
    """Items, images/s (start-up included) and seconds to the first result (actor start-up)."""
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in stream]
    return len(stamps), len(stamps) / (stamps[-1] - t0), stamps[0] - t0


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

            count, rate, first = _timed(stream())
            rows.append((label, count, rate, first, sum(accepted)))
    return rows


def bench_engines(pipeline: str, n: int) -> list[tuple[str, int, float, float]]:
    cfg = load_config(pipeline)
    rows = [("in-process loop", *_timed(run_local(cfg, _items(cfg, n))))]
    init_ray(cfg)
    for actors in (1, 2):
        c = copy.deepcopy(cfg)
        for sc in c.stages.values():
            sc.actors = actors
            sc.num_cpus = sc.num_cpus / actors  # the same CPU budget split over more actors
        rows.append((f"Ray Data, {actors} actor(s)/stage", *_timed(run_ray(c, _items(c, n)))))
    return rows


def bench_writer(pipeline: str, n: int, repeats: int = 5) -> tuple[float, float, int]:
    cfg = load_config(pipeline)
    items = [it for it in run_local(cfg, _items(cfg, n)) if it.ok]
    members = [(f"{it.key}.{s}", d) for it in items for s, d in it.members.items()]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "shards").mkdir()
        (out / "manifests").mkdir()
        t0 = time.perf_counter()
        for _ in range(repeats):
            m = write_shard(out, 0, items, "x", {}, 0.0)
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(repeats):
            with tarfile.open(out / "plain.tar", "w") as tf:
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        plain = time.perf_counter() - t0
    mb = m["bytes"] * repeats / 1e6
    return mb / ours, mb / plain, m["bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline", default="pipelines/default.yaml")
    parser.add_argument("-n", type=int, default=96, help="items per engine run")
    parser.add_argument("--photos", type=int, default=24, help="photos per photo-path run (0: skip)")
    parser.add_argument("--photos-only", action="store_true", help="only the photo-path runs")
    args = parser.parse_args()
    if args.photos:
        photo_rows = bench_photo_path(args.pipeline, args.photos)
        print(f"\n| photo path ({args.photos} real photos, Ray Data, 1 actor/stage) | items | accepted | images/s "
              "(start-up included) | s to first result |\n|---|---|---|---|---|")
        for name, count, rate, first, ok in photo_rows:
            print(f"| {name} | {count} | {ok} | {rate:.2f} | {first:.1f} |")
        if args.photos_only:
            return
    writer = bench_writer(args.pipeline, 16)
    rows = bench_engines(args.pipeline, args.n)
    print(f"\n| engine ({args.n} demo items, {args.pipeline}) | items | images/s | s to first result |"
          "\n|---|---|---|---|")
    for name, count, rate, first in rows:
        print(f"| {name} | {count} | {rate:.2f} | {first:.1f} |")
    print(f"\n| shard writer ({writer[2] / 1e6:.1f} MB shard) | MB/s |\n|---|---|\n"
          f"| datagen.writer.write_shard (sha256, fsync, rename, manifest) | {writer[0]:.0f} |\n"
          f"| plain tarfile, same bytes | {writer[1]:.0f} |")


if __name__ == "__main__":
    main()
