"""Export to packed codes, rebuild, and size accounting."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import make_tiny_vit, trained_tiny_vit

from ofq_ray.quant import QuantConfig, quantize_model
from ofq_ray.quant.export import (
    FrozenWeight,
    export_quantized,
    load_exported,
    pack_codes,
    quantized_size_bytes,
    unpack_codes,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_unpack_round_trip_and_density(bits: int) -> None:
    torch.manual_seed(0)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (7, 13))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(codes.numel() * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, (7, 13)), codes.to(torch.int16))


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(weight_bits=2, act_bits=2),
        QuantConfig(weight_bits=3, act_bits=3, faithful=True),
        QuantConfig(weight_bits=4, act_bits=4, qkr=False, weight_quantizer="lsq"),
    ],
    ids=["w2a2-qkr", "w3a3-faithful", "w4a4-lsq-noqkr"],
)
def test_a_model_rebuilt_from_its_export_gives_the_same_logits(config: QuantConfig) -> None:
    model, x = trained_tiny_vit(config)
    expected = model(x)
    buffer = io.BytesIO()
    torch.save(export_quantized(model), buffer)
    buffer.seek(0)
    export = torch.load(buffer, weights_only=True)
    # A fresh, differently seeded model that never saw data: every value must come from the export.
    skeleton = quantize_model(make_tiny_vit(seed=123), config)
    load_exported(skeleton, export).eval()
    assert torch.allclose(skeleton(x), expected, atol=1e-4)
    assert any(isinstance(m, FrozenWeight) for m in skeleton.modules())


def test_export_holds_codes_not_latent_weights() -> None:
    model, _ = trained_tiny_vit(QuantConfig(weight_bits=2, act_bits=2))
    export = export_quantized(model)
    state = export["float_state"]
    assert not any(k.endswith(("q_weight", "k_weight", "fc1.weight", "proj.weight")) for k in state)
    fc1 = export["layers"]["blocks.0.mlp.fc1.weight"]
    assert fc1["bits"] == 2 and fc1["quantizer"] == "statsq" and fc1["shape"] == [192, 48]
    merged = export["layers"]["blocks.0.attn.merged_qk"]
    assert merged["shape"] == [3 * 48, 48]  # H * C rows of C
    assert export["layers"]["head.weight"]["bits"] == 8
    assert set(export["key_bias"]) == {"blocks.0.attn", "blocks.1.attn"}


def test_size_report_matches_the_quick_estimate_and_shrinks_with_bits() -> None:
    sizes = {}
    for bits in (2, 4):
        model, _ = trained_tiny_vit(QuantConfig(weight_bits=bits, act_bits=bits), steps=0)
        report = export_quantized(model)["size"]
        assert report["total_bytes"] == quantized_size_bytes(model)
        assert report["code_bytes"] == sum(entry["code_bytes"] for entry in report["layers"].values())
        sizes[bits] = report["total_bytes"]
    float_model = make_tiny_vit()
    float_bytes = 4 * sum(p.numel() for p in float_model.parameters())
    assert sizes[2] < sizes[4] < float_bytes


def test_loading_an_export_into_a_different_model_is_a_clear_error() -> None:
    model, _ = trained_tiny_vit(QuantConfig(weight_bits=2, act_bits=2), steps=0)
    export = export_quantized(model)
    other = quantize_model(make_tiny_vit(depth=3), QuantConfig(weight_bits=2, act_bits=2))
    with pytest.raises(ValueError, match=r"^export: layers do not match this model"):
        load_exported(other, export)
    with pytest.raises(ValueError, match=r"^export: format"):
        load_exported(other, {**export, "version": 99})
