"""Soft alpha at object edges (datagen/alpha.py) and its path through the CPU pipeline, against
scenes whose true alpha is known."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from datagen.alpha import foreground_colours, refine_edge_alpha, soften_detections, trimap
from datagen.format import LayerSample, compose_uint8, psnr
from datagen.item import Detection, Item
from datagen.registry import get_backend
from datagen.scenes import make_scene
from datagen.score import build_stages, contributions, run_stages, score_alpha, soft_iou
from datagen.stages.base import StageContext

cv2.setNumThreads(1)


def _binary(alpha: np.ndarray) -> np.ndarray:
    return np.where(alpha > 127, 255, 0).astype(np.uint8)


def _detections(scene) -> list[Detection]:
    """The scene's visible layers as binary masks, as a segmenter would give them."""
    return [Detection(phrase=p, box=(0, 0, 1, 1), score=1.0, mask=_binary(v), extra={"depth": n})
            for n, (p, v) in enumerate(zip(scene.phrases, scene.visible_masks(), strict=True))]


def _item(scene) -> Item:
    return Item(key=f"s{scene.seed}", shard=0, index=0, uri=f"scene://{scene.seed}", source={},
                image=scene.image.copy(), caption=scene.caption)


def test_soft_scenes_keep_the_geometry_and_their_truth_recomposes() -> None:
    for seed in (0, 3, 7):
        hard, soft = make_scene(seed, 128), make_scene(seed, 128, edges="blur")
        assert hard.caption == soft.caption and hard.specs == soft.specs
        assert set(np.unique(np.concatenate(hard.masks))) <= {0, 255}
        edge = np.concatenate([(m > 0) & (m < 255) for m in soft.masks])
        assert edge.sum() > 100  # blurred edges are soft
        # The truth is exact: composing the true layers gives the image.
        assert np.array_equal(compose_uint8(soft.background, soft.foregrounds, soft.masks), soft.image)
        # Contributions of the layers and of the background sum to one.
        total = sum(soft.contributions())
        assert total.max() <= 1 + 1e-9
    with pytest.raises(ValueError, match="edges"):
        make_scene(0, 64, edges="fuzzy")


def test_hard_edges_stay_hard() -> None:
    # Every background kind (flat, gradient, stripes, checker, noise) occurs among these seeds.
    kinds = set()
    for seed in [*range(12), 21]:
        scene = make_scene(seed, 256)
        kinds.add(scene.background_kind)
        dets = _detections(scene)
        soften_detections(scene.image, dets, band=4)
        for det, true in zip(dets, scene.visible_masks(), strict=True):
            assert set(np.unique(det.mask)) <= {0, 255}, (seed, scene.background_kind)
            assert np.array_equal(det.mask, true), seed
            assert np.array_equal(det.pixels, np.where(true[..., None] > 0, scene.image, 0))
    assert kinds == {"flat", "gradient", "stripes", "checker", "noise"}


@pytest.mark.parametrize("edges", ["antialias", "blur"])
def test_soft_edges_come_closer_to_the_true_alpha(edges: str) -> None:
    gains = []
    for seed in range(6):
        scene = make_scene(seed, 256, edges=edges)
        dets = _detections(scene)
        binary = [d.mask.copy() for d in dets]
        soften_detections(scene.image, dets, band=4)
        true = scene.contributions()
        got = contributions([d.mask for d in dets])
        was = contributions(binary)
        for t, g, w in zip(true, got, was, strict=True):
            gains.append(soft_iou(t, g) - soft_iou(t, w))
        assert any(((d.mask > 0) & (d.mask < 255)).any() for d in dets)
    assert np.mean(gains) > 0.01 and min(gains) > -0.01, gains


def test_edges_between_objects_stay_where_they_are() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    image[:] = (30, 160, 60)
    image[16:48, 10:32] = (220, 30, 30)
    image[16:48, 32:54] = (30, 30, 220)
    image = cv2.GaussianBlur(image, (0, 0), 1.2)  # every edge soft, the shared one too
    left, right = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
    left[16:48, 10:32], right[16:48, 32:54] = 255, 255
    dets = [Detection("red", (0, 0, 1, 1), 1.0, mask=left), Detection("blue", (0, 0, 1, 1), 1.0, mask=right)]
    soften_detections(image, dets, band=3)
    a, b = dets[0].mask, dets[1].mask
    assert ((a > 0) & (a < 255)).sum() > 50  # soft against the background
    assert (a[20:44, 29:32] == 255).all() and (a[20:44, 32:35] == 0).all()  # hard against the neighbour
    assert (b[20:44, 32:35] == 255).all() and (b[20:44, 29:32] == 0).all()
    tri = trimap(left, 3, exclude=right > 0)
    assert (tri[right > 0] == 0).all() and (tri[20:44, 29:32] == 255).all()


