"""CGA (confidence-guided annealing): freeze the StatsQ weights that sit far from a rounding threshold.

A weight is *low-confidence* when its pre-round value ``z = clamp(W/s, -1, 1-1e-6) * n - 0.5`` lies
within ``boundary_range`` (in units of the quantization step) of a rounding threshold; only those keep
training. Every other weight, clipped ones included, is frozen: its gradient is zeroed before the
optimizer step and its value restored after it, so AdamW momentum and decoupled weight decay cannot
move it either. The mask is recomputed from the current weights at every step (spec §5).
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn

from ..errors import ConfigError
from .layers import WeightSource, iter_quantized_weights
from .quantizers import StatsQuantizer, check_bits, low_confidence, statsq_prequant, statsq_scale


def check_boundary_range(value: float, field: str = "cga.boundary_range") -> float:
    """Returns ``value`` as a float if it lies in ``[0, 0.5)``, else raises a one-line ValueError."""
    valid = not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= value < 0.5
    if not valid:
        raise ConfigError(f"{field}: {value!r} is not allowed; allowed: a number in [0, 0.5)")
    return float(value)


def _trainable(weight: torch.Tensor, levels_half: int, boundary_range: float) -> torch.Tensor:
    """The CGA mask without argument checks (True = low confidence = keeps training)."""
    z = statsq_prequant(weight, statsq_scale(weight), levels_half)
    return low_confidence(z, boundary_range)


def cga_mask(weight: torch.Tensor, bits: int, boundary_range: float) -> torch.Tensor:
    """Which entries of a StatsQ-quantized weight keep training under CGA.

    Uses the same per-row scale ``2 * mean|W_row|`` as :class:`StatsQuantizer`. The thresholds are the
    half-integers between the smallest and largest code present in the tensor (spec §5.1), so a clipped
    weight, or one near the missing threshold beyond the outermost level, is always frozen. The
    comparison is inclusive: ``|z - threshold| <= boundary_range`` keeps training.

    Args:
        weight: the latent float weight, ``[out, in]`` (one scale per output row).
        bits: the StatsQ width, 2..8.
        boundary_range: half-width of the trainable band around each threshold, in units of the
            quantization step, in ``[0, 0.5)``.

    Returns:
        A bool tensor shaped like ``weight``: True = low confidence (trainable), False = frozen.

    Raises:
        ValueError: for an out-of-range ``bits`` or ``boundary_range``.

    Example:
        >>> w = torch.tensor([[0.0, 0.5, 0.25, -0.5]])  # s = 0.625: thresholds at 0 and +-0.3125
        >>> cga_mask(w, bits=2, boundary_range=0.05).tolist()
        [[True, False, False, False]]
    """
    check_bits(bits, "cga.bits")
    boundary_range = check_boundary_range(boundary_range)
    with torch.no_grad():
        return _trainable(weight, 2 ** (bits - 1), boundary_range)


class CGA:
    """Confidence-guided annealing for every StatsQ block weight of a quantized model.

    Plain weights (``v``, ``proj``, ``fc1``, ``fc2``, Swin ``reduction``) are handled by :meth:`step`:
    mask the gradient, step the optimizer, restore the frozen entries bit for bit. The QKR merged
    product ``M = W_q^T W_k`` is not a parameter, so for it CGA sets the merged quantizer's
    ``boundary_range``, and the quantizer's backward masks ``dL/dM`` (computed from the weights of that
    forward pass) before the product rule reaches ``W_q``/``W_k``. Those latent parameters are **not**
    restored: they still move through momentum, weight decay and the trainable entries' gradients, so
    frozen entries of ``M`` can drift. LSQ-quantized weights are not covered.

    Use it in place of ``optimizer.step()``::

        cga = CGA(model, boundary_range=0.005)
        for images, targets in loader:
            loss = criterion(model(images), targets)
            optimizer.zero_grad()
            loss.backward()               # with AMP: scaler.scale(loss).backward()
            cga.step(optimizer)           # with AMP: cga.step(optimizer, scaler); scaler.update()
        cga.close()                       # the merged quantizers stop masking

    Gradient clipping, if any, belongs before :meth:`step` (after ``scaler.unscale_`` with AMP).

    Args:
        model: a model converted by :func:`~ofq_ray.quant.convert.quantize_model` with
            ``weight_quantizer="statsq"``.
        boundary_range: half-width of the trainable band around each rounding threshold, in units of
            the quantization step, in ``[0, 0.5)``; the reference uses 0.005 (about 99% frozen).
        include_merged: also anneal the QKR merged products. None means True unless the model was
            converted with ``QuantConfig(faithful=True)``: the reference's CGA has no effect on them
            (spec §5.4, §12.2), and acting on them is our deliberate deviation.

    Raises:
        ValueError: for an out-of-range ``boundary_range``, or a model without StatsQ block weights.
    """

    def __init__(self, model: nn.Module, boundary_range: float, include_merged: bool | None = None) -> None:
        self._boundary_range = check_boundary_range(boundary_range)
        if include_merged is None:
            config = getattr(model, "ofq_config", None)
            include_merged = not bool(getattr(config, "faithful", False))
        self.include_merged = include_merged
        self._parameters: list[tuple[str, torch.Tensor, StatsQuantizer]] = []
        self._merged: list[tuple[str, WeightSource, StatsQuantizer]] = []
        found = False
        for name, source in iter_quantized_weights(model, ("block",)):
            quantizer = source.quantizer
            if not isinstance(quantizer, StatsQuantizer):
                continue
            found = True
            if source.parameter is not None:
                self._parameters.append((name, source.parameter, quantizer))
            elif include_merged:
                self._merged.append((name, source, quantizer))
        if not found:
            raise ConfigError("cga: the model has no StatsQ weights; CGA needs quant.weight_quantizer=statsq")
        self._attached = True
        self._set_merged(self._boundary_range)

    # --- configuration ------------------------------------------------------------------------------
    @property
    def boundary_range(self) -> float:
        """The trainable band's half-width; setting it also updates the merged quantizers."""
        return self._boundary_range

    @boundary_range.setter
    def boundary_range(self, value: float) -> None:
        self._boundary_range = check_boundary_range(value)
        if self._attached:
            self._set_merged(self._boundary_range)

    @property
    def names(self) -> list[str]:
        """Qualified names of the covered tensors: parameters first, then merged products."""
        return [name for name, _, _ in self._parameters] + [name for name, _, _ in self._merged]

    def _set_merged(self, value: float | None) -> None:
        for _, _, quantizer in self._merged:
            quantizer.boundary_range = value

    def close(self) -> None:
        """Stops masking the merged products (resets their quantizers' ``boundary_range`` to None).

        :meth:`step` still anneals the plain weights afterwards; idempotent.
        """
        self._attached = False
        self._set_merged(None)

    remove = close

    def __enter__(self) -> CGA:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- training -----------------------------------------------------------------------------------
    def step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
        """Masks the frozen entries' gradients, steps the optimizer, and restores the frozen entries.

        The masks come from the weights as they are before the step. The gradient is multiplied by
        the mask (which is scale-invariant, so scaled AMP gradients are fine). With ``scaler``, this
        calls ``scaler.step(optimizer)``, which may skip the step on inf/nan; the restore is then a
        no-op. The caller still calls ``scaler.update()``. Parameters without a gradient are skipped
        by the optimizer and left as they are. No host synchronization happens here.
        """
        boundary_range = self._boundary_range
        masks: list[torch.Tensor] = []
        saved: list[torch.Tensor] = []
        with torch.no_grad():
            for _, parameter, quantizer in self._parameters:
                mask = _trainable(parameter, quantizer.levels_half, boundary_range)
                if parameter.grad is not None:
                    # A product, not a fill, so an inf/nan gradient still reaches the GradScaler's check.
                    parameter.grad.mul_(mask)
                masks.append(mask)
                saved.append(parameter.detach().clone())
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
        with torch.no_grad():
            for (_, parameter, _), mask, before in zip(self._parameters, masks, saved, strict=True):
                # Momentum and decoupled weight decay move zero-gradient entries; put them back exactly.
                parameter.data.copy_(torch.where(mask, parameter.data, before))

    # --- monitoring ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _frozen_counts(self) -> list[tuple[str, torch.Tensor, int]]:
        """(name, number of frozen entries as a 0-d tensor, number of entries) per covered tensor."""
        counts: list[tuple[str, torch.Tensor, int]] = []
        tensors = [(name, parameter.detach(), q) for name, parameter, q in self._parameters]
        tensors += [(name, source.latent().detach(), q) for name, source, q in self._merged]
        for name, weight, quantizer in tensors:
            trainable = _trainable(weight, quantizer.levels_half, self._boundary_range)
            counts.append((name, weight.numel() - trainable.sum(), weight.numel()))
        return counts

    def frozen_fractions(self) -> dict[str, float]:
        """Fraction of frozen entries per covered tensor, at the current weights and ``boundary_range``."""
        counts = self._frozen_counts()
        frozen = torch.stack([count.cpu() for _, count, _ in counts]).tolist()
        return {name: value / numel for (name, _, numel), value in zip(counts, frozen, strict=True)}

    def frozen_fraction(self) -> float:
        """Fraction of frozen entries over all covered tensors (plain weights and merged products)."""
        counts = self._frozen_counts()
        frozen = torch.stack([count.cpu() for _, count, _ in counts]).sum().item()
        return frozen / sum(numel for _, _, numel in counts)
