"""CPU backends from classical algorithms: the embedded default pipeline.

- caption ``sidecar``: the source's caption (or a clear fallback), its object phrases and the
  background phrase.
- ground ``contrast``: a background colour model learnt from the image border (colours of
  objects cut by the border kept out of it where the background is plain); pixels far from
  it are foreground candidates, split into objects by the image's own colours (near colours
  split along sharp edges) and named by the caption's colour words, which are ranges of shades
  (``datagen.phrases.COLOUR_REGIONS``), not paint values; outlines follow half coverage of
  anti-aliased edges; blurred edges (JPEG ringing and chroma bleed,
  resampling: thin bands of colours mixing an object's and its neighbour's) join their object
  instead of becoming objects. On a textured (photo) background the caption's colour words give
  regions, and the compact ones set off by a colour step are the objects (``caption_regions``).
  When the candidates are not a few compact objects (typical of photos) it falls back to one
  object, the most distinct region.
- segment ``grabcut``: OpenCV GrabCut from each box, seeded with the candidate mask.
- inpaint ``opencv``: fills the union of the masks grown by a few pixels, choosing per hole the
  fill (Telea, Navier-Stokes, a smooth polynomial, a copy of the repeating pattern) that best
  rebuilds known background around the hole.

Measured facts behind these choices are in the project's reference notes and BENCHMARKS.md (decomposition quality).

Rejections are made where the evidence is, with a specific reason: ground rejects "no
foreground found (...)" (nothing differs from the border colours, or no compact objects and no
distinct region); segment rejects a photo-fallback mask that is too small or whose outline
follows no image edge. Assemble still applies its own area, duplicate and layer-count rules.
Ground also leaves a back-to-front hint in ``Detection.extra["depth"]`` (0 = back-most) from
occlusion cues, and sorts its detections by it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from datagen.item import EXACT, MATTE, ROUGH, Detection, Item
from datagen.phrases import (
    COLOUR_FIT_MAX,
    background_phrase,
    colour_fit,
    colour_name,
    colour_of,
    extract_phrases,
    with_article,
)
from datagen.registry import register
from datagen.stages.base import Segmenter, SoftAlphaParams, Stage

# Candidate kinds recorded in Detection.extra["candidate"]: an "exact" candidate is a clean
# colour-model region (the segment and inpaint stages trust it); a "rough" one is the photo
# fallback's region (GrabCut does the work, inpainting grows it more); a "matte" one is a matting
# model's soft alpha (datagen.stages.matting), final as it is.


# RGB -> (Y, Cb, Cr) without offsets (BT.601, as JPEG).
_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                np.float32)


def _u8(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, 255, 0).astype(np.uint8)


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


# -- caption ---------------------------------------------------------------------------------
@dataclass
class SidecarParams:
    """Settings of the sidecar caption backend."""

    fallback: str = "an image"  # caption when the source has none (recorded as such)
    meta_keys: tuple[str, ...] = ("caption", "title", "alt", "description")  # tried in order
    background_fallback: str = "the background"  # background caption when none is named


@register
class SidecarCaption(Stage):
    """The source's own caption; object phrases and the background phrase from it."""

    stage = "caption"
    name = "sidecar"
    Params = SidecarParams

    def process(self, items: list[Item]) -> None:
        p: SidecarParams = self.params
        for item in items:
            caption, origin = item.caption.strip(), "sidecar"
            if not caption:
                origin = "fallback"
                for key in p.meta_keys:
                    value = item.source_meta.get(key)
                    if isinstance(value, str) and value.strip():
                        caption, origin = value.strip(), f"meta:{key}"
                        break
            item.caption = caption or p.fallback
            item.quality["caption_source"] = origin
            item.phrases = extract_phrases(item.caption)
            bg = background_phrase(item.caption)
            item.background_caption = with_article(bg) if bg else p.background_fallback


# -- ground ----------------------------------------------------------------------------------
@dataclass
class ContrastParams:
    """Settings of the contrast grounder (distances are RGB Euclidean, 0..441)."""

    border_frac: float = 0.03  # border strip that defines the background, share of the side
    bin_size: int = 8  # RGB quantisation of the background colour model
    min_border_share: float = 0.004  # colour bins rarer than this on a border side are ignored
    min_sides: int = 1  # a background colour occurs on at least this many of the 4 sides
    # (2 keeps an object that crosses one side out of the model, but on the bundled photos it
    # let large background areas in: astronaut, rocket and coins came out worse)
    tolerance: float = 36.0  # farther than this from every border colour: a candidate pixel
    colour_radius: float = 60.0  # a candidate joins a colour cluster within this distance
    min_object_share: float = 0.002  # smallest object, share of the image
    min_part_px: int = 12  # smaller same-colour specks are dropped from an object
    max_objects: int = 8  # more clusters than this: not a few compact objects
    max_candidate_share: float = 0.6  # more candidates than this: no plain background
    min_explained: float = 0.9  # objects must cover this share of the candidate pixels
    edge_px: int = 2  # object edge pixels off the background colours, this close, join it
    edge_tolerance: float = 12.0  # "off the background colours": farther than this (RGB)
    # Blurred edges (JPEG ringing and chroma bleed, resampling) are bands of colours between an
    # object's and its neighbour's (background or another object). Such a band is no object:
    edge_band_frac: float = 0.025  # its pixels lie this close to an object (share of the side,
    # at least edge_px + 1 px; 6 px at 256: a 96-px JPEG upscaled to 256 bleeds ~5 px) ...
    edge_band_share: float = 0.9  # ... nearly all of them (this share) ...
    mix_tolerance: float = 8.0  # ... and their colours are mixes: this close (median, in YCbCr)
    # to a mix of the object's colour and its neighbour's, with one weight in luma and another
    # in chroma (JPEG subsamples chroma) and overshoot (ringing) allowed, and under half their
    # distance to their own flat colour (a hard-edged sliver of a real object is not an edge).
    # When the caption names colours, a thin uncaptioned-colour cluster there is edge anyway.
    max_roughness: float = 2.5  # contour length / hull perimeter of a compact object
    fallback: bool = True  # photos: one object from the most distinct region
    fallback_min_share: float = 0.01  # the candidates, and the region, must cover at least
    # this much of the image (less: the subject fills the frame, or there is none: reject)
    fallback_min_contrast: float = 0.35  # its mean distance, in units of ``tolerance``
    # Objects cut by the image border: a border colour group (colours joined in the quantised
    # RGB cube) that covers less than this share of the outermost pixel ring, in at most
    # ``max_objects`` runs along it, while another group covers at least ``dominant_share``, is
    # an object's colour, not the background's (tried first; a non-compact result falls back to
    # the plain border model, as photos need).
    border_object_share: float = 0.2
    border_retry_share: float = 0.001  # below this plain candidate share: "nothing at all"
    plain_background_bins: int = 40  # a plain background's main colour group spans at most this
    # many colour bins (flat 1, noise or gradient 10-30; the bundled photos 25-170)
    dominant_share: float = 0.3
    # Near colours in one cluster (within colour_radius): two objects where they meet along a
    # sharp edge. Split when the 2-means colours are this far apart (RGB) ...
    split_min_distance: float = 24.0
    edge_alpha: bool = True  # outlines where the object covers half of a pixel (see _edge_alpha)
    halo_alpha: float = 0.05  # fainter than this, an edge pixel needs no inpainting
    split_max_boundary: float = 8.0  # ... their shared border is at most this x sqrt(smaller area)
    split_edge_jump: float = 0.35  # ... and neighbours across it differ by this share of the gap
    split_depth: int = 2  # at most 2**depth objects from one cluster
    max_colour_misfit: float = 4.0  # a caption colour word names an object up to this misfit
    # Textured backgrounds (a photo behind flat-ish objects): when the border colour model finds
    # no compact objects for every phrase, each caption colour word's pixels (median-filtered,
    # by the closest word of the caption) form regions; a region is an object when it is compact
    # and set off from its surroundings by a colour step (see _caption_regions).
    caption_regions: bool = True
    region_median_px: int = 5  # median filter before the colour words are read (texture specks)
    region_max_share: float = 0.5  # a larger region is background of that colour, not an object
    region_max_roughness: float = 1.35  # compact: contour / hull perimeter (a 5-point star ~1.25)
    region_min_separation: float = 0.5  # share of the ring 3-6 px outside that differs from the
    # region's edge colour by a step (Lab distance above 15 and twice the edge's own spread)


