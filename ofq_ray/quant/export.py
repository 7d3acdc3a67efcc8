"""Export a quantized model as packed integer codes plus scales, rebuild it, and report its size.

The export is a plain dict of tensors, strings and numbers (``torch.save`` it; it loads with
``torch.load(..., weights_only=True)``). Quantized weights are stored only as codes: the float
latent weights behind them (including W_q/W_k behind the QKR product) are left out.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError
from .attention import QuantAttention
from .layers import ROLES, WeightSource, iter_quantized_weights
from .quantizers import LsqQuantizer, StatsQuantizer

EXPORT_FORMAT = "ofq-ray-export"
EXPORT_VERSION = 1


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs signed codes in ``[-2**(bits-1), 2**(bits-1) - 1]`` into a dense uint8 bit stream."""
    offset = codes.detach().to(torch.int16).flatten().cpu().numpy() + 2 ** (bits - 1)
    as_bits = np.unpackbits(offset.astype(np.uint8)[:, None], axis=1)[:, 8 - bits :]
    return torch.from_numpy(np.packbits(as_bits.reshape(-1)))


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_codes` (int16 codes of ``shape``)."""
    count = math.prod(shape)
    as_bits = np.unpackbits(packed.cpu().numpy())[: count * bits].reshape(count, bits)
    padded = np.zeros((count, 8), dtype=np.uint8)
    padded[:, 8 - bits :] = as_bits
    values = np.packbits(padded, axis=1).reshape(-1).astype(np.int16) - 2 ** (bits - 1)
    return torch.from_numpy(values).reshape(shape)


class FrozenWeight(nn.Module):
    """Stands in for a weight quantizer after export: returns the stored dequantized weight (``bits``:
    the width of the codes it came from)."""

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, bits: int | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.bits = bits

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.weight.to(latent.dtype)


def _quantized_sources(model: nn.Module) -> list[tuple[str, WeightSource]]:
    return iter_quantized_weights(model, roles=ROLES)


def _codes_and_scale(source: WeightSource) -> tuple[str, int, torch.Tensor, torch.Tensor]:
    latent = source.latent().detach()
    quantizer = source.quantizer
    if isinstance(quantizer, StatsQuantizer):
        return "statsq", quantizer.bits, quantizer.codes(latent), quantizer.scale(latent)
    if isinstance(quantizer, LsqQuantizer):
        return "lsq", quantizer.bits, quantizer.codes(latent), quantizer.step.detach().clamp_min(1e-5)
    raise TypeError(f"cannot export weight quantizer {type(quantizer).__name__}")


def _dequantize(kind: str, bits: int, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    codes = codes.to(scale.dtype)
    if kind == "statsq":
        return scale * ((codes + 0.5) / 2 ** (bits - 1))
    return codes * scale


def _latent_state_keys(model: nn.Module, sources: list[tuple[str, WeightSource]]) -> set[str]:
    """State-dict keys that the codes replace: latent weights, LSQ weight steps, QKR q/k weights."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    keys = {by_id[id(s.parameter)] for _, s in sources if s.parameter is not None}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, LsqQuantizer) and module.granularity == "out_channel":
            keys.add(f"{prefix}step")
        if isinstance(module, QuantAttention) and module.qkr and module.merged_quantizer is not None:
            keys |= {f"{prefix}q_weight", f"{prefix}k_weight", f"{prefix}q_bias"}
    return keys


def export_quantized(model: nn.Module) -> dict[str, Any]:
    """Exports codes (packed), scales, the remaining float state and a size report.

    Returns:
        ``{"format", "version", "layers": {name: {"quantizer", "bits", "shape", "codes", "scale"}},
        "key_bias": {attention name: [H, C] tensor}, "float_state": {...}, "size": {...}}``.
    """
    sources = _quantized_sources(model)
    layers: dict[str, Any] = {}
    for name, source in sources:
        kind, bits, codes, scale = _codes_and_scale(source)
        layers[name] = {
            "quantizer": kind,
            "bits": bits,
            "shape": list(codes.shape),
            "codes": pack_codes(codes, bits),
            "scale": scale.detach().float().cpu(),
        }
    key_bias = {
        name: bias.detach().float().cpu()
        for name, module in model.named_modules()
        if isinstance(module, QuantAttention) and module.qkr and module.merged_quantizer is not None
        for bias in [module.key_bias()]
        if bias is not None
    }
    dropped = _latent_state_keys(model, sources)
    float_state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in dropped}
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "layers": layers,
        "key_bias": key_bias,
        "float_state": float_state,
        "size": size_report(layers, key_bias, float_state),
    }


def size_report(
    layers: dict[str, Any], key_bias: dict[str, torch.Tensor], float_state: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Bytes per quantized layer and in total; floats count 4 bytes (the export stores float32)."""
    per_layer = {
        name: {
            "bits": layer["bits"],
            "numel": math.prod(layer["shape"]),
            "code_bytes": math.ceil(math.prod(layer["shape"]) * layer["bits"] / 8),
            "scale_bytes": 4 * layer["scale"].numel(),
        }
        for name, layer in layers.items()
    }
    code_bytes = sum(entry["code_bytes"] for entry in per_layer.values())
    scale_bytes = sum(entry["scale_bytes"] for entry in per_layer.values())
    float_bytes = 4 * sum(t.numel() for t in float_state.values() if t.is_floating_point())
    float_bytes += 4 * sum(t.numel() for t in key_bias.values())
    return {
        "layers": per_layer,
        "code_bytes": code_bytes,
        "scale_bytes": scale_bytes,
        "float_bytes": float_bytes,
        "total_bytes": code_bytes + scale_bytes + float_bytes,
    }


def size_table(report: dict[str, Any]) -> str:
    """The :func:`size_report` as a plain-text table: one row per quantized tensor (its width, values,
    code and scale bytes), then the float rest and the total."""
    rows = [("tensor", "bits", "values", "codes B", "scales B", "total B")]
    for name, entry in report["layers"].items():
        rows.append(
            (
                name,
                str(entry["bits"]),
                f"{entry['numel']:,}",
                f"{entry['code_bytes']:,}",
                f"{entry['scale_bytes']:,}",
                f"{entry['code_bytes'] + entry['scale_bytes']:,}",
            )
        )
    rows.append(("float state (32 bit)", "32", "", "", "", f"{report['float_bytes']:,}"))
    rows.append(
        ("total", "", "", f"{report['code_bytes']:,}", f"{report['scale_bytes']:,}", f"{report['total_bytes']:,}")
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def quantized_size_bytes(model: nn.Module) -> int:
    """Deployable size in bytes (packed codes + scales + remaining float32 state), without packing."""
    sources = _quantized_sources(model)
    total = 0
    for _, source in sources:
        latent = source.latent().detach()
        bits = int(source.quantizer.bits)  # type: ignore[arg-type]
        rows = latent.shape[0]
        scales = 1 if isinstance(source.quantizer, LsqQuantizer) and source.quantizer.step.numel() == 1 else rows
        total += math.ceil(latent.numel() * bits / 8) + 4 * scales
    dropped = _latent_state_keys(model, sources)
    state = model.state_dict()
    total += 4 * sum(t.numel() for k, t in state.items() if k not in dropped and t.is_floating_point())
    for module in model.modules():
        # QKR keeps the key-dependent query-bias term as one float vector per head.
        if (
            isinstance(module, QuantAttention)
            and module.qkr
            and module.merged_quantizer is not None
            and module.q_bias is not None
        ):
            total += 4 * module.num_heads * module.dim
    return total


def _check_export(export: dict[str, Any]) -> None:
    if export.get("format") != EXPORT_FORMAT or export.get("version") != EXPORT_VERSION:
        raise CheckpointError(
            f"export: format {export.get('format')!r} version {export.get('version')!r} is not supported; "
            f"allowed: {EXPORT_FORMAT!r} version {EXPORT_VERSION}"
        )


def load_exported(model: nn.Module, export: dict[str, Any]) -> nn.Module:
    """Rebuilds a quantized model from an export, in place.

    ``model`` must be converted with the same architecture and :class:`QuantConfig` as the exported one
    (its float weights do not matter). Every weight quantizer is replaced by a :class:`FrozenWeight`
    holding the dequantized codes, so the model computes exactly what the exported one did.
    """
    _check_export(export)
    sources = dict(_quantized_sources(model))
    if set(sources) != set(export["layers"]):
        missing = sorted(set(export["layers"]) ^ set(sources))[:3]
        raise CheckpointError(f"export: layers do not match this model (first differences: {', '.join(missing)})")
    dropped = _latent_state_keys(model, list(sources.items()))
    result = model.load_state_dict(export["float_state"], strict=False)
    unexpected = list(result.unexpected_keys)
    missing_keys = [k for k in result.missing_keys if k not in dropped]
    if unexpected or missing_keys:
        raise CheckpointError(f"export: float state does not match this model: {(unexpected + missing_keys)[:3]}")
    owners = {id(m): n for n, m in model.named_modules()}
    for name, source in sources.items():
        layer = export["layers"][name]
        codes = unpack_codes(layer["codes"], layer["bits"], tuple(layer["shape"]))
        weight = _dequantize(layer["quantizer"], layer["bits"], codes, layer["scale"])
        device = source.latent().device
        quantizer_name = owners[id(source.quantizer)]
        parent_name, _, attr = quantizer_name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, FrozenWeight(weight.to(device), layer["bits"]))
    for name, bias in export["key_bias"].items():
        attention = model.get_submodule(name)
        attention.key_bias_override = bias.to(next(attention.parameters()).device)
    return model
