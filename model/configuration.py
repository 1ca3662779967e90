"""LayerDiff model configuration: one dataclass, two presets (``tiny`` and ``sd15``).

The config describes what is *not* stored in a component folder: the layer layout, the training
objective, the noise schedule and the sizes of the new modules. Component architectures come from
the base checkpoint (``sd15``) or from the ``unet`` / ``text_encoder`` dicts here (``tiny``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "layerdiff_config.json"
PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")  # "sample": the UNet predicts x0
# Training options measured as no gain on the fidelity benchmark and removed (docs/research/fidelity.md),
# with the value that left them off (saved configs carry them all), and the settings only those options read.
REMOVED_OPTIONS: dict[str, Any] = {
    "coord_channels": False, "mask_encoding": "binary", "snr_per_role": False, "mask_edge_weight": 0.0,
    "timestep_bias": 1.0, "timestep_logit_normal": [], "self_conditioning": False, "input_perturbation": 0.0,
    "mask_corruption": 0.0, "mask_binarity_weight": 0.0, "mask_logits": False, "zero_init_residuals": False,
}
REMOVED_SETTINGS = ("mask_distance_width", "mask_corruption_blur", "mask_corruption_warp", "mask_corruption_min_t",
                    "mask_binarity_max_t")


@dataclass
class LayerDiffConfig:
    """Everything needed to build (or rebuild) a :class:`model.LayerDiffModel`."""

    name: str = "tiny"
    resolution: int = 32  # pixel size of every layer
    max_layers: int = 3  # K_max foregrounds; L = 1 + 2 * K_max latent layers
    pixel_space: bool = True  # True: no VAE, a "latent" is the [-1, 1] image itself
    pretrained_path: str | None = None  # local diffusers SD 1.5 folder (sd15 only); provenance once saved
    patch_size: int = 1  # space-to-depth stem of the UNet (the diffusion still runs on whole layers)
    # Objective and noise schedule (the schedule is stored as a diffusers DDPMScheduler config).
    prediction_type: str = "v_prediction"
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    zero_terminal_snr: bool = True  # alpha_bar(T) = 0: the last step sees pure noise, as it does at sampling
    composite_loss_weight: float = 0.0  # optional composite-consistency term
    # Diffusion-loss weight of each slot role (background, foregrounds, masks). A mask's shape is a
    # few boundary pixels of an otherwise constant layer: weighting masks up puts the loss there.
    role_loss_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    # Input scaling (Chen 2023, "On the importance of noise scheduling"): each role's latents are
    # multiplied by this before noising, so b < 1 divides that role's SNR by 1/b^2 at every step. A
    # binary mask is so redundant that its shape is settled in the first few (noisiest) steps;
    # scaled down, it is settled over more of the schedule (the tiny-s3 recipe: masks at 0.3).
    role_input_scale: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    # > 0: weigh each step's error in x0 space by min(SNR + 1, gamma) (eps: min(SNR, gamma)); for v this
    # caps the low-noise steps (Min-SNR, Hang et al. 2023, with SNR + 1 so pure noise keeps weight 1),
    # for x0 ("sample") it raises them from 1 towards gamma.
    snr_gamma: float = 0.0
    num_inference_steps: int = 25  # default DDIM steps (trailing spacing)
    # Text.
    tokenizer_type: str = "words"  # "words" (built from model.vocabulary) or "clip" (base checkpoint)
    max_text_length: int = 32
    train_text_encoder: bool = True
    train_unet: bool = True  # False: only the new modules train

    # New modules.
    inter_layer_heads: int = 2
    inter_layer_ff_mult: int = 2  # 0 = attention only
    enhancer_layers: int = 1
    enhancer_heads: int = 2
    enhancer_ff_mult: int = 2

    # Component architectures for models built from scratch (ignored when loading a checkpoint).
    unet: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} not in {PREDICTION_TYPES}")
        if self.prediction_type == "epsilon" and self.zero_terminal_snr:
            # At alpha_bar = 0 the noise is the input itself: epsilon prediction carries no signal there.
            raise ValueError("zero_terminal_snr needs prediction_type 'v_prediction' or 'sample'")
        if not 1 <= self.max_layers:
            raise ValueError(f"max_layers must be >= 1, got {self.max_layers}")
        if len(self.role_loss_weights) != 3 or min(self.role_loss_weights) < 0:
            raise ValueError(f"role_loss_weights must be 3 weights >= 0 (background, foreground, mask), "
                             f"got {self.role_loss_weights}")
        if len(self.role_input_scale) != 3 or min(self.role_input_scale) <= 0:
            raise ValueError(f"role_input_scale must be 3 scales > 0 (background, foreground, mask), "
                             f"got {self.role_input_scale}")
        if self.snr_gamma < 0:
            raise ValueError(f"snr_gamma must be >= 0, got {self.snr_gamma}")
        if self.tokenizer_type not in ("words", "clip"):
            raise ValueError(f"tokenizer_type {self.tokenizer_type!r} not in ('words', 'clip')")

    @property
    def num_slots(self) -> int:
        """L, the number of latent layers per sample: background, K_max foregrounds, K_max masks."""
        return 1 + 2 * self.max_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerDiffConfig:
        """The config of a saved dict. A training option since removed (``REMOVED_OPTIONS``) is dropped
        when it holds the value that left it off, and its settings (``REMOVED_SETTINGS``) always; an
        option left on is an error naming it: the model was trained with a branch this code no longer has."""
        data = {k: v for k, v in copy.deepcopy(data).items() if k not in REMOVED_SETTINGS}
        for key, neutral in REMOVED_OPTIONS.items():
            if key in data and data.pop(key) != neutral:
                raise ValueError(f"LayerDiffConfig field {key!r} was removed (measured no gain, "
                                 f"docs/research/fidelity.md); a model trained with it cannot be loaded")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown LayerDiffConfig fields: {sorted(unknown)}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> LayerDiffConfig:
        return cls.from_dict(json.loads((Path(directory) / CONFIG_NAME).read_text()))

    def replace(self, **overrides: Any) -> LayerDiffConfig:
        """A copy with ``overrides`` applied; dict-valued fields are merged key by key."""
        data = self.to_dict()
        for key, value in overrides.items():
            if key not in data:
                raise ValueError(f"unknown LayerDiffConfig field {key!r}")
            if isinstance(data[key], dict) and isinstance(value, dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return LayerDiffConfig.from_dict(data)


# The tiny UNet. A 2x2 space-to-depth stem (patch_size=2) runs the UNet at 16x16 on 12 channels:
# about half the cost of a 32x32 UNet of the same widths, with the diffusion still on exact pixels.
# Three levels (16, 8, 4); transformer blocks (self-, cross- and inter-layer attention) at 8 and 4
# only: at 16 their 256-token self-attention doubled the step time (measured, model/README.md).
# Eight GroupNorm groups rather than 32: one channel per group would erase a flat layer's colour
# from the normalised branch.
TINY_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 12,
    "out_channels": 12,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 48, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 64,
    "attention_head_dim": 2,  # diffusers' legacy name: this is the number of heads
    "use_linear_projection": True,
    # Each layer's prompt, attention-pooled, joins the time embedding, so the 16x16 ResNets (no
    # attention there) hear the prompt too; colour right on 100% of layers vs 95% without (8-min pilots).
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 2,
}

TINY_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "hidden_act": "gelu",
}

# Stable Diffusion 1.5's published component configs (public facts; no weights). Used to build an
# sd15-shaped model on the meta device for parameter counts when no checkpoint folder is at hand.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,
}

SD15_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}

SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


def tiny_config(**overrides: Any) -> LayerDiffConfig:
    """Pixel space, 32x32, ~1.8M parameters; trains from scratch on a CPU (recipe: docs/research/fidelity.md)."""
    base = LayerDiffConfig(
        name="tiny",
        resolution=32,
        pixel_space=True,
        patch_size=2,
        # x0 prediction: binary masks and flat layers are easy outputs, noise is not; v-prediction
        # left grain in every layer (masks 86% binary, vs 96% with x0, in 8-minute pilots).
        prediction_type="sample",
        beta_schedule="squaredcos_cap_v2",
        zero_terminal_snr=True,
        snr_gamma=5.0,  # x0-space weight min(SNR + 1, 5): low-noise steps up to 5x
        role_loss_weights=[1.0, 1.0, 3.0],  # masks x3: a shape is a few boundary pixels
        composite_loss_weight=1.0,
        num_inference_steps=25,
        tokenizer_type="words",
        max_text_length=32,
        train_text_encoder=True,
        inter_layer_heads=2,
        inter_layer_ff_mult=2,
        enhancer_heads=2,
        unet=copy.deepcopy(TINY_UNET),
        text_encoder=copy.deepcopy(TINY_TEXT_ENCODER),
    )
    return base.replace(**overrides)


def tiny_s3_config(**overrides: Any) -> LayerDiffConfig:
    """The tiny config with masks at input scale 0.3 and UNet widths 16/24/32 ("S3"): the recipe that
    meets every fidelity bar after 120 CPU-minutes (BENCHMARKS.md). A mask's SNR is 11x lower at every
    step, so its place and outline are settled over the middle of the schedule instead of the first
    few steps; the narrower UNet runs 1.6x the steps a minute and learns outlines faster per step."""
    unet = {"block_out_channels": [16, 24, 32], **overrides.pop("unet", {})}
    return tiny_config(**{"name": "tiny-s3", "role_input_scale": [1.0, 1.0, 0.3], **overrides, "unet": unet})


def sd15_config(pretrained_path: str | None = None, **overrides: Any) -> LayerDiffConfig:
    """Latent space on a local diffusers SD 1.5 folder; the new modules are new weights.

    Defaults to the checkpoint's own objective (epsilon, scaled-linear betas), so a zero-initialised
    model starts as a working SD 1.5 denoiser; ``prediction_type="v_prediction",
    zero_terminal_snr=True`` switches to the objective the tiny config uses.
    """
    base = LayerDiffConfig(
        name="sd15",
        resolution=512,
        pixel_space=False,
        pretrained_path=pretrained_path,
        prediction_type="epsilon",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        zero_terminal_snr=False,
        num_inference_steps=50,
        tokenizer_type="clip",
        max_text_length=77,
        train_text_encoder=False,
        inter_layer_heads=8,
        inter_layer_ff_mult=2,
        enhancer_heads=8,
        unet=copy.deepcopy(SD15_UNET),
        text_encoder=copy.deepcopy(SD15_TEXT_ENCODER),
        vae=copy.deepcopy(SD15_VAE),
    )
    return base.replace(**overrides)


PRESETS = {"tiny": tiny_config, "tiny-s3": tiny_s3_config, "sd15": sd15_config}


def get_config(name: str, **overrides: Any) -> LayerDiffConfig:
    """The preset ``name`` (tiny, tiny-s3 or sd15) with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
