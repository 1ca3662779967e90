"""Loss, configs and the save_pretrained / from_pretrained round trip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

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


def test_snr_per_role_uses_each_roles_own_snr(tiny_model: LayerDiffModel) -> None:
    tiny_model.config = tiny_model.config.replace(prediction_type="sample", snr_gamma=5.0, composite_loss_weight=0.0,
                                                  role_loss_weights=[0.0, 0.0, 1.0])  # the loss: masks only
    batch = make_batch([2, 3, 1, 3])

    def loss(**overrides: object) -> dict[str, torch.Tensor]:
        tiny_model.config = tiny_model.config.replace(**overrides)
        return tiny_model.training_loss(batch, torch.Generator().manual_seed(3))

    # At input scale 1 a role's SNR is the image's: the flag changes nothing.
    torch.testing.assert_close(loss(snr_per_role=True)["loss"], loss(snr_per_role=False)["loss"])
    # Masks scaled by 1e-3 have SNR ~0 at every step: each weighs min(0 + 1, 5) = 1 and the loss is their
    # plain mean; with the image's SNR the low-noise steps weigh up to 5 and it is not.
    per_role = loss(role_input_scale=[1.0, 1.0, 1e-3], snr_per_role=True)
    torch.testing.assert_close(per_role["loss"].detach(), per_role["loss_mask"], rtol=1e-3, atol=0)
    image = loss(snr_per_role=False)
    assert not torch.allclose(image["loss"].detach(), image["loss_mask"], rtol=1e-2)


def test_timestep_densities(tiny_model: LayerDiffModel) -> None:
    def draw(**overrides: object) -> torch.Tensor:
        tiny_model.config = tiny_model.config.replace(**overrides)
        return tiny_model._sample_timesteps(20_000, torch.Generator().manual_seed(0), "cpu").double()

    uniform = draw()
    assert uniform.min() == 0 and uniform.max() == 999 and abs(uniform.mean() - 499.5) < 10
    noisy = draw(timestep_bias=2.0)  # density ~ t: mean 2T/3
    assert abs(noisy.mean() - 666) < 10
    logit = draw(timestep_bias=1.0, timestep_logit_normal=[0.5, 1.0])  # t/T = sigmoid(0.5 + n)
    assert abs(logit.median() - 1000 * torch.sigmoid(torch.tensor(0.5)).item()) < 10
    within_1sd = ((logit >= 1000 * torch.sigmoid(torch.tensor(-0.5))) & (logit < 1000 * torch.sigmoid(torch.tensor(1.5))))
    assert abs(within_1sd.double().mean() - 0.683) < 0.02 and logit.min() >= 0 and logit.max() <= 999
    for bad in ({"timestep_logit_normal": [0.5]}, {"timestep_logit_normal": [0.5, 0.0]},
                {"timestep_logit_normal": [0.5, 1.0], "timestep_bias": 2.0}):
        with pytest.raises(ValueError, match="timestep_logit_normal"):
            tiny_model.config.replace(**bad)


def test_zero_init_residuals_starts_every_block_as_identity() -> None:
    from diffusers import Transformer2DModel
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    model = LayerDiffModel.from_config_name("tiny", zero_init_residuals=True)
    unet = model.unet.unet
    last = [m.conv2 for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    last += [m.proj_out for m in unet.modules() if isinstance(m, Transformer2DModel)]
    # 3 + 2 + 6 ResNets, 2 + 1 + 4 transformers (down, mid, up)
    assert len(last) == 11 + 7 and all(float(p.detach().abs().max()) == 0 for m in last for p in m.parameters())
    assert float(unet.conv_in.weight.detach().abs().max()) > 0  # the rest keeps its random initialisation
    batch = make_batch([1, 3])
    present = batch["present"]
    x = torch.randn(2, model.num_slots, *model.latent_shape)
    context = model.encode_prompts(batch["prompt"], batch["layer_prompts"])
    with torch.no_grad():
        pred = model.predict(x, torch.tensor([10, 900]), context, present)
    assert float(pred.abs().max()) == 0  # conv_out = 0
    out = model.training_loss(batch, torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert float(unet.conv_out.weight.grad.abs().max()) > 0  # and it learns from there
    torch.manual_seed(0)
    plain = LayerDiffModel.from_config_name("tiny").unet.unet
    for weight in (plain.conv_out.weight, plain.down_blocks[0].resnets[0].conv2.weight):
        assert float(weight.detach().abs().max()) > 0


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


def test_distance_mask_encoding_round_trips_exactly() -> None:
    from model.layers import distance_to_masks, masks_to_distance

    model = LayerDiffModel.from_config_name("tiny", mask_encoding="distance", mask_distance_width=3.0)
    batch = make_batch([1, 3])
    present = batch["present"]
    latents = model.encode_layers(batch["layers"], present)
    keep = present[..., None, None, None]
    torch.testing.assert_close(latents[:, :4], batch["layers"][:, :4] * keep[:, :4])  # colours as they were
    torch.testing.assert_close(model.decode_layers(latents, present) * keep, batch["layers"] * keep)
    # a 1-px-wide vertical bar at x = 2 in a 1 x 6 row: distances -1.5, -0.5, +0.5, -0.5, -1.5, -2.5 px
    row = torch.tensor([[-1.0, -1.0, 1.0, -1.0, -1.0, -1.0]])
    field = masks_to_distance(row, width=2.0)
    torch.testing.assert_close(field, torch.tensor([[-0.75, -0.25, 0.25, -0.25, -0.75, -1.0]]))
    torch.testing.assert_close(distance_to_masks(field, 2.0), row)
    assert torch.equal(masks_to_distance(torch.full((2, 3), -1.0), 2.0), torch.full((2, 3), -1.0))  # empty
    with pytest.raises(ValueError, match="mask_encoding"):
        get_config("tiny", mask_encoding="sdf")
    with pytest.raises(ValueError, match="pixel_space"):
        get_config("sd15", mask_encoding="distance")


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


def test_self_conditioning_trains_feeds_back_x0_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LayerDiffModel.from_config_name("tiny", self_conditioning=True)
    assert model.unet.unet.config.in_channels == 2 * model.unet.unet.config.out_channels
    batch = make_batch([1, 3])
    seen: list[torch.Tensor | None] = []
    predict = model.predict

    def recording_predict(x_t, timesteps, context, present, x0_prev=None):
        seen.append(x0_prev)
        return predict(x_t, timesteps, context, present, x0_prev)

    model.predict = recording_predict  # type: ignore[method-assign]
    for seed in range(6):  # both sides of the half-the-batches coin
        model.training_loss(batch, torch.Generator().manual_seed(seed))["loss"].backward()
    fed = [x for x in seen if x is not None]
    assert fed and len(fed) < 6 and all(bool((x.abs() <= 1).all()) for x in fed)  # clamped own estimates
    seen.clear()
    out = ddim_sample(model, batch["prompt"], batch["layer_prompts"], batch["present"], num_steps=3,
                      generator=torch.Generator().manual_seed(0))
    assert seen[0] is None and all(x is not None for x in seen[1:]) and len(seen) == 3
    del model.predict
    model.save_pretrained(tmp_path / "m")
    loaded = LayerDiffModel.from_pretrained(tmp_path / "m")
    assert loaded.config.self_conditioning
    again = ddim_sample(loaded, batch["prompt"], batch["layer_prompts"], batch["present"], num_steps=3,
                        generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, out)


def test_coord_channels_reach_the_unet_and_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LayerDiffModel.from_config_name("tiny", coord_channels=True)
    assert model.unet.unet.config.in_channels == model.unet.unet.config.out_channels + 2
    seen: list[torch.Tensor] = []
    model.unet.unet.conv_in.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    batch = make_batch([1, 3])
    model.training_loss(batch, torch.Generator().manual_seed(0))["loss"].backward()
    x = seen[0]
    h = w = model.config.resolution // model.config.patch_size
    assert x.shape[1:] == (14, h, w)
    xs, ys = x[:, -2], x[:, -1]  # every layer row gets the same grid: x along width, y along height
    assert torch.equal(xs, xs[:1].expand_as(xs)) and torch.equal(ys, ys[:1].expand_as(ys))
    assert torch.allclose(xs[0, 0], torch.linspace(-1 + 1 / w, 1 - 1 / w, w))
    assert torch.allclose(ys[0, :, 0], torch.linspace(-1 + 1 / h, 1 - 1 / h, h))
    assert model.unet.unet.conv_in.weight.grad[:, -2:].abs().sum() > 0  # the coordinates are used
    model.save_pretrained(tmp_path / "m")
    loaded = LayerDiffModel.from_pretrained(tmp_path / "m")
    assert loaded.config.coord_channels and loaded.unet.coord_channels
    with torch.no_grad():
        la = model.training_loss(batch, torch.Generator().manual_seed(1))["loss"]
        lb = loaded.training_loss(batch, torch.Generator().manual_seed(1))["loss"]
    assert torch.equal(la, lb)
    with pytest.raises(ValueError, match="coordinate channels"):
        LayerDiffModel.from_config_name("tiny", coord_channels=True, unet={"in_channels": 12})


def _traced_loss(batch: dict, mask_answer: float | None = None, **overrides
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One training loss of a seeded tiny model with ``overrides``, and what the UNet was given
    (x_t, timesteps) and what its target was built from (x0, noise). ``mask_answer``: the UNet
    answers zeros, and this value (pixel units) for every mask pixel, instead of running."""
    torch.manual_seed(0)
    model = LayerDiffModel.from_config_name("tiny", **overrides)
    seen: dict[str, torch.Tensor] = {}
    predict, target = model.predict, model.target
    k = model.config.max_layers

    def recording_predict(x_t, timesteps, context, present, x0_prev=None):
        seen.update(x_t=x_t.detach().clone(), t=timesteps)
        if mask_answer is None:
            return predict(x_t, timesteps, context, present, x0_prev)
        out = torch.zeros_like(x_t)
        out[:, 1 + k:] = mask_answer * model.slot_scale(x_t.ndim)[:, 1 + k:]
        return out

    def recording_target(x0, noise, timesteps):
        seen.update(x0=x0.clone(), noise=noise.clone())
        return target(x0, noise, timesteps)

    model.predict, model.target = recording_predict, recording_target  # type: ignore[method-assign]
    out = model.training_loss(batch, torch.Generator().manual_seed(3))
    assert torch.isfinite(out["loss"])
    return out, seen