class BorderModel:
    """Distance of every colour to the colours of the image border (a quantised RGB LUT).

    A colour counts as background when it occurs on at least ``min_sides`` of the four border
    strips, often enough, and is not within ``colour_radius`` of an ``exclude`` colour.
    """

    def __init__(self, image: np.ndarray, p: ContrastParams,
                 exclude: list[str] | None = None, border_objects: bool = False) -> None:
        h, w = image.shape[:2]
        b = max(2, round(p.border_frac * min(h, w)))
        self.bin = p.bin_size
        n = 256 // self.bin
        sides = [image[:b], image[-b:], image[:, :b], image[:, -b:]]
        votes = np.zeros(n**3, np.int32)
        total = np.zeros(n**3, np.int64)
        for side in sides:
            counts = np.bincount(self._index(side.reshape(-1, 3)), minlength=n**3)
            votes += counts >= max(2, p.min_border_share * side.shape[0] * side.shape[1])
            total += counts
        occupied = votes >= p.min_sides
        self.excluded = 0  # border colour groups taken for objects cut by the border
        self.plain_background = (0.0, 0, 0.0)  # see _border_object_bins
        if border_objects and occupied.any():
            objects = self._border_object_bins(image, sides, occupied, p)
            self.excluded = int(objects.any())
            occupied &= ~objects
        if exclude and occupied.any():
            # Colour words the caption gives to objects: the border colours in their regions,
            # unless their colour group holds most of the border (that is the background,
            # whatever its colour: "a cat on a brown floor").
            centres = (np.stack(np.unravel_index(np.arange(n**3), (n, n, n)), 1) + 0.5) * self.bin
            fit = colour_fit(centres)
            groups, shares = self._groups(sides, occupied)
            # (A group of a few border pixels, under 2%, is no object crossing the border either.)
            minor = (shares[groups] < 0.5) & (shares[groups] >= 0.02)
            for word in exclude:
                occupied &= (fit[word] >= COLOUR_FIT_MAX) | ~minor
        if not occupied.any():  # no colour shared by enough sides: fall back to all of them
            occupied = total >= max(2, p.min_border_share * total.sum())
        # Distance (in bins) from each colour bin to the nearest occupied one.
        self.lut = ndimage.distance_transform_edt(~occupied.reshape(n, n, n)).reshape(-1) * self.bin

    def _groups(self, strips: list[np.ndarray], occupied: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Colour groups (occupied bins joined in the quantised RGB cube; 0 = none) per bin, and
        each group's share of the border strips' pixels (index 0: pixels of no group)."""
        n = 256 // self.bin
        groups, count = ndimage.label(occupied.reshape(n, n, n), structure=np.ones((3, 3, 3)))
        groups = groups.reshape(-1)
        g = groups[self._index(np.concatenate([s.reshape(-1, 3) for s in strips]))]
        g = g[g > 0]
        shares = np.bincount(g, minlength=count + 1) / max(len(g), 1)
        return groups, shares

    def _border_object_bins(self, image: np.ndarray, strips: list[np.ndarray], occupied: np.ndarray,
                            p: ContrastParams) -> np.ndarray:
        """Occupied bins whose colour group is an object's cut by the border (see ContrastParams)."""
        n = 256 // self.bin
        groups, shares = self._groups(strips, occupied)
        count = len(shares) - 1
        out = np.zeros(n**3, bool)
        if count < 2:
            return out
        # Runs along the outermost ring, walked around the image, where pixels of no group
        # (rare colours: the mixed pixels of anti-aliased edges) do not break a run.
        if shares.max() < p.dominant_share:
            return out  # no dominant background colour (a photo's border): nothing to tell
        ring = np.concatenate([image[0, :], image[1:, -1], image[-1, -2::-1], image[-2:0:-1, 0]])
        r = groups[self._index(ring)]
        r = r[r > 0]
        runs = np.bincount(r[r != np.roll(r, 1)], minlength=count + 1) if len(r) else np.zeros(count + 1)
        picked = [k for k in range(1, count + 1)
                  if 0 < shares[k] < p.border_object_share and runs[k] <= p.max_objects]
        for k in picked:
            out |= groups == k
        top = int(shares.argmax())
        # How plain the background is, for the caller: its main group's share and colour spread
        # (bins), and the smallest share taken for an object.
        self.plain_background = (float(shares[top]), int((groups == top).sum()),
                                 min(float(shares[k]) for k in picked) if picked else 0.0)
        return out

    def _index(self, pixels: np.ndarray) -> np.ndarray:
        q = pixels.astype(np.int32) // self.bin
        n = 256 // self.bin
        return (q[..., 0] * n + q[..., 1]) * n + q[..., 2]

    def distance(self, image: np.ndarray) -> np.ndarray:
        return self.lut[self._index(image)].astype(np.float32)


def _roughness(mask: np.ndarray) -> float:
    """Total contour length over the convex hull perimeter: ~1-1.3 for shapes, >2 for clutter."""
    m = mask.astype(np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return float("inf")
    length = sum(cv2.arcLength(c, True) for c in contours)
    hull = cv2.convexHull(np.concatenate(contours))
    return length / max(cv2.arcLength(hull, True), 1.0)


def _clusters(pixels: np.ndarray, centres: list[np.ndarray], radius: float,
              iterations: int = 3) -> tuple[np.ndarray, list[np.ndarray]]:
    """Nearest-centre assignment with a few k-means updates; -1 beyond ``radius``."""
    px = pixels.astype(np.float32)
    c = np.array(centres, np.float32)
    for _ in range(iterations):
        d = np.linalg.norm(px[:, None, :] - c[None], axis=2)
        lab = d.argmin(1)
        near = d[np.arange(len(px)), lab] <= radius
        for k in range(len(c)):
            sel = near & (lab == k)
            if sel.any():
                c[k] = px[sel].mean(0)
    d = np.linalg.norm(px[:, None, :] - c[None], axis=2)
    lab = d.argmin(1)
    lab[d[np.arange(len(px)), lab] > radius] = -1
    return lab, list(c)


def _colour_modes(pixels: np.ndarray, radius: float, min_count: int, limit: int) -> list[np.ndarray]:
    """Greedy mode seeking in a coarse colour histogram: the dominant colours of ``pixels``."""
    q = (pixels // 16).astype(np.int32)
    idx = (q[:, 0] * 16 + q[:, 1]) * 16 + q[:, 2]
    counts = np.bincount(idx, minlength=4096)
    remaining = np.ones(len(pixels), bool)
    modes: list[np.ndarray] = []
    px = pixels.astype(np.float32)
    while len(modes) <= limit:
        b = int(counts.argmax())
        if counts[b] < min_count:
            break
        seed = px[remaining & (idx == b)].mean(0)
        near = remaining & (np.linalg.norm(px - seed, axis=1) <= radius)
        modes.append(px[near].mean(0) if near.any() else seed)
        remaining &= ~near
        counts = np.bincount(idx[remaining], minlength=4096)
    return modes


def _turning_at(mask: np.ndarray, points: np.ndarray, step: int) -> float:
    """Mean turning angle (degrees, 0 = straight) of a mask's outline at the given points."""
    cnts, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not cnts:
        return 0.0
    turns = []
    for px, py in points:
        best = None
        for c in cnts:
            c = c[:, 0, :].astype(np.float64)
            d = (c[:, 0] - px) ** 2 + (c[:, 1] - py) ** 2
            i = int(d.argmin())
            if best is None or d[i] < best[0]:
                best = (d[i], c, i)
        _d, c, i = best
        if len(c) < 2 * step + 1:
            continue
        u, v = c[(i - step) % len(c)] - c[i], c[(i + step) % len(c)] - c[i]
        cos = float(np.dot(u, v) / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-9))
        turns.append(180.0 - math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
    return float(np.mean(turns)) if turns else 0.0


def _depth_order(masks: list[np.ndarray]) -> list[int]:
    """Back-to-front ranks (0 = back-most) of touching objects, from occlusion cues.

    Where two objects meet the shared edge is the front object's own outline: at the
    T-junctions (where both meet a third region) the front outline runs on nearly straight
    while the hidden object's outline turns sharply. When the junctions do not tell, an
    object whose convex hull reaches into the other's pixels is taken to be behind it.
    Untouching objects are ordered larger first (further back).
    """
    n = len(masks)
    k3 = np.ones((3, 3), np.uint8)
    grown = [cv2.dilate(m.astype(np.uint8), k3) > 0 for m in masks]
    hulls = []
    for m in masks:
        cnts, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        hull = np.zeros(m.shape, np.uint8)
        if cnts:
            cv2.fillPoly(hull, [cv2.convexHull(np.concatenate(cnts))], 1)
        hulls.append(hull.astype(bool))
    step = max(3, round(min(masks[0].shape) / 64)) if n else 3
    behind = np.zeros((n, n), bool)  # behind[a, b]: a is behind b
    for a in range(n):
        for b in range(a + 1, n):
            if not (grown[a] & masks[b]).any():
                continue  # not touching: no cue
            rest = ~(masks[a] | masks[b])
            junction = grown[a] & grown[b] & (cv2.dilate(rest.astype(np.uint8), k3) > 0)
            votes = 0.0
            if junction.any():
                nj, lab, _st, cents = cv2.connectedComponentsWithStats(junction.astype(np.uint8))
                pts = cents[1:nj]
                votes = _turning_at(masks[a], pts, step) - _turning_at(masks[b], pts, step)
            if abs(votes) >= 20.0:
                behind[a, b], behind[b, a] = votes > 0, votes < 0
                continue
            ab = int((hulls[a] & masks[b]).sum())
            ba = int((hulls[b] & masks[a]).sum())
            if max(ab, ba) > 4:
                behind[a, b], behind[b, a] = ab > ba, ba > ab
    # Back-most first: fewest objects behind it; ties: the larger one further back.
    areas = [int(m.sum()) for m in masks]
    order = sorted(range(n), key=lambda k: (int(behind[:, k].sum()), -areas[k]))
    ranks = [0] * n
    for r, k in enumerate(order):
        ranks[k] = r
    return ranks


def _extends(before: list[Detection], after: list[Detection], border_frac: float) -> bool:
    """Whether ``after`` keeps every object of ``before`` (IoU >= 0.8) and its other objects all
    reach into the border strips (objects cut by the border, or their colours on it)."""
    old = [d.mask > 0 for d in before]
    new = [d.mask > 0 for d in after]
    matched = set()
    for m in old:
        ious = [float((m & n).sum() / max((m | n).sum(), 1)) for n in new]
        if not ious or max(ious) < 0.8:
            return False
        matched.add(int(np.argmax(ious)))
    for k, n in enumerate(new):
        b = max(2, round(border_frac * min(n.shape)))
        if k not in matched and not (n[:b].any() or n[-b:].any() or n[:, :b].any() or n[:, -b:].any()):
            return False
    return len(new) > len(old) or not old


def _counted(caption: str, phrases: list[str]) -> bool:
    """Whether the caption names each object once: every phrase's head noun occurs in it in the
    singular ("a red star and a blue square"; not "two red stars" or "coins")."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    return all(ph.split()[-1] in words for ph in phrases)


def drop_unnamed(item: Item) -> None:
    """Objects the caption does not name are dropped once every phrase names one, where the
    caption counts its objects (:func:`_counted`): extra colour clusters are texture or shadow."""
    named = {d.phrase for d in item.detections} & set(item.phrases)
    if item.phrases and len(named) == len(item.phrases) and _counted(item.caption, item.phrases):
        item.detections = [d for d in item.detections if d.phrase in named]


def caption_confirms(item: Item) -> bool:
    """Whether the caption confirms the colour model's objects: it counts two or more objects,
    each with a colour word, and each names one of them (extra clusters aside). Captions of
    photos rarely colour every object; a matting model then has nothing to add."""
    named = {d.phrase for d in item.detections} & set(item.phrases)
    return (len(item.phrases) >= 2 and len(named) == len(item.phrases)
            and all(colour_of(ph) is not None for ph in item.phrases)
            and _counted(item.caption, item.phrases))


def _caption_regions(image: np.ndarray, phrases: list[str],
                     p: ContrastParams) -> list[tuple[np.ndarray, str]]:
    """Objects named by the caption's colour words on a textured background: (mask, phrase) each.

    Every pixel of the median-filtered image goes to the caption colour word that fits it best
    (:func:`colour_fit`; none when no word fits). Each word's connected regions are candidates;
    an object is a compact one (``region_max_roughness``, at most ``region_max_share`` of the
    image) that stands out from its surroundings: most of a ring 3-6 px outside it differs from
    the colour just inside its edge by a step (texture of the same colour family ends in a ramp,
    not a step). Per word, as many regions as the caption has phrases of that colour, the most
    separated and flattest first. Every phrase must have a colour word; else nothing.
    """
    coloured = [(ph, colour_of(ph)) for ph in phrases]
    if not coloured or any(c is None for _ph, c in coloured):
        return []
    h, w = image.shape[:2]
    words = sorted({c for _ph, c in coloured if c is not None})
    k = p.region_median_px | 1
    smooth = cv2.medianBlur(image, k) if k > 1 else image
    fits = colour_fit(smooth.reshape(-1, 3))
    misfit = np.stack([fits[word].reshape(h, w) for word in words])
    owner, best = misfit.argmin(0), misfit.min(0)
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    min_area = max(p.min_part_px, int(p.min_object_share * h * w))
    out: list[tuple[np.ndarray, str]] = []
    for i, word in enumerate(words):
        m = ((owner == i) & (best < COLOUR_FIT_MAX)).astype(np.uint8)
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, _disk(2))  # threads of texture between regions
        n, comps, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        scored = []
        for j in range(1, n):
            area = int(stats[j, cv2.CC_STAT_AREA])
            if area < min_area or area > p.region_max_share * h * w:
                continue
            x, y, bw, bh = (int(v) for v in stats[j, :4])
            pad = 8
            y0, x0, y1, x1 = max(0, y - pad), max(0, x - pad), min(h, y + bh + pad), min(w, x + bw + pad)
            c = ndimage.binary_fill_holes(comps[y0:y1, x0:x1] == j)
            if _roughness(c) > p.region_max_roughness:
                continue
            inside = cv2.distanceTransform(c.astype(np.uint8), cv2.DIST_L2, 3)
            outside = cv2.distanceTransform((~c).astype(np.uint8), cv2.DIST_L2, 3)
            ring, edge = (outside >= 3) & (outside <= 6), (inside >= 2) & (inside <= 5)
            if not edge.any():
                edge = c
            crop = lab[y0:y1, x0:x1]
            ref = np.median(crop[edge], 0)
            spread = float(np.percentile(np.linalg.norm(crop[edge] - ref, axis=1), 90))
            step = np.linalg.norm(crop[ring] - ref, axis=1) > max(15.0, 2.0 * spread)
            separation = float(step.mean()) if ring.any() else 0.0
            if separation < p.region_min_separation:
                continue
            core = inside >= 3
            flat = float(crop[core][:, 1:].std(0).mean()) if core.sum() > 10 else 0.0
            full = np.zeros((h, w), bool)
            full[y0:y1, x0:x1] = c
            scored.append((separation - 0.03 * flat, full))
        scored.sort(key=lambda t: -t[0])
        names = [ph for ph, c in coloured if c == word]
        out += [(mask, ph) for (_s, mask), ph in zip(scored, names, strict=False)]
    return out


@register
class ContrastGround(Stage):
    """Foreground candidates far from the border's colours, split into objects by colour."""

    stage = "ground"
    name = "contrast"
    Params = ContrastParams

    def process(self, items: list[Item]) -> None:
        for item in items:
            self.ground(item)

    def ground(self, item: Item) -> None:
        rest = self.compact(item)
        if rest is not None:
            self.photo(item, *rest)
        else:
            drop_unnamed(item)

    def compact(self, item: Item) -> tuple[np.ndarray, float] | None:
        """The flat-scene path: a few compact objects off the border's colours become detections
        (None); otherwise (distance to the border colours, candidate share) for :meth:`photo`."""
        p: ContrastParams = self.params
        image = item.image
        if not item.phrases:
            item.phrases = extract_phrases(item.caption)
        model = BorderModel(image, p)
        dist = model.distance(image)
        cand = dist > p.tolerance
        share = float(cand.mean())
        item.quality["candidate_share"] = round(share, 4)
        plain = self._emit_compact(item, dist, cand, share)
        # Objects cut by the border: their colours kept out of the background model. A photo's
        # border is varied, and its rare colours are background, not objects: taken where the
        # plain model saw a few compact objects (then only if this keeps them and adds objects
        # at the border) or nothing at all, or where the background is plain (one colour group
        # holds most of the border, over few colours, and each object group a fair share).
        cut = BorderModel(image, p, border_objects=True)
        main_share, main_bins, least = cut.plain_background
        flat = main_share >= 0.6 and main_bins <= p.plain_background_bins and least >= 0.005
        if plain or share < p.border_retry_share or flat:
            if cut.excluded:
                before = item.detections
                c_dist = cut.distance(image)
                c_cand = c_dist > p.tolerance
                c_share = float(c_cand.mean())
                if self._emit_compact(item, c_dist, c_cand, c_share) and (
                        not plain or _extends(before, item.detections, p.border_frac)):
                    item.quality["candidate_share"] = round(c_share, 4)
                    item.quality["ground_mode"] = "colour-border"
                    self._regions_if_better(item)
                    return None
                item.detections = before
                if plain:
                    item.quality["ground_mode"] = "colour"
        if plain:
            self._regions_if_better(item)
            return None
        # Second try: colours the caption gives to objects are not background, even where an
        # object crosses the border ("a black horse on a white background"). Only a compact
        # result counts: captions also colour backgrounds ("under a blue sky").
        bg_colour = colour_of(background_phrase(item.caption))
        object_colours = [c for ph in item.phrases
                          if (c := colour_of(ph)) is not None and c != bg_colour]
        if object_colours:
            guided = BorderModel(image, p, object_colours).distance(image)
            g_cand = guided > p.tolerance
            if self._emit_compact(item, guided, g_cand, float(g_cand.mean())):
                item.quality["ground_mode"] = "colour-caption"
                return None
        if self._emit_regions(item):
            return None
        return dist, share

    def _regions_if_better(self, item: Item) -> None:
        """The colour model's objects leave caption phrases unnamed: the caption's colour regions
        (:func:`_caption_regions`) for those phrases join them where they overlap none."""
        p: ContrastParams = self.params
        named = {d.phrase for d in item.detections} & set(item.phrases)
        if not p.caption_regions or not item.phrases:
            return
        if len(named) == len(item.phrases):
            return
        taken = np.zeros(item.image.shape[:2], bool)
        for d in item.detections:
            taken |= d.mask > 0
        added = []
        for det in self._regions(item):
            m = det.mask > 0
            if det.phrase not in named and (m & taken).sum() < 0.2 * m.sum():
                added.append(det)
                named.add(det.phrase)
                taken |= m
        if not added:
            return
        dets = item.detections + added
        for d, rank in zip(dets, _depth_order([d.mask > 0 for d in dets]), strict=True):
            d.extra["depth"] = rank
        item.detections = sorted(dets, key=lambda d: d.extra["depth"])
        item.quality["ground_mode"] = "colour+regions"

    def _emit_regions(self, item: Item) -> bool:
        """Objects from the caption's colour words on a textured background: True if found."""
        dets = self._regions(item)
        if not dets:
            return False
        item.detections = dets
        item.quality["ground_mode"] = "colour-regions"
        return True

    def _regions(self, item: Item) -> list[Detection]:
        """Detections of :func:`_caption_regions`, edges at half coverage, back to front."""
        p: ContrastParams = self.params
        if not p.caption_regions:
            return []
        found = _caption_regions(item.image, item.phrases, p)
        if not found:
            return []
        masks = [m for m, _ph in found]
        halos = [0] * len(masks)
        if p.edge_alpha:
            # No background colour model here: every pixel may be an edge mix (huge distance).
            far = np.full(masks[0].shape, 1e3, np.float32)
            masks, halos = self._edge_alpha(item.image, far, masks)
            if not all(m.any() for m in masks):
                return []
        ranks = _depth_order(masks)
        dets = []
        for mask, (_m, phrase), rank, halo in zip(masks, found, ranks, halos, strict=True):
            extra = {"candidate": EXACT, "depth": rank, "colour": colour_of(phrase) or ""}
            if halo:
                extra["halo_px"] = halo
            dets.append(Detection(phrase=phrase, box=_box(mask), score=1.0, mask=_u8(mask),
                                  caption=with_article(phrase), extra=extra))
        return sorted(dets, key=lambda d: d.extra["depth"])

    def photo(self, item: Item, dist: np.ndarray, share: float) -> None:
        """The photo fallback: one object, the most distinct region (GrabCut refines it)."""
        p: ContrastParams = self.params
        image = item.image
        h, w = image.shape[:2]
        if p.fallback and share < p.fallback_min_share:
            # The border's colours are (nearly) everywhere: the subject fills the frame or
            # there is none; a "most distinct" blob would be a part of it, or noise.
            item.reject(self.stage, f"no foreground found (only {share:.1%} of the image differs "
                                    "from the border colours)")
            return
        if p.fallback:
            # At a fixed working size (<= 256 px) so the choice does not drift with image size.
            scale = min(1.0, 256 / max(h, w))
            if scale < 1:
                sw, sh = max(8, round(w * scale)), max(8, round(h * scale))
                small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
                region = self._most_distinct(BorderModel(small, p).distance(small), sh, sw)
                if region is not None:
                    up = cv2.resize(region[0].astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
                    region = (up > 0, region[1])
            else:
                region = self._most_distinct(dist, h, w)
            if region is not None:
                mask, contrast = region
                phrase = item.phrases[0] if item.phrases else "object"
                item.quality["ground_mode"] = "fallback"
                item.detections = [Detection(phrase=phrase, box=_box(mask), score=round(contrast, 4),
                                             mask=_u8(mask), caption=with_article(phrase),
                                             extra={"candidate": ROUGH, "depth": 0})]
                return
        item.reject(self.stage, "no foreground found" if share == 0 or not p.fallback
                    else "no foreground found (no compact objects and no distinct region)")

    def _emit_compact(self, item: Item, dist: np.ndarray, cand: np.ndarray, share: float) -> bool:
        """If the candidates are a few compact objects, write them as detections: True."""
        p: ContrastParams = self.params
        if not 0 < share <= p.max_candidate_share:
            return False
        objects = self._split(item.image, cand, dist, item.phrases)
        explained = sum(int(m.sum()) for m, _ph, _c in objects) / max(int(cand.sum()), 1)
        if not (0 < len(objects) <= p.max_objects and explained >= p.min_explained
                and all(_roughness(m) <= p.max_roughness for m, _ph, _c in objects)):
            return False
        item.quality["ground_mode"] = "colour"
        ranks = _depth_order([m for m, _ph, _c in objects])
        if p.edge_px > 0:
            # Mixed edge pixels (anti-aliasing, resampling) are neither object colour nor
            # background: they join the object they border, so the layer keeps them (exact
            # recomposition) and the background gets no ghost outline. Hard edges have none.
            taken = np.zeros(cand.shape, bool)
            for m, _ph, _c in objects:
                taken |= m
            k = _disk(p.edge_px)
            for m, _ph, _c in objects:
                edge = (cv2.dilate(m.astype(np.uint8), k) > 0) & ~taken & (dist > p.edge_tolerance)
                m |= edge
                taken |= edge
        halos = [0] * len(objects)
        if p.edge_alpha:
            masks, halos = self._edge_alpha(item.image, dist, [m for m, _ph, _c in objects])
            if not all(m.any() for m in masks):
                return False
            objects = [(m, ph, c) for m, (_m, ph, c) in zip(masks, objects, strict=True)]
        dets = []
        for (mask, phrase, colour), rank, halo in zip(objects, ranks, halos, strict=True):
            score = float(np.clip(dist[mask].mean() / (2 * p.tolerance), 0, 1))
            extra = {"candidate": EXACT, "depth": rank, "colour": colour}
            if halo:
                extra["halo_px"] = halo  # the inpainter grows this hole at least this much
            dets.append(Detection(phrase=phrase, box=_box(mask), score=round(score, 4),
                                  mask=_u8(mask), caption=with_article(phrase), extra=extra))
        item.detections = sorted(dets, key=lambda d: d.extra["depth"])
        return True

    def _edge_alpha(self, image: np.ndarray, dist: np.ndarray,
                    masks: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
        """Masks whose edge follows where the object covers half of each pixel, and per mask
        the width (px) of its faint outer edge (the halo).

        An edge pixel of an anti-aliased or blurred outline mixes the object's colour (that of
        its nearest interior pixel) with the colour beyond (the nearest pixel clear of the edge:
        background or another object); the mixing weight is the object's coverage, alpha.
        Pixels within ``edge_px + 1`` of the outline belong to the object where alpha >= 0.5
        (the truth of a binary layer); a pixel of a background colour is background. Pixels
        just outside with alpha above ``halo_alpha`` are the halo: the hole must cover them, or
        a faint outline of the object stays in the background. Hard edges are unchanged.
        """
        p: ContrastParams = self.params
        h, w = dist.shape
        r = p.edge_px + 1
        wide = max(r + 1, round(p.edge_band_frac * min(h, w)))
        kr = _disk(r)
        union = np.zeros((h, w), bool)
        for m in masks:
            union |= m
        eroded = [cv2.erode(m.astype(np.uint8), kr) > 0 for m in masks]
        clear = ~(cv2.dilate(union.astype(np.uint8), kr) > 0)
        img = image.astype(np.float32)
        alphas: list[np.ndarray | None] = []
        for k, m in enumerate(masks):
            ys, xs = np.nonzero(m)
            pad = wide + r + 2
            y0, x0 = max(0, ys.min() - pad), max(0, xs.min() - pad)
            y1, x1 = min(h, ys.max() + pad + 1), min(w, xs.max() + pad + 1)
            inner = eroded[k][y0:y1, x0:x1]
            if not inner.any():
                inner = m[y0:y1, x0:x1]
            other = clear[y0:y1, x0:x1].copy()
            for j, e in enumerate(eroded):
                if j != k:
                    other |= e[y0:y1, x0:x1]
            if not other.any():
                alphas.append(None)
                continue
            x = img[y0:y1, x0:x1]
            ii = ndimage.distance_transform_edt(~inner, return_distances=False, return_indices=True)
            oi = ndimage.distance_transform_edt(~other, return_distances=False, return_indices=True)
            c, b = x[ii[0], ii[1]], x[oi[0], oi[1]]
            cb = c - b
            den = (cb * cb).sum(-1)
            a = np.clip(((x - b) * cb).sum(-1) / np.maximum(den, 1e-6), 0, 1)
            keep = den < p.edge_tolerance**2  # no contrast to tell by: membership as it was
            a = np.where(keep, m[y0:y1, x0:x1].astype(np.float32), a)
            a[(dist[y0:y1, x0:x1] <= p.edge_tolerance) & ~inner] = 0.0  # a background colour
            full = np.zeros((h, w), np.float32)
            full[y0:y1, x0:x1] = a
            full[eroded[k]] = 1.0
            alphas.append(full)
        out = []
        for k, m in enumerate(masks):
            if alphas[k] is None:
                out.append(m)
                continue
            zone = (cv2.dilate(m.astype(np.uint8), kr) > 0) & ~eroded[k]
            out.append(eroded[k] | (zone & (alphas[k] >= 0.5)))
        # A pixel two objects claim goes to the one covering more of it.
        for k in range(len(out)):
            for j in range(k + 1, len(out)):
                both = out[k] & out[j]
                if both.any() and alphas[k] is not None and alphas[j] is not None:
                    to_k = both & (alphas[k] >= alphas[j])
                    out[j] &= ~to_k
                    out[k] &= ~(both & ~to_k)
        taken = np.zeros((h, w), bool)
        for m in out:
            taken |= m
        halos = []
        for k, m in enumerate(out):
            if alphas[k] is None or not m.any():
                halos.append(0)
                continue
            d = cv2.distanceTransform((~m).astype(np.uint8), cv2.DIST_L2, 3)
            faint = ~taken & (d <= wide) & (alphas[k] > p.halo_alpha)
            halos.append(int(math.ceil(float(d[faint].max()))) if faint.any() else 0)
        return out, halos

    def _split(self, image: np.ndarray, cand: np.ndarray, dist: np.ndarray,
               phrases: list[str]) -> list[tuple[np.ndarray, str, str]]:
        """Candidate pixels split by colour into (mask, phrase, colour name) objects.

        The image's own dominant colours make the clusters (a caption's colour words are
        ranges, not values, so they name clusters instead of seeding them); a cluster holding
        two near colours that meet along a sharp edge is split there (:meth:`_split_near`).
        Caption phrases are then given to the objects jointly, each colour word to the object
        it describes best (:func:`colour_fit`), larger objects first on ties.
        """
        p: ContrastParams = self.params
        h, w = cand.shape
        min_area = max(p.min_part_px, int(p.min_object_share * h * w))
        ys, xs = np.nonzero(cand)
        pixels = image[ys, xs]
        modes = _colour_modes(pixels, p.colour_radius, min_area, p.max_objects)
        coloured = [(ph, c) for ph in phrases if (c := colour_of(ph)) is not None]
        # A colour word of the caption that no dominant colour fits (its object is small, or
        # blurred over many shades): the candidate pixels its range holds seed a cluster.
        words = sorted({c for _ph, c in coloured})
        if words:
            from scipy.optimize import linear_sum_assignment

            missing = set(words)
            if modes:  # the words the dominant colours answer, jointly
                have = colour_fit(np.stack(modes))
                cost = np.stack([have[w] for w in words])
                for r, c in zip(*linear_sum_assignment(cost), strict=True):
                    if cost[r, c] < COLOUR_FIT_MAX:
                        missing.discard(words[r])
            fits = colour_fit(pixels)
            best = np.min(np.stack([fits[w] for w in words]), 0)
            for word in sorted(missing):
                # Pixels this word describes, and better than any other word of the caption.
                sel = (fits[word] < COLOUR_FIT_MAX) & (fits[word] <= best)
                if sel.sum() >= min_area // 2:
                    modes.append(np.median(pixels[sel], 0).astype(np.float32))
        if not modes:
            return []
        labels, centres = _clusters(pixels, modes, p.colour_radius)
        masks: list[np.ndarray] = []
        for k in np.argsort([-(labels == k).sum() for k in range(len(centres))]):
            sel = labels == k
            if sel.sum() < min_area:
                continue
            mask = np.zeros((h, w), bool)
            mask[ys[sel], xs[sel]] = True
            n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
            keep = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= p.min_part_px]
            mask = np.isin(lab, keep)
            if mask.sum() >= min_area:
                masks += self._split_near(image, mask, min_area, p.split_depth)
        if len(masks) > 2 * p.max_objects:
            return []  # clutter, not objects (the caller's count test rejects it)
        colours = [np.array(cv2.mean(image, m.astype(np.uint8))[:3]) for m in masks]
        colourless = [ph for ph in phrases if colour_of(ph) is None]
        names: list[str | None] = [None] * len(masks)
        if coloured and masks:
            from scipy.optimize import linear_sum_assignment

            fits = colour_fit(np.stack(colours))
            areas = np.array([m.sum() for m in masks], np.float64)
            cost = np.stack([np.minimum(fits[c], 10.0) for _ph, c in coloured])  # (phrases, objects)
            cost = cost + 0.5 * (1 - np.sqrt(areas / areas.max()))[None]
            rows, cols = linear_sum_assignment(cost)
            for r, c in zip(rows, cols, strict=True):
                if fits[coloured[r][1]][c] <= p.max_colour_misfit:
                    names[c] = coloured[r][0]
        objects: list[tuple[np.ndarray, str, str]] = []
        used = {n for n in names if n is not None}
        for mask, colour, name in zip(masks, colours, names, strict=True):
            word = colour_name(colour)
            if name is None:
                name = next((ph for ph in colourless if ph not in used), f"{word} object")
                used.add(name)
            else:
                word = colour_of(name) or word
            objects.append((mask, name, word))
        return self._absorb_edges(image, cand, dist, objects, [n is not None for n in names],
                                  bool(coloured))

    def _split_near(self, image: np.ndarray, mask: np.ndarray, min_area: int, depth: int) -> list[np.ndarray]:
        """One colour cluster as one or more objects: two near colours (farther apart than
        ``split_min_distance``) are two objects when they meet along a short, sharp edge (a
        colour step between neighbouring pixels, not shading or texture). Recursive to ``depth``."""
        p: ContrastParams = self.params
        ys, xs = np.nonzero(mask)
        if depth <= 0 or len(ys) < 2 * min_area:
            return [mask]
        x = image[ys, xs].astype(np.float32)
        xc = x - x.mean(0)
        _u, _s, vt = np.linalg.svd(xc[:: max(1, len(xc) // 4000)], full_matrices=False)
        proj = xc @ vt[0]
        lo, hi = np.percentile(proj, (10, 90))
        c = np.stack([x[proj <= lo].mean(0), x[proj >= hi].mean(0)])
        for _ in range(6):  # 2-means
            lab = np.linalg.norm(x - c[1], axis=1) < np.linalg.norm(x - c[0], axis=1)
            if lab.all() or not lab.any():
                return [mask]
            c = np.stack([x[~lab].mean(0), x[lab].mean(0)])
        gap = float(np.linalg.norm(c[0] - c[1]))
        if gap < p.split_min_distance:
            return [mask]
        a = np.zeros_like(mask)
        b = np.zeros_like(mask)
        a[ys[~lab], xs[~lab]] = True
        b[ys[lab], xs[lab]] = True
        area = min(int(a.sum()), int(b.sum()))
        if area < min_area:
            return [mask]
        img = image.astype(np.float32)
        across_h = (a[:, :-1] & b[:, 1:]) | (b[:, :-1] & a[:, 1:])
        across_v = (a[:-1] & b[1:]) | (b[:-1] & a[1:])
        pairs = int(across_h.sum() + across_v.sum())
        if pairs > p.split_max_boundary * math.sqrt(area):
            return [mask]  # a long, ragged border: texture, not two objects
        # (No shared border at all: two apart objects of near colours.)
        jumps = np.concatenate([np.linalg.norm(img[:, :-1] - img[:, 1:], axis=2)[across_h],
                                np.linalg.norm(img[:-1] - img[1:], axis=2)[across_v]])
        if len(jumps) and float(np.median(jumps)) < p.split_edge_jump * gap:
            return [mask]  # shading: neighbours change gradually across the split
        return self._split_near(image, a, min_area, depth - 1) + self._split_near(image, b, min_area, depth - 1)

    def _absorb_edges(self, image: np.ndarray, cand: np.ndarray, dist: np.ndarray,
                      objects: list[tuple[np.ndarray, str, str]], named: list[bool],
                      caption_colours: bool) -> list[tuple[np.ndarray, str, str]]:
        """Blurred edges join the object they belong to instead of being objects or left over.

        A JPEG or resampled image has, around each object, a band of colours between the
        object's and its neighbour's (with ringing beyond both); colour clustering makes
        spurious thin "ring" objects of it, or leaves it unexplained. An object (largest first)
        whose pixels lie nearly all within a thin band along the other objects' outlines is
        their edge when, the caption naming colours, its own colour is not named, or else when
        its colours are mixes of the nearest object's and a neighbour's (and are told better
        so than by its own flat colour). So is such a separate piece of a kept object (edge
        colours close to a named colour), when its colours are such mixes. These pixels, and
        the unclustered candidate pixels in such bands whose colours are mixes (and no object's
        own), join the nearest kept object. Hard-edged images have no mixed colours: nothing
        changes there.
        """
        p: ContrastParams = self.params
        taken = np.zeros(cand.shape, bool)
        for m, _ph, _c in objects:
            taken |= m
        give = cand & ~taken  # unclustered candidates
        if not objects or (len(objects) == 1 and not give.any()):
            return objects
        h, w = cand.shape
        band = max(p.edge_px + 1, round(p.edge_band_frac * min(h, w)))
        far = np.float32(4 * band)  # distances are clipped to this

        def near(m: np.ndarray) -> np.ndarray:
            """Distance to the mask, computed only around it (cheap on big images)."""
            ys, xs = np.nonzero(m)
            out = np.full((h, w), far, np.float32)
            if not len(ys):
                return out
            y0, x0 = max(0, ys.min() - 4 * band), max(0, xs.min() - 4 * band)
            y1, x1 = min(h, ys.max() + 4 * band + 1), min(w, xs.max() + 4 * band + 1)
            out[y0:y1, x0:x1] = np.minimum(cv2.distanceTransform(
                (~m[y0:y1, x0:x1]).astype(np.uint8), cv2.DIST_L2, 3), far)
            return out

        masks = [m for m, _ph, _c in objects]
        pieces = [cv2.connectedComponents(m.astype(np.uint8), connectivity=8) for m in masks]
        if not give.any() and all(n < 3 for n, _lab in pieces) and all(named):
            return objects  # hard edges: nothing to do
        dists = {k: near(m) for k, m in enumerate(masks)}
        colours = {k: np.array(cv2.mean(image, m.astype(np.uint8))[:3], np.float32)
                   for k, m in enumerate(masks)}

        def is_edge(piece: np.ndarray, own: np.ndarray, others: list[int], by_caption: bool) -> bool:
            ys, xs = np.nonzero(piece)
            d = np.stack([dists[j][ys, xs] for j in others])
            if (d.min(0) <= band).mean() < p.edge_band_share:
                return False
            if by_caption:
                return True
            # Mixes, and better told as mixes than as the flat colour ``own`` (a hard-edged
            # sliver of a real object is its own colour exactly).
            mix = float(np.median(self._mixes(image, dist, [colours[j] for j in others],
                                              d.argmin(0), ys, xs, band)))
            flat = float(np.median(np.linalg.norm((image[ys, xs] - own) @ _YCC.T, axis=1)))
            return mix <= p.mix_tolerance and mix < 0.5 * flat

        kept = list(range(len(objects)))
        for k in sorted(kept, key=lambda k: -int(masks[k].sum())):
            others = [j for j in kept if j != k]
            if others and not named[k] and is_edge(masks[k], colours[k], others, caption_colours):
                give = give | masks[k]
                kept.remove(k)
        for k in kept if len(kept) > 1 else []:
            n, lab = pieces[k]
            if n < 3:
                continue  # one piece: the object itself
            others = [j for j in kept if j != k]
            edge = [piece for i in range(1, n)
                    if is_edge(piece := lab == i, colours[k], others, False)]
            if len(edge) < n - 1:  # never all of it
                for piece in edge:
                    masks[k] = masks[k] & ~piece
                    give |= piece
                if edge:
                    dists[k] = near(masks[k])
        if not give.any():
            return objects
        ys, xs = np.nonzero(give)
        d = np.stack([dists[k][ys, xs] for k in kept])
        owner, closest = d.argmin(0), d.min(0)
        # Edge pieces come whole (their few pixels past the band too); loose pixels in the band
        # when their colours are mixes (in photos they are often other things: chrome, shadow).
        whole = taken[ys, xs]  # from edge objects and pieces
        ok = (closest <= band) | (whole & (closest <= 2 * band))
        out = []
        for i, k in sorted(enumerate(kept), key=lambda ik: ik[1]):
            m = masks[k].copy()
            test = ok & ~whole & (owner == i)
            if test.any():
                mix = self._mixes(image, dist, [colours[j] for j in kept], owner[test],
                                  ys[test], xs[test], band)
                # Not an object's own colour (a speck dropped from it: the edge join's business).
                flat = np.min([np.linalg.norm((image[ys[test], xs[test]] - colours[j]) @ _YCC.T, axis=1)
                               for j in kept], axis=0)
                ok[test] = (mix <= p.mix_tolerance) & (mix < 0.5 * flat)
            sel = ok & (owner == i)
            m[ys[sel], xs[sel]] = True
            out.append((m, objects[k][1], objects[k][2]))
        return out

    def _mixes(self, image: np.ndarray, dist: np.ndarray, colours: list[np.ndarray],
               owner: np.ndarray, ys: np.ndarray, xs: np.ndarray, band: int) -> np.ndarray:
        """Distance (YCbCr) of each of these pixels' colours to the nearest mix (overshoot allowed)
        of their owner's colour (``colours[owner]``) and a neighbour's: a clear background colour
        found near them (several on a textured background) or another owner's colour."""
        h, w = dist.shape
        r = 2 * band
        y0, x0 = max(0, ys.min() - r), max(0, xs.min() - r)
        y1, x1 = min(h, ys.max() + r + 1), min(w, xs.max() + r + 1)
        near = np.zeros((y1 - y0, x1 - x0), np.uint8)
        near[ys - y0, xs - x0] = 1
        near = cv2.dilate(near, np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0
        around = near & (dist[y0:y1, x0:x1] <= self.params.edge_tolerance)
        ends = list(colours)
        if around.any():  # the commonest clear background colours near the pixels (up to 6)
            bg = image[y0:y1, x0:x1][around]
            q = (bg // 16).astype(np.int32)
            idx = (q[:, 0] * 16 + q[:, 1]) * 16 + q[:, 2]
            counts = np.bincount(idx, minlength=4096)
            top = np.argsort(-counts)[:6]
            top = top[counts[top] > 0]
            sums = np.stack([np.bincount(idx, bg[:, c].astype(np.float64), minlength=4096)[top]
                             for c in range(3)], 1)
            ends += list((sums / counts[top, None]).astype(np.float32))
        # In luma/chroma: JPEG blurs chroma more than luma (subsampling), so an edge pixel mixes
        # the two ends with one weight in luma and another in chroma.
        x = image[ys, xs].astype(np.float32) @ _YCC.T
        a = np.stack(colours)[owner] @ _YCC.T
        best = np.full(len(x), np.inf, np.float32)
        for end in ends:
            b = np.asarray(end, np.float32) @ _YCC.T
            res = np.zeros(len(x), np.float32)
            for ch in (slice(0, 1), slice(1, 3)):
                ab, xb = a[:, ch] - b[ch], x[:, ch] - b[ch]
                t = np.clip((xb * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-6), -0.25, 1.25)
                res += ((xb - t[:, None] * ab) ** 2).sum(1)
            best = np.minimum(best, np.sqrt(res))
        return best

    def _most_distinct(self, dist: np.ndarray, h: int, w: int) -> tuple[np.ndarray, float] | None:
        """The photo fallback: the region that stands out most from the border's colours."""
        p: ContrastParams = self.params
        sigma = max(1.0, min(h, w) / 64)
        d = cv2.GaussianBlur(np.minimum(dist, 3 * p.tolerance), (0, 0), sigma)
        d8 = np.clip(d * (255.0 / (3 * p.tolerance)), 0, 255).astype(np.uint8)
        if d8.max() == 0:
            return None
        _t, binary = cv2.threshold(d8, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        k = _disk(max(1, round(min(h, w) / 96)))
        binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, k)
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, k)
        n, lab, stats, cents = cv2.connectedComponentsWithStats(binary, connectivity=8)
        best, best_score = 0, 0.0
        for i in range(1, n):
            area = stats[i, cv2.CC_STAT_AREA]
            if area < p.fallback_min_share * h * w:
                continue
            cx, cy = cents[i][0] / w - 0.5, cents[i][1] / h - 0.5
            centrality = math.exp(-(cx * cx + cy * cy) / (2 * 0.3**2))  # photos centre subjects
            score = float(d[lab == i].sum()) * centrality
            if score > best_score:
                best, best_score = i, score
        if best == 0:
            return None
        mask = ndimage.binary_fill_holes(lab == best)
        contrast = float(d[mask].mean() / p.tolerance)
        if contrast < p.fallback_min_contrast:
            return None
        return mask, contrast


# -- segment ---------------------------------------------------------------------------------
def edge_ratio(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean gradient magnitude along a mask's outline over the image's mean gradient.

    A mask that outlines a real object sits on strong edges (ratio well above 2); a blob cut
    out of texture does not (~1-2). Measured at a fixed 256 px working size, so the ratio does
    not drift with the image size.
    """
    scale = 256 / max(image.shape[:2])
    if scale < 1:
        size = (max(8, round(image.shape[1] * scale)), max(8, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    g = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 1.0)
    mag = np.sqrt((cv2.Sobel(g, cv2.CV_32F, 1, 0) ** 2 + cv2.Sobel(g, cv2.CV_32F, 0, 1) ** 2).sum(2))
    m = mask.astype(np.uint8)
    k = np.ones((3, 3), np.uint8)
    outline = cv2.dilate(m, k) != cv2.erode(m, k)
    if not outline.any():
        return 0.0
    return float(mag[outline].mean() / max(float(mag.mean()), 1e-6))


@dataclass
class GrabCutParams(SoftAlphaParams):
    """Settings of the GrabCut segmenter (and the soft-alpha ones every segmenter has)."""

    iterations: int = 5  # GrabCut iterations for boxes without an exact candidate
    refine_exact: bool = False  # also run GrabCut on exact colour-model candidates (measured:
    # it adds nothing there and costs time; the band below limits what it may change)
    exact_band_px: int = 2  # with refine_exact: GrabCut decides only this close to the edge
    margin: float = 0.15  # context around the box given to GrabCut, share of the box side
    work_size: int = 256  # GrabCut runs on the image scaled so its longer side is at most this
    # (speed, and the same result whatever the image size)
    min_keep: float = 0.3  # with refine_exact: a result smaller than this share of the exact
    # candidate is a GrabCut failure (the candidate is kept instead)
    min_rough_share: float = 0.01  # photo fallback: a smaller mask is no object layer, reject
    min_edge_ratio: float = 2.5  # photo fallback: mean gradient along the mask outline over the
    # image's mean gradient; below it the outline follows no object edge (measured on the
    # bundled photos: kept astronaut 3.5, rocket 6.4, coffee 6.9; noise blobs 1.7-2.2), reject


@register
class GrabCutSegment(Segmenter):
    """OpenCV GrabCut per box, seeded with the grounder's candidate mask when there is one."""

    name = "grabcut"
    Params = GrabCutParams

    def process(self, items: list[Item]) -> None:
        for item in items:
            claimed = np.zeros(item.image.shape[:2], bool)
            for det in item.detections:
                if det.extra.get("candidate") == MATTE:
                    continue  # already a soft alpha with its own edges: GrabCut would binarise it
                mask = self.segment(item.image, det)
                det.mask = _u8(mask)
                if det.extra.get("candidate") == ROUGH:
                    if mask.mean() < self.params.min_rough_share:
                        item.reject(self.stage, f"fallback mask too small ({mask.mean():.2%} of the image)")
                        break
                    ratio = edge_ratio(item.image, mask)
                    det.extra["edge_ratio"] = round(ratio, 3)
                    if ratio < self.params.min_edge_ratio:
                        item.reject(self.stage, f"fallback mask follows no object edge (edge ratio "
                                                f"{ratio:.2f} < {self.params.min_edge_ratio})")
                        break
            if not item.ok:
                continue
            # Visible masks must not overlap: a pixel two refined masks claim stays with the
            # detection whose candidate held it, else with the earlier (further back) one.
            for det in sorted(item.detections, key=lambda d: d.extra.get("candidate") != EXACT):
                m = det.mask > 0
                det.mask = np.where(claimed, 0, det.mask).astype(np.uint8)  # soft alpha stays soft
                claimed |= m
            item.detections = [d for d in item.detections if d.mask.any()]
            if not item.detections:
                item.reject(self.stage, "every mask came out empty")

    def segment(self, image: np.ndarray, det: Detection) -> np.ndarray:
        p: GrabCutParams = self.params
        h, w = image.shape[:2]
        cand = det.mask > 0 if det.mask is not None else None
        exact = det.extra.get("candidate") == EXACT and cand is not None
        if exact and not p.refine_exact:
            return cand
        x0, y0, x1, y1 = (int(round(v)) for v in det.box)
        mx, my = int(p.margin * (x1 - x0)) + 4, int(p.margin * (y1 - y0)) + 4
        cx0, cy0, cx1, cy1 = max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my)
        crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1])
        gc = np.full(crop.shape[:2], cv2.GC_BGD, np.uint8)
        gc[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0] = cv2.GC_PR_BGD
        if cand is not None:
            c = cand[cy0:cy1, cx0:cx1].astype(np.uint8)
            if exact:
                # Only a thin band around the candidate's edge is left to GrabCut.
                k = _disk(p.exact_band_px)
                gc[:] = cv2.GC_BGD
                gc[cv2.dilate(c, k) > 0] = cv2.GC_PR_BGD
                gc[c > 0] = cv2.GC_PR_FGD
                gc[cv2.erode(c, k) > 0] = cv2.GC_FGD
            else:
                gc[c > 0] = cv2.GC_PR_FGD
        else:
            gc[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0] = cv2.GC_PR_FGD
        if gc.shape[0] < 2 or gc.shape[1] < 2 or not (gc % 2 == 1).any() \
                or (np.isin(gc, (cv2.GC_BGD, cv2.GC_PR_BGD))).sum() < 10:
            return cand if cand is not None else np.zeros((h, w), bool)
        scale = min(1.0, p.work_size / max(h, w))
        small, gsmall = crop, gc
        if scale < 1.0:
            size = (max(2, round(crop.shape[1] * scale)), max(2, round(crop.shape[0] * scale)))
            small = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
            gsmall = cv2.resize(gc, size, interpolation=cv2.INTER_NEAREST)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(0)  # GrabCut's GMM init draws from OpenCV's global RNG: reproducible
        try:
            cv2.grabCut(small, gsmall, None, bgd, fgd, p.iterations if not exact else 2,
                        cv2.GC_INIT_WITH_MASK)
        except cv2.error:
            return cand if cand is not None else np.zeros((h, w), bool)
        fg = np.isin(gsmall, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)
        if scale < 1.0:
            fg = cv2.resize(fg, (crop.shape[1], crop.shape[0]), interpolation=cv2.INTER_NEAREST)
        if not exact:
            # One object: its largest blob, holes filled.
            n, lab, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
            if n > 1:
                fg = ndimage.binary_fill_holes(lab == 1 + int(stats[1:, cv2.CC_STAT_AREA].argmax()))
        out = np.zeros((h, w), bool)
        out[cy0:cy1, cx0:cx1] = fg > 0
        if exact and out.sum() < p.min_keep * cand.sum():
            return cand  # GrabCut collapsed on a clean candidate: keep the candidate
        return out  # a rough candidate was only a hint: GrabCut's answer stands (edge-checked)


# -- inpaint ---------------------------------------------------------------------------------
@dataclass
class OpenCVInpaintParams:
    """Settings of the per-hole best-of inpainter."""

    grow_px: int = 2  # holes = masks grown this much (1 px: 49.5 dB, 2 px: 64.5 dB, measured)
    grow_px_rough: int = 5  # for photo-fallback masks, whose edges are soft and less exact
    methods: tuple[str, ...] = ("telea", "ns", "poly", "pattern")
    radius: int = 3  # Telea / Navier-Stokes neighbourhood
    band_px: int = 3  # validation: this band of known pixels around a hole is re-filled
    halo_threshold: float = 0.0  # > 0: band pixels this far (RGB) from the best fill join the
    # hole (no ghost outline of soft mask edges), at the cost of recomposition error there;
    # 0: off. The contrast grounder already gives mixed edge pixels to the objects; on the
    # bundled photos 12.0 cost 0.5-6 dB of recomposition PSNR.
    ring_px: int = 8  # the polynomial is fitted on known pixels this close to the hole
    poly_degree: int = 2
    max_period: float = 0.25  # pattern copy: longest repeat searched, share of the image side
    pattern_shifts: int = 16  # pattern copy: how many of the best repeat vectors to use


def _poly_terms(x: np.ndarray, y: np.ndarray, degree: int) -> np.ndarray:
    return np.stack([x**i * y**j for i in range(degree + 1) for j in range(degree + 1 - i)], axis=1)


class _Filler:
    """The candidate fills of one image; each fills ``hole`` from pixels where ``known``."""

    def __init__(self, image: np.ndarray, holes: np.ndarray, p: OpenCVInpaintParams) -> None:
        self.image, self.p = image, p
        self.h, self.w = image.shape[:2]
        self._shifts: list[tuple[int, int]] | None = None
        self._holes = holes

    def fill(self, method: str, hole: np.ndarray, known: np.ndarray,
             window: tuple[int, int, int, int]) -> np.ndarray:
        """Values (N, 3) float for the pixels of ``hole`` (in np.nonzero order)."""
        if method in ("telea", "ns"):
            y0, x0, y1, x1 = window
            crop = np.ascontiguousarray(self.image[y0:y1, x0:x1])
            # Unknown pixels outside this hole (other holes) must not feed the fill either;
            # OpenCV fills the whole mask, we read back only this hole's pixels.
            m = (~known[y0:y1, x0:x1]).astype(np.uint8) * 255
            flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
            out = cv2.inpaint(crop, m, self.p.radius, flag)
            ys, xs = np.nonzero(hole[y0:y1, x0:x1])
            return out[ys, xs].astype(np.float64)
        if method == "poly":
            return self._poly(hole, known)
        if method == "pattern":
            return self._pattern(hole, known)
        raise ValueError(f"unknown inpaint method {method!r}")

    def _poly(self, hole: np.ndarray, known: np.ndarray) -> np.ndarray:
        k = _disk(self.p.ring_px)
        ring = (cv2.dilate(hole.astype(np.uint8), k) > 0) & known
        ys, xs = np.nonzero(hole)
        ry, rx = np.nonzero(ring)
        if len(ry) < 12:
            return np.repeat(self.image[known].mean(0, keepdims=True), len(ys), 0)
        if len(ry) > 4000:  # plenty for six coefficients; keeps lstsq cheap on big holes
            ry, rx = ry[:: len(ry) // 4000 + 1], rx[:: len(rx) // 4000 + 1]
        cy, cx, s = ys.mean(), xs.mean(), max(self.h, self.w) / 4
        deg = self.p.poly_degree if len(ry) > 60 else 1
        a = _poly_terms((rx - cx) / s, (ry - cy) / s, deg)
        coef, *_ = np.linalg.lstsq(a, self.image[ry, rx].astype(np.float64), rcond=None)
        return _poly_terms((xs - cx) / s, (ys - cy) / s, deg) @ coef

    def shifts(self) -> list[tuple[int, int]]:
        """The image's best repeat vectors (dy, dx), from masked autocorrelation via FFT.

        err(d) = mean over pixel pairs (p, p+d) both known of |I(p) - I(p+d)|^2, computed for
        every shift at once from correlations of the known mask and the image.
        """
        if self._shifts is not None:
            return self._shifts
        known = (~self._holes).astype(np.float64)
        img = self.image.astype(np.float64)
        img = img - img[known > 0].mean(0)
        m = max(2, int(self.p.max_period * min(self.h, self.w)))
        shape = (self.h + m, self.w + m)
        f = np.fft.rfft2
        fk = f(known, shape)
        sq = (img * img).sum(2) * known
        fsq = f(sq, shape)
        cross = sum(np.abs(f(img[..., c] * known, shape)) ** 2 for c in range(3))
        # corr(a, b)(d) = sum_p a(p) b(p + d) = irfft(conj(F a) F b)
        num = np.fft.irfft2(np.conj(fsq) * fk + np.conj(fk) * fsq - 2 * cross, shape)
        cnt = np.fft.irfft2(np.conj(fk) * fk, shape)
        dy = np.r_[0:m + 1, -m:0]
        dx = np.r_[0:m + 1, -m:0]
        num = num[np.ix_(dy % shape[0], dx % shape[1])]
        cnt = cnt[np.ix_(dy % shape[0], dx % shape[1])]
        err = np.where(cnt > 0.3 * cnt[0, 0], num / np.maximum(cnt, 1) / 3, np.inf)
        err[0, 0] = np.inf
        best = float(err.min())
        # Every shift as good as the best one (a whole lattice for a clean pattern), nearest
        # first: the closest copy is the most likely to be right.
        iy, ix = np.nonzero(err <= best + max(1.0, 0.25 * best))
        order = np.argsort(dy[iy] ** 2 + dx[ix] ** 2, kind="stable")[: self.p.pattern_shifts]
        keep = [(int(dy[iy[i]]), int(dx[ix[i]])) for i in order]
        self._shifts = keep
        return keep

    def _pattern(self, hole: np.ndarray, known: np.ndarray) -> np.ndarray:
        ys, xs = np.nonzero(hole)
        out = np.full((len(ys), 3), np.nan)
        left = np.arange(len(ys))  # pixels still without a source
        steps = []
        span = max(np.ptp(ys), np.ptp(xs)) + 2
        for dy, dx in self.shifts():
            norm = math.hypot(dy, dx)
            steps += [(k * norm, k * dy, k * dx) for k in range(1, int(span / norm) + 2)]
        for _n, dy, dx in sorted(steps):
            sy, sx = ys[left] + dy, xs[left] + dx
            ok = (sy >= 0) & (sy < self.h) & (sx >= 0) & (sx < self.w)
            ok[ok] = known[sy[ok], sx[ok]]
            if ok.any():
                out[left[ok]] = self.image[sy[ok], sx[ok]]
                left = left[~ok]
                if not len(left):
                    break
        if len(left):  # no repeat reaches these pixels: borrow the smooth fit
            out[left] = self._poly(hole, known)[left]
        return out


@register
class OpenCVInpaint(Stage):
    """Per hole, the OpenCV / classical fill that best rebuilds the known background around it."""

    stage = "inpaint"
    name = "opencv"
    Params = OpenCVInpaintParams

    def process(self, items: list[Item]) -> None:
        for item in items:
            self.inpaint(item)

    def inpaint(self, item: Item) -> None:
        p: OpenCVInpaintParams = self.params
        image = item.image
        h, w = image.shape[:2]
        holes = np.zeros((h, w), bool)
        for det in item.detections:
            if det.mask is None:
                continue
            grow = p.grow_px_rough if det.extra.get("candidate") == ROUGH else p.grow_px
            grow = max(grow, int(det.extra.get("halo_px", 0)))  # a blurred outline's faint edge
            m = (det.mask > 0).astype(np.uint8)
            holes |= (cv2.dilate(m, _disk(grow)) > 0) if grow > 0 else m > 0
        background = image.copy()
        if not holes.any():
            item.background = background
            return
        filler = _Filler(image, holes, p)
        n, lab = cv2.connectedComponents(holes.astype(np.uint8), connectivity=8)
        chosen: list[str] = []
        sq_err, count = 0.0, 0
        halo_px = 0
        for i in range(1, n):
            hole = lab == i
            method, mse, halo = self._choose(filler, hole, holes)
            if p.halo_threshold <= 0:
                halo = None
            if halo is not None:
                # Edge pixels that match neither the object nor the rebuilt background (an
                # anti-aliased or resampled outline) join the hole: no ghost outline remains.
                hole |= halo
                holes |= halo
                halo_px += int(halo.sum())
            known = ~holes
            window = self._window(hole, h, w)
            ys, xs = np.nonzero(hole)
            background[ys, xs] = np.clip(np.rint(filler.fill(method, hole, known, window)), 0, 255)
            chosen.append(method)
            sq_err += mse * len(ys)
            count += len(ys)
        item.background = background
        item.quality["inpaint_methods"] = chosen
        mse = sq_err / max(count, 1)
        # The validation error on the band around each hole, as a PSNR: an estimate of the
        # quality inside the holes (exact backgrounds come only with generated scenes).
        item.quality["hole_psnr_estimate"] = round(min(100.0, 10 * math.log10(255**2 / mse))
                                                   if mse > 0 else 100.0, 2)
        item.quality["hole_share"] = round(float(holes.mean()), 4)
        item.quality["halo_px"] = halo_px

    def _window(self, hole: np.ndarray, h: int, w: int) -> tuple[int, int, int, int]:
        ys, xs = np.nonzero(hole)
        pad = 3 * self.params.radius + self.params.band_px + 8
        return (max(0, ys.min() - pad), max(0, xs.min() - pad),
                min(h, ys.max() + pad + 1), min(w, xs.max() + pad + 1))

    def _choose(self, filler: _Filler, hole: np.ndarray,
                holes: np.ndarray) -> tuple[str, float, np.ndarray | None]:
        """The method that best re-fills a band of known pixels around the hole, its MSE there
        (halo excluded), and the halo: band pixels far from that method's fill, or None."""
        p: OpenCVInpaintParams = self.params
        band = (cv2.dilate(hole.astype(np.uint8), _disk(p.band_px)) > 0) & ~holes
        if band.sum() < 8 or len(p.methods) == 1:
            return p.methods[0], 0.0, None
        test_hole = hole | band
        known = ~(holes | band)
        window = self._window(test_hole, *hole.shape)
        ys, xs = np.nonzero(test_hole)
        in_band = band[ys, xs]
        truth = filler.image[ys, xs][in_band].astype(np.float64)
        best, best_mse, best_err = p.methods[0], float("inf"), np.zeros(0)
        for method in p.methods:
            vals = filler.fill(method, test_hole, known, window)
            err = ((np.clip(np.rint(vals[in_band]), 0, 255) - truth) ** 2).sum(1)
            mse = float(err.mean() / 3)
            if mse < best_mse - 1e-9:
                best, best_mse, best_err = method, mse, err
        # Halo: farther from the fill than both a fixed floor and 3x the band's typical error.
        far = np.sqrt(best_err) > max(p.halo_threshold, 3.0 * math.sqrt(3.0 * float(np.median(best_err))))
        if not far.any():
            return best, best_mse, None
        halo = np.zeros_like(hole)
        halo[ys[in_band][far], xs[in_band][far]] = True
        rest = best_err[~far]
        return best, float(rest.mean() / 3) if len(rest) else best_mse, halo
