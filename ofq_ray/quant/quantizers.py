"""Fake quantizers: StatsQ for low-bit weights, LSQ for activations and 8-bit layers.

Both are built from fused autograd functions, so a quantizer adds one node to the graph and saves one
tensor for backward, whatever its rounding and clipping do inside.
"""

from __future__ import annotations

import math
from typing import Literal, cast

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from ..errors import ConfigError

Granularity = Literal["tensor", "token", "query", "column", "channel", "out_channel", "in_channel"]
GRANULARITIES: tuple[str, ...] = ("tensor", "token", "query", "column", "channel", "out_channel", "in_channel")

# The reference clips W/s to [-1, 1 - 1e-6] so that the top code stays n - 1.
_STATSQ_UPPER = 1.0 - 1e-6
_MIN_STEP = 1e-5


def check_bits(bits: int, field: str = "bits") -> int:
    """Returns ``bits`` if it is an int in 2..8, else raises a one-line ValueError naming ``field``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"{field}: {bits!r} is not allowed; allowed: an integer from 2 to 8")
    return bits


def low_confidence(z: torch.Tensor, boundary_range: float) -> torch.Tensor:
    """Marks values within ``boundary_range`` of a rounding threshold (True = low confidence).

    ``z`` is a pre-round value in units of the quantization step (StatsQ's ``W/s*n - 0.5``); the
    thresholds are the half-integers between the smallest and largest code present in the tensor, so
    a clipped value (beyond the outermost level) is never low-confidence. Vectorized: no tensor per
    level is built.
    """
    codes = torch.round(z)
    lowest, highest = codes.min(), codes.max()
    below = torch.floor(z)  # the only threshold a value can be near is floor(z) + 0.5
    near = (z - below - 0.5).abs() <= boundary_range
    return near & (below >= lowest) & (below <= highest - 1)


class _StatsQuantize(torch.autograd.Function):
    """Forward: StatsQ levels. Backward: identity (optionally masked), no clipping mask."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        weight: torch.Tensor,
        levels_half: int,
        boundary_range: float | None,
    ) -> torch.Tensor:
        out, z = statsq_quantize(weight, levels_half)
        if boundary_range is not None:
            ctx.save_for_backward(low_confidence(z, boundary_range))
        ctx.masked = boundary_range is not None  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None]:
        if ctx.masked:  # type: ignore[attr-defined]
            (trainable,) = ctx.saved_tensors  # type: ignore[attr-defined]
            grad = grad * trainable
        return grad, None, None


def statsq_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-row scale ``2 * mean|W_row|`` (no gradient), shaped to broadcast against ``weight``."""
    reduce_dims = tuple(range(1, weight.dim()))
    return (2.0 * weight.detach().abs().mean(dim=reduce_dims, keepdim=True)).clamp_min(1e-12)


def statsq_prequant(weight: torch.Tensor, scale: torch.Tensor, levels_half: int) -> torch.Tensor:
    """The value StatsQ rounds: ``clamp(W/s, -1, 1-1e-6) * n - 0.5`` (in units of the step s/n)."""
    return (weight.detach() / scale).clamp(-1.0, _STATSQ_UPPER) * levels_half - 0.5


def statsq_quantize(weight: torch.Tensor, levels_half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fake-quantized weight, pre-round value z)``: StatsQ's forward, without autograd."""
    scale = statsq_scale(weight)
    z = statsq_prequant(weight, scale, levels_half)
    return scale * ((torch.round(z) + 0.5) / levels_half), z


