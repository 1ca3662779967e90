"""Ground backend ``matte``: the photo path of the CPU default, from a salient-object matting model.

Flat scenes (a few compact objects on a plain background) keep the contrast grounder's colour
model, exact there (``classical_first``); when such objects include ones the caption does not name
(a photo's texture or shading cut into colour clusters), they are kept only if they agree with the
matte's salient core (``min_agreement``) and are not parts of one salient region. Every other image goes, in one batch per actor call,
through a matting model in ONNX (ISNet by default, fetched by ``make isnet-weights``; any rembg-style
ISNet / U2-Net / BiRefNet file works: one RGB input ``[N, 3, H, W]``, first output the saliency
map, a probability: see ``activation``) on ``onnxruntime``, with its threads matched to the stage's ``num_cpus``:

- the matte's salient connected regions (alpha above ``alpha_floor``, 8-connected) whose confident
  core (alpha >= 0.5) covers at least ``min_object`` of the image become detections, at most
  ``max_layers``: box, soft 8-bit alpha (``Detection.mask``), colours decontaminated at the soft
  edges (``Detection.pixels``, :func:`datagen.alpha.foreground_colours`);
- each is named from the caption's object phrases, the phrase that best fits the region
  (:func:`name_regions`): the caption's subject before the things it stands on or in front of,
  never a setting noun (floor, table, sky) or a phrase whose colour the region does not have;
- a region larger than ``max_object`` (the object fills the frame) or a matte without a region
  large and confident enough (mostly background, or an uncertain haze) is a recorded rejection.

The segment stage keeps a matte's alpha (``grabcut`` passes it through; ``sam`` refines the box
to a mask and keeps the matte's soft alpha inside it); inpainting fills where alpha > ``alpha_floor``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from datagen.alpha import FG_METHODS, foreground_colours
from datagen.item import MATTE, Detection, Item
from datagen.phrases import PALETTE, SETTING_NOUNS, colour_of, nearest_colour, phrase_leads, with_article
from datagen.registry import register
from datagen.stages.base import StageContext, StageFault, batches, file_sha256
from datagen.stages.classical import ContrastGround, ContrastParams, _box, caption_confirms, drop_unnamed

# Words that introduce the subject's own parts or contents, not other things ("a cup of coffee").
_SAME_THING = frozenset({"of", "with", "and", "or", "wears", "wear", "holds", "hold", "carries", "carry"})


@dataclass
class MatteParams(ContrastParams):
    """Settings of the ``matte`` ground backend; the contrast grounder's (flat scenes) included."""

    model: str = "weights/isnet_medium.onnx"  # an ONNX salient-object / matting model
    licence: str = ""  # the model's licence for the manifest; the pinned ISNet files are known
    threads: int = 0  # onnxruntime intra-op threads; 0: the stage's num_cpus rounded up
    classical_first: bool = True  # flat scenes: the contrast grounder's objects when it finds them
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # input = (rgb / 255 - mean) / std
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)  # (ISNet; U2-Net/BiRefNet: ImageNet's)
    input_size: int = 1024  # side the image is resized to, when the graph's input size is free
    # output -> alpha: none (already a probability: ISNet's sigmoid output, clipped to [0, 1]) |
    # minmax (stretched to [0, 1], as rembg does; on the bundled photos it turned the faint noise of
    # grass and the moon, max 0.28 and 0.17, into salient regions) | sigmoid (logits: BiRefNet)
    activation: str = "none"
    alpha_floor: float = 0.05  # alpha below this is 0 (model noise); holes cover alpha above it
    core_alpha: float = 0.5  # a region's confident core: alpha at least this
    min_object: float = 0.02  # a region's core must cover this share of the image
    max_object: float = 0.85  # a region larger than this share fills the frame: reject
    min_confidence: float = 0.3  # core / region area below this: an uncertain haze, not an object
    # Colour-model objects the caption does not name are checked against the matte: kept when their
    # union agrees with its salient core (IoU) and no two of them are parts of one salient region.
    # (Checking every textured image instead cost generated scenes on noise backgrounds: 13 of 40
    # ran the model, 4.8 s/image, and one lost an object the matte missed: hole PSNR 43.8 -> 31.7 dB.)
    min_agreement: float = 0.5
    # Layer colours where the matte is soft: "ml" (pymatting's multilevel foreground estimate) or
    # "nearest" (the nearest opaque pixel's). A matte's soft band is wide (a saucer at alpha 0.3):
    # nearest colours there are shards; ml took the composites' layer RGB L1 from 21.4 to 13.7 at
    # no measurable cost (BENCHMARKS.md "Photos").
    alpha_colours: str = "ml"

    def __post_init__(self) -> None:
        if self.alpha_colours not in FG_METHODS:
            raise ValueError(f"alpha_colours {self.alpha_colours!r}: choose one of {FG_METHODS}")


