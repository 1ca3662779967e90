"""caption backend ``blip2``: BLIP-2 / InstructBLIP captions with Hugging Face transformers, offline.

The model folder is what ``save_pretrained`` writes (e.g. a local copy of Salesforce/blip2-opt-2.7b or
Salesforce/instructblip-flan-t5-xl): ``config.json`` says which of the two it is. The class also serves as
an in-process captioner for other stages (:meth:`Blip2Caption.caption_images`): sd-inpaint's optional
``layer_captioner`` uses it to caption foreground crops and the inpainted background.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datagen.registry import register
from datagen.stages.base import ImageCaptioner, StageContext, file_sha256

log = logging.getLogger(__name__)

# config.json model_type -> (model class, processor class) in transformers
MODEL_TYPES = {
    "blip-2": ("Blip2ForConditionalGeneration", "Blip2Processor"),
    "instructblip": ("InstructBlipForConditionalGeneration", "InstructBlipProcessor"),
}
# InstructBLIP is instruction-tuned: it needs an instruction even for a plain caption.
INSTRUCTBLIP_PROMPT = "A short image description:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a ``save_pretrained`` folder: a single file or the shards of an index."""
    for name in WEIGHT_INDEXES:
        index = folder / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as err:
                raise ValueError(f"{index} is not a weight index (weight_map expected): {err}") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{folder / missing[0]} is missing; {name} lists {len(shards)} shards"
                )
            return [folder / s for s in shards]
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(f"{folder} has no weights; expected {' or '.join(WEIGHT_FILES + WEIGHT_INDEXES)}")


