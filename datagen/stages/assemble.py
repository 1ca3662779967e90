"""assemble `layers`: detections with masks + background -> an ordered, checked LayerSample.

Drops masks outside the area bounds, masks that hug the image border (likely background) and
near-duplicates; orders layers back to front; keeps at most max_layers; cuts each layer's
pixels from the image (its decontaminated colours at soft edges, ``Detection.pixels``); rejects a
sample with no foreground or a poor recomposition. Masks are 8-bit alphas: soft values pass
through, and a layer is hidden only where a layer in front of it is opaque.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from datagen.format import MIN_RECON_PSNR, SAMPLE_SCHEMA, LayerSample, check_sample, psnr
from datagen.item import Detection, Item
from datagen.registry import register
from datagen.sources import provenance
from datagen.stages.base import Stage


@dataclass
class AssembleParams:
    min_area: float = 0.002  # fraction of the image; smaller masks are specks
    max_area: float = 0.85  # larger masks are the background itself
    duplicate_iou: float = 0.8  # near-duplicate masks: keep the higher score
    max_border: float = 0.5  # a mask covering more of the image border is likely background
    min_visible: float = 0.25  # a layer mostly hidden by layers in front of it is dropped
    bg_margin: int = 2  # px around kept layers where the filled background is kept
    min_recon_psnr: float = MIN_RECON_PSNR


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def border_fraction(mask: np.ndarray) -> float:
    """Fraction of the image's border pixels inside the mask."""
    m = mask > 0
    border = np.concatenate([m[0], m[-1], m[1:-1, 0], m[1:-1, -1]])
    return float(border.mean())


def order_back_to_front(image: np.ndarray, masks: list[np.ndarray], areas: list[float]) -> list[int]:
    """Depth order of overlapping masks: at an overlap the image shows the front object, so the
    layer whose own (non-overlapping) colour matches the overlap is in front. Layers that do not
    overlap keep larger-behind order (big things are usually further back)."""
    n = len(masks)
    in_front: dict[tuple[int, int], bool] = {}
    img = image.astype(np.float32)
    for i in range(n):
        for j in range(i + 1, n):
            a, b = masks[i] > 0, masks[j] > 0
            both = a & b
            if both.sum() < 4:
                continue
            only_a, only_b = a & ~b, b & ~a
            if only_a.sum() < 4 or only_b.sum() < 4:
                # one contains the other: the contained one must be in front to be visible
                in_front[(i, j)] = bool(only_b.sum() >= 4)
                continue
            overlap = img[both].mean(0)
            da = np.linalg.norm(img[only_a].mean(0) - overlap)
            db = np.linalg.norm(img[only_b].mean(0) - overlap)
            in_front[(i, j)] = bool(da < db)  # i in front of j
    # Insertion by pairwise constraints, falling back to area (larger further back).
    order = sorted(range(n), key=lambda k: -areas[k])
    for _ in range(n * n):
        changed = False
        for pos in range(n - 1):
            back, front = order[pos], order[pos + 1]
            key = (min(back, front), max(back, front))
            if key in in_front:
                i_front = in_front[key]
                back_should_be_front = (i_front and back == key[0]) or (not i_front and back == key[1])
                if back_should_be_front:
                    order[pos], order[pos + 1] = front, back
                    changed = True
        if not changed:
            break
    return order


