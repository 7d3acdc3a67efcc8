"""The lean (fused) autograd functions against plain autograd on their formulas, and whole models
fused vs module by module: outputs and every gradient, in float32 and under bf16 autocast."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_swin, make_tiny_vit, randomize_biases
from torch import nn

from ofq_ray.quant import QuantConfig, init_activation_scales, quantize_model
from ofq_ray.quant.cga import CGA
from ofq_ray.quant.lean import LsqLinear, PatchConv, QkrLogits, unfused
from ofq_ray.quant.quantizers import low_confidence, statsq_prequant, statsq_scale

# --- plain references: straight-through estimators written with detach() ---------------------------


def _ste_round(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


def _scaled(step: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """The step with LSQ's 1e-5 floor (gradient passes through) and its gradient times ``grad_scale``."""
    floored = step + (step.clamp_min(1e-5) - step).detach()
    return floored * grad_scale + (floored - floored * grad_scale).detach()


def lsq_reference(
    x: torch.Tensor,
    step: torch.Tensor,
    before: torch.Tensor | None,
    after: torch.Tensor | None,
    qn: int,
    qp: int,
    grad_scale: float,
) -> torch.Tensor:
    """``s * round(clamp((x + before) / s, qn, qp)) + after``, in float32, cast to ``x + shifts``' dtype."""
    s = _scaled(step.float(), grad_scale)
    shifted = x.float() if before is None else x.float() + before.float()
    out = _ste_round(torch.clamp(shifted / s, qn, qp)) * s
    out = out if after is None else out + after.float()
    dtype = x.dtype
    for shift in (before, after):
        dtype = dtype if shift is None else torch.promote_types(dtype, shift.dtype)
    return out.to(dtype)


def statsq_reference(weight: torch.Tensor, levels_half: int, boundary_range: float | None) -> torch.Tensor:
    """StatsQ's value with an identity gradient, masked to the low-confidence entries if asked."""
    scale = statsq_scale(weight)
    z = statsq_prequant(weight, scale, levels_half)
    value = scale * ((torch.round(z) + 0.5) / levels_half)
    passed = weight
    if boundary_range is not None:
        mask = low_confidence(z, boundary_range).to(weight.dtype)
        passed = weight * mask + (weight * (1 - mask)).detach()
    return passed + (value - passed).detach()


def qkr_reference(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    step: torch.Tensor,
    before: torch.Tensor,
    after: torch.Tensor,
    heads: int,
    levels_half: int,
    boundary_range: float | None,
    grad_scale: float,
) -> torch.Tensor:
    batch, tokens, dim = x.shape
    q = q_weight.view(heads, -1, dim).float()
    k = k_weight.view(heads, -1, dim).float()
    with torch.autocast("cpu", enabled=False):
        merged = torch.matmul(q.transpose(1, 2), k).reshape(heads * dim, dim)
    qkx = F.linear(x, statsq_reference(merged, levels_half, boundary_range)).view(batch, tokens, heads, dim)
    quantized = lsq_reference(qkx, step, before, after, -2, 1, grad_scale)
    return torch.matmul(x, quantized.reshape(batch, tokens * heads, dim).transpose(1, 2))


# --- helpers ------------------------------------------------------------------------------------------


def _autocast(bf16: bool) -> torch.autocast | nullcontext[None]:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def _grads(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    """The output and the gradients of ``sum(out * r)`` for a fixed random ``r``."""
    for tensor in inputs:
        tensor.grad = None
    out = fn()
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    (out.float() * weights.float()).sum().backward()
    return [out.detach()] + [tensor.grad.clone() for tensor in inputs]  # type: ignore[union-attr]


def _close(got: list[torch.Tensor], expected: list[torch.Tensor], bf16: bool) -> None:
    """Each tensor within a tolerance relative to its own largest entry (bf16 GEMMs round to 8 bits)."""
    rtol = 2e-2 if bf16 else 1e-5
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= rtol * scale + 1e-9


def _lsq_params(shape_step: tuple[int, ...], features: int) -> list[torch.Tensor]:
    torch.manual_seed(3)
    step = (0.3 + 0.2 * torch.rand(shape_step)).requires_grad_(True)
    before = (0.3 * torch.randn(features)).requires_grad_(True)
    after = (0.3 * torch.randn(features)).requires_grad_(True)
    return [step, before, after]


# --- LsqLinear -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("gelu", [None, "none", "tanh"])
@pytest.mark.parametrize("shifts", [True, False])
def test_lsq_linear_matches_lsq_then_linear(bf16: bool, gelu: str | None, shifts: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 9, 16).requires_grad_(True)
    weight = (0.2 * torch.randn(12, 16)).requires_grad_(True)
    bias = torch.randn(12).requires_grad_(True)
    step, before, after = _lsq_params((1, 9, 1), 16)
    qn, qp = (0, 3) if gelu else (-2, 1)
    grad_scale = 0.37
    sb = before if shifts else None
    sa = after if shifts else None
    inputs = [x, weight, bias, step] + ([before, after] if shifts else [])

    def fused() -> torch.Tensor:
        with _autocast(bf16):
            out: torch.Tensor = LsqLinear.apply(x, step, sb, sa, weight, bias, qn, qp, grad_scale, gelu)
        return out

    def reference() -> torch.Tensor:
        with _autocast(bf16):
            act = x if gelu is None else F.gelu(x, approximate=gelu)
            return F.linear(lsq_reference(act, step, sb, sa, qn, qp, grad_scale), weight, bias)

    _close(_grads(fused, inputs), _grads(reference, inputs), bf16)


def test_lsq_linear_saves_only_its_input_and_parameters() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 9, 16, requires_grad=True)
    hidden = x * 2  # a non-leaf input, like fc1's output
    weight = torch.randn(12, 16, requires_grad=True)
    step, before, after = _lsq_params((1, 9, 1), 16)
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        LsqLinear.apply(hidden, step, before, after, weight, None, 0, 3, 1.0, "none")
    activations = [t for t in saved if t.numel() == hidden.numel()]
    assert len(activations) == 1 and activations[0].data_ptr() == hidden.data_ptr()


