"""The synthetic scene generator: exact true layers, determinism, hold-out control, shapes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from datagen.format import compose_uint8
from datagen.phrases import PALETTE, extract_phrases
from datagen.scenes import (
    BACKGROUNDS,
    MIN_VISIBLE,
    SHAPES,
    classify_shape,
    make_scene,
    shape_mask,
    split_combos,
)

cv2.setNumThreads(1)


@pytest.mark.parametrize("seed", range(12))
def test_layers_compose_to_the_image_exactly(seed: int) -> None:
    scene = make_scene(seed, 128)
    assert 1 <= scene.num_layers <= 3
    assert scene.image.dtype == np.uint8 and scene.image.shape == (128, 128, 3)
    assert np.array_equal(compose_uint8(scene.background, scene.foregrounds, scene.masks), scene.image)
    for fg, mask, colour in zip(scene.foregrounds, scene.masks, scene.colours, strict=True):
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
        assert not fg[mask == 0].any()  # foreground is 0 outside its mask
        assert (fg[mask > 0] == PALETTE[colour]).all()  # flat colour, no anti-aliasing
    assert len(set(scene.colours)) == scene.num_layers  # distinct colours within a scene


def test_visible_masks_partition_the_hole() -> None:
    for seed in range(20):
        scene = make_scene(seed, 128)
        vis = [m > 0 for m in scene.visible_masks()]
        union = np.zeros_like(vis[0])
        for v, full in zip(vis, scene.masks, strict=True):
            assert not (union & v).any()  # visible parts never overlap
            assert (v <= (full > 0)).all()
            assert v.sum() >= MIN_VISIBLE * (full > 0).sum() - 60  # rasterisation slack at 128 px
            union |= v
        assert np.array_equal(union, scene.hole())
        assert vis[-1].sum() == (scene.masks[-1] > 0).sum()  # the front layer is all visible


def test_deterministic_and_size_independent() -> None:
    a, b = make_scene(7, 256), make_scene(7, 256)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert make_scene(8, 256).caption != a.caption or not np.array_equal(make_scene(8, 256).image, a.image)
    big = make_scene(7, 512)
    assert big.caption == a.caption and big.shapes == a.shapes
    for m_small, m_big in zip(a.masks, big.masks, strict=True):
        down = cv2.resize(m_big, (256, 256), interpolation=cv2.INTER_AREA) > 127
        inter = (down & (m_small > 0)).sum()
        assert inter / (down | (m_small > 0)).sum() > 0.95


def test_captions_name_every_layer() -> None:
    scene = make_scene(3, 128, n_objects=3)
    assert scene.num_layers == 3
    assert sorted(extract_phrases(scene.caption)) == sorted(scene.phrases)
    assert scene.layer_captions == [f"a {p}" if p[0] not in "aeiou" else f"an {p}" for p in scene.phrases]
    assert scene.background_caption.endswith("background")
    assert scene.background_caption.split()[-2] == scene.background_colour or \
        scene.background_colour in scene.background_caption


def test_every_background_kind_renders() -> None:
    for kind in BACKGROUNDS:
        scene = make_scene(1, 96, backgrounds=[kind])
        assert scene.background_kind == kind
        outside = ~scene.hole()
        assert np.array_equal(scene.image[outside], scene.background[outside])


def test_hold_out_control() -> None:
    seen, held = split_combos(0.25, seed=0)
    assert not set(seen) & set(held) and len(held) == round(0.25 * (len(seen) + len(held)))
    assert {c for c, _ in seen} == set(PALETTE) and {s for _, s in seen} == set(SHAPES)
    for seed in range(15):
        scene = make_scene(seed, 64, combos=seen)
        assert all(cs in seen for cs in zip(scene.colours, scene.shapes, strict=True))
        scene = make_scene(seed, 64, exclude=seen, n_objects=1)
        assert (scene.colours[0], scene.shapes[0]) in held
    only = make_scene(0, 64, colours=["red"], shapes=["star"], n_objects=1)
    assert only.phrases == ["red star"]
    with pytest.raises(ValueError):
        make_scene(0, 64, combos=[])


def test_classify_shape() -> None:
    for size in (64, 128):
        wrong = []
        for seed in range(60):
            scene = make_scene(500 + seed, size, n_objects=1)
            got = classify_shape(scene.masks[0])
            if got != scene.shapes[0]:
                wrong.append((scene.shapes[0], got))
        assert len(wrong) <= 1, wrong
    assert classify_shape(np.zeros((32, 32), np.uint8)) is None


def test_shape_mask_rejects_unknown_shape() -> None:
    from datagen.scenes import ShapeSpec

    with pytest.raises(ValueError):
        shape_mask(ShapeSpec("blob", "red", 0.5, 0.5, 0.2, 0.0), 32)


def test_object_scale_grows_every_object_and_is_bounded() -> None:
    areas = {1.0: [], 1.5: []}
    for scale, sizes in areas.items():
        for seed in range(40):
            scene = make_scene(seed, 64, object_scale=scale)
            np.testing.assert_array_equal(compose_uint8(scene.background, scene.foregrounds, scene.masks),
                                          scene.image)
            for spec, mask in zip(scene.specs, scene.masks, strict=True):
                assert 0.09 * scale <= spec.r <= 0.24 * 1.2 * scale  # the count's size range, scaled
                sizes.append(int((mask > 0).sum()))
    assert 1.8 < np.mean(areas[1.5]) / np.mean(areas[1.0]) < 2.7  # area grows as scale^2 = 2.25
    with pytest.raises(ValueError, match="object_scale"):
        make_scene(0, 64, object_scale=2.0)


def test_upright_scenes_fix_every_rotation() -> None:
    from datagen.scenes import UPRIGHT_ANGLES

    for seed in range(10):
        scene = make_scene(seed, 64, upright=True)
        np.testing.assert_array_equal(compose_uint8(scene.background, scene.foregrounds, scene.masks), scene.image)
        assert all(spec.angle == UPRIGHT_ANGLES[spec.shape] for spec in scene.specs)
    # upright, the square's mask is axis-aligned: a full rectangle of its bounding box
    for seed in range(60):
        scene = make_scene(seed, 64, n_objects=1, upright=True)
        if scene.specs[0].shape == "square":
            ys, xs = np.nonzero(scene.masks[0])
            assert (scene.masks[0][ys.min():ys.max() + 1, xs.min():xs.max() + 1] > 0).all()
            return
    raise AssertionError("no square in 60 single-object scenes")


def test_hard_scenes_keep_their_truth() -> None:
    from datagen.scenes import HARD_KINDS, make_hard_scene

    for kind in HARD_KINDS:
        for seed in range(4):
            scene = make_hard_scene(seed, 96, kind)
            assert scene.image.shape == (96, 96, 3) and scene.background_kind.startswith(kind)
            assert sorted(extract_phrases(scene.caption)) == sorted(scene.phrases)
            outside = ~scene.hole()
            if kind != "soft":  # blurred edges reach past the binary masks
                assert np.array_equal(scene.image[outside], scene.background[outside])
            assert all(m.any() for m in scene.masks)
    border = make_hard_scene(1, 96, "border").masks[-1] > 0
    assert border[0].any() or border[-1].any() or border[:, 0].any() or border[:, -1].any()
    near = make_hard_scene(2, 96, "near")
    front = near.image[near.visible_masks()[-1] > 0].astype(float).mean(0)
    assert 30 <= np.linalg.norm(front - near.background.reshape(-1, 3).mean(0)) <= 70
    with pytest.raises(ValueError):
        make_hard_scene(0, 64, "blob")
