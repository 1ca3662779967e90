"""The classical CPU backends on real output: masks against true layers, holes against the true
background, phrases and captions, rejections, and the scoring harness."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from datagen.format import psnr
from datagen.item import Detection, Item
from datagen.registry import get_backend
from datagen.scenes import make_scene
from datagen.score import build_stages, match, run_stages, score_scenes
from datagen.stages.base import StageContext
from datagen.stages.classical import _depth_order

cv2.setNumThreads(1)

# Seeds 0-11 and 21 at 256 px cover every background kind (flat, gradient, stripes, checker, noise),
# one to three objects, and occlusions.
SEEDS = [*range(12), 21]


def _item(scene, caption: str | None = None) -> Item:
    return Item(key=f"s{scene.seed}", shard=0, index=0, uri=f"scene://{scene.seed}", source={},
                image=scene.image.copy(), caption=scene.caption if caption is None else caption)


@pytest.fixture(scope="module")
def stages():
    return build_stages(256)


@pytest.fixture(scope="module")
def decomposed(stages):
    scenes = [make_scene(s, 256) for s in SEEDS]
    items = [_item(s) for s in scenes]
    run_stages(stages, items)
    return scenes, items


def test_registered_with_documented_defaults() -> None:
    for stage, name in (("caption", "sidecar"), ("ground", "contrast"), ("segment", "grabcut"),
                        ("inpaint", "opencv")):
        cls = get_backend(stage, name)
        assert cls.stage == stage and cls.name == name
        backend = cls(None, StageContext(image_size=64))
        assert isinstance(backend.params, cls.Params)


def test_masks_match_the_visible_true_layers(decomposed) -> None:
    scenes, items = decomposed
    kinds = {s.background_kind for s in scenes}
    assert kinds == {"flat", "gradient", "stripes", "checker", "noise"}
    for scene, item in zip(scenes, items, strict=True):
        assert item.ok, item.rejected
        true = [m > 0 for m in scene.visible_masks()]
        assert len(item.detections) == scene.num_layers
        ious, which = match([d.mask > 127 for d in item.detections], true)
        assert min(ious) >= 0.95, (scene.seed, ious)
        for det in item.detections:
            assert det.mask.dtype == np.uint8 and set(np.unique(det.mask)) <= {0, 255}
        # Each matched detection carries the true layer's phrase and a per-layer caption.
        for k, j in enumerate(which):
            det = item.detections[j]
            assert det.phrase == scene.phrases[k]
            assert det.caption == scene.layer_captions[k]
            x0, y0, x1, y1 = det.box
            ys, xs = np.nonzero(true[k])
            assert x0 <= xs.min() and y0 <= ys.min() and x1 >= xs.max() + 1 and y1 >= ys.max() + 1
        assert item.phrases == scene.phrases[::-1]  # the caption names the front-most first


def test_background_is_rebuilt_in_the_holes(decomposed) -> None:
    scenes, items = decomposed
    for scene, item in zip(scenes, items, strict=True):
        hole = scene.hole()
        value = psnr(item.background, scene.background, hole)
        floor = 35.0 if scene.background_kind == "noise" else 45.0  # noise: its own floor ~38.6 dB
        assert value >= floor, (scene.seed, scene.background_kind, value, item.quality)
        # Outside the grown holes the background is the source image, untouched.
        grown = cv2.dilate(hole.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        assert np.array_equal(item.background[~grown], scene.image[~grown])
        assert item.quality["hole_psnr_estimate"] > 30
        assert set(item.quality["inpaint_methods"]) <= {"telea", "ns", "poly", "pattern"}


def test_caption_stage(decomposed) -> None:
    scenes, items = decomposed
    assert items[0].background_caption == scenes[0].background_caption
    assert items[0].quality["caption_source"] == "sidecar"
    stage = get_backend("caption", "sidecar")()
    bare = Item(key="k", shard=0, index=0, uri="u", source={}, image=np.zeros((8, 8, 3), np.uint8))
    titled = Item(key="k", shard=0, index=0, uri="u", source={}, image=np.zeros((8, 8, 3), np.uint8),
                  source_meta={"title": "Two dogs on a beach"})
    stage.run_items([bare, titled])
    assert bare.caption == "an image" and bare.quality["caption_source"] == "fallback"
    assert bare.background_caption == "the background"
    assert titled.caption == "Two dogs on a beach" and titled.phrases == ["dog"]
    assert titled.background_caption == "a beach"
    assert titled.quality["caption_source"] == "meta:title"


def test_without_caption_colours_objects_are_still_found(stages) -> None:
    for seed in (2, 4, 9):
        scene = make_scene(seed, 256)
        item = _item(scene, caption="")
        run_stages(stages, [item])
        ious, _ = match([d.mask > 127 for d in item.detections], [m > 0 for m in scene.visible_masks()])
        assert len(item.detections) == scene.num_layers and min(ious) >= 0.95


def test_blank_image_is_rejected_by_ground(stages) -> None:
    item = Item(key="k", shard=0, index=0, uri="u", source={},
                image=np.full((128, 128, 3), 90, np.uint8), caption="a red ball")
    run_stages(stages, [item])
    assert not item.ok and item.rejected["stage"] == "ground"
    assert item.rejected["reason"].startswith("no foreground found")


def test_photos_give_one_sensible_object_or_a_rejection(stages) -> None:
    decode = get_backend("decode", "pil")(None, StageContext(image_size=128))
    for filename, caption, phrase in (("coffee.png", "a cup of coffee on a saucer", "cup"),
                                      ("chelsea.png", "a cat lying on a brown floor", "cat"),
                                      ("horse.png", "a black horse on a white background", "black horse")):
        item = Item(key="k", shard=0, index=0, uri="u",
                    source={"kind": "skimage", "file": filename, "caption": caption})
        decode.run_items([item])
        run_stages(stages, [item])
        if item.ok:
            assert len(item.detections) == 1, filename
            area = float((item.detections[0].mask > 0).mean())
            assert 0.01 <= area <= 0.7, (filename, area)
            assert item.detections[0].phrase == phrase
        else:
            assert item.rejected["stage"] in ("ground", "segment")
            assert filename != "horse.png"  # a silhouette on a plain background is easy


def test_inpaint_alone_from_true_masks() -> None:
    stage = get_backend("inpaint", "opencv")()
    for seed, kind in ((0, "stripes"), (1, "checker"), (2, "gradient")):
        scene = make_scene(seed, 256, backgrounds=[kind], n_objects=2)
        item = _item(scene)
        item.detections = [Detection(phrase=p, box=(0, 0, 1, 1), score=1.0, mask=m)
                           for p, m in zip(scene.phrases, scene.masks, strict=True)]
        stage.run_items([item])
        assert psnr(item.background, scene.background, scene.hole()) >= 50, kind


def test_grabcut_refines_a_box_without_candidate() -> None:
    scene = make_scene(5, 128, n_objects=1, backgrounds=["flat"])
    true = scene.masks[0] > 0
    ys, xs = np.nonzero(true)
    det = Detection(phrase="x", box=(xs.min() - 6.0, ys.min() - 6.0, xs.max() + 7.0, ys.max() + 7.0), score=1.0)
    item = _item(scene)
    item.detections = [det]
    get_backend("segment", "grabcut")(None, StageContext(image_size=128)).run_items([item])
    got = item.detections[0].mask > 0
    assert (got & true).sum() / (got | true).sum() > 0.9


def test_depth_hint_orders_overlapping_objects() -> None:
    right = total = 0
    for seed in range(40):
        scene = make_scene(seed, 256)
        ranks = _depth_order([m > 0 for m in scene.visible_masks()])
        for a in range(scene.num_layers):
            for b in range(a + 1, scene.num_layers):
                if ((scene.masks[a] > 0) & (scene.masks[b] > 0)).any():
                    total += 1
                    right += ranks[a] < ranks[b]
    assert total >= 8 and right / total >= 0.85


def test_ray_adapter_round_trip() -> None:
    stage = get_backend("ground", "contrast")()
    scene = make_scene(3, 128)
    batch = {"record": np.array([_item(scene).to_bytes()], dtype=object)}
    out = Item.from_bytes(stage(batch)["record"][0])
    assert len(out.detections) == scene.num_layers


def test_score_scenes_meets_the_bar(stages) -> None:
    result = score_scenes(stages, n=8, size=256, seed0=100)
    assert result["n_scenes"] == 8 and not result["rejected"]
    assert result["mask_iou"] >= 0.95 and result["recovered_at_0.5"] >= 0.95
    assert result["layer_count_accuracy"] >= 0.9 and result["hole_psnr"] >= 35


def _jpeg(image: np.ndarray, quality: int, size: int | None = None) -> np.ndarray:
    """Encode with PIL JPEG (default 4:2:0 chroma subsampling) and decode; ``size``: then resize
    as the pil decode stage does (Lanczos), e.g. a small web JPEG brought up to 256 px."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if size is not None:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img).copy()


