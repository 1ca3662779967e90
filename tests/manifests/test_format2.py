"""Format 2: every common WebDataset reader gets every layer of every sample; format 1 stays
readable; the upgrade; bad input named by shard, key and member."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from datagen.format import FormatError, LayerSample, encode_png, iter_tar_samples, read_sample
from manifests import validate_dataset
from manifests.cli import main
from manifests.upgrade import UpgradeError, upgrade_dataset, upgrade_sample
from tests.manifests.conftest import make_sample


def mixed_shards(version: int = 2) -> list[list[LayerSample]]:
    """Two shards whose samples have 1, 2 or 3 layers, in an order where the first five samples
    of the first shard do not all share one count."""
    counts = [[1, 3, 2, 1, 2], [3, 1, 2]]
    return [[make_sample(f"m{j}{i:03d}", seed=10 * j + i, num_layers=k, version=version)
             for i, k in enumerate(shard)] for j, shard in enumerate(counts)]


def expected_rgba(ds) -> dict[str, np.ndarray]:
    return {s.key: s.rgba() for s in ds.samples}


def assert_same_layers(read: dict[str, LayerSample], ds) -> None:
    want = expected_rgba(ds)
    assert sorted(read) == sorted(want)
    for key, sample in read.items():
        assert sample.num_layers == want[key].shape[0], key
        assert np.array_equal(sample.rgba(), want[key]), key
        src = next(s for s in ds.samples if s.key == key)
        assert np.array_equal(sample.image, src.image) and np.array_equal(sample.background, src.background)
        assert sample.caption == src.caption and sample.meta == src.meta


def test_soft_alpha_fixture_is_soft_and_valid(make_dataset):
    ds = make_dataset(mixed_shards())
    assert validate_dataset(ds.out).violations == []
    alphas = np.concatenate([m.ravel() for s in ds.samples for m in s.masks])
    assert set(np.unique(alphas)) == {0, 128, 255}  # soft values survive the round trip
    with tarfile.open(ds.tar(0)) as tar:
        names = tar.getnames()
    assert names[:5] == [f"m0000.{s}" for s in ("image.png", "bg.png", "layers.png", "txt", "json")]


def test_huggingface_datasets_reads_every_layer(make_dataset, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = make_dataset(mixed_shards())
    files = sorted(str(p) for p in (ds.out / "shards").glob("*.tar"))
    hf = datasets.load_dataset("webdataset", data_files={"train": files}, split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert len(hf) == 8 and set(hf.column_names) >= {"image.png", "bg.png", "layers.png", "txt", "json"}
    assert_same_layers({row["__key__"]: read_sample(row) for row in hf}, ds)  # decoded PIL images, dicts
    raw = hf.cast_column("layers.png", datasets.Image(decode=False))
    assert_same_layers({row["__key__"]: read_sample(row) for row in raw}, ds)  # {"bytes": ...} members


def test_huggingface_measurements_behind_the_layout(make_dataset, tmp_path):
    """What docs/FORMAT.md's layout and json rules rest on (datasets 4.8.5): a member set that
    varies with the layer count fails to load; json types are inferred from the first 5 samples
    (a later key is dropped, null-then-value fails). If this changes, revisit the reasons there."""
    datasets = pytest.importorskip("datasets")

    def load(name: str) -> object:
        files = sorted(str(p) for p in (tmp_path / name / "shards").glob("*.tar"))
        return datasets.load_dataset("webdataset", data_files={"train": files}, split="train",
                                     cache_dir=str(tmp_path / name / "cache"))

    from tests.manifests.conftest import write_dataset

    write_dataset(tmp_path / "v1", mixed_shards(version=1))
    with pytest.raises(ValueError, match="don't share the same prefix or the same types"):
        load("v1")
    late_key = mixed_shards()
    late_key[1][0].meta["late"] = 1.5  # the sixth sample (the first of the second shard)
    write_dataset(tmp_path / "late", late_key)
    assert "late" not in load("late")[5]["json"]
    nulls = mixed_shards()
    for sample in nulls[0]:
        sample.meta["source"]["maybe"] = None
    nulls[1][0].meta["source"]["maybe"] = "a value"
    write_dataset(tmp_path / "nulls", nulls)
    with pytest.raises(datasets.exceptions.DatasetGenerationError):
        load("nulls")


def test_webdataset_and_tarfile_read_every_layer(make_dataset):
    import webdataset as wds

    ds = make_dataset(mixed_shards())
    urls = [str(ds.tar(0)), str(ds.tar(1))]
    raw = {row["__key__"]: read_sample(row) for row in wds.WebDataset(urls, shardshuffle=False)}
    assert_same_layers(raw, ds)
    for spec in ("pilrgba", "rgba8"):  # webdataset's decoders that keep alpha
        decoded = {row["__key__"]: read_sample(row) for row in wds.WebDataset(urls, shardshuffle=False).decode(spec)}
        assert_same_layers(decoded, ds)
    rgb = next(iter(wds.WebDataset(urls, shardshuffle=False).decode("pil")))  # "pil" converts to RGB
    with pytest.raises(FormatError, match=r"member m0000\.layers\.png: .*dropped the alpha channel"):
        read_sample(rgb)
    plain = {g.key: read_sample(g.members, key=g.key) for u in urls for g in iter_tar_samples(u)}
    assert_same_layers(plain, ds)


def test_ray_data_reads_every_layer(make_dataset):
    ray = pytest.importorskip("ray")
    ds = make_dataset(mixed_shards())
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        rows = ray.data.read_webdataset([str(ds.tar(0)), str(ds.tar(1))]).take_all()
    finally:
        ray.shutdown()
    assert all(not any(isinstance(v, float) and np.isnan(v) for v in row.values()) for row in rows)
    assert_same_layers({os.path.basename(row["__key__"]): read_sample(row) for row in rows}, ds)


# -- format 1 --------------------------------------------------------------------------------------

def test_format1_dataset_validates_and_reads_as_binary_rgba(make_dataset):
    ds = make_dataset(mixed_shards(version=1))
    assert validate_dataset(ds.out).violations == []
    with tarfile.open(ds.tar(0)) as tar:
        assert "m0001.mask.2.png" in tar.getnames() and "m0001.layers.png" not in tar.getnames()
    for group in iter_tar_samples(ds.tar(0)):
        sample = read_sample(group.members, key=group.key)
        assert sample.version == 1
        src = next(s for s in ds.samples if s.key == group.key)
        rgba = sample.rgba()
        assert np.array_equal(rgba[..., :3], np.stack(src.foregrounds))
        assert np.array_equal(rgba[..., 3], np.stack(src.masks))
        assert set(np.unique(rgba[..., 3])) <= {0, 255}


# -- upgrade ---------------------------------------------------------------------------------------

def test_upgrade_round_trip_and_rerun(make_dataset, capsys):
    ds = make_dataset(mixed_shards(version=1))
    tars_before = [ds.tar(n).read_bytes() for n in (0, 1)]
    assert main(["upgrade", str(ds.out)]) == 0
    assert "2 shards upgraded" in capsys.readouterr().out
    report = validate_dataset(ds.out)
    assert report.violations == [] and report.samples == 8
    index = json.loads((ds.out / "manifest.json").read_text())
    assert index["schema"] == "layerdiff-dataset/2"
    assert index["stages"]["segment"][0]["checkpoint"]["name"] == "sam_vit_b.pth"
    for n in (0, 1):
        manifest = json.loads(ds.manifest(n).read_text())
        assert manifest["schema"] == "layerdiff-shard/2"
        assert manifest["upgraded_from"]["schema"] == "layerdiff-shard/1"
        assert ds.tar(n).read_bytes() != tars_before[n]
        for group in iter_tar_samples(ds.tar(n)):
            assert set(group.members) == {"image.png", "bg.png", "layers.png", "txt", "json"}
            new = read_sample(group.members, key=group.key)
            old = next(s for s in ds.samples if s.key == group.key)
            assert new.version == 2 and np.array_equal(new.rgba(), old.rgba())
            assert np.array_equal(new.recompose(), old.recompose())
            assert [layer["extent"] for layer in new.meta["layers"]] == ["visible"] * new.num_layers
            assert new.meta["source"]["uri"] == old.meta["source"]["uri"]
            assert new.meta["source"]["url"] == "" and new.meta["source"]["licence"] == ""
    upgraded = [ds.tar(n).read_bytes() for n in (0, 1)]
    again = upgrade_dataset(ds.out)  # rerun: nothing to do, nothing changes
    assert (again.kept, again.upgraded, again.finished) == ([0, 1], [], [])
    assert [ds.tar(n).read_bytes() for n in (0, 1)] == upgraded


def test_upgrade_interrupted_between_renames_is_finished(make_dataset, monkeypatch):
    import manifests.upgrade as up

    ds = make_dataset(mixed_shards(version=1))
    real_replace = os.replace

    def stop_before_manifest(src, dst):
        if str(dst).endswith("000001.json") and ".tmp-upgrade" in str(src):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(up.os, "replace", stop_before_manifest)
    with pytest.raises(KeyboardInterrupt):
        upgrade_dataset(ds.out)
    monkeypatch.setattr(up.os, "replace", real_replace)
    # shard 1: new tar in place, old manifest, pending manifest: not done, and not a format-1 shard
    assert json.loads(ds.manifest(1).read_text())["schema"] == "layerdiff-shard/1"
    assert not validate_dataset(ds.out).ok()
    report = upgrade_dataset(ds.out)
    assert (report.kept, report.finished, report.upgraded) == ([0], [1], [])
    assert validate_dataset(ds.out).violations == []
    assert not list((ds.out / "manifests").glob(".*tmp*")) and not list((ds.out / "shards").glob(".*tmp*"))


def test_upgrade_refuses_a_damaged_shard_and_keeps_it(make_dataset):
    ds = make_dataset(mixed_shards(version=1))
    data = bytearray(ds.tar(1).read_bytes())
    data[700] ^= 0xFF
    ds.tar(1).write_bytes(bytes(data))
    with pytest.raises(UpgradeError, match="shard 000001: its tar does not match"):
        upgrade_dataset(ds.out)
    assert ds.tar(1).read_bytes() == bytes(data)  # untouched, nothing lost


def test_upgrade_sample_takes_provenance_from_format1_source_meta():
    sample = make_sample("p1", seed=1, num_layers=1, version=1)
    sample.meta["source"]["meta"] = {"url": "https://example.org/a.jpg", "LICENSE": "CC0", "caption": "a cat",
                                     "exif": None}
    new = upgrade_sample(sample, "amodal")
    assert new.meta["source"]["url"] == "https://example.org/a.jpg"
    assert (new.meta["source"]["licence"], new.meta["source"]["caption"]) == ("CC0", "a cat")
    assert json.loads(new.meta["source"]["metadata"])["exif"] is None
    assert new.meta["layers"][0]["extent"] == "amodal"


# -- bad input: a clear error naming shard, key and member -----------------------------------------

def _truncate(members: dict[str, bytes]) -> dict[str, bytes]:
    return {**members, "layers.png": members["layers.png"][: len(members["layers.png"]) // 2]}


def _short_alpha(members: dict[str, bytes]) -> dict[str, bytes]:
    stack = np.asarray(Image.open(io.BytesIO(members["layers.png"])))
    return {**members, "layers.png": encode_png(np.ascontiguousarray(stack[:-3]))}


def _unknown_version(members: dict[str, bytes]) -> dict[str, bytes]:
    meta = json.loads(members["json"])
    meta["schema"] = "layerdiff/9"
    return {**members, "json": json.dumps(meta).encode()}


BAD_INPUTS = {
    "truncated layer": (_truncate, "layers.png", "unreadable"),
    "alpha of the wrong size": (_short_alpha, "layers.png", "expected 64x192 (3 layers of 64x64"),
    "unknown format version": (_unknown_version, "json", "unknown format version: schema is 'layerdiff/9'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_named(make_dataset, capsys, case):
    damage, member, text = BAD_INPUTS[case]
    ds = make_dataset(mixed_shards(), members_hook=lambda key, m: damage(m) if key == "m1000" else m)
    # the one reader
    group = next(g for g in iter_tar_samples(ds.tar(1)) if g.key == "m1000")
    with pytest.raises(FormatError) as err:
        read_sample(group.members, key=group.key, where="000001")
    assert (err.value.key, err.value.member) == ("m1000", member)
    assert str(err.value).startswith(f"shard 000001, key m1000, member m1000.{member}: ") and text in str(err.value)
    # the validator
    code = main(["validate", str(ds.out), "-q"])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("ERROR")]
    assert code == 1
    hit = [x for x in lines if x.startswith("ERROR shard 000001 key m1000:")]
    assert hit and any(f"m1000.{member}" in x or member == "json" for x in hit), lines
    assert any(text.split(":")[0] in x for x in hit), lines
    # nothing else is reported: the other samples are fine
    assert all("key m1000" in x for x in lines), lines


def test_format1_alpha_of_the_wrong_size_is_named(make_dataset, capsys):
    def shrink(key, members):
        if key != "m0001":
            return members
        return {**members, "mask.1.png": encode_png(np.zeros((60, 64), np.uint8))}
    ds = make_dataset(mixed_shards(version=1), members_hook=shrink)
    group = next(g for g in iter_tar_samples(ds.tar(0)) if g.key == "m0001")
    with pytest.raises(FormatError, match=r"key m0001, member m0001\.mask\.1\.png: is 64x60, the image is 64x64"):
        read_sample(group.members, key="m0001")
    assert main(["validate", str(ds.out), "-q"]) == 1
    assert "ERROR shard 000000 key m0001: member m0001.mask.1.png: is 64x60" in capsys.readouterr().out


def test_unknown_dataset_and_shard_versions_are_named(make_dataset, capsys):
    ds = make_dataset(mixed_shards())
    doc = json.loads(ds.manifest(0).read_text())
    doc["schema"] = "layerdiff-shard/7"
    ds.manifest(0).write_text(json.dumps(doc))
    assert main(["validate", str(ds.out), "-q"]) == 1
    out = capsys.readouterr().out
    assert "ERROR shard 000000: manifest $.schema: unknown format version: schema is 'layerdiff-shard/7'" in out
    with pytest.raises(UpgradeError, match="shard 000000: unknown format version"):
        upgrade_dataset(ds.out)


def test_rgba_source_layers_keep_their_alpha_in_a_png_viewer(make_dataset):
    """KEY.layers.png is an ordinary RGBA PNG: any image tool shows the layers one above another."""
    ds = make_dataset(mixed_shards())
    with tarfile.open(ds.tar(0)) as tar:
        img = Image.open(io.BytesIO(tar.extractfile("m0001.layers.png").read()))
        assert (img.mode, img.size) == ("RGBA", (64, 3 * 64))


def test_index_records_each_models_checkpoint_and_licence(make_dataset, capsys):
    ds = make_dataset(mixed_shards())
    index = json.loads((ds.out / "manifest.json").read_text())
    (segment,) = index["stages"]["segment"]
    assert (segment["model"], segment["checkpoint"]["sha256"], segment["licence"]) == ("vit_b", "ab" * 32, "Apache-2.0")
    index["stages"]["segment"][0]["licence"] = "MIT"  # the index must say what the shards say
    (ds.out / "manifest.json").write_text(json.dumps(index))
    assert main(["validate", str(ds.out), "-q"]) == 1
    assert "manifest.json stages differ" in capsys.readouterr().out
    doc = json.loads(ds.manifest(0).read_text())
    doc["stages"]["segment"]["licence"] = 5
    ds.manifest(0).write_text(json.dumps(doc))
    assert main(["validate", str(ds.out), "-q"]) == 1
    assert "ERROR shard 000000: manifest $.stages.segment.licence: 5 is not of type" in capsys.readouterr().out


def test_a_shard_holds_one_format_version(make_dataset, capsys):
    shards = mixed_shards()
    shards[0][2] = make_sample("m0002", seed=2, num_layers=2, version=1)  # format 1 in a format-2 shard
    ds = make_dataset(shards)
    assert main(["validate", str(ds.out), "-q"]) == 1
    errors = [x for x in capsys.readouterr().out.splitlines() if x.startswith("ERROR")]
    assert errors == ["ERROR shard 000000 key m0002: sample is format 1 but its shard manifest is format 2 "
                      "(a shard holds one version; `python -m manifests upgrade` rewrites whole shards)"]
