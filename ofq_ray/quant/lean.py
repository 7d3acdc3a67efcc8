"""Fused autograd functions that keep less for backward: a quantizer and the layer that consumes it.

Unfused, a quantizer saves its input and the layer after it saves the quantized copy, so every
quantized activation is held twice (three times with the GELU before fc2, six-fold for QKR's
``M_h x_m`` product, which the float model never forms). These functions save the input in its own
dtype and recompute the rest in backward, with the same ops and dtypes as forward, so outputs and
gradients are those of the unfused modules:

- :class:`LsqLinear`: ``linear(LSQ(act(x)), W, b)`` with ``act`` GELU or nothing; saves ``x`` and
  the (already quantized) weight. The quantized input is rebuilt in backward from the clip mask and
  rounded values that LSQ's backward computes anyway, so it costs one elementwise pass.
- :class:`QkrLogits`: the QKR logits ``x_n . LSQ(StatsQ(W_q^T W_k) x_m)`` for all heads; saves
  ``x``, ``W_q``, ``W_k`` and the ``M_h x_m`` product (the GEMM is not redone); the merged product,
  its quantization and the quantized product are recomputed.
- :class:`PatchConv`: the patch embedding (kernel == stride), whose input gradient (needed for the
  image quantizer's step and shifts) is one GEMM instead of a backward-data convolution.

Under autocast, forward runs in the caller's autocast state and backward recomputes in the same
state, so every GEMM sees the dtypes it saw in the unfused graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from .quantizers import (
    low_confidence,
    lsq_grads,
    lsq_out_dtype,
    lsq_output,
    lsq_prequant,
    lsq_recompute,
    statsq_quantize,
)

AutocastState = tuple[str, bool, torch.dtype]

_FUSED = True


def fused() -> bool:
    """Whether the quantized modules use these functions (True unless inside :func:`unfused`)."""
    return _FUSED


@contextmanager
def unfused() -> Iterator[None]:
    """Runs the quantized modules module by module (the pre-fusion graph), e.g. to compare against."""
    global _FUSED
    previous, _FUSED = _FUSED, False
    try:
        yield
    finally:
        _FUSED = previous


def _autocast_state(x: torch.Tensor) -> AutocastState:
    device = x.device.type
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def _autocast(state: AutocastState) -> torch.autocast:
    device, enabled, dtype = state
    return torch.autocast(device, dtype=dtype, enabled=enabled)


def _lsq_forward(
    x: torch.Tensor, step: torch.Tensor, before: torch.Tensor | None, after: torch.Tensor | None, qn: int, qp: int
) -> torch.Tensor:
    s, v = lsq_prequant(x, step, before)
    rounded = v.clamp_(qn, qp).round_()
    out = rounded.mul_(s) if after is None else torch.addcmul(after.float(), rounded, s)
    return out.to(lsq_out_dtype(x, before, after))


def _shift_meta(after: torch.Tensor | None) -> tuple[torch.Size, torch.dtype] | None:
    return None if after is None else (after.shape, after.dtype)


class LsqLinear(torch.autograd.Function):
    """``F.linear(LSQ(act(x)), weight, bias)``, ``act`` = ``F.gelu(., approximate=gelu)`` or none.

    Saved for backward: ``x`` in its own dtype (the pre-GELU tensor for fc2), the weight, the step and
    the shifts. Unfused, the same layer holds ``x``, the GELU output and the quantized input.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        step: torch.Tensor,
        before: torch.Tensor | None,
        after: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        qn: int,
        qp: int,
        grad_scale: float,
        gelu: str | None,
    ) -> torch.Tensor:
        act = x if gelu is None else F.gelu(x, approximate=gelu)
        out = F.linear(_lsq_forward(act, step, before, after, qn, qp), weight, bias)
        ctx.save_for_backward(x, step, before, after, weight)
        ctx.bounds = (qn, qp)
        ctx.grad_scale = grad_scale
        ctx.gelu = gelu
        ctx.bias = None if bias is None else bias.dtype
        ctx.autocast = _autocast_state(x)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, step, before, after, weight = ctx.saved_tensors
        qn, qp = ctx.bounds
        with _autocast(ctx.autocast):
            act = x if ctx.gelu is None else F.gelu(x, approximate=ctx.gelu)
        s, v, rounded, inside = lsq_recompute(act, step, before, qn, qp)
        quantized = lsq_output(rounded, s, after, lsq_out_dtype(act, before, after))
        # F.linear's backward in the GEMM dtype of forward (autocast's, or the inputs' own).
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[4]:
            grad_weight = grad_2d.t().mm(quantized.reshape(-1, quantized.shape[-1]).to(grad.dtype)).to(weight.dtype)
        if ctx.bias is not None and ctx.needs_input_grad[5]:
            grad_bias = grad_2d.sum(0).to(ctx.bias)
        del quantized
        grad_quantized = grad_2d.mm(weight.to(grad.dtype)).view(act.shape).to(lsq_out_dtype(act, before, after))
        grad_act, grad_step, grad_before, grad_after = lsq_grads(
            grad_quantized, act, step, before, _shift_meta(after), v, rounded, inside, ctx.grad_scale
        )
        grad_x = grad_act if ctx.gelu is None else torch.ops.aten.gelu_backward(grad_act, x, approximate=ctx.gelu)
        return grad_x, grad_step, grad_before, grad_after, grad_weight, grad_bias, None, None, None, None


