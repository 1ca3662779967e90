"""inpaint backend ``sd-inpaint``: remove the foregrounds with Stable Diffusion inpainting (diffusers).

Per batch: the union of each item's detection masks, dilated, is the hole; every item with a hole is
resized to the model's square resolution, all of them are inpainted in ONE pipeline call (one seeded
generator per item, derived from its key), and the result is resized back and pasted into the hole only,
so the background equals the source exactly outside the holes.

Two optional extras run in the same actor, on the same GPU:

* ``recheck`` -- a hallucination filter: a ``ground`` backend (built through the registry, e.g.
  groundingdino) looks for the removed phrases in the new background; a detection inside the hole above
  ``threshold`` flags (``item.quality["hallucination_flag"]``) or rejects the item. The best score is
  ``item.quality["hallucination"]``.
* ``layer_captioner`` -- a ``caption`` backend that runs in-process and has ``caption_images`` (``blip2``)
  captions each foreground on a neutral background (``Detection.caption``) and the inpainted background
  (``item.background_caption``). The caption stage runs before ground and so cannot see the layers; this
  is the first point of the pipeline where both the masks and the background exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datagen.item import Detection, Item
from datagen.registry import get_backend, register
from datagen.stages.base import Stage, StageContext, params_from_dict
from datagen.stages.models.blip2 import checkpoint_digest

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "empty background, nothing"
DEFAULT_NEGATIVE = "object, person, animal, text, watermark, logo, blurry, distorted, artifacts"
# Components whose weights make up the checkpoint (the tokenizer and scheduler are configs).
WEIGHTED = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_TEXT_ENCODER_ALT = "pytorch_model"  # transformers' older file name


@dataclass
class RecheckConfig:
    """``recheck:`` -- hallucination filter run on the inpainted backgrounds."""

    backend: str = "groundingdino"  # a ``ground`` backend name in datagen.registry
    params: dict[str, Any] = field(default_factory=dict)  # that backend's params
    threshold: float = 0.35  # detection score above which the background counts as hallucinated
    action: str = "flag"  # "flag": quality["hallucination_flag"] = True; "reject": item rejected
    min_hole_overlap: float = 0.5  # share of a detection's box inside the hole for it to count


@dataclass
class LayerCaptionerConfig:
    """``layer_captioner:`` -- in-process caption backend for the foreground layers and the background."""

    backend: str = "blip2"  # a ``caption`` backend with caption_images() that runs in the main env
    params: dict[str, Any] = field(default_factory=dict)
    fill: int = 127  # grey level around a foreground on its crop ("neutral background")
    margin: float = 0.1  # crop margin around the mask's box, as a share of the box size


@dataclass
class SdInpaintParams:
    """Settings of the ``sd-inpaint`` backend."""

    model: str = "weights/stable-diffusion-inpainting"  # diffusers folder: model_index.json, unet/, ...
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = DEFAULT_NEGATIVE
    steps: int = 30
    guidance_scale: float = 7.5
    strength: float = 1.0
    dilate: int = 15  # size (px, source resolution) of the elliptic kernel dilating the union mask; 0: none
    feather: int = 0  # px inside the hole over which the inpainting fades in; outside stays the source
    resolution: int | None = None  # square side the model runs at (multiple of 8); None: the UNet's native
    max_hole_fraction: float = 0.9  # reject an item whose hole covers more of the image than this
    seed: int = 0  # per-item generators are seeded from (seed, item.key)
    scheduler: str | None = None  # a diffusers scheduler class replacing the folder's, e.g. "DDIMScheduler"
    variant: str | None = None  # weight file variant, e.g. "fp16" for *.fp16.safetensors-only folders
    fp16: bool = True  # on GPU only; CPU always runs fp32
    device: str = "auto"  # "auto": cuda when visible, else cpu
    safety_checker: bool = False  # load the folder's safety checker; flagged backgrounds are rejected
    recheck: dict[str, Any] | None = None  # RecheckConfig fields; None: off
    layer_captioner: dict[str, Any] | None = None  # LayerCaptionerConfig fields; None: off


def item_seed(seed: int, key: str) -> int:
    """A 63-bit generator seed from the run seed and the item key: same key, same noise, any batch."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


def hole_mask(item: Item, dilate: int) -> np.ndarray:
    """bool (H, W): union of the detections' masks (a box where a mask is missing), dilated by ``dilate``."""
    import cv2

    h, w = item.image.shape[:2]
    hole = np.zeros((h, w), np.uint8)
    for det in item.detections:
        if det.mask is not None:
            if det.mask.shape != (h, w):
                raise ValueError(f"{item.key}: mask {det.mask.shape} does not match image {(h, w)}")
            hole |= (det.mask > 0).astype(np.uint8)
        else:  # no segmentation: remove the whole box rather than leave the object in the background
            x0, y0, x1, y1 = (int(round(v)) for v in det.box)
            hole[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = 1
    if dilate > 1 and hole.any():
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (dilate, dilate))
        hole = cv2.dilate(hole, kernel)
    return hole.astype(bool)


