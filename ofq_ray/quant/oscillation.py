"""Weight-oscillation tracking on integer codes (Nagel et al., ICML 2022; spec §6).

After every optimizer step the tracker reads the integer code of each quantized weight. An element
*oscillates* at a step when its code moves in the direction opposite to its previous move (steps
without a move in between do not reset the direction). Per element it keeps an EMA of these events,
``f <- m * oscillated + (1 - m) * f``, and a cumulative count; per tensor it counts the codes that
changed since the last window reset, which gives the per-step flip rate. Statistics come per tensor,
overall, or pooled over any grouping of the tensors (by default their kind: fc1, proj, merged_qk, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .layers import WeightSource, iter_quantized_weights

_FIELDS = ("previous_codes", "last_direction", "frequency", "oscillations", "window_flips")
DEFAULT_THRESHOLDS = (0.005, 0.01)


def _statistic_keys(thresholds: Sequence[float]) -> list[str]:
    return ["mean_freq", *(f"frac_gt_{t:g}" for t in thresholds), "flip_rate", "oscillations"]


def metric_names(thresholds: Sequence[float] = DEFAULT_THRESHOLDS, prefix: str = "osc/") -> list[str]:
    """The keys :meth:`OscillationTracker.metrics` returns, known before any model exists (to validate
    a metric a config names)."""
    return [f"{prefix}{key}" for key in _statistic_keys(thresholds)[:-1]]


@dataclass
class _TensorState:
    """Tracking state of one quantized tensor, kept on the weight's device."""

    previous_codes: torch.Tensor  # int8 (StatsQ) or int16 (LSQ), shaped like the weight
    last_direction: torch.Tensor  # int8 in {-1, 0, 1}: the sign of the last code move
    frequency: torch.Tensor  # float32 EMA of oscillation events
    oscillations: torch.Tensor  # int32 cumulative oscillation events
    window_flips: torch.Tensor  # int64 scalar: code changes since the last window reset

    @classmethod
    def start(cls, codes: torch.Tensor) -> _TensorState:
        return cls(
            previous_codes=codes.clone(),
            last_direction=torch.zeros_like(codes, dtype=torch.int8),
            frequency=torch.zeros_like(codes, dtype=torch.float32),
            oscillations=torch.zeros_like(codes, dtype=torch.int32),
            window_flips=torch.zeros((), dtype=torch.int64, device=codes.device),
        )

    def to(self, device: torch.device) -> None:
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name).to(device))

    def advance(self, codes: torch.Tensor, momentum: float) -> None:
        if self.previous_codes.device != codes.device:  # the model moved after tracking started
            self.to(codes.device)
        # Comparisons instead of a difference: int8 codes of 8-bit weights would overflow on subtraction.
        direction = (self.previous_codes > codes).to(torch.int8) - (self.previous_codes < codes).to(torch.int8)
        oscillated = direction * self.last_direction == -1
        self.frequency.mul_(1.0 - momentum).add_(oscillated, alpha=momentum)
        self.oscillations.add_(oscillated)
        moved = direction != 0
        self.last_direction.copy_(torch.where(moved, direction, self.last_direction))
        self.window_flips.add_(moved.sum())
        self.previous_codes.copy_(codes)


