"""Segment stage backend ``sam``: one mask per grounded box with segment-anything 1.0.

The image encoder runs on the stage batch at once (the expensive part, and the one that batches);
then, per image, all its boxes go to ``SamPredictor.predict_torch`` in one call with
``multimask_output=True`` and the output with the best predicted IoU is kept (for a matting
grounder's box, its soft alpha inside SAM's mask: :func:`matte_within`). Masks are cleaned
(small holes filled, small specks removed) and filtered by predicted IoU, stability score and
area; each dropped detection is recorded with its reason in ``item.quality["segment"]``.

Checkpoints: the official ``sam_vit_h_4b8939.pth`` / ``sam_vit_l_0b3195.pth`` /
``sam_vit_b_01ec64.pth`` (bare state dicts, read with ``weights_only=True``) or the tiny one from
``datagen.tiny_weights.sam`` (``model_type: tiny``).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datagen.item import MATTE, Item
from datagen.registry import register
from datagen.stages.base import Segmenter, SoftAlphaParams, batches, file_sha256

# model_type -> the official release file (the tiny one is made by datagen.tiny_weights.sam)
CHECKPOINT_FILES = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
    "tiny": "sam_tiny.pth",
}
# width of image_encoder.patch_embed.proj.weight -> model_type, to name the model a checkpoint is for
_WIDTHS = {1280: "vit_h", 1024: "vit_l", 768: "vit_b", 32: "tiny"}


@dataclass
class SamParams(SoftAlphaParams):
    """Settings of the ``sam`` segment backend (YAML ``stages.segment.params``)."""

    checkpoint: str = f"weights/{CHECKPOINT_FILES['vit_h']}"
    model_type: str = "vit_h"  # vit_h | vit_l | vit_b | tiny
    multimask_output: bool = True  # three candidates per box, the best by predicted IoU is kept
    # Quality filters: a detection failing one is dropped (reason in item.quality["segment"]).
    min_pred_iou: float = 0.7  # SAM's own estimate of the mask's IoU
    min_stability: float = 0.85  # IoU of the mask thresholded at logit +offset vs -offset
    stability_offset: float = 1.0  # as SamAutomaticMaskGenerator's default
    min_mask_area: float = 0.002  # mask smaller than this fraction of the image (after cleaning)
    # Cleaning, as fractions of the image area (0 disables): at 512x512, 0.0005 is 131 px.
    max_hole_area: float = 0.0005  # enclosed background regions smaller than this are filled
    min_speck_area: float = 0.0005  # foreground islands smaller than this are removed (never the largest)
    encoder_batch: int = 4  # images per image-encoder forward
    reject_empty: bool = True  # reject the item here when no detection keeps a mask
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | fp16 | bf16


def build_sam(model_type: str) -> Any:
    """An untrained ``Sam`` of ``model_type`` (segment-anything's builders, or the tiny one)."""
    if model_type == "tiny":
        from datagen.tiny_weights.sam import build_tiny_sam

        return build_tiny_sam()
    from segment_anything import sam_model_registry

    if model_type not in CHECKPOINT_FILES:
        raise ValueError(f"unknown SAM model_type {model_type!r}; choose one of {sorted(CHECKPOINT_FILES)}")
    return sam_model_registry[model_type]()  # no checkpoint: loaded below, weights_only


def load_sam(checkpoint: str | Path, model_type: str) -> Any:
    """Build ``model_type`` and load the state dict from ``checkpoint`` strictly (eval, CPU)."""
    import pickle

    import torch

    path = Path(checkpoint)
    expected = CHECKPOINT_FILES.get(model_type, "a SAM state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"SAM checkpoint {path}: not a PyTorch state dict ({err}); expected {expected}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        got = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"SAM checkpoint {path}: expected a bare state dict like {expected}, got {got}")
    # A checkpoint of another SAM size is the likely mistake: say so before building (vit_h is slow).
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is not None and _WIDTHS.get(patch.shape[0], model_type) != model_type:
        raise ValueError(
            f"SAM checkpoint {path} is for model_type={_WIDTHS[patch.shape[0]]}, not {model_type} "
            f"(expected {expected})"
        )
    sam = build_sam(model_type)
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as err:
        msg = str(err)
        missing = re.search(r"Missing key\(s\) in state_dict: ([^\n]{0,160})", msg)
        shapes = re.findall(r"size mismatch for [^\n]{0,160}", msg)[:1]
        detail = "; ".join(x for x in [missing and "missing " + missing.group(1), *shapes] if x) or msg[:300]
        raise ValueError(
            f"SAM checkpoint {path} does not fit model_type={model_type} (expected {expected}): {detail}"
        ) from None
    return sam.eval()


def clean_mask(mask: np.ndarray, max_hole: int, min_speck: int) -> tuple[np.ndarray, int, int]:
    """Fill enclosed holes smaller than ``max_hole`` px and remove islands smaller than
    ``min_speck`` px (the largest island always stays). Returns (mask, px filled, px removed).

    Foreground is 8-connected and background 4-connected, so a diagonal gap neither splits an
    object nor opens a hole. Background touching the border is never a hole.
    """
    import cv2

    m = (mask > 0).astype(np.uint8)
    filled = removed = 0
    if max_hole > 0:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(1 - m, connectivity=4)
        border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist())
        small = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] < max_hole and i not in border]
        if small:
            hole = np.isin(labels, small)
            filled = int(hole.sum())
            m[hole] = 1
    if min_speck > 0:
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        if n > 2:  # background + at least two islands
            areas = stats[1:, cv2.CC_STAT_AREA]
            largest = 1 + int(np.argmax(areas))
            small = [i for i in range(1, n) if areas[i - 1] < min_speck and i != largest]
            if small:
                speck = np.isin(labels, small)
                removed = int(speck.sum())
                m[speck] = 0
    return m, filled, removed


