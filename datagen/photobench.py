"""Photo quality of the CPU default: the classical photo path against the matting model, side by side.

``python -m datagen.photobench [--n-composites 12] [--json OUT] [--sheet docs/photo_preview.jpg]``

Two kinds of input, all real photographs (files shipped with scikit-image and matplotlib):

- **photos**: the bundled photos the project tunes on (``datagen.sources.DEMO_PHOTOS`` and
  ``datagen.score.EXTRA_PHOTOS``), photos it has never used (:data:`UNSEEN_PHOTOS`) and object-less
  textures (:data:`NO_OBJECT_PHOTOS`, where a rejection is the right answer). No truth: reported
  are acceptance, layers, whether each layer is one object (:func:`one_object`), the phrases.
- **composites** (:func:`make_composite`): a known alpha shape (the horse silhouette of
  ``skimage.data.horse``, an oval, a rounded square, a star; anti-aliased, some feathered) cut
  from one real photo and laid over another. True alpha, layer colours and background are known,
  so: alpha soft IoU, RGB L1 of the layer (premultiplied, 0-255), object found (soft IoU >= 0.5),
  hole PSNR (the predicted background against the true one where the true alpha > 0).

Both pipelines run in-process with the same decode and caption stages: ``classical`` (ground
``contrast``, blur + Otsu region + GrabCut on photos) and ``matte`` (ground ``matte``, the default).
Seconds per image are wall-clock for caption..assemble, on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from datagen.format import psnr
from datagen.item import Item
from datagen.registry import get_backend
from datagen.stages.base import Stage, StageContext

STAGES = ("caption", "ground", "segment", "inpaint", "assemble")
PIPELINES: dict[str, dict[str, str]] = {
    "classical": {"caption": "sidecar", "ground": "contrast", "segment": "grabcut", "inpaint": "opencv",
                  "assemble": "layers"},
    "matte": {"caption": "sidecar", "ground": "matte", "segment": "grabcut", "inpaint": "opencv",
              "assemble": "layers"},
}
ONE_OBJECT_PART = 0.85  # a layer's largest connected part holds at least this share of its alpha mass
AREA_RANGE = (0.02, 0.85)  # and its area is in this range (share of the image)


def _sample_data(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / name


def _skimage(name: str) -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data" / name


# Real photos the project never tuned on, with the caption a sidecar would give them.
UNSEEN_PHOTOS: dict[str, tuple[str, str]] = {
    "grace_hopper": ("mpl:grace_hopper.jpg", "a woman in a navy uniform in front of a flag"),
    "cameraman": ("camera.png", "a man with a camera on a tripod in a field"),
    "motorcycle_right": ("motorcycle_right.png", "a red motorcycle in a garage"),
    "clock": ("clock_motion.png", "a clock on a grey wall"),
    "cell": ("cell.png", "a cell under a microscope"),
}
# Photos without an object: the right answer is a rejection.
NO_OBJECT_PHOTOS: dict[str, tuple[str, str]] = {
    "grass": ("grass.png", "grass"),
    "gravel": ("gravel.png", "gravel"),
    "brick": ("brick.png", "a brick wall"),
}


def photo_path(ref: str) -> Path:
    return _sample_data(ref[4:]) if ref.startswith("mpl:") else _skimage(ref)


def photo_sets() -> dict[str, dict[str, tuple[Path, str]]]:
    """set name -> photo name -> (file, caption)."""
    from datagen.score import EXTRA_PHOTOS
    from datagen.sources import DEMO_PHOTOS

    return {
        "bundled": {n: (photo_path(f), c) for n, (f, c) in {**DEMO_PHOTOS, **EXTRA_PHOTOS}.items()},
        "unseen": {n: (photo_path(f), c) for n, (f, c) in UNSEEN_PHOTOS.items()},
        "no-object": {n: (photo_path(f), c) for n, (f, c) in NO_OBJECT_PHOTOS.items()},
    }


def one_object(alpha: np.ndarray) -> tuple[float, float]:
    """(share of the alpha mass in the largest 8-connected part of alpha > 0, area share of alpha > 0)."""
    a = alpha.astype(np.float64)
    n, lab = cv2.connectedComponents((alpha > 0).astype(np.uint8), connectivity=8)
    if n < 2:
        return 0.0, 0.0
    mass = np.bincount(lab.ravel(), weights=a.ravel(), minlength=n)[1:]
    return float(mass.max() / max(mass.sum(), 1e-9)), float((alpha > 0).mean())


def is_one_object(alpha: np.ndarray) -> bool:
    part, area = one_object(alpha)
    return part >= ONE_OBJECT_PART and AREA_RANGE[0] <= area <= AREA_RANGE[1]


# -- composites with a known alpha ---------------------------------------------------------------
@dataclass
class Composite:
    name: str
    caption: str
    image: np.ndarray  # uint8 (H, W, 3)
    alpha: np.ndarray  # float (H, W) in [0, 1]
    foreground: np.ndarray  # uint8 (H, W, 3), the layer's straight colours
    background: np.ndarray  # uint8 (H, W, 3)


def _square(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    s = min(h, w)
    crop = image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if crop.ndim == 2:
        crop = np.repeat(crop[..., None], 3, 2)
    return cv2.resize(np.ascontiguousarray(crop[..., :3]), (size, size), interpolation=cv2.INTER_AREA)


def _shape(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """An anti-aliased alpha (drawn at 4x, area-averaged down) of one shape, 10-35% of the image."""
    big = 4 * size
    m = np.zeros((big, big), np.uint8)
    c = (int(big * rng.uniform(0.4, 0.6)), int(big * rng.uniform(0.4, 0.6)))
    r = int(big * rng.uniform(0.2, 0.28))
    if kind == "horse":
        from skimage.data import horse

        sil = (~horse()).astype(np.uint8) * 255  # the horse is the dark part
        s = 2.8 * r / max(sil.shape)
        sil = cv2.resize(sil, (round(sil.shape[1] * s), round(sil.shape[0] * s)), interpolation=cv2.INTER_AREA)
        y0, x0 = max(0, c[1] - sil.shape[0] // 2), max(0, c[0] - sil.shape[1] // 2)
        part = sil[: big - y0, : big - x0]
        m[y0:y0 + part.shape[0], x0:x0 + part.shape[1]] = part
    elif kind == "oval":
        cv2.ellipse(m, c, (r, int(r * 0.7)), float(rng.uniform(0, 180)), 0, 360, 255, -1)
    elif kind == "square":
        d = int(r * 0.8)
        cv2.rectangle(m, (c[0] - d, c[1] - d), (c[0] + d, c[1] + d), 255, -1)
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (r // 2, r // 2)))
    elif kind == "star":
        t = np.linspace(0, 2 * np.pi, 11)[:-1] + rng.uniform(0, np.pi)
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.5)
        pts = np.stack([c[0] + rad * np.cos(t), c[1] + rad * np.sin(t)], 1).astype(np.int32)
        cv2.fillPoly(m, [pts], 255)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return cv2.resize(m, (size, size), interpolation=cv2.INTER_AREA).astype(np.float64) / 255.0


SHAPES = {"horse": "a horse", "oval": "an oval", "square": "a square", "star": "a star"}
FOREGROUNDS = ("astronaut.png", "coffee.png", "chelsea.png", "motorcycle_left.png", "mpl:grace_hopper.jpg")
BACKGROUNDS = ("grass.png", "brick.png", "gravel.png", "camera.png", "moon.png", "rocket.jpg")


def make_composite(i: int, size: int = 256) -> Composite:
    """Composite ``i``: a shape (anti-aliased; odd ones feathered) cut from one real photo over
    another. Deterministic in ``i``."""
    from PIL import Image

    rng = np.random.default_rng(1000 + i)
    kind = list(SHAPES)[i % len(SHAPES)]
    fg_name, bg_name = FOREGROUNDS[i % len(FOREGROUNDS)], BACKGROUNDS[(5 * i + 1) % len(BACKGROUNDS)]
    fg = _square(np.asarray(Image.open(photo_path(fg_name)).convert("RGB")), size)
    bg = _square(np.asarray(Image.open(photo_path(bg_name)).convert("RGB")), size)
    alpha = _shape(kind, size, rng)
    if i % 2:  # a soft edge, as hair or motion blur gives
        alpha = cv2.GaussianBlur(alpha, (0, 0), 1.5)
    image = np.clip(np.rint(alpha[..., None] * fg + (1 - alpha[..., None]) * bg), 0, 255).astype(np.uint8)
    name = f"{kind}-{Path(fg_name).stem.split(':')[-1]}-on-{Path(bg_name).stem}"
    return Composite(name, SHAPES[kind], image, alpha, fg, bg)


# -- running and scoring -------------------------------------------------------------------------
def build(pipeline: str, size: int, model: str | None = None) -> dict[str, Stage]:
    stages = {}
    for stage in STAGES:
        cls = get_backend(stage, PIPELINES[pipeline][stage])
        params = cls.Params(model=model) if model and stage == "ground" and pipeline == "matte" else None
        stages[stage] = cls(params, StageContext(image_size=size, num_cpus=2))
    return stages


def decode(path: Path, caption: str, size: int) -> Item:
    """Read a photo as ``make dataset`` does (the ``pil`` decode stage), with its caption."""
    item = Item(key=path.stem, shard=0, index=0, uri=str(path),
                source={"kind": "file", "path": str(path), "root": str(path.parent)})
    get_backend("decode", "pil")(None, StageContext(image_size=size)).run_items([item])
    if not item.ok:
        raise RuntimeError(f"{path}: {item.rejected}")
    item.caption = caption
    return item


def run_item(stages: dict[str, Stage], item: Item) -> tuple[Item, float]:
    """Run caption..inpaint, keep a copy of the result, then assemble (acceptance)."""
    import copy

    t0 = time.perf_counter()
    for stage in STAGES[:-1]:
        stages[stage].run_items([item])
    before = copy.copy(item)
    before.detections = [copy.copy(d) for d in item.detections]  # assemble rebinds their masks
    stages["assemble"].run_items([item])
    seconds = time.perf_counter() - t0
    before.rejected = item.rejected
    return before, seconds


def _alpha(det: Any) -> np.ndarray:
    return det.mask.astype(np.float64) / 255.0


def score_photo(result: Item, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"accepted": result.ok, "seconds": round(seconds, 3)}
    if not result.ok:
        out["rejected"] = f"{result.rejected['stage']}: {result.rejected['reason']}"
        return out
    out["layers"] = len(result.detections)
    out["phrases"] = [d.phrase for d in result.detections]
    out["one_object"] = [is_one_object(d.mask) for d in result.detections]
    out["area"] = [round(one_object(d.mask)[1], 3) for d in result.detections]
    out["mode"] = result.quality.get("ground_mode")
    return out


def score_composite(comp: Composite, result: Item, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"accepted": result.ok, "seconds": round(seconds, 3)}
    t = comp.alpha
    best, best_det = 0.0, None
    dets = result.detections if result.ok else []
    for det in dets:
        a = _alpha(det)
        iou = float(np.minimum(a, t).sum() / max(np.maximum(a, t).sum(), 1e-9))
        if iou > best:
            best, best_det = iou, det
    out["soft_iou"] = round(best, 4)
    out["found"] = best >= 0.5
    out["named"] = best_det is not None and comp.caption.endswith(best_det.phrase)
    # RGB L1 of the layer, premultiplied (alpha and colour errors together), over both supports.
    true_pm = t[..., None] * comp.foreground
    if best_det is not None:
        a = _alpha(best_det)
        colours = best_det.pixels if best_det.pixels is not None else comp.image
        pred_pm = a[..., None] * colours
        union = (a > 0) | (t > 0)
    else:
        pred_pm, union = np.zeros_like(true_pm), t > 0
    out["rgb_l1"] = round(float(np.abs(pred_pm - true_pm)[union].mean()), 2)
    hole = t > 0
    bg = result.background if result.ok and result.background is not None else comp.image
    out["hole_psnr"] = round(psnr(bg, comp.background, hole), 2)
    return out


def _layer_tile(image: np.ndarray, alpha: np.ndarray | None, colours: np.ndarray | None) -> np.ndarray:
    """The layer over a checkerboard (what a user of the layer sees)."""
    h, w = image.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    board = np.repeat(np.where(((yy // 16 + xx // 16) % 2 == 0)[..., None], 200.0, 150.0), 3, 2)
    if alpha is None:
        return board.astype(np.uint8)
    a = alpha.astype(np.float64)[..., None] / 255.0
    fg = (colours if colours is not None else image).astype(np.float64)
    return np.clip(a * fg + (1 - a) * board, 0, 255).astype(np.uint8)


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    tile = tile.copy()
    cv2.rectangle(tile, (0, 0), (tile.shape[1], 14), (0, 0, 0), -1)
    cv2.putText(tile, text[:34], (2, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def preview_row(image: np.ndarray, results: dict[str, Item], name: str) -> np.ndarray:
    """image | per pipeline: its first layer on a checkerboard, its background."""
    tiles = [_label(image, name)]
    for pipe, res in results.items():
        if res.ok and res.detections:
            det = res.detections[0]
            extra = f" +{len(res.detections) - 1}" if len(res.detections) > 1 else ""
            tiles.append(_label(_layer_tile(image, det.mask, det.pixels), f"{pipe}: {det.phrase}{extra}"))
            tiles.append(_label(res.background, f"{pipe}: background"))
        else:
            why = res.rejected["reason"] if res.rejected else "rejected"
            tiles.append(_label(_layer_tile(image, None, None), f"{pipe}: rejected"))
            tiles.append(_label(np.full_like(image, 90), why[:34]))
    return np.concatenate(tiles, 1)


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 3) if values else float("nan")


def summarise(rows: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per pipeline and set: the figures of the BENCHMARKS table."""
    out: dict[str, dict[str, Any]] = {}
    for pipe, per_set in rows.items():
        for set_name, photos in per_set.items():
            res = list(photos.values())
            acc = [r for r in res if r["accepted"]]
            s: dict[str, Any] = {"n": len(res), "accepted": len(acc), "accepted_share": _mean([r["accepted"] for r in res]),
                                 "seconds_per_image": _mean([r["seconds"] for r in res])}
            if set_name == "composites":
                s.update(soft_iou=_mean([r["soft_iou"] for r in res]), found=_mean([r["found"] for r in res]),
                         named=_mean([r["named"] for r in res]), rgb_l1=_mean([r["rgb_l1"] for r in res]),
                         hole_psnr=_mean([r["hole_psnr"] for r in res]))
            else:
                layers = [ok for r in acc for ok in r["one_object"]]
                s.update(layers=len(layers), one_object_share=_mean(layers))
            out.setdefault(pipe, {})[set_name] = s
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datagen.photobench", description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--n-composites", type=int, default=12)
    ap.add_argument("--model", default=None, help="ONNX matting model (default: the matte backend's)")
    ap.add_argument("--pipelines", default="classical,matte")
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--sheet", default=None, help="write a preview sheet (JPEG/PNG) here")
    args = ap.parse_args(argv)
    pipes = [p for p in args.pipelines.split(",") if p]
    stages = {p: build(p, args.size, args.model) for p in pipes}
    rows: dict[str, dict[str, dict[str, Any]]] = {p: {} for p in pipes}
    sheet_rows: list[np.ndarray] = []
    inputs: list[tuple[str, str, Any]] = []
    for set_name, photos in photo_sets().items():
        for name, (path, caption) in photos.items():
            inputs.append((set_name, name, (path, caption)))
    for i in range(args.n_composites):
        comp = make_composite(i, args.size)
        inputs.append(("composites", comp.name, comp))
    for set_name, name, src in inputs:
        results: dict[str, Item] = {}
        for pipe in pipes:
            if isinstance(src, Composite):
                item = Item(key=name, shard=0, index=0, uri=name, source={}, image=src.image.copy(),
                            caption=src.caption)
            else:
                item = decode(src[0], src[1], args.size)
            image = item.image.copy()
            result, seconds = run_item(stages[pipe], item)
            results[pipe] = result
            rows[pipe].setdefault(set_name, {})[name] = (score_composite(src, result, seconds)
                                                         if isinstance(src, Composite) else score_photo(result, seconds))
            print(f"{pipe:9s} {set_name:10s} {name:28s} {json.dumps(rows[pipe][set_name][name])}", flush=True)
        if args.sheet and (set_name != "no-object"):
            sheet_rows.append(preview_row(image, results, name))
    summary = summarise(rows)
    print("\n| set | pipeline | n | accepted | one object | soft IoU | found | RGB L1 | hole PSNR | s/image |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for set_name in ("bundled", "unseen", "no-object", "composites"):
        for pipe in pipes:
            s = summary[pipe].get(set_name)
            if not s:
                continue
            comp = set_name == "composites"
            print(f"| {set_name} | {pipe} | {s['n']} | {s['accepted']} | "
                  f"{'' if comp else s['one_object_share']} | {s.get('soft_iou', '')} | {s.get('found', '')} | "
                  f"{s.get('rgb_l1', '')} | {s.get('hole_psnr', '')} | {s['seconds_per_image']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    if args.sheet and sheet_rows:
        small = [cv2.resize(r, (r.shape[1] * 5 // 8, r.shape[0] * 5 // 8), interpolation=cv2.INTER_AREA)
                 for r in sheet_rows]
        Path(args.sheet).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(args.sheet), cv2.cvtColor(np.concatenate(small, 0), cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 85])
    return 0


if __name__ == "__main__":
    sys.exit(main())