def _check_fraction(value: float, field: str, allowed: str, low_open: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and ((0.0 < value <= 1.0) if low_open else (0.0 <= value < 1.0))
    if not ok:
        raise ConfigError(f"{field}: {value!r} is not allowed; allowed: {allowed}")
    return float(value)


def _device_of(source: WeightSource) -> torch.device:
    if source.parameter is not None:
        return source.parameter.device
    with torch.no_grad():
        return source.latent().device


def _shape_of(source: WeightSource) -> torch.Size:
    if source.parameter is not None:
        return source.parameter.shape
    with torch.no_grad():
        return source.latent().shape


def weight_kind(name: str) -> str:
    """The kind of a quantized weight from its qualified name (what :meth:`OscillationTracker.summary_by`
    groups by): the module's own name, e.g. ``"merged_qk"`` (the QKR product), ``"qkv"`` (the fused
    projection without QKR), ``"v"``, ``"proj"``, ``"fc1"``, ``"fc2"``, ``"reduction"`` (Swin), and
    ``"patch_embed"`` / ``"head"`` for the first and last layers.

    Example:
        >>> weight_kind("blocks.0.attn.merged_qk"), weight_kind("layers.1.downsample.reduction.weight")
        ('merged_qk', 'reduction')
    """
    parts = name.removesuffix(".weight").split(".")
    return "patch_embed" if "patch_embed" in parts else parts[-1]


class OscillationTracker:
    """Tracks code oscillations of every quantized weight with the given roles.

    Call :meth:`update` after each optimizer step (the first call only records the codes), then read
    :meth:`summary` or :meth:`metrics`, e.g. once per epoch with ``reset_window=True``. The per-step
    work is a handful of elementwise ops per tensor with no host synchronization; the state costs
    about 10 bytes per tracked weight element (11 with LSQ codes). For a QKR model the tracked tensor
    is the merged product ``M``, recomputed from ``W_q``/``W_k`` at each update.

    Example:
        >>> tracker = OscillationTracker(model)
        >>> for images, targets in loader:
        ...     train_step(images, targets)
        ...     tracker.update()
        >>> mlflow.log_metrics(tracker.metrics(reset_window=True), step=epoch)

    Args:
        model: a model converted by :func:`~ofq_ray.quant.convert.quantize_model` (StatsQ or LSQ
            weights), or any module tree exposing ``quantized_weight_sources()``.
        momentum: the EMA momentum m in ``(0, 1]`` (the reference uses 0.01).
        roles: which weights to track: ``"block"`` (the low-bit weights) and/or ``"first_last"``.
        thresholds: frequencies τ in ``[0, 1)`` for the ``frac_gt_{τ:g}`` statistics (strictly
            greater than τ).

    Raises:
        ValueError: for an out-of-range momentum or threshold, an unknown role, or a model without
            quantized weights of those roles.
    """

    def __init__(
        self,
        model: nn.Module,
        momentum: float = 0.01,
        roles: Iterable[str] = ("block",),
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    ) -> None:
        self.momentum = _check_fraction(momentum, "oscillation.momentum", "a number in (0, 1]", low_open=True)
        self.thresholds = tuple(
            _check_fraction(t, "oscillation.thresholds", "numbers in [0, 1)", low_open=False) for t in thresholds
        )
        roles = (roles,) if isinstance(roles, str) else tuple(roles)
        self._sources = iter_quantized_weights(model, roles)
        if not self._sources:
            raise ValueError(f"oscillation: the model has no quantized weights with roles {', '.join(roles)}")
        self._codes: list[Callable[[torch.Tensor], torch.Tensor]] = []
        for name, source in self._sources:
            codes = getattr(source.quantizer, "codes", None)
            if not callable(codes):
                kind = type(source.quantizer).__name__
                raise ValueError(f"oscillation: {name} uses {kind}, which has no codes(); allowed: StatsQ, LSQ")
            self._codes.append(codes)
        self._states: dict[str, _TensorState] = {}
        self.window_steps = 0  # updates that compared codes since the last window reset

    @property
    def names(self) -> list[str]:
        """Qualified names of the tracked tensors, in module order."""
        return [name for name, _ in self._sources]

    @torch.no_grad()
    def update(self) -> None:
        """Reads the current codes and updates the statistics (the first call only records them)."""
        first = not self._states
        for (name, source), to_codes in zip(self._sources, self._codes, strict=True):
            codes = to_codes(source.latent())
            if first:
                self._states[name] = _TensorState.start(codes)
            else:
                self._states[name].advance(codes, self.momentum)
        if not first:
            self.window_steps += 1

    def _stat_keys(self) -> list[str]:
        return _statistic_keys(self.thresholds)

    @torch.no_grad()
    def _tensor_stats(self) -> dict[str, dict[str, float | int]]:
        """Per tracked tensor: the :meth:`summary` statistics plus ``"elements"`` (its element count)."""
        keys = self._stat_keys()
        steps = max(self.window_steps, 1)  # the flip count is 0 when no step was compared yet
        stats: dict[str, dict[str, float | int]] = {}
        for name, source in self._sources:
            state = self._states.get(name)
            if state is None:
                elements = _shape_of(source).numel()
                stats[name] = {key: 0.0 for key in keys} | {"oscillations": 0, "elements": elements}
                continue
            frequency = state.frequency
            sums = [frequency.sum(dtype=torch.float64)]
            sums += [(frequency > t).sum().to(torch.float64) for t in self.thresholds]
            sums += [state.window_flips.to(torch.float64), state.oscillations.sum(dtype=torch.float64)]
            values = torch.stack(sums).cpu().tolist()
            elements = frequency.numel()
            means = [v / elements for v in values[:-2]] + [values[-2] / (elements * steps)]
            stats[name] = dict(zip(keys[:-1], means, strict=True)) | {
                "oscillations": int(values[-1]),
                "elements": elements,
            }
        return stats

    def _pool(self, group: Iterable[Mapping[str, float | int]]) -> dict[str, float | int]:
        """Statistics of several tensors taken together: means weighted by element count, counts summed."""
        keys = self._stat_keys()[:-1]
        totals = dict.fromkeys(keys, 0.0)
        oscillations = elements = 0
        for stats in group:
            for key in keys:
                totals[key] += float(stats[key]) * int(stats["elements"])
            oscillations += int(stats["oscillations"])
            elements += int(stats["elements"])
        pooled: dict[str, float | int] = {key: total / max(elements, 1) for key, total in totals.items()}
        return pooled | {"oscillations": oscillations, "elements": elements}

    def summary(self, reset_window: bool = False) -> dict[str, Any]:
        """Oscillation statistics, overall and per tensor, as plain Python numbers.

        Returns:
            ``{"overall": stats, "layers": {name: stats}}`` where ``stats`` has ``"mean_freq"`` (mean
            EMA frequency), ``"frac_gt_{τ:g}"`` per threshold (fraction of elements with frequency
            > τ), ``"flip_rate"`` (mean per-step fraction of codes that changed since the last window
            reset, 0.0 before any), ``"oscillations"`` (cumulative event count, an int) and
            ``"elements"`` (element count, an int). Overall values are weighted by element count.
            Everything but ``"elements"`` is 0 before the second :meth:`update`.

        Args:
            reset_window: afterwards, restart the flip-rate window (frequencies and counts persist).
        """
        layers = self._tensor_stats()
        overall = self._pool(layers.values())
        if reset_window:
            self.reset_window()
        return {"overall": overall, "layers": layers}

    def summary_by(self, group: Callable[[str], str] = weight_kind) -> dict[str, dict[str, float | int]]:
        """The :meth:`summary` statistics pooled over groups of tensors, by default per weight kind.

        Example:
            >>> tracker.summary_by()["fc1"]["mean_freq"]  # every block's fc1 weight taken together
            >>> tracker.summary_by(lambda name: name.split(".")[1])  # per block index

        Args:
            group: maps a tracked tensor's qualified name (see :attr:`names`) to its group's name.

        Returns:
            ``{group: stats}`` in the order groups first appear in :attr:`names`, with the same keys as
            :meth:`summary`'s ``stats``: means weighted by element count, counts summed.
        """
        members: dict[str, list[dict[str, float | int]]] = {}
        for name, stats in self._tensor_stats().items():
            members.setdefault(group(name), []).append(stats)
        return {key: self._pool(group_stats) for key, group_stats in members.items()}

    def reset_window(self) -> None:
        """Restarts the flip-rate window."""
        for state in self._states.values():
            state.window_flips.zero_()
        self.window_steps = 0

    def metrics(self, prefix: str = "osc/", reset_window: bool = False) -> dict[str, float]:
        """Flat overall metrics for MLflow: ``{prefix}mean_freq``, ``{prefix}frac_gt_{τ:g}``, ``{prefix}flip_rate``."""
        overall = self.summary(reset_window=reset_window)["overall"]
        return {f"{prefix}{key}": float(overall[key]) for key in self._stat_keys()[:-1]}

    # --- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The tracker state: ``"{name}.{field}"`` tensors plus ``window_steps`` and ``momentum``.

        Safe for ``torch.load(..., weights_only=True)`` (tensors, ints and floats only). Tensors are
        references to the live state; ``torch.save`` copies them.
        """
        state: dict[str, Any] = {"window_steps": self.window_steps, "momentum": self.momentum}
        for name, tensors in self._states.items():
            for item in _FIELDS:
                state[f"{name}.{item}"] = getattr(tensors, item)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a :meth:`state_dict` taken from a tracker on the same architecture.

        Tensors are copied to each weight's current device. The ``momentum`` entry is informational;
        this tracker keeps its own.

        Raises:
            ValueError: on missing or unexpected entries, or a tensor whose shape does not match.
        """
        expected_meta = {"window_steps", "momentum"}
        tensor_keys = [key for key in state if key not in expected_meta]
        recorded = bool(tensor_keys)
        wanted = {f"{name}.{item}" for name, _ in self._sources for item in _FIELDS} if recorded else set()
        missing = sorted(wanted - set(tensor_keys) | (expected_meta - set(state)))
        unexpected = sorted(set(tensor_keys) - wanted)
        if missing or unexpected:
            raise ValueError(
                "oscillation state: does not match the tracked weights; "
                f"missing: {', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'}"
            )
        states: dict[str, _TensorState] = {}
        if recorded:
            for name, source in self._sources:
                device, shape = _device_of(source), _shape_of(source)
                values = {item: state[f"{name}.{item}"].detach().clone().to(device) for item in _FIELDS}
                if values["previous_codes"].shape != shape:
                    raise ValueError(
                        f"oscillation state: {name} has shape {tuple(values['previous_codes'].shape)}; "
                        f"allowed: {tuple(shape)}"
                    )
                states[name] = _TensorState(**values)
        self._states = states
        self.window_steps = int(state["window_steps"])
