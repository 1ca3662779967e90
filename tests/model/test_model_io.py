"""Loss, configs and the save_pretrained / from_pretrained round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import LayerDiffConfig, LayerDiffModel, get_config
from model.sampling import ddim_sample
from tests.model.batches import make_batch


def test_training_loss_keys_and_backward(tiny_model: LayerDiffModel) -> None:
    tiny_model.train()
    out = tiny_model.training_loss(make_batch([1, 2, 3]), torch.Generator().manual_seed(0))
    assert {"loss", "loss_diffusion", "loss_bg", "loss_fg", "loss_mask"} <= set(out)
    assert out["loss"].ndim == 0 and out["loss"].requires_grad and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in tiny_model.unet.unet.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.text_encoder.parameters())


def test_training_loss_is_reproducible_and_ignores_padding(tiny_model: LayerDiffModel) -> None:
    batch = make_batch([1, 2])
    a = tiny_model.training_loss(batch, torch.Generator().manual_seed(3))["loss"]
    batch["layers"][~batch["present"]] = 0.7  # padding values must not matter
    b = tiny_model.training_loss(batch, torch.Generator().manual_seed(3))["loss"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_target_and_x0_recovery(tiny_model: LayerDiffModel, prediction_type: str) -> None:
    tiny_model.config = tiny_model.config.replace(prediction_type=prediction_type)
    x0, noise = torch.randn(2, 7, 3, 4, 4), torch.randn(2, 7, 3, 4, 4)
    t = torch.tensor([10, 998])
    x_t = tiny_model.add_noise(x0, noise, t)
    target = tiny_model.target(x0, noise, t)
    x0_hat, eps_hat = tiny_model.predict_x0_eps(x_t, target, tiny_model._alpha(t, 5))
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_hat, noise, atol=1e-3, rtol=1e-3)
    assert float(tiny_model.alphas_cumprod[-1]) == 0.0  # zero terminal SNR: t = T-1 is pure noise


def test_composite_term_and_epsilon_option() -> None:
    model = LayerDiffModel.from_config_name("tiny", composite_loss_weight=0.5, prediction_type="epsilon",
                                            zero_terminal_snr=False)
    out = model.training_loss(make_batch([2, 3]), torch.Generator().manual_seed(0))
    assert "loss_composite" in out and out["loss"] > out["loss_diffusion"]
    out["loss"].backward()


def test_role_loss_weights_weight_the_per_role_losses(tiny_model: LayerDiffModel) -> None:
    tiny_model.config = tiny_model.config.replace(role_loss_weights=[1.0, 1.0, 1.0], snr_gamma=0.0,
                                                  composite_loss_weight=0.0)
    batch = make_batch([1, 3])  # present slots: 2 backgrounds, 4 foregrounds, 4 masks
    plain = tiny_model.training_loss(batch, torch.Generator().manual_seed(5))
    n_bg, n_fg, n_mask = 2, 4, 4
    mean = (n_bg * plain["loss_bg"] + n_fg * plain["loss_fg"] + n_mask * plain["loss_mask"]) / 10
    torch.testing.assert_close(plain["loss"].detach(), mean)
    tiny_model.config = tiny_model.config.replace(role_loss_weights=[0.5, 1.0, 3.0])
    weighted = tiny_model.training_loss(batch, torch.Generator().manual_seed(5))
    expect = (0.5 * n_bg * plain["loss_bg"] + n_fg * plain["loss_fg"] + 3 * n_mask * plain["loss_mask"]) / (
        0.5 * n_bg + n_fg + 3 * n_mask)
    torch.testing.assert_close(weighted["loss"].detach(), expect)


def test_snr_gamma_caps_low_noise_weights(tiny_model: LayerDiffModel) -> None:
    tiny_model.config = tiny_model.config.replace(prediction_type="v_prediction", snr_gamma=0.0,
                                                  composite_loss_weight=0.0)
    batch = make_batch([2, 2, 1, 3])
    plain = tiny_model.training_loss(batch, torch.Generator().manual_seed(1))["loss"]
    tiny_model.config = tiny_model.config.replace(snr_gamma=1e12)  # a cap nothing reaches
    torch.testing.assert_close(tiny_model.training_loss(batch, torch.Generator().manual_seed(1))["loss"], plain)
    tiny_model.config = tiny_model.config.replace(snr_gamma=1.0)  # every step weighted by 1 - alpha_bar
    capped = tiny_model.training_loss(batch, torch.Generator().manual_seed(1))["loss"]
    assert 0 < capped < plain
    with pytest.raises(ValueError, match="snr_gamma"):
        tiny_model.config.replace(snr_gamma=-1.0)
    with pytest.raises(ValueError, match="role_loss_weights"):
        tiny_model.config.replace(role_loss_weights=[1.0, 1.0])


def test_role_input_scale_scales_latents_and_keeps_pixels(tiny_model: LayerDiffModel) -> None:
    batch = make_batch([1, 3])
    present = batch["present"]
    plain = tiny_model.encode_layers(batch["layers"], present)
    tiny_model.config = tiny_model.config.replace(role_input_scale=[1.0, 0.5, 0.25])
    scaled = tiny_model.encode_layers(batch["layers"], present)
    torch.testing.assert_close(scaled[:, 0], plain[:, 0])
    torch.testing.assert_close(scaled[:, 1:4], 0.5 * plain[:, 1:4])
    torch.testing.assert_close(scaled[:, 4:], 0.25 * plain[:, 4:])
    keep = present[..., None, None, None]
    torch.testing.assert_close(tiny_model.decode_layers(scaled, present) * keep, batch["layers"] * keep)
    # x0 is clipped to each slot's latent range: a mask's [-1, 1] is [-0.25, 0.25] there
    bounds = tiny_model.clip_x0(torch.full((1, 7, 3, 2, 2), 5.0))[0, :, 0, 0, 0]
    assert bounds.tolist() == [1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    # the loss is in pixel units: an x0 model off by 0.1 of a pixel everywhere scores 0.1^2 on every slot
    tiny_model.config = tiny_model.config.replace(prediction_type="sample", composite_loss_weight=0.0, snr_gamma=0.0)
    tiny_model.predict = lambda *args: scaled + 0.1 * tiny_model.slot_scale()  # a UNet that is 0.1 off
    out = tiny_model.training_loss(batch, torch.Generator().manual_seed(0))
    for key in ("loss", "loss_bg", "loss_fg", "loss_mask"):
        assert float(out[key]) == pytest.approx(0.01, rel=1e-4)
    with pytest.raises(ValueError, match="role_input_scale"):
        tiny_model.config.replace(role_input_scale=[1.0, 0.0, 1.0])


def test_present_layout_is_checked(tiny_model: LayerDiffModel) -> None:
    batch = make_batch([2])
    batch["present"][0, 5] = False  # fg 1 without its mask
    with pytest.raises(ValueError, match="mask n present iff"):
        tiny_model.training_loss(batch)


def test_config_presets_overrides_and_round_trip(tmp_path: Path) -> None:
    cfg = get_config("tiny", max_layers=2, unet={"block_out_channels": [32, 32, 64]})
    assert cfg.num_slots == 5 and cfg.unet["block_out_channels"] == [32, 32, 64]
    assert cfg.unet["layers_per_block"] == 1  # dict overrides merge
    cfg.save(tmp_path)
    assert LayerDiffConfig.load(tmp_path) == cfg
    sd = get_config("sd15", pretrained_path="/x")
    assert (sd.resolution, sd.pixel_space, sd.max_layers, sd.prediction_type) == (512, False, 3, "epsilon")
    with pytest.raises(ValueError, match="unknown"):
        get_config("tiny", nonsense=1)
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        get_config("tiny", prediction_type="epsilon")
    with pytest.raises(ValueError, match="pretrained_path"):
        LayerDiffModel.from_config_name("sd15")


def test_tiny_s3_preset_is_tiny_with_scaled_masks_and_a_narrow_unet() -> None:
    tiny, s3 = get_config("tiny"), get_config("tiny-s3", max_layers=2)
    assert (s3.name, s3.role_input_scale, s3.unet["block_out_channels"]) == ("tiny-s3", [1.0, 1.0, 0.3], [16, 24, 32])
    assert s3.max_layers == 2 and s3.unet["layers_per_block"] == tiny.unet["layers_per_block"]
    assert {k: v for k, v in s3.to_dict().items() if k not in ("name", "role_input_scale", "unet", "max_layers")} \
        == {k: v for k, v in tiny.to_dict().items() if k not in ("name", "role_input_scale", "unet", "max_layers")}
    assert get_config("tiny-s3", unet={"block_out_channels": [8, 16, 24]}).unet["block_out_channels"] == [8, 16, 24]


def test_saved_configs_of_removed_options_load_only_with_the_option_off(tmp_path: Path) -> None:
    from model.configuration import REMOVED_OPTIONS, REMOVED_SETTINGS

    cfg = get_config("tiny")
    # a config saved before the removal: every removed option at the value that left it off
    saved = {**cfg.to_dict(), **REMOVED_OPTIONS, **{key: 7 for key in REMOVED_SETTINGS}}
    assert LayerDiffConfig.from_dict(saved) == cfg
    for key, off in (("self_conditioning", True), ("mask_corruption", 0.5), ("timestep_logit_normal", [0.5, 1.0])):
        assert REMOVED_OPTIONS[key] != off
        with pytest.raises(ValueError, match=f"field '{key}' was removed"):
            LayerDiffConfig.from_dict({**saved, key: off})
        (tmp_path / "layerdiff_config.json").write_text(__import__("json").dumps({**saved, key: off}))
        with pytest.raises(ValueError, match=key):
            LayerDiffConfig.load(tmp_path)
    with pytest.raises(ValueError, match="unknown LayerDiffConfig field 'coord_channels'"):
        get_config("tiny", coord_channels=True)  # not an option any more


def test_max_layers_two_model_runs() -> None:
    model = LayerDiffModel.from_config_name("tiny", max_layers=2)
    batch = make_batch([1, 2])
    batch = {**batch, "layers": batch["layers"][:, [0, 1, 2, 4, 5]], "present": batch["present"][:, [0, 1, 2, 4, 5]],
             "layer_prompts": [lp[:3] for lp in batch["layer_prompts"]]}
    assert torch.isfinite(model.training_loss(batch)["loss"])


def test_save_load_round_trip_identical(active_model: LayerDiffModel, tmp_path: Path) -> None:
    batch = make_batch([1, 3])
    active_model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "unet" / "config.json").is_file()
    loaded = LayerDiffModel.from_pretrained(tmp_path / "m")
    assert loaded.config == active_model.config
    sd_a, sd_b = active_model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    for m in (active_model, loaded):
        m.eval()
    with torch.no_grad():
        la = active_model.training_loss(batch, torch.Generator().manual_seed(1))["loss"]
        lb = loaded.training_loss(batch, torch.Generator().manual_seed(1))["loss"]
    assert torch.equal(la, lb)
    args = (["a red circle"] * 2, batch["layer_prompts"], batch["present"])
    sa = ddim_sample(active_model, *args, num_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    sb = ddim_sample(loaded, *args, num_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sa, sb)
