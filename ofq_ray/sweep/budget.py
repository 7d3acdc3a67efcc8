"""Budgets: ``tune.constraints`` on the costs known before training (``model/size_bytes``,
``model/bitops``, see :func:`ofq_ray.cost.run_cost`).

- :class:`Bounds` is one metric's budget; :func:`check_constraints` checks what its type cannot say;
- :class:`Budget` computes a trial's costs from its searched values (cached by what the costs depend
  on) and says which bounds they break;
- :func:`check_feasible` fails up front when no configuration of the search can meet the budget;
- :class:`BudgetSearcher` wraps the sweep's OptunaSearch: a suggestion over budget is rejected before
  Tune makes it a trial, recorded in the Optuna study, and the searcher is asked again.

Every suggestion gets Optuna constraint values (``Trial.set_constraint``, one per bound, e.g.
``model/size_bytes max``: the relative excess, > 0 when broken). A rejected one is told to Optuna as
``PRUNED``, with the user attrs ``ofq.rejected`` (why) and its costs, not as ``FAIL``: Optuna's TPE and
NSGA-II samplers ignore failed trials, while TPE ranks pruned infeasible ones below every feasible trial,
so it learns to stop proposing over-budget regions. NSGA-II only learns from complete trials (all
within budget here); there the resampling does the work.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ray.tune.search import Searcher

from ..config import ConfigError, _spec, metric_hint, parse_bits

if TYPE_CHECKING:
    from .spec import Sweep

COST_METRICS = ("model/size_bytes", "model/bitops")
BOUNDS = ("max", "min")
REJECTED = "ofq.rejected"
STOPPED = "ofq.budget_stop"
_WIDTH_KEYS = ("quant.weight_bits", "quant.act_bits", "quant.first_last_bits")
_MAX_COMBINATIONS = 64


@dataclass
class Bounds:
    """The budget on one cost metric: at most ``max``, at least ``min`` (either may be left out)."""

    max: float | None = field(default=None, metadata=_spec(low=0.0))
    min: float | None = field(default=None, metadata=_spec(low=0.0))

    def items(self) -> list[tuple[str, float]]:
        """The bounds that are set, as (``"max"`` or ``"min"``, value)."""
        return [(name, value) for name, value in (("max", self.max), ("min", self.min)) if value is not None]


def check_constraints(constraints: dict[str, Bounds]) -> None:
    """What ``tune.constraints``' type cannot say: each names a cost metric and sets a bound, min <= max."""
    for metric, bounds in constraints.items():
        if metric not in COST_METRICS:
            raise ConfigError(
                f"tune.constraints.{metric}: unknown metric; allowed: {', '.join(COST_METRICS)} "
                f"(the costs known before training){metric_hint(metric, COST_METRICS)}"
            )
        if not bounds.items():
            raise ConfigError(f"tune.constraints.{metric}: no bound; allowed: {{max: N}} and/or {{min: N}}")
        if bounds.max is not None and bounds.min is not None and bounds.min > bounds.max:
            raise ConfigError(
                f"tune.constraints.{metric}: min {bounds.min:g} > max {bounds.max:g}; allowed: min <= max"
            )


def describe_constraints(constraints: dict[str, Bounds]) -> str:
    """``"model/size_bytes <= 250000, model/bitops <= 2e+08"``."""
    parts = []
    for metric, bounds in constraints.items():
        for bound, value in bounds.items():
            parts.append(f"{metric} {'<=' if bound == 'max' else '>='} {value:g}")
    return ", ".join(parts)


def class_count(base: dict[str, Any]) -> int | None:
    """The dataset's class count when it is known without loading the data (it sizes the head), else None."""
    data = base.get("data") or {}
    name = data.get("name", "fashion_mnist") if isinstance(data, dict) else None
    if name in ("fashion_mnist", "digits"):
        return 10
    root = data.get("root") if isinstance(data, dict) else None
    train = os.path.join(str(root), "train")
    if root and os.path.isdir(train):
        return sum(os.path.isdir(os.path.join(train, entry)) for entry in os.listdir(train))
    return None