@register
class LayerAssembler(Stage):
    """Turns the stage outputs into the stored sample (``item.members``, encoded)."""

    stage = "assemble"
    name = "layers"
    Params = AssembleParams

    def process(self, items: list[Item]) -> None:
        for item in items:
            self._assemble(item)

    def _assemble(self, item: Item) -> None:
        p: AssembleParams = self.params
        image, background = item.image, item.background
        if image is None or background is None:
            item.reject(self.stage, "no image or background from earlier stages")
            return
        h, w = image.shape[:2]
        # True layers (synthetic-gt): whole (amodal) masks, their own colours and order.
        amodal = bool(item.detections) and all(d.extra.get("extent") == "amodal" and d.pixels is not None
                                                for d in item.detections)
        kept: list[Detection] = []
        dropped: list[str] = []
        for det in sorted(item.detections, key=lambda d: -d.score):
            if det.mask is None:
                dropped.append(f"{det.phrase}: no mask")
                continue
            mask = np.asarray(det.mask, np.uint8)  # an 8-bit alpha (soft edges allowed)
            area = float((mask > 0).mean())
            if not p.min_area <= area <= p.max_area:
                dropped.append(f"{det.phrase}: area {area:.4f} outside [{p.min_area}, {p.max_area}]")
            elif not amodal and border_fraction(mask) > p.max_border:
                dropped.append(f"{det.phrase}: hugs the image border")
            elif any(mask_iou(mask, k.mask) > p.duplicate_iou for k in kept):
                dropped.append(f"{det.phrase}: near-duplicate")
            else:
                det.mask = mask
                kept.append(det)
        kept = kept[: self.context.max_layers]
        if not kept:
            why = "; ".join(dropped[:3]) if dropped else "nothing detected"
            item.reject(self.stage, f"no foreground ({why})")
            return
        if amodal:  # true layers: order and full (amodal) masks are known
            layers = sorted(kept, key=lambda d: d.extra.get("depth", 0))
            fgs = [np.where(d.mask[..., None] > 0, d.pixels, 0).astype(np.uint8) for d in layers]
            masks = [d.mask for d in layers]
            bg = background
        else:
            if all("depth" in d.extra for d in kept):  # the grounder saw the occlusions: trust it
                order = sorted(range(len(kept)), key=lambda k: kept[k].extra["depth"])
            else:
                order = order_back_to_front(image, [d.mask for d in kept],
                                            [float((d.mask > 0).mean()) for d in kept])
            layers, masks = [], []
            for pos, idx in enumerate(order):
                alpha = kept[idx].mask
                hidden = np.zeros((h, w), bool)  # under an opaque pixel of a layer in front
                for front in order[pos + 1:]:
                    hidden |= kept[front].mask == 255
                visible = np.where(hidden, 0, alpha).astype(np.uint8)
                if (visible > 0).sum() < p.min_visible * (alpha > 0).sum():
                    dropped.append(f"{kept[idx].phrase}: mostly hidden")
                    continue
                layers.append(kept[idx])
                masks.append(visible)
            if not layers:
                item.reject(self.stage, "no foreground (all layers hidden)")
                return
            fgs = [np.where(m[..., None] > 0, image if d.pixels is None else d.pixels, 0).astype(np.uint8)
                   for d, m in zip(layers, masks, strict=True)]
            # Keep the filled background only near kept layers: elsewhere (dropped detections,
            # wide inpainting rings) the source is the truer background.
            union = np.zeros((h, w), np.uint8)
            for m in masks:
                union |= m
            if p.bg_margin > 0:
                k = 2 * p.bg_margin + 1
                union = cv2.dilate(union, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
            bg = np.where(union[..., None] > 0, background, image).astype(np.uint8)
            fgs, bg = fit_soft_colours(image, bg, fgs, masks)
        sample = self._sample(item, layers, fgs, masks, bg, dropped)
        recon = sample.meta["quality"]["recon_psnr"]
        if recon < p.min_recon_psnr:
            item.reject(self.stage, f"recomposition PSNR {recon:.1f} dB < {p.min_recon_psnr} dB")
            return
        problems = check_sample(sample, self.context.max_layers)
        if problems:
            item.reject(self.stage, "format: " + "; ".join(problems[:3]))
            return
        # Encode here, in the actor: the driver only writes bytes, and PNGs travel lighter than arrays.
        item.members, item.num_layers = sample.to_members(), sample.num_layers
        item.image = item.background = item.truth = item.alpha = None
        item.detections = []

    def _sample(self, item: Item, layers: list[Detection], fgs: list[np.ndarray],
                masks: list[np.ndarray], bg: np.ndarray, dropped: list[str]) -> LayerSample:
        image = item.image
        h, w = image.shape[:2]
        layer_meta = []
        given_pixels = all(d.pixels is not None for d in layers)
        for n, (det, mask) in enumerate(zip(layers, masks)):
            ys, xs = np.nonzero(mask)
            # Layers cut here are what the image shows; only true layers keep a backend's
            # "amodal" (the whole object, also where layers in front hide it).
            extent = det.extra.get("extent", "visible") if given_pixels else "visible"
            layer_meta.append({
                **{k: v for k, v in det.extra.items() if k not in ("depth", "extent")},
                "index": n, "phrase": det.phrase, "caption": det.caption or det.phrase,
                "box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                "score": round(float(det.score), 4), "area": round(float((mask > 0).mean()), 6),
                "extent": extent,
            })
        sample = LayerSample(key=item.key, image=image, background=bg, foregrounds=fgs, masks=masks,
                             caption=item.caption, meta={})
        quality = {k: v for k, v in item.quality.items()}
        quality["recon_psnr"] = round(psnr(sample.recompose(), image), 2)
        if dropped:
            quality["dropped"] = dropped[:10]
        sample.meta = {
            "schema": SAMPLE_SCHEMA, "key": item.key, "width": w, "height": h, "caption": item.caption,
            "background": {"caption": item.background_caption},
            "layers": layer_meta,
            "source": {"uri": item.uri, "sha256": item.sha256, **provenance(item.source_meta)},
            "quality": quality,
        }
        return sample


def fit_soft_colours(image: np.ndarray, bg: np.ndarray, fgs: list[np.ndarray], masks: list[np.ndarray]
                     ) -> tuple[list[np.ndarray], np.ndarray]:
    """Layer and background colours at soft-alpha pixels that recompose the image.

    At a pixel with 0 < alpha < 1 the image is ``a * fg + (1 - a) * below``. Where alpha >= 1/2 the
    layer's colour is solved from it over the stored background (and the layers behind), back to
    front; where the background shows through more than half, the background's colour is solved
    instead (dividing by the larger weight keeps both stable). A matte's soft band can be wide (hair,
    blur): colours estimated there over an inpainted background would not give the image back.
    Opaque layer pixels and pixels no layer touches keep their colours; values are clipped to 8 bits.
    """
    img = image.astype(np.float64)
    below = bg.astype(np.float64)
    through = np.ones(image.shape[:2] + (1,))  # how much of the background shows
    out = []
    for fg, mask in zip(fgs, masks, strict=True):
        a = mask.astype(np.float64)[..., None] / 255.0
        solve = (mask >= 128) & (mask < 255)
        fitted = fg.copy()
        if solve.any():
            colour = (img - (1 - a) * below) / np.maximum(a, 1e-6)
            fitted[solve] = np.clip(np.rint(colour[solve]), 0, 255).astype(np.uint8)
        out.append(fitted)
        below = a * fitted + (1 - a) * below
        through = through * (1 - a)
    soft_any = np.zeros(image.shape[:2], bool)
    for mask in masks:
        soft_any |= (mask > 0) & (mask < 255)
    fix = soft_any & (through[..., 0] > 0.5)
    new_bg = bg.copy()
    if fix.any():
        corrected = bg.astype(np.float64) + (img - below) / np.maximum(through, 1e-6)
        new_bg[fix] = np.clip(np.rint(corrected[fix]), 0, 255).astype(np.uint8)
    return out, new_bg