def _autocast(device: Any, precision: str) -> contextlib.AbstractContextManager:
    import torch

    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()  # CPU autocast is slower than fp32 on most CPUs
    bf16 = precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
    return torch.autocast("cuda", dtype=torch.bfloat16 if bf16 else torch.float16)


def matte_within(alpha: np.ndarray, mask: np.ndarray, grow: int = 2) -> np.ndarray:
    """A matting grounder's soft ``alpha`` (uint8) kept where SAM's binary ``mask`` (grown by
    ``grow`` px, so the soft edge outside it stays) says the object is; SAM's mask, opaque, where
    the matte has nothing there."""
    import cv2

    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
    inside = cv2.dilate(mask.astype(np.uint8), k) > 0
    out = np.where(inside, alpha, 0).astype(np.uint8)
    return out if out.any() else mask.astype(np.uint8) * np.uint8(255)


@register
class SamStage(Segmenter):
    """Masks for ``item.detections`` with SAM box prompts."""

    name = "sam"
    Params = SamParams
    version = "1"

    def __init__(self, params: SamParams | None = None, context: Any = None) -> None:
        super().__init__(params, context)
        import torch
        from segment_anything import SamPredictor

        p = self.params
        self.check(p)
        _autocast(torch.device("cpu"), p.precision)  # validate now, not on the first batch
        use_cuda = self.context.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.sam = load_sam(p.checkpoint, p.model_type).to(self.device)
        self.predictor = SamPredictor(self.sam)

    # -- manifest ----------------------------------------------------------------------------------
    @classmethod
    def check(cls, params: SamParams) -> None:
        """Fail before any data is read: unknown model_type, missing or non-PyTorch checkpoint."""
        if params.model_type not in CHECKPOINT_FILES:
            raise ValueError(
                f"segment/sam: unknown model_type {params.model_type!r}; choose one of {sorted(CHECKPOINT_FILES)}"
            )
        path, expected = Path(params.checkpoint), CHECKPOINT_FILES[params.model_type]
        if not path.is_file():
            raise FileNotFoundError(
                f"segment/sam: checkpoint {path} not found; expected {expected} for "
                f"model_type={params.model_type} (see docs/BACKENDS_sam_gdino.md)"
            )
        with open(path, "rb") as f:
            head = f.read(4)
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch zip or legacy pickle
            raise ValueError(
                f"segment/sam: {path} is not a PyTorch checkpoint (starts with {head!r}); expected {expected}"
            )

    @classmethod
    def identity(cls, params: SamParams) -> dict[str, Any]:
        cls.check(params)
        return {
            "backend": cls.name,
            "model": f"sam_{params.model_type}",
            "checkpoint": {"name": Path(params.checkpoint).name, "sha256": file_sha256(params.checkpoint)},
            "version": cls.version,
            "licence": "Apache-2.0",  # segment-anything code and checkpoints
        }

    # -- work --------------------------------------------------------------------------------------
    def process(self, items: list[Item]) -> None:
        todo = []
        for it in items:
            if it.detections:
                todo.append(it)
            elif self.params.reject_empty:
                it.reject(self.stage, "no detections to segment")
        step = max(1, self.params.encoder_batch)
        for chunk in batches(todo, step):
            for it, (features, input_size) in zip(
                chunk, self._encode([it.image for it in chunk]), strict=True
            ):
                self._segment(it, features, input_size)

    def _encode(self, images: list[np.ndarray]) -> list[tuple[Any, tuple[int, int]]]:
        """Image embeddings of a batch: what ``SamPredictor.set_image`` computes, one forward."""
        import torch

        tensors, sizes = [], []
        for image in images:
            if image is None or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected an RGB uint8 image, got {None if image is None else image.shape}")
            resized = self.predictor.transform.apply_image(image)  # longest side to img_size
            t = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
            sizes.append(tuple(t.shape[-2:]))
            tensors.append(self.sam.preprocess(t))  # normalise and pad to img_size x img_size
        with torch.inference_mode(), _autocast(self.device, self.params.precision):
            feats = self.sam.image_encoder(torch.cat(tensors)).float()
        return [(feats[i : i + 1], sizes[i]) for i in range(len(images))]

    def _segment(self, it: Item, features: Any, input_size: tuple[int, int]) -> None:
        """All boxes of one image in one ``predict_torch`` call, then selection, cleaning, filters."""
        import torch
        from segment_anything.utils.amg import calculate_stability_score

        p = self.params
        pred = self.predictor
        h, w = it.image.shape[:2]
        # The state set_torch_image would leave, with the features computed in the batch.
        pred.reset_image()
        pred.original_size, pred.input_size = (h, w), input_size
        pred.features, pred.is_image_set = features, True

        boxes = torch.tensor([d.box for d in it.detections], dtype=torch.float32, device=self.device)
        boxes = pred.transform.apply_boxes_torch(boxes, (h, w))
        with torch.inference_mode(), _autocast(self.device, p.precision):
            logits, iou, _ = pred.predict_torch(
                None, None, boxes=boxes, multimask_output=p.multimask_output, return_logits=True
            )
        logits, iou = logits.float(), iou.float()  # (N, C, H, W), (N, C)
        best = iou.argmax(dim=1)
        rows = torch.arange(len(best), device=best.device)
        chosen = logits[rows, best]  # (N, H, W)
        stability = torch.nan_to_num(
            calculate_stability_score(chosen, self.sam.mask_threshold, p.stability_offset)
        )
        binary = (chosen > self.sam.mask_threshold).cpu().numpy()
        iou_best, stability = iou[rows, best].cpu().tolist(), stability.cpu().tolist()
        pred.reset_image()  # drop the features: the next item brings its own

        area_px = float(h * w)
        max_hole, min_speck = round(p.max_hole_area * area_px), round(p.min_speck_area * area_px)
        kept, dropped = [], []
        for det, mask, q, s, k in zip(it.detections, binary, iou_best, stability, best.tolist(), strict=True):
            m, filled, removed = clean_mask(mask, max_hole, min_speck)
            area = float(m.sum()) / area_px
            scores = {"sam_pred_iou": round(q, 4), "sam_stability": round(s, 4)}
            reason = (
                f"pred_iou {q:.3f} < {p.min_pred_iou}" if q < p.min_pred_iou
                else f"stability {s:.3f} < {p.min_stability}" if s < p.min_stability
                else f"mask area {area:.4f} < {p.min_mask_area}" if area < p.min_mask_area or area == 0
                else None
            )  # fmt: skip
            if reason:
                dropped.append(
                    {"phrase": det.phrase, "box": [round(v, 1) for v in det.box], "reason": reason, **scores}
                )
                continue
            if det.extra.get("candidate") == MATTE and det.mask is not None:
                det.mask = matte_within(det.mask, m)  # SAM's extent, the matte's soft edges
            else:
                det.mask = m * np.uint8(255)
            det.extra.update(scores)
            det.extra.update(
                sam_mask_index=int(k), sam_area=round(area, 5), sam_holes_filled_px=filled,
                sam_specks_removed_px=removed,
            )  # fmt: skip
            kept.append(det)
        it.detections = kept
        it.quality["segment"] = {"kept": len(kept), "dropped": dropped}
        if not kept and p.reject_empty:
            reasons = "; ".join(f"{d['phrase']}: {d['reason']}" for d in dropped)
            it.reject(self.stage, f"no mask passed the quality filters ({reasons})")
