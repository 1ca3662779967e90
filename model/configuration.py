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


@dataclass
class LayerDiffConfig:
    """Everything needed to build (or rebuild) a :class:`model.LayerDiffModel`."""

    name: str = "tiny"
    resolution: int = 32  # pixel size of every layer
    max_layers: int = 3  # K_max foregrounds; L = 1 + 2 * K_max latent layers
    pixel_space: bool = True  # True: no VAE, a "latent" is the [-1, 1] image itself
    pretrained_path: str | None = None  # local diffusers SD 1.5 folder (sd15 only); provenance once saved
    patch_size: int = 1  # space-to-depth stem of the UNet (the diffusion still runs on whole layers)
    # The UNet also gets two coordinate channels (x, y in [-1, 1]; CoordConv, Liu et al. 2018), so
    # attention could average where an object's pixels are and each pixel tell its offset from it.
    # Tried against the fidelity benchmark's shape failure; it did not help (BENCHMARKS.md).
    coord_channels: bool = False

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
    # scaled down, it is settled over more of the schedule.
    role_input_scale: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    # How a pixel-space model represents masks: "binary" (-1 / +1, as stored) or "distance" (a
    # signed distance to the boundary, / mask_distance_width px and clipped; decoded by its sign).
    mask_encoding: str = "binary"
    mask_distance_width: float = 3.0
    # > 0: weigh each step's error in x0 space by min(SNR + 1, gamma) (eps: min(SNR, gamma)); for v this
    # caps the low-noise steps (Min-SNR, Hang et al. 2023, with SNR + 1 so pure noise keeps weight 1),
    # for x0 ("sample") it raises them from 1 towards gamma.
    snr_gamma: float = 0.0
    # True: the SNR in that weight is each role's own (image SNR x role_input_scale^2), so a mask
    # scaled down is capped where *its* SNR is high, not where the image's is (same as False at scale 1).
    snr_per_role: bool = False
    # > 0: mask-slot pixels within one pixel of the true boundary weigh 1 + this (a shape is its edge).
    mask_edge_weight: float = 0.0
    # Training timesteps drawn as T * u^(1 / bias): 1 = uniform; > 1 = more of the noisy steps, where
    # a layer's layout and shape are decided.
    timestep_bias: float = 1.0
    # [mean, std]: draw t / T = sigmoid(mean + std * n), n ~ N(0, 1) instead (the logit-normal
    # density of Esser et al. 2024, SD3): most steps in the middle of the schedule, mean > 0 noisier.
    timestep_logit_normal: list[float] = field(default_factory=list)
    # Self-conditioning (Chen et al. 2022, "Analog Bits"): the UNet also sees its previous x0 estimate
    # (the UNet takes twice the latent channels); trained on half of the batches, used at every step.
    self_conditioning: bool = False
    # > 0: train on inputs noised with noise + this * fresh noise, the target unchanged (input
    # perturbation, Ning et al. 2023): at sampling the inputs are the model's own, less exact than
    # the training inputs (exposure bias); a noisier input teaches it to lean on the prompt.
    input_perturbation: float = 0.0
    # > 0: this share of training mask slots is noised from an imprecise copy of the mask (warped by
    # mask_corruption_warp px, blurred by a sigma in mask_corruption_blur px, re-thresholded:
    # model.layers.corrupt_masks) while the target stays the true mask. Sampling, the early steps
    # leave a rounded blob and the later ones only sharpen what they see; this teaches them to
    # restore the outline the prompt names from such a blob. x0-prediction in pixel space only.
    mask_corruption: float = 0.0
    mask_corruption_blur: list[float] = field(default_factory=lambda: [0.5, 1.5])
    mask_corruption_warp: float = 0.0
    # Only at timesteps >= this: the last steps stay plain denoisers (they keep the masks binary).
    mask_corruption_min_t: int = 0
    # > 0: a mask slot's x0 estimate pays this times its mean distance from the nearer of -1 / +1
    # (pixel units), at timesteps < mask_binarity_max_t. Where an input leaves the outline
    # ambiguous (noise, or mask_corruption's imprecise copies), MSE alone answers the grey mean of
    # the candidates; this term makes the last steps commit to one. Weight w moves an estimate
    # w / 2 towards its nearer pole, so w >= 2 rounds every pixel. Binary pixel-space masks only.
    mask_binarity_weight: float = 0.0
    mask_binarity_max_t: int = 1000
    # True: the UNet's output for a mask slot is a per-pixel logit l of "inside", its x0 estimate
    # scale * tanh(l / 2) (= scale * (2 sigmoid(l) - 1)), trained with binary cross-entropy against the
    # true mask instead of MSE: a mask is a per-pixel classification, and cross-entropy keeps a full
    # gradient on confidently wrong outline pixels where MSE through a saturating output would not.
    # Both are proper losses, so the estimate is still the posterior mean. x0-prediction, binary
    # pixel-space masks only.
    mask_logits: bool = False
    num_inference_steps: int = 25  # default DDIM steps (trailing spacing)
    # A UNet built from scratch starts with each ResNet's second convolution, each transformer's
    # output projection and the output convolution at zero (as ADM does, Dhariwal & Nichol 2021):
    # every residual block starts as the identity. No effect on a loaded checkpoint.
    zero_init_residuals: bool = False

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
        if self.mask_encoding not in ("binary", "distance"):
            raise ValueError(f"mask_encoding {self.mask_encoding!r} not in ('binary', 'distance')")
        if self.mask_encoding == "distance" and (not self.pixel_space or self.mask_distance_width <= 0):
            raise ValueError("mask_encoding 'distance' needs pixel_space and mask_distance_width > 0")
        if self.mask_edge_weight < 0 or self.timestep_bias <= 0:
            raise ValueError(f"mask_edge_weight must be >= 0 and timestep_bias > 0, got "
                             f"{self.mask_edge_weight}, {self.timestep_bias}")
        if self.timestep_logit_normal and (len(self.timestep_logit_normal) != 2 or self.timestep_logit_normal[1] <= 0
                                           or self.timestep_bias != 1.0):
            raise ValueError(f"timestep_logit_normal must be [mean, std > 0] with timestep_bias 1, got "
                             f"{self.timestep_logit_normal} (timestep_bias {self.timestep_bias})")
        if not 0 <= self.mask_corruption <= 1 or len(self.mask_corruption_blur) != 2 \
                or not 0 <= self.mask_corruption_blur[0] <= self.mask_corruption_blur[1] or self.mask_corruption_warp < 0 \
                or not 0 <= self.mask_corruption_min_t < self.num_train_timesteps:
            raise ValueError(f"mask_corruption must be in [0, 1], mask_corruption_blur [lo, hi] with 0 <= lo <= hi, "
                             f"mask_corruption_warp >= 0 and mask_corruption_min_t in [0, T), got "
                             f"{self.mask_corruption}, {self.mask_corruption_blur}, {self.mask_corruption_warp}, "
                             f"{self.mask_corruption_min_t}")
        if self.mask_corruption > 0 and (self.prediction_type != "sample" or not self.pixel_space):
            raise ValueError("mask_corruption needs prediction_type 'sample' and pixel_space (its target is "
                             "the true mask, not the noise of the corrupted input)")
        if self.mask_binarity_weight < 0 or not 0 < self.mask_binarity_max_t <= self.num_train_timesteps:
            raise ValueError(f"mask_binarity_weight must be >= 0 and mask_binarity_max_t in (0, T], got "
                             f"{self.mask_binarity_weight}, {self.mask_binarity_max_t}")
        if self.mask_binarity_weight > 0 and (not self.pixel_space or self.mask_encoding != "binary"):
            raise ValueError("mask_binarity_weight needs pixel_space and mask_encoding 'binary' (it pulls "
                             "mask estimates towards -1 / +1)")
        if self.mask_logits and (self.prediction_type != "sample" or not self.pixel_space
                                 or self.mask_encoding != "binary"):
            raise ValueError("mask_logits needs prediction_type 'sample', pixel_space and mask_encoding "
                             "'binary' (the mask slots' output is the logit of a binary x0)")
        if self.input_perturbation < 0:
            raise ValueError(f"input_perturbation must be >= 0, got {self.input_perturbation}")
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown LayerDiffConfig fields: {sorted(unknown)}")
        return cls(**copy.deepcopy(data))

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
# only: at 16 their 256-token self-attention doubled the step time (measured, see BENCHMARKS).
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
    """Pixel space, 32x32, ~1.8M parameters; trains from scratch on a CPU (recipe: BENCHMARKS.md)."""
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
    config = base.replace(**overrides)
    if "in_channels" not in overrides.get("unet", {}):
        config = config.replace(unet={"in_channels": unet_in_channels(config, config.unet["out_channels"])})
    return config


def tiny_s3_config(**overrides: Any) -> LayerDiffConfig:
    """The tiny config with masks at input scale 0.3 and UNet widths 16/24/32 ("S3"): the recipe that
    meets every fidelity bar after 120 CPU-minutes (BENCHMARKS.md). A mask's SNR is 11x lower at every
    step, so its place and outline are settled over the middle of the schedule instead of the first
    few steps; the narrower UNet runs 1.6x the steps a minute and learns outlines faster per step."""
    unet = {"block_out_channels": [16, 24, 32], **overrides.pop("unet", {})}
    return tiny_config(**{"name": "tiny-s3", "role_input_scale": [1.0, 1.0, 0.3], **overrides, "unet": unet})


def unet_in_channels(config: LayerDiffConfig, channels: int) -> int:
    """The UNet's input channels for ``channels`` per (patched) layer: x_t, the x0 estimate when
    self-conditioning, the two coordinate channels when ``coord_channels``."""
    return channels * (2 if config.self_conditioning else 1) + (2 if config.coord_channels else 0)


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