class StatsQuantizer(nn.Module):
    """StatsQ weight quantizer: statistics-derived scale, symmetric grid without a zero level.

    Per output row r, ``s_r = 2 * mean|W_r|`` is recomputed at every call and carries no gradient.
    Codes ``k = round(clamp(W/s, -1, 1-1e-6) * n - 0.5)`` lie in ``[-n, n-1]`` with ``n = 2**(bits-1)``;
    the fake-quantized weight is ``s * (k + 0.5) / n``. The gradient is a plain straight-through
    identity, clipped weights included.

    Setting ``boundary_range`` (done by :class:`~ofq_ray.quant.cga.CGA` for derived weights such as the
    QKR merged product) masks the gradient of every high-confidence entry while training.

    Example:
        >>> q = StatsQuantizer(2)
        >>> w = torch.tensor([[1.0, -1.0, 0.25, -0.25]])  # s = 1.25: levels +-0.3125, +-0.9375
        >>> q.codes(w).tolist()
        [[1, -2, 0, -1]]
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.levels_half = 2 ** (bits - 1)
        self.boundary_range: float | None = None

    def scale(self, weight: torch.Tensor) -> torch.Tensor:
        return statsq_scale(weight)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes in ``[-2**(b-1), 2**(b-1) - 1]`` (int8 is enough for every allowed width)."""
        z = statsq_prequant(weight, statsq_scale(weight), self.levels_half)
        return torch.round(z).to(torch.int8)

    def prequant(self, weight: torch.Tensor) -> torch.Tensor:
        return statsq_prequant(weight, statsq_scale(weight), self.levels_half)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return scale * ((codes.to(scale.dtype) + 0.5) / self.levels_half)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        masked = self.boundary_range is not None and self.training and weight.requires_grad
        out: torch.Tensor = _StatsQuantize.apply(weight, self.levels_half, self.boundary_range if masked else None)
        return out

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def lsq_prequant(x: torch.Tensor, step: torch.Tensor, before: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, v)``: the floored step and ``v = (x + before) / s``, both in float32.

    Rounding decisions in bf16/fp16 would move codes, so LSQ always quantizes in float32.
    """
    s = step.clamp_min(_MIN_STEP).float()
    v = x.float() / s if before is None else torch.addcdiv(before.float() / s, x.float(), s)
    return s, v


def lsq_out_dtype(x: torch.Tensor, before: torch.Tensor | None, after: torch.Tensor | None) -> torch.dtype:
    """The dtype that unfused ``Q(x + before) + after`` would have."""
    out_dtype = x.dtype
    for shift in (before, after):
        out_dtype = out_dtype if shift is None else torch.promote_types(out_dtype, shift.dtype)
    return out_dtype


def lsq_output(
    rounded: torch.Tensor, s: torch.Tensor, after: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """``s * rounded + after`` in ``out_dtype`` (``rounded`` is left untouched)."""
    out = rounded * s if after is None else torch.addcmul(after.float(), rounded, s)
    return out.to(out_dtype)


def lsq_recompute(
    x: torch.Tensor, step: torch.Tensor, before: torch.Tensor | None, qn: int, qp: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What LSQ's backward needs, recomputed from its input exactly as forward computed it.

    Returns ``(s, v, rounded, inside)``: the step, the pre-round value, ``round(clamp(v, qn, qp))``
    and the clip mask (float32 on CPUs, where arithmetic with bool tensors is ~20x slower).
    """
    s, v = lsq_prequant(x, step, before)
    clipped = v.clamp(qn, qp)
    inside = (clipped == v) if v.is_cuda else torch.eq(clipped, v, out=torch.empty_like(v))
    return s, v, clipped.round_(), inside