def _ground_and_segment(stages, item: Item) -> None:
    run_stages({k: v for k, v in stages.items() if k in ("caption", "ground", "segment")}, [item])


def test_jpeg_scenes_give_the_true_objects(stages) -> None:
    """JPEG ringing and chroma bleed around each shape is its edge, not another object: the true
    number of objects, masks that cover the visible true layers plus a thin edge band."""
    ious_all = []
    for seed in SEEDS:
        scene = make_scene(seed, 256)
        true = [m > 0 for m in scene.visible_masks()]
        union = np.any(np.stack(true), 0)
        near = cv2.dilate(union.astype(np.uint8), np.ones((15, 15), np.uint8)) > 0  # JPEG blocks: 8 px
        for quality in (75, 85, 95):
            for caption in (scene.caption, "") if quality == 85 else (scene.caption,):
                item = _item(scene, caption)
                item.image = _jpeg(scene.image, quality)
                _ground_and_segment(stages, item)
                where = (seed, quality, bool(caption))
                assert item.ok, (where, item.rejected)
                assert len(item.detections) == scene.num_layers, (where, [d.phrase for d in item.detections])
                ious, which = match([d.mask > 127 for d in item.detections], true)
                assert min(ious) >= 0.75, (where, ious)
                ious_all += ious
                for k, j in enumerate(which):
                    got = item.detections[j].mask > 0
                    assert (got & true[k]).sum() >= 0.98 * true[k].sum(), where  # the whole layer
                    assert not (got & ~near).any(), where  # ... and its edge, nothing far off
                    if caption:
                        assert item.detections[j].phrase == scene.phrases[k]
    assert np.mean(ious_all) >= 0.88


