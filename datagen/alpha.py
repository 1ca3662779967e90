"""Soft alpha at object edges: matting in a band around a binary mask, and colour decontamination.

The one home of the two operations every producer of soft-alpha layers uses:

- :func:`refine_edge_alpha`: an 8-bit alpha estimated by closed-form matting (Levin et al. 2008, the
  ``pymatting`` implementation) on a trimap made from a binary mask: definite foreground inside the
  mask eroded by ``band`` px, definite background outside it dilated by ``band`` px, unknown between.
  A hard edge (pixels that are either the object's colour or the background's) comes back hard:
  values within ``snap`` of 0 or 255 are snapped there, so flat scenes keep binary masks.
- :func:`foreground_colours`: the layer's straight colours, taken from the foreground side where
  alpha is soft (the nearest opaque pixel's colour, or ``pymatting.estimate_foreground_ml``), so
  an edge pixel does not carry the background colour it was mixed with; exact image pixels where
  alpha is 255.

:func:`soften_detections` applies both to every detection of an item (the segment stage's output):
edges between two objects stay hard (neither object's alpha reaches into the other), edges against
the background become soft where the image has them.

Cost: the matting runs on a crop around each mask's boundary only (about 0.03 s an object at
256 px). ``pymatting`` compiles its numba kernels when first imported (about 30 s once, then
cached on disk next to the package); the import is deferred to the first mask with an edge.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

ALPHA_SNAP = 4  # alpha within this of 0 / 255 (8-bit) is snapped there: noise, not an edge
COLOUR_TOLERANCE = 10.0  # RGB distance within which an edge pixel has one side's colour (noise)


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


def _near_colour(image: np.ndarray, known: np.ndarray, where: np.ndarray, radius: int) -> np.ndarray:
    """float (H, W): per pixel of ``where``, the smallest RGB distance to a ``known`` pixel's
    colour within ``radius`` px, else to the nearest known pixel's (only ``where`` is filled)."""
    h, w = known.shape
    best = np.full((h, w), np.inf, np.float32)
    ys, xs = np.nonzero(where)
    if not len(ys):
        return best
    vals = image[ys, xs]
    out = np.full(len(ys), np.inf, np.float32)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx > radius * radius:
                continue
            sy, sx = ys + dy, xs + dx
            ok = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
            ok[ok] = known[sy[ok], sx[ok]]
            if ok.any():
                d = np.linalg.norm(vals[ok] - image[sy[ok], sx[ok]], axis=1)
                out[ok] = np.minimum(out[ok], d)
    far = ~np.isfinite(out)
    if far.any() and known.any():  # nothing known that close (a thin tip): the nearest known pixel
        _d, (iy, ix) = ndimage.distance_transform_edt(~known, return_indices=True)
        fy, fx = ys[far], xs[far]
        out[far] = np.linalg.norm(vals[far] - image[iy[fy, fx], ix[fy, fx]], axis=1)
    best[ys, xs] = out
    return best


def _in_palette(pixels: np.ndarray, palette: np.ndarray, bin_size: int = 8) -> np.ndarray:
    """bool per pixel (N, 3): its colour, quantised to ``bin_size``, is that of a ``palette``
    colour (M, 3)."""
    n = 256 // bin_size

    def index(colours: np.ndarray) -> np.ndarray:
        q = colours.astype(np.int32) // bin_size
        return (q[..., 0] * n + q[..., 1]) * n + q[..., 2]

    lut = np.zeros(n**3, bool)
    lut[index(palette)] = True
    return lut[index(pixels)]