def _loss_inputs(batch: dict, **overrides) -> dict[str, torch.Tensor]:
    """What the UNet was given and its target built from, in one training loss (``_traced_loss``)."""
    return _traced_loss(batch, **overrides)[1]


def test_input_perturbation_adds_fresh_noise_to_the_input_only() -> None:
    batch = make_batch([1, 3])
    plain, perturbed = _loss_inputs(batch, input_perturbation=0.0), _loss_inputs(batch, input_perturbation=0.5)
    model = LayerDiffModel.from_config_name("tiny")
    t = plain["t"]
    assert torch.equal(t, perturbed["t"])  # same timesteps and first noise: only the extra noise differs
    assert torch.equal(plain["noise"], perturbed["noise"])  # the target keeps the unperturbed noise
    extra = (perturbed["x_t"] - plain["x_t"]).flatten(1)
    expected_std = 0.5 * (1 - model._alpha(t, 2)).sqrt().flatten()  # sqrt(1 - alpha_bar) * gamma * N(0, 1)
    torch.testing.assert_close(extra.std(dim=1), expected_std, rtol=0.1, atol=1e-3)
    with pytest.raises(ValueError, match="input_perturbation"):
        LayerDiffModel.from_config_name("tiny", input_perturbation=-0.1)


def test_mask_corruption_noises_masks_from_imprecise_copies_and_keeps_the_target() -> None:
    batch = make_batch([1, 3])
    k = get_config("tiny").max_layers
    runs = {name: _loss_inputs(batch, **overrides) for name, overrides in (
        ("plain", {}), ("identity", {"mask_corruption": 1.0, "mask_corruption_blur": [0.0, 0.0]}),
        ("warped", {"mask_corruption": 1.0, "mask_corruption_warp": 1.5}),
        ("late", {"mask_corruption": 1.0, "mask_corruption_warp": 1.5, "mask_corruption_min_t": 999}))}
    inputs = {name: run["x_t"] for name, run in runs.items()}
    # sigma 0, no warp: the copy is the mask itself, and the same timesteps and noise are drawn
    assert torch.equal(inputs["identity"], inputs["plain"])
    # a real corruption changes only the present mask slots' inputs; every target is the true layer
    assert torch.equal(runs["warped"]["x0"], runs["plain"]["x0"])
    changed = (inputs["warped"] != inputs["plain"]).flatten(2).any(2)  # (B, L)
    assert not changed[:, : 1 + k].any()
    present = batch["present"].bool()
    assert changed[:, 1 + k:][present[:, 1 + k:]].any() and not changed[~present].any()
    assert torch.equal(inputs["late"], inputs["plain"])  # no timestep drawn here reaches 999
    with pytest.raises(ValueError, match="mask_corruption"):
        LayerDiffModel.from_config_name("tiny", mask_corruption=0.5, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="mask_corruption"):
        LayerDiffModel.from_config_name("tiny", mask_corruption=1.5)
    with pytest.raises(ValueError, match="mask_corruption_min_t"):
        LayerDiffModel.from_config_name("tiny", mask_corruption=0.5, mask_corruption_min_t=1000)


