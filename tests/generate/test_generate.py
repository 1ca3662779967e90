"""LayerDiffPipeline, self-mask guidance, layer editing, the OpenRaster writer and the CLI."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datagen.export import read_ora, read_psd
from datagen.format import compose_uint8
from model.guidance import SelfMaskGuidance, mask_alphas, smg_weights
from model.layers import fg_slot, mask_slot
from model.pipeline import default_layer_prompts, load_sample
from model.sampling import ddim_sample

PROMPT = "a red circle and a blue square on a green background"
STEPS = 3


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


def test_default_layer_prompts_back_most_first() -> None:
    bg, fgs = default_layer_prompts(PROMPT, 3)
    assert bg == "a green background"
    assert fgs == ["a blue square", "a red circle"]  # the caption names the front-most object first


def test_smg_weights() -> None:
    alphas = torch.zeros(1, 2, 1, 2, 2)
    alphas[0, 0, 0, 0, 0] = 1.0  # fg 0 covers one pixel
    w = smg_weights(alphas, scale=3.0, outside_scale=1.0, num_slots=5)
    assert w[0, fg_slot(0, 2), 0, 0, 0] == 3.0 and w[0, fg_slot(0, 2), 0, 1, 1] == 1.0
    assert w[0, 0, 0, 0, 0] == 1.0 and w[0, 0, 0, 1, 1] == 3.0  # background: guided where visible
    assert torch.all(w[0, mask_slot(0, 2)] == 3.0)


def test_mask_alphas_undo_the_input_scale() -> None:
    from model import LayerDiffModel

    model = LayerDiffModel.from_config_name("tiny", role_input_scale=[1.0, 1.0, 0.25])
    x0 = torch.zeros(1, 7, 3, 2, 2)
    x0[:, 4:, :, 0] = 0.25  # mask latents: the top row fully inside ([-1, 1] x 0.25)
    x0[:, 4:, :, 1] = -0.25
    alphas = mask_alphas(model, x0, torch.ones(1, 7, dtype=torch.bool))
    assert torch.all(alphas[:, :, 0, 0] == 1.0) and torch.all(alphas[:, :, 0, 1] == 0.0)


def test_files_ora_and_composite(pipe, tmp_path: Path) -> None:
    out = pipe(PROMPT, num_images=1, num_inference_steps=STEPS, seed=0)
    assert out.layers.shape == (1, pipe.model.num_slots, 3, 32, 32)
    folder = out.save(tmp_path)[0]
    names = {p.name for p in folder.iterdir()}
    assert {"bg.png", "fg.0.png", "fg.1.png", "mask.0.png", "mask.1.png", "composite.png", "layers.ora"} <= names
    bg = _png(folder / "bg.png")
    fgs = [_png(folder / f"fg.{n}.png") for n in range(2)]
    masks = [_png(folder / f"mask.{n}.png") for n in range(2)]
    composite = _png(folder / "composite.png")
    assert np.array_equal(composite, compose_uint8(bg, fgs, masks))
    assert np.array_equal(composite, out.composite(0))

    with zipfile.ZipFile(folder / "layers.ora") as zf:
        first = zf.infolist()[0]
        assert first.filename == "mimetype" and first.compress_type == zipfile.ZIP_STORED
        assert zf.read("mimetype") == b"image/openraster"
        listed = zf.namelist()
        assert {"stack.xml", "mergedimage.png", "Thumbnails/thumbnail.png"} <= set(listed)
        stack = ET.fromstring(zf.read("stack.xml"))
        assert stack.tag == "image" and stack.get("w") == "32" and stack.get("h") == "32"
        srcs = [el.get("src") for el in stack.find("stack").findall("layer")]
        assert len(srcs) == 3 and all(s.startswith("data/") and s in listed for s in srcs)
    layers, merged = read_ora(folder / "layers.ora")
    assert [n for n, _ in layers] == out.layer_prompts[0][:3]  # named by their prompts, bottom first
    assert [n for n, _ in layers] == ["a green background", "a blue square", "a red circle"]
    assert np.array_equal(merged, composite)
    assert np.array_equal(layers[0][1][..., :3], bg) and np.all(layers[0][1][..., 3] == 255)
    for n in range(2):
        assert np.array_equal(layers[n + 1][1][..., :3], fgs[n])
        assert np.array_equal(layers[n + 1][1][..., 3], masks[n])
    # the ORA stack itself composites to the merged image (alpha over, bottom first)
    flat = compose_uint8(layers[0][1][..., :3], [im[..., :3] for _, im in layers[1:]],
                         [im[..., 3] for _, im in layers[1:]])
    assert np.array_equal(flat, merged)
    # The PSD: the same stack, order, names and pixels; it recomposes to the composite within 1/255.
    psd_layers, psd_merged = read_psd(folder / "layers.psd")
    assert [n for n, _ in psd_layers] == [n for n, _ in layers]
    for (_, a), (_, b) in zip(psd_layers, layers, strict=True):
        assert np.array_equal(a[..., 3], b[..., 3])
        assert np.array_equal(a[..., :3][a[..., 3] > 0], b[..., :3][b[..., 3] > 0])
    flat = compose_uint8(psd_layers[0][1][..., :3], [im[..., :3] for _, im in psd_layers[1:]],
                         [im[..., 3] for _, im in psd_layers[1:]])
    assert np.abs(flat.astype(int) - composite).max() <= 1
    assert np.abs(psd_merged.astype(int) - composite).max() <= 1
    for n in range(2):  # one RGBA PNG per layer
        assert np.array_equal(_png(folder / f"layer.{n}.png"), layers[n + 1][1])


def test_same_seed_same_output(pipe) -> None:
    a = pipe(PROMPT, num_inference_steps=STEPS, seed=3)
    b = pipe(PROMPT, num_inference_steps=STEPS, seed=3)
    c = pipe(PROMPT, num_inference_steps=STEPS, seed=4)
    assert torch.equal(a.layers, b.layers)
    assert not torch.equal(a.layers, c.layers)


@pytest.mark.parametrize("guidance", ["smg", "cfg"])
def test_guidance_scale_one_is_unguided(pipe, guidance: str) -> None:
    out = pipe(PROMPT, num_inference_steps=STEPS, seed=1, guidance_scale=1.0, guidance=guidance)
    prompts, present = pipe.prepare_prompts(PROMPT)
    ref = ddim_sample(pipe.model, [PROMPT], [prompts], present[None], STEPS, 1.0,
                      torch.Generator().manual_seed(1))
    assert torch.equal(out.layers, ref)


def test_negative_layer_prompts_reach_the_sampler(pipe) -> None:
    """The pipeline's negatives are ddim_sample's unconditional branch: same result, and they matter."""
    prompts, present = pipe.prepare_prompts(PROMPT)
    out = pipe(PROMPT, num_inference_steps=STEPS, seed=5, guidance="cfg", negative_prompt="a dog",
               negative_layer_prompts=["a red star"])
    negatives = ["", "a red star"] + [""] * (len(prompts) - 2)
    ref = ddim_sample(pipe.model, [PROMPT], [prompts], present[None], STEPS, 3.0, torch.Generator().manual_seed(5),
                      negative_prompt=["a dog"], negative_layer_prompts=[negatives])
    assert torch.equal(out.layers, ref)
    assert not torch.allclose(out.layers, pipe(PROMPT, num_inference_steps=STEPS, seed=5, guidance="cfg").layers)
    with pytest.raises(ValueError, match="negative layer prompts"):
        pipe(PROMPT, num_inference_steps=STEPS, negative_layer_prompts=["x"] * (pipe.max_layers + 1))


def test_default_guidance_is_plain_cfg(pipe) -> None:
    # plain CFG measured as good as self-mask guidance on the fidelity scenes, at less cost
    default = pipe(PROMPT, num_inference_steps=STEPS, seed=4).layers
    assert torch.equal(default, pipe(PROMPT, num_inference_steps=STEPS, seed=4, guidance="cfg").layers)
    assert not torch.allclose(default, pipe(PROMPT, num_inference_steps=STEPS, seed=4, guidance="smg").layers)


def test_smg_with_uniform_weights_is_cfg(pipe) -> None:
    """SMG with outside scale = scale has every weight equal to the scale: plain CFG."""
    prompts, present = pipe.prepare_prompts(PROMPT)
    args = (pipe.model, [PROMPT], [prompts], present[None], STEPS, 3.0)
    cfg = ddim_sample(*args, torch.Generator().manual_seed(2))
    smg = ddim_sample(*args, torch.Generator().manual_seed(2),
                      step_hook=SelfMaskGuidance(pipe.model, outside_scale=3.0))
    assert torch.allclose(cfg, smg, atol=1e-4)
    steered = ddim_sample(*args, torch.Generator().manual_seed(2), step_hook=SelfMaskGuidance(pipe.model))
    assert not torch.allclose(cfg, steered, atol=1e-4)


@pytest.mark.parametrize("layer,keep_mask", [(1, False), (0, True), ("bg", False)])
def test_edit_layer_leaves_others_identical(pipe, layer, keep_mask: bool) -> None:
    base = pipe(PROMPT, num_inference_steps=STEPS, seed=0)
    edited = pipe.edit_layer(base.layers, base.present, layer, "a yellow triangle", global_prompt=PROMPT,
                             layer_prompts=base.layer_prompts, keep_mask=keep_mask, num_inference_steps=STEPS,
                             seed=5)
    k = pipe.max_layers
    changed = [0] if layer == "bg" else [fg_slot(layer, k)] + ([] if keep_mask else [mask_slot(layer, k)])
    for s in range(pipe.model.num_slots):
        if s in changed:
            assert not torch.equal(edited.layers[0, s], base.layers[0, s])
        else:
            assert torch.equal(edited.layers[0, s], base.layers[0, s])
    assert edited.layer_prompts[0][0 if layer == "bg" else 1 + layer] == "a yellow triangle"


def test_restyle_layer_leaves_others_identical(pipe) -> None:
    base = pipe(PROMPT, num_inference_steps=4, seed=0)
    styled = pipe.restyle_layer(base.layers[0], base.present[0], "bg", "a striped green background",
                                strength=0.5, num_inference_steps=4, seed=1)
    assert torch.equal(styled.layers[0, 1:], base.layers[0, 1:])
    assert not torch.equal(styled.layers[0, 0], base.layers[0, 0])


def test_cli_generate_then_edit(model_dir: Path, tmp_path: Path) -> None:
    from model.generate import main

    common = ["--model", str(model_dir), "--steps", str(STEPS), "--threads", "1"]
    assert main([*common, "--prompt", PROMPT, "--layers", "a blue square|a red circle|a cat",
                 "--out", str(tmp_path / "gen")]) == 0
    sample = tmp_path / "gen" / "sample-000"
    meta = json.loads((sample / "prompts.json").read_text())
    assert meta["layer_prompts"] == ["a green background", "a blue square", "a red circle", "a cat"]
    assert (sample / "fg.2.png").exists() and (sample / "layers.ora").exists()

    assert main([*common, "--edit", str(sample), "--edit-layer", "2", "--edit-prompt", "a dog",
                 "--out", str(tmp_path / "edit")]) == 0
    edited = tmp_path / "edit" / "sample-000"
    for name in ("bg.png", "fg.0.png", "mask.0.png", "fg.1.png", "mask.1.png"):
        assert np.array_equal(_png(edited / name), _png(sample / name)), name
    assert json.loads((edited / "prompts.json").read_text())["layer_prompts"][3] == "a dog"
    assert np.array_equal(_png(edited / "composite.png"),
                          compose_uint8(_png(edited / "bg.png"), [_png(edited / f"fg.{n}.png") for n in range(3)],
                                        [_png(edited / f"mask.{n}.png") for n in range(3)]))

    assert main([*common, "--edit", str(sample), "--restyle-layer", "0", "--style-prompt", "a striped red circle",
                 "--strength", "0.7", "--out", str(tmp_path / "style")]) == 0
    styled = tmp_path / "style" / "sample-000"
    for name in ("bg.png", "mask.0.png", "fg.1.png", "mask.1.png", "fg.2.png", "mask.2.png"):
        assert np.array_equal(_png(styled / name), _png(sample / name)), name


def test_load_sample_round_trip(pipe, tmp_path: Path) -> None:
    out = pipe(PROMPT, num_inference_steps=STEPS, seed=0)
    folder = out.save(tmp_path)[0]
    layers, present = load_sample(folder, pipe.max_layers)
    assert torch.equal(present, out.present[0])
    from model.layers import layers_to_arrays

    bg, fgs, masks = layers_to_arrays(layers, present)
    assert np.array_equal(bg, _png(folder / "bg.png"))
    for n in range(len(fgs)):
        assert np.array_equal(fgs[n], _png(folder / f"fg.{n}.png"))
        assert np.array_equal(masks[n], _png(folder / f"mask.{n}.png"))


def test_latent_model_smg_and_edit(latent_pipe) -> None:
    """SMG decodes the predicted masks through the VAE; edits keep the other layers bit-identical."""
    out = latent_pipe(PROMPT, num_inference_steps=2, seed=0, guidance="smg")
    assert out.layers.shape[-2:] == (32, 32) and torch.isfinite(out.layers).all()
    edited = latent_pipe.edit_layer(out.layers, out.present, 0, "a cat", num_inference_steps=2, seed=1)
    k = latent_pipe.max_layers
    keep = [s for s in range(latent_pipe.model.num_slots) if s not in (fg_slot(0, k), mask_slot(0, k))]
    assert torch.equal(edited.layers[0, keep], out.layers[0, keep])