def refine_edge_alpha(image: np.ndarray, mask: np.ndarray, band: int, *,
                      exclude: np.ndarray | None = None, snap: int = ALPHA_SNAP,
                      colour_tolerance: float = COLOUR_TOLERANCE) -> np.ndarray:
    """uint8 (H, W) alpha of the object a binary ``mask`` outlines, soft where its edge is.

    ``image`` uint8 (H, W, 3); ``mask`` uint8 (H, W), > 127 inside; ``band`` px either side of
    the boundary are re-estimated by closed-form matting, the rest keeps the mask's value.
    ``exclude``: pixels that are certainly not this object (see :func:`trimap`). Values within
    ``snap`` of 0 or 255, and pixels within ``colour_tolerance`` (RGB) of the colour of a definite
    pixel of one side nearby, are that side's: a hard edge stays binary.
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
    # pymatting's closed form: 3x3 windows, epsilon 1e-7 (its defaults); CG capped at 500 steps.
    try:
        # (pymatting prints a "PERFORMANCE WARNING" when its preconditioner needs a shift: not ours to show)
        with np.errstate(divide="ignore", invalid="ignore"), contextlib.redirect_stdout(io.StringIO()):
            a = estimate_alpha_cf(image[ys, xs].astype(np.float64) / 255.0, crop_tri,
                                  laplacian_kwargs={"epsilon": 1e-7}, cg_kwargs={"maxiter": 500})
    except ValueError:  # conjugate gradients did not converge
        a = np.full(crop_tri.shape, np.nan)
    if not np.isfinite(a).all():  # the solver broke down (a degenerate band): keep the binary mask
        return np.where(np.asarray(mask) > 127, 255, 0).astype(np.uint8)
    a8 = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
    a8[a8 <= snap] = 0
    a8[a8 >= 255 - snap] = 255
    # Evidence of a mixed pixel: a colour within ``colour_tolerance`` of a definite foreground
    # (background) pixel's nearby is that side's, whatever the solver says; so is a colour that
    # occurs in the background well away from the edge (3 bands out, past the tail of a blurred
    # edge, whose mixed colours must stay soft). Noise on a hard edge (a grainy background, JPEG)
    # or a second background colour (stripes, checks) then makes no fringe. (The object's own
    # colours are no such evidence: a blurred edge reaches into the eroded mask.)
    crop = image[ys, xs]
    tri_c = tri[ys, xs]
    todo = tri_c == 128
    radius = 2 * band + 3
    dist = {side: _near_colour(crop.astype(np.float32), tri_c == side, todo, radius)[todo] for side in (255, 0)}
    near_f, near_b = dist[255] <= colour_tolerance, dist[0] <= colour_tolerance
    far = cv2.dilate((np.asarray(mask) > 127).astype(np.uint8), _disk(3 * band)) == 0
    if exclude is not None:
        far &= ~exclude
    big = _crop(unknown, 4 * band + 2)
    in_b = _in_palette(crop[todo], image[big][far[big]])
    vals = a8[todo]
    vals[near_f & (~near_b | (dist[255] <= dist[0]))] = 255
    vals[near_b & (~near_f | (dist[0] < dist[255]))] = 0
    vals[~near_f & ~near_b & in_b] = 0
    a8[todo] = vals
    region = alpha[ys, xs]
    region[unknown[ys, xs]] = a8[unknown[ys, xs]]
    return alpha


FG_METHODS = ("nearest", "ml")


def foreground_colours(image: np.ndarray, alpha: np.ndarray, method: str = "nearest") -> np.ndarray:
    """uint8 (H, W, 3) straight colours of the layer with this alpha: the image where alpha is
    255, 0 where it is 0, and where it is soft a colour from the foreground side, not the mix.

    ``method`` "nearest": the colour of the nearest opaque pixel of the layer (cheap: measured as
    good as "ml" on the soft-edged scenes, at about a third of the pipeline CPU time, BENCHMARKS.md); "ml":
    ``pymatting.estimate_foreground_ml`` (multilevel foreground estimation, Germer et al. 2020),
    which also follows texture along the edge.
    """
    if alpha.shape != image.shape[:2]:
        raise ValueError(f"alpha shape {alpha.shape} != image {image.shape[:2]}")
    if method not in FG_METHODS:
        raise ValueError(f"method {method!r}: choose one of {FG_METHODS}")
    out = np.where(alpha[..., None] > 0, image, 0).astype(np.uint8)
    soft = (alpha > 0) & (alpha < 255)
    if not soft.any():
        return out
    if method == "nearest":
        core = alpha >= alpha.max()  # the opaque part (the densest one of an all-soft layer)
        _d, (iy, ix) = ndimage.distance_transform_edt(~core, return_indices=True)
        out[soft] = image[iy[soft], ix[soft]]
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


def soften_detections(image: np.ndarray, detections: Sequence[Any], band: int,
                      colours: str = "nearest") -> None:
    """Soft alpha and decontaminated colours for each detection with a mask, in place.

    ``det.mask`` becomes the soft alpha (binary masks are the input), ``det.pixels`` its
    straight colours; a matting model's detections (candidate "matte") keep theirs. Each object is matted against the background only: the other detections'
    masks are excluded, so edges between objects keep their place and stay hard.
    """
    dets = [d for d in detections if d.mask is not None and d.mask.any()]
    binary = [np.asarray(d.mask) > 127 for d in dets]
    for i, det in enumerate(dets):
        if det.extra.get("candidate") == "matte":  # a matting model's alpha is soft already
            continue
        others = np.zeros(image.shape[:2], bool)
        for j, m in enumerate(binary):
            if j != i:
                others |= m
        alpha = refine_edge_alpha(image, np.where(binary[i], 255, 0).astype(np.uint8), band, exclude=others)
        det.mask = alpha
        det.pixels = foreground_colours(image, alpha, colours)
        soft = int(((alpha > 0) & (alpha < 255)).sum())
        det.extra["soft_px"] = soft


def apply_source_alpha(image: np.ndarray, source_alpha: np.ndarray, detections: Sequence[Any],
                       band: int, background: Sequence[int] = (255, 255, 255)) -> None:
    """Bound every detection by the source image's own alpha, in place.

    ``image`` is the source composited over ``background`` (what the decode stage hands on).
    A layer is never more opaque than the source (transparent pixels are no object), and near
    its mask (within ``band`` px) where the source is partly transparent, its alpha IS the
    source's, with the source's straight colours recovered from the composite there.
    """
    src = np.asarray(source_alpha, np.uint8)
    partial = (src > 0) & (src < 255)
    a = src.astype(np.float32)[..., None] / 255.0
    bg = np.asarray(background, np.float32)
    # Straight colours where the source is partly transparent: I = a F + (1 - a) bg.
    straight = np.clip(np.rint((image.astype(np.float32) - (1.0 - a) * bg) / np.maximum(a, 1e-6)),
                       0, 255).astype(np.uint8)
    k = _disk(max(1, int(band)))
    for det in detections:
        if det.mask is None:
            continue
        mask = np.asarray(det.mask, np.uint8)
        near = (cv2.dilate((mask > 127).astype(np.uint8), k) > 0) & partial
        alpha = np.where(near, src, np.minimum(mask, src)).astype(np.uint8)
        pixels = det.pixels if det.pixels is not None else np.where(mask[..., None] > 0, image, 0)
        pixels = np.where(partial[..., None], straight, pixels)
        det.mask = alpha
        det.pixels = np.where(alpha[..., None] > 0, pixels, 0).astype(np.uint8)
