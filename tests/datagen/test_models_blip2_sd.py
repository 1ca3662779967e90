"""The ``blip2`` caption and ``sd-inpaint`` inpaint backends on tiny random checkpoints.

The tiny folders are written with ``save_pretrained`` and loaded by the backends' own loaders, exactly
as real folders are. Their outputs are noise, so the tests check plumbing, exactness outside the holes,
determinism, bookkeeping and errors -- never caption or image quality.
"""

from __future__ import annotations

import json
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from datagen.item import Detection, Item
from datagen.registry import get_backend, register
from datagen.stages.base import Stage
from datagen.stages.models.blip2 import Blip2Caption, Blip2Params
from datagen.stages.models.sd_inpaint import SdInpaint, SdInpaintParams, blend, hole_mask, item_seed

torch.set_num_threads(1)
torch.set_flush_denormal(True)

H, W = 72, 88  # not square and not the model's 64 px: exercises both resizes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from datagen.tiny_weights import blip2, sd_inpaint

    out = tmp_path_factory.mktemp("tiny_blip2_sd")
    return {**blip2.build(out), **sd_inpaint.build(out)}


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model loader tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def make_items(n: int = 2, with_masks: bool = True) -> list[Item]:
    rng = np.random.default_rng(7)
    items = []
    for i in range(n):
        img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        dets = []
        if with_masks:
            m = np.zeros((H, W), np.uint8)
            m[10 + 5 * i : 40, 20 : 50 + 4 * i] = 255
            dets.append(Detection("red ball", (20.0, 10.0 + 5 * i, 50.0 + 4 * i, 40.0), 0.8, mask=m))
            m2 = np.zeros((H, W), np.uint8)
            m2[50:66, 60:80] = 255
            dets.append(Detection("cat", (60.0, 50.0, 80.0, 66.0), 0.6, mask=m2))
        items.append(Item(key=f"s00000-{i:04d}", shard=0, index=i, uri=f"mem://{i}", source={}, image=img,
                          caption="a red ball and a cat", detections=dets))  # fmt: skip
    return items


# -- blip2 ---------------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert get_backend("caption", "blip2") is Blip2Caption
    assert get_backend("inpaint", "sd-inpaint") is SdInpaint


@pytest.mark.parametrize("kind", ["blip2", "instructblip"])
def test_caption_batch(tiny: dict[str, Path], kind: str) -> None:
    params = Blip2Params(model=str(tiny[kind]), max_new_tokens=6)
    Blip2Caption.check(params)
    stage = Blip2Caption(params)
    assert stage.kind == ("blip-2" if kind == "blip2" else "instructblip")
    items = make_items()
    stage.run_items(items)
    for it in items:
        assert it.ok, it.rejected
        assert isinstance(it.caption, str) and it.caption and it.caption == it.caption.strip()
        assert it.caption != "a red ball and a cat"  # replaced: keep_source_caption is off
    # the in-process API the layer captioner uses; a prompt is stripped from the output
    caps = stage.caption_images([it.image for it in items], prompt="a photo of")
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    assert caps == stage.caption_images(
        [it.image for it in items], prompt="a photo of"
    )  # greedy: deterministic
    ident = Blip2Caption.identity(params)
    assert ident["backend"] == "blip2" and ident["checkpoint"]["name"] == "model.safetensors"
    assert len(ident["checkpoint"]["sha256"]) == 64


def test_keep_source_caption(tiny: dict[str, Path]) -> None:
    stage = Blip2Caption(Blip2Params(model=str(tiny["blip2"]), max_new_tokens=4, keep_source_caption=True))
    items = make_items()
    items[1].caption = ""
    stage.run_items(items)
    assert items[0].caption == "a red ball and a cat"
    assert items[1].caption or not items[1].ok  # captioned (or rejected for an empty caption)