def test_small_upscaled_jpeg_gives_one_object_per_shape(stages) -> None:
    """A small web JPEG brought up to 256 px (the img2dataset case): its wide blurred edges,
    colours between the shape's and the background's, join the shape."""
    # The unsafe-tar sample: a red square on green, 96 px, JPEG quality 95.
    img = np.zeros((96, 96, 3), np.uint8)
    img[:] = (40, 160, 60)
    img[12:48, 12:48] = (220, 30, 30)
    item = Item(key="k", shard=0, index=0, uri="u", source={}, image=_jpeg(img, 95, 256),
                caption="a red square on a green background")
    run_stages(stages, [item])
    assert item.ok and [d.phrase for d in item.detections] == ["red square"]
    got = item.detections[0].mask > 0
    square = np.zeros((256, 256), bool)
    square[32:128, 32:128] = True
    assert (got & square).sum() == square.sum()  # the square with its blurry edge band
    assert not (got & ~(cv2.dilate(square.astype(np.uint8), np.ones((13, 13), np.uint8)) > 0)).any()
    # The background is clean where the square was: green, no red ghost outline.
    grown = cv2.dilate(got.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert np.abs(item.background[grown].astype(int) - (40, 160, 60)).max() <= 24
    # Generated scenes at 96 px, upscaled, against the 256-px truth (rendered at 256, so the
    # outlines differ by up to a pixel or two before any blur).
    for seed in (1, 4, 24, 25, 29, 49, 96):
        scene = make_scene(seed, 256)
        for quality in (75, 90):
            item = _item(scene)
            item.image = _jpeg(make_scene(seed, 96).image, quality, 256)
            _ground_and_segment(stages, item)
            assert item.ok and len(item.detections) == scene.num_layers, (
                seed, quality, [d.phrase for d in item.detections])
            ious, which = match([d.mask > 127 for d in item.detections], [m > 0 for m in scene.visible_masks()])
            assert min(ious) >= 0.55, (seed, quality, ious)
            assert [item.detections[j].phrase for j in which] == scene.phrases


# -- generalisation: cases the project's own generator did not draw (issue 24) ---------------------
def _flat(size: int, bg: tuple[int, int, int]) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = bg
    return img


def _ground_only(stages, image: np.ndarray, caption: str) -> Item:
    item = Item(key="k", shard=0, index=0, uri="u", source={}, image=image, caption=caption)
    _ground_and_segment(stages, item)
    return item


def test_an_object_cut_by_the_border_is_found(stages) -> None:
    """A shape crossing the image border (its colour in the border strip) is an object, not
    part of the background model; the object inside the frame is kept as it was."""
    img = _flat(256, (0, 128, 0))
    cut = np.zeros((256, 256), bool)
    cv2.circle(cut.view(np.uint8), (250, 60), 40, 1, -1)
    img[cut] = (255, 0, 0)
    inside = np.zeros((256, 256), bool)
    inside[150:210, 60:120] = True
    img[inside] = (0, 0, 255)
    item = _ground_only(stages, img, "a red circle and a blue square on a green background")
    assert item.ok, item.rejected
    got = {d.phrase: d.mask > 0 for d in item.detections}
    assert set(got) == {"red circle", "blue square"}
    for phrase, true in (("red circle", cut), ("blue square", inside)):
        assert (got[phrase] & true).sum() / (got[phrase] | true).sum() >= 0.98, phrase


def test_two_near_colour_objects_are_split_at_their_edge(stages) -> None:
    """Two touching objects 45 apart in RGB (one colour cluster) are two layers, split along
    the sharp edge between them, named from one colour word each."""
    img = _flat(256, (240, 240, 240))
    a = np.zeros((256, 256), bool)
    a[60:160, 40:140] = True
    b = np.zeros((256, 256), bool)
    cv2.circle(b.view(np.uint8), (170, 120), 45, 1, -1)
    b &= ~a
    img[a] = (180, 40, 40)
    img[b] = (222, 33, 45)
    item = _ground_only(stages, img, "a red square and a red circle on a white background")
    assert item.ok, item.rejected
    assert len(item.detections) == 2, [d.phrase for d in item.detections]
    ious, _ = match([d.mask > 0 for d in item.detections], [a, b])
    assert min(ious) >= 0.97, ious
    assert sorted(d.phrase for d in item.detections) == ["red circle", "red square"]
    # Shading is not an edge: one object whose colour varies smoothly stays one object.
    img = _flat(256, (240, 240, 240))
    ramp = np.linspace(0, 1, 100)[None, :, None]
    img[60:160, 40:140] = np.rint((1 - ramp) * (180, 40, 40) + ramp * (230, 60, 50)).astype(np.uint8)
    item = _ground_only(stages, img, "a red square on a white background")
    assert item.ok and len(item.detections) == 1


def test_colour_words_name_unseen_shades(stages) -> None:
    """Colour words are ranges of shades: CSS navy, forest green and gold are "blue", "green" and
    "yellow", whichever order the caption lists them in."""
    from datagen.phrases import colour_name

    assert colour_name((0, 0, 128)) == "blue" and colour_name((34, 139, 34)) == "green"
    assert colour_name((255, 215, 0)) == "yellow" and colour_name((255, 192, 203)) == "pink"
    img = _flat(256, (245, 245, 245))
    shapes = {"blue": (0, 0, 128), "green": (34, 139, 34), "yellow": (255, 215, 0)}
    truth = {}
    for k, (word, rgb) in enumerate(shapes.items()):
        m = np.zeros((256, 256), bool)
        cv2.circle(m.view(np.uint8), (50 + 75 * k, 128), 28, 1, -1)
        img[m] = rgb
        truth[word] = m
    item = _ground_only(stages, img, "a yellow circle, a blue circle and a green circle on a white background")
    assert item.ok and len(item.detections) == 3
    for det in item.detections:
        word = det.phrase.split()[0]
        true = truth[word]
        assert ((det.mask > 0) & true).sum() / ((det.mask > 0) | true).sum() >= 0.98, det.phrase


def test_anti_aliased_outline_follows_half_coverage(stages) -> None:
    """An anti-aliased or blurred outline: the mask holds the pixels the object covers at least
    half of (the binary truth), and the hole covers the faint rest (no halo in the background)."""
    from datagen.scenes import make_hard_scene

    for seed in (0, 3, 7):
        scene = make_hard_scene(seed, 256, "soft")
        item = _item(scene)
        run_stages(stages, [item])
        assert item.ok and len(item.detections) == scene.num_layers
        # soft alpha at the edge: the object's half-coverage outline is where alpha >= 128
        ious, _ = match([d.mask >= 128 for d in item.detections], [m > 0 for m in scene.visible_masks()])
        assert min(ious) >= 0.9, (seed, ious)
        assert psnr(item.background, scene.background, scene.hole()) >= 35


def test_independent_generator_flat_scenes_meet_the_bar(stages) -> None:
    """Scenes of another generator (PIL polygons, CSS colours, border-cut objects, near colours,
    anti-aliasing): the issue-24 bars for flat scenes, on a small sample."""
    from functools import partial

    from datagen.score import OTHER_BARS, meets_bar, other_scene

    result = score_scenes(stages, n=16, size=256, seed0=300, make=partial(other_scene, kind="flat"))
    assert meets_bar(result, OTHER_BARS["flat"]), result


def _photo_scene(shapes: list[tuple[str, tuple[int, int, int], tuple[int, int], int]],
                 texture: str = "motorcycle_left.png", sigma: float = 1.5) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """A bundled photo's crop with flat shapes over it, blurred edges: (image, background, true
    masks at alpha >= 0.5), shapes (kind, RGB, centre, radius) back to front."""
    from pathlib import Path

    import skimage.data

    photo = cv2.cvtColor(cv2.imread(str(Path(skimage.data.data_dir) / texture)), cv2.COLOR_BGR2RGB)
    if photo.ndim == 2 or photo.shape[2] == 1:
        photo = np.repeat(photo.reshape(*photo.shape[:2], 1), 3, 2)
    background = cv2.resize(photo[:300, :300], (256, 256), interpolation=cv2.INTER_AREA)
    image = background.astype(np.float64)
    masks = []
    for kind, rgb, (cx, cy), r in shapes:
        a = np.zeros((256, 256), np.float32)
        if kind == "circle":
            cv2.circle(a, (cx, cy), r, 1.0, -1)
        else:
            cv2.rectangle(a, (cx - r, cy - r), (cx + r, cy + r), 1.0, -1)
        a = cv2.GaussianBlur(a, (0, 0), sigma)
        image = image * (1 - a[..., None]) + np.array(rgb, np.float64) * a[..., None]
        masks.append(a >= 0.5)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), background, masks


