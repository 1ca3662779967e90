"""The layered-shard loader: shard lists, flips, K padding, fills, caption dropout, format errors."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from model.data import (
    DataConfig,
    ShardFormatError,
    collate,
    decode,
    drop_captions,
    make_dataset,
    make_loader,
    resolve_shards,
    to_example,
)
from tests.train.shards import make_members, png, write_dataset, write_tar


def _cfg(shards, **kw) -> DataConfig:
    base = dict(shards=shards, resolution=32, max_layers=3, batch_size=4, shuffle_buffer=0, hflip=0.0,
                uncond_dropout=0.0, caption_dropout=0.0, layer_caption_dropout=0.0)
    return DataConfig(**{**base, **kw})


def test_resolve_shards_folder_manifest_brace_and_list(tiny_data: Path) -> None:
    from_manifest = resolve_shards(tiny_data)
    assert [Path(u).name for u in from_manifest] == ["000000.tar", "000001.tar"]
    assert resolve_shards(tiny_data / "manifest.json") == from_manifest
    assert resolve_shards(str(tiny_data / "shards" / "{000000..000001}.tar")) == from_manifest
    assert resolve_shards([from_manifest[1], from_manifest[0]]) == from_manifest[::-1]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_shards(str(tiny_data / "shards" / "{000000..000003}.tar"))


def test_pads_k_to_max_layers_with_presence(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "a.tar", [("one", make_members("one", 32, [("red", (4, 4, 12, 20))]))])
    (ex,) = list(make_dataset(_cfg(str(shard)), train=False))
    layers, present = ex["layers"], ex["present"]
    assert layers.shape == (7, 3, 32, 32) and layers.min() >= -1 and layers.max() <= 1
    assert present.tolist() == [True, True, False, False, True, False, False]
    assert ex["layer_prompts"] == ["a blue background", "a red square", "", ""]
    assert torch.all(layers[2:4] == 0.0)  # absent foregrounds: neutral
    assert torch.all(layers[5:7] == -1.0)  # absent masks: empty
    mask = layers[4]
    assert torch.all(mask[:, 4:12, 4:20] == 1) and int((mask[0] > 0).sum()) == 8 * 16


def test_foreground_colour_extends_outside_mask(tmp_path: Path) -> None:
    """A black object on a black-outside layer must not vanish: its colour fills the layer."""
    shard = write_tar(tmp_path / "a.tar", [("k", make_members("k", 32, [("black", (8, 8, 16, 16))]))])
    (ex,) = list(make_dataset(_cfg(str(shard)), train=False))
    black = 25 / 127.5 - 1
    assert torch.allclose(ex["layers"][1], torch.full((3, 32, 32), black), atol=1e-3)
    (zero,) = list(make_dataset(_cfg(str(shard), fg_fill="zero"), train=False))
    assert torch.all(zero["layers"][1][:, 0, 0] == -1.0)


def test_flip_applies_to_every_layer_together(tmp_path: Path) -> None:
    objects = [("red", (2, 1, 10, 9)), ("green", (12, 20, 30, 26))]  # nothing is symmetric
    sample = decode({"__key__": "k", "__url__": "x", **make_members("k", 32, objects)}, 3)
    plain = to_example(sample, 32, 3)["layers"]
    flipped = to_example(sample, 32, 3, flip=True)["layers"]
    assert torch.equal(flipped, plain.flip(-1))
    # Through the pipeline at p=0.5: each sample is flipped whole or not at all.
    shard = write_tar(tmp_path / "a.tar", [(f"k{i}", make_members(f"k{i}", 32, objects)) for i in range(24)])
    outcomes = set()
    for ex in make_dataset(_cfg(str(shard), hflip=0.5, resampled=False, random_crop=False), train=True):
        per_layer = [bool(torch.equal(ex["layers"][i], flipped[i])) for i in range(1 + 2 * len(objects))
                     if not torch.equal(plain[i], flipped[i])]
        assert len(set(per_layer)) == 1, "layers of one sample flipped differently"
        assert per_layer[0] or torch.equal(ex["layers"], plain)
        outcomes.add(per_layer[0])
    assert outcomes == {True, False}


def test_resize_and_crop_keep_layers_aligned(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "a.tar", [("big", make_members("big", 64, [("red", (16, 8, 48, 40))]))])
    (ex,) = list(make_dataset(_cfg(str(shard)), train=False))
    fg, mask = ex["layers"][1], ex["layers"][4]
    assert fg.shape == (3, 32, 32)
    alpha = (mask[0] + 1) / 2  # the target is the resized alpha itself, not re-thresholded
    assert torch.all(alpha[9:23, 5:19] == 1) and torch.all(alpha[:6] == 0) and torch.all(alpha[26:] == 0)
    assert alpha.sum().item() == pytest.approx(16 * 16, abs=0.5)  # coverage kept through the resize
    assert bool(((alpha > 0) & (alpha < 1)).any())  # the antialiased edge stays soft
    red = torch.tensor([220, 40, 40]) / 127.5 - 1
    assert torch.allclose(fg[:, 0, 0], red, atol=2e-2)  # edge colour not darkened by the zero fill


def test_caption_dropout() -> None:
    ex = {"prompt": "a red square", "layer_prompts": ["bg", "fg", ""]}
    assert drop_captions(dict(ex), random.Random(0), 1.0, 0.0, 0.0) == {"prompt": "", "layer_prompts": ["", "", ""]}
    kept = drop_captions(dict(ex), random.Random(0), 0.0, 0.0, 0.0)
    assert kept == ex
    rng, dropped = random.Random(1), 0
    for _ in range(200):
        out = drop_captions({"prompt": "p", "layer_prompts": ["a", "b"]}, rng, 0.0, 0.5, 0.5)
        dropped += (out["prompt"] == "") + out["layer_prompts"].count("")
    assert 200 < dropped < 400


def test_loader_batches_and_epoch_length(tiny_data: Path) -> None:
    loader = make_loader(_cfg(tiny_data, epoch_samples=8, shuffle_buffer=4, hflip=0.5, uncond_dropout=0.2))
    batches = list(loader)
    assert len(batches) == 2
    batch = batches[0]
    assert batch["layers"].shape == (4, 7, 3, 32, 32) and batch["present"].shape == (4, 7)
    assert len(batch["prompt"]) == 4 and all(len(p) == 4 for p in batch["layer_prompts"])
    assert collate([{**make_example(), "key": "x"}])["layers"].shape == (1, 7, 3, 32, 32)


def make_example() -> dict:
    return {"layers": torch.zeros(7, 3, 32, 32), "present": torch.ones(7, dtype=torch.bool),
            "prompt": "", "layer_prompts": ["", "", "", ""]}


def test_split_by_node_gives_disjoint_shards(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", shards=4, per_shard=2)
    keys = []
    for rank in range(2):
        cfg = _cfg(root, resampled=False, rank=rank, world_size=2)
        keys.append({ex["key"] for ex in make_dataset(cfg, train=True)})
    assert len(keys[0]) == len(keys[1]) == 4 and not keys[0] & keys[1]


@pytest.mark.parametrize("damage, message", [
    ("truncated", r"shard .*bad\.tar(: unreadable after sample ok|, sample broken: member broken\..*: missing)"),
    ("short_alpha", r"shard .*bad\.tar, sample broken: member broken\.layers\.png: is 32x30, expected 32x32"),
    ("missing_layers", r"shard .*bad\.tar, sample broken: member broken\.layers\.png: missing"),
    ("bad_png", r"shard .*bad\.tar, sample broken: member broken\.layers\.png: unreadable"),
    ("unknown_version", r"shard .*bad\.tar, sample broken: member broken\.json: unknown format version"),
    ("split_sample", r"shard .*bad\.tar, sample broken: member broken\.json: missing"),
    ("repeated_key", r"shard .*bad\.tar, sample ok: key appears twice"),
])
def test_corrupt_shard_names_shard_and_key(tmp_path: Path, damage: str, message: str) -> None:
    good = make_members("ok", 32, [("red", (4, 4, 12, 12))])
    bad = make_members("broken", 32, [("red", (4, 4, 12, 12))])
    samples = [("ok", good), ("broken", bad)]
    if damage == "short_alpha":
        bad["layers.png"] = png(np.zeros((30, 32, 4), np.uint8))
    elif damage == "missing_layers":
        del bad["layers.png"]
    elif damage == "unknown_version":
        bad["json"] = bad["json"].replace(b'"layerdiff/2"', b'"layerdiff/3"')
    elif damage == "bad_png":
        bad["layers.png"] = b"not a png"
    elif damage == "split_sample":
        first = {k: v for k, v in bad.items() if k in ("image.png", "bg.png")}
        rest = {k: v for k, v in bad.items() if k not in first}
        samples = [("broken", first), ("ok", good), ("broken", rest)]
    elif damage == "repeated_key":
        samples = [("ok", good), ("broken", bad), ("ok", good)]
    path = write_tar(tmp_path / "bad.tar", samples)
    if damage == "truncated":  # cut inside a member's data (a cut between members reads as a shorter tar)
        import tarfile

        with tarfile.open(path) as tar:
            cut = tar.getmember("broken.layers.png").offset_data + 20
        path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ShardFormatError, match=message):
        for _ in make_loader(_cfg(str(path), batch_size=1), train=False):
            pass


def test_soft_alpha_and_format1_samples_load(tmp_path: Path) -> None:
    """Format 2's soft alpha reaches the model as it is; format-1 shards still load (binary alpha)."""
    soft = make_members("soft", 32, [("red", (4, 4, 12, 12))])
    alpha = np.zeros((32, 32), np.uint8)
    alpha[4:12, 4:12] = 255
    alpha[3, 4:12] = 64  # a faint rim above the square
    fg = np.zeros((32, 32, 3), np.uint8)
    fg[alpha > 0] = (220, 40, 40)
    soft["layers.png"] = png(np.dstack([fg, alpha]))
    old = make_members("old", 32, [("red", (4, 4, 12, 12))], version=1)
    shard = write_tar(tmp_path / "a.tar", [("soft", soft), ("old", old)])
    soft_ex, old_ex = list(make_dataset(_cfg(str(shard)), train=False))
    assert soft_ex["layers"][4][0, 3, 4].item() == pytest.approx(64 / 255 * 2 - 1, abs=1e-4)
    assert torch.allclose(soft_ex["layers"][1][:, 3, 4], torch.tensor([220, 40, 40]) / 127.5 - 1, atol=1e-3)
    assert torch.equal(soft_ex["layers"][4][:, 4:, :], old_ex["layers"][4][:, 4:, :])
    assert set(old_ex["layers"][4].unique().tolist()) == {-1.0, 1.0}


def test_manifest_size_mismatch_is_reported(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", shards=1, per_shard=2)
    shard = root / "shards" / "000000.tar"
    shard.write_bytes(shard.read_bytes()[:-2048])
    with pytest.raises(ShardFormatError, match=r"000000\.tar: \d+ bytes, but .*manifest\.json lists"):
        resolve_shards(root)
