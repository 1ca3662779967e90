"""The dataset browser (``python -m manifests serve``): shard index, HTTP API, safety, and the pages
in a real headless Chromium (the system package, `make browser-deps`).

Screenshots of the gallery, a filter, the rejections, the stats and a run go to tests/output/browser/
(``BROWSE_SCREENSHOTS`` overrides) for a person to look at.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from datagen.format import compose_uint8, iter_tar_samples, psnr
from manifests.serve import Browser, BrowserServer, parse_gallery_query, sample_layers
from manifests.serve_bench import CHROMIUM, launch_chromium, scene_sample
from manifests.shardindex import dataset_cache_dir, open_index
from tests.manifests.conftest import DEFAULT_REJECTED, Dataset, make_sample

ROOT = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("BROWSE_SCREENSHOTS", ROOT / "tests" / "output" / "browser"))
# A readable rejected source (a generated scene: the thumbnail is drawn) next to unreadable ones.
REJECTED = [DEFAULT_REJECTED[0] + [{"source": "scene:7", "key": "scene-000007", "stage": "assemble",
                                    "reason": "recomposition PSNR 12.3 dB < 30 dB"}],
            DEFAULT_REJECTED[1] + [{"source": "skimage:coins.png", "key": "photo-coins", "stage": "ground",
                                    "reason": "no foreground found (only 0.2% of the image differs)"}]]



def _within_one(got: np.ndarray, want: np.ndarray) -> None:
    """The page's canvas composition equals compose_uint8 up to one 8-bit level (soft alpha edges are
    rounded once more by the canvas' 8-bit premultiplied storage)."""
    assert got.shape == want.shape
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert int(diff.max()) <= 1, int(diff.max())

def shards() -> list[list[Any]]:
    """Two shards: 1, 2 and 3 layers, captions with distinct words."""
    first = [make_sample(f"s{i:04d}", seed=i, num_layers=1 + i % 3, noise=i % 2 == 1) for i in range(5)]
    second = [make_sample(f"t{i:04d}", seed=50 + i, num_layers=1 + i % 2) for i in range(4)]
    for s in second:
        s.meta["caption"] = s.caption = f"zebra {s.caption}"
    return [first, second]


