"""caption backend ``lavis``: Salesforce LAVIS (BLIP-2 OPT/T5, BLIP) captioning from local files only.

salesforce-lavis 1.0.2 needs transformers 4.26 and numpy<2, so it cannot live in ``.venv``: its actors run
under the interpreter of ``.venv-lavis`` (``datagen/envs/setup_lavis.sh``) through Ray's per-actor
``runtime_env`` -- see :meth:`LavisCaption.runtime_env`. This module is imported in both envs: at module level
it uses only the standard library and what ``datagen.stages.base`` needs (numpy, and cv2/torch lazily);
``lavis`` itself is imported in ``__init__``, i.e. only inside the actor. ``check`` and ``identity`` run in
the driver and read files only.

A model folder (the ``model`` param) holds everything LAVIS would otherwise download::

    lavis_model.yaml        arch, model_type, checkpoint file, config overrides (see docs/BACKENDS_blip2_lavis_sd.md)
    <checkpoint>.pth        LAVIS checkpoint, {"model": state_dict}, e.g. blip2_caption_opt2.7b.pth
    bert-base-uncased/      LAVIS always loads this name; it is resolved relative to the folder
    eva_vit_g.pth           EVA ViT-g weights (BLIP-2 with vit_model eva_clip_g)
    opt-2.7b/ | flan-t5-xl/ the language model as a Hugging Face folder (BLIP-2 only)
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datagen.registry import register
from datagen.stages.base import ImageCaptioner, StageContext, file_sha256

log = logging.getLogger(__name__)

MODEL_YAML = "lavis_model.yaml"
EVA_WEIGHTS = "eva_vit_g.pth"
BERT_DIR = "bert-base-uncased"
# Architectures whose ``generate`` captions an image; other LAVIS models (ITM, feature extractors) do not.
CAPTION_ARCHS = ("blip2_opt", "blip2_t5", "blip_caption")
# Overrides the driver may resolve relative to the model folder (Hugging Face folders, json configs).
_PATH_KEYS = ("opt_model", "t5_model", "med_config_path")
# EVA ViT-g as LAVIS's create_eva_vit_g builds it; lavis_model.yaml may override (tiny test models do).
EVA_G = {"patch_size": 14, "embed_dim": 1408, "depth": 39, "num_heads": 16, "mlp_ratio": 4.3637}
_REPO_ROOT = Path(__file__).resolve().parents[3]
PYTHON_ENV_VAR = "LAYERDIFF_LAVIS_PYTHON"


def default_python() -> Path:
    """The LAVIS env's interpreter: ``$LAYERDIFF_LAVIS_PYTHON``, else ``<repo>/.venv-lavis/bin/python``."""
    return Path(os.environ.get(PYTHON_ENV_VAR) or _REPO_ROOT / ".venv-lavis" / "bin" / "python")


@dataclass
class LavisParams:
    """Settings of the ``lavis`` caption backend."""

    model: str = "weights/lavis-blip2-opt2.7b-coco"  # folder with lavis_model.yaml
    prompt: str | None = None  # None: the model type's own prompt ("a photo of" for caption_coco_opt*)
    num_beams: int = 5
    max_length: int = 30  # new tokens
    min_length: int = 1  # LAVIS generate() defaults: 5 beams, 30 tokens, min 1
    repetition_penalty: float = 1.0
    keep_source_caption: bool = False  # keep a sidecar caption from the source instead of captioning
    allow_pickle: bool = False  # torch.load(weights_only=False) for checkpoints that hold non-tensor objects
    python: str | None = None  # interpreter of the LAVIS env; None: default_python()
    device: str = "auto"  # "auto": cuda when visible, else cpu


@dataclass(frozen=True)
class ModelSpec:
    """What ``lavis_model.yaml`` says, with paths made absolute."""

    folder: Path
    arch: str
    model_type: str
    checkpoint: Path
    config: dict[str, Any]  # merged over LAVIS's default yaml: {"model": {...}, "preprocess": {...}}
    eva_vit: dict[str, Any]

    @property
    def vit_model(self) -> str:
        return str(self.config.get("model", {}).get("vit_model", "eva_clip_g"))


