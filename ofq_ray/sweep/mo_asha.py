"""MO-ASHA: asynchronous successive halving that promotes by non-dominated rank (Schmucker et al., 2021).

ASHA on one objective ranks a rung by that objective; for a size/accuracy front it stops the small,
slow-learning models the front needs. Here a rung ranks the objective vectors recorded at it: first
by non-dominated front (NSGA-II's sort), then, inside a front, by crowding distance (the extremes of a
front first, then the points in its sparsest regions), then by arrival. A trial that reaches a rung
continues when it ranks in the top ``1 / reduction_factor`` of the trials recorded there (at least
one), as ASHA's asynchronous rule does for one objective; a tie with the trials ahead of it (same
front, same crowding distance: the two ends of a two-point front, say) goes to the newcomer, as ASHA
lets a newcomer equal to its cutoff continue.

The ranking is written here rather than taken from Syne Tune (whose MO-ASHA uses an epsilon-net):
Syne Tune brings xgboost, statsmodels, pandas and scikit-learn as hard dependencies for what are
thirty lines of sorting, and Optuna's non-dominated sort is private API.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

Vector = tuple[float, ...]


def dominates(a: Vector, b: Vector) -> bool:
    """``a`` is no worse than ``b`` everywhere and better somewhere (every objective minimized)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def non_dominated_fronts(points: Sequence[Vector]) -> list[list[int]]:
    """Indices of ``points`` grouped into fronts: front 0 is non-dominated, front 1 is non-dominated once
    front 0 is removed, and so on (minimization)."""
    remaining = list(range(len(points)))
    fronts: list[list[int]] = []
    while remaining:
        front = [i for i in remaining if not any(dominates(points[j], points[i]) for j in remaining if j != i)]
        fronts.append(front)
        remaining = [i for i in remaining if i not in front]
    return fronts


def crowding_distances(points: Sequence[Vector], front: Sequence[int]) -> dict[int, float]:
    """NSGA-II crowding distance of each index of ``front``: infinite at each objective's extremes, else
    the sum over objectives of the normalized gap between its two neighbours."""
    distance = dict.fromkeys(front, 0.0)
    if len(front) <= 2:
        return dict.fromkeys(front, math.inf)
    for k in range(len(points[front[0]])):
        ordered = sorted(front, key=lambda i: points[i][k])
        low, high = points[ordered[0]][k], points[ordered[-1]][k]
        distance[ordered[0]] = distance[ordered[-1]] = math.inf
        if high == low:
            continue
        for before, here, after in zip(ordered, ordered[1:], ordered[2:], strict=False):
            distance[here] += (points[after][k] - points[before][k]) / (high - low)
    return distance


def rank_keys(points: Sequence[Vector]) -> list[tuple[int, float]]:
    """A sort key per point, smaller is better: (its front, minus its crowding distance in that front)."""
    keys: list[tuple[int, float]] = [(0, 0.0)] * len(points)
    for number, front in enumerate(non_dominated_fronts(points)):
        for index, distance in crowding_distances(points, front).items():
            keys[index] = (number, -distance)
    return keys


class MultiObjectiveASHA(FIFOScheduler):
    """A Ray Tune scheduler: ASHA's rungs (``grace_period * reduction_factor**k`` up to ``max_t``, in units
    of ``time_attr``), with each rung's decision taken on several objectives by :func:`rank_keys`.

    Args:
        metrics: the reported objectives, e.g. ``["val/top1", "model/size_bytes"]``. Each must be in a
            result for the scheduler to decide on it; results without them continue.
        modes: ``"max"`` or ``"min"`` for each metric.
        time_attr, max_t, grace_period, reduction_factor: as for Ray's ``ASHAScheduler``.
        stop_last_trials: stop a trial that reaches ``max_t`` (False lets trials end on their own).

    Example:
        >>> MultiObjectiveASHA(["val/top1", "model/size_bytes"], ["max", "min"], max_t=9, grace_period=1)
    """

    def __init__(
        self,
        metrics: Sequence[str],
        modes: Sequence[str],
        *,
        time_attr: str = "training_iteration",
        max_t: int = 100,
        grace_period: int = 1,
        reduction_factor: float = 3,
        stop_last_trials: bool = True,
    ) -> None:
        if len(metrics) < 1 or len(metrics) != len(modes):
            raise ValueError(f"tune.metric: {list(metrics)!r} does not match tune.mode {list(modes)!r}")
        for mode in modes:
            if mode not in ("max", "min"):
                raise ValueError(f"tune.mode: {mode!r} is not allowed; allowed: max, min")
        if not (0 < grace_period <= max_t) or reduction_factor <= 1:
            raise ValueError(
                f"tune.scheduler.asha: grace_period {grace_period}, reduction_factor {reduction_factor} and "
                f"max_t {max_t} are not allowed; allowed: 0 < grace_period <= max_t, reduction_factor > 1"
            )
        super().__init__()
        self.metrics = list(metrics)
        self.signs = [-1.0 if mode == "max" else 1.0 for mode in modes]  # every objective minimized inside
        self.time_attr = time_attr
        self.max_t = max_t
        self.reduction_factor = reduction_factor
        self.stop_last_trials = stop_last_trials
        milestones, milestone = [], float(grace_period)
        while milestone <= max_t:
            milestones.append(milestone)
            milestone *= reduction_factor
        # milestone -> {trial_id: objective vector}, in arrival order
        self.rungs: list[tuple[float, dict[str, Vector]]] = [(m, {}) for m in milestones]
        self.num_stopped = 0

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the objectives are the scheduler's own; Tune's single metric/mode do not apply

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        if self.time_attr not in result or any(m not in result for m in self.metrics):
            return TrialScheduler.CONTINUE
        progress = float(result[self.time_attr])
        if progress >= self.max_t and self.stop_last_trials:
            self.num_stopped += 1
            return TrialScheduler.STOP
        action = self.decide(trial.trial_id, progress, [float(result[m]) for m in self.metrics])
        self.num_stopped += action == TrialScheduler.STOP
        return action

    def decide(self, trial_id: str, progress: float, values: Sequence[float]) -> str:
        """Records ``values`` at the highest rung ``progress`` has reached (once per rung) and says
        whether the trial continues. Pure bookkeeping: the unit tests drive it directly."""
        vector = tuple(sign * value for sign, value in zip(self.signs, values, strict=True))
        for milestone, recorded in reversed(self.rungs):
            if progress < milestone:
                continue
            if trial_id in recorded:
                return TrialScheduler.CONTINUE  # decided at this rung already
            recorded[trial_id] = vector
            ids = list(recorded)
            keys = rank_keys([recorded[i] for i in ids])
            mine = keys[ids.index(trial_id)]
            better = sum(key < mine for key in keys)  # ties go to the newcomer, as ASHA's ">= cutoff"
            keep = max(1, int(len(ids) / self.reduction_factor))
            return TrialScheduler.CONTINUE if better < keep else TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        pass  # a finished trial's rung results are already recorded

    def debug_string(self) -> str:
        rungs = ", ".join(f"{milestone:g}: {len(recorded)}" for milestone, recorded in self.rungs)
        return f"MO-ASHA on {self.metrics}: {self.num_stopped} stopped; trials recorded per rung {{{rungs}}}"

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__dict__, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))
