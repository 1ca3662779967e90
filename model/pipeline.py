"""``LayerDiffPipeline``: text -> layers (background, foregrounds, masks), diffusers style.

    pipe = LayerDiffPipeline.from_pretrained("runs/tiny/model")
    out = pipe("a red circle and a blue square on a green background", seed=0, num_images=2)
    out.save("samples")                        # sample-000/bg.png, fg.0.png, mask.0.png, composite.png, layers.ora
    edited = pipe.edit_layer(out.layers, out.present, layer=1, prompt="a yellow square", seed=1)
    styled = pipe.restyle_layer(out.layers, out.present, layer="bg", prompt="a striped green background")

Layer prompts: without them, the foregrounds are the global prompt's object phrases
(``datagen.phrases.extract_phrases``), **back-most first** (captions name the front-most object
first, as the training captions do), and the background prompt its background phrase.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from datagen.export import export_sample
from datagen.format import compose_uint8 as compose_arrays
from datagen.phrases import background_phrase, extract_phrases, with_article
from model.editing import KnownLayers, edit_mask, encode_known, layer_slots, paste_known, sdedit_start
from model.guidance import SelfMaskGuidance, chain_hooks
from model.layers import arrays_to_layers, layers_to_arrays, present_vector
from model.modeling.layerdiff import LayerDiffModel
from model.sampling import StepHook, ddim_sample

GUIDANCE_MODES = ("cfg", "smg")  # plain CFG first: the default, measured as good as SMG on the fidelity scenes


def default_layer_prompts(prompt: str, max_layers: int) -> tuple[str, list[str]]:
    """(background prompt, foreground prompts back-most first) from a global prompt's phrases."""
    phrases = extract_phrases(prompt)[:max_layers]
    background = background_phrase(prompt)
    return (with_article(background) if background else ""), [with_article(p) for p in reversed(phrases)]


