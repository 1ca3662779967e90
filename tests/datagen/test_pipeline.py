"""The pipeline end to end on real output: shards read back and recomposed, exactly-once, resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from datagen.format import check_sample, compose_uint8, member_suffixes, psnr, read_sample
from datagen.runner import run
from datagen.scenes import make_scene
from datagen.writer import read_verified_manifest
from tests.datagen.helpers import ROOT, load_json, png, read_shard, small_config


def _check_dataset(out: Path, shards: int, per_shard: int) -> list[str]:
    index = load_json(out / "manifest.json")
    assert index["schema"] == "layerdiff-dataset/2"
    assert index["stages"]["segment"] == [{"backend": "truth", "model": None, "checkpoint": None, "version": "1"}]
    assert [s["shard"] for s in index["shards"]] == list(range(shards))
    keys: list[str] = []
    for s in range(shards):
        tar = out / "shards" / f"{s:06d}.tar"
        manifest = load_json(out / "manifests" / f"{s:06d}.json")
        assert manifest["sha256"] == hashlib.sha256(tar.read_bytes()).hexdigest()
        assert manifest["bytes"] == tar.stat().st_size
        names, samples = read_shard(tar)
        assert list(samples) == manifest["keys"]
        assert manifest["samples"] + len(manifest["rejected"]) == per_shard
        # members of a sample are contiguous, in the documented order
        pos = 0
        for key, members in samples.items():
            suffixes = member_suffixes(len(json.loads(members["json"])["layers"]))
            assert suffixes == ["image.png", "bg.png", "layers.png", "txt", "json"]
            assert names[pos:pos + len(suffixes)] == [f"{key}.{x}" for x in suffixes]
            pos += len(suffixes)
            sample = read_sample(members, key=key)
            assert check_sample(sample, max_layers=3) == []
            assert [layer["extent"] for layer in sample.meta["layers"]] == ["amodal"] * sample.num_layers
            assert sample.meta["source"]["uri"].startswith("scene-gt:")
            assert psnr(compose_uint8(sample.background, sample.foregrounds, sample.masks), sample.image) >= 30
        keys += manifest["keys"]
    assert len(keys) == len(set(keys))
    assert index["totals"]["samples"] == len(keys)
    return keys


def test_synthetic_gt_local_engine_writes_true_layers(tmp_path: Path):
    out = tmp_path / "out"
    summary = run(small_config(out), engine="local", progress=False)
    assert summary.shards_written == [0, 1]
    keys = _check_dataset(out, 2, 6)
    assert keys == [f"gt-scene-{i:06d}" for i in range(12)]
    # the stored layers are the generator's true layers, pixel for pixel
    _, samples = read_shard(out / "shards" / "000000.tar")
    scene = make_scene(3, size=48)
    members = samples["gt-scene-000003"]
    assert np.array_equal(png(members["image.png"]), scene.image)
    assert np.array_equal(png(members["bg.png"]), scene.background)
    stack = png(members["layers.png"])  # the layers, RGBA, stacked top to bottom
    assert stack.shape == (48 * len(scene.masks), 48, 4)
    for n, mask in enumerate(scene.masks):
        assert np.array_equal(stack[48 * n:48 * (n + 1), :, 3], mask)
        assert np.array_equal(stack[48 * n:48 * (n + 1), :, :3], scene.foregrounds[n])
    assert members["txt"].decode() == scene.caption


def test_rerun_skips_complete_shards_and_extends(tmp_path: Path):
    out = tmp_path / "out"
    run(small_config(out, shards=1), engine="local", progress=False)
    first = (out / "shards" / "000000.tar").stat().st_mtime_ns
    summary = run(small_config(out, shards=3), engine="local", progress=False)
    assert summary.shards_skipped == [0] and sorted(summary.shards_written) == [1, 2]
    assert (out / "shards" / "000000.tar").stat().st_mtime_ns == first
    _check_dataset(out, 3, 6)
    # a damaged shard fails verification and is rebuilt, byte-identical
    tar = out / "shards" / "000001.tar"
    good = tar.read_bytes()
    tar.write_bytes(good[:-10] + b"x" * 10)
    assert read_verified_manifest(out, 1) is None
    summary = run(small_config(out, shards=3), engine="local", progress=False)
    assert summary.shards_written == [1]
    assert tar.read_bytes() == good


def test_other_config_into_same_out_is_refused(tmp_path: Path):
    from datagen.config import ConfigError

    out = tmp_path / "out"
    run(small_config(out, shards=1), engine="local", progress=False)
    with pytest.raises(ConfigError, match="another config"):
        run(small_config(out, shards=1, samples_per_shard=5), engine="local", progress=False)


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path: Path):
    """Kill the driver mid-run: no partial shard is visible; a rerun completes with the same keys."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "datagen", "run", "--config", "pipelines/synthetic-gt.yaml", "--out", str(out),
           "--shards", "6", "--samples-per-shard", "40", "--engine", "local", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "manifests" / "000001.json").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (out / "manifests").glob("0*.json"))
    assert 2 <= len(done) < 6, done
    # every visible tar has a verified manifest; nothing else but temporaries
    for tar in (out / "shards").glob("*.tar"):
        assert read_verified_manifest(out, int(tar.stem)) is not None
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert not list((out / "shards").glob(".*tmp*"))
    keys = _check_dataset(out, 6, 40)
    assert keys == [f"gt-scene-{i:06d}" for i in range(240)]