def lsq_grads(
    grad: torch.Tensor,
    x: torch.Tensor,
    step: torch.Tensor,
    before: torch.Tensor | None,
    after: tuple[torch.Size, torch.dtype] | None,
    v: torch.Tensor,
    rounded: torch.Tensor,
    inside: torch.Tensor,
    grad_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """LSQ's gradients ``(x, step, before, after)`` from :func:`lsq_recompute`'s pieces.

    ``rounded`` is consumed (overwritten). ``after`` is the (shape, dtype) of the after-shift, or None.
    """
    # d(out)/ds per element: round(v) - v inside the range, the clip bound (= round(clipped)) outside.
    dstep = rounded.addcmul_(v, inside, value=-1.0)
    grad_float = grad.float()
    grad_v = grad_float * inside
    grad_x = grad_v.to(x.dtype)
    grad_before = None if before is None else grad_v.sum_to_size(before.shape).to(before.dtype)
    grad_after = None if after is None else grad.sum_to_size(after[0]).to(after[1])
    reduce_dims = [d for d, size in enumerate(step.shape) if size == 1 and grad.shape[d] != 1]
    grad_step = dstep.mul_(grad_float)
    grad_step = grad_step.sum(dim=reduce_dims, keepdim=True) if reduce_dims else grad_step
    grad_step = (grad_step * grad_scale).to(step.dtype)
    return grad_x, grad_step.reshape(step.shape), grad_before, grad_after


class _LsqQuantize(torch.autograd.Function):
    """LSQ with its shifts: ``s * round(clamp((x + before)/s, qn, qp)) + after``, straight-through.

    Gradients: x and ``before`` get ``grad`` inside the clip range and 0 outside; ``after`` gets
    ``grad``; the step gets the LSQ gradient ``sum(grad * (round(v) - v))`` inside and ``qn``/``qp``
    outside, times ``grad_scale``. The ``max(s, 1e-5)`` floor passes its gradient straight through.
    The shifts (None for none) are fused in because these tensors are the largest activations of a
    step and every extra elementwise pass over them shows in the step time.

    Saved for backward: the input in its own dtype (and the step and shifts, which are parameters and
    cost nothing); the clip mask and the rounding residual are recomputed from it in backward, exactly
    as forward computed them. Saving them instead (two tensors of the input's size, in float32) made
    the activations that autograd holds about three times those of the float model.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        step: torch.Tensor,
        before: torch.Tensor | None,
        after: torch.Tensor | None,
        qn: int,
        qp: int,
        grad_scale: float,
    ) -> torch.Tensor:
        s, v = lsq_prequant(x, step, before)
        rounded = v.clamp_(qn, qp).round_()
        out = rounded.mul_(s) if after is None else torch.addcmul(after.float(), rounded, s)
        ctx.save_for_backward(x, step, before)  # type: ignore[arg-type]
        ctx.bounds = (qn, qp)  # type: ignore[attr-defined]
        ctx.grad_scale = grad_scale  # type: ignore[attr-defined]
        ctx.after = None if after is None else (after.shape, after.dtype)  # type: ignore[attr-defined]
        return out.to(lsq_out_dtype(x, before, after))

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, None, None, None]:
        x, step, before = ctx.saved_tensors  # type: ignore[attr-defined]
        qn, qp = ctx.bounds  # type: ignore[attr-defined]
        _, v, rounded, inside = lsq_recompute(x, step, before, qn, qp)
        grads = lsq_grads(grad, x, step, before, ctx.after, v, rounded, inside, ctx.grad_scale)  # type: ignore[attr-defined]
        return *grads, None, None, None


def _scale_dims(granularity: str, ndim: int) -> tuple[int, ...]:
    """The dimensions of an ``ndim`` tensor that get their own step size."""
    if granularity == "tensor":
        return ()
    if granularity == "token":  # every position between the batch and the feature dimension
        return tuple(range(1, ndim - 1))
    if granularity == "query":  # rows of an attention map, shared over batch and heads
        return (ndim - 2,)
    if granularity == "column":  # W positions of an NHWC map, shared over batch, rows and channels
        return (ndim - 2,)
    if granularity == "channel":
        return (ndim - 1,)
    if granularity == "out_channel":
        return (0,)
    if granularity == "in_channel":
        return (1,)
    raise ValueError(f"granularity: {granularity!r} is not allowed; allowed: {', '.join(GRANULARITIES)}")


class LsqQuantizer(nn.Module):
    """LSQ fake quantizer with a learnable step, plus optional learnable shifts before and after.

    Computes ``Q(x + shift_before) + shift_after``, where ``Q`` is LSQ on the signed grid
    ``[-2**(b-1), 2**(b-1)-1]`` or the unsigned grid ``[0, 2**b - 1]``.

    The step has one entry per group given by ``granularity``:
      - ``"token"``: one per position between the batch and the last (feature) dim: per token for
        ``[B, N, C]``, per (head, token) for ``[B, H, N, C]``, per pixel for ``[B, H, W, C]``;
      - ``"query"``: one per row of ``[..., N, N']`` (attention maps), shared over batch and heads;
      - ``"column"``: one per W position of an NHWC map ``[B, H, W, C]``, shared over batch, rows and
        channels (what the reference's per-token LSQ does to Swin's NHWC MLP and merging inputs);
      - ``"channel"``: per last-dim feature; ``"out_channel"``: per dim-0 row (weights);
        ``"in_channel"``: per dim-1 channel (NCHW images); ``"tensor"``: one scalar.

    The step is created lazily on the first call (or by :meth:`init_from`) as
    ``2 * mean|x| / sqrt(qp)`` per group (``4 * ...`` for unsigned grids), which is why activation
    scales must be initialized before the optimizer is built. Its gradient is scaled by
    ``1 / sqrt(qp * elements per group * replicas)`` (``replicas``: data-parallel workers, see
    :func:`~ofq_ray.quant.convert.set_data_parallel_replicas`).

    Args:
        bits: grid width, 2..8.
        signed: signed grid (True) or unsigned (False, e.g. for softmax or GELU outputs).
        granularity: see above.
        shift_shape: shape of the learnable shifts, broadcastable against the input (e.g. ``(C,)``);
            ``None`` for no shifts.
    """

    def __init__(
        self,
        bits: int,
        signed: bool = True,
        granularity: Granularity = "token",
        shift_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        _scale_dims(granularity, 4)  # validates the name
        self.signed = bool(signed)
        self.granularity = granularity
        self.qn = -(2 ** (bits - 1)) if signed else 0
        self.qp = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        self.step: nn.Parameter = cast(nn.Parameter, UninitializedParameter())
        # Data-parallel replicas whose batches make up the global batch: the gradient scale counts
        # the global batch, so N workers train like one (the reference counts the per-GPU batch).
        self.replicas = 1
        if shift_shape is None:
            self.shift_before: nn.Parameter | None = None
            self.shift_after: nn.Parameter | None = None
        else:
            self.shift_before = nn.Parameter(torch.zeros(shift_shape))
            self.shift_after = nn.Parameter(torch.zeros(shift_shape))

    @property
    def initialized(self) -> bool:
        return not isinstance(self.step, UninitializedParameter)

    def _step_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        keep = _scale_dims(self.granularity, x.dim())
        return tuple(size if d in keep else 1 for d, size in enumerate(x.shape))

    @torch.no_grad()
    def init_from(self, x: torch.Tensor) -> None:
        """(Re)initializes the step from a batch ``x`` (shifts are applied first, as in forward)."""
        if self.shift_before is not None:
            x = x + self.shift_before
        shape = self._step_shape(x)
        reduce_dims = [d for d, size in enumerate(shape) if size == 1]
        mean_abs = (
            x.detach().float().abs().mean(dim=reduce_dims, keepdim=True) if reduce_dims else x.detach().float().abs()
        )
        factor = 2.0 if self.signed else 4.0
        value = (factor * mean_abs / math.sqrt(self.qp)).clamp_min(_MIN_STEP)
        if self.initialized:
            self.step.data = value.to(self.step.device)
        else:
            cast(UninitializedParameter, self.step).materialize(shape, device=x.device, dtype=torch.float32)
            self.step.data.copy_(value)

    def grad_scale(self, x: torch.Tensor) -> float:
        return self.grad_scale_for(x.numel())

    def grad_scale_for(self, numel: int) -> float:
        """The step's gradient scale for an input of ``numel`` elements."""
        return 1.0 / math.sqrt(self.qp * (numel // self.step.numel()) * self.replicas)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """LSQ alone (no shifts); the step must be initialized."""
        out: torch.Tensor = _LsqQuantize.apply(x, self.step, None, None, self.qn, self.qp, self.grad_scale(x))
        return out

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (no shifts), int16 so that unsigned 8-bit codes fit."""
        step = self.step.detach().clamp_min(_MIN_STEP)
        return torch.round((x.detach() / step).clamp(self.qn, self.qp)).to(torch.int16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self.init_from(x)
        out: torch.Tensor = _LsqQuantize.apply(
            x, self.step, self.shift_before, self.shift_after, self.qn, self.qp, self.grad_scale(x)
        )
        return out

    def _load_from_state_dict(
        self,
        state_dict: dict[str, torch.Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A checkpoint fixes the step's shape: materialize it so a fresh model can load it.
        key = prefix + "step"
        if key in state_dict and not self.initialized:
            cast(UninitializedParameter, self.step).materialize(state_dict[key].shape, dtype=torch.float32)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        shifts = "" if self.shift_before is None else f", shifts={tuple(self.shift_before.shape)}"
        return f"bits={self.bits}, {kind}, granularity={self.granularity}{shifts}"


def lsq_weight_quantizer(weight: torch.Tensor, bits: int) -> LsqQuantizer:
    """An LSQ quantizer for a weight (one learnable step per output row), initialized from it."""
    quantizer = LsqQuantizer(bits, signed=True, granularity="out_channel")
    quantizer.init_from(weight)
    return quantizer