def test_foreground_colours_are_decontaminated() -> None:
    # A red disc blurred into green: edge pixels mix the two; the layer's colours there are red.
    size = 96
    yy, xx = np.mgrid[0:size, 0:size]
    disc = ((yy - 48) ** 2 + (xx - 48) ** 2 <= 24**2).astype(np.float64)
    alpha_true = cv2.GaussianBlur(disc, (0, 0), 1.5)
    red, green = np.array([220, 30, 30.0]), np.array([40, 170, 60.0])
    image = np.rint(alpha_true[..., None] * red + (1 - alpha_true[..., None]) * green).astype(np.uint8)
    alpha = refine_edge_alpha(image, _binary(np.rint(alpha_true * 255)), band=4)
    soft = (alpha > 20) & (alpha < 235)
    assert soft.sum() > 100
    # The matted alpha follows the true one at the edge.
    assert np.abs(alpha[soft].astype(float) - 255 * alpha_true[soft]).mean() < 20
    for method in ("nearest", "ml"):
        fg = foreground_colours(image, alpha, method)
        assert np.abs(fg[soft].astype(float) - red).max(axis=1).mean() < 20, method
        assert (fg[alpha == 0] == 0).all() and np.array_equal(fg[alpha == 255], image[alpha == 255])
    mixed = np.abs(image[soft].astype(float) - red).max(axis=1).mean()
    assert mixed > 60  # the mixed pixels themselves are far from red
    with pytest.raises(ValueError, match="method"):
        foreground_colours(image, alpha, "magic")
    with pytest.raises(ValueError, match="shape"):
        refine_edge_alpha(image, alpha[:10], band=4)


def test_segment_param_turns_soft_alpha_off_and_holes_cover_the_soft_edge() -> None:
    scene = make_scene(2, 256, edges="blur")
    stages = build_stages(256)
    off = build_stages(256)
    off["segment"].params = dataclasses.replace(off["segment"].params, soft_alpha=False)
    soft_item, hard_item = _item(scene), _item(scene)
    run_stages(stages, [soft_item])
    run_stages(off, [hard_item])
    assert soft_item.ok and hard_item.ok
    assert all(set(np.unique(d.mask)) <= {0, 255} for d in hard_item.detections)
    assert all(d.pixels is None for d in hard_item.detections)
    assert any(((d.mask > 0) & (d.mask < 255)).sum() > 100 for d in soft_item.detections)
    # The inpainted holes cover every pixel with alpha > 0: no fringe of the object stays in the
    # background (its pixels there are the true background's, not the object's mix).
    covered = np.zeros((256, 256), bool)
    for d in soft_item.detections:
        covered |= d.mask > 0
    bg = soft_item.background
    assert psnr(bg, scene.background, covered) > 30
    # Then assemble: soft masks, decontaminated layers, a faithful recomposition.
    assemble = get_backend("assemble", "layers")(None, StageContext(image_size=256))
    assemble.run_items([soft_item])
    assert soft_item.ok, soft_item.rejected
    sample = LayerSample.from_members(soft_item.key, soft_item.members)
    assert any(((m > 0) & (m < 255)).any() for m in sample.masks)
    assert psnr(sample.recompose(), sample.image) >= 30
    assert sample.meta["quality"]["recon_psnr"] >= 30


def test_score_alpha_soft_beats_binary_on_blurred_scenes() -> None:
    stages = build_stages(256)
    soft = score_alpha(stages, n=4, size=256, edges="blur")
    stages["segment"].params = dataclasses.replace(stages["segment"].params, soft_alpha=False)
    binary = score_alpha(stages, n=4, size=256, edges="blur")
    assert soft["alpha_soft_iou"] > binary["alpha_soft_iou"] + 0.02
    assert soft["rgb_l1"] < binary["rgb_l1"]
    assert binary["soft_px_per_scene"] == 0 < soft["soft_px_per_scene"]


