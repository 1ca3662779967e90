"""Ground stage backend ``groundingdino``: open-set boxes for the caption's noun phrases.

Loads groundingdino-py 0.4.0 from three local files, never from a hub:

* ``config``: the official python config (``GroundingDINO_SwinT_OGC.py``) or a tiny variant. It is
  parsed as literal assignments, not executed (upstream imports it as a module).
* ``checkpoint``: ``{"model": state_dict}`` as the official release, read with ``weights_only=True``.
* ``text_encoder``: a local ``bert-base-uncased``-style folder (config.json, vocab.txt, weights);
  tokenizer and BERT are loaded from it with ``local_files_only=True``.

Each box gets one of the item's phrases: the prompt is ``detector_prompt(phrases)`` (``"cat . red
ball ."``), each phrase owns the tokens of its segment of the prompt, and a box takes the phrase
holding its best token (the phrase's mean token probability must pass ``text_threshold``). Upstream
instead decodes the tokens above ``text_threshold`` (``get_phrases_from_posmap``), which can give a
partial or merged phrase; this always yields one of the caption's phrases.
"""

from __future__ import annotations

import ast
import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from datagen.item import Detection, Item
from datagen.registry import register
from datagen.stages.base import Stage, file_sha256

CHECKPOINT_FILE = "groundingdino_swint_ogc.pth"
CONFIG_FILE = "GroundingDINO_SwinT_OGC.py"
TEXT_ENCODER_DIR = "bert-base-uncased"
# A local BERT folder needs its config, a vocabulary and weights (either file name transformers reads).
TEXT_ENCODER_FILES = ("config.json", "vocab.txt")
TEXT_ENCODER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# Keys the model build reads from the config; a config lacking one is not a GroundingDINO config.
_REQUIRED_CONFIG_KEYS = (
    "modelname", "backbone", "position_embedding", "return_interm_indices", "enc_layers", "dec_layers",
    "dim_feedforward", "hidden_dim", "nheads", "num_queries", "num_feature_levels", "two_stage_type",
    "max_text_len", "sub_sentence_present",
)  # fmt: skip
_SWIN_BACKBONES = ("swin_T_224_1k", "swin_B_224_22k", "swin_B_384_22k", "swin_L_224_22k", "swin_L_384_22k")


@dataclass
class GroundingDinoParams:
    """Settings of the ``groundingdino`` ground backend (YAML ``stages.ground.params``)."""

    checkpoint: str = f"weights/groundingdino/{CHECKPOINT_FILE}"
    config: str = f"weights/groundingdino/{CONFIG_FILE}"
    text_encoder: str = f"weights/{TEXT_ENCODER_DIR}"
    box_threshold: float = 0.35  # a query is a box when its best phrase-token probability passes this
    text_threshold: float = 0.25  # ... and the mean probability over its phrase's tokens passes this
    nms_iou: float = 0.5  # class-agnostic NMS: two phrases on one object make one layer
    # Quality filters, applied after NMS (counts of what each drops go to item.quality["ground"]).
    min_score: float = 0.35  # box score (best token probability) below this: dropped
    min_box_area: float = 0.002  # box smaller than this fraction of the image: too small for a layer
    max_box_area: float = 0.95  # box covering more than this fraction: background, not a foreground
    max_detections: int = 8  # best-scoring boxes kept per image (SAM cost grows with boxes)
    reject_empty: bool = True  # reject the item here when no box survives
    # Official preprocessing: shorter side to 800, longer side at most 1333.
    image_short_side: int = 800
    image_max_side: int = 1333
    precision: str = "auto"  # auto (fp16 autocast on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    # Only for a trusted checkpoint that holds more than tensors (weights_only=True refuses it).
    allow_pickle: bool = False


