"""All sources through the default pipeline (classical on flat scenes, the matting model on photos), and the
bad-input corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from datagen.badinput import EXPECTED, write_corpus, write_unsafe_tar
from datagen.config import load_config
from datagen.photobench import is_one_object
from datagen.runner import run
from datagen.sources import list_items
from manifests.validate import validate_dataset
from tests.datagen.helpers import load_json, png, read_shard


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


def _config(out: Path, **overrides):
    return load_config("pipelines/default.yaml", {"output": str(out), **overrides})


def test_bad_input_corpus_is_rejected_or_normalised(tmp_path: Path):
    corpus, outside, out = tmp_path / "corpus", tmp_path / "outside", tmp_path / "out"
    write_corpus(corpus, outside)
    before = _snapshot(corpus), _snapshot(outside), set(tmp_path.iterdir())
    cfg = _config(out, source_kind="folder", source_path=str(corpus), shards=1, samples_per_shard=100)
    run(cfg, engine="local", progress=False)
    # nothing changed in the source, nothing written outside OUT
    assert (_snapshot(corpus), _snapshot(outside)) == before[:2]
    assert set(tmp_path.iterdir()) == before[2] | {out}
    manifest = load_json(out / "manifests" / "000000.json")
    by_uri = {r["source"]: r for r in manifest["rejected"]}
    accepted_keys = set(manifest["keys"])
    refs = {r.uri: r.key for r in list_items(cfg.source, 100)}
    assert set(refs) == {f"file:{name}" for name in EXPECTED}, "every file is an item; sidecars are not"
    for name, outcome in EXPECTED.items():
        uri = f"file:{name}"
        if outcome == "decode":
            assert by_uri[uri]["stage"] == "decode", (name, by_uri.get(uri))
            assert by_uri[uri]["reason"]
        else:  # normalised: a sample, or a rejection for its content after decoding
            assert refs[uri] in accepted_keys or by_uri[uri]["stage"] != "decode", (name, by_uri.get(uri))
    assert len(accepted_keys) + len(by_uri) == len(EXPECTED)
    assert len(accepted_keys) >= 8, manifest["rejected"]
    assert validate_dataset(out).ok()
    _, samples = read_shard(out / "shards" / "000000.tar")
    # captions: invalid UTF-8 replaced, huge ones truncated; sidecar json kept
    meta = {json.loads(m["json"])["source"]["uri"]: json.loads(m["json"]) for m in samples.values()}
    for uri in ("file:bad_caption.png", "file:huge_caption.png"):
        if uri in meta:
            assert meta[uri]["caption"].startswith("a red")
    if "file:huge_caption.png" in meta:
        assert len(meta["file:huge_caption.png"]["caption"]) <= 2000
        assert meta["file:huge_caption.png"]["quality"]["caption_truncated"] is True
    # EXIF orientation applied: the red square is back at the top left
    key = refs["file:exif_rotated.jpg"]
    if key in samples:
        img = png(samples[key]["image.png"]).astype(int)
        red = (img[..., 0] > 150) & (img[..., 1] < 100)
        ys, xs = np.nonzero(red)
        assert ys.mean() < 128 and xs.mean() < 128


def test_tar_source_with_brace_pattern_and_unsafe_members(tmp_path: Path):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_unsafe_tar(raw / "00000.tar")
    write_unsafe_tar(raw / "00001.tar")
    (raw / "00002.tar").write_bytes(b"not a tar at all")
    out = tmp_path / "out"
    cfg = _config(out, source_kind="tars", source_path=str(raw / "{00000..00002}.tar"), shards=1,
                  samples_per_shard=50)
    run(cfg, engine="local", progress=False)
    manifest = load_json(out / "manifests" / "000000.json")
    assert manifest["samples"] == 2  # the one good sample of each tar
    reasons = [r["reason"] for r in manifest["rejected"]]
    assert sum("unsafe member path" in r for r in reasons) == 4
    assert sum("no image member" in r for r in reasons) == 2
    assert sum("unreadable tar" in r for r in reasons) == 1
    _, samples = read_shard(out / "shards" / "000000.tar")
    for members in samples.values():
        meta = json.loads(members["json"])
        assert meta["caption"] == "a red square on a green background"
        assert meta["source"]["meta"]["url"].startswith("http://example.invalid")
        assert meta["layers"][0]["phrase"] == "red square"
    assert validate_dataset(out).ok()


def test_demo_source_photos_and_scenes(tmp_path: Path):
    out = tmp_path / "out"
    cfg = _config(out, shards=1, samples_per_shard=12)
    run(cfg, engine="local", progress=False)
    manifest = load_json(out / "manifests" / "000000.json")
    keys = manifest["keys"] + [r["key"] for r in manifest["rejected"]]
    assert sum(k.startswith("photo-") for k in keys) == 8 and sum(k.startswith("scene-") for k in keys) == 4
    _, samples = read_shard(out / "shards" / "000000.tar")
    for key, members in samples.items():
        meta = json.loads(members["json"])
        if key.startswith("photo-"):  # sensible objects (the matting model's), not noise or fragments
            for n, layer in enumerate(meta["layers"]):
                assert is_one_object(png(members[f"mask.{n}.png"])), (key, layer["phrase"])
    assert validate_dataset(out).ok()
