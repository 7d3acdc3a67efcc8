"""The audit's five differences from the reference (issue 9), each checked against formulas written here:
label smoothing under mixup, shifts on q and k without QKR, the LSQ baseline's structure, and Swin's
NHWC (per W column) activation steps under ``faithful``. ``model.pretrained_path`` is in test_train."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_swin, make_tiny_vit, randomize_biases
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from ofq_ray.engine import training_loss
from ofq_ray.quant import (
    LsqQuantizer,
    QLinear,
    QuantAttention,
    QuantConfig,
    StatsQuantizer,
    init_activation_scales,
    quantize_model,
)


def _lsq(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    return step * torch.round(torch.clamp(x / step, qn, qp))


# --- 1. label smoothing is applied once under mixup/cutmix -------------------------------------------------


def test_mixup_targets_go_to_a_soft_target_cross_entropy_smoothed_once() -> None:
    torch.manual_seed(0)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    images, labels = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    _, soft = mixup(images, labels)
    logits, teacher = torch.randn(8, 10), torch.randn(8, 10)
    expected = SoftTargetCrossEntropy()(logits, soft)

    loss, _ = training_loss(logits, soft, None, label_smoothing=0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # Smoothing the already-smoothed targets again (the old behaviour) gives another number.
    twice = F.cross_entropy(logits, soft, label_smoothing=0.1)
    assert abs(twice.item() - expected.item()) > 1e-3
    # With a teacher: hard term as above plus the soft KD term, unchanged.
    with_teacher, _ = training_loss(logits, soft, teacher, label_smoothing=0.1)
    kd = torch.sum(-teacher.softmax(-1) * logits.log_softmax(-1), dim=-1).mean()
    assert with_teacher.item() == pytest.approx((expected + kd).item(), rel=1e-6)
    # Class-index targets still get their (single) smoothing here.
    hard, _ = training_loss(logits, labels, None, label_smoothing=0.1)
    assert hard.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item(), rel=1e-6)


# --- 3. attention without QKR: learnable shifts on q and k ------------------------------------------------


def _converted(config: QuantConfig) -> tuple[nn.Module, torch.Tensor]:
    model = make_tiny_vit()
    randomize_biases(model)
    quantize_model(model, config)
    images = torch.randn(6, 1, 32, 32)
    init_activation_scales(model, images)
    return model, images


def _attention_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    attention = model.blocks[0].attn
    handle = attention.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    model(images)
    handle.remove()
    return captured[0]


@pytest.mark.parametrize("weight_quantizer", ["statsq", "lsq"])
def test_q_and_k_have_shifts_before_and_after_their_quantizers_without_qkr(weight_quantizer: str) -> None:
    model, images = _converted(QuantConfig(weight_bits=2, act_bits=2, qkr=False, weight_quantizer=weight_quantizer))
    attention: QuantAttention = model.blocks[0].attn
    heads, d = attention.num_heads, attention.head_dim
    for quantizer in (attention.q_quantizer, attention.k_quantizer):
        assert quantizer is not None and quantizer.shift_before is not None and quantizer.shift_after is not None
        assert tuple(quantizer.shift_before.shape) == (heads, 1, d)
        assert tuple(quantizer.shift_after.shape) == (heads, 1, d)
    torch.manual_seed(1)
    with torch.no_grad():
        for quantizer in (attention.q_quantizer, attention.k_quantizer):
            quantizer.shift_before.normal_(0, 0.2)  # type: ignore[union-attr]
            quantizer.shift_after.normal_(0, 0.2)  # type: ignore[union-attr]

    x = _attention_input(model, images)
    logits, _ = attention._logits_and_values(x)
    # The formula, step by step: Q_in(x), qkv = linear(.., Q_w(W), b), then per head and token
    # q' = s_q * round(clamp((q + b1)/s_q)) + b2 (likewise k), logits = q' k'^T / sqrt(d).
    assert attention.input_quantizer is not None
    xq = attention.input_quantizer(x)
    qkv = F.linear(xq, attention.qkv.quantized_weight(), attention.qkv.bias)
    batch, tokens, _ = x.shape
    qkv = qkv.view(batch, tokens, 3, heads, d).permute(2, 0, 3, 1, 4)

    def shifted(t: torch.Tensor, quantizer: LsqQuantizer) -> torch.Tensor:
        assert quantizer.step.shape == (1, 1, tokens, 1)  # one step per token, shared by batch and heads
        return _lsq(t + quantizer.shift_before, quantizer.step, -2, 1) + quantizer.shift_after  # type: ignore[operator]

    q = shifted(qkv[0], attention.q_quantizer)  # type: ignore[arg-type]
    k = shifted(qkv[1], attention.k_quantizer)  # type: ignore[arg-type]
    expected = q @ k.transpose(-2, -1) / math.sqrt(d)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

    logits.sum().backward()
    for quantizer in (attention.q_quantizer, attention.k_quantizer):
        assert quantizer.shift_before.grad is not None and quantizer.shift_before.grad.abs().sum() > 0  # type: ignore[union-attr]
        assert quantizer.shift_after.grad is not None and quantizer.shift_after.grad.abs().sum() > 0  # type: ignore[union-attr]


# --- 5. the LSQ baseline is the reference's: no QKR, q and k quantized separately -------------------------


def test_lsq_with_qkr_is_rejected_and_the_lsq_baseline_quantizes_q_and_k_separately() -> None:
    with pytest.raises(ValueError, match=r"^quant.qkr: true is not allowed with quant.weight_quantizer 'lsq'"):
        QuantConfig(weight_bits=2, act_bits=2, weight_quantizer="lsq")
    QuantConfig(weight_bits=None, act_bits=2, weight_quantizer="lsq")  # float weights: nothing to merge

    model, _ = _converted(QuantConfig(weight_bits=2, act_bits=2, qkr=False, weight_quantizer="lsq"))
    attention: QuantAttention = model.blocks[0].attn
    assert not attention.qkr and not hasattr(attention, "merged_quantizer")
    assert attention.q_quantizer is not None and attention.k_quantizer is not None
    assert attention.q_quantizer is not attention.k_quantizer
    assert not any(isinstance(m, StatsQuantizer) for m in model.modules())
    # LSQ weights: one learned step per output row, s_r = 2 mean|W_r| / sqrt(Qp) at init.
    qkv: QLinear = attention.qkv
    quantizer = qkv.weight_quantizer
    assert isinstance(quantizer, LsqQuantizer) and quantizer.step.shape == (qkv.out_features, 1)
    weight = qkv.weight.detach()
    step = 2 * weight.abs().mean(dim=1, keepdim=True) / math.sqrt(1)
    torch.testing.assert_close(quantizer.step.detach(), step)
    torch.testing.assert_close(qkv.quantized_weight().detach(), _lsq(weight, step, -2, 1))


# --- 4. Swin's MLP and patch-merging inputs: per token (fixed) or per W column (faithful) --------------------


def _tiny_swin(faithful: bool) -> tuple[nn.Module, torch.Tensor]:
    model = make_tiny_swin()
    quantize_model(model, QuantConfig(weight_bits=2, act_bits=2, faithful=faithful))
    images = torch.randn(4, 1, 32, 32)
    init_activation_scales(model, images)
    return model, images


def test_swin_mlp_and_merging_inputs_get_one_step_per_token_unless_faithful() -> None:
    fixed, _ = _tiny_swin(faithful=False)
    block = fixed.layers[0].blocks[0]
    height, width = block.input_resolution
    for linear in (block.mlp.fc1, block.mlp.fc2):
        assert linear.input_grid is None and linear.input_quantizer.step.shape == (1, height * width, 1)
    merging = fixed.layers[1].downsample.reduction
    assert merging.input_quantizer.step.shape == (1, height // 2, width // 2, 1)  # per pixel of the NHWC map


def test_faithful_swin_quantizes_mlp_and_merging_inputs_per_w_column() -> None:
    model, images = _tiny_swin(faithful=True)
    block = model.layers[0].blocks[0]
    height, width = block.input_resolution
    fc1: QLinear = block.mlp.fc1
    quantizer = fc1.input_quantizer
    assert quantizer is not None and fc1.input_grid == (height, width)
    assert quantizer.granularity == "column" and quantizer.step.shape == (1, 1, width, 1)

    captured: list[torch.Tensor] = []
    handle = fc1.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    model(images)
    handle.remove()
    x = captured[0].requires_grad_(True)  # [B, H*W, C], tokens row-major
    batch, _, channels = x.shape
    with torch.no_grad():
        quantizer.shift_before.normal_(0, 0.1)  # type: ignore[union-attr]
        quantizer.shift_after.normal_(0, 0.1)  # type: ignore[union-attr]
    out = fc1(x)
    # Formula: token (h, w) uses the step of column w, whatever its row h.
    grid = x.view(batch, height, width, channels)
    step = quantizer.step.detach()
    expected_input = _lsq(grid + quantizer.shift_before, step, -2, 1) + quantizer.shift_after
    expected = F.linear(expected_input.view(batch, height * width, channels), fc1.quantized_weight(), fc1.bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # The LSQ gradient scale counts the B*H*C elements that share a step.
    assert quantizer.grad_scale(grid) == pytest.approx(1 / math.sqrt(1 * batch * height * channels))

    merging = model.layers[1].downsample.reduction
    assert merging.input_quantizer.granularity == "column" and merging.input_grid is None
    assert merging.input_quantizer.step.shape == (1, 1, width // 2, 1)  # one step per W column of its NHWC input
    # The faithful model still trains end to end and rebuilds from its state dict.
    model(images).sum().backward()
    rebuilt, _ = _tiny_swin(faithful=True)
    rebuilt.load_state_dict(model.state_dict())
