"""The layered UNet: shapes with padding, SD-initialisation preserved, gradients, padding isolation."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from model import LayerDiffModel
from tests.model.batches import make_batch


def _inputs(model: LayerDiffModel, ks: list[int], seed: int = 0):
    batch = make_batch(ks, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch["layers"].shape, generator=gen)
    t = torch.randint(0, 1000, (len(ks),), generator=gen)
    with torch.no_grad():
        context = model.encode_prompts(batch["prompt"], batch["layer_prompts"])
    return x, t, context, batch["present"]


@pytest.mark.parametrize("pack", [True, False])
def test_shapes_for_every_k_with_padding(active_model: LayerDiffModel, pack: bool) -> None:
    x, t, context, present = _inputs(active_model, [1, 2, 3])
    assert context.shape == (3, 7, 32, 64)
    with torch.no_grad():
        out = active_model.unet(x, t, context, present, pack=pack)
    assert out.shape == (3, 7, 3, 32, 32) and torch.isfinite(out).all()
    assert torch.all(out[~present] == 0)  # padded layers are masked out of the output
    assert torch.all(out[present].abs().sum(dim=(1, 2, 3)) > 0)


def test_packed_equals_masked(active_model: LayerDiffModel) -> None:
    """Leaving padded layers out of the UNet batch is only an optimisation."""
    x, t, context, present = _inputs(active_model, [1, 3, 2])
    with torch.no_grad():
        packed = active_model.unet(x, t, context, present, pack=True)
        masked = active_model.unet(x, t, context, present, pack=False)
    torch.testing.assert_close(packed, masked, atol=1e-5, rtol=1e-5)


def test_zero_init_single_layer_equals_plain_unet(tiny_model: LayerDiffModel) -> None:
    """New modules at zero init + one layer: exactly the plain UNet on the same weights."""
    x, t, context, present = _inputs(tiny_model, [1, 1])
    only_bg = torch.zeros_like(present)
    only_bg[:, 0] = True
    p = tiny_model.config.patch_size
    with torch.no_grad():
        layered = tiny_model.unet(x, t, context, only_bg)[:, 0]
        plain = F.pixel_shuffle(tiny_model.unet.unet(F.pixel_unshuffle(x[:, 0], p), t, context[:, 0]).sample, p)
    assert torch.equal(layered, plain)


def test_zero_init_all_layers_equal_plain_unet_per_layer(tiny_model: LayerDiffModel) -> None:
    x, t, context, present = _inputs(tiny_model, [3, 3])
    p = tiny_model.config.patch_size
    with torch.no_grad():
        layered = tiny_model.unet(x, t, context, present)
        flat = F.pixel_unshuffle(x.flatten(0, 1), p)
        plain = tiny_model.unet.unet(flat, t.repeat_interleave(7), context.flatten(0, 1)).sample
    torch.testing.assert_close(layered.flatten(0, 1), F.pixel_shuffle(plain, p), atol=1e-6, rtol=0)


def test_new_modules_act_across_layers(active_model: LayerDiffModel) -> None:
    """Once trained (here: perturbed), changing a foreground changes the background's output."""
    x, t, context, present = _inputs(active_model, [2])
    with torch.no_grad():
        before = active_model.unet(x, t, context, present)[:, 0]
        x[:, 1] += 1.0
        after = active_model.unet(x, t, context, present)[:, 0]
    assert (after - before).abs().max() > 1e-4


@pytest.mark.parametrize("pack", [True, False])
def test_padding_cannot_influence_present_layers(active_model: LayerDiffModel, pack: bool) -> None:
    x, t, context, present = _inputs(active_model, [1, 2])
    with torch.no_grad():
        before = active_model.unet(x, t, context, present, pack=pack)
        x2, context2 = x.clone(), context.clone()
        x2[~present] = torch.randn_like(x2[~present]) * 10  # wild values in every padded layer
        context2[~present] = torch.randn_like(context2[~present])  # and padded prompts
        after = active_model.unet(x2, t, context2, present, pack=pack)
    torch.testing.assert_close(after[present], before[present], atol=1e-6, rtol=0)