def read_spec(folder: str | Path) -> ModelSpec:
    """Parse and validate ``<folder>/lavis_model.yaml``; errors name the file and what is expected."""
    import yaml

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"lavis: model folder {folder} does not exist; expected a folder with {MODEL_YAML} "
            "(see docs/BACKENDS_blip2_lavis_sd.md)"
        )
    spec_file = folder / MODEL_YAML
    if not spec_file.is_file():
        raise FileNotFoundError(f"lavis: {spec_file} is missing; the model folder must hold {MODEL_YAML}")
    try:
        raw = yaml.safe_load(spec_file.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"lavis: {spec_file} is not valid YAML: {err}") from None
    if not isinstance(raw, dict) or not {"arch", "model_type", "checkpoint"} <= set(raw):
        raise ValueError(f"lavis: {spec_file} must be a mapping with keys arch, model_type, checkpoint")
    if raw["arch"] not in CAPTION_ARCHS:
        raise ValueError(
            f"lavis: {spec_file}: arch {raw['arch']!r} does not caption; use one of {CAPTION_ARCHS}"
        )
    config = raw.get("config") or {}
    model_cfg = dict(config.get("model") or {})
    for key in _PATH_KEYS:
        value = model_cfg.get(key)
        if isinstance(value, str) and not os.path.isabs(value) and (folder / value).exists():
            model_cfg[key] = str((folder / value).resolve())
    config = {**config, "model": model_cfg}
    return ModelSpec(
        folder=folder.resolve(),
        arch=str(raw["arch"]),
        model_type=str(raw["model_type"]),
        checkpoint=(folder / str(raw["checkpoint"])).resolve(),
        config=config,
        eva_vit={**EVA_G, **(raw.get("eva_vit") or {})},
    )


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"lavis: {path} is missing; expected {what}")