@dataclass
class LayerDiffOutput:
    """Sampled layers: ``layers`` (B, L, 3, H, W) in [-1, 1] and ``present`` (B, L) on the CPU."""

    layers: torch.Tensor
    present: torch.Tensor
    prompts: list[str] = field(default_factory=list)
    layer_prompts: list[list[str]] = field(default_factory=list)

    def arrays(self, i: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """Sample i as format-conforming uint8 arrays (bg, fgs zero where alpha is 0, soft 8-bit alphas)."""
        return layers_to_arrays(self.layers[i], self.present[i])

    def composite(self, i: int) -> np.ndarray:
        """Sample i's composite (H, W, 3) uint8: exactly the composite of the arrays it writes."""
        bg, fgs, masks = self.arrays(i)
        return compose_arrays(bg, fgs, masks)

    def save(self, out: str | Path, prefix: str = "sample") -> list[Path]:
        """Write each sample to ``out/{prefix}-NNN/`` (:func:`datagen.export.export_sample`: PNGs,
        ``layers.ora``, ``layers.psd``), layers named by their prompts; returns the folders."""
        folders = []
        for i in range(len(self.layers)):
            bg, fgs, masks = self.arrays(i)
            names = self.layer_prompts[i][: 1 + len(fgs)] if i < len(self.layer_prompts) else None
            folders.append(export_sample(Path(out) / f"{prefix}-{i:03d}", bg, fgs, masks, names))
        return folders


def load_sample(folder: str | Path, max_layers: int, fg_fill: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """Read a folder written by :func:`datagen.export.export_sample` -> ((L, 3, H, W) layers, (L,) present).

    Foregrounds are stored black outside their masks; ``fg_fill`` recolours them there the way the
    training data does (``model.data.fill_outside``), so the model sees familiar layers. Writing
    them back with :func:`datagen.export.export_sample` gives the same files.
    """
    from PIL import Image

    from model.data import fill_outside

    folder = Path(folder)
    bg = np.array(Image.open(folder / "bg.png").convert("RGB"))
    fgs, masks = [], []
    while (folder / f"fg.{len(fgs)}.png").exists():
        n = len(fgs)
        fg = np.array(Image.open(folder / f"fg.{n}.png").convert("RGB"))
        mask = np.array(Image.open(folder / f"mask.{n}.png").convert("L"))
        inside = torch.from_numpy(mask > 0)  # stored colours are valid wherever alpha > 0
        filled = fill_outside(torch.from_numpy(fg.copy()).permute(2, 0, 1).float() / 255, inside, fg_fill)
        fg = torch.where(inside, torch.from_numpy(fg.copy()).permute(2, 0, 1).float() / 255, filled)
        fgs.append((fg * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
        masks.append(mask)
    return arrays_to_layers(bg, fgs, masks, max_layers)


class LayerDiffPipeline:
    """Text-to-layers sampling, layer regeneration and layer restyling with a :class:`LayerDiffModel`."""

    def __init__(self, model: LayerDiffModel) -> None:
        self.model = model.eval()

    @classmethod
    def from_pretrained(cls, directory: str | Path, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> LayerDiffPipeline:
        """Load a ``save_pretrained`` folder (e.g. ``runs/tiny/model``, the EMA weights of training)."""
        model = LayerDiffModel.from_pretrained(directory, torch_dtype=torch_dtype)
        if device is not None:
            model = model.to(device)
        return cls(model)

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(directory)

    @property
    def max_layers(self) -> int:
        return self.model.config.max_layers

    # ------------------------------------------------------------------ inputs

    def prepare_prompts(self, prompt: str, layer_prompts: Sequence[str] | None = None,
                        background_prompt: str | None = None) -> tuple[list[str], torch.Tensor]:
        """(1 + K_max layer prompts, present (L,)) for one global prompt.

        ``layer_prompts``: the K foreground prompts, back-most first (default: from the prompt's
        phrases); ``background_prompt``: default the prompt's background phrase.
        """
        default_bg, default_fgs = default_layer_prompts(prompt, self.max_layers)
        fgs = list(layer_prompts) if layer_prompts is not None else default_fgs
        if not fgs:
            fgs = [""]  # no object named: one foreground, guided by the global prompt only
        if len(fgs) > self.max_layers:
            raise ValueError(f"{len(fgs)} layer prompts, the model has at most {self.max_layers} foregrounds")
        bg = default_bg if background_prompt is None else background_prompt
        prompts = [bg, *fgs] + [""] * (self.max_layers - len(fgs))
        return prompts, present_vector(len(fgs), self.max_layers)

    def _generator(self, seed: int | None, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None:
            return generator
        device = self.model.device
        return torch.Generator(device=device).manual_seed(0 if seed is None else int(seed))

    def _hook(self, guidance: str, guidance_scale: float, smg_outside_scale: float) -> StepHook | None:
        if guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance {guidance!r}: choose one of {GUIDANCE_MODES}")
        if guidance == "smg" and guidance_scale != 1.0:
            return SelfMaskGuidance(self.model, outside_scale=smg_outside_scale)
        return None

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def __call__(self, prompt: str, layer_prompts: Sequence[str] | None = None, *,
                 background_prompt: str | None = None, num_images: int = 1, num_inference_steps: int | None = None,
                 guidance_scale: float = 3.0, guidance: str = "cfg", smg_outside_scale: float = 1.0,
                 seed: int | None = 0, generator: torch.Generator | None = None, eta: float = 0.0,
                 negative_prompt: str = "", negative_layer_prompts: Sequence[str] | None = None
                 ) -> LayerDiffOutput:
        """Sample ``num_images`` layered images for one prompt.

        ``guidance``: "cfg" (plain classifier-free guidance, the default) or "smg" (self-mask guidance,
        :mod:`model.guidance`; model/README.md says when it helps). ``guidance_scale`` 1 is unguided
        sampling in both modes. The same seed gives the same
        output. ``negative_prompt`` / ``negative_layer_prompts`` (one per foreground, back-most first)
        replace the empty prompts of guidance's unconditional branch.
        """
        prompts, present = self.prepare_prompts(prompt, layer_prompts, background_prompt)
        b = num_images
        presents = present[None].expand(b, -1).clone()
        negatives = [""] * len(prompts)
        if negative_layer_prompts is not None:
            if len(negative_layer_prompts) > self.max_layers:
                raise ValueError(f"{len(negative_layer_prompts)} negative layer prompts, the model has at most "
                                 f"{self.max_layers} foregrounds")
            negatives[1:1 + len(negative_layer_prompts)] = list(negative_layer_prompts)
        layers = ddim_sample(self.model, [prompt] * b, [prompts] * b, presents.to(self.model.device),
                             num_inference_steps, guidance_scale, self._generator(seed, generator), eta=eta,
                             step_hook=self._hook(guidance, guidance_scale, smg_outside_scale),
                             negative_prompt=[negative_prompt] * b, negative_layer_prompts=[negatives] * b)
        return LayerDiffOutput(layers.float().cpu(), presents, [prompt] * b, [list(prompts) for _ in range(b)])

    @torch.no_grad()
    def _edit(self, layers: torch.Tensor, present: torch.Tensor, slots: Sequence[int], prompt: str,
              layer_prompts: Sequence[Sequence[str]] | None, free_from: int, num_inference_steps: int,
              guidance_scale: float, guidance: str, smg_outside_scale: float,
              generator: torch.Generator) -> LayerDiffOutput:
        layers, present = _batched(layers), _batched(present).bool()
        b = layers.shape[0]
        if layer_prompts is None:
            layer_prompts = [self.prepare_prompts(prompt)[0]] * b
        model = self.model
        edit = edit_mask(model.num_slots, slots, b)
        if bool((edit & ~present).any()):
            raise ValueError("the edited layer is absent from the sample")
        clean = encode_known(model, layers, present)
        known = KnownLayers(clean, edit.to(model.device), free_from=free_from)
        # Pin, so SMG reads the known masks; SMG recombines the CFG branches; pin again.
        hook = chain_hooks([known, self._hook(guidance, guidance_scale, smg_outside_scale), known])
        out = ddim_sample(model, [prompt] * b, [list(p) for p in layer_prompts], present.to(model.device),
                          num_inference_steps, guidance_scale, generator, step_hook=hook)
        pasted = paste_known(out.float().cpu(), layers.float().cpu(), edit)
        return LayerDiffOutput(pasted, present.cpu(), [prompt] * b, [list(p) for p in layer_prompts])

    def _layer_prompts_with(self, layer_prompts: Sequence[Sequence[str]] | None, global_prompt: str, b: int,
                            layer: int | str, new_prompt: str) -> list[list[str]]:
        base = [list(p) for p in layer_prompts] if layer_prompts is not None else \
            [self.prepare_prompts(global_prompt)[0] for _ in range(b)]
        index = 0 if layer in ("bg", "background", -1) else 1 + int(layer)
        for p in base:
            p[index] = new_prompt
        return base

    def edit_layer(self, layers: torch.Tensor, present: torch.Tensor, layer: int | str, prompt: str, *,
                   global_prompt: str = "", layer_prompts: Sequence[Sequence[str]] | None = None,
                   keep_mask: bool = False, num_inference_steps: int | None = None, guidance_scale: float = 3.0,
                   guidance: str = "cfg", smg_outside_scale: float = 1.0, seed: int | None = 0,
                   generator: torch.Generator | None = None) -> LayerDiffOutput:
        """Regenerate one layer (``"bg"`` or foreground n) with a new ``prompt``; the others stay fixed.

        ``layers`` (B, L, 3, H, W) or (L, 3, H, W) in [-1, 1]; ``layer_prompts`` the samples' current
        1 + K_max layer prompts (their ``layer`` entry is replaced by ``prompt``; default: empty except
        it). A foreground's mask is regenerated too unless ``keep_mask`` (recolour in place). Every
        other slot comes back bit-identical.
        """
        b = _batched(layers).shape[0]
        steps = num_inference_steps or self.model.config.num_inference_steps
        prompts = self._layer_prompts_with(layer_prompts, global_prompt, b, layer, prompt)
        slots = layer_slots(layer, self.max_layers, with_mask=not keep_mask)
        return self._edit(layers, present, slots, global_prompt, prompts, 0, steps, guidance_scale, guidance,
                          smg_outside_scale, self._generator(seed, generator))

    def restyle_layer(self, layers: torch.Tensor, present: torch.Tensor, layer: int | str, prompt: str, *,
                      strength: float = 0.6, global_prompt: str = "",
                      layer_prompts: Sequence[Sequence[str]] | None = None, num_inference_steps: int | None = None,
                      guidance_scale: float = 3.0, guidance: str = "cfg", smg_outside_scale: float = 1.0,
                      seed: int | None = 0, generator: torch.Generator | None = None) -> LayerDiffOutput:
        """Restyle one layer SDEdit-style: noise it to ``strength`` and denoise it under the style
        ``prompt``; a foreground keeps its mask. Every other slot comes back bit-identical."""
        b = _batched(layers).shape[0]
        steps = num_inference_steps or self.model.config.num_inference_steps
        prompts = self._layer_prompts_with(layer_prompts, global_prompt, b, layer, prompt)
        slots = layer_slots(layer, self.max_layers, with_mask=False)
        return self._edit(layers, present, slots, global_prompt, prompts, sdedit_start(steps, strength), steps,
                          guidance_scale, guidance, smg_outside_scale, self._generator(seed, generator))


def _batched(x: torch.Tensor) -> torch.Tensor:
    return x if x.ndim in (2, 5) else x[None]