@pytest.mark.slow
def test_ray_engine_matches_local_engine(tmp_path: Path, ray_local):
    run(small_config(tmp_path / "local"), engine="local", progress=False)
    run(small_config(tmp_path / "ray"), engine="ray", progress=False)
    for s in range(2):
        name = f"{s:06d}.tar"
        assert (tmp_path / "ray" / "shards" / name).read_bytes() == (tmp_path / "local" / "shards" / name).read_bytes()
    # read back with webdataset and Ray Data
    import ray
    import webdataset as wds

    urls = [str(tmp_path / "ray" / "shards" / f"{s:06d}.tar") for s in range(2)]
    wds_keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    assert wds_keys == [f"gt-scene-{i:06d}" for i in range(12)]
    sample = next(iter(wds.WebDataset(urls[:1], shardshuffle=False).decode("rgba8")))
    assert read_sample(sample).rgba().shape[1:] == (48, 48, 4)
    # every sample has the same members whatever its layer count: Ray Data reads them all
    rows = ray.data.read_webdataset(urls).take_all()
    assert sorted(r["__key__"] for r in rows) == wds_keys
    by_key = {r["__key__"]: read_sample(r) for r in rows}
    _, samples = read_shard(tmp_path / "ray" / "shards" / "000000.tar")
    for key, members in samples.items():
        assert np.array_equal(by_key[key].rgba(), read_sample(members, key=key).rgba())


def test_rerun_trusts_size_and_mtime_and_verify_rehashes(tmp_path: Path, monkeypatch):
    """Resume reads no complete tar (size + mtime from the manifest); --verify hashes each once."""
    from datagen import writer

    out = tmp_path / "out"
    run(small_config(out, shards=2), engine="local", progress=False)
    hashed: list[str] = []
    real = writer.file_sha256
    monkeypatch.setattr(writer, "file_sha256", lambda p, cache=True: hashed.append(Path(p).name) or real(p, cache))
    summary = run(small_config(out, shards=2), engine="local", progress=False)
    assert summary.shards_skipped == [0, 1] and hashed == []
    summary = run(small_config(out, shards=2), engine="local", progress=False, verify=True)
    assert summary.shards_skipped == [0, 1] and sorted(hashed) == ["000000.tar", "000001.tar"]
    # a moved OUT (new mtimes) is hashed once, then trusted again
    hashed.clear()
    for tar in (out / "shards").glob("*.tar"):
        os.utime(tar, ns=(1, 1))
    run(small_config(out, shards=2), engine="local", progress=False)
    run(small_config(out, shards=2), engine="local", progress=False)
    assert sorted(hashed) == ["000000.tar", "000001.tar"]


def test_classical_stages_never_import_torch():
    """A CPU actor of the default pipeline builds and runs every classical stage without torch."""
    code = """
import sys
from collections import Counter
from datagen.config import load_config
from datagen.item import Item
from datagen.registry import STAGES
from datagen.runner import StageGroup
from datagen.sources import list_items
cfg = load_config("pipelines/default.yaml")
refs = list_items(cfg.source, 2)
items = [Item(key=r.key, shard=0, index=i, uri=r.uri, source=r.descriptor) for i, r in enumerate(refs)]
StageGroup.of(cfg, list(STAGES)).run_items(items, Counter())
assert all(it.ok or it.rejected for it in items)
print(sorted(m for m in ("torch", "torchvision", "transformers", "ray") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_engine_choice_and_stage_fusion(monkeypatch):
    from datagen.runner import LOCAL_MAX_ITEMS, choose_engine, stage_groups

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = small_config(Path("unused"))
    assert choose_engine(cfg, 64)[0] == "local"
    assert choose_engine(cfg, LOCAL_MAX_ITEMS + 1)[0] == ("ray" if (os.cpu_count() or 1) > 1 else "local")
    cfg.stages["segment"].num_gpus = 1
    assert choose_engine(cfg, 64) == ("ray", "stage segment uses a GPU")
    # CPU stages fuse around the GPU stage, which keeps a pool of its own
    assert stage_groups(cfg) == [["decode", "caption", "ground"], ["segment"], ["inpaint", "assemble"]]
    cfg.ray.fuse = False
    assert stage_groups(cfg) == [[s] for s in ("decode", "caption", "ground", "segment", "inpaint", "assemble")]
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert choose_engine(small_config(Path("unused")), 8)[0] == "ray"