def check_folder(params: LavisParams) -> ModelSpec:
    """Every file LAVIS will read, before any data is: the spec, checkpoint, bert, EVA and LM folders."""
    spec = read_spec(params.model)
    _require(spec.checkpoint, f"the LAVIS checkpoint named in {MODEL_YAML} ({spec.checkpoint.name})")
    with open(spec.checkpoint, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # torch zip archive or legacy pickle
        raise ValueError(
            f"lavis: {spec.checkpoint} is not a torch checkpoint (.pth with {{'model': state_dict}})"
        )
    bert = spec.folder / BERT_DIR
    for name in ("config.json", "vocab.txt"):
        _require(bert / name, f"{name} of bert-base-uncased (LAVIS loads the Q-Former/BERT from {BERT_DIR}/)")
    # transformers 4.26 without the safetensors package (not in .venv-lavis) reads only *.bin weights.
    _require(
        bert / "pytorch_model.bin", "the bert-base-uncased weights (the .bin file; .safetensors is not read)"
    )
    if spec.arch.startswith("blip2"):
        if spec.vit_model != "eva_clip_g":
            raise ValueError(f"lavis: vit_model {spec.vit_model!r} is not supported offline; use eva_clip_g")
        _require(spec.folder / EVA_WEIGHTS, "the EVA ViT-g weights LAVIS downloads as eva_vit_g.pth")
        lm_key = "opt_model" if spec.arch == "blip2_opt" else "t5_model"
        lm = spec.config["model"].get(lm_key)
        if not lm or not os.path.isabs(lm):
            raise FileNotFoundError(
                f"lavis: {spec.folder / MODEL_YAML}: config.model.{lm_key} must name the language model's "
                f"Hugging Face folder inside {spec.folder} (got {lm!r})"
            )
        _require(Path(lm) / "config.json", f"the {lm_key} Hugging Face folder's config.json")
        if not any((Path(lm) / w).is_file() for w in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            raise FileNotFoundError(
                f"lavis: {Path(lm) / 'pytorch_model.bin'} is missing; expected the {lm_key} weights as .bin "
                "(or sharded with pytorch_model.bin.index.json): transformers 4.26 here reads no .safetensors"
            )
    if params.prompt is not None and spec.arch == "blip_caption":
        raise ValueError("lavis: blip_caption uses its checkpoint's own prompt; set prompt: null")
    return spec


@contextlib.contextmanager
def offline_lavis(spec: ModelSpec) -> Iterator[None]:
    """Make LAVIS build ``spec`` from local files: no downloads, EVA from the folder, bert from the folder.

    LAVIS hard-codes ``from_pretrained("bert-base-uncased")`` (cwd-relative when such a folder exists), the
    EVA ViT-g download and checkpoint URLs; we chdir into the model folder, replace ``create_eva_vit_g`` by
    the same construction reading ``eva_vit_g.pth`` from the folder, and skip LAVIS's own checkpoint loading
    (:func:`load_checkpoint` does it, strictly). Only meant for a dedicated actor process (it chdirs).
    """
    from functools import partial

    import lavis.common.dist_utils as dist_utils
    import lavis.models.base_model as base_model
    import lavis.models.blip2_models.blip2 as blip2_mod
    import lavis.models.eva_vit as eva_vit
    import torch
    from torch import nn

    def no_download(url: str, *args: Any, **kwargs: Any) -> str:
        raise FileNotFoundError(f"lavis: the model tried to download {url}; put that file in {spec.folder}")

    def create_eva(
        img_size: int = 224,
        drop_path_rate: float = 0.4,
        use_checkpoint: bool = False,
        precision: str = "fp16",
    ) -> nn.Module:
        dims = spec.eva_vit
        model = eva_vit.VisionTransformer(
            img_size=img_size,
            patch_size=dims["patch_size"],
            use_mean_pooling=False,
            embed_dim=dims["embed_dim"],
            depth=dims["depth"],
            num_heads=dims["num_heads"],
            mlp_ratio=dims["mlp_ratio"],
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_checkpoint=use_checkpoint,
        )
        path = spec.folder / EVA_WEIGHTS
        state = torch.load(path, map_location="cpu", weights_only=True)
        eva_vit.interpolate_pos_embed(model, state)  # as LAVIS does: the caption models run at 364 px
        bad = model.load_state_dict(state, strict=False)
        if bad.missing_keys:
            raise ValueError(f"lavis: {path} does not match the EVA ViT (missing {bad.missing_keys[:3]})")
        if precision == "fp16":
            eva_vit.convert_weights_to_fp16(model)
        return model

    saved: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, attr: str, value: Any) -> None:
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    for mod in (dist_utils, base_model, blip2_mod, eva_vit):
        if hasattr(mod, "download_cached_file"):
            patch(mod, "download_cached_file", no_download)
    patch(blip2_mod, "create_eva_vit_g", create_eva)
    patch(base_model.BaseModel, "load_checkpoint_from_config", lambda self, cfg, **kw: None)
    cwd = os.getcwd()
    os.chdir(spec.folder)
    try:
        yield
    finally:
        os.chdir(cwd)
        for obj, attr, value in reversed(saved):
            setattr(obj, attr, value)


def load_checkpoint(model: Any, spec: ModelSpec, allow_pickle: bool = False) -> None:
    """Load ``spec.checkpoint`` into ``model``; every weight not loaded elsewhere must be in it."""

    import torch

    try:
        ckpt = torch.load(spec.checkpoint, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"lavis: {spec.checkpoint} holds more than tensors ({str(err).splitlines()[0]}); "
            "set allow_pickle: true if you trust the file"
        ) from None
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"lavis: {spec.checkpoint} is not a readable torch checkpoint: {err}") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"lavis: {spec.checkpoint} is not a LAVIS checkpoint ({{'model': state_dict}} expected)"
        )
    result = model.load_state_dict(state, strict=False)
    # The language model comes from its HF folder and, for BLIP-2, the ViT from eva_vit_g.pth.
    elsewhere = ("opt_model.", "t5_model.") + (("visual_encoder.",) if spec.arch.startswith("blip2") else ())
    missing = [k for k in result.missing_keys if not k.startswith(elsewhere)]
    if missing:
        raise ValueError(
            f"lavis: {spec.checkpoint} does not fit {spec.arch}/{spec.model_type}: {len(missing)} weights "
            f"missing, e.g. {missing[:3]}"
        )