@pytest.mark.parametrize(("texture", "colours"), [
    ("hubble_deep_field.jpg", ("orange", "purple")), ("hubble_deep_field.jpg", ("green", "yellow")),
    ("hubble_deep_field.jpg", ("pink", "cyan")), ("astronaut.png", ("red", "blue")),
    ("motorcycle_left.png", ("green", "yellow"))])
def test_caption_colour_regions_find_flat_objects_on_a_photo_background(stages, texture, colours) -> None:
    """On a colourful photo background the border colour model sees no plain background; the
    caption's colour words give regions, and the compact ones with a colour step around them are
    the objects: both found, named by their colour, outlines at half coverage, holes filled."""
    from datagen.phrases import PALETTE, join_caption

    image, background, truth = _photo_scene([("circle", PALETTE[colours[0]], (80, 90), 34),
                                              ("square", PALETTE[colours[1]], (170, 170), 30)], texture)
    circle, square = f"{colours[0]} circle", f"{colours[1]} square"
    caption = join_caption([square, circle], "photo background")
    item = _ground_only(stages, image.copy(), caption)
    assert item.ok and item.quality["ground_mode"] == "colour-regions"
    assert sorted(d.phrase for d in item.detections) == sorted([circle, square])
    by_name = {d.phrase: d.mask >= 128 for d in item.detections}  # soft alpha: half coverage
    for phrase, true in ((circle, truth[0]), (square, truth[1])):
        iou = (by_name[phrase] & true).sum() / (by_name[phrase] | true).sum()
        assert iou >= 0.9, (phrase, iou)
    item = Item(key="k", shard=0, index=0, uri="u", source={}, image=image.copy(), caption=caption)
    run_stages(stages, [item])
    hole = np.zeros((256, 256), bool)
    for m in truth:
        hole |= cv2.dilate(m.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    # the fill is a smooth guess at the photo, not the photo itself; the objects' colours are gone
    assert psnr(item.background, background, hole) > psnr(image, background, hole) + 3
    # without the caption's colour regions the contrast path misses them
    off = build_stages(256)
    off["ground"].params = dataclasses.replace(off["ground"].params, caption_regions=False)
    missed = _ground_only(off, image.copy(), caption)
    assert not missed.ok or sorted(d.phrase for d in missed.detections) != sorted([circle, square])


def test_colour_regions_need_a_colour_word_and_a_step(stages) -> None:
    """A phrase without a colour word gives no regions (photos go to their own path), and a
    region of a colour word that fades into the texture around it is no object."""
    from datagen.stages.classical import _caption_regions

    image, _bg, _truth = _photo_scene([("circle", (245, 140, 30), (128, 128), 40)])
    p = stages["ground"].params
    assert _caption_regions(image, ["orange circle", "cat"], p) == []
    assert [ph for _m, ph in _caption_regions(image, ["orange circle"], p)] == ["orange circle"]
    # the same disc with a 40 px ramp instead of an edge: no step around it
    ramp, _bg, _truth = _photo_scene([("circle", (245, 140, 30), (128, 128), 40)], sigma=14.0)
    assert _caption_regions(ramp, ["orange circle"], p) == []


def test_unnamed_extra_objects_dropped_only_when_the_caption_counts() -> None:
    from datagen.stages.classical import drop_unnamed

    def item(caption: str, phrases: list[str]) -> Item:
        it = Item(key="k", shard=0, index=0, uri="u", source={}, caption=caption)
        it.phrases = phrases
        mask = np.full((8, 8), 255, np.uint8)
        it.detections = [Detection(phrase=ph, box=(0, 0, 8, 8), score=1.0, mask=mask, caption=ph)
                         for ph in [*phrases, "red object"]]
        return it

    counted = item("a blue star on a grass background", ["blue star"])
    drop_unnamed(counted)
    assert [d.phrase for d in counted.detections] == ["blue star"]
    plural = item("two red stars on a grass background", ["red star"])
    drop_unnamed(plural)
    assert [d.phrase for d in plural.detections] == ["red star", "red object"]


def test_independent_generator_textured_scenes_sample(stages) -> None:
    """Another generator's photo-textured scenes (soft edges, shaded objects): most objects found
    and counted right on a small held-out sample (before the caption colour regions: IoU ~0.5)."""
    from functools import partial

    from datagen.score import other_scene

    result = score_scenes(stages, n=16, size=256, seed0=300, make=partial(other_scene, kind="textured"))
    assert result["mask_iou"] >= 0.6 and result["recovered_at_0.5"] >= 0.6, result
    assert result["layer_count_accuracy"] >= 0.6, result