ACTIVATIONS = ("none", "minmax", "sigmoid")


def _alpha_from_output(out: np.ndarray, activation: str) -> np.ndarray:
    out = out.astype(np.float32)
    if activation == "none":
        return np.clip(out, 0.0, 1.0)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-out))
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)

# onnxruntime's words for an allocation that failed (CPU arena, CUDA, BFC arena)
_ALLOC_FAILED = re.compile(r"allocat|out of memory|bad_alloc", re.IGNORECASE)


class MatteModel:
    """An ONNX matting model on onnxruntime: uint8 RGB images -> float32 alphas in [0, 1]."""

    def __init__(self, path: str | Path, threads: int = 1, use_gpu: bool = False,
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (1.0, 1.0, 1.0),
                 input_size: int = 1024, activation: str = "none") -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, threads)  # the actor's CPU share: no oversubscription
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if use_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        inp = self.session.get_inputs()[0]
        if len(inp.shape) != 4 or (isinstance(inp.shape[1], int) and inp.shape[1] != 3):
            raise ValueError(f"{path}: expected one image input [N, 3, H, W], got {inp.name} {inp.shape}")
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        n, _c, h, w = inp.shape
        self.batch = n if isinstance(n, int) and n > 0 else None  # None: any batch size
        self.size = (w if isinstance(w, int) else input_size, h if isinstance(h, int) else input_size)
        self.mean = np.asarray(mean, np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, np.float32).reshape(1, 1, 3)
        self.activation = activation

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 image, got {image.dtype} {image.shape}")
        x = cv2.resize(image, self.size, interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
        return ((x - self.mean) / self.std).transpose(2, 0, 1)

    def _run(self, x: np.ndarray) -> np.ndarray:
        """The graph on a prepared batch. Its input is always a valid tensor (``_prepare`` checks the
        image), so a failure here is the system's (memory, device, a broken model file), never an
        item's: out of memory as MemoryError (the batch is halved), anything else as StageFault."""
        try:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            message = f"matting model {self.path.name} failed on a batch of {len(x)}: {type(err).__name__}: {err}"
            if _ALLOC_FAILED.search(str(err)):
                raise MemoryError(message) from err
            raise StageFault(message) from err

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """One alpha (H, W) float32 in [0, 1] per image, at the image's own size."""
        out: list[np.ndarray] = []
        step = self.batch or max(1, len(images))  # a fixed-batch graph (ISNet's is 1) runs in chunks
        for chunk in batches(images, step):
            x = np.stack([self._prepare(im) for im in chunk])
            y = self._run(x)
            for im, o in zip(chunk, y.reshape(len(chunk), -1, *y.shape[-2:]), strict=True):
                a = _alpha_from_output(o[0], self.activation)
                h, w = im.shape[:2]
                interp = cv2.INTER_AREA if a.shape[0] > h else cv2.INTER_LINEAR
                out.append(np.clip(cv2.resize(a, (w, h), interpolation=interp), 0.0, 1.0))
        return out


def _parts_of_one(dets: list[Detection], support: np.ndarray) -> bool:
    """Whether two detections lie mostly (> half each) in the same connected salient region."""
    _n, lab = cv2.connectedComponents(support.astype(np.uint8), connectivity=8)
    owners = []
    for d in dets:
        labels = lab[d.mask > 0]
        labels = labels[labels > 0]
        if len(labels) and np.bincount(labels).max() > 0.5 * int((d.mask > 0).sum()):
            owners.append(int(np.bincount(labels).argmax()))
    return len(owners) != len(set(owners))


def _colour_share(image: np.ndarray, alpha: np.ndarray, colour: str) -> float:
    """Share of the region's alpha mass whose pixels are nearest to ``colour`` in the palette."""
    names = list(PALETTE)
    pal = np.array([PALETTE[n] for n in names], np.float32)
    sel = alpha > 0
    px = image[sel].astype(np.float32)
    nearest = np.argmin(((px[:, None, :] - pal[None]) ** 2).sum(2), axis=1)
    weights = alpha[sel].astype(np.float64)
    return float(weights[nearest == names.index(colour)].sum() / max(weights.sum(), 1e-9))


def phrase_score(phrase: str, lead: str | None, order: int, image: np.ndarray, alpha: np.ndarray) -> float:
    """How well a caption phrase names a region: the subject first, then its parts or contents,
    then other things; a setting noun or a colour the region lacks rules the phrase out."""
    score = -0.1 * order
    if lead is not None and lead not in _SAME_THING:
        score -= 0.3  # "on a saucer", "in front of a flag": another thing than the subject
    if phrase.split()[-1] in SETTING_NOUNS:
        score -= 1.0
    colour = colour_of(phrase)
    if colour is not None and _colour_share(image, alpha, colour) < 0.05:
        score -= 0.6  # photos' colours sit far from the palette: a hint, not a veto
    return score


def name_regions(caption: str, image: np.ndarray, alphas: list[np.ndarray]) -> list[str]:
    """A phrase for each region (largest first): the assignment of distinct caption phrases with
    the best total :func:`phrase_score`; regions left over (more regions than phrases: "coins")
    take their best phrase again; a region no phrase fits is named by its colour."""
    from scipy.optimize import linear_sum_assignment

    leads = phrase_leads(caption)
    phrases = list(leads)
    names = [""] * len(alphas)
    if phrases and alphas:
        scores = np.array([[phrase_score(ph, leads[ph], k, image, a) for k, ph in enumerate(phrases)]
                           for a in alphas])
        rows, cols = linear_sum_assignment(-scores)
        for r, c in zip(rows, cols, strict=True):
            if scores[r, c] > -1.0:  # a setting is no name
                names[r] = phrases[c]
        for r in range(len(alphas)):
            if not names[r] and scores[r].max() > -1.0:
                names[r] = phrases[int(scores[r].argmax())]
    for i, a in enumerate(alphas):
        if not names[i]:
            sel = a > 0
            names[i] = f"{nearest_colour(image[sel].mean(0))} object" if sel.any() else "object"
    return names


@register
class MatteGround(ContrastGround):
    """Salient objects from a matting model's alpha (photos); the colour model's (flat scenes)."""

    stage = "ground"
    name = "matte"
    Params = MatteParams
    version = "1"

    def __init__(self, params: MatteParams | None = None, context: StageContext | None = None) -> None:
        super().__init__(params, context)
        self.check(self.params)
        self._model: MatteModel | None = None  # loaded on the first photo: flat scenes never pay

    @property
    def model(self) -> MatteModel:
        if self._model is None:
            p: MatteParams = self.params
            # Rounded up: the model is the photo path's one heavy step, the stages around it
            # mostly wait for it (num_cpus 1.1 of 2 cores -> 2 threads).
            threads = p.threads or max(1, math.ceil(self.context.num_cpus))
            self._model = MatteModel(p.model, threads=threads,
                                     use_gpu=self.context.num_gpus > 0, mean=p.mean, std=p.std,
                                     input_size=p.input_size, activation=p.activation)
        return self._model

    @classmethod
    def check(cls, params: MatteParams) -> None:
        """The model file must be there and look like ONNX (a protobuf ModelProto)."""
        from datagen.isnet_weights import missing_message

        path = Path(params.model)
        if not path.is_file():
            raise FileNotFoundError(missing_message(path))
        with open(path, "rb") as f:
            head = f.read(1)
        if head != b"\x08":  # field 1 (ir_version, varint): how every ONNX ModelProto starts
            raise ValueError(f"ground/matte: {path} is not an ONNX model (starts with {head!r})")
        if params.activation not in ACTIVATIONS:
            raise ValueError(f"ground/matte: activation must be one of {ACTIVATIONS}, got {params.activation!r}")
        if not 0 < params.alpha_floor < params.core_alpha < 1:
            raise ValueError("ground/matte: need 0 < alpha_floor < core_alpha < 1")

    @classmethod
    def identity(cls, params: MatteParams) -> dict[str, Any]:
        from datagen.isnet_weights import LICENCE, PACKAGE, VERSION, known_model

        cls.check(params)
        sha = file_sha256(params.model)
        known = known_model(sha)
        model = f"isnet_{known.variant}:{PACKAGE}@{VERSION}" if known else f"onnx:{Path(params.model).stem}"
        licence = params.licence or (LICENCE if known else "unknown (set stages.ground.params.licence)")
        return {"backend": cls.name, "model": model,
                "checkpoint": {"name": Path(params.model).name, "sha256": sha},
                "version": cls.version, "licence": licence}

    def process(self, items: list[Item]) -> None:
        p: MatteParams = self.params
        photos, checks = [], []
        for it in items:
            if not p.classical_first or self.compact(it) is not None:
                photos.append(it)
            elif caption_confirms(it):
                drop_unnamed(it)  # several coloured objects, each named: a flat-object scene
            elif it.phrases and any(d.phrase not in it.phrases for d in it.detections):
                # objects the caption does not name: the colour model may have cut texture,
                # shading or rings of one object into objects (a photo, not a flat scene)
                checks.append(it)
        todo = photos + checks
        if not todo:
            return
        for item, alpha in zip(todo, self.model([it.image for it in todo]), strict=True):
            dets, reason = self.from_matte(item, alpha)
            if item in checks:
                union = np.zeros(alpha.shape, bool)
                for d in item.detections:
                    union |= d.mask > 0
                core = alpha >= p.core_alpha
                agreement = float((union & core).sum() / max((union | core).sum(), 1))
                item.quality["matte_agreement"] = round(agreement, 3)
                if _parts_of_one(item.detections, alpha >= p.alpha_floor):
                    agreement = 0.0  # colour rings of one salient object (a cell and its halo)
                if agreement >= p.min_agreement or not dets:
                    drop_unnamed(item)  # the caption's count, as the contrast grounder keeps it
                    continue  # the matte agrees with the colour model's objects (or has none): keep them
            if reason:
                item.reject(self.stage, reason)
            else:
                item.quality["ground_mode"] = "matte"
                item.detections = dets

    def from_matte(self, item: Item, alpha: np.ndarray) -> tuple[list[Detection], str | None]:
        """Detections from one image's matte, or a rejection reason."""
        p: MatteParams = self.params
        image = item.image
        h, w = alpha.shape
        a8 = np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8)
        a8[alpha < p.alpha_floor] = 0
        n, lab, stats, _ = cv2.connectedComponentsWithStats((a8 > 0).astype(np.uint8), connectivity=8)
        core = alpha >= p.core_alpha
        regions, dropped = [], []
        for i in range(1, n):
            area = stats[i, cv2.CC_STAT_AREA] / (h * w)
            sel = lab == i
            core_area = float((core & sel).sum()) / (h * w)
            if area > p.max_object:
                return [], f"matte: the object fills the frame ({area:.0%} of the image > {p.max_object:.0%})"
            if core_area < p.min_object:
                continue  # specks and faint haze: not an object, not worth recording each
            confidence = core_area / area
            if confidence < p.min_confidence:
                dropped.append(f"uncertain region ({area:.1%} of the image, core {confidence:.0%})")
                continue
            regions.append((core_area, sel, confidence))
        salient = float((a8 > 0).mean())
        item.quality["matte"] = {"salient_share": round(salient, 4), "regions": len(regions),
                                 **({"dropped": dropped[:5]} if dropped else {})}
        if not regions:
            why = "; ".join(dropped[:2]) if dropped else (
                f"no region with {p.min_object:.0%} of the image at alpha >= {p.core_alpha}")
            return [], f"matte: mostly background ({salient:.1%} salient; {why})"
        regions.sort(key=lambda r: -r[0])
        regions = regions[: self.context.max_layers]
        alphas = [np.where(sel, a8, 0).astype(np.uint8) for _c, sel, _conf in regions]
        names = name_regions(item.caption, image, alphas)
        dets = []
        for rank, ((core_area, _sel, confidence), mask, phrase) in enumerate(zip(regions, alphas, names,
                                                                                  strict=True)):
            dets.append(Detection(
                phrase=phrase, box=_box(mask > 0), score=round(float(mask[mask > 0].mean()) / 255.0, 4),
                mask=mask, caption=with_article(phrase), pixels=foreground_colours(image, mask, p.alpha_colours),
                # untouching regions: the larger further back, as the colour model orders them
                extra={"candidate": MATTE, "depth": rank, "matte_core": round(core_area, 4),
                       "matte_confidence": round(confidence, 3)}))
        return dets, None