def blend(source: np.ndarray, inpainted: np.ndarray, hole: np.ndarray, feather: int = 0) -> np.ndarray:
    """``inpainted`` inside ``hole``, ``source`` bit-exactly outside; ``feather`` px ramp inside the hole."""
    if feather <= 0:
        return np.where(hole[..., None], inpainted, source)
    import cv2

    # distance to the nearest non-hole pixel: 1 on the hole's rim, so alpha is 0 outside and < 1 on the rim
    dist = cv2.distanceTransform(hole.astype(np.uint8), cv2.DIST_L2, 3)
    alpha = np.clip(dist / float(feather), 0.0, 1.0)[..., None]
    mixed = np.rint(alpha * inpainted.astype(np.float32) + (1.0 - alpha) * source.astype(np.float32))
    return np.where(hole[..., None], mixed.astype(np.uint8), source)


def layer_crop(image: np.ndarray, det: Detection, fill: int, margin: float) -> np.ndarray:
    """The detection's pixels on a flat ``fill`` background, cropped to its mask's box plus ``margin``."""
    h, w = image.shape[:2]
    if det.mask is not None and det.mask.any():
        ys, xs = np.nonzero(det.mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        inside = det.mask > 0
    else:
        x0, y0, x1, y1 = (int(round(v)) for v in det.box)
        inside = np.zeros((h, w), bool)
        inside[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
    mx, my = int(margin * (x1 - x0)), int(margin * (y1 - y0))
    x0, y0, x1, y1 = max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my)
    if x1 <= x0 or y1 <= y0:
        return np.full((8, 8, 3), fill, np.uint8)
    out = np.where(inside[..., None], image, np.uint8(fill))
    return np.ascontiguousarray(out[y0:y1, x0:x1])


def _sub_config(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    return None if values is None else params_from_dict(cls, values, where)


def _weight_file(folder: Path, component: str, variant: str | None) -> Path:
    stems = [WEIGHTED[component]] + ([_TEXT_ENCODER_ALT] if component == "text_encoder" else [])
    infix = f".{variant}" if variant else ""
    tried = []
    for stem in stems:
        for ext in ("safetensors", "bin"):
            path = folder / component / f"{stem}{infix}.{ext}"
            if path.is_file():
                return path
            tried.append(path.name)
    raise FileNotFoundError(
        f"sd-inpaint: {folder / component} has no weights; expected {' or '.join(tried)}"
        + ("" if variant else " (set variant: fp16 for folders with *.fp16.* files only)")
    )


def check_folder(params: SdInpaintParams) -> list[Path]:
    """Validate the diffusers folder (an inpainting UNet with 9 input channels); its weight files."""
    folder = Path(params.model)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"sd-inpaint: model folder {folder} does not exist; expected a diffusers folder with model_index.json"
        )
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"sd-inpaint: {index} is missing; expected a diffusers save_pretrained folder"
        )
    try:
        spec = json.loads(index.read_text())
        unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"sd-inpaint: {folder / 'unet' / 'config.json'} is missing") from None
    except ValueError as err:
        raise ValueError(f"sd-inpaint: {folder} has an unreadable config: {err}") from None
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if part not in spec:
            raise ValueError(f"sd-inpaint: {index} lists no {part!r}; not a Stable Diffusion pipeline folder")
    if unet_cfg.get("in_channels") != 9:
        raise ValueError(
            f"sd-inpaint: {folder / 'unet' / 'config.json'} has in_channels={unet_cfg.get('in_channels')}; an "
            "inpainting UNet takes 9 (latents + mask + masked image) -- is this a text-to-image checkpoint?"
        )
    if params.safety_checker and not (folder / "safety_checker").is_dir():
        raise FileNotFoundError(
            f"sd-inpaint: safety_checker: true but {folder / 'safety_checker'} is missing"
        )
    if params.resolution is not None and (params.resolution <= 0 or params.resolution % 8):
        raise ValueError(f"sd-inpaint: resolution {params.resolution} must be a positive multiple of 8")
    return [_weight_file(folder, c, params.variant) for c in WEIGHTED]


