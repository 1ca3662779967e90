"""``python -m manifests.serve_bench``: how fast the dataset browser serves a 10,000-sample dataset.

Synthesises a format-1 dataset of generated scenes (``datagen.scenes.make_scene``, their true
layers, written through ``datagen.writer.write_shard``; reused when OUT already holds it), starts
``python -m manifests serve``'s server on it, and measures

* the shard index: built cold (every tar's headers and json members) and loaded from its cache;
* ``/api/samples`` for gallery pages (plain, filtered, sorted);
* a full gallery page (24 samples) in headless Chromium (the system package): from navigation to
  every image, background and RGBA layer of the page loaded and every recomposition drawn, on
  pages not seen before (the server's image cache emptied first), and from a click on "next"
  (the gallery changes in place; the server prefetched that page while the previous one showed).

Prints a Markdown table for BENCHMARKS.md. Chromium flags: :data:`CHROMIUM_ARGS`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from datagen.format import SAMPLE_SCHEMA, LayerSample, psnr
from datagen.item import Item
from datagen.scenes import make_scene
from datagen.writer import read_verified_manifest, write_index, write_shard

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BENCH_STAGES = {stage: {"backend": "truth" if stage in ("caption", "ground", "segment", "inpaint") else name,
                        "model": None, "checkpoint": None, "version": "1"}
                for stage, name in (("decode", "scene"), ("caption", ""), ("ground", ""), ("segment", ""),
                                    ("inpaint", ""), ("assemble", "direct"))}


def launch_chromium(playwright: Any, **kwargs: Any) -> Any:
    """Headless system Chromium through Playwright (never a downloaded browser); Playwright gives
    each launch a fresh profile directory."""
    if not os.access(CHROMIUM, os.X_OK):
        raise FileNotFoundError(f"{CHROMIUM} is missing: `make browser-deps` installs the chromium package")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, **kwargs)


def scene_sample(seed: int, size: int) -> LayerSample:
    """A format-2 sample of generated scene ``seed`` from its true layers (json as the pipeline writes)."""
    scene = make_scene(seed, size=size)
    key = f"bench-{seed:06d}"
    layers = []
    for n, (mask, phrase, caption) in enumerate(zip(scene.masks, scene.phrases, scene.layer_captions, strict=True)):
        ys, xs = (mask > 0).nonzero()
        layers.append({"index": n, "phrase": phrase, "caption": caption, "score": 1.0,
                       "box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                       "area": round(float((mask > 0).mean()), 6), "extent": "amodal"})
    sample = LayerSample(key, scene.image, scene.background, scene.foregrounds, scene.masks, scene.caption)
    sample.meta = {
        "schema": SAMPLE_SCHEMA, "key": key, "width": size, "height": size, "caption": scene.caption,
        "background": {"caption": scene.background_caption}, "layers": layers,
        "source": {"uri": f"scene-gt:{seed}", "sha256": hashlib.sha256(scene.image.tobytes()).hexdigest()},
        "quality": {"recon_psnr": round(psnr(sample.recompose(), scene.image), 3),
                    "hole_share": round(float(scene.hole().mean()), 4)},
    }
    return sample


def _write_bench_shard(out: str, shard: int, per_shard: int, size: int, config_sha: str) -> int:
    t0 = time.perf_counter()
    items = []
    for i in range(per_shard):
        seed = shard * per_shard + i
        sample = scene_sample(seed, size)
        items.append(Item(key=sample.key, shard=shard, index=i, uri=f"scene-gt:{seed}", source={},
                          members=sample.to_members(), num_layers=sample.num_layers))
    write_shard(Path(out), shard, items, config_sha, BENCH_STAGES, time.perf_counter() - t0)
    return shard


def synthesise(out: Path, samples: int, per_shard: int, size: int, jobs: int) -> float:
    """Write (or complete) the benchmark dataset; returns the seconds spent writing."""
    config = {"source": {"kind": "synthetic-gt"}, "image_size": size, "samples_per_shard": per_shard,
              "bench": "manifests.serve_bench"}
    config_sha = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "manifests").mkdir(parents=True, exist_ok=True)
    todo = [s for s in range(samples // per_shard) if read_verified_manifest(out, s, config_sha) is None]
    t0 = time.perf_counter()
    if todo:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for n, shard in enumerate(pool.map(_write_bench_shard, [str(out)] * len(todo), todo,
                                               [per_shard] * len(todo), [size] * len(todo),
                                               [config_sha] * len(todo)), 1):
                if n % 10 == 0 or n == len(todo):
                    print(f"  wrote shard {shard:06d} ({n}/{len(todo)})", flush=True)
        write_index(out, config, config_sha)
    return time.perf_counter() - t0


def _get_json(url: str) -> tuple[float, Any]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as res:
        doc = json.loads(res.read())
    return (time.perf_counter() - t0) * 1000, doc


def _stats(ms: list[float]) -> str:
    ms = sorted(ms)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return f"{statistics.median(ms):.0f} | {p95:.0f} | {ms[-1]:.0f}"


def cpu_seconds() -> float:
    """CPU time (user + system) of this process (the server's threads run here) and all its
    descendants (Playwright's driver and every Chromium process)."""
    import psutil

    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass  # exited meanwhile
    return total


def browser_page_loads(url: str, pages: list[str], before_each: Any = None,
                       height: int = 1000) -> tuple[list[float], list[float]]:
    """Per page URL query: milliseconds from navigation start to the gallery page fully drawn,
    and the CPU milliseconds the server and Chromium spent on it (:func:`cpu_seconds`).
    ``before_each()`` runs before each navigation, e.g. to empty the server's image cache. The
    page is ready when the cards within the viewport (1400 x ``height``) are drawn: a tall one
    holds a whole page of cards."""
    from playwright.sync_api import sync_playwright

    times, cpu = [], []
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": height})
        page.goto(url + "?per_page=1")  # warm the static files and the connection
        page.wait_for_selector("#app[data-ready=gallery]")
        for query in pages:
            if before_each is not None:
                before_each()
            c0 = cpu_seconds()
            page.goto(url + query)
            page.wait_for_selector("#app[data-ready=gallery]", timeout=60_000)
            times.append(page.evaluate("performance.now()"))
            cpu.append((cpu_seconds() - c0) * 1000)
        browser.close()
    return times, cpu


def next_page_loads(url: str, first: str, clicks: int) -> tuple[list[float], list[float]]:
    """Milliseconds (wall, and CPU as in :func:`browser_page_loads`) from a click on "next" to the
    next page's first screen drawn, ``clicks`` times from the gallery page ``first``."""
    from playwright.sync_api import sync_playwright

    times, cpu = [], []
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url + first)
        page.wait_for_selector("#app[data-ready=gallery]")
        for _ in range(clicks):
            time.sleep(1.0)  # a person looks at the page for a moment (the server prefetches the next)
            c0, t0 = cpu_seconds(), time.perf_counter()
            page.click("a.page-link:has-text('next')")
            page.wait_for_selector("#app[data-ready=gallery]", timeout=60_000)
            times.append((time.perf_counter() - t0) * 1000)
            cpu.append((cpu_seconds() - c0) * 1000)
        browser.close()
    return times, cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "layerdiff-browse-bench",
                        help="dataset folder (synthesised when missing; default under the temp dir)")
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--size", type=int, default=256, help="image size (the default pipeline's)")
    parser.add_argument("--pages", type=int, default=20, help="gallery pages loaded in the browser per query")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    from manifests.serve import Browser, BrowserServer, PartCache
    from manifests.shardindex import open_index

    wrote = synthesise(args.out, args.samples, args.per_shard, args.size, args.jobs)
    print(f"dataset {args.out}: {args.samples} samples ({wrote:.0f} s to write what was missing)")
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        open_index(args.out, Path(cache))
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        browser = Browser(args.out, cache_dir=Path(cache))
        warm = time.perf_counter() - t0
    server = BrowserServer(browser, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = server.url
    pages = max(1, len(browser.index.samples) // 24)
    plain = [f"?page={1 + (i * 37) % pages}" for i in range(args.pages)]
    filtered = [f"?layers=2&q=circle&sort=recon_psnr&order=desc&page={1 + i}" for i in range(args.pages)]
    rows = [("`/api/samples` JSON, a gallery page", [_get_json(f"{url}api/samples{q}")[0] for q in plain]),
            ("`/api/samples` JSON, filtered (layers=2, caption 'circle') and sorted by recon_psnr",
             [_get_json(f"{url}api/samples{q}")[0] for q in filtered])]
    try:
        def empty_image_cache() -> None:
            browser.parts = PartCache()  # every image of the page decoded and encoded anew

        for name, qs, height in (("gallery page, first screen", plain, 1000),
                                 ("filtered + sorted page, first screen", filtered, 1000),
                                 ("gallery page, all 24 cards (8000 px tall window)", plain, 8000)):
            wall, cpu = browser_page_loads(url, qs, empty_image_cache, height)  # a new browser: its cache empty
            rows.append((f"Chromium, {name}, page not seen before: wall", wall))
            rows.append((f"Chromium, {name}, page not seen before: CPU (server + Chromium)", cpu))
        wall, cpu = browser_page_loads(url, [f"?per_page=1&page={p}" for p in range(1, args.pages + 1)])
        rows.append(("Chromium, floor: a 1-sample page (navigation, page script, two API calls): wall", wall))
        wall, cpu = next_page_loads(url, f"?page={1 + pages // 2}", args.pages)
        rows.append(("Chromium, first screen of the page 'next' leads to (in place, prefetched): wall", wall))
        rows.append(("Chromium, first screen of the page 'next' leads to: CPU (server + Chromium)", cpu))
    except FileNotFoundError as err:
        print(f"no browser figures: {err}")
    server.shutdown()
    print(f"\n| {len(browser.index.samples)} samples, {len(browser.index.shards)} shards, {args.size} px "
          f"| median ms | p95 ms | max ms |\n|---|---|---|---|")
    print(f"| shard index, built cold (all tars) | {built * 1000:.0f} | | |")
    print(f"| shard index, loaded from its cache | {warm * 1000:.0f} | | |")
    for name, ms in rows:
        print(f"| {name} | {_stats(ms)} |")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nserver process peak RSS {rss:.0f} MiB (index, caches, this benchmark)")


if __name__ == "__main__":
    main()
