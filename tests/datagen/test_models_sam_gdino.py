"""The ``groundingdino`` (ground) and ``sam`` (segment) backends on tiny random checkpoints.

The tiny files are in the official formats and go through the same loaders as the real ones;
their outputs are noise, so the tests check shapes, types, ranges, bookkeeping and errors.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datagen.item import Detection, Item
from datagen.registry import get_backend
from datagen.stages.base import StageContext
from datagen.stages.models.groundingdino import (
    GroundingDinoParams,
    GroundingDinoStage,
    build_model,
    load_model,
    local_text_encoder,
    read_config,
)
from datagen.stages.models.sam import SamParams, SamStage, clean_mask, load_sam

torch.set_num_threads(1)
torch.set_flush_denormal(True)

CAPTIONS = ["a red ball and a cat on a green background", "a dog next to a blue box"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny SAM and GroundingDINO files, built once per session."""
    from datagen.tiny_weights import groundingdino, sam

    out = tmp_path_factory.mktemp("tiny_weights")
    gd = groundingdino.build(out)
    return {"sam": sam.build(out)["checkpoint"], "gd_checkpoint": gd["checkpoint"],
            "gd_config": gd["config"], "gd_text_encoder": gd["text_encoder"]}  # fmt: skip


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("a model loader tried to open a network connection")


def gd_params(tiny: dict[str, Path], **kw: object) -> GroundingDinoParams:
    base = dict(checkpoint=str(tiny["gd_checkpoint"]), config=str(tiny["gd_config"]),
                text_encoder=str(tiny["gd_text_encoder"]), image_short_side=192, image_max_side=256,
                box_threshold=0.0, text_threshold=0.0, min_score=0.0)  # fmt: skip
    base.update(kw)
    return GroundingDinoParams(**base)


def sam_params(tiny: dict[str, Path], **kw: object) -> SamParams:
    # random weights give low predicted IoU / stability: the filters are opened for the plumbing tests
    base = dict(checkpoint=str(tiny["sam"]), model_type="tiny", min_pred_iou=0.0, min_stability=0.0)
    base.update(kw)
    return SamParams(**base)


@pytest.fixture(scope="module")
def ground(tiny: dict[str, Path]) -> GroundingDinoStage:
    with pytest.MonkeyPatch.context() as mp:  # loading must work with the network cut off
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        return GroundingDinoStage(gd_params(tiny), StageContext())


@pytest.fixture(scope="module")
def segment(tiny: dict[str, Path]) -> SamStage:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        return SamStage(sam_params(tiny), StageContext())


def make_items() -> list[Item]:
    """Two images of different sizes (exercises padding in both models' batches)."""
    rng = np.random.default_rng(0)
    shapes = [(160, 224), (224, 192)]
    return [
        Item(
            key=f"k{i}",
            shard=0,
            index=i,
            uri=f"mem://{i}",
            source={},
            caption=c,
            image=rng.integers(0, 256, (*shape, 3), dtype=np.uint8),
        )  # fmt: skip
        for i, (c, shape) in enumerate(zip(CAPTIONS, shapes, strict=True))
    ]


# -- GroundingDINO -----------------------------------------------------------------------------


def test_registered() -> None:
    assert get_backend("ground", "groundingdino") is GroundingDinoStage
    assert get_backend("segment", "sam") is SamStage


def test_ground_batch(ground: GroundingDinoStage) -> None:
    items = make_items()
    ground.run_items(items)
    for it in items:
        assert it.ok, it.rejected
        assert it.phrases, "phrases are set from the caption"
        assert 1 <= len(it.detections) <= ground.params.max_detections
        h, w = it.image.shape[:2]
        scores = [d.score for d in it.detections]
        assert scores == sorted(scores, reverse=True)
        for d in it.detections:
            assert isinstance(d, Detection) and d.phrase in it.phrases
            assert all(isinstance(v, float) for v in d.box) and isinstance(d.score, float)
            x0, y0, x1, y1 = d.box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert 0.0 <= d.score <= 1.0 and d.mask is None
        q = it.quality["ground"]
        assert q["queries"] >= q["above_box_threshold"] >= q["after_nms"] >= len(it.detections)
    # the stage batch is one forward pass; per-image boxes come back in each item's own pixels
    assert {it.image.shape[:2] for it in items} == {(160, 224), (224, 192)}


def test_ground_thresholds_reject(tiny: dict[str, Path], ground: GroundingDinoStage) -> None:
    strict = copy.copy(ground)
    strict.params = gd_params(tiny, box_threshold=1.0)  # no probability exceeds 1
    items = make_items()
    strict.run_items(items)
    for it in items:
        assert it.rejected["stage"] == "ground" and "box_threshold 1.0" in it.rejected["reason"]
    item = make_items()[0]
    item.caption = "a photo of a background"  # no object phrase at all
    ground.run_items([item])
    assert item.rejected["stage"] == "ground" and "no noun phrase" in item.rejected["reason"]