@register
class SdInpaint(Stage):
    """Background = source with the (dilated) foreground masks inpainted by SD inpainting."""

    stage = "inpaint"
    name = "sd-inpaint"
    Params = SdInpaintParams
    version = "1"

    @classmethod
    def check(cls, params: SdInpaintParams) -> None:
        check_folder(params)
        recheck = _sub_config(RecheckConfig, params.recheck, "inpaint.params.recheck")
        if recheck is not None:
            if recheck.action not in ("flag", "reject"):
                raise ValueError(f"inpaint.params.recheck.action: {recheck.action!r}; use flag or reject")
            ground = get_backend("ground", recheck.backend)
            ground.check(params_from_dict(ground.Params, recheck.params, "inpaint.params.recheck.params"))
        captioner = _sub_config(
            LayerCaptionerConfig, params.layer_captioner, "inpaint.params.layer_captioner"
        )
        if captioner is not None:
            cap = get_backend("caption", captioner.backend)
            cap_params = params_from_dict(
                cap.Params, captioner.params, "inpaint.params.layer_captioner.params"
            )
            runtime_env = getattr(cap, "runtime_env", None)
            in_process = hasattr(cap, "caption_images") and (
                runtime_env is None or runtime_env(cap_params) is None
            )
            if not in_process:
                raise ValueError(
                    f"inpaint.params.layer_captioner.backend: {captioner.backend!r} cannot caption in-process "
                    "(it needs its own environment or has no caption_images); use blip2"
                )
            cap.check(cap_params)

    @classmethod
    def identity(cls, params: SdInpaintParams) -> dict[str, Any]:
        folder = Path(params.model)
        ident: dict[str, Any] = {
            "backend": cls.name,
            "model": f"diffusers:{json.loads((folder / 'model_index.json').read_text())['_class_name']}:{folder.name}",
            "checkpoint": checkpoint_digest(check_folder(params), folder),
            "version": cls.version,
            "licence": "CreativeML OpenRAIL-M",  # Stable Diffusion (inpainting) weights
        }
        # The helpers change the output too; the schema allows these extra keys.
        if params.recheck is not None:
            rc = _sub_config(RecheckConfig, params.recheck, "inpaint.params.recheck")
            ground = get_backend("ground", rc.backend)
            ident["recheck"] = ground.identity(params_from_dict(ground.Params, rc.params, "recheck.params"))
        if params.layer_captioner is not None:
            lc = _sub_config(LayerCaptionerConfig, params.layer_captioner, "inpaint.params.layer_captioner")
            cap = get_backend("caption", lc.backend)
            ident["layer_captioner"] = cap.identity(
                params_from_dict(cap.Params, lc.params, "layer_captioner.params")
            )
        return ident

    def __init__(self, params: SdInpaintParams | None = None, context: StageContext | None = None) -> None:
        super().__init__(params, context)
        import diffusers
        import torch

        p: SdInpaintParams = self.params
        self.check(p)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if p.device == "auto" else p.device
        self.dtype = torch.float16 if (p.fp16 and self.device.startswith("cuda")) else torch.float32
        extra: dict[str, Any] = (
            {} if p.safety_checker else {"safety_checker": None, "requires_safety_checker": False}
        )
        self.pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
            p.model, local_files_only=True, torch_dtype=self.dtype, variant=p.variant, **extra
        )
        if p.scheduler:
            sched_cls = getattr(diffusers, p.scheduler, None)
            if sched_cls is None:
                raise ValueError(f"sd-inpaint: unknown scheduler {p.scheduler!r} (a diffusers class name)")
            self.pipe.scheduler = sched_cls.from_config(self.pipe.scheduler.config)
        self.pipe = self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        native = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.resolution = p.resolution or native
        self.recheck = _sub_config(RecheckConfig, p.recheck, "inpaint.params.recheck")
        self.ground = None
        if self.recheck is not None:
            ground_cls = get_backend("ground", self.recheck.backend)
            self.ground = ground_cls(
                params_from_dict(ground_cls.Params, self.recheck.params, "recheck.params"), self.context
            )
        self.layer_cfg = _sub_config(
            LayerCaptionerConfig, p.layer_captioner, "inpaint.params.layer_captioner"
        )
        self.captioner = None
        if self.layer_cfg is not None:
            cap_cls = get_backend("caption", self.layer_cfg.backend)
            self.captioner = cap_cls(
                params_from_dict(cap_cls.Params, self.layer_cfg.params, "layer_captioner.params"),
                self.context,
            )
        log.info("sd-inpaint: %s on %s/%s at %d px", p.model, self.device, self.dtype, self.resolution)

    # -- inpainting -------------------------------------------------------------------------
    def inpaint(
        self, images: list[np.ndarray], holes: list[np.ndarray], keys: list[str]
    ) -> tuple[list[np.ndarray], list[bool]]:
        """Inpaint each image inside its hole in one pipeline call.

        Returns the uint8 images at source size and, per image, whether the safety checker flagged it.
        """
        import cv2
        import torch
        from PIL import Image

        p: SdInpaintParams = self.params
        r = self.resolution
        ims, masks = [], []
        for im, hole in zip(images, holes, strict=True):
            h, w = im.shape[:2]
            interp = cv2.INTER_AREA if (h >= r and w >= r) else cv2.INTER_CUBIC
            ims.append(Image.fromarray(cv2.resize(im, (r, r), interpolation=interp)))
            # area-resize then any coverage -> hole: the model's hole always contains the blended one
            m = cv2.resize(hole.astype(np.float32), (r, r), interpolation=cv2.INTER_AREA) > 0
            masks.append(Image.fromarray((m * 255).astype(np.uint8)))
        gens = [torch.Generator("cpu").manual_seed(item_seed(p.seed, k)) for k in keys]
        n = len(ims)
        with torch.inference_mode():
            out = self.pipe(
                prompt=[p.prompt] * n,
                negative_prompt=[p.negative_prompt] * n,
                image=ims,
                mask_image=masks,
                height=r,
                width=r,
                strength=p.strength,
                num_inference_steps=p.steps,
                guidance_scale=p.guidance_scale,
                generator=gens,
                output_type="np",
            )
        nsfw = [bool(f) for f in (getattr(out, "nsfw_content_detected", None) or [False] * n)]
        results = []
        for im, arr, hole in zip(images, out.images, holes, strict=True):
            h, w = im.shape[:2]
            gen = np.clip(np.rint(np.asarray(arr, np.float32) * 255.0), 0, 255).astype(np.uint8)
            interp = cv2.INTER_AREA if (h <= r and w <= r) else cv2.INTER_CUBIC
            gen = cv2.resize(gen, (w, h), interpolation=interp)
            results.append(blend(im, gen, hole, p.feather))
        return results, nsfw

    def process(self, items: list[Item]) -> None:
        p: SdInpaintParams = self.params
        todo: list[tuple[Item, np.ndarray]] = []
        for it in items:
            if it.image is None:
                raise ValueError(f"{it.key}: no decoded image")
            hole = hole_mask(it, p.dilate)
            frac = float(hole.mean())
            it.quality["hole_fraction"] = round(frac, 6)
            if frac > p.max_hole_fraction:
                it.reject(self.stage, f"hole covers {frac:.0%} of the image (max {p.max_hole_fraction:.0%})")
            elif frac == 0.0:
                it.background = it.image.copy()  # nothing to remove
            else:
                todo.append((it, hole))
        if todo:
            backgrounds, flagged = self.inpaint(
                [it.image for it, _ in todo], [h for _, h in todo], [it.key for it, _ in todo]
            )
            for (it, _), bg, nsfw in zip(todo, backgrounds, flagged, strict=True):
                if nsfw:
                    it.reject(self.stage, "safety checker flagged the inpainted background")
                else:
                    it.background = bg
        if self.ground is not None:
            self._recheck([(it, h) for it, h in todo if it.ok])
        if self.captioner is not None:
            self._caption_layers([it for it in items if it.ok])

    # -- extras ---------------------------------------------------------------------------
    def _recheck(self, done: list[tuple[Item, np.ndarray]]) -> None:
        """Look for the removed phrases in each new background; score what lies in the hole."""
        rc = self.recheck
        shadows = [
            Item(
                key=it.key,
                shard=it.shard,
                index=it.index,
                uri=it.uri,
                source=it.source,
                image=it.background,
                caption=it.caption,
                phrases=sorted({d.phrase for d in it.detections}),
            )
            for it, _ in done
        ]
        self.ground.run_items(shadows)  # one failing background is rejected alone, not the batch
        for (it, hole), shadow in zip(done, shadows, strict=True):
            if not shadow.ok:
                it.quality["hallucination"] = None
                it.quality["hallucination_error"] = shadow.rejected["reason"]
                continue
            score = 0.0
            for det in shadow.detections:
                if _box_overlap(det.box, hole) >= rc.min_hole_overlap:
                    score = max(score, float(det.score))
            it.quality["hallucination"] = round(score, 4)
            hallucinated = score >= rc.threshold
            it.quality["hallucination_flag"] = hallucinated
            if hallucinated and rc.action == "reject":
                it.reject(self.stage, f"removed object re-detected in the background (score {score:.2f})")

    def _caption_layers(self, items: list[Item]) -> None:
        """Caption every foreground on a neutral background and every background, in one batch."""
        cfg = self.layer_cfg
        crops: list[np.ndarray] = []
        slots: list[tuple[Item, Detection | None]] = []
        for it in items:
            for det in it.detections:
                crops.append(layer_crop(it.image, det, cfg.fill, cfg.margin))
                slots.append((it, det))
            crops.append(it.background)
            slots.append((it, None))
        for (it, det), caption in zip(slots, self.captioner.caption_images(crops), strict=True):
            if det is None:
                it.background_caption = caption
            else:
                det.caption = caption


def _box_overlap(box: tuple[float, float, float, float], hole: np.ndarray) -> float:
    """Share of the box's area that lies inside ``hole``."""
    h, w = hole.shape
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        return 0.0
    return float(hole[y0:y1, x0:x1].mean())