def merged_product(q_weight: torch.Tensor, k_weight: torch.Tensor, heads: int) -> torch.Tensor:
    """``[H * C, C]`` with block h = ``W_q^h^T W_k^h``, in float32 with autocast off."""
    dim = q_weight.shape[1]
    q = q_weight.view(heads, -1, dim).float()
    k = k_weight.view(heads, -1, dim).float()
    with torch.autocast(q.device.type, enabled=False):
        return torch.matmul(q.transpose(1, 2), k).reshape(heads * dim, dim)


class QkrLogits(torch.autograd.Function):
    """QKR logits ``[B, N, M * H]`` (``[b, n, m * H + h] = x_n . Q_a(Q_w(M_h) x_m)``).

    ``Q_w`` is StatsQ with ``levels_half`` (its gradient masked by CGA's ``boundary_range`` unless
    None), ``Q_a`` is LSQ with one step per (token, head) and ``[H, C]`` shifts. Saved for backward:
    ``x``, ``W_q``, ``W_k``, the LSQ parameters and the unquantized ``M_h x_m`` product in its own
    dtype; unfused, autograd also holds its quantized copy (in float32) and the quantized ``[H*C, C]``
    merged weight.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        q_weight: torch.Tensor,
        k_weight: torch.Tensor,
        step: torch.Tensor,
        before: torch.Tensor | None,
        after: torch.Tensor | None,
        heads: int,
        levels_half: int,
        boundary_range: float | None,
        qn: int,
        qp: int,
        grad_scale: float,
    ) -> torch.Tensor:
        batch, tokens, dim = x.shape
        merged, _ = statsq_quantize(merged_product(q_weight, k_weight, heads), levels_half)
        qkx = F.linear(x, merged).view(batch, tokens, heads, dim)
        quantized = _lsq_forward(qkx, step, before, after, qn, qp)
        logits = torch.matmul(x, quantized.reshape(batch, tokens * heads, dim).transpose(1, 2))
        ctx.save_for_backward(x, q_weight, k_weight, step, before, after, qkx)
        ctx.heads, ctx.levels_half, ctx.boundary_range = heads, levels_half, boundary_range
        ctx.bounds = (qn, qp)
        ctx.grad_scale = grad_scale
        return logits

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, q_weight, k_weight, step, before, after, qkx = ctx.saved_tensors
        heads, levels_half = ctx.heads, ctx.levels_half
        batch, tokens, dim = x.shape
        qn, qp = ctx.bounds
        s, v, rounded, inside = lsq_recompute(qkx, step, before, qn, qp)
        out_dtype = lsq_out_dtype(qkx, before, after)
        quantized = lsq_output(rounded, s, after, out_dtype).reshape(batch, tokens * heads, dim)
        # logits = x @ quantized^T, in the GEMM dtype of forward.
        grad_x = torch.bmm(grad, quantized.to(grad.dtype)).to(x.dtype)
        del quantized
        grad_quantized = torch.bmm(grad.transpose(1, 2), x.to(grad.dtype)).view(batch, tokens, heads, dim).to(out_dtype)
        grad_qkx, grad_step, grad_before, grad_after = lsq_grads(
            grad_quantized, qkx, step, before, _shift_meta(after), v, rounded, inside, ctx.grad_scale
        )
        del grad_quantized, v, rounded, inside
        # qkx = x @ Q_w(M)^T
        latent = merged_product(q_weight, k_weight, heads)
        merged, z = statsq_quantize(latent, levels_half)
        grad_2d = grad_qkx.reshape(batch * tokens, heads * dim)
        grad_x = grad_x + grad_2d.mm(merged.to(grad_2d.dtype)).view(batch, tokens, dim).to(x.dtype)
        grad_q = grad_k = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            x_2d = x.reshape(batch * tokens, dim).to(grad_2d.dtype)
            grad_merged = grad_2d.t().mm(x_2d).to(latent.dtype)
            if ctx.boundary_range is not None:
                grad_merged = grad_merged * low_confidence(z, ctx.boundary_range)
            # M_h = q_h^T k_h: dq_h = k_h dM_h^T, dk_h = q_h dM_h
            grad_m = grad_merged.view(heads, dim, dim)
            q = q_weight.view(heads, -1, dim).float()
            k = k_weight.view(heads, -1, dim).float()
            with torch.autocast(q.device.type, enabled=False):
                grad_q = torch.matmul(k, grad_m.transpose(1, 2)).reshape(q_weight.shape).to(q_weight.dtype)
                grad_k = torch.matmul(q, grad_m).reshape(k_weight.shape).to(k_weight.dtype)
        return grad_x, grad_q, grad_k, grad_step, grad_before, grad_after, None, None, None, None, None, None


def is_patchify(kernel: tuple[int, ...], stride: tuple[int, ...], padding: Any, dilation: tuple[int, ...]) -> bool:
    """A convolution whose windows tile the input without overlap or padding (a patch embedding)."""
    return tuple(kernel) == tuple(stride) and padding in ((0, 0), 0, "valid") and tuple(dilation) == (1, 1)


class PatchConv(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, stride=kernel)`` for non-overlapping patches, with the input's gradient
    as one GEMM instead of a transposed convolution.

    The patch embedding's input is the quantized image, which needs a gradient for its quantizer's step
    and shifts (the float model's image needs none). On CPUs the backward-data convolution for that
    gradient took several times the whole float patch embedding; ``grad_out @ W`` scattered back to
    the patches is the same sum. Weight and bias gradients come from the convolution's own backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int
    ) -> torch.Tensor:
        kernel = tuple(weight.shape[2:])
        out = F.conv2d(x, weight, bias, kernel, 0, 1, groups)
        ctx.save_for_backward(x, weight)
        ctx.bias = None if bias is None else (bias.shape, bias.dtype)
        ctx.groups = groups
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        kernel = list(weight.shape[2:])
        x_gemm, weight_gemm = x.to(grad.dtype), weight.to(grad.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            batch, channels, height, width = x.shape
            out_channels, rows, cols = grad.shape[1], grad.shape[2], grad.shape[3]
            if ctx.groups == 1 and (rows * kernel[0], cols * kernel[1]) == (height, width):
                patches = grad.permute(0, 2, 3, 1).reshape(-1, out_channels).mm(weight_gemm.reshape(out_channels, -1))
                patches = patches.view(batch, rows, cols, channels, kernel[0], kernel[1])
                grad_x = patches.permute(0, 3, 1, 4, 2, 5).reshape(x.shape).to(x.dtype)
            else:  # grouped, or an input the patches do not cover exactly
                grad_x = torch.ops.aten.convolution_backward(
                    grad, x_gemm, weight_gemm, None, kernel, [0, 0], [1, 1], False, [0, 0], ctx.groups,
                    [True, False, False],
                )[0].to(x.dtype)  # fmt: skip
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            bias_sizes = None if ctx.bias is None else list(ctx.bias[0])
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad, x_gemm, weight_gemm, bias_sizes, kernel, [0, 0], [1, 1], False, [0, 0], ctx.groups,
                [False, True, ctx.bias is not None],
            )  # fmt: skip
            grad_weight = grad_weight.to(weight.dtype)
            grad_bias = None if ctx.bias is None else grad_bias.to(ctx.bias[1])
        return grad_x, grad_weight, grad_bias, None
