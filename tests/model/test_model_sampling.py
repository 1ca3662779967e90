"""DDIM sampling with classifier-free guidance and the per-step hook."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from model import LayerDiffModel
from model.layers import present_vector
from model.sampling import SamplerStep, ddim_sample, trailing_timesteps

PROMPTS = ["a red circle on a gray background", "a blue square and a green star on a white background"]
LAYER_PROMPTS = [["a gray background", "a red circle", "", ""],
                 ["a white background", "a blue square", "a green star", ""]]


def _present() -> torch.Tensor:
    return torch.stack([present_vector(1, 3), present_vector(2, 3)])


def test_trailing_timesteps_match_diffusers() -> None:
    scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    for n in (1, 7, 25, 50):
        scheduler.set_timesteps(n)
        assert trailing_timesteps(1000, n) == scheduler.timesteps.tolist()
    assert trailing_timesteps(1000, 25)[0] == 999


def test_sample_shape_range_and_absent_layers(active_model: LayerDiffModel) -> None:
    out = ddim_sample(active_model, PROMPTS, LAYER_PROMPTS, _present(), num_steps=4, guidance_scale=3.0,
                      generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 7, 3, 32, 32) and out.min() >= -1 and out.max() <= 1
    assert torch.all(out[~_present()] == -1)  # absent: black foreground, empty mask


def test_guidance_scale_one_is_unguided_and_scale_matters(active_model: LayerDiffModel) -> None:
    def run(scale: float, prompts=PROMPTS, layer_prompts=LAYER_PROMPTS) -> torch.Tensor:
        return ddim_sample(active_model, prompts, layer_prompts, _present(), num_steps=3, guidance_scale=scale,
                           generator=torch.Generator().manual_seed(0))

    seen: list[SamplerStep] = []
    unguided = ddim_sample(active_model, PROMPTS, LAYER_PROMPTS, _present(), num_steps=3, guidance_scale=1.0,
                           generator=torch.Generator().manual_seed(0), step_hook=seen.append)
    assert torch.equal(run(1.0), unguided) and all(s.output_uncond is None for s in seen)
    assert not torch.allclose(run(4.0), unguided)
    # With empty prompts the two CFG branches agree, so any scale gives the unguided result.
    empty, empty_layers = ["", ""], [[""] * 4] * 2
    torch.testing.assert_close(run(4.0, empty, empty_layers), run(1.0, empty, empty_layers), atol=1e-4, rtol=0)


def test_negative_prompts_replace_the_unconditional_branch(active_model: LayerDiffModel) -> None:
    def run(scale: float, **negative) -> torch.Tensor:
        return ddim_sample(active_model, PROMPTS, LAYER_PROMPTS, _present(), num_steps=3, guidance_scale=scale,
                           generator=torch.Generator().manual_seed(0), **negative)

    unguided = run(1.0)
    # Negative prompts equal to the prompts: both branches agree, any scale gives the unguided result.
    same = run(4.0, negative_prompt=PROMPTS, negative_layer_prompts=LAYER_PROMPTS)
    torch.testing.assert_close(same, unguided, atol=1e-4, rtol=0)
    # Empty negatives are plain CFG; a different negative steers elsewhere.
    empty = run(4.0, negative_prompt=["", ""], negative_layer_prompts=[[""] * 4] * 2)
    torch.testing.assert_close(empty, run(4.0), atol=1e-5, rtol=0)
    swapped = [[lp[0], *[p.replace("circle", "star") for p in lp[1:]]] for lp in LAYER_PROMPTS]
    other = run(4.0, negative_prompt=PROMPTS, negative_layer_prompts=swapped)
    assert not torch.allclose(other, unguided) and not torch.allclose(other, run(4.0))
    with pytest.raises(ValueError, match="negative prompts"):
        run(4.0, negative_prompt=PROMPTS[:1])


def test_step_hook_sees_every_step_and_can_replace_x0(active_model: LayerDiffModel) -> None:
    seen: list[SamplerStep] = []

    def hook(step: SamplerStep) -> torch.Tensor:
        seen.append(step)
        return torch.full_like(step.x0, 0.25)

    out = ddim_sample(active_model, PROMPTS, LAYER_PROMPTS, _present(), num_steps=5, guidance_scale=2.0,
                      generator=torch.Generator().manual_seed(0), step_hook=hook)
    assert [s.index for s in seen] == list(range(5)) and seen[0].timestep == 999
    assert seen[0].output_uncond is not None and seen[0].x0.shape == (2, 7, 3, 32, 32)
    assert seen[-1].alpha_prev == 1.0
    torch.testing.assert_close(out[_present()], torch.full_like(out[_present()], 0.25))


def test_eta_and_generator_reproducibility(active_model: LayerDiffModel) -> None:
    kw = {"num_steps": 3, "eta": 1.0}
    a = ddim_sample(active_model, PROMPTS, LAYER_PROMPTS, _present(), generator=torch.Generator().manual_seed(5), **kw)
    b = ddim_sample(active_model, PROMPTS, LAYER_PROMPTS, _present(), generator=torch.Generator().manual_seed(5), **kw)
    c = ddim_sample(active_model, PROMPTS, LAYER_PROMPTS, _present(), generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_oracle_denoiser_recovers_the_data(tiny_model: LayerDiffModel, monkeypatch, prediction_type: str) -> None:
    """With the exact v (or x0) of a one-image data set, DDIM must land on that image."""
    tiny_model.config = tiny_model.config.replace(prediction_type=prediction_type)
    present = _present()
    target = torch.rand(2, 7, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    alphas = tiny_model.alphas_cumprod

    def oracle(x_t, timesteps, context, present_):
        a = alphas[timesteps.cpu()].float().reshape(-1, 1, 1, 1, 1)[: x_t.shape[0]]
        x0 = target.repeat(x_t.shape[0] // 2, 1, 1, 1, 1)
        if prediction_type == "sample":
            return x0
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    monkeypatch.setattr(tiny_model, "predict", oracle)
    for scale in (1.0, 3.0):
        out = ddim_sample(tiny_model, PROMPTS, LAYER_PROMPTS, present, num_steps=10, guidance_scale=scale,
                          generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out[present], target[present], atol=1e-4, rtol=0)