class Budget:
    """A sweep's constraints and the costs of its trials' configurations (cached).

    Args:
        sweep: the validated sweep (its ``tune.constraints`` are the budget).
        num_classes: the dataset's class count; ``in_chans``: its channels (default: the model's).
    """

    def __init__(self, sweep: Sweep, num_classes: int, in_chans: int | None = None) -> None:
        self.sweep = sweep
        self.constraints: dict[str, Bounds] = sweep.tune.constraints
        self.num_classes = num_classes
        self.in_chans = in_chans
        self._cache: dict[str, dict[str, float]] = {}

    @property
    def bounds(self) -> list[tuple[str, str, float]]:
        return [(m, b, v) for m, bounds in self.constraints.items() for b, v in bounds.items()]

    def costs(self, values: dict[str, Any]) -> dict[str, float]:
        """The cost metrics of the trial with these searched values (its last stage's model)."""
        from ..cost import run_cost
        from .stages import trial_config

        config = trial_config(self.sweep, values)
        key = json.dumps(
            [config.stage, config.model.__dict__, config.quant.to_dict(), config.data.img_size],
            sort_keys=True,
            default=str,
        )
        if key not in self._cache:
            self._cache[key] = run_cost(config, num_classes=self.num_classes, in_chans=self.in_chans)
        return self._cache[key]

    def violations(self, costs: dict[str, float]) -> dict[str, float]:
        """One number per bound, > 0 when broken (relative to the bound): Optuna's constraint values."""
        out = {}
        for metric, bound, value in self.bounds:
            excess = costs[metric] - value if bound == "max" else value - costs[metric]
            out[f"{metric} {bound}"] = excess / value if value > 0 else excess
        return out

    def broken(self, costs: dict[str, float], bounds: tuple[str, ...] = BOUNDS) -> str:
        """The bounds ``costs`` break, in words (``"model/size_bytes 312345 > max 250000"``); "" if none."""
        parts = []
        for metric, bound, value in self.bounds:
            if bound not in bounds:
                continue
            if (bound == "max" and costs[metric] > value) or (bound == "min" and costs[metric] < value):
                parts.append(f"{metric} {costs[metric]:.6g} {'>' if bound == 'max' else '<'} {bound} {value:.6g}")
        return "; ".join(parts)


# --- a budget no configuration can meet -----------------------------------------------------------------


def _rank(key: str, value: Any, groups: dict[str, str]) -> tuple[int, int] | None:
    """How wide a searched width value is, per side (float counts as 32 bits); None for other keys."""
    if key in _WIDTH_KEYS:
        width = 32 if value is None else int(value)
        return width, width
    if key == "quant.bits" or key in groups:
        weight, act = parse_bits(value)
        return weight or 32, act or 32
    return None


def _extremes(key: str, values: list[Any], lowest: bool, groups: dict[str, str]) -> list[Any]:
    """The values of a width key not dominated on the way to the cheapest (or the largest) configuration."""
    ranks = [(_rank(key, v, groups), v) for v in values]
    sign = 1 if lowest else -1
    keep: list[tuple[tuple[int, int], Any]] = []
    for rank, value in ranks:
        assert rank is not None
        if not any(
            all(sign * a <= sign * b for a, b in zip(other, rank, strict=True)) and other != rank
            for other, _ in ranks
            if other is not None
        ) and all(rank != r for r, _ in keep):
            keep.append((rank, value))
    return [value for _, value in keep]


def check_feasible(sweep: Sweep, budget: Budget) -> None:
    """A one-line :class:`ConfigError` when no configuration of the search can meet the budget.

    Costs grow with every width, so the cheapest configuration takes each searched width key (``quant.bits``,
    ``quant.weight_bits``, ..., the layer groups) at its narrowest and every ``max`` bound is checked there;
    every ``min`` bound at the widest. Other searched keys that can change the model (``model.*``,
    ``quant.*``, ``data.img_size``) are enumerated (their choices, or the ends of a range; at most 64
    combinations); the rest cannot change a cost.
    """
    from .spec import _candidate_values

    for kind in BOUNDS:
        if not any(bound == kind for _, bound, _ in budget.bounds):
            continue
        options: list[list[tuple[str, Any]]] = []
        for key, dist in sweep.search.items():
            candidates = _candidate_values(dist)
            try:
                width_key = all(_rank(key, v, sweep.layer_groups) is not None for v in candidates)
            except (ConfigError, ValueError, TypeError):
                width_key = False
            if width_key:
                options.append([(key, v) for v in _extremes(key, candidates, kind == "max", sweep.layer_groups)])
            elif key.startswith(("model.", "quant.")) or key == "data.img_size":
                options.append([(key, v) for v in candidates])
        first: tuple[dict[str, Any], dict[str, float], str] | None = None
        for combination in itertools.islice(itertools.product(*options), _MAX_COMBINATIONS):
            values = dict(combination)
            costs = budget.costs(values)
            broken = budget.broken(costs, (kind,))
            if not broken:
                break
            first = first or (values, costs, broken)
        else:
            assert first is not None
            values, _, broken = first
            shown = ", ".join(f"{k}={v}" for k, v in list(values.items())[:4]) + (", ..." if len(values) > 4 else "")
            which = "cheapest" if kind == "max" else "largest"
            raise ConfigError(
                f"tune.constraints: no configuration of the search meets the budget: the {which} "
                f"({shown or 'the base'}) has {broken}; allowed: a {kind} the search can meet"
            )