# -- loading ---------------------------------------------------------------------------------------


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``name = literal`` assignments of a GroundingDINO python config, without executing it."""
    path = Path(path)
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (SyntaxError, UnicodeDecodeError) as err:
        raise ValueError(f"GroundingDINO config {path}: not a python config ({err})") from None
    cfg: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        ):
            raise ValueError(
                f"GroundingDINO config {path}:{node.lineno}: only `name = literal` lines are read"
            )
        try:
            cfg[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise ValueError(f"GroundingDINO config {path}:{node.lineno}: value is not a literal") from None
    missing = [k for k in _REQUIRED_CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(
            f"GroundingDINO config {path} lacks {missing}; expected the shape of the official {CONFIG_FILE}"
        )
    if cfg["modelname"] != "groundingdino":
        raise ValueError(
            f"GroundingDINO config {path}: modelname is {cfg['modelname']!r}, not 'groundingdino'"
        )
    if cfg["hidden_dim"] != 256:  # the library hard-codes 256 in places (text/box heads)
        raise ValueError(f"GroundingDINO config {path}: hidden_dim must be 256, got {cfg['hidden_dim']}")
    return cfg


def local_text_encoder(path: str | Path) -> str:
    """The text encoder folder as the absolute path the model's constructor reads from.

    groundingdino calls ``AutoTokenizer/BertModel.from_pretrained(text_encoder_type)`` without
    ``local_files_only``. transformers reads an existing folder locally and only treats a name
    that is not a folder as a hub id, so handing it the resolved path of a folder that exists
    (with a config and weights, see :meth:`GroundingDinoStage.check`) keeps loading off the network.
    """
    folder = Path(path).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"GroundingDINO text encoder folder {path} lacks config.json (or does not exist)")
    return str(folder)


def _build_backbone(args: SimpleNamespace) -> Any:
    """Upstream ``build_backbone`` for Swin, plus ``backbone_overrides`` (embed_dim, depths, ...)
    from the config so that a tiny Swin can be built; without overrides it is the official one."""
    from groundingdino.models.GroundingDINO.backbone.backbone import Joiner, build_backbone
    from groundingdino.models.GroundingDINO.backbone.position_encoding import build_position_encoding
    from groundingdino.models.GroundingDINO.backbone.swin_transformer import build_swin_transformer

    overrides = dict(getattr(args, "backbone_overrides", None) or {})
    if args.backbone not in _SWIN_BACKBONES:
        if overrides:
            raise ValueError(f"backbone_overrides only apply to Swin backbones, not {args.backbone!r}")
        return build_backbone(args)
    indices = list(args.return_interm_indices)
    swin = build_swin_transformer(
        args.backbone,
        pretrain_img_size=int(args.backbone.split("_")[-2]),
        out_indices=tuple(indices),
        dilation=False,
        use_checkpoint=False,
        **overrides,
    )
    joiner = Joiner(swin, build_position_encoding(args))
    joiner.num_channels = list(swin.num_features[4 - len(indices) :])
    return joiner


def build_model(cfg: dict[str, Any], text_encoder: str | Path) -> Any:
    """A randomly initialised GroundingDINO for ``cfg`` (see :func:`read_config`), BERT from
    ``text_encoder``: upstream ``build_groundingdino`` with the Swin sizes open to overrides."""
    from groundingdino.models.GroundingDINO.groundingdino import GroundingDINO
    from groundingdino.models.GroundingDINO.transformer import build_transformer

    args = SimpleNamespace(**cfg)
    args.text_encoder_type = local_text_encoder(text_encoder)
    # Gradient checkpointing is a training device; in inference it only adds warnings.
    args.use_checkpoint = args.use_transformer_ckpt = False
    return GroundingDINO(
        _build_backbone(args),
        build_transformer(args),
        num_queries=args.num_queries,
        aux_loss=True,
        iter_update=True,
        query_dim=4,
        num_feature_levels=args.num_feature_levels,
        nheads=args.nheads,
        dec_pred_bbox_embed_share=args.dec_pred_bbox_embed_share,
        two_stage_type=args.two_stage_type,
        two_stage_bbox_embed_share=args.two_stage_bbox_embed_share,
        two_stage_class_embed_share=args.two_stage_class_embed_share,
        num_patterns=args.num_patterns,
        dn_number=0,
        dn_box_noise_scale=args.dn_box_noise_scale,
        dn_label_noise_ratio=args.dn_label_noise_ratio,
        dn_labelbook_size=args.dn_labelbook_size,
        text_encoder_type=args.text_encoder_type,
        sub_sentence_present=args.sub_sentence_present,
        max_text_len=args.max_text_len,
    )


def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    """The state dict of a ``{"model": state_dict}`` checkpoint, ``module.`` prefixes removed."""
    import pickle

    import torch

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise ValueError(
                f"GroundingDINO checkpoint {path} holds more than tensors; if you trust the file, set "
                "params.allow_pickle: true"
            ) from None
        raise ValueError(f"GroundingDINO checkpoint {path}: not a PyTorch checkpoint ({err})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"GroundingDINO checkpoint {path}: not a PyTorch checkpoint ({err})") from None
    if not (isinstance(obj, dict) and isinstance(obj.get("model"), dict)):
        got = sorted(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            f"GroundingDINO checkpoint {path}: expected {{'model': state_dict}} like {CHECKPOINT_FILE}, got {got}"
        )
    return {k.removeprefix("module."): v for k, v in obj["model"].items()}


def load_model(
    config: str | Path, checkpoint: str | Path, text_encoder: str | Path, allow_pickle: bool = False
) -> Any:
    """Build GroundingDINO from ``config`` + ``text_encoder`` and load ``checkpoint`` (eval, CPU).

    Every model tensor must come from the checkpoint; extra checkpoint keys (upstream's training
    ``label_enc``) are ignored, as upstream does with ``strict=False``.
    """
    cfg = read_config(config)
    state = read_checkpoint(checkpoint, allow_pickle)
    model = build_model(cfg, text_encoder)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        first = re.findall(r"size mismatch for [^\n]+", str(err))[:2]
        raise ValueError(
            f"GroundingDINO checkpoint {checkpoint} does not fit config {config} / text encoder "
            f"{text_encoder}: {'; '.join(first) or err}"
        ) from None
    if result.missing_keys:
        raise ValueError(
            f"GroundingDINO checkpoint {checkpoint} lacks {len(result.missing_keys)} of the model's "
            f"{len(model.state_dict())} tensors (e.g. {result.missing_keys[:3]}): not a checkpoint of "
            f"this config; expected {CHECKPOINT_FILE} for {CONFIG_FILE}"
        )
    return model.eval()


# -- the stage -------------------------------------------------------------------------------------


def prompt_segments(prompt: str) -> list[tuple[str, int, int]]:
    """``(text, start, end)`` of each phrase of a ``"a . b ."`` prompt (character spans)."""
    out = []
    for m in re.finditer(r"[^.]+", prompt):
        text = m.group().strip()
        if text:
            start = m.start() + m.group().index(text)
            out.append((text, start, start + len(text)))
    return out


def normalise_prompt(prompt: str) -> str:
    """Upstream's caption preprocessing: lower case, ending with a full stop."""
    prompt = prompt.lower().strip()
    return prompt if prompt.endswith(".") else prompt + "."