def test_ground_ray_adapter(ground: GroundingDinoStage) -> None:
    """``__call__`` maps a Ray Data batch of pickled items."""
    items = make_items()
    out = ground({"record": np.array([it.to_bytes() for it in items], dtype=object)})
    back = [Item.from_bytes(b) for b in out["record"]]
    assert [it.key for it in back] == ["k0", "k1"] and all(it.detections for it in back)


def test_ground_identity(tiny: dict[str, Path]) -> None:
    ident = GroundingDinoStage.identity(gd_params(tiny))
    assert ident["backend"] == "groundingdino" and ident["version"]
    ck = ident["checkpoint"]
    assert ck["name"] == "groundingdino_tiny.pth"
    assert ck["sha256"] == hashlib.sha256(Path(tiny["gd_checkpoint"]).read_bytes()).hexdigest()
    assert ck["config"]["name"] == "GroundingDINO_tiny.py" and "vocab.txt" in ck["text_encoder"]["files"]


def test_ground_missing_files(tiny: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "weights" / "groundingdino_swint_ogc.pth"
    for call in (GroundingDinoStage.check, GroundingDinoStage):
        with pytest.raises(FileNotFoundError, match="groundingdino_swint_ogc.pth") as err:
            call(gd_params(tiny, checkpoint=str(missing)))
        assert str(missing) in str(err.value)
    with pytest.raises(FileNotFoundError, match="GroundingDINO_SwinT_OGC.py"):
        GroundingDinoStage.check(gd_params(tiny, config=str(tmp_path / "nope.py")))
    with pytest.raises(FileNotFoundError, match="bert-base-uncased") as err:
        GroundingDinoStage.check(gd_params(tiny, text_encoder=str(tmp_path / "bert")))
    assert str(tmp_path / "bert") in str(err.value)
    half = tmp_path / "half_bert"
    half.mkdir()
    (half / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        GroundingDinoStage.check(gd_params(tiny, text_encoder=str(half)))


def test_ground_wrong_files(tiny: dict[str, Path], tmp_path: Path) -> None:
    text = tmp_path / "groundingdino_swint_ogc.pth"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        GroundingDinoStage.check(gd_params(tiny, checkpoint=str(text)))
    cfg, enc = tiny["gd_config"], tiny["gd_text_encoder"]
    # SAM's state dict: not in the {"model": ...} format
    with pytest.raises(ValueError, match=r"expected \{'model': state_dict\}"):
        load_model(cfg, tiny["sam"], enc)
    # the right format around the wrong model's tensors
    other = tmp_path / "other.pth"
    torch.save({"model": torch.load(tiny["sam"], weights_only=True)}, other)
    with pytest.raises(ValueError, match="lacks .* tensors"):
        load_model(cfg, other, enc)
    # the right model at the wrong size (a tensor of another shape)
    state = torch.load(tiny["gd_checkpoint"], weights_only=True)
    state["model"]["transformer.tgt_embed.weight"] = torch.zeros(7, 256)
    torch.save(state, other)
    with pytest.raises(ValueError, match="does not fit config"):
        load_model(cfg, other, enc)
    bad_cfg = tmp_path / "cfg.py"
    bad_cfg.write_text("import os\nhidden_dim = 256\n")
    with pytest.raises(ValueError, match="name = literal"):
        load_model(bad_cfg, tiny["gd_checkpoint"], enc)
    bad_cfg.write_text("hidden_dim = 256\n")
    with pytest.raises(ValueError, match="GroundingDINO_SwinT_OGC.py"):
        load_model(bad_cfg, tiny["gd_checkpoint"], enc)


# -- SAM ---------------------------------------------------------------------------------------


def test_segment_batch(ground: GroundingDinoStage, segment: SamStage) -> None:
    items = make_items()
    ground.run_items(items)
    n_boxes = [len(it.detections) for it in items]
    binary_items = copy.deepcopy(items)
    binary = copy.copy(segment)
    binary.params = dataclasses.replace(segment.params, soft_alpha=False)
    binary.run_items(binary_items)
    segment.run_items(items)
    for it, n, bit in zip(items, n_boxes, binary_items, strict=True):
        assert it.ok, it.rejected
        q = it.quality["segment"]
        assert q["kept"] == len(it.detections) and q["kept"] + len(q["dropped"]) == n
        h, w = it.image.shape[:2]
        for d in it.detections:
            assert d.mask.shape == (h, w) and d.mask.dtype == np.uint8
            assert (d.mask > 127).any()
        # SAM's masks are binary (soft_alpha off); the shared matting changes them only in a band
        # of alpha_band px around their edges.
        assert len(bit.detections) == len(it.detections)
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * segment.params.alpha_band + 1,) * 2)
        for d, b in zip(it.detections, bit.detections, strict=True):
            assert set(np.unique(b.mask)) <= {0, 255}
            m = (b.mask > 0).astype(np.uint8)
            edge = (cv2.dilate(m, k) > 0) & ~(cv2.erode(m, k, borderType=cv2.BORDER_REPLICATE) > 0)
            assert np.array_equal(d.mask[~edge], b.mask[~edge])
            for key in ("sam_pred_iou", "sam_stability", "sam_mask_index", "sam_area"):
                assert key in d.extra
            assert 0.0 <= d.extra["sam_stability"] <= 1.0 and d.extra["sam_mask_index"] in (0, 1, 2)


