"""Soft alpha at object edges: matting in a band around a binary mask, and colour decontamination.

The one home of the two operations every producer of soft-alpha layers uses:

- :func:`refine_edge_alpha`: an 8-bit alpha estimated by closed-form matting (Levin et al. 2008, the
  ``pymatting`` implementation) on a trimap made from a binary mask: definite foreground inside the
  mask eroded by ``band`` px, definite background outside it dilated by ``band`` px, unknown between.
  A hard edge (pixels that are either the object's colour or the background's) comes back hard:
  values within ``snap`` of 0 or 255 are snapped there, so flat scenes keep binary masks.
- :func:`foreground_colours`: the layer's straight colours, estimated from the foreground side
  (``pymatting.estimate_foreground_ml``) where alpha is soft, so an edge pixel does not carry the
  background colour it was mixed with; exact image pixels where alpha is 255.

:func:`soften_detections` applies both to every detection of an item (the segment stage's output):
edges between two objects stay hard (neither object's alpha reaches into the other), edges against
the background become soft where the image has them.

Cost: the matting runs on a crop around each mask's boundary only. ``pymatting`` compiles its numba
kernels when first imported (about 30 s once, then cached on disk next to the package); the import
is deferred to the first soft edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

ALPHA_SNAP = 4  # alpha within this of 0 / 255 (8-bit) is snapped there: noise, not an edge
COLOUR_TOLERANCE = 12.0  # RGB distance within which an edge pixel is one side's colour (noise)


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def trimap(mask: np.ndarray, band: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W) trimap of a binary mask: 255 foreground, 0 background, 128 unknown.

    The unknown band reaches ``band`` px either side of the mask's boundary. ``exclude`` (bool
    (H, W), e.g. other objects' masks) is definite background, and the mask's pixels within
    ``band`` of it definite foreground: an edge between two objects stays where it is.
    """
    m = (np.asarray(mask) > 127).astype(np.uint8)
    k = _disk(max(1, int(band)))
    out = np.full(m.shape, 128, np.uint8)
    out[cv2.erode(m, k, borderType=cv2.BORDER_REPLICATE) > 0] = 255
    out[cv2.dilate(m, k) == 0] = 0
    if exclude is not None and exclude.any():
        near = cv2.dilate(exclude.astype(np.uint8), k) > 0
        out[near & (m > 0)] = 255
        out[exclude & (m == 0)] = 0
    return out


def _crop(unknown: np.ndarray, pad: int) -> tuple[slice, slice]:
    ys, xs = np.nonzero(unknown)
    h, w = unknown.shape
    return (slice(max(0, ys.min() - pad), min(h, ys.max() + pad + 1)),
            slice(max(0, xs.min() - pad), min(w, xs.max() + pad + 1)))


def refine_edge_alpha(image: np.ndarray, mask: np.ndarray, band: int, *,
                      exclude: np.ndarray | None = None, snap: int = ALPHA_SNAP,
                      colour_tolerance: float = COLOUR_TOLERANCE) -> np.ndarray:
    """uint8 (H, W) alpha of the object a binary ``mask`` outlines, soft where its edge is.

    ``image`` uint8 (H, W, 3); ``mask`` uint8 (H, W), > 127 inside; ``band`` px either side of
    the boundary are re-estimated by closed-form matting, the rest keeps the mask's value.
    ``exclude``: pixels that are certainly not this object (see :func:`trimap`). Values within
    ``snap`` of 0 or 255, and pixels within ``colour_tolerance`` (RGB) of the nearest definite
    pixel of one side, are that side's: a hard edge stays binary.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} != image {image.shape[:2]}")
    if band < 1:
        raise ValueError(f"band must be >= 1 px, got {band}")
    tri = trimap(mask, band, exclude)
    alpha = np.where(tri == 255, 255, 0).astype(np.uint8)
    unknown = tri == 128
    if not unknown.any() or not (tri == 255).any():
        return np.where(np.asarray(mask) > 127, 255, 0).astype(np.uint8)
    from pymatting import estimate_alpha_cf  # deferred: numba compiles on first import

    ys, xs = _crop(unknown, band + 2)
    crop_tri = tri[ys, xs].astype(np.float64) / 255.0
    crop_tri[tri[ys, xs] == 128] = 0.5
    # Closed-form matting's window size 1 (3x3) and a small epsilon keep flat colours exact.
    a = estimate_alpha_cf(image[ys, xs].astype(np.float64) / 255.0, crop_tri,
                          laplacian_kwargs={"epsilon": 1e-7}, cg_kwargs={"maxiter": 500})
    if not np.isfinite(a).all():  # the solver broke down (e.g. a degenerate band): keep the mask
        return np.where(np.asarray(mask) > 127, 255, 0).astype(np.uint8)
    a8 = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    a8[a8 <= snap] = 0
    a8[a8 >= 255 - snap] = 255
    # Evidence of a mixed pixel: a colour within ``colour_tolerance`` of the nearest definite
    # foreground (background) pixel's is that side's, whatever the solver says. Noise on a hard
    # edge (a grainy background, JPEG) then does not turn into a faint fringe.
    crop = image[ys, xs].astype(np.float32)
    tri_c = tri[ys, xs]
    for side, value in ((255, 255), (0, 0)):
        known = tri_c == side
        if not known.any():
            continue
        _d, (iy, ix) = ndimage.distance_transform_edt(~known, return_indices=True)
        close = np.linalg.norm(crop - crop[iy, ix], axis=2) <= colour_tolerance
        a8[close & (tri_c == 128)] = value
    region = alpha[ys, xs]
    region[unknown[ys, xs]] = a8[unknown[ys, xs]]
    return alpha


def foreground_colours(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) straight colours of the layer with this alpha: the image where alpha is
    255, colours estimated from the foreground side where it is soft, 0 where it is 0."""
    if alpha.shape != image.shape[:2]:
        raise ValueError(f"alpha shape {alpha.shape} != image {image.shape[:2]}")
    out = np.where(alpha[..., None] > 0, image, 0).astype(np.uint8)
    soft = (alpha > 0) & (alpha < 255)
    if not soft.any():
        return out
    from pymatting import estimate_foreground_ml

    ys, xs = _crop(soft, 8)  # enough context for the multilevel solver
    fg = estimate_foreground_ml(image[ys, xs].astype(np.float64) / 255.0,
                                alpha[ys, xs].astype(np.float64) / 255.0)
    fg8 = np.clip(np.rint(fg * 255.0), 0, 255).astype(np.uint8)
    region = out[ys, xs]
    s = soft[ys, xs]
    region[s] = fg8[s]
    return out


def soften_detections(image: np.ndarray, detections: Sequence[Any], band: int) -> None:
    """Soft alpha and decontaminated colours for each detection with a mask, in place.

    ``det.mask`` becomes the soft alpha (binary masks are the input), ``det.pixels`` its
    straight colours. Each object is matted against the background only: the other detections'
    masks are excluded, so edges between objects keep their place and stay hard.
    """
    dets = [d for d in detections if d.mask is not None and d.mask.any()]
    binary = [np.asarray(d.mask) > 127 for d in dets]
    for i, det in enumerate(dets):
        others = np.zeros(image.shape[:2], bool)
        for j, m in enumerate(binary):
            if j != i:
                others |= m
        alpha = refine_edge_alpha(image, np.where(binary[i], 255, 0).astype(np.uint8), band, exclude=others)
        det.mask = alpha
        det.pixels = foreground_colours(image, alpha)
        soft = int(((alpha > 0) & (alpha < 255)).sum())
        det.extra["soft_px"] = soft