# --- the searcher ---------------------------------------------------------------------------------------------


def _say(text: str) -> None:
    print(text, flush=True)


class BudgetSearcher(Searcher):  # type: ignore[misc]
    """Rejects the wrapped OptunaSearch's over-budget suggestions before Tune makes them trials.

    Each suggestion's costs come from :class:`Budget`; one over budget is recorded in the Optuna study
    (``PRUNED``, its constraint values, user attrs ``ofq.rejected`` = why and its costs; see the module doc) and
    the searcher is asked again under a fresh id. After ``max_rejections`` rejections in a row the search
    ends (``Searcher.FINISHED``: the trials already running finish) and says so: a line in the log and
    the study's user attr ``ofq.budget_stop``, which the sweep's summary reports.

    Tune sees the wrapper as a search wrapper (it has ``.searcher``): its ``get_state`` is saved beside
    the OptunaSearch's own state, so ``--resume`` keeps the id map and the count.
    """

    def __init__(self, searcher: Any, budget: Budget, max_rejections: int, log: Any = None) -> None:
        self.searcher = searcher
        self.budget = budget
        self.max_rejections = max_rejections
        self.log = log or _say
        self.rejected = 0
        self.stopped = ""
        self._asked_as: dict[str, str] = {}  # Tune trial id -> the id its accepted suggestion was asked under
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    # Ray's OptunaSearch keeps its Optuna trials and study in these attributes (ray 2.x); the rejection
    # notes need the trial before it is told, and the stop note the study.
    def _optuna_trial(self, ask_id: str) -> Any:
        return getattr(self.searcher, "_ot_trials", {}).get(ask_id)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its search algorithm (tuner.pkl); the log function need not survive (Ray replaces
        # print in a driver, so cloudpickle cannot pickle it).
        state = self.__dict__.copy()
        state.pop("log", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.log = _say

    def set_search_properties(self, metric: Any, mode: Any, config: dict[str, Any], **spec: Any) -> bool:
        return bool(self.searcher.set_search_properties(metric, mode, config, **spec))

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return bool(self.searcher.set_max_concurrency(max_concurrent))

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.stopped:
            return Searcher.FINISHED  # type: ignore[return-value]  # Ray's end-of-search marker, a str
        last = ""
        for attempt in range(self.max_rejections):
            ask_id = trial_id if attempt == 0 else f"{trial_id}-over-budget-{attempt}"
            config = self.searcher.suggest(ask_id)
            if config is None or config == Searcher.FINISHED:
                return config  # type: ignore[no-any-return]
            costs = self.budget.costs(config)
            last = self.budget.broken(costs)
            self._note(ask_id, costs)
            if not last:
                self._asked_as[trial_id] = ask_id
                if attempt:
                    self.log(f"[sweep] budget: {attempt} configuration(s) over budget rejected before trial {trial_id}")
                return config  # type: ignore[no-any-return]
            self._reject(ask_id, costs, last)
        self.stopped = (
            f"{self.max_rejections} configurations in a row were over budget (the last: {last}); the search "
            f"stopped early: loosen tune.constraints, narrow the search or raise tune.max_rejections"
        )
        self.log(f"[sweep] budget: {self.stopped}")
        study = getattr(self.searcher, "_ot_study", None)
        if study is not None:
            study.set_user_attr(STOPPED, self.stopped)
        return Searcher.FINISHED  # type: ignore[return-value]  # Ray's end-of-search marker, a str

    def _note(self, ask_id: str, costs: dict[str, float]) -> None:
        """The suggestion's constraint values and costs, on its Optuna trial (shown by optuna-dashboard)."""
        trial = self._optuna_trial(ask_id)
        if trial is not None:
            for key, value in self.budget.violations(costs).items():
                trial.set_constraint(key, value)
            for metric, value in costs.items():
                trial.set_user_attr(metric, value)

    def _reject(self, ask_id: str, costs: dict[str, float], why: str) -> None:
        trial = self._optuna_trial(ask_id)
        if trial is not None:
            trial.set_user_attr(REJECTED, why)
        self.searcher.on_trial_complete(ask_id, result=None, error=False)  # no result, no error: PRUNED
        self.rejected += 1

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.searcher.on_trial_result(self._asked_as.get(trial_id, trial_id), result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(self._asked_as.get(trial_id, trial_id), result=result, error=error)

    def add_evaluated_point(self, *args: Any, **kwargs: Any) -> None:
        self.searcher.add_evaluated_point(*args, **kwargs)

    def get_state(self) -> dict[str, Any]:
        return {"rejected": self.rejected, "stopped": self.stopped, "_asked_as": dict(self._asked_as)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