def test_segment_quality_filters(tiny: dict[str, Path], segment: SamStage) -> None:
    strict = copy.copy(segment)
    strict.params = sam_params(tiny, min_pred_iou=1.01)
    items = make_items()
    for it in items:
        it.detections = [Detection("cat", (10.0, 20.0, 100.0, 120.0), 0.9)]
    strict.run_items(items)
    for it in items:
        assert it.rejected["stage"] == "segment" and "pred_iou" in it.rejected["reason"]
    item = make_items()[0]
    segment.run_items([item])  # nothing grounded: nothing to segment
    assert item.rejected == {"stage": "segment", "reason": "no detections to segment"}


def test_clean_mask() -> None:
    m = np.zeros((40, 40), np.uint8)
    m[5:30, 5:30] = 1
    m[10:12, 10:12] = 0  # 4-px hole
    m[20:25, 20:25] = 0  # 25-px hole
    m[35, 35] = 1  # 1-px speck
    m[0:3, 37:40] = 1  # 9-px island
    out, filled, removed = clean_mask(m, max_hole=10, min_speck=5)
    assert out[10:12, 10:12].all() and not out[20:25, 20:25].any()
    assert out[35, 35] == 0 and out[0:3, 37:40].all()
    assert (filled, removed) == (4, 1)
    edge = np.zeros((20, 20), np.uint8)
    edge[:, 5:] = 1
    edge[0:2, 8:10] = 0  # background notch at the border: not a hole
    assert clean_mask(edge, max_hole=100, min_speck=0)[1] == 0


def test_segment_identity_and_missing(tiny: dict[str, Path], tmp_path: Path) -> None:
    ident = SamStage.identity(sam_params(tiny))
    assert ident["model"] == "sam_tiny" and ident["checkpoint"]["name"] == "sam_tiny.pth"
    missing = tmp_path / "sam_vit_h_4b8939.pth"
    for call in (SamStage.check, SamStage):
        with pytest.raises(FileNotFoundError, match="sam_vit_h_4b8939.pth") as err:
            call(SamParams(checkpoint=str(missing)))
        assert str(missing) in str(err.value) and "model_type=vit_h" in str(err.value)
    with pytest.raises(FileNotFoundError, match="sam_vit_b_01ec64.pth"):
        SamStage.check(SamParams(checkpoint=str(missing), model_type="vit_b"))
    with pytest.raises(ValueError, match="unknown model_type"):
        SamStage.check(SamParams(checkpoint=str(tiny["sam"]), model_type="vit_x"))


def test_segment_wrong_files(tiny: dict[str, Path], tmp_path: Path) -> None:
    text = tmp_path / "sam_vit_h_4b8939.pth"
    text.write_text("<html>not found</html>")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        SamStage.check(SamParams(checkpoint=str(text)))
    with pytest.raises(ValueError, match="expected a bare state dict"):
        load_sam(tiny["gd_checkpoint"], "tiny")  # GroundingDINO's {"model": ...}
    with pytest.raises(ValueError, match="is for model_type=tiny, not vit_b"):
        load_sam(tiny["sam"], "vit_b")  # caught before building the big model
    state = torch.load(tiny["sam"], weights_only=True)
    del state["mask_decoder.iou_token.weight"]
    other = tmp_path / "sam_partial.pth"
    torch.save(state, other)
    with pytest.raises(ValueError, match="does not fit model_type=tiny.*iou_token"):
        load_sam(other, "tiny")


def test_tiny_weights_deterministic(tiny: dict[str, Path], tmp_path: Path) -> None:
    from datagen.tiny_weights import groundingdino, sam

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert digest(sam.build(tmp_path)["checkpoint"]) == digest(tiny["sam"])
    again = groundingdino.build(tmp_path)
    assert digest(again["checkpoint"]) == digest(tiny["gd_checkpoint"])
    for f in tiny["gd_text_encoder"].iterdir():
        assert digest(again["text_encoder"] / f.name) == digest(f)
    assert tiny["gd_checkpoint"].stat().st_size < 16e6 and tiny["sam"].stat().st_size < 2e6


def test_official_config_builds_upstream_model(tiny: dict[str, Path]) -> None:
    """The official Swin-T OGC config, read without executing it, builds through our builder the
    same tensors (names and shapes) as upstream's ``build_model``: a real checkpoint fits both."""
    import groundingdino
    from groundingdino.models import build_model as upstream_build
    from groundingdino.util.slconfig import SLConfig

    official = Path(groundingdino.__file__).parent / "config" / "GroundingDINO_SwinT_OGC.py"
    ours = build_model(read_config(official), tiny["gd_text_encoder"])  # tiny BERT: only feat_map differs
    args = SLConfig.fromfile(str(official))
    args.text_encoder_type = local_text_encoder(tiny["gd_text_encoder"])
    theirs = upstream_build(args)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert any(k.startswith("backbone.0.layers.2.blocks.5.") for k in shapes)  # Swin-T: 6 blocks in stage 3