def checkpoint_digest(files: list[Path], root: Path) -> dict[str, str]:
    """``{"name", "sha256"}`` of a checkpoint made of one or more files.

    One file: its own sha256. Several (shards, or a diffusers folder): sha256 of the sorted
    ``"relative/path sha256"`` lines, so any change of any file changes it.
    """
    if len(files) == 1:
        return {"name": files[0].name, "sha256": file_sha256(files[0])}
    lines = sorted(f"{f.relative_to(root).as_posix()} {file_sha256(f)}" for f in files)
    return {"name": root.name, "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


def read_config(folder: Path, kinds: dict[str, Any], backend: str) -> dict[str, Any]:
    """``folder/config.json`` with a known ``model_type``; errors name the folder and the file expected."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{backend}: model folder {folder} does not exist; expected a folder with config.json"
        )
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{backend}: {cfg_file} is missing; expected a Hugging Face save_pretrained folder"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as err:
        raise ValueError(f"{backend}: {cfg_file} is not JSON: {err}") from None
    kind = cfg.get("model_type")
    if kind not in kinds:
        raise ValueError(f"{backend}: {cfg_file} has model_type {kind!r}; expected one of {sorted(kinds)}")
    return cfg


@dataclass
class Blip2Params:
    """Settings of the ``blip2`` caption backend."""

    model: str = "weights/blip2-opt-2.7b"  # save_pretrained folder (BLIP-2 or InstructBLIP)
    prompt: str | None = None  # None: plain captioning (BLIP-2) / INSTRUCTBLIP_PROMPT (InstructBLIP)
    max_new_tokens: int = 30
    min_new_tokens: int = 1
    num_beams: int = 1
    repetition_penalty: float = 1.0
    keep_source_caption: bool = False  # keep a sidecar caption from the source instead of captioning
    fp16: bool = True  # on GPU only; CPU always runs fp32
    device: str = "auto"  # "auto": cuda when visible, else cpu


@register
class Blip2Caption(ImageCaptioner):
    """Global caption of each item; also an in-process captioner of arbitrary images."""

    stage = "caption"
    name = "blip2"
    Params = Blip2Params
    version = "1"

    @classmethod
    def runtime_env(cls, params: Blip2Params) -> dict[str, Any] | None:
        """Runs in the main env: no Ray runtime_env needed."""
        return None

    @classmethod
    def check(cls, params: Blip2Params) -> None:
        folder = Path(params.model)
        cfg = read_config(folder, MODEL_TYPES, "blip2")
        weight_files(folder)
        for name in ("preprocessor_config.json", "tokenizer_config.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"blip2: {folder / name} is missing; the folder needs the processor files"
                )
        if cfg.get("image_token_index") is None and cfg.get("image_token_id") is None:
            # Older hub layouts lack it; transformers 4.57 would then silently ignore the image.
            raise ValueError(
                f"blip2: {folder / 'config.json'} has no image_token_index (a pre-2024-11 layout "
                "that transformers 4.57 would run without the image); download the current hub revision"
            )

    @classmethod
    def identity(cls, params: Blip2Params) -> dict[str, Any]:
        folder = Path(params.model)
        cfg = read_config(folder, MODEL_TYPES, "blip2")
        return {
            "backend": cls.name,
            "model": f"{cfg['model_type']}:{cfg.get('_name_or_path') or folder.name}",
            "checkpoint": checkpoint_digest(weight_files(folder), folder),
            "version": cls.version,
            # Salesforce's BLIP-2 / InstructBLIP release (LAVIS); the language model inside (OPT,
            # Flan-T5, Vicuna) carries its own terms: not verified here.
            "licence": "BSD-3-Clause (unverified; the language model has its own licence)",
        }

    def __init__(self, params: Blip2Params | None = None, context: StageContext | None = None) -> None:
        super().__init__(params, context)
        import torch
        import transformers

        p: Blip2Params = self.params
        self.check(p)
        folder = Path(p.model)
        cfg = read_config(folder, MODEL_TYPES, "blip2")
        self.kind = cfg["model_type"]
        model_cls, proc_cls = (getattr(transformers, n) for n in MODEL_TYPES[self.kind])
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if p.device == "auto" else p.device
        self.dtype = torch.float16 if (p.fp16 and self.device.startswith("cuda")) else torch.float32
        self.processor = proc_cls.from_pretrained(folder, local_files_only=True)
        self.model = model_cls.from_pretrained(folder, local_files_only=True, dtype=self.dtype).to(
            self.device
        )
        self.model.eval()
        if getattr(self.processor, "num_query_tokens", None) is None:
            # Older processor configs: the model still needs its <image> placeholders in the prompt.
            self.processor.num_query_tokens = self.model.config.num_query_tokens
        self.prompt = (
            p.prompt
            if p.prompt is not None
            else (INSTRUCTBLIP_PROMPT if self.kind == "instructblip" else None)
        )
        self.decoder_only = not self.model.config.text_config.is_encoder_decoder
        log.info("blip2: %s from %s on %s/%s", self.kind, folder, self.device, self.dtype)

    def caption_images(self, images: list[np.ndarray], prompt: str | None = None) -> list[str]:
        """One caption per uint8 (H, W, 3) image, as one ``generate`` call.

        ``prompt`` overrides the configured prompt (the same text for the whole batch, so no padding is
        needed and left/right padding cannot matter).
        """
        if not images:
            return []
        import torch

        p: Blip2Params = self.params
        text = prompt if prompt is not None else self.prompt
        pil = [_to_pil(im) for im in images]
        if text is None and self.decoder_only:
            # generate() itself starts from the image placeholders + the LM's bos: plain captioning
            inputs = self.processor(images=pil, return_tensors="pt")
        else:
            # T5 has no bos for that default: an empty prompt encodes to its eos, as LAVIS feeds it
            inputs = self.processor(images=pil, text=[text or ""] * len(pil), return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=p.max_new_tokens,
                min_new_tokens=p.min_new_tokens,
                num_beams=p.num_beams,
                repetition_penalty=p.repetition_penalty,
                do_sample=False,
            )
        if self.decoder_only:
            # A decoder-only LM returns its input (image placeholders + bos + prompt) before the new tokens.
            n_in = (
                inputs["input_ids"].shape[1]
                if "input_ids" in inputs
                else self.model.config.num_query_tokens + 1
            )
            out = out[:, n_in:]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [t.strip() for t in texts]



def _to_pil(image: np.ndarray):  # -> PIL.Image.Image
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    return Image.fromarray(np.ascontiguousarray(image))
