"""Mixed precision: per-layer width rules, their export, checkpoints, BitOPs, errors, CGA and oscillation."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_swin, make_tiny_vit, randomize_biases, trained_tiny_vit
from torch import nn

from ofq_ray.checkpoint import build_model, model_from_checkpoint, save_checkpoint
from ofq_ray.config import ConfigError, load_config
from ofq_ray.cost import run_cost
from ofq_ray.quant import (
    CGA,
    LsqQuantizer,
    OscillationTracker,
    QConv2d,
    QLinear,
    QuantAttention,
    QuantConfig,
    StatsQuantizer,
    cga_mask,
    init_activation_scales,
    quantize_model,
)
from ofq_ray.quant.convert import LayerWidths, resolve_widths
from ofq_ray.quant.cost import count_bitops, model_cost
from ofq_ray.quant.export import export_quantized, load_exported, quantized_size_bytes, size_table

# The tiny ViT of conftest: 32 px gray, patch 4 (64 patches + the class token), width 48, 3 heads, MLP 192.
PATCHES, TOKENS, C, HEADS, HEAD_DIM, HIDDEN, CLASSES, PATCH_MACS = 64, 65, 48, 3, 16, 192, 10, 1 * 4 * 4

MIXED = [
    {"match": "blocks.0.*", "weight_bits": 4, "act_bits": 4},
    {"match": "blocks.*.mlp.fc2", "weight_bits": 3},  # later wins: block 0's fc2 weights too; act kept
    {"match": "blocks.1.attn.proj", "weight_bits": None},  # float weights, quantized input
]


def _lsq_bits(module: nn.Module | None) -> int | None:
    return None if module is None else int(module.bits)  # type: ignore[arg-type]


# --- resolution ---------------------------------------------------------------------------------------


def test_rules_resolve_in_order_later_wins_missing_keys_keep_null_is_float() -> None:
    widths = resolve_widths(make_tiny_vit(), QuantConfig(weight_bits=2, act_bits=2, layers=MIXED))
    assert widths["blocks.0.attn.qkv"] == LayerWidths(4, 4)
    assert widths["blocks.0.attn"] == LayerWidths(None, 4)  # the matmul operands: an activation width only
    assert widths["blocks.0.mlp.fc2"] == LayerWidths(3, 4)  # weight from rule 2, act from rule 1
    assert widths["blocks.1.mlp.fc2"] == LayerWidths(3, 2)
    assert widths["blocks.1.attn.proj"] == LayerWidths(None, 2)
    assert widths["blocks.1.mlp.fc1"] == LayerWidths(2, 2)  # untouched: the uniform defaults
    assert widths["patch_embed.proj"] == widths["head"] == LayerWidths(8, 8)  # first_last_bits
    # A rule on an enclosing module covers everything inside it; the head is reachable by name.
    scoped = resolve_widths(
        make_tiny_vit(),
        QuantConfig(layers=[{"match": "blocks.*.attn", "act_bits": None}, {"match": "head", "weight_bits": 4}]),
    )
    assert scoped["blocks.1.attn.qkv"] == scoped["blocks.1.attn.proj"] == LayerWidths(2, None)
    assert scoped["blocks.1.mlp.fc1"] == LayerWidths(2, 2)
    assert scoped["head"] == LayerWidths(4, 8)


def test_converted_modules_carry_their_resolved_widths_and_qkr_follows_the_qkv_width() -> None:
    rules = [
        {"match": "blocks.0.attn.qkv", "weight_bits": 5, "act_bits": 6},
        {"match": "blocks.0.attn.proj", "weight_bits": 3},
        {"match": "blocks.0.attn", "act_bits": 7},  # the enclosing module: qkv and proj inputs too
        {"match": "blocks.0.attn.proj", "act_bits": None},
        {"match": "blocks.1.mlp.fc1", "weight_bits": None, "act_bits": None},
        {"match": "patch_embed.proj", "weight_bits": None, "act_bits": 6},
    ]
    model = quantize_model(make_tiny_vit(), QuantConfig(weight_bits=2, act_bits=2, layers=rules))
    attn = model.blocks[0].attn
    assert isinstance(attn, QuantAttention) and attn.qkr
    assert attn.merged_quantizer.bits == attn.v.weight_quantizer.bits == 5  # the block's qkv weight width
    assert attn.proj.weight_quantizer.bits == 3 and attn.proj.input_quantizer is None
    assert _lsq_bits(attn.input_quantizer) == 7
    assert {_lsq_bits(q) for q in (attn.qkx_quantizer, attn.v_quantizer, attn.softmax_quantizer)} == {7}
    fc1 = model.blocks[1].mlp.fc1
    assert isinstance(fc1, QLinear) and fc1.weight_quantizer is None and fc1.input_quantizer is None
    assert model.blocks[1].attn.merged_quantizer.bits == 2
    embed = model.patch_embed.proj
    assert isinstance(embed, QConv2d) and embed.weight_quantizer is None and _lsq_bits(embed.input_quantizer) == 6
    x = torch.randn(2, 1, 32, 32)
    init_activation_scales(model, x)
    assert model(x).shape == (2, CLASSES)
    # Without QKR the fused projection takes the qkv width, and q/k the attention's operand width.
    plain = quantize_model(make_tiny_vit(), QuantConfig(weight_bits=2, act_bits=2, qkr=False, layers=rules))
    attn = plain.blocks[0].attn
    assert attn.qkv.weight_quantizer.bits == 5
    assert _lsq_bits(attn.q_quantizer) == _lsq_bits(attn.k_quantizer) == 7


def test_swin_rules_reach_window_attention_mlp_and_patch_merging() -> None:
    swin = make_tiny_swin(in_chans=3)
    rules = [
        {"match": "layers.1.*", "weight_bits": 4, "act_bits": 3},
        {"match": "*.downsample", "weight_bits": None},
        {"match": "head", "act_bits": 6},
    ]
    quantize_model(swin, QuantConfig(weight_bits=2, act_bits=2, layers=rules))
    stage0, stage1 = swin.layers[0].blocks[1], swin.layers[1].blocks[0]
    assert stage0.attn.merged_quantizer.bits == 2 and stage0.mlp.fc2.weight_quantizer.bits == 2
    assert stage1.attn.merged_quantizer.bits == 4 and _lsq_bits(stage1.attn.softmax_quantizer) == 3
    assert stage1.mlp.fc1.weight_quantizer.bits == 4 and _lsq_bits(stage1.mlp.fc1.input_quantizer) == 3
    reduction = swin.layers[1].downsample.reduction
    assert reduction.weight_quantizer is None and _lsq_bits(reduction.input_quantizer) == 3
    assert swin.head.fc.weight_quantizer.bits == 8 and _lsq_bits(swin.head.fc.input_quantizer) == 6
    x = torch.randn(2, 3, 32, 32)
    init_activation_scales(swin, x)
    assert swin(x).shape == (2, CLASSES)
    assert export_quantized(swin)["size"]["total_bytes"] == quantized_size_bytes(swin)


# --- export and size ----------------------------------------------------------------------------------


def test_a_mixed_vit_trains_exports_rebuilds_and_its_size_is_the_hand_count() -> None:
    config = QuantConfig(weight_bits=2, act_bits=2, layers=MIXED)
    model, x = trained_tiny_vit(config)
    expected = model(x)
    buffer = io.BytesIO()
    torch.save(export_quantized(model), buffer)
    buffer.seek(0)
    export = torch.load(buffer, weights_only=True)
    skeleton = load_exported(quantize_model(make_tiny_vit(seed=5), config), export).eval()
    assert torch.allclose(skeleton(x), expected, atol=1e-4)

    def codes(values: int, bits: int) -> int:
        return math.ceil(values * bits / 8)

    # (values, bits, scale rows) of every quantized tensor: StatsQ and LSQ weights have one scale per row.
    qkv_merged, square, mlp = HEADS * C * C, C * C, HIDDEN * C
    tensors = {
        "patch_embed.proj.weight": (C * PATCH_MACS, 8, C),
        "blocks.0.attn.merged_qk": (qkv_merged, 4, HEADS * C),
        "blocks.0.attn.v.weight": (square, 4, C),
        "blocks.0.attn.proj.weight": (square, 4, C),
        "blocks.0.mlp.fc1.weight": (mlp, 4, HIDDEN),
        "blocks.0.mlp.fc2.weight": (mlp, 3, C),
        "blocks.1.attn.merged_qk": (qkv_merged, 2, HEADS * C),
        "blocks.1.attn.v.weight": (square, 2, C),
        "blocks.1.mlp.fc1.weight": (mlp, 2, HIDDEN),
        "blocks.1.mlp.fc2.weight": (mlp, 3, C),
        "head.weight": (CLASSES * C, 8, CLASSES),
    }
    report = export["size"]
    assert {name: entry["bits"] for name, entry in report["layers"].items()} == {
        name: bits for name, (_, bits, _) in tensors.items()
    }
    code_bytes = sum(codes(values, bits) for values, bits, _ in tensors.values())
    scale_bytes = sum(4 * rows for _, _, rows in tensors.values())
    assert (report["code_bytes"], report["scale_bytes"]) == (code_bytes, scale_bytes) == (23_136, 3_880)
    # Float: every floating state value except the latent weights the codes replace (blocks.1's proj
    # weight stays: it is float), plus QKR's key-bias vector (H x C) per block.
    replaced = {"patch_embed.proj.weight", "patch_embed.proj.weight_quantizer.step", "head.weight"}
    replaced |= {"head.weight_quantizer.step", "blocks.0.attn.proj.weight"}
    for block in (0, 1):
        replaced |= {f"blocks.{block}.attn.{key}" for key in ("q_weight", "k_weight", "q_bias", "v.weight")}
        replaced |= {f"blocks.{block}.mlp.fc1.weight", f"blocks.{block}.mlp.fc2.weight"}
    state = model.state_dict()
    assert replaced <= set(state)
    float_values = sum(t.numel() for k, t in state.items() if k not in replaced and t.is_floating_point())
    float_bytes = 4 * (float_values + 2 * HEADS * C)
    assert report["float_bytes"] == float_bytes
    total = code_bytes + scale_bytes + float_bytes
    assert report["total_bytes"] == total == quantized_size_bytes(model)
    assert model_cost(model, (1, 32, 32))["model/size_bytes"] == total
    table = size_table(report)
    assert "blocks.0.mlp.fc2.weight" in table and table.splitlines()[-1].split()[-1] == f"{total:,}"


# --- checkpoints and the run config -------------------------------------------------------------------

BASE: dict[str, Any] = {
    "stage": "qat",
    "model": {"name": "vit_digits"},
    "data": {"name": "digits"},
    "kd": {"enabled": False},
    "quant": {"weight_bits": 2, "act_bits": 2, "layers": MIXED},
}


def test_rules_round_trip_through_yaml_and_change_the_fingerprint(tmp_path: Path) -> None:
    config = load_config(None, base=BASE)
    path = tmp_path / "run.yaml"
    path.write_text(config.to_yaml())
    again = load_config(str(path))
    assert again == config and again.fingerprint() == config.fingerprint()
    assert again.quant.layers[2] == {"match": "blocks.1.attn.proj", "weight_bits": None}  # null survives
    assert "act_bits" not in again.quant.layers[1]  # a key left out stays out
    changed = load_config(None, base=BASE, overrides=['quant.layers=[{match: "blocks.0.*", weight_bits: 4}]'])
    assert changed.quant.layers == [{"match": "blocks.0.*", "weight_bits": 4}]
    assert changed.fingerprint() != config.fingerprint()
    uniform = load_config(None, base={**BASE, "quant": {"weight_bits": 2, "act_bits": 2}})
    assert uniform.fingerprint() != config.fingerprint()


def test_a_checkpoint_saved_with_rules_rebuilds_the_identical_model(tmp_path: Path) -> None:
    config = load_config(None, base=BASE)
    torch.manual_seed(0)
    model = build_model(config, 10, 1, 16, quantized=True)
    x = torch.randn(4, 1, 16, 16)
    init_activation_scales(model, x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).logsumexp(dim=1).mean().backward()
        optimizer.step()
    state = model.state_dict()
    save_checkpoint(
        str(tmp_path),
        {
            "stage": "qat",
            "config": config.to_dict(),
            "data_info": {"num_classes": 10, "in_chans": 1, "img_size": 16},
            "model_state": state,
        },
    )
    rebuilt, saved = model_from_checkpoint(str(tmp_path))
    assert saved["config"]["quant"]["layers"] == MIXED
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert rebuilt.blocks[0].mlp.fc2.weight_quantizer.bits == 3 and rebuilt.blocks[1].attn.proj.weight_quantizer is None
    assert torch.equal(rebuilt(x), model.eval()(x))


# --- BitOPs -------------------------------------------------------------------------------------------


def _uniform_bitops(w: int, a: int, qkr: bool, first_last: int = 8, depth: int = 2) -> int:
    """BitOPs of the tiny ViT at uniform WwAa, by hand (see count_bitops for what is counted)."""
    n, c, h, d, m = TOKENS, C, HEADS, HEAD_DIM, HIDDEN
    if qkr:
        attention = n * h * c * c * w * a  # M_h x for all heads
        attention += n * n * h * c * a * a  # x_n . (M_h x_m)
        attention += n * h * c * 32 * a  # the float key-bias term u_h . x_m
        attention += n * c * c * w * a  # v
    else:
        attention = n * 3 * c * c * w * a + h * n * n * d * a * a  # qkv, q k^T
    attention += h * n * n * d * a * a  # attn v
    block = attention + n * c * c * w * a + 2 * n * c * m * w * a  # proj, fc1, fc2
    first_last_ops = (PATCHES * c * PATCH_MACS + c * CLASSES) * first_last * first_last
    return depth * block + first_last_ops


@pytest.mark.parametrize("qkr", [True, False], ids=["qkr", "no-qkr"])
def test_bitops_of_a_uniform_model_is_the_hand_formula(qkr: bool) -> None:
    model = quantize_model(make_tiny_vit(), QuantConfig(weight_bits=4, act_bits=4, qkr=qkr))
    randomize_biases(model)  # QKR's key-bias term exists with query biases
    init_activation_scales(model, torch.randn(2, 1, 32, 32))
    report = count_bitops(model, (1, 32, 32))
    assert report["total"] == _uniform_bitops(4, 4, qkr)
    assert report["layers"]["blocks.1.mlp.fc1"] == {
        "macs": TOKENS * C * HIDDEN,
        "weight_bits": 4,
        "act_bits": 4,
        "bitops": TOKENS * C * HIDDEN * 16,
    }


def test_bitops_of_a_float_model_counts_32_by_32_and_mixed_rules_change_it() -> None:
    float_model = make_tiny_vit()
    n, c, h, d, m = TOKENS, C, HEADS, HEAD_DIM, HIDDEN
    macs = PATCHES * c * PATCH_MACS + c * CLASSES + 2 * (n * 3 * c * c + 2 * h * n * n * d + n * c * c + 2 * n * c * m)
    assert count_bitops(float_model, (1, 32, 32))["total"] == 32 * 32 * macs
    low = quantize_model(make_tiny_vit(), QuantConfig(weight_bits=2, act_bits=2))
    mixed = quantize_model(make_tiny_vit(), QuantConfig(weight_bits=2, act_bits=2, layers=MIXED))
    for model in (low, mixed):
        init_activation_scales(model, torch.randn(2, 1, 32, 32))
    mixed_layers = count_bitops(mixed, (1, 32, 32))["layers"]
    assert mixed_layers["blocks.1.attn.proj"]["weight_bits"] == 32  # the float weight of a null rule
    assert mixed_layers["blocks.0.mlp.fc2"] == {
        "macs": n * m * c,
        "weight_bits": 3,
        "act_bits": 4,
        "bitops": n * m * c * 12,
    }
    assert count_bitops(low, (1, 32, 32))["total"] < count_bitops(mixed, (1, 32, 32))["total"]


def test_run_cost_gives_the_costs_of_a_config_without_training() -> None:
    config = load_config(None, base={**BASE, "quant": {"weight_bits": 4, "act_bits": 4}})
    costs = run_cost(config, num_classes=10)
    torch.manual_seed(1)
    model = build_model(config, 10, 1, 16, quantized=True)
    init_activation_scales(model, torch.randn(3, 1, 16, 16))
    assert costs == model_cost(model, (1, 16, 16))  # independent of weights and data
    low = run_cost(load_config(None, base={**BASE, "quant": {"weight_bits": 2, "act_bits": 2}}), num_classes=10)
    block0 = [{"match": "blocks.0", "weight_bits": 4, "act_bits": 4}]
    mixed = run_cost(load_config(None, base={**BASE, "quant": {"layers": block0}}), num_classes=10)
    for metric in ("model/size_bytes", "model/bitops"):
        assert low[metric] < mixed[metric] < costs[metric]
    fp = run_cost(load_config(None, base={**BASE, "stage": "pretrain"}), num_classes=10)
    assert fp["model/bitops"] > costs["model/bitops"] and fp["model/size_bytes"] > costs["model/size_bytes"]


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (
            [{"match": "blocks.0.*", "wieght_bits": 3}],
            r"^quant\.layers\[0\]\.wieght_bits: unknown key; allowed: match, weight_bits, act_bits "
            r"\(did you mean 'weight_bits'\?\)$",
        ),
        (
            [{"match": "head", "act_bits": 4}, {"match": "blocks.0.*", "weight_bits": 9}],
            r"^quant\.layers\[1\]\.weight_bits: 9 is not allowed; allowed: an integer from 2 to 8, or null \(float\)$",
        ),
        ([{"match": "blocks.0.*", "act_bits": 1}], r"^quant\.layers\[0\]\.act_bits: 1 is not allowed"),
        ([{"match": "blocks.0.*", "act_bits": "4"}], r"^quant\.layers\[0\]\.act_bits: '4' is not allowed"),
        ([{"match": "blocks.0.*"}], r"^quant\.layers\[0\]: sets no width; allowed: weight_bits and/or act_bits"),
        ([{"weight_bits": 4}], r"^quant\.layers\[0\]\.match: None is not allowed; allowed: a glob"),
        ("blocks.0.*", r"^quant\.layers: 'blocks\.0\.\*' is not allowed; allowed: a list of rules"),
    ],
)
def test_a_bad_rule_is_a_one_line_error(layers: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantConfig(layers=layers)
    with pytest.raises(ConfigError, match=message):
        load_config(None, base={**BASE, "quant": {"layers": layers}})


def test_a_glob_that_matches_no_quantizable_module_names_some_that_exist() -> None:
    rules = [{"match": "blocks.*", "act_bits": 4}, {"match": "blocks.9.*", "weight_bits": 3}]
    expected = (
        r"^quant\.layers\[1\]\.match: 'blocks\.9\.\*' matches no quantizable module; allowed: a glob over "
        r"names such as patch_embed\.proj, blocks\.0\.attn, blocks\.0\.attn\.qkv, .*blocks\.0\.mlp\.fc2, head"
    )
    with pytest.raises(ConfigError, match=expected):  # at load, before any model is trained
        load_config(None, base={**BASE, "quant": {"layers": rules}})
    with pytest.raises(ValueError, match=expected):
        quantize_model(make_tiny_vit(), QuantConfig(layers=rules))
    with pytest.raises(ConfigError, match=r"^quant\.layers\[0\]\.match: 'blocks\.0\.norm1' matches no quantizable"):
        load_config(None, base={**BASE, "quant": {"layers": [{"match": "blocks.0.norm1", "act_bits": 4}]}})


def test_lsq_with_qkr_is_refused_when_a_rule_quantizes_weights() -> None:
    layers = [{"match": "blocks.0.*", "weight_bits": 4}]
    with pytest.raises(ValueError, match=r"^quant\.qkr: true is not allowed with quant\.weight_quantizer 'lsq'"):
        QuantConfig(weight_bits=None, weight_quantizer="lsq", layers=layers)
    QuantConfig(weight_bits=None, weight_quantizer="lsq", qkr=False, layers=layers)


# --- CGA and oscillation follow each layer's width ------------------------------------------------------

WIDTHS = [
    {"match": "blocks.*.mlp.fc1", "weight_bits": 4},
    {"match": "blocks.1.attn.qkv", "weight_bits": 3},
    {"match": "blocks.0.attn.proj", "weight_bits": 8},
]
EXPECTED_BITS = {
    "blocks.0.attn.merged_qk": 2,
    "blocks.0.attn.v.weight": 2,
    "blocks.0.attn.proj.weight": 8,
    "blocks.0.mlp.fc1.weight": 4,
    "blocks.0.mlp.fc2.weight": 2,
    "blocks.1.attn.merged_qk": 3,
    "blocks.1.attn.v.weight": 3,
    "blocks.1.attn.proj.weight": 2,
    "blocks.1.mlp.fc1.weight": 4,
    "blocks.1.mlp.fc2.weight": 2,
}


def _latent(model: nn.Module, name: str) -> torch.Tensor:
    if name.endswith("merged_qk"):
        return model.get_submodule(name.removesuffix(".merged_qk")).merged_weight().detach()
    return model.get_parameter(name).detach()


def test_cga_thresholds_follow_each_layers_width() -> None:
    model = quantize_model(make_tiny_vit(), QuantConfig(weight_bits=2, act_bits=2, layers=WIDTHS))
    init_activation_scales(model, torch.randn(2, 1, 32, 32))
    cga = CGA(model, boundary_range=0.2)
    fractions = cga.frozen_fractions()
    assert set(fractions) == set(EXPECTED_BITS)
    for name, bits in EXPECTED_BITS.items():
        weight = _latent(model, name)
        own = 1.0 - cga_mask(weight, bits, 0.2).float().mean().item()
        assert fractions[name] == pytest.approx(own, abs=1e-6), name
        if bits != 2:  # the uniform width would give another mask
            assert fractions[name] != pytest.approx(1.0 - cga_mask(weight, 2, 0.2).float().mean().item()), name
    # One CGA step freezes exactly the entries the layer's own-width mask says.
    fc1 = model.blocks[0].mlp.fc1.weight
    before = fc1.detach().clone()
    frozen = ~cga_mask(before, 4, 0.2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 1, 32, 32)).logsumexp(dim=1).mean().backward()
    cga.step(optimizer)
    assert torch.equal(fc1.detach()[frozen], before[frozen]) and not torch.equal(fc1.detach(), before)
    cga.close()


def test_the_oscillation_tracker_reads_codes_at_each_layers_width() -> None:
    model = quantize_model(make_tiny_vit(), QuantConfig(weight_bits=2, act_bits=2, layers=WIDTHS))
    tracker = OscillationTracker(model)
    tracker.update()
    state = tracker.state_dict()
    assert set(tracker.names) == set(EXPECTED_BITS)
    for name, bits in EXPECTED_BITS.items():
        codes = state[f"{name}.previous_codes"]
        assert torch.equal(codes, StatsQuantizer(bits).codes(_latent(model, name))), name
        assert -(2 ** (bits - 1)) <= int(codes.min()) and int(codes.max()) <= 2 ** (bits - 1) - 1
        if bits >= 4:  # wider than the uniform 2 bits: codes beyond [-2, 1] occur
            assert int(codes.abs().max()) > 2, name
    assert isinstance(model.head.input_quantizer, LsqQuantizer)