def _rgba_source(tmp_path, size: int = 128):
    """A sticker: a red disc with an anti-aliased (soft) outline, on pixels that are transparent
    (whose colours are noise, as exporters often leave them), and its true alpha."""
    rng = np.random.default_rng(0)
    k = 4
    yy, xx = np.mgrid[0:size * k, 0:size * k]
    disc = ((yy + 0.5) / k - 64) ** 2 + ((xx + 0.5) / k - 60) ** 2 <= 30**2
    alpha = np.rint(disc.reshape(size, k, size, k).mean(axis=(1, 3)) * 255).astype(np.uint8)
    rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    rgb[alpha > 0] = (210, 40, 40)
    path = tmp_path / "sticker.png"
    from PIL import Image

    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)
    return path, alpha


def test_source_alpha_is_kept_and_bounds_the_layers(tmp_path) -> None:
    path, alpha = _rgba_source(tmp_path)
    decode = get_backend("decode", "pil")(None, StageContext(image_size=128))
    item = Item(key="sticker", shard=0, index=0, uri=str(path),
                source={"kind": "file", "path": str(path), "root": str(tmp_path)}, caption="a red disc")
    decode.run_items([item])
    assert item.ok, item.rejected
    assert item.alpha is not None and np.abs(item.alpha.astype(int) - alpha).max() <= 1
    # The stages see the sticker over white, not the noise under its transparent pixels.
    assert (item.image[alpha == 0] == 255).all()
    stages = build_stages(128)
    run_stages(stages, [item])
    assert item.ok, item.rejected
    assert len(item.detections) == 1
    det = item.detections[0]
    # The layer's alpha is the source's: soft on the outline, 0 wherever the source is transparent.
    assert (det.mask[alpha == 0] == 0).all()
    edge = (alpha > 0) & (alpha < 255)
    assert np.abs(det.mask[edge].astype(int) - item.alpha[edge]).max() == 0
    # Straight colours at the soft outline: the disc's red, not red mixed with white.
    strong = edge & (alpha >= 64)
    assert np.abs(det.pixels[strong].astype(int) - (210, 40, 40)).max() <= 4
    assemble = get_backend("assemble", "layers")(None, StageContext(image_size=128))
    assemble.run_items([item])
    assert item.ok, item.rejected
    sample = LayerSample.from_members("sticker", item.members)
    assert sample.meta["quality"]["source_alpha_share"] > 0.5
    assert psnr(sample.recompose(), sample.image) >= 30
    assert np.abs(sample.masks[0].astype(int) - alpha).max() <= 1


def test_opaque_rgba_is_plain_rgb(tmp_path) -> None:
    from PIL import Image

    path = tmp_path / "opaque.png"
    Image.fromarray(np.full((64, 64, 4), 200, np.uint8) | np.array([0, 0, 0, 255], np.uint8), "RGBA").save(path)
    decode = get_backend("decode", "pil")(None, StageContext(image_size=64))
    item = Item(key="o", shard=0, index=0, uri=str(path), source={"kind": "file", "path": str(path),
                                                                 "root": str(tmp_path)})
    decode.run_items([item])
    assert item.ok and item.alpha is None and item.image.shape == (64, 64, 3)


def test_dataset_from_a_transparent_source_keeps_soft_alpha(tmp_path) -> None:
    from datagen.config import load_config
    from datagen.runner import run
    from manifests.validate import validate_dataset
    from tests.datagen.helpers import read_shard

    src = tmp_path / "src"
    src.mkdir()
    _path, alpha = _rgba_source(src)
    out = tmp_path / "out"
    cfg = load_config("pipelines/default.yaml", {"output": str(out), "source_kind": "folder",
                                                 "source_path": str(src), "shards": 1,
                                                 "samples_per_shard": 4, "image": {"size": 128}})
    run(cfg, engine="local", progress=False)
    assert validate_dataset(out).ok()
    _names, samples = read_shard(out / "shards" / "000000.tar")
    (members,) = samples.values()
    key = next(iter(samples))
    sample = LayerSample.from_members(key, members)
    assert sample.num_layers == 1
    assert np.abs(sample.masks[0].astype(int) - alpha).max() <= 1  # the source's own soft outline
    assert ((sample.masks[0] > 0) & (sample.masks[0] < 255)).sum() > 50