def build_model(spec: ModelSpec, device: str, allow_pickle: bool = False, load_weights: bool = True):
    """LAVIS model + eval image processor for ``spec``, the way ``load_model_and_preprocess`` builds them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import lavis.models  # noqa: F401 - registers the architectures
    from lavis.common.registry import registry
    from lavis.models import load_preprocess
    from omegaconf import OmegaConf

    model_cls = registry.get_model_class(spec.arch)
    cfg = OmegaConf.merge(OmegaConf.load(model_cls.default_config_path(spec.model_type)), spec.config)
    with offline_lavis(spec):
        model = model_cls.from_config(cfg.model)
    if load_weights:
        load_checkpoint(model, spec, allow_pickle)
    model.eval()
    if device == "cpu":
        model = model.float()  # as load_model_and_preprocess: the LM loads in fp16/bf16
    vis_processors, _ = load_preprocess(cfg.preprocess)
    return model.to(device), vis_processors["eval"]


@register
class LavisCaption(ImageCaptioner):
    """Global caption of each item with a LAVIS captioning model (BLIP-2 OPT/T5 or BLIP)."""

    stage = "caption"
    name = "lavis"
    Params = LavisParams
    version = "1"

    @classmethod
    def runtime_env(cls, params: LavisParams) -> dict[str, Any]:
        """Ray ``runtime_env`` for this stage's actors: run them under the LAVIS env's interpreter.

        Pass it as ``map_batches(..., ray_remote_args={"runtime_env": LavisCaption.runtime_env(params)})``.
        The interpreter must be the driver's Python version with the driver's ray (setup_lavis.sh does this)
        and imports ``datagen`` through a .pth file written by setup_lavis.sh.
        """
        python = Path(params.python) if params.python else default_python()
        return {
            "py_executable": str(python),
            "env_vars": {
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
            },
        }

    @classmethod
    def check(cls, params: LavisParams) -> None:
        check_folder(params)
        python = Path(params.python) if params.python else default_python()
        if not python.exists():
            raise FileNotFoundError(
                f"lavis: the LAVIS env's interpreter {python} is missing; run bash datagen/envs/setup_lavis.sh"
            )

    @classmethod
    def identity(cls, params: LavisParams) -> dict[str, Any]:
        spec = read_spec(params.model)
        return {
            "backend": cls.name,
            "model": f"lavis:{spec.arch}/{spec.model_type}",
            "checkpoint": {"name": spec.checkpoint.name, "sha256": file_sha256(spec.checkpoint)},
            "version": cls.version,
            "licence": "BSD-3-Clause",  # salesforce/LAVIS and its BLIP / BLIP-2 checkpoints
        }

    def __init__(self, params: LavisParams | None = None, context: StageContext | None = None) -> None:
        super().__init__(params, context)
        import torch

        p: LavisParams = self.params
        self.spec = check_folder(p)
        if p.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = p.device
        log.info(
            "lavis: loading %s/%s from %s (python %s)",
            self.spec.arch,
            self.spec.model_type,
            self.spec.folder,
            sys.executable,
        )
        self.model, self.vis_processor = build_model(self.spec, self.device, p.allow_pickle)

    def caption_images(self, images: list[np.ndarray]) -> list[str]:
        """One caption per uint8 (H, W, 3) image, generated as one batch."""
        if not images:
            return []
        import torch
        from PIL import Image

        p: LavisParams = self.params
        batch = torch.stack([self.vis_processor(Image.fromarray(np.ascontiguousarray(im))) for im in images])
        samples: dict[str, Any] = {"image": batch.to(self.device)}
        if p.prompt is not None:
            samples["prompt"] = p.prompt
        with torch.inference_mode():
            captions = self.model.generate(
                samples,
                num_beams=p.num_beams,
                max_length=p.max_length,
                min_length=p.min_length,
                repetition_penalty=p.repetition_penalty,
            )
        return [c.strip() for c in captions]