# --- QkrLogits -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("boundary_range", [None, 0.1])
def test_qkr_logits_match_the_merged_product_path(bf16: bool, boundary_range: float | None) -> None:
    torch.manual_seed(0)
    heads, head_dim, dim, tokens = 3, 4, 12, 7
    x = torch.randn(2, tokens, dim).requires_grad_(True)
    q_weight = (0.4 * torch.randn(heads * head_dim, dim)).requires_grad_(True)
    k_weight = (0.4 * torch.randn(heads * head_dim, dim)).requires_grad_(True)
    step, before, after = _lsq_params((1, tokens, heads, 1), dim)
    before = (0.3 * torch.randn(heads, dim)).requires_grad_(True)
    after = (0.3 * torch.randn(heads, dim)).requires_grad_(True)
    inputs = [x, q_weight, k_weight, step, before, after]

    def fused() -> torch.Tensor:
        with _autocast(bf16):
            out: torch.Tensor = QkrLogits.apply(
                x, q_weight, k_weight, step, before, after, heads, 2, boundary_range, -2, 1, 0.21
            )
        return out

    def reference() -> torch.Tensor:
        with _autocast(bf16):
            return qkr_reference(x, q_weight, k_weight, step, before, after, heads, 2, boundary_range, 0.21)

    got, expected = _grads(fused, inputs), _grads(reference, inputs)
    _close(got, expected, bf16)
    if boundary_range is not None:  # CGA's mask reaches W_q and W_k: some merged entries are frozen
        unmasked = _grads(
            lambda: qkr_reference(x, q_weight, k_weight, step, before, after, heads, 2, None, 0.21), inputs
        )
        assert not torch.allclose(unmasked[2], expected[2])


# --- PatchConv ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize(("size", "groups", "bias"), [(16, 1, True), (18, 1, True), (16, 3, False)])
def test_patch_conv_matches_conv2d(bf16: bool, size: int, groups: int, bias: bool) -> None:
    # 18 px leaves two rows and columns no patch covers; groups use the convolution's own backward.
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size).requires_grad_(True)
    weight = torch.randn(6, 3 // groups, 4, 4).requires_grad_(True)
    b = torch.randn(6).requires_grad_(True) if bias else None
    inputs = [x, weight] + ([b] if b is not None else [])

    def fused() -> torch.Tensor:
        with _autocast(bf16):
            out: torch.Tensor = PatchConv.apply(x, weight, b, groups)
        return out

    def reference() -> torch.Tensor:
        with _autocast(bf16):
            return F.conv2d(x, weight, b, 4, 0, 1, groups)

    _close(_grads(fused, inputs), _grads(reference, inputs), bf16)


# --- whole models: fused vs module by module ---------------------------------------------------------


def _model_grads(model: nn.Module, images: torch.Tensor, bf16: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # Swin's stochastic depth draws the same paths on both sides
    with _autocast(bf16):
        out = model(images)
    labels = torch.arange(images.shape[0]) % 10
    loss = F.cross_entropy(out.float(), labels)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("vit", QuantConfig(qkr=True)),
        ("vit", QuantConfig(qkr=False)),
        ("vit", QuantConfig(qkr=False, weight_quantizer="lsq")),
        ("vit", QuantConfig(qkr=True, faithful=True)),
        ("vit", QuantConfig(qkr=True, weight_bits=None)),
        ("swin", QuantConfig(qkr=True)),
        ("swin", QuantConfig(qkr=True, faithful=True)),
    ],
    ids=["vit-qkr", "vit-noqkr", "vit-lsq", "vit-qkr-faithful", "vit-qkr-float-weights", "swin", "swin-faithful"],
)
def test_fused_model_matches_module_by_module(arch: str, config: QuantConfig, bf16: bool) -> None:
    model = make_tiny_vit() if arch == "vit" else make_tiny_swin()
    randomize_biases(model)
    quantize_model(model, config)
    images = torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    init_activation_scales(model, images)
    model.train()
    loss, grads = _model_grads(model, images, bf16)
    with unfused():
        loss_ref, grads_ref = _model_grads(model, images, bf16)
    assert loss == pytest.approx(loss_ref, rel=1e-6)
    assert grads.keys() == grads_ref.keys() and len(grads) == len(list(model.parameters()))
    # Gradients the softmax cancels (QKR's after-shift, ~1e-11) compare against the largest gradient.
    largest = max(g.abs().max().item() for g in grads_ref.values())
    for name, expected in grads_ref.items():
        scale = max(expected.abs().max().item(), 1e-3 * largest)
        error = (grads[name] - expected).abs().max().item()
        assert error <= (1e-3 if bf16 else 1e-5) * scale, name


def test_cga_masks_the_fused_merged_product_as_the_module_path() -> None:
    model = make_tiny_vit()
    quantize_model(model, QuantConfig(qkr=True))
    images = torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    init_activation_scales(model, images)
    model.train()
    CGA(model, boundary_range=0.05, include_merged=True)
    _, grads = _model_grads(model, images, False)
    with unfused():
        _, grads_ref = _model_grads(model, images, False)
    for name in ("blocks.0.attn.q_weight", "blocks.1.attn.k_weight"):
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-7)
