"""Soft alpha at object edges: colour decontamination and matting in a band around a mask.

The shared home of these two operations (see the issue-23b contract; a fuller version lives on
that branch and replaces this one at merge):

- :func:`foreground_colours`: a layer's straight colours where its alpha is soft, estimated from
  the foreground side (``pymatting.estimate_foreground_ml``), so an edge pixel does not carry
  the background colour it was mixed with; the image's own pixels where alpha is 255.
- :func:`refine_edge_alpha`: closed-form matting (``pymatting.estimate_alpha_cf``) on a trimap
  made from a binary mask, unknown ``band`` px either side of its boundary.

``pymatting`` compiles its numba kernels on first import (cached on disk afterwards), so it is
imported only when a soft edge is there.
"""

from __future__ import annotations

import cv2
import numpy as np


def _crop(region: np.ndarray, pad: int) -> tuple[slice, slice]:
    ys, xs = np.nonzero(region)
    h, w = region.shape
    return (slice(max(0, ys.min() - pad), min(h, ys.max() + pad + 1)),
            slice(max(0, xs.min() - pad), min(w, xs.max() + pad + 1)))


def foreground_colours(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) straight colours of the layer with 8-bit ``alpha``: the image where alpha
    is 255, foreground colours estimated where it is soft, 0 where it is 0."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if alpha.shape != image.shape[:2]:
        raise ValueError(f"alpha shape {alpha.shape} != image {image.shape[:2]}")
    out = np.where(alpha[..., None] > 0, image, 0).astype(np.uint8)
    soft = (alpha > 0) & (alpha < 255)
    if not soft.any():
        return out
    from pymatting import estimate_foreground_ml

    ys, xs = _crop(soft, 8)  # context for the multilevel solver around the soft pixels only
    fg = estimate_foreground_ml(image[ys, xs].astype(np.float64) / 255.0,
                                alpha[ys, xs].astype(np.float64) / 255.0)
    fg8 = np.clip(np.rint(fg * 255.0), 0, 255).astype(np.uint8)
    region, s = out[ys, xs], soft[ys, xs]
    region[s] = fg8[s]
    return out


def refine_edge_alpha(image: np.ndarray, mask: np.ndarray, band: int) -> np.ndarray:
    """uint8 (H, W) alpha of the object a binary ``mask`` (> 127 inside) outlines, re-estimated by
    closed-form matting ``band`` px either side of its boundary; the mask's value elsewhere."""
    if band < 1:
        raise ValueError(f"band must be >= 1 px, got {band}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} != image {image.shape[:2]}")
    m = (np.asarray(mask) > 127).astype(np.uint8)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    inner, outer = cv2.erode(m, k) > 0, cv2.dilate(m, k) > 0
    unknown = outer & ~inner
    alpha = np.where(m > 0, 255, 0).astype(np.uint8)
    if not unknown.any() or not inner.any():
        return alpha
    from pymatting import estimate_alpha_cf

    ys, xs = _crop(unknown, band + 2)
    tri = np.where(inner[ys, xs], 1.0, np.where(unknown[ys, xs], 0.5, 0.0))
    a = estimate_alpha_cf(image[ys, xs].astype(np.float64) / 255.0, tri)
    a8 = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    region, u = alpha[ys, xs], unknown[ys, xs]
    region[u] = a8[u]
    return alpha
