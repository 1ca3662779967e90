"""All sources through the default pipeline (classical on flat scenes, the matting model on photos), and the
bad-input corpus."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from datagen.badinput import EXPECTED, write_corpus, write_unsafe_tar
from datagen.config import SourceConfig, load_config
from datagen.format import read_sample
from datagen.photobench import is_one_object
from datagen.runner import run
from datagen.sources import list_items, read_item
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
    cfg = _config(out, source_kind="folder", source_path=str(corpus), shards=1, samples_per_shard=100,
                  max_rejection_rate=1.0)  # half of the corpus is bad on purpose
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
    # provenance from a folder's sidecar json; none where there is no sidecar
    if "file:alpha.png" in meta:
        assert meta["file:alpha.png"]["source"]["licence"] == "cc0"
    assert all(m["source"]["url"] == "" for m in meta.values())
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
                  samples_per_shard=50, max_rejection_rate=1.0)  # most of these tars' items are bad on purpose
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
        source = meta["source"]  # provenance from img2dataset's json, and that json itself
        assert source["url"] == "http://example.invalid/0.jpg" and source["licence"] == "CC-BY-4.0"
        assert source["caption"] == "red square, green" and source["uri"].endswith("#000000000")
        assert json.loads(source["metadata"])["error_message"] is None
        assert meta["layers"][0]["phrase"] == "red square"
    assert validate_dataset(out).ok()


def test_demo_source_photos_and_scenes(tmp_path: Path):
    out = tmp_path / "out"
    cfg = _config(out, shards=2, samples_per_shard=8)
    run(cfg, engine="local", progress=False)
    for shard in (0, 1):  # photos are spread through the stream: one, then seven scenes
        manifest = load_json(out / "manifests" / f"{shard:06d}.json")
        keys = sorted(manifest["keys"] + [r["key"] for r in manifest["rejected"]])
        assert sum(k.startswith("photo-") for k in keys) == 1 and sum(k.startswith("scene-") for k in keys) == 7
    for shard in ("000000", "000001"):
        _, samples = read_shard(out / "shards" / f"{shard}.tar")
        for key, members in samples.items():
            sample = read_sample(members, key=key)
            if key.startswith("photo-"):  # sensible objects (the matting model's), not noise or fragments
                for mask, layer in zip(sample.masks, sample.meta["layers"], strict=True):
                    assert is_one_object(mask), (key, layer["phrase"])
    assert validate_dataset(out).ok()


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


@pytest.mark.parametrize("compress", [False, True])
def test_tar_items_are_read_by_offset_one_pass_per_tar(tmp_path: Path, monkeypatch, compress: bool):
    """Listing records each member's offset; reading every item in order opens (and, compressed,
    decompresses) each tar once, and returns exactly the member bytes."""
    from datagen import sources
    from datagen.bench import write_img2dataset_tars

    pattern = write_img2dataset_tars(tmp_path / "raw", 25, per_tar=10, size=48, compress=compress)
    refs = list_items(SourceConfig(kind="tars", path=pattern), 100)
    assert len(refs) == 25 and len({r.key for r in refs}) == 25
    opened: list[str] = []
    real_open = sources.open_uncompressed

    def counting_open(url: str):
        opened.append(url)
        return real_open(url)

    monkeypatch.setattr(sources, "open_uncompressed", counting_open)
    monkeypatch.setattr(sources, "_TARS", sources._OpenTars())
    for ref in refs:
        raw = read_item(ref.descriptor, 48)
        tar, key = ref.descriptor["tar"], ref.uri.rsplit("#", 1)[1]
        members = _tar_members(Path(tar))
        assert raw.data == members[f"{key}.jpg"]
        assert raw.caption == members[f"{key}.txt"] and json.loads(raw.meta)["key"] == key
    assert sorted(opened) == sorted({r.descriptor["tar"] for r in refs})  # once per tar


def test_fsspec_urls_for_tars_and_folders(tmp_path: Path):
    """The same items from memory:// tars, a file:// folder and local paths: same keys, same pixels."""
    import fsspec

    from datagen.bench import write_img2dataset_tars

    write_img2dataset_tars(tmp_path / "raw", 6, per_tar=3, size=64)
    mem = fsspec.filesystem("memory")
    for name in ("00000.tar", "00001.tar"):
        mem.pipe(f"/h25-raw/{name}", (tmp_path / "raw" / name).read_bytes())
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in _tar_members(tmp_path / "raw" / "00000.tar").items():
        (folder / name).write_bytes(data)
    runs = {
        "local tars": ("tars", str(tmp_path / "raw" / "{00000..00001}.tar")),
        "memory tars": ("tars", "memory:///h25-raw/{00000..00001}.tar"),
        "local folder": ("folder", str(folder)),
        "file folder": ("folder", f"file://{folder}"),
    }
    images = {}
    for name, (kind, path) in runs.items():
        out = tmp_path / name.replace(" ", "-")
        run(_config(out, source_kind=kind, source_path=path, shards=1, samples_per_shard=6, image={"size": 64}),
            engine="local", progress=False)
        manifest = load_json(out / "manifests" / "000000.json")
        assert manifest["samples"] + len(manifest["rejected"]) == (6 if kind == "tars" else 3), name
        _, samples = read_shard(out / "shards" / "000000.tar")
        images[name] = {k: m["image.png"] for k, m in samples.items()}
        assert images[name], name
        assert validate_dataset(out).ok()
    assert images["memory tars"] == images["local tars"]
    assert images["file folder"] == images["local folder"]
    mem.rm("/h25-raw", recursive=True)