def test_blip2_missing_checkpoint(tiny: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*config.json"):
        Blip2Caption.check(Blip2Params(model=str(missing)))
    folder = tmp_path / "blip2-noweights"
    shutil.copytree(tiny["blip2"], folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{folder}.*model.safetensors"):
        Blip2Caption.check(Blip2Params(model=str(folder)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Blip2Caption(Blip2Params(model=str(folder)))  # the actor fails the same way, before loading


def test_blip2_wrong_format(tiny: dict[str, Path], tmp_path: Path) -> None:
    # an SD folder handed to the caption backend: its config.json is not a BLIP-2 one
    with pytest.raises(FileNotFoundError, match="config.json"):
        Blip2Caption.check(Blip2Params(model=str(tiny["sd_inpaint"])))
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'.*blip-2"):
        Blip2Caption.check(Blip2Params(model=str(folder)))
    legacy = tmp_path / "legacy"
    shutil.copytree(tiny["blip2"], legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    cfg.pop("image_token_index", None)
    cfg.pop("image_token_id", None)
    (legacy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="image_token_index"):
        Blip2Caption.check(Blip2Params(model=str(legacy)))


# -- sd-inpaint ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inpainter(tiny: dict[str, Path]) -> SdInpaint:
    return SdInpaint(SdInpaintParams(model=str(tiny["sd_inpaint"]), steps=2, dilate=9))


def test_inpaint_batch_exact_outside_holes(inpainter: SdInpaint, monkeypatch: pytest.MonkeyPatch) -> None:
    assert inpainter.resolution == 64
    items = make_items()
    calls = []
    pipe_cls = type(inpainter.pipe)
    real_call = pipe_cls.__call__

    def spy(pipe, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - records the batch size of each call
        calls.append(len(kwargs["image"]))
        return real_call(pipe, *args, **kwargs)

    monkeypatch.setattr(pipe_cls, "__call__", spy)
    inpainter.run_items(items)
    assert calls == [2]  # the whole batch in one pipeline call
    for it in items:
        assert it.ok, it.rejected
        hole = hole_mask(it, 9)
        assert it.background.dtype == np.uint8 and it.background.shape == it.image.shape
        assert np.array_equal(it.background[~hole], it.image[~hole])  # bit-exact outside the holes
        assert (it.background[hole] != it.image[hole]).mean() > 0.5  # inside: regenerated
        assert 0 < it.quality["hole_fraction"] < 1
        # the dilation reaches beyond the raw masks
        raw = np.zeros((H, W), bool)
        for d in it.detections:
            raw |= d.mask > 0
        assert hole.sum() > raw.sum() and hole[raw].all()


def test_inpaint_deterministic_per_key(inpainter: SdInpaint) -> None:
    a, b = make_items(), make_items()
    inpainter.run_items(a)
    inpainter.run_items(b)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.background, y.background)
    assert item_seed(0, "k1") == item_seed(0, "k1") != item_seed(0, "k2") != item_seed(1, "k2")
    c = make_items()
    c[0].key = "another-key"
    inpainter.run_items(c)
    assert not np.array_equal(c[0].background, a[0].background)


def test_inpaint_no_detections_and_huge_hole(inpainter: SdInpaint) -> None:
    items = make_items(with_masks=False)
    full = np.full((H, W), 255, np.uint8)
    items[1].detections = [Detection("wall", (0.0, 0.0, float(W), float(H)), 0.9, mask=full)]
    inpainter.run_items(items)
    assert np.array_equal(items[0].background, items[0].image) and items[0].quality["hole_fraction"] == 0
    assert not items[1].ok and "hole covers 100%" in items[1].rejected["reason"]


def test_blend_feather_keeps_outside() -> None:
    rng = np.random.default_rng(1)
    src, gen = (rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(2))
    hole = np.zeros((20, 20), bool)
    hole[5:15, 5:15] = True
    out = blend(src, gen, hole, feather=3)
    assert np.array_equal(out[~hole], src[~hole])
    assert np.array_equal(out[9:11, 9:11], gen[9:11, 9:11])  # deep inside: the inpainting alone


def test_sd_missing_checkpoint(tiny: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*model_index.json"):
        SdInpaint.check(SdInpaintParams(model=str(missing)))
    folder = tmp_path / "sd-noweights"
    shutil.copytree(tiny["sd_inpaint"], folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"unet.*diffusion_pytorch_model\.safetensors"):
        SdInpaint.check(SdInpaintParams(model=str(folder)))


def test_sd_wrong_format(tiny: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "sd-text2img"
    shutil.copytree(tiny["sd_inpaint"], folder)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg["in_channels"] = 4
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="in_channels=4.*9"):
        SdInpaint.check(SdInpaintParams(model=str(folder)))
    with pytest.raises(FileNotFoundError, match="model_index.json"):  # a BLIP-2 folder is no diffusers folder
        SdInpaint.check(SdInpaintParams(model=str(tiny["blip2"])))
    with pytest.raises(ValueError, match="multiple of 8"):
        SdInpaint.check(SdInpaintParams(model=str(tiny["sd_inpaint"]), resolution=60))


# -- recheck and layer captions (through the registry) -------------------------------------------


@dataclass
class FakeGroundParams:
    score: float = 0.9


@register
class FakeGround(Stage):
    """A ground backend that 'finds' every phrase at the first detection's old box: the recheck's wiring."""

    stage = "ground"
    name = "test-fake-ground"
    Params = FakeGroundParams

    def process(self, items: list[Item]) -> None:
        for it in items:
            assert it.image is not None and it.phrases == ["cat", "red ball"]
            it.detections = [Detection("red ball", (20.0, 12.0, 50.0, 40.0), self.params.score)]


@pytest.mark.parametrize("action", ["flag", "reject"])
def test_recheck(tiny: dict[str, Path], action: str) -> None:
    recheck = {"backend": "test-fake-ground", "params": {"score": 0.7}, "threshold": 0.5, "action": action}
    params = SdInpaintParams(model=str(tiny["sd_inpaint"]), steps=1, recheck=recheck)
    SdInpaint.check(params)
    assert SdInpaint.identity(params)["recheck"]["backend"] == "test-fake-ground"
    items = make_items()
    SdInpaint(params).run_items(items)
    for it in items:
        assert it.quality["hallucination"] == pytest.approx(0.7)
        if action == "flag":
            assert it.ok and it.quality["hallucination_flag"] is True
            assert [d.phrase for d in it.detections] == ["red ball", "cat"]  # the item's own detections kept
        else:
            assert not it.ok and "re-detected" in it.rejected["reason"]
    with pytest.raises(ValueError, match="action"):
        SdInpaint.check(SdInpaintParams(model=str(tiny["sd_inpaint"]), recheck={**recheck, "action": "drop"}))
    with pytest.raises(KeyError, match="no-such-ground"):
        SdInpaint.check(SdInpaintParams(model=str(tiny["sd_inpaint"]), recheck={"backend": "no-such-ground"}))


def test_layer_captioner(tiny: dict[str, Path]) -> None:
    cap = {"backend": "blip2", "params": {"model": str(tiny["blip2"]), "max_new_tokens": 4}}
    params = SdInpaintParams(model=str(tiny["sd_inpaint"]), steps=1, layer_captioner=cap)
    SdInpaint.check(params)
    items = make_items()
    SdInpaint(params).run_items(items)
    for it in items:
        assert it.ok and isinstance(it.background_caption, str)
        assert all(isinstance(d.caption, str) for d in it.detections)
    assert any(it.background_caption for it in items)
    # a captioner that needs its own environment cannot run inside this actor
    lavis = {"backend": "lavis", "params": {"model": str(tiny["blip2"])}}
    with pytest.raises(ValueError, match="in-process"):
        SdInpaint.check(SdInpaintParams(model=str(tiny["sd_inpaint"]), layer_captioner=lavis))
