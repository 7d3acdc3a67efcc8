"""quantize_model on real timm models: structure, float exactness of QKR, fixed vs faithful, errors."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import make_tiny_vit, randomize_biases
from torch import nn

from ofq_ray.quant import (
    LsqQuantizer,
    QConv2d,
    QLinear,
    QuantAttention,
    QuantConfig,
    QuantWindowAttention,
    StatsQuantizer,
    init_activation_scales,
    quantize_model,
)

FLOAT = dict(weight_bits=None, act_bits=None, first_last_bits=None)


def _swin(seed: int = 0) -> nn.Module:
    # Full Swin-T widths on 64 px with 4x4 windows: stages 1-2 have shifted windows (masks), 3-4 not.
    torch.manual_seed(seed)
    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=64, window_size=4
    )


def test_qkr_is_exact_in_float_for_a_vit_with_pretrained_style_biases() -> None:
    model = make_tiny_vit()
    randomize_biases(model)
    x = torch.randn(4, 1, 32, 32)
    model.eval()
    reference = model(x)
    converted = quantize_model(copy.deepcopy(model), QuantConfig(qkr=True, **FLOAT)).eval()
    assert torch.allclose(converted(x), reference, atol=1e-5)
    # The reference implementation drops the q/k biases: no longer exact.
    faithful = quantize_model(copy.deepcopy(model), QuantConfig(qkr=True, faithful=True, **FLOAT)).eval()
    assert not torch.allclose(faithful(x), reference, atol=1e-2)


def test_qkr_is_exact_in_float_for_swin_with_shifted_windows() -> None:
    model = _swin()
    randomize_biases(model, std=0.5)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    reference = model(x)
    converted = quantize_model(copy.deepcopy(model), QuantConfig(qkr=True, **FLOAT)).eval()
    assert sum(isinstance(m, QuantWindowAttention) for m in converted.modules()) == 12
    assert torch.allclose(converted(x), reference, atol=1e-4)


def test_non_qkr_float_conversion_is_exact_too() -> None:
    model = make_tiny_vit()
    randomize_biases(model)
    x = torch.randn(2, 1, 32, 32)
    reference = model.eval()(x)
    converted = quantize_model(copy.deepcopy(model), QuantConfig(qkr=False, **FLOAT)).eval()
    assert torch.allclose(converted(x), reference, atol=1e-5)


def test_merged_product_is_wq_transpose_wk_per_head() -> None:
    model = quantize_model(make_tiny_vit(), QuantConfig(**FLOAT))
    attention = model.blocks[0].attn
    heads, d, c = attention.num_heads, attention.head_dim, attention.dim
    merged = attention.merged_weight().view(heads, c, c)
    for h in range(heads):
        wq = attention.q_weight[h * d : (h + 1) * d]
        wk = attention.k_weight[h * d : (h + 1) * d]
        assert torch.allclose(merged[h], wq.T @ wk, atol=1e-6)


def test_structure_of_a_converted_vit_matches_the_spec_table() -> None:
    model = quantize_model(make_tiny_vit(), QuantConfig(weight_bits=2, act_bits=3, first_last_bits=8))
    attention = model.blocks[0].attn
    assert isinstance(attention, QuantAttention) and attention.qkr
    assert isinstance(attention.merged_quantizer, StatsQuantizer) and attention.merged_quantizer.bits == 2
    assert isinstance(attention.v.weight_quantizer, StatsQuantizer)
    assert attention.v.input_quantizer is None  # the block input is quantized once, shared by QK and V
    assert attention.input_quantizer.granularity == "token" and attention.input_quantizer.bits == 3
    assert attention.v_quantizer.granularity == "channel"
    assert attention.qkx_quantizer.granularity == "token"
    assert tuple(attention.qkx_quantizer.shift_before.shape) == (3, 48)  # per (head, channel)
    assert not attention.softmax_quantizer.signed and attention.softmax_quantizer.granularity == "query"
    assert attention.softmax_quantizer.shift_before is None
    mlp = model.blocks[0].mlp
    assert isinstance(mlp.fc1, QLinear) and mlp.fc1.input_quantizer.signed
    assert not mlp.fc2.input_quantizer.signed  # GELU output
    assert isinstance(model.patch_embed.proj, QConv2d)
    assert model.patch_embed.proj.weight_quantizer.bits == 8
    assert tuple(model.patch_embed.proj.input_quantizer.shift_before.shape) == (32, 32)
    head = model.head
    assert isinstance(head, QLinear) and head.role == "first_last"
    assert isinstance(head.weight_quantizer, LsqQuantizer) and head.input_quantizer.granularity == "tensor"


def test_fixed_mode_reuses_pretrained_weights_and_faithful_mode_reinitializes_proj() -> None:
    model = make_tiny_vit()
    randomize_biases(model)
    proj = model.blocks[0].attn.proj.weight.detach().clone()
    qkv_bias = model.blocks[0].attn.qkv.bias.detach().clone()
    fixed = quantize_model(copy.deepcopy(model), QuantConfig())
    assert torch.equal(fixed.blocks[0].attn.proj.weight, proj)
    assert torch.equal(fixed.blocks[0].attn.q_bias, qkv_bias[:48])
    faithful = quantize_model(copy.deepcopy(model), QuantConfig(faithful=True))
    assert not torch.allclose(faithful.blocks[0].attn.proj.weight, proj)
    assert faithful.blocks[0].attn.q_bias is None
    # q/k/v weights themselves are copied in both modes
    assert torch.equal(faithful.blocks[0].attn.k_weight, model.blocks[0].attn.qkv.weight[48:96])


def test_faithful_swin_reinitializes_position_tables_and_adds_a_merging_bias() -> None:
    model = _swin()
    randomize_biases(model, std=0.5)
    table = model.layers[0].blocks[0].attn.relative_position_bias_table.detach().clone()
    fixed = quantize_model(copy.deepcopy(model), QuantConfig())
    assert torch.equal(fixed.layers[0].blocks[0].attn.relative_position_bias_table, table)
    assert fixed.layers[1].downsample.reduction.bias is None
    faithful = quantize_model(copy.deepcopy(model), QuantConfig(faithful=True))
    assert not torch.allclose(faithful.layers[0].blocks[0].attn.relative_position_bias_table, table)
    assert faithful.layers[1].downsample.reduction.bias is not None


@pytest.mark.parametrize(
    ("name", "kwargs", "image"),
    [
        ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8), (3, 32, 32)),
        ("deit_small_distilled_patch16_224", dict(img_size=32), (3, 32, 32)),
        ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4), (3, 64, 64)),
    ],
)
@pytest.mark.parametrize("qkr", [True, False])
def test_paper_models_convert_and_train(name: str, kwargs: dict, image: tuple[int, ...], qkr: bool) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    quantize_model(model, QuantConfig(weight_bits=2, act_bits=2, qkr=qkr))
    x = torch.randn(2, *image)
    init_activation_scales(model, x)
    model.train()
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)
    out = model(x)
    logits = out if isinstance(out, torch.Tensor) else torch.cat(out, dim=1)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    zero_grad = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert zero_grad == []


def test_init_activation_scales_initializes_every_quantizer_from_one_batch() -> None:
    model = quantize_model(make_tiny_vit(), QuantConfig())
    quantizers = [m for m in model.modules() if isinstance(m, LsqQuantizer)]
    weight_quantizers = [q for q in quantizers if q.granularity == "out_channel"]
    assert all(q.initialized for q in weight_quantizers)  # from the weights, at conversion
    assert not any(q.initialized for q in quantizers if q not in weight_quantizers)
    x = torch.randn(8, 1, 32, 32)
    model.train()
    init_activation_scales(model, x)
    assert all(q.initialized for q in quantizers)
    assert model.training  # mode restored
    tokens = model.blocks[0].attn.input_quantizer.step
    assert tokens.shape == (1, 65, 1)  # one step per token (64 patches + cls)


def test_init_activation_scales_reports_quantizers_the_batch_did_not_reach() -> None:
    model = quantize_model(make_tiny_vit(), QuantConfig())
    model.forward = lambda x: model.patch_embed(x)  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="not reached"):
        init_activation_scales(model, torch.randn(2, 1, 32, 32))


def test_a_converted_checkpoint_loads_into_a_freshly_converted_model() -> None:
    model = quantize_model(make_tiny_vit(), QuantConfig(weight_bits=3, act_bits=3))
    x = torch.randn(4, 1, 32, 32)
    init_activation_scales(model, x)
    state = model.state_dict()
    fresh = quantize_model(make_tiny_vit(seed=7), QuantConfig(weight_bits=3, act_bits=3))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(weight_bits=1), r"^quant\.weight_bits: 1 is not allowed; allowed: an integer from 2 to 8$"),
        (dict(act_bits=9), r"^quant\.act_bits: 9 is not allowed"),
        (dict(first_last_bits=3.5), r"^quant\.first_last_bits: 3\.5 is not allowed"),
        (dict(weight_bits=True), r"^quant\.weight_bits: True is not allowed"),
        (dict(qkr="yes"), r"^quant\.qkr: 'yes' is not allowed; allowed: true, false$"),
        (dict(faithful=1), r"^quant\.faithful: 1 is not allowed"),
        (dict(weight_quantizer="stats"), r"allowed: statsq, lsq \(did you mean 'statsq'\?\)$"),
    ],
)
def test_quant_config_errors_are_one_line_and_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        QuantConfig(**kwargs)
    assert "\n" not in str(error.value)


def test_quant_config_round_trips_and_rejects_unknown_keys() -> None:
    config = QuantConfig(weight_bits=4, act_bits=4, qkr=False)
    assert QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"^quant\.wieght_bits: unknown key; .*did you mean 'weight_bits'"):
        QuantConfig.from_dict({"wieght_bits": 2})


def test_unsupported_models_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"^model: Sequential cannot be quantized; allowed: VisionTransformer"):
        quantize_model(nn.Sequential(nn.Linear(2, 2)), QuantConfig())
    qk_norm = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, qk_norm=True, num_classes=10
    )
    with pytest.raises(ValueError, match="qk_norm"):
        quantize_model(qk_norm, QuantConfig())