def test_mask_binarity_loss_is_the_mask_estimates_distance_from_the_poles() -> None:
    batch = make_batch([1, 3])

    def losses(value: float, **overrides) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The loss of a tiny model whose UNet answers ``value`` (pixel units) for every mask pixel."""
        out, seen = _traced_loss(batch, mask_answer=value, **overrides)
        return out, seen["t"]

    on = {"mask_binarity_weight": 2.0}
    grey, t = losses(0.0, **on)
    assert grey["loss_binarity"] > 0
    assert grey["loss"] == pytest.approx(float(grey["loss_diffusion"] + grey["loss_composite"]
                                               + 2.0 * grey["loss_binarity"]), rel=1e-6)
    # linear in the distance from the nearer pole, zero at either pole and beyond (clipped)
    assert losses(0.5, **on)[0]["loss_binarity"] == pytest.approx(0.5 * float(grey["loss_binarity"]), rel=1e-5)
    assert losses(-0.5, **on)[0]["loss_binarity"] == pytest.approx(0.5 * float(grey["loss_binarity"]), rel=1e-5)
    for pole in (1.0, -1.0, 1.7):
        assert float(losses(pole, **on)[0]["loss_binarity"]) == 0.0
    # only timesteps below mask_binarity_max_t pay it
    assert int(t.min()) > 0 and int(t.max()) > int(t.min())
    assert float(losses(0.0, mask_binarity_weight=2.0, mask_binarity_max_t=int(t.min()))[0]["loss_binarity"]) == 0
    partial = losses(0.0, mask_binarity_weight=2.0, mask_binarity_max_t=int(t.max()))[0]["loss_binarity"]
    assert 0 < partial < grey["loss_binarity"]
    assert "loss_binarity" not in losses(0.0)[0]
    with pytest.raises(ValueError, match="mask_binarity_weight"):
        LayerDiffModel.from_config_name("tiny", mask_binarity_weight=-1.0)
    with pytest.raises(ValueError, match="mask_binarity_max_t"):
        LayerDiffModel.from_config_name("tiny", mask_binarity_weight=1.0, mask_binarity_max_t=0)
    with pytest.raises(ValueError, match="mask_binarity_weight"):
        LayerDiffModel.from_config_name("tiny", mask_binarity_weight=1.0, mask_encoding="distance")


def test_mask_logits_train_masks_by_cross_entropy_and_read_x0_through_tanh() -> None:
    batch = make_batch([1, 3])
    model = LayerDiffModel.from_config_name("tiny", mask_logits=True)
    k = model.config.max_layers
    scale = model.slot_scale(5)[:, 1 + k:]
    present = batch["present"][:, 1 + k:]
    share_inside = (batch["layers"][:, 1 + k:] > 0).float().mean(dim=(2, 3, 4))[present]  # per present mask
    for answer in (0.0, 2.0, -1.5):
        out, _ = _traced_loss(batch, mask_answer=answer, mask_logits=True)
        z = torch.tensor(answer) * scale.flatten()[0]  # the logit the harness's UNet answered
        want = share_inside * F.softplus(-z) + (1 - share_inside) * F.softplus(z)  # BCE per mask slot
        assert float(out["loss_mask"]) == pytest.approx(float(want.mean()), rel=1e-5)
    # without the option the same answer is scored by squared error (ln 2 is the logit-0 cross-entropy)
    assert float(_traced_loss(batch, mask_answer=0.0)[0]["loss_mask"]) == pytest.approx(1.0, rel=1e-5)
    assert float(_traced_loss(batch, mask_answer=0.0, mask_logits=True)[0]["loss_mask"]) == pytest.approx(
        math.log(2), rel=1e-5)
    # x0: scale * tanh(logit / 2) on the mask slots, the background and foreground outputs as they are
    gen = torch.Generator().manual_seed(0)
    output, x_t = (torch.randn(batch["layers"].shape, generator=gen) * 3 for _ in range(2))
    alpha = model._alpha(torch.tensor([500, 20]), 5)
    x0, eps = model.predict_x0_eps(x_t, output, alpha)
    torch.testing.assert_close(x0[:, : 1 + k], output[:, : 1 + k])
    torch.testing.assert_close(x0[:, 1 + k:], scale * torch.tanh(output[:, 1 + k:] / 2))
    assert x0[:, 1 + k:].abs().max() < scale.max()
    torch.testing.assert_close(eps, (x_t - alpha.sqrt() * x0) / (1 - alpha).sqrt())
    for bad in ({"prediction_type": "v_prediction"}, {"mask_encoding": "distance"}):
        with pytest.raises(ValueError, match="mask_logits"):
            LayerDiffModel.from_config_name("tiny", mask_logits=True, **bad)
