"""The sd15 config through the real loading path, on an SD 1.5-layout folder with tiny random weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from model import LayerDiffModel
from model.sampling import ddim_sample
from tests.model.batches import make_batch
from tests.model.helpers import perturb_new_modules


@pytest.fixture()
def sd15_model(sd15_folder: Path) -> LayerDiffModel:
    return LayerDiffModel.from_config_name("sd15", pretrained_path=str(sd15_folder), resolution=32)


def test_loads_base_weights_and_freezes_text_and_vae(sd15_model: LayerDiffModel, sd15_folder: Path) -> None:
    assert sd15_model.latent_shape == (4, 16, 16) and not sd15_model.config.pixel_space
    base = UNet2DConditionModel.from_pretrained(sd15_folder / "unet", local_files_only=True)
    ours = sd15_model.unet.unet.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in base.state_dict().items())
    assert not any(p.requires_grad for p in sd15_model.text_encoder.parameters())
    assert not any(p.requires_grad for p in sd15_model.vae.parameters())
    assert all(p.requires_grad for p in sd15_model.unet.parameters())


def test_zero_init_preserves_the_pretrained_unet(sd15_model: LayerDiffModel, sd15_folder: Path) -> None:
    base = UNet2DConditionModel.from_pretrained(sd15_folder / "unet", local_files_only=True)
    batch = make_batch([3, 3])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 4, 16, 16, generator=gen)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        context = sd15_model.encode_prompts(batch["prompt"], batch["layer_prompts"])
        layered = sd15_model.unet(x, t, context, batch["present"])
        plain = base(x.flatten(0, 1), t.repeat_interleave(7), context.flatten(0, 1)).sample
    torch.testing.assert_close(layered.flatten(0, 1), plain, atol=1e-6, rtol=0)


def test_train_step_and_sampling(sd15_model: LayerDiffModel) -> None:
    sd15_model.train()
    out = sd15_model(make_batch([1, 2]), torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is None for p in sd15_model.vae.parameters())
    assert all(p.grad is None for p in sd15_model.text_encoder.parameters())
    assert all(p.grad is not None for p in sd15_model.unet.adapter.parameters())
    sd15_model.eval()
    present = make_batch([1, 2])["present"]
    layers = ddim_sample(sd15_model, ["a red circle", "a blue square"], [["a", "b", "", ""]] * 2, present,
                         num_steps=2, guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
    assert layers.shape == (2, 7, 3, 32, 32) and layers.min() >= -1 and layers.max() <= 1


def test_round_trip(sd15_model: LayerDiffModel, tmp_path: Path) -> None:
    perturb_new_modules(sd15_model)
    sd15_model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "vae" / "config.json").is_file()
    loaded = LayerDiffModel.from_pretrained(tmp_path / "m")
    batch = make_batch([2, 1])
    with torch.no_grad():
        a = sd15_model.training_loss(batch, torch.Generator().manual_seed(4))["loss"]
        b = loaded.training_loss(batch, torch.Generator().manual_seed(4))["loss"]
    assert torch.equal(a, b)
