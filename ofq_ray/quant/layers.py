"""Quantized linear and convolution layers that reuse the parameters of the timm layers they replace."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .lean import LsqLinear, PatchConv, fused, is_patchify
from .quantizers import LsqQuantizer, StatsQuantizer, lsq_weight_quantizer

WeightQuantizer = StatsQuantizer | LsqQuantizer
Role = Literal["block", "first_last"]
ROLES: tuple[str, ...] = ("block", "first_last")


@dataclass
class WeightSource:
    """One quantized weight of a module, as seen by CGA, the oscillation tracker and the exporter.

    ``latent()`` gives the float tensor the quantizer rounds: a parameter for ordinary layers, or a
    tensor derived from parameters (the QKR merged product), in which case ``parameter`` is None.
    """

    name: str
    quantizer: nn.Module
    latent: Callable[[], torch.Tensor]
    parameter: torch.Tensor | None
    role: Role


def make_weight_quantizer(kind: str, bits: int, weight: torch.Tensor) -> WeightQuantizer:
    """StatsQ (``kind="statsq"``) or LSQ with a per-row learnable step initialized from ``weight``."""
    if kind == "statsq":
        return StatsQuantizer(bits)
    if kind == "lsq":
        return lsq_weight_quantizer(weight.detach(), bits)
    raise ValueError(f"weight_quantizer: {kind!r} is not allowed; allowed: statsq, lsq")


class QLinear(nn.Module):
    """``linear(Q_in(x), Q_w(W), b)``. Either quantizer may be None (that side stays float).

    The ``weight``/``bias`` parameter objects are shared with the layer it was built from, so
    pretrained values (and timm's state-dict names) carry over.

    ``input_grid = (H, W)`` makes the input quantizer see a ``[B, H*W, C]`` input as the NHWC map
    ``[B, H, W, C]`` it comes from (the reference runs Swin's MLP on NHWC tensors).
    """

    input_grid: tuple[int, int] | None = None

    def __init__(
        self,
        linear: nn.Linear,
        weight_quantizer: nn.Module | None,
        input_quantizer: LsqQuantizer | None,
        role: Role = "block",
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.role = role

    def quantized_weight(self) -> torch.Tensor:
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def forward(self, x: torch.Tensor, gelu: str | None = None) -> torch.Tensor:
        """``linear(Q_in(x))``, or ``linear(Q_in(gelu(x)))`` with ``gelu`` = GELU's ``approximate``.

        With an initialized input quantizer, one fused autograd function (:class:`LsqLinear`) does
        the GELU, the quantization and the GEMM, and keeps only ``x`` for backward.
        """
        quantizer = self.input_quantizer
        if quantizer is not None and quantizer.initialized and fused():
            grid_input = x if self.input_grid is None else self._on_grid(x)
            out: torch.Tensor = LsqLinear.apply(
                grid_input,
                quantizer.step,
                quantizer.shift_before,
                quantizer.shift_after,
                self.quantized_weight(),
                self.bias,
                quantizer.qn,
                quantizer.qp,
                quantizer.grad_scale(grid_input),
                gelu,
            )
            return out if self.input_grid is None else out.view(*x.shape[:-1], self.out_features)
        if gelu is not None:
            x = F.gelu(x, approximate=gelu)
        if quantizer is not None:
            x = quantizer(x) if self.input_grid is None else quantizer(self._on_grid(x)).view(x.shape)
        return F.linear(x, self.quantized_weight(), self.bias)

    def _on_grid(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H*W, C]`` seen as the NHWC map ``[B, H, W, C]`` of ``input_grid``."""
        assert self.input_grid is not None
        height, width = self.input_grid
        if x.dim() != 3 or x.shape[1] != height * width:
            raise ValueError(f"model: input of shape {tuple(x.shape)} does not fit the {height}x{width} grid")
        batch, _, channels = x.shape
        return x.view(batch, height, width, channels)

    def quantized_weight_sources(self) -> list[WeightSource]:
        if self.weight_quantizer is None:
            return []
        return [WeightSource("weight", self.weight_quantizer, lambda: self.weight, self.weight, self.role)]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QConv2d(nn.Module):
    """Patch-embedding convolution with LSQ weights (per output channel) and an LSQ image input.

    The image quantizer has one step per input channel and a learnable per-pixel shift, shared over
    channels, before and after quantization (the reference's first layer). ``weight_bits`` or
    ``act_bits`` None keeps that side in float.
    """

    def __init__(
        self, conv: nn.Conv2d, weight_bits: int | None, act_bits: int | None, img_size: tuple[int, int]
    ) -> None:
        super().__init__()
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups
        self.weight = conv.weight
        self.bias = conv.bias
        self.weight_quantizer: nn.Module | None = (
            None if weight_bits is None else lsq_weight_quantizer(conv.weight.detach(), weight_bits)
        )
        self.input_quantizer = (
            None
            if act_bits is None
            else LsqQuantizer(act_bits, signed=True, granularity="in_channel", shift_shape=img_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        if fused() and is_patchify(tuple(weight.shape[2:]), self.stride, self.padding, self.dilation):
            out: torch.Tensor = PatchConv.apply(x, weight, self.bias, self.groups)
            return out
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def quantized_weight_sources(self) -> list[WeightSource]:
        if self.weight_quantizer is None:
            return []
        return [WeightSource("weight", self.weight_quantizer, lambda: self.weight, self.weight, "first_last")]


def quantized_head(linear: nn.Linear, weight_bits: int | None, act_bits: int | None) -> QLinear:
    """Classifier head: LSQ weights per output row, LSQ input with one step and per-feature shifts.

    Either width None keeps that side in float.
    """
    input_quantizer = (
        None
        if act_bits is None
        else LsqQuantizer(act_bits, signed=True, granularity="tensor", shift_shape=(linear.in_features,))
    )
    weight_quantizer = None if weight_bits is None else lsq_weight_quantizer(linear.weight.detach(), weight_bits)
    return QLinear(linear, weight_quantizer, input_quantizer, "first_last")


def iter_quantized_weights(model: nn.Module, roles: Iterable[str] = ("block",)) -> list[tuple[str, WeightSource]]:
    """Every quantized weight of ``model`` whose role is in ``roles``, with its qualified name.

    Walks ``model.named_modules()`` and asks each module that has ``quantized_weight_sources()``; names
    read like ``"blocks.0.mlp.fc1.weight"`` or ``"blocks.0.attn.merged_qk"``, in module order.

    Args:
        model: a model converted by :func:`~ofq_ray.quant.convert.quantize_model` (or any module tree
            whose quantized modules implement ``quantized_weight_sources()``).
        roles: ``"block"`` (the low-bit attention/MLP weights) and/or ``"first_last"`` (the patch
            embedding and classifier heads); a single string is taken as one role.

    Raises:
        ValueError: for a role other than ``"block"`` or ``"first_last"``.
    """
    wanted = {roles} if isinstance(roles, str) else set(roles)  # a bare "block" is one role, not letters
    for role in wanted:
        if role not in ROLES:
            raise ValueError(f"roles: {role!r} is not allowed; allowed: {', '.join(ROLES)}")
    found: list[tuple[str, WeightSource]] = []
    for prefix, module in model.named_modules():
        sources = getattr(module, "quantized_weight_sources", None)
        if sources is None:
            continue
        for source in sources():
            if source.role in wanted:
                found.append((f"{prefix}.{source.name}" if prefix else source.name, source))
    return found