def _autocast(device: Any, precision: str, auto: str) -> contextlib.AbstractContextManager:
    import torch

    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()  # CPU autocast is slower than fp32 on most CPUs
    name = auto if precision == "auto" else precision
    if name == "bf16" and not torch.cuda.is_bf16_supported():
        name = "fp16"
    return torch.autocast("cuda", dtype=torch.bfloat16 if name == "bf16" else torch.float16)


@register
class GroundingDinoStage(Stage):
    """Boxes for the caption's phrases with GroundingDINO; batched over the stage batch."""

    stage = "ground"
    name = "groundingdino"
    Params = GroundingDinoParams
    version = "1"

    def __init__(self, params: GroundingDinoParams | None = None, context: Any = None) -> None:
        super().__init__(params, context)
        import torch

        p = self.params
        self.check(p)
        use_cuda = self.context.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.model = load_model(p.config, p.checkpoint, p.text_encoder, p.allow_pickle).to(self.device)
        self.tokenizer = self.model.tokenizer
        self.max_text_len = int(self.model.max_text_len)
        _autocast(self.device, p.precision, "fp16")  # validate precision now, not on the first batch

    # -- manifest ----------------------------------------------------------------------------------
    @classmethod
    def check(cls, params: GroundingDinoParams) -> None:
        """Fail before any data is read when a file is missing or is obviously not the right kind."""
        ckpt, cfg, enc = Path(params.checkpoint), Path(params.config), Path(params.text_encoder)
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"ground/groundingdino: checkpoint {ckpt} not found; expected the official "
                f"{CHECKPOINT_FILE} (see docs/BACKENDS_sam_gdino.md)"
            )
        _check_torch_file(ckpt, CHECKPOINT_FILE)
        if not cfg.is_file():
            raise FileNotFoundError(
                f"ground/groundingdino: config {cfg} not found; expected the official {CONFIG_FILE}"
            )
        if cfg.suffix != ".py":
            raise ValueError(f"ground/groundingdino: config {cfg} must be a python config like {CONFIG_FILE}")
        if not enc.is_dir():
            raise FileNotFoundError(
                f"ground/groundingdino: text encoder folder {enc} not found; expected a local "
                f"{TEXT_ENCODER_DIR} folder with {', '.join(TEXT_ENCODER_FILES)} and weights"
            )
        lacking = [f for f in TEXT_ENCODER_FILES if not (enc / f).is_file()]
        if not any((enc / f).is_file() for f in TEXT_ENCODER_WEIGHTS):
            lacking.append(" or ".join(TEXT_ENCODER_WEIGHTS))
        if lacking:
            raise FileNotFoundError(
                f"ground/groundingdino: text encoder folder {enc} lacks {lacking}; expected a "
                f"{TEXT_ENCODER_DIR} folder"
            )

    @classmethod
    def identity(cls, params: GroundingDinoParams) -> dict[str, Any]:
        cls.check(params)
        enc = Path(params.text_encoder)
        enc_files = sorted(f for f in enc.iterdir() if f.is_file())
        return {
            "backend": cls.name,
            "model": f"groundingdino:{Path(params.config).stem}:{read_config(params.config)['backbone']}",
            "checkpoint": {
                "name": Path(params.checkpoint).name,
                "sha256": file_sha256(params.checkpoint),
                "config": {"name": Path(params.config).name, "sha256": file_sha256(params.config)},
                "text_encoder": {"name": enc.name, "files": {f.name: file_sha256(f) for f in enc_files}},
            },
            "version": cls.version,
            "licence": "Apache-2.0",  # GroundingDINO code and checkpoints (the BERT text encoder: Apache-2.0)
        }

    # -- work --------------------------------------------------------------------------------------
    def process(self, items: list[Item]) -> None:
        import torch
        from groundingdino.util.misc import nested_tensor_from_tensor_list

        from datagen.phrases import detector_prompt, extract_phrases

        todo: list[tuple[Item, str]] = []
        for it in items:
            if not it.phrases:
                it.phrases = extract_phrases(it.caption)
            prompt = detector_prompt(it.phrases)
            if not prompt:
                it.reject(self.stage, f"no noun phrase to ground in caption {it.caption[:200]!r}")
                continue
            todo.append((it, normalise_prompt(prompt)))
        if not todo:
            return
        # Images of different sizes are zero-padded to a common one; the padding mask keeps the
        # predicted boxes relative to each image's own extent.
        images = nested_tensor_from_tensor_list([self._preprocess(it.image) for it, _ in todo])
        with torch.inference_mode(), _autocast(self.device, self.params.precision, "fp16"):
            out = self.model(images, captions=[prompt for _, prompt in todo])
        probs = out["pred_logits"].float().sigmoid().cpu()  # (B, queries, max_text_len)
        boxes = out["pred_boxes"].float().cpu()  # (B, queries, 4) cx, cy, w, h in [0, 1]
        for (it, prompt), prob, box in zip(todo, probs, boxes, strict=True):
            self._decode(it, prompt, prob, box)

    def _preprocess(self, image: np.ndarray) -> Any:
        """Upstream's inference transform: resize (short side, max side), to tensor, normalise."""
        import torchvision.transforms.functional as F
        from groundingdino.datasets.transforms import resize
        from PIL import Image

        if image is None or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 image, got {None if image is None else image.shape}")
        pil, _ = resize(
            Image.fromarray(image), None, self.params.image_short_side, self.params.image_max_side
        )
        tensor = F.normalize(F.to_tensor(pil), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        return tensor.to(self.device)

    def _phrase_tokens(self, prompt: str) -> list[tuple[str, list[int]]]:
        """Each prompt phrase with the indices of its tokens (those the model scores)."""
        enc = self.tokenizer(prompt, return_offsets_mapping=True)
        offsets = [(s, e) for s, e in enc["offset_mapping"]][: self.max_text_len]
        out = []
        for text, start, end in prompt_segments(prompt):
            tokens = [t for t, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
            if tokens:  # a phrase cut off by max_text_len has none
                out.append((text, tokens))
        return out

    def _decode(self, it: Item, prompt: str, prob: Any, box: Any) -> None:
        """Threshold, name, NMS and filter one image's queries into ``it.detections``."""
        import torch
        from torchvision.ops import box_convert, nms

        from datagen.phrases import detector_prompt

        p = self.params
        h, w = it.image.shape[:2]
        phrases = self._phrase_tokens(prompt)
        # prompt segment -> the item's phrase it was written from (detector_prompt cleans phrases)
        by_segment = {
            normalise_prompt(detector_prompt([ph])).removesuffix(".").strip(): ph for ph in it.phrases
        }
        if not phrases:
            it.detections = []
            stats: dict[str, Any] = {"queries": int(prob.shape[0]), "above_box_threshold": 0}
        else:
            # The box score is the best probability over the phrases' tokens: upstream takes all
            # tokens, but [CLS]/[SEP]/"." are never positives in training, so this only differs
            # for an untrained model. The box is named by the phrase holding that best token; the
            # phrase as a whole (mean over its tokens) must pass text_threshold.
            best = torch.stack([prob[:, toks].max(dim=1).values for _, toks in phrases], dim=1)
            mean = torch.stack([prob[:, toks].mean(dim=1) for _, toks in phrases], dim=1)
            score, phrase_idx = best.max(dim=1)
            phrase_score = mean.gather(1, phrase_idx[:, None])[:, 0]
            above = score > p.box_threshold
            named = above & (phrase_score > p.text_threshold)
            xyxy = box_convert(box, "cxcywh", "xyxy") * torch.tensor([w, h, w, h], dtype=torch.float32)
            xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, w)
            xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, h)
            idx = torch.nonzero(named).flatten()
            keep = idx[nms(xyxy[idx], score[idx], p.nms_iou)]  # sorted by score, descending
            stats = {
                "queries": int(score.numel()),
                "above_box_threshold": int(above.sum()),
                "no_phrase": int((above & ~named).sum()),
                "after_nms": int(keep.numel()),
                "low_score": 0, "too_small": 0, "too_large": 0, "over_max": 0,
            }  # fmt: skip
            dets = []
            for q in keep.tolist():
                x0, y0, x1, y1 = (float(v) for v in xyxy[q])
                area = (x1 - x0) * (y1 - y0) / float(w * h)
                reason = (
                    "low_score" if float(score[q]) < p.min_score
                    else "too_small" if area < p.min_box_area or x1 <= x0 or y1 <= y0
                    else "too_large" if area > p.max_box_area
                    else "over_max" if len(dets) >= p.max_detections
                    else None
                )  # fmt: skip
                if reason:
                    stats[reason] += 1
                    continue
                text = phrases[int(phrase_idx[q])][0]
                dets.append(
                    Detection(
                        phrase=by_segment.get(text, text),
                        box=(x0, y0, x1, y1),
                        score=float(score[q]),
                        extra={"phrase_score": round(float(phrase_score[q]), 4)},
                    )
                )
            it.detections = dets
        it.quality["ground"] = stats
        if not it.detections and p.reject_empty:
            it.reject(
                self.stage,
                f"no box for {it.phrases} passed box_threshold {p.box_threshold}, text_threshold "
                f"{p.text_threshold} and the quality filters ({stats})",
            )


def _check_torch_file(path: Path, expected: str) -> None:
    """Cheap format check without loading: a torch zip archive or a legacy pickle."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise ValueError(f"{path} is not a PyTorch checkpoint (starts with {head!r}); expected {expected}")
