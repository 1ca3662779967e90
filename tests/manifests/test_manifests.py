"""The manifests package: schemas, validate (and each corruption it must catch), summary, preview."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datagen.format import compose_uint8, iter_tar_samples
from manifests import (
    DocumentError,
    shard_done,
    sheet_size,
    summarize,
    validate_dataset,
    validate_document,
    write_preview,
)
from manifests.cli import main
from manifests.preview import cell_origin, num_columns
from manifests.summary import normalize_reason

ROOT = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("ERROR")]


# -- a valid dataset -----------------------------------------------------------------------------

def test_valid_dataset_passes(dataset, capsys):
    report = validate_dataset(dataset.out)
    assert report.violations == []
    assert (report.shards, report.samples) == (2, 6)
    code, out = run(capsys, "validate", str(dataset.out), "-q")
    assert code == 0, out
    assert "OK: 2 shards, 6 samples, 0 errors, 0 warnings" in out


def test_cli_module_entry_point(dataset):
    proc = subprocess.run([sys.executable, "-m", "manifests", "validate", str(dataset.out), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["ok"] is True


def test_parallel_jobs_agree(dataset):
    (dataset.out / "shards" / "000000.tar").open("r+b").write(b"x")  # break shard 0
    serial, parallel = validate_dataset(dataset.out), validate_dataset(dataset.out, jobs=2)
    assert [str(v) for v in serial.violations] == [str(v) for v in parallel.violations]
    assert serial.errors


# -- corruptions: each must fail with a message naming shard (and key) ---------------------------

def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_is_sha_mismatch(dataset, capsys):
    tar = dataset.tar(1)
    _flip_byte(tar, tar.stat().st_size - 2048 - 100)  # inside the last member's data or padding
    code, out = run(capsys, "validate", str(dataset.out), "-q")
    assert code == 1
    assert any(line.startswith("ERROR shard 000001:") and "sha256" in line for line in error_lines(out)), out
    assert not shard_done(dataset.out, 1) and shard_done(dataset.out, 0)


@pytest.mark.parametrize("member", ["layers.png", "bg.png"])
def test_flipped_byte_in_png_names_key(dataset, capsys, member):
    tar = dataset.tar(0)
    with tarfile.open(tar) as t:
        info = t.getmember(f"s0001.{member}")
    _flip_byte(tar, info.offset_data + 40)
    code, out = run(capsys, "validate", str(dataset.out), "-q")
    assert code == 1
    assert any(line.startswith(f"ERROR shard 000000 key s0001: member s0001.{member} is unreadable")
               for line in error_lines(out)), out


def _corrupt_sample(make_dataset, index: int, edit, version: int = 2) -> tuple[object, str]:
    shards = make_dataset.default_shards(version)
    sample = [s for shard in shards for s in shard][index]
    edit(sample)
    return make_dataset(shards, rejected=[[], []]), sample.key


def _expect(capsys, out_dir: Path, where: str, text: str) -> None:
    code, out = run(capsys, "validate", str(out_dir), "-q")
    assert code == 1, out
    hits = [line for line in error_lines(out) if line.startswith(f"ERROR {where}:") and text in line]
    assert hits, f"no '{where}: ...{text}' in:\n{out}"


def test_format1_mask_must_be_binary(make_dataset, capsys):
    def edit(s):
        ys, xs = np.nonzero(s.masks[0])
        s.masks[0][ys[0], xs[0]] = 128
    ds, key = _corrupt_sample(make_dataset, 4, edit, version=1)
    _expect(capsys, ds.out, f"shard 000001 key {key}", "mask.0 is not binary")


def test_soft_alpha_mask_is_valid(make_dataset, capsys):
    # Masks are 8-bit alphas: a soft edge is valid when the sample recomposes to its image.
    def edit(s):
        ys, xs = np.nonzero(s.masks[0])
        s.masks[0][ys[0], xs[0]] = 128
        s.image = s.recompose()
        s.meta["quality"]["recon_psnr"] = 100.0
    ds, _key = _corrupt_sample(make_dataset, 4, edit)
    code, out = run(capsys, "validate", str(ds.out), "-q")
    assert code == 0, out


@pytest.mark.parametrize(("version", "message"), [
    (1, "fg.0 has non-zero pixels outside its mask"),
    (2, "layer 0 has colour where its alpha is 0"),
])
def test_colour_where_transparent(make_dataset, capsys, version, message):
    def edit(s):
        ys, xs = np.nonzero(s.masks[0] == 0)
        s.foregrounds[0][ys[0], xs[0]] = 7
    ds, key = _corrupt_sample(make_dataset, 1, edit, version=version)
    _expect(capsys, ds.out, f"shard 000000 key {key}", message)


@pytest.mark.parametrize(("version", "member"), [(1, "mask.1.png"), (2, "layers.png")])
def test_missing_member(make_dataset, capsys, version, member):
    def drop(key, members):
        return {k: v for k, v in members.items() if not (key == "s0003" and k == member)}
    shards = make_dataset.default_shards(version)
    assert shards[1][0].key == "s0003" and shards[1][0].num_layers == 2
    ds = make_dataset(shards, members_hook=drop)
    _expect(capsys, ds.out, "shard 000001 key s0003", f"missing member s0003.{member}")


def test_unexpected_member(make_dataset, capsys):
    def add(key, members):
        return {**members, "depth.png": b"x"} if key == "s0002" else members
    ds = make_dataset(make_dataset.default_shards(), members_hook=add)
    _expect(capsys, ds.out, "shard 000000 key s0002", "unexpected members ['depth.png']")


def test_duplicate_key_across_shards(make_dataset, capsys, sample_factory):
    shards = make_dataset.default_shards()
    shards[1][2] = sample_factory("s0000", seed=99)
    ds = make_dataset(shards)
    _expect(capsys, ds.out, "shard 000001 key s0000", "duplicate key: also in shard 000000")


def test_non_contiguous_key(make_dataset, capsys):
    def interleave(entries):  # move the first sample's json after the second sample's members
        first = [e for e in entries if e[0] == "s0000.json"]
        rest = [e for e in entries if e[0] != "s0000.json"]
        return rest[:-4] + first + rest[-4:]
    ds = make_dataset(make_dataset.default_shards(), order_hook=interleave)
    _expect(capsys, ds.out, "shard 000000 key s0000", "not contiguous")


def test_duplicate_member(make_dataset, capsys):
    ds = make_dataset(make_dataset.default_shards(), order_hook=lambda e: e[:3] + [e[2]] + e[3:])
    _expect(capsys, ds.out, "shard 000000 key s0000", "duplicate member s0000.layers.png")


def test_empty_shard_is_valid(make_dataset, capsys):
    shards = make_dataset.default_shards() + [[]]
    ds = make_dataset(shards, rejected=[[], [], [{"source": "file:///x", "key": "x1", "stage": "decode",
                                                  "reason": "truncated"}]])
    code, out = run(capsys, "validate", str(ds.out), "-q")
    assert code == 0, out
    assert summarize(ds.out)["totals"]["rejected"] == 1


def test_recon_psnr_mismatch(make_dataset, capsys):
    def edit(s):
        s.meta["quality"]["recon_psnr"] = 42.0
    ds, key = _corrupt_sample(make_dataset, 2, edit)  # a noisy sample: real PSNR is ~45 dB
    _expect(capsys, ds.out, f"shard 000000 key {key}", "quality.recon_psnr 42.0 != measured")


def test_recomposition_too_poor(make_dataset, capsys):
    def edit(s):
        s.image = 255 - s.image
        s.meta["quality"]["recon_psnr"] = 31.0
    ds, key = _corrupt_sample(make_dataset, 0, edit)
    _expect(capsys, ds.out, f"shard 000000 key {key}", "recomposition PSNR")


def test_sample_json_schema_violation(make_dataset, capsys):
    def edit(s):
        s.meta["layers"][0]["box"] = [1, 2, 3]
        del s.meta["source"]
    ds, key = _corrupt_sample(make_dataset, 3, edit)
    _expect(capsys, ds.out, f"shard 000001 key {key}", "json $.layers[0].box")
    _expect(capsys, ds.out, f"shard 000001 key {key}", "'source' is a required property")


def test_layer_area_and_box_mismatch(make_dataset, capsys):
    def edit(s):
        s.meta["layers"][0]["area"] = 0.9
        s.meta["layers"][0]["box"] = [10, 10, 5, 500]
    ds, key = _corrupt_sample(make_dataset, 5, edit)
    _expect(capsys, ds.out, f"shard 000001 key {key}", "layers[0].area 0.9000 != mask coverage")
    _expect(capsys, ds.out, f"shard 000001 key {key}", "lies outside the 64x64 image")


def test_shard_manifest_schema_violation(dataset, capsys):
    path = dataset.manifest(1)
    doc = json.loads(path.read_text())
    doc["created"] = "yesterday"
    del doc["stages"]["inpaint"]
    path.write_text(json.dumps(doc))
    _expect(capsys, dataset.out, "shard 000001", "manifest $.created")
    _expect(capsys, dataset.out, "shard 000001", "manifest $.stages: 'inpaint' is a required property")


def test_manifest_numbers_must_match_tar(dataset, capsys):
    path = dataset.manifest(0)
    doc = json.loads(path.read_text())
    doc["keys"] = list(reversed(doc["keys"]))
    doc["layers"] = {"1": 3}
    path.write_text(json.dumps(doc))
    _expect(capsys, dataset.out, "shard 000000 key s0000", "not in tar order")
    _expect(capsys, dataset.out, "shard 000000", "layers histogram")


def test_index_inconsistent(dataset, capsys):
    path = dataset.out / "manifest.json"
    doc = json.loads(path.read_text())
    doc["totals"]["samples"] = 7
    doc["shards"] = doc["shards"][:1]
    path.write_text(json.dumps(doc))
    _expect(capsys, dataset.out, "dataset", "totals.samples=7")
    _expect(capsys, dataset.out, "shard 000001", "missing from manifest.json")


def test_unfinished_shard_and_stray_files(dataset, capsys):
    dataset.manifest(1).unlink()
    (dataset.out / "shards" / "notes.txt").write_text("hi")
    _expect(capsys, dataset.out, "shard 000001", "tar without manifest")
    _expect(capsys, dataset.out, "dataset", "stray file shards/notes.txt")


def test_temporary_files_are_warnings(dataset, capsys):
    (dataset.out / "shards" / "000002.tar.tmp-1234").write_bytes(b"partial")
    code, out = run(capsys, "validate", str(dataset.out), "-q")
    assert code == 0, out
    assert "WARNING dataset: temporary file shards/000002.tar.tmp-1234" in out
    code, out = run(capsys, "validate", str(dataset.out), "-q", "--strict")
    assert code == 1


def test_missing_index(make_dataset, capsys):
    ds = make_dataset(index=False)
    _expect(capsys, ds.out, "dataset", "manifest.json is missing")


def test_max_layers(make_dataset, capsys, sample_factory):
    shards = make_dataset.default_shards()
    shards[0][0] = sample_factory("s0000", seed=0, num_layers=4)
    ds = make_dataset(shards)
    _expect(capsys, ds.out, "shard 000000 key s0000", "4 layers, expected 1..3")  # config max_layers
    report = validate_dataset(ds.out, max_layers=1)
    assert {v.key for v in report.errors} == {"s0000", "s0001", "s0003", "s0005"}


# -- format helpers ------------------------------------------------------------------------------

def test_iter_tar_samples_groups_and_flags(dataset):
    groups = list(iter_tar_samples(dataset.tar(0)))
    assert [g.key for g in groups] == ["s0000", "s0001", "s0002"]
    assert all(not g.problems for g in groups)
    assert set(groups[1].members) == {"image.png", "bg.png", "layers.png", "txt", "json"}


def test_validate_document_names_json_path():
    with pytest.raises(DocumentError) as err:
        validate_document({"schema": "layerdiff-dataset/1", "config": {}, "config_sha256": "0" * 64,
                           "shards": [{"shard": -1, "samples": 1, "bytes": 1, "sha256": "x"}],
                           "totals": {"samples": 1, "rejected": 0, "bytes": 1}}, "dataset")
    assert any(e.startswith("$.shards[0].shard:") for e in err.value.errors)
    assert any(e.startswith("$.shards[0].sha256:") for e in err.value.errors)
    with pytest.raises(KeyError):
        validate_document({}, "nope")


def test_normalize_reason():
    assert normalize_reason("no detection above threshold 0.35 (ground.py:41)") == \
        normalize_reason("no detection above threshold 0.3 (ground.py:7)") == "no detection above threshold <n>"
    assert normalize_reason("OSError: cannot identify image file '/a/b.png'") == "OSError: cannot identify image file <str>"


# -- summary -------------------------------------------------------------------------------------

def test_summary(dataset, capsys):
    s = summarize(dataset.out)
    assert s["totals"]["samples"] == 6 and s["totals"]["rejected"] == 3 and s["totals"]["shards"] == 2
    assert s["totals"]["bytes"] == dataset.tar(0).stat().st_size + dataset.tar(1).stat().st_size
    assert s["layers"] == {"1": 3, "2": 3}
    assert s["rejections_by_stage"] == {"ground": 2, "decode": 1}
    assert s["rejections"][0] == {"stage": "ground", "reason": "no detection above threshold <n>", "count": 2,
                                  "example": "no detection above threshold 0.35 (ground.py:41)"}
    assert s["stages"]["segment"][0]["checkpoint"].startswith("sam_vit_b.pth sha256:abab")
    assert s["stages"]["segment"][0]["licence"] == "Apache-2.0"
    code, out = run(capsys, "summary", str(dataset.out))
    assert code == 0
    assert "shards 2  samples 6  rejected 3" in out
    assert "no detection above threshold <n>" in out
    assert "checkpoint=sam_vit_b.pth sha256:abababababab  licence=Apache-2.0" in out
    code, out = run(capsys, "summary", str(dataset.out), "--json")
    assert json.loads(out)["totals"] == s["totals"]


# -- preview -------------------------------------------------------------------------------------

def test_preview(dataset, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    code, out = run(capsys, "preview", str(dataset.out), "--shard", "0", "-n", "2", "--cell", "64",
                    "-o", str(sheet))
    assert code == 0, out
    samples = dataset.shards[0][:2]
    img = np.asarray(Image.open(sheet).convert("RGB"))
    assert img.shape[1::-1] == sheet_size([s.num_layers for s in samples], 64)
    for row, s in enumerate(samples):
        def cell(col, row=row):
            x, y = cell_origin(row, col, 64)
            return img[y:y + 64, x:x + 64]
        assert np.array_equal(cell(0), s.image)
        assert np.array_equal(cell(1), s.background)
        assert np.array_equal(cell(num_columns(s.num_layers) - 1), s.image)  # recomposed == image (no noise)
        fg_cell = cell(2)
        inside = s.masks[0] == 255
        assert np.array_equal(fg_cell[inside], s.foregrounds[0][inside])
        assert set(np.unique(fg_cell[s.masks[0] == 0])) <= {153, 204}  # checkerboard outside the layer
        assert np.array_equal(cell(2 + s.num_layers)[..., 0], s.masks[0])


def test_preview_by_key(dataset, tmp_path):
    rows, size = write_preview(dataset.out, tmp_path / "k.png", keys=["s0003", "s0000"], cell=32)
    assert rows == 2 and size == sheet_size([2, 1], 32)
    with pytest.raises(KeyError):
        write_preview(dataset.out, tmp_path / "k.png", keys=["nope"])


# -- export --------------------------------------------------------------------------------------

def test_export_writes_what_designers_open(make_dataset, capsys, tmp_path):
    from datagen.export import read_ora, read_psd

    def soften(s):  # a soft edge: a column of the first layer at alpha 128
        ys, xs = np.nonzero(s.masks[0])
        col = s.masks[0][:, xs.max()] > 0
        s.masks[0][col, xs.max()] = 128
        s.image = s.recompose()
        s.meta["quality"]["recon_psnr"] = 100.0
    ds, key = _corrupt_sample(make_dataset, 1, soften)
    dest = tmp_path / "export"
    code, out = run(capsys, "export", str(ds.out), str(dest), "-n", "3")
    assert code == 0, out
    folders = sorted(p for p in dest.iterdir() if p.is_dir())
    assert [p.name for p in folders] == ["s0000", "s0001", "s0002"]
    for folder in folders:
        composite = np.asarray(Image.open(folder / "composite.png").convert("RGB"))
        layers, merged = read_psd(folder / "layers.psd")
        ora_layers, ora_merged = read_ora(folder / "layers.ora")
        names = json.loads((folder / "layers.json").read_text())["layers"]
        assert [n for n, _ in layers] == [n for n, _ in ora_layers] == names
        assert names[1:] == [f"a box number {n}" for n in range(len(names) - 1)]  # the layer captions
        for n, ((_, psd), (_, ora)) in enumerate(zip(layers, ora_layers, strict=True)):
            assert np.array_equal(psd[..., 3], ora[..., 3]), (folder.name, n)
            visible = psd[..., 3] > 0
            assert np.array_equal(psd[..., :3][visible], ora[..., :3][visible])
            png = folder / ("layer.bg.png" if n == 0 else f"layer.{n - 1}.png")
            assert np.array_equal(np.asarray(Image.open(png)), ora)
        # The PSD's layers recompose to the composite within 1/255, and so does its merged image.
        flat = compose_uint8(layers[0][1][..., :3], [im[..., :3] for _, im in layers[1:]],
                             [im[..., 3] for _, im in layers[1:]])
        assert np.abs(flat.astype(int) - composite).max() <= 1
        assert np.abs(merged.astype(int) - composite).max() <= 1
        assert np.array_equal(ora_merged, composite)
    soft = read_psd(dest / key / "layers.psd")[0][1][1][..., 3]
    assert (soft == 128).any()  # the soft edge survives into the PSD


def test_export_unknown_key_is_a_usage_error(dataset, capsys, tmp_path):
    code = main(["export", str(dataset.out), str(tmp_path / "x"), "--key", "nope"])
    assert code == 2
    assert "keys not found: nope" in capsys.readouterr().err
