"""CGA: the confidence mask, the restore invariant under AdamW, and masking of the QKR merged product."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from conftest import make_tiny_vit
from torch import nn

from ofq_ray.quant import QuantAttention, QuantConfig, StatsQuantizer, init_activation_scales, quantize_model
from ofq_ray.quant.cga import CGA, cga_mask
from ofq_ray.quant.lean import unfused
from ofq_ray.quant.quantizers import statsq_prequant, statsq_scale


def _tiny_vit(config: QuantConfig, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = make_tiny_vit(seed)
    quantize_model(model, config)
    images, targets = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    init_activation_scales(model, images)
    return model, images, targets


def _loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(images), targets)


def _attn(model: nn.Module, block: int) -> QuantAttention:
    attn = model.get_submodule(f"blocks.{block}.attn")
    assert isinstance(attn, QuantAttention)
    return attn


def _merged_quantizer(attn: QuantAttention) -> StatsQuantizer:
    assert isinstance(attn.merged_quantizer, StatsQuantizer)
    return attn.merged_quantizer


def _weight(model: nn.Module, name: str) -> nn.Parameter:
    return model.get_parameter(name)


def _adamw(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


# --- cga_mask ----------------------------------------------------------------------------------------

# 2 bits (n = 2), in units of s: z = 2u - 0.5, thresholds at u = -0.5, 0, 0.5 (z = -1.5, -0.5, 0.5).
# With boundary_range 0.125 a value is trainable iff |z - threshold| <= 0.125. All values are dyadic,
# so z is exact. Four zeros pad the row so that mean|u| is exactly 0.5, i.e. s = 2 * mean|W| = scale.
_CASES = [
    (0.5, 0.5, True),  # on a threshold
    (0.5625, 0.625, True),  # exactly boundary_range above it (inclusive)
    (0.4375, 0.375, True),  # exactly boundary_range below it
    (0.625, 0.75, False),  # just outside
    (-0.46875, -1.4375, True),  # inside, near the lowest threshold
    (-0.25, -1.0, False),  # the middle of a level
    (0.96875, 1.4375, False),  # near z = 1.5, the threshold to the missing code 2
    (-0.96875, -2.4375, False),  # near z = -2.5, the threshold to the missing code -3
    (1.359375, 1.5 - 2e-6, False),  # clipped high
    (-1.359375, -2.5, False),  # clipped low
    (0.0, -0.5, True),  # zero sits on the middle threshold
    (0.0, -0.5, True),
    (0.0, -0.5, True),
    (0.0, -0.5, True),
    (0.0, -0.5, True),
]


def test_cga_mask_on_a_hand_built_row() -> None:
    units = torch.tensor([u for u, _, _ in _CASES])
    assert units.abs().mean().item() == 0.5
    weight = torch.stack([4.0 * units, 0.25 * units])  # two rows, two scales: the mask is per row
    assert statsq_scale(weight).flatten().tolist() == [4.0, 0.25]
    z = statsq_prequant(weight, statsq_scale(weight), 2)
    expected_z = torch.tensor([z_ for _, z_, _ in _CASES])
    assert torch.allclose(z[0], expected_z, atol=1e-5) and torch.equal(z[0], z[1])
    mask = cga_mask(weight, bits=2, boundary_range=0.125)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    expected = [keep for _, _, keep in _CASES]
    assert mask[0].tolist() == expected and mask[1].tolist() == expected
    # boundary_range 0 keeps only values exactly on a threshold.
    exact = cga_mask(weight, bits=2, boundary_range=0.0)[0].tolist()
    assert exact == [z_ in (-1.5, -0.5, 0.5) for _, z_, _ in _CASES]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("boundary_range", [0.005, 0.05])
def test_cga_mask_fraction_for_uniform_weights(bits: int, boundary_range: float) -> None:
    # Rows uniform in (-a, a) have s = 2 mean|W| ~ a: nothing clips and z is uniform over an interval of
    # 2n steps that holds 2n - 1 interior thresholds, each with a trainable band 2 * boundary_range wide.
    torch.manual_seed(1)
    weight = (torch.rand(256, 4096) * 2 - 1) * torch.linspace(0.1, 3.0, 256)[:, None]
    n = 2 ** (bits - 1)
    expected = 2 * boundary_range * (2 * n - 1) / (2 * n)
    got = cga_mask(weight, bits, boundary_range).float().mean().item()
    assert got == pytest.approx(expected, rel=0.06)


def test_cga_mask_freezes_gaussian_tails() -> None:
    # Gaussian rows clip about 11% of entries (|W| > 2 mean|W|); none of them may train.
    torch.manual_seed(2)
    weight = torch.randn(64, 2048)
    clipped = weight.abs() >= statsq_scale(weight)
    assert 0.08 < clipped.float().mean().item() < 0.14
    mask = cga_mask(weight, bits=2, boundary_range=0.3)
    assert not (mask & clipped).any()
    assert mask[~clipped].float().mean().item() > 0.3


@pytest.mark.parametrize(
    ("boundary_range", "message"),
    [
        (-0.1, r"^cga.boundary_range: -0.1 is not allowed; allowed: a number in \[0, 0.5\)$"),
        (0.5, r"^cga.boundary_range: 0.5 is not allowed"),
        (float("nan"), r"^cga.boundary_range: nan is not allowed"),
        (True, r"^cga.boundary_range: True is not allowed"),
    ],
)
def test_cga_mask_rejects_bad_boundary_range(boundary_range: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cga_mask(torch.randn(2, 8), 2, boundary_range)


def test_cga_mask_rejects_bad_bits() -> None:
    with pytest.raises(ValueError, match=r"^cga.bits: 1 is not allowed"):
        cga_mask(torch.randn(2, 8), 1, 0.005)


# --- CGA on a quantized ViT --------------------------------------------------------------------------


def test_cga_covers_every_statsq_block_weight_and_rejects_bad_settings() -> None:
    model, _, _ = _tiny_vit(QuantConfig(weight_bits=2, act_bits=2))
    cga = CGA(model, 0.005)
    expected = [f"blocks.{i}.{leaf}.weight" for i in range(2) for leaf in ("attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert cga.names == [*expected, "blocks.0.attn.merged_qk", "blocks.1.attn.merged_qk"]
    cga.close()
    with pytest.raises(ValueError, match=r"^cga.boundary_range: -0.1 is not allowed"):
        CGA(model, -0.1)
    with pytest.raises(ValueError, match=r"^cga.boundary_range: 0.5 is not allowed"):
        CGA(model, 0.5)
    with pytest.raises(ValueError, match=r"^cga.boundary_range: 0.7 is not allowed"):
        cga.boundary_range = 0.7
    lsq, _, _ = _tiny_vit(QuantConfig(weight_bits=2, act_bits=2, qkr=False, weight_quantizer="lsq"))
    with pytest.raises(
        ValueError, match=r"^cga: the model has no StatsQ weights; CGA needs quant.weight_quantizer=statsq$"
    ):
        CGA(lsq, 0.005)


def test_cga_step_restores_frozen_entries_bit_for_bit() -> None:
    model, images, targets = _tiny_vit(QuantConfig(weight_bits=2, act_bits=2))
    optimizer = _adamw(model)
    for _ in range(3):  # give AdamW momentum, so that zero-gradient entries would still move
        optimizer.zero_grad()
        _loss(model, images, targets).backward()
        optimizer.step()

    twin = copy.deepcopy(model)
    twin_optimizer = _adamw(twin)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # or they share moments

    cga = CGA(model, 0.005)
    attn = _attn(model, 0)
    q_before = attn.q_weight.detach().clone()
    covered = {name: _weight(model, name) for name in cga.names if not name.endswith("merged_qk")}
    before = {name: weight.detach().clone() for name, weight in covered.items()}
    masks = {name: cga_mask(weight, 2, 0.005) for name, weight in covered.items()}

    optimizer.zero_grad()
    _loss(model, images, targets).backward()
    cga.step(optimizer)
    twin_optimizer.zero_grad()
    _loss(twin, images, targets).backward()
    twin_optimizer.step()

    changed_trainable = trainable_grads = 0
    for name, weight in covered.items():
        frozen = ~masks[name]
        assert frozen.float().mean().item() > 0.9
        assert torch.equal(weight.detach()[frozen], before[name][frozen]), name
        # Frozen gradients are zeroed, so they do not feed AdamW's moments either.
        assert weight.grad is not None and not weight.grad[frozen].any()
        trainable_grads += int(weight.grad[~frozen].count_nonzero())
        # AdamW: m <- 0.9 m + 0.1 g, so CGA's moment is the twin's minus the twin's gradient share.
        twin_param = _weight(twin, name)
        assert twin_param.grad is not None
        exp_avg, twin_exp_avg = optimizer.state[weight]["exp_avg"], twin_optimizer.state[twin_param]["exp_avg"]
        assert torch.allclose(exp_avg[frozen], twin_exp_avg[frozen] - 0.1 * twin_param.grad[frozen])
        changed_trainable += int((weight.detach()[~frozen] != before[name][~frozen]).sum())
        # Without CGA, AdamW (momentum + decoupled weight decay) moves those same entries.
        twin_weight = _weight(twin, name).detach()
        moved = (twin_weight[frozen] != before[name][frozen]).float().mean().item()
        assert moved > 0.99, name
    assert changed_trainable > 0 and trainable_grads > 0
    # The QKR latent parameters are not restored, so every entry moves (at least by weight decay).
    assert (attn.q_weight.detach() != q_before).float().mean().item() > 0.99
    cga.close()


def _merged_input_capture(attn: QuantAttention) -> list[torch.Tensor]:
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        args[0].retain_grad()
        captured.append(args[0])

    _merged_quantizer(attn).register_forward_pre_hook(hook)
    return captured


def test_cga_masks_the_merged_product_gradient_before_the_product_rule() -> None:
    model, images, targets = _tiny_vit(QuantConfig(weight_bits=2, act_bits=2))
    boundary_range = 0.05
    attn = _attn(model, 1)
    captured = _merged_input_capture(attn)

    # Plain StatsQ: dL/dM passes straight through; keep it and the merged product it belongs to (the
    # module-by-module path, where the merged quantizer is a module call that a hook can see).
    model.zero_grad()
    with unfused():
        _loss(model, images, targets).backward()
    merged = captured[-1].detach()
    grad_merged = captured[-1].grad
    assert grad_merged is not None
    assert attn.q_weight.grad is not None
    plain_q = attn.q_weight.grad.clone()

    cga = CGA(model, boundary_range, include_merged=True)
    assert _merged_quantizer(attn).boundary_range == boundary_range
    # Reference: mask dL/dM by hand (the quantizer's backward must give exactly that) and push it through
    # M = W_q^T W_k.
    mask = cga_mask(merged, 2, boundary_range)
    assert 0.0 < mask.float().mean().item() < 0.5
    expected_q, expected_k = torch.autograd.grad(
        attn.merged_weight(), (attn.q_weight, attn.k_weight), grad_outputs=grad_merged * mask
    )
    for path in (unfused, nullcontext):  # module by module, then the fused QKR function
        model.zero_grad()
        with path():
            _loss(model, images, targets).backward()
        got_q, got_k = attn.q_weight.grad, attn.k_weight.grad
        assert got_q is not None and got_k is not None
        if path is unfused:
            masked_grad = captured[-1].grad
            assert masked_grad is not None and torch.equal(masked_grad, grad_merged * mask)
        assert torch.allclose(got_q, expected_q, rtol=1e-5, atol=1e-8)
        assert torch.allclose(got_k, expected_k, rtol=1e-5, atol=1e-8)
        assert not torch.allclose(got_q, plain_q)

    cga.close()
    assert _merged_quantizer(attn).boundary_range is None
    cga.boundary_range = 0.1  # a closed CGA leaves the quantizers alone
    assert _merged_quantizer(attn).boundary_range is None


def test_cga_leaves_the_merged_product_alone_when_asked_or_faithful() -> None:
    model, _, _ = _tiny_vit(QuantConfig(weight_bits=2, act_bits=2))
    merged = [_merged_quantizer(_attn(model, block)) for block in range(2)]
    assert len(merged) == 2
    cga = CGA(model, 0.005, include_merged=False)
    assert all(q.boundary_range is None for q in merged)
    assert not any(name.endswith("merged_qk") for name in cga.names)
    with CGA(model, 0.005) as default:
        assert default.include_merged
        assert all(q.boundary_range == 0.005 for q in merged)
        default.boundary_range = 0.02  # a sweep may change it
        assert all(q.boundary_range == 0.02 for q in merged)
    assert all(q.boundary_range is None for q in merged)

    faithful, _, _ = _tiny_vit(QuantConfig(weight_bits=2, act_bits=2, faithful=True))
    cga = CGA(faithful, 0.005)
    assert not cga.include_merged
    assert all(_merged_quantizer(_attn(faithful, block)).boundary_range is None for block in range(2))


def test_frozen_fraction_shrinks_as_the_boundary_range_grows() -> None:
    model, _, _ = _tiny_vit(QuantConfig(weight_bits=2, act_bits=2))
    cga = CGA(model, 0.005)
    narrow = cga.frozen_fraction()
    per_tensor = cga.frozen_fractions()
    assert 0.9 < narrow < 1.0
    assert set(per_tensor) == set(cga.names)
    assert all(0.9 < value <= 1.0 for value in per_tensor.values())
    cga.boundary_range = 0.2
    wide = cga.frozen_fraction()
    assert wide < narrow - 0.2
    cga.close()


def test_cga_step_with_a_grad_scaler() -> None:
    model, images, targets = _tiny_vit(QuantConfig(weight_bits=2, act_bits=2))
    optimizer = _adamw(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    cga = CGA(model, 0.005)
    fc1 = _weight(model, "blocks.0.mlp.fc1.weight")
    before = fc1.detach().clone()
    mask = cga_mask(fc1, 2, 0.005)
    optimizer.zero_grad()
    scaler.scale(_loss(model, images, targets)).backward()
    cga.step(optimizer, scaler)
    scaler.update()
    assert torch.equal(fc1.detach()[~mask], before[~mask])
    assert not torch.equal(fc1.detach()[mask], before[mask])

    # An overflowing step is skipped by the scaler; the restore must leave everything as it was.
    before = fc1.detach().clone()
    optimizer.zero_grad()
    scaler.scale(_loss(model, images, targets)).backward()
    assert fc1.grad is not None
    fc1.grad[0, 0] = float("inf")
    cga.step(optimizer, scaler)
    scaler.update()
    assert torch.equal(fc1.detach(), before)
    assert scaler.get_scale() < 1024.0
    cga.close()