@pytest.fixture
def browse_dataset(make_dataset) -> Dataset:
    return make_dataset(shards(), rejected=REJECTED)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def server(browse_dataset: Dataset, tmp_path: Path) -> Iterator[BrowserServer]:
    before = _snapshot(browse_dataset.out)
    srv = BrowserServer(Browser(browse_dataset.out, cache_dir=tmp_path / "cache"), port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    assert _snapshot(browse_dataset.out) == before, "the browser wrote into OUT"


def get(srv: BrowserServer, path: str, method: str = "GET") -> tuple[int, bytes]:
    """A raw request: the path goes out exactly as given (no client-side normalisation)."""
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    try:
        conn.request(method, path)
        res = conn.getresponse()
        return res.status, res.read()
    finally:
        conn.close()


def get_json(srv: BrowserServer, path: str) -> Any:
    status, body = get(srv, path)
    assert status == 200, (path, status, body[:300])
    return json.loads(body)


# -- the shard index ---------------------------------------------------------------------------


def test_index_offsets_read_back_every_member(browse_dataset, tmp_path):
    index = open_index(browse_dataset.out, tmp_path / "cache")
    assert [s.key for s in index.samples] == [s.key for s in browse_dataset.samples]
    for shard in range(2):
        for group in iter_tar_samples(browse_dataset.tar(shard)):
            assert index.read_members(index.by_key[group.key]) == group.members
    assert index.by_key["s0002"].layers == 3
    assert index.by_key["t0000"].text.startswith("zebra ")
    assert index.by_key["s0000"].numbers["recon_psnr"] == browse_dataset.samples[0].meta["quality"]["recon_psnr"]


def test_index_is_cached_outside_out_and_rebuilt_when_a_tar_changes(browse_dataset, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    open_index(browse_dataset.out, cache)
    folder = dataset_cache_dir(cache, browse_dataset.out)
    assert sorted(p.name for p in folder.glob("*.json")) == ["000000.json", "000001.json"]
    assert not folder.resolve().is_relative_to(browse_dataset.out.resolve())

    import manifests.shardindex as shardindex

    def no_rebuild(path):
        raise AssertionError(f"re-indexed {path} although its cache matches")

    monkeypatch.setattr(shardindex, "index_tar", no_rebuild)
    assert len(open_index(browse_dataset.out, cache).samples) == 9
    monkeypatch.undo()

    # Shard 1 rewritten with other samples: its tar changes, its index is rebuilt, the old keys go.
    from tests.manifests.conftest import write_tar

    write_tar(browse_dataset.tar(1), [make_sample("u0000", seed=99, num_layers=2)])
    index = open_index(browse_dataset.out, cache)
    assert [s.key for s in index.samples if s.shard == 1] == ["u0000"]
    assert "t0000" not in index.by_key


def test_sample_layers_are_rgba_with_the_mask_as_alpha(browse_dataset):
    sample = browse_dataset.samples[2]
    decoded = sample_layers(sample.key, sample.to_members())
    assert len(decoded.layers) == 3
    for layer, fg, mask in zip(decoded.layers, sample.foregrounds, sample.masks, strict=True):
        assert layer.shape == (*mask.shape, 4)
        assert np.array_equal(layer[..., :3], fg) and np.array_equal(layer[..., 3], mask)
    np.testing.assert_array_equal(decoded.image, sample.image)


# -- the API -----------------------------------------------------------------------------------


def _keys(doc: dict[str, Any]) -> list[str]:
    return [s["key"] for s in doc["samples"]]


def test_gallery_filters_sort_and_paginate(server, browse_dataset):
    samples = browse_dataset.samples
    doc = get_json(server, "/api/samples")
    assert doc["total"] == 9 and _keys(doc) == [s.key for s in samples]
    assert doc["samples"][2]["sprite"].startswith("/sprite/s0002.png?v=") and len(doc["samples"][2]["parts"]) == 5

    assert _keys(get_json(server, "/api/samples?layers=2")) == [s.key for s in samples if s.num_layers == 2]
    assert _keys(get_json(server, "/api/samples?layers=1,3&shard=0")) == \
        [s.key for s in browse_dataset.shards[0] if s.num_layers in (1, 3)]
    assert _keys(get_json(server, "/api/samples?q=ZEBRA")) == [s.key for s in browse_dataset.shards[1]]
    assert _keys(get_json(server, "/api/samples?q=box+number+2")) == [s.key for s in samples if s.num_layers == 3]
    noisy = [s for s in samples if s.meta["quality"]["recon_psnr"] < 100]
    assert noisy and _keys(get_json(server, "/api/samples?max.recon_psnr=99")) == [s.key for s in noisy]
    assert get_json(server, "/api/samples?min.recon_psnr=100&min.layers=2")["total"] == \
        sum(s.meta["quality"]["recon_psnr"] >= 100 and s.num_layers >= 2 for s in samples)
    assert get_json(server, "/api/samples?stage=segment:sam:2")["total"] == 9
    assert get_json(server, "/api/samples?stage=segment:sam:3")["total"] == 0
    assert get_json(server, "/api/samples?stage=ground:contrast")["total"] == 0

    by_psnr = _keys(get_json(server, "/api/samples?sort=recon_psnr&order=desc&per_page=200"))
    psnrs = [browse_dataset.samples[[s.key for s in samples].index(k)].meta["quality"]["recon_psnr"] for k in by_psnr]
    assert psnrs == sorted(psnrs, reverse=True)

    pages = [get_json(server, f"/api/samples?per_page=4&page={p}") for p in (1, 2, 3)]
    assert [d["pages"] for d in pages] == [3, 3, 3]
    assert sum((_keys(d) for d in pages), []) == [s.key for s in samples]


def test_sprite_holds_the_image_background_and_rgba_layers(server, browse_dataset):
    import io

    sample = browse_dataset.samples[4]  # 2 layers, noisy
    doc = get_json(server, "/api/samples?per_page=200")["samples"][4]
    assert doc["key"] == sample.key and doc["parts"] == ["image", "bg", "layer-0", "layer-1"]
    status, body = get(server, doc["sprite"])
    assert status == 200
    strip = np.asarray(Image.open(io.BytesIO(body)))
    assert strip.shape == (64, 4 * 64, 4)
    image, bg, *layers = np.split(strip, 4, axis=1)
    np.testing.assert_array_equal(image[..., :3], sample.image)
    np.testing.assert_array_equal(bg[..., :3], sample.background)
    assert (image[..., 3] == 255).all() and (bg[..., 3] == 255).all()
    for layer, fg, mask in zip(layers, sample.foregrounds, sample.masks, strict=True):
        np.testing.assert_array_equal(layer[..., 3], mask)
        np.testing.assert_array_equal(layer[..., :3], fg)


def test_rejections_list_every_manifest_rejection(server, browse_dataset):
    doc = get_json(server, "/api/rejections")
    listed = sorted((i["shard"], i["index"], i["reason"]) for g in doc["groups"] for i in g["items"])
    expected = sorted((shard, i, r["reason"]) for shard, rs in enumerate(REJECTED) for i, r in enumerate(rs))
    assert listed == expected and doc["total"] == 5
    ground = [g for g in doc["groups"] if g["stage"] == "ground"]
    # Thresholds 0.35 and 0.30 make one normalised reason; the largest group comes first.
    assert [(g["reason"], g["count"]) for g in ground] == [("no detection above threshold <n>", 2),
                                                           ("no foreground found (only <n>% of the image differs)", 1)]
    scene = get_json(server, "/api/rejected/0/1")
    assert scene["readable"] is True
    import base64
    import io

    thumb = Image.open(io.BytesIO(base64.b64decode(scene["png"])))
    assert thumb.size == (64, 64) and len(set(thumb.getdata())) > 2  # the scene, drawn
    assert get_json(server, "/api/rejected/1/2")["readable"] is True  # a scikit-image demo photo
    assert get_json(server, "/api/rejected/1/1") == {"readable": False,
                                                      "why": "source 'file:///src/r2.png' cannot be located "
                                                             "from the manifests"}


def test_stats_match_the_summary(server, browse_dataset):
    doc = get_json(server, "/api/stats")
    assert doc["totals"]["samples"] == 9 and doc["totals"]["rejected"] == 5
    counts = {str(k): sum(s.num_layers == k for s in browse_dataset.samples) for k in (1, 2, 3)}
    assert doc["layers"] == counts == {"1": 4, "2": 4, "3": 1}


# -- safety: traversal, malformed input, read-only -------------------------------------------------

TRAVERSAL = [
    "/../../etc/passwd", "/static/../serve.py", "/static/..%2Fserve.py", "/static/%2e%2e/%2e%2e/etc/passwd",
    "/static/index.html", "/static/app.js/", "/sprite/..%2F..%2Fetc%2Fpasswd.png", "/sprite/../etc/passwd",
    "/sprite/s0000/../../../etc/passwd", "/sprite/..%2F..%2Fmanifest.json", "/sprite/s0000", "/sprite/s0000.tar",
    "/sprite/s0000.mask.0.png", "/sprite/nope.png", "/sprite/s0000%00.png", "/sprite/s0000.png/x", "//etc/passwd",
    "/shards/000000.tar", "/manifest.json", "/manifests/000000.json", "/api/rejected/0/99",
    "/api/rejected/-1/0", "/api/rejected/0/..%2F1", "/runfile/samples/..%2F..%2Fmanifest.json",
    "/runfile/samples/step-1.png", "/api/run", "/%5c..%5c..%5cetc%5cpasswd",
]
MALFORMED = [
    "page=0", "page=abc", "page=", "per_page=100000", "per_page=-1", "min.recon_psnr=nan",
    "min.recon_psnr=1e999", "min.recon_psnr=x", "min.nope=1", "max.__class__=1", "sort=evil", "sort=",
    "order=sideways", "layers=a", "layers=", "layers=1,,x", "shard=-3", "stage=x", "stage=:sam", "stage=a:b:c:d",
    "foo=1", "q=" + "x" * 201, "page=1&page=x", "%ff=%fe", "&&&", "a" * 5000,
]


def test_traversal_and_unknown_paths_are_404_and_the_server_keeps_running(server):
    for path in TRAVERSAL:
        status, body = get(server, path)
        assert status == 404, (path, status, body[:200])
        assert b"root:" not in body and b"layerdiff-shard" not in body
    assert get_json(server, "/api/info")["samples"] == 9


def test_malformed_queries_are_400_and_the_server_keeps_running(server):
    for query in MALFORMED:
        status, body = get(server, "/api/samples?" + query)
        assert status == 400, (query, status, body[:200])
        assert "error" in json.loads(body)
    assert get(server, "/api/samples", method="POST")[0] == 405
    assert get(server, "/rejections?x=1")[0] == 400
    # Not HTTP at all, then a request line that is too long: answered (400/414) or closed, never a crash.
    for raw in (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"):
        with socket.create_connection(server.server_address[:2], timeout=10) as sock:
            sock.sendall(raw)
            reply = sock.recv(200)
            assert reply == b"" or b"400" in reply or b"414" in reply, reply
    assert get_json(server, "/api/samples?layers=2")["total"] == 4


def test_parse_gallery_query_keeps_what_it_was_given():
    q = parse_gallery_query("q=Red+Star&layers=1,3&shard=2&stage=segment:sam&stage=ground:gd:1"
                            "&min.recon_psnr=30&max.recon_psnr=&sort=recon_psnr&order=desc&page=2&per_page=12",
                            {"recon_psnr"})
    assert (q.text, q.layers, q.shards, q.page, q.per_page, q.sort, q.descending) == \
        ("red star", frozenset({1, 3}), frozenset({2}), 2, 12, "recon_psnr", True)
    assert q.stages == (("segment", "sam", None), ("ground", "gd", "1"))
    assert q.ranges == (("recon_psnr", 30.0, None),)


def test_serve_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a dataset"):
        Browser(tmp_path)


# -- in a real browser -----------------------------------------------------------------------------


@pytest.fixture
def page(server):
    """A Chromium page on the server that fails the test on any console error or page error."""
    if not os.access(CHROMIUM, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing in CI: `make test` runs `make browser-deps` first")
        pytest.skip(f"{CHROMIUM} is not installed (`make browser-deps`)")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = launch_chromium(p)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        pg.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        pg.base = server.url.rstrip("/")
        yield pg
        browser.close()
    assert errors == []


def draw_all(pg) -> None:
    """Scroll through the gallery so that every card is drawn (cards draw as they come into view)."""
    height = pg.evaluate("document.body.scrollHeight")
    for y in range(0, height + 500, 500):
        pg.evaluate(f"window.scrollTo(0, {y})")
    pg.wait_for_function("[...document.querySelectorAll('canvas.recomp')].every(c => c.dataset.ready === '1')")
    pg.evaluate("window.scrollTo(0, 0)")


def _canvas(pg, key: str) -> np.ndarray:
    data = pg.evaluate("""key => { const c = document.querySelector(`.card[data-key="${key}"] canvas.recomp`);
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data); }""", key)
    return np.array(data, np.uint8).reshape(64, 64, 4)


@pytest.mark.slow
def test_browser_gallery_filter_and_toggle(page, browse_dataset):
    pg, samples = page, browse_dataset.samples
    pg.goto(pg.base + "/")
    pg.wait_for_selector("#app[data-ready=gallery]")
    assert pg.locator(".card").count() == 9
    assert pg.get_attribute("#match-count", "data-total") == "9"
    assert pg.locator(".card[data-key=s0002] canvas.layer").count() == 3
    drawn = pg.locator("canvas.recomp[data-ready='1']").count()
    assert 1 <= drawn < 9  # the first screen only: the rest draws as it scrolls into view
    draw_all(pg)
    last = _canvas(pg, samples[-1].key)
    _within_one(last[..., :3], samples[-1].recompose())
    pg.screenshot(path=str(SHOTS / "gallery.png"), full_page=True)

    # Pages change in place; the URL follows, and the back button returns.
    keys = "cards => cards.map(c => c.dataset.key)"
    pg.goto(pg.base + "/?per_page=4")
    pg.wait_for_selector("#app[data-ready=gallery]")
    pg.click("a.page-link:has-text('next')")
    pg.wait_for_url("**/?per_page=4&page=2")
    pg.wait_for_selector("#app[data-ready=gallery]")
    assert pg.locator(".card").evaluate_all(keys) == [s.key for s in samples[4:8]]
    assert pg.inner_text("#page-of") == "page 2 of 3"
    pg.go_back()
    pg.wait_for_url("**/?per_page=4")
    pg.wait_for_function("document.querySelector('#page-of').textContent === 'page 1 of 3'")
    pg.wait_for_selector("#app[data-ready=gallery]")
    assert pg.locator(".card").evaluate_all(keys) == [s.key for s in samples[:4]]

    # The filter form: 2-layer samples whose caption says zebra.
    pg.check("#filters input[name=layer][value='2']")
    pg.fill("#filters input[name=q]", "zebra")
    pg.click("#apply")
    pg.wait_for_url("**/?*layers=2*")
    pg.wait_for_selector("#app[data-ready=gallery]")
    expected = [s.key for s in browse_dataset.shards[1] if s.num_layers == 2]
    assert pg.locator(".card").evaluate_all("cards => cards.map(c => c.dataset.key)") == expected
    assert pg.get_attribute("#match-count", "data-total") == str(len(expected))
    pg.screenshot(path=str(SHOTS / "filters.png"), full_page=True)

    # Live recomposition: all layers on reproduces the image; layer 1 off gives bg + layer 0 only.
    sample = next(s for s in samples if s.key == expected[0])
    full = _canvas(pg, sample.key)
    assert (full[..., 3] == 255).all()
    assert psnr(full[..., :3], sample.image) >= 30
    _within_one(full[..., :3], sample.recompose())
    pg.uncheck(f".card[data-key={sample.key}] input.layer-toggle[data-layer='1']")
    pg.wait_for_selector(f".card[data-key={sample.key}] canvas.recomp[data-visible='0']")
    partial = _canvas(pg, sample.key)[..., :3]
    _within_one(partial, compose_uint8(sample.background, sample.foregrounds[:1], sample.masks[:1]))
    assert (partial != full[..., :3]).any()
    pg.screenshot(path=str(SHOTS / "toggle.png"))


@pytest.mark.slow
def test_browser_rejections_stats_and_run(page, browse_dataset, server, tmp_path):
    pg = page
    pg.goto(pg.base + "/rejections")
    pg.wait_for_selector("#app[data-ready=rejections]")
    rows = pg.locator(".rejection").evaluate_all(
        "rows => rows.map(r => [Number(r.dataset.shard), Number(r.dataset.index), r.dataset.thumb])")
    assert sorted((s, i) for s, i, _ in rows) == [(s, i) for s, rs in enumerate(REJECTED) for i in range(len(rs))]
    assert {(s, i): t for s, i, t in rows}[(0, 1)] == {(s, i): t for s, i, t in rows}[(1, 2)] == "image"
    assert sum(t == "unreadable" for _, _, t in rows) == 3
    assert pg.get_attribute("#rejection-total", "data-total") == "5"
    pg.screenshot(path=str(SHOTS / "rejections.png"), full_page=True)

    pg.goto(pg.base + "/stats")
    pg.wait_for_selector("#app[data-ready=stats]")
    assert pg.locator("#shard-table tr").count() == 3
    assert pg.locator(".chart svg rect").count() >= 3 + 3 + 2
    pg.screenshot(path=str(SHOTS / "stats.png"), full_page=True)

    # A training run written by the model's own logger and grid writer.
    import torch

    from model.trainlog import TrainLogger, save_grid

    run = tmp_path / "runs" / "tiny"
    logger = TrainLogger(run, ["loss", "loss_mask", "lr"], tensorboard=False)
    for step in range(0, 60, 10):
        logger.log(step, {"loss": 1.0 / (1 + step), "loss_mask": 0.5 / (1 + step), "lr": 1e-4})
    logger.close()
    gen = torch.Generator().manual_seed(0)
    for step in (20, 40):
        layers = torch.rand(2, 5, 3, 32, 32, generator=gen) * 2 - 1  # bg, 2 foregrounds, 2 masks
        present = torch.tensor([[True, True, False, True, False], [True] * 5])
        save_grid(run / "samples" / f"step-{step:08d}.png", layers, present, ["a", "b"], [["x"], ["x", "y"]])
    server.browser.run = run
    pg.goto(pg.base + "/run")
    pg.wait_for_selector("#app[data-ready=run]")
    assert pg.locator("#loss-charts .chart").count() == 3
    assert "step 40" in pg.inner_text("#grid-label")
    pg.wait_for_function("document.querySelector('#grid-image').naturalWidth > 0")
    pg.screenshot(path=str(SHOTS / "run.png"), full_page=True)


def test_bench_scene_samples_are_valid(tmp_path):
    from datagen.format import check_sample

    sample = scene_sample(3, 64)
    assert check_sample(sample, max_layers=3) == []


def test_cli_serve_starts_on_loopback_and_answers(browse_dataset, tmp_path):
    import subprocess
    import sys
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "manifests", "serve", str(browse_dataset.out), "--port", "0",
                             "--cache-dir", str(tmp_path / "cache")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("indexed 9 samples in 2 shards"), lines
        url = lines[1].split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "api/info", timeout=30) as res:
            assert json.loads(res.read())["samples"] == 9
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "manifests", "serve", str(tmp_path / "missing"), "--no-cache"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a dataset" in bad.stderr


def test_rejection_thumbnail_of_a_tar_source(tmp_path):
    """A rejected img2dataset-tar item is found again through the source listing and drawn."""
    import base64
    import io

    from PIL import Image

    from datagen.bench import write_img2dataset_tars
    from datagen.config import SourceConfig
    from datagen.sources import list_items
    from manifests.serve import source_thumbnail

    pattern = write_img2dataset_tars(tmp_path / "raw", 5, per_tar=5, size=48, compress=False)
    ref = list_items(SourceConfig(kind="tars", path=pattern), 5)[2]
    thumb = source_thumbnail(ref.uri, {})
    assert thumb["readable"], thumb
    assert Image.open(io.BytesIO(base64.b64decode(thumb["png"]))).size == (48, 48)
    missing = source_thumbnail(ref.uri.split("#")[0] + "#nope", {})
    assert not missing["readable"] and "no item 'nope'" in missing["why"]