def _reference_inter_layer(block, hidden: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The block's maths one sample and one position at a time: softmax over the present layers only."""
    b, num_slots, c, h, w = hidden.shape
    heads, d = block.num_heads, c // block.num_heads
    out = hidden.clone()
    for i in range(b):
        slots = present[i].nonzero().squeeze(1)
        for y in range(h):
            for x in range(w):
                tokens = hidden[i, slots, :, y, x]  # (n, C)
                q, k, v = block.to_qkv(block.norm(tokens) + block.slot_embedding[slots]).split(c, dim=-1)
                mixed = torch.cat([torch.softmax(q[:, j * d:(j + 1) * d] @ k[:, j * d:(j + 1) * d].T / d ** 0.5, -1)
                                   @ v[:, j * d:(j + 1) * d] for j in range(heads)], dim=-1)
                tokens = tokens + block.to_out(mixed)
                out[i, slots, :, y, x] = tokens + block.ff(block.ff_norm(tokens))
    return out


def test_inter_layer_attention_matches_per_sample_reference(active_model: LayerDiffModel) -> None:
    """One pass over a mixed-K batch (packed rows, masked keys) is per-sample attention over present layers."""
    block = active_model.unet.adapter.blocks[0]
    present = make_batch([1, 3, 2])["present"]
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn((3, present.shape[1], block.norm.normalized_shape[0], 3, 2), generator=gen)
    positions = present.reshape(-1).nonzero().squeeze(1)
    with torch.no_grad():
        want = _reference_inter_layer(block, hidden, present)
        packed = block(hidden.flatten(0, 1).index_select(0, positions), positions, 3)
        full = block(hidden.flatten(0, 1), None, 3)  # every layer present
        want_full = _reference_inter_layer(block, hidden, torch.ones_like(present))
    torch.testing.assert_close(packed, want.flatten(0, 1).index_select(0, positions), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, want_full.flatten(0, 1), atol=1e-5, rtol=1e-5)
    assert (packed - hidden.flatten(0, 1).index_select(0, positions)).abs().max() > 1e-3  # it acts


def _grad_norms(model: LayerDiffModel, ks: list[int]) -> dict[str, float]:
    model.train()
    model.zero_grad()
    model.training_loss(make_batch(ks), torch.Generator().manual_seed(0))["loss"].backward()
    modules = {f"inter_layer.{i}": b for i, b in enumerate(model.unet.adapter.blocks)}
    modules["role_embedding"] = model.unet.adapter.role_embedding
    modules["depth_embedding"] = model.unet.adapter.depth_embedding
    modules.update({f"enhancer.{i}": b for i, b in enumerate(model.prompt_enhancer.blocks)})
    return {name: sum(float(p.grad.abs().sum()) for p in m.parameters() if p.grad is not None)
            for name, m in modules.items()}


def test_gradients_reach_every_new_module_at_init(tiny_model: LayerDiffModel) -> None:
    norms = _grad_norms(tiny_model, [3, 3])
    assert all(v > 0 for v in norms.values()), norms


def test_gradients_reach_every_new_parameter_once_active(active_model: LayerDiffModel) -> None:
    _grad_norms(active_model, [3, 3])
    for module in (active_model.unet.adapter, active_model.prompt_enhancer):
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_deepcopy_and_pickle_keep_hooks_on_the_copy(active_model: LayerDiffModel) -> None:
    """EMA copies and Ray's pickling must give models whose hooks use their own adapter."""
    x, t, context, present = _inputs(active_model, [2])
    with torch.no_grad():
        want = active_model.unet(x, t, context, present)
        for clone in (copy.deepcopy(active_model), pickle.loads(pickle.dumps(active_model))):
            torch.testing.assert_close(clone.unet(x, t, context, present), want, atol=0, rtol=0)
            for p in clone.unet.adapter.blocks[0].parameters():
                p.zero_()  # a change to the clone's adapter must show in the clone only
            assert not torch.equal(clone.unet(x, t, context, present), want)
        torch.testing.assert_close(active_model.unet(x, t, context, present), want, atol=0, rtol=0)


def test_plain_unet_call_outside_layered_forward_is_plain(active_model: LayerDiffModel) -> None:
    x, t, context, present = _inputs(active_model, [1])
    unet = active_model.unet.unet
    sample = F.pixel_unshuffle(x[:, 0], 2)
    with torch.no_grad():
        a = unet(sample, t, context[:, 0]).sample
        active_model.unet(x, t, context, present)
        b = unet(sample, t, context[:, 0]).sample
    assert torch.equal(a, b)


def test_rejects_bad_inputs(tiny_model: LayerDiffModel) -> None:
    x, t, context, present = _inputs(tiny_model, [1])
    with pytest.raises(ValueError, match="layers"):
        tiny_model.unet(x[:, :5], t, context[:, :5], present[:, :5])
    with pytest.raises(ValueError, match="present"):
        tiny_model.unet(x, t, context, torch.zeros_like(present))


def test_gradient_checkpointing_gives_the_same_gradients(active_model: LayerDiffModel) -> None:
    """diffusers checkpoints ResNets only; the hooks must not be re-run out of context."""
    batch = make_batch([1, 3])

    def grads() -> list[torch.Tensor]:
        active_model.zero_grad()
        active_model.training_loss(batch, torch.Generator().manual_seed(0))["loss"].backward()
        return [p.grad.clone() for p in active_model.unet.parameters()]

    active_model.train()
    plain = grads()
    active_model.unet.unet.enable_gradient_checkpointing()
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
