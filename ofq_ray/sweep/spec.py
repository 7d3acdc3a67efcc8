"""The sweep spec: a YAML search space over run-config keys, ``tune`` and ``mlflow`` settings, read and
validated in full before anything runs (one-line :class:`ConfigError` on any mistake).

A spec has a ``base`` run config whose ``stage`` is what every trial trains, a ``search`` over dotted
keys, ``tune`` settings, ``mlflow`` settings and ``stages`` overrides for the earlier stages of the chain
(see :mod:`ofq_ray.sweep.stages`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..config import (
    ConfigError,
    RankConfig,
    _build,
    _spec,
    apply_override,
    load_yaml,
    metric_hint,
    reported_metrics,
)
from ..hints import did_you_mean
from .budget import Bounds, Budget, check_constraints, check_feasible, class_count
from .groups import FORMS as GROUP_FORMS
from .groups import KEY as GROUP_KEY
from .groups import layer_groups as layer_groups_of
from .stages import SHARED_KEYS, _base_config, plan_stages, stage_config, trial_config

SEARCHERS = ("tpe", "nsga2", "random", "grid")
GROUP_FORM_KEYS = (*GROUP_FORMS, "choice")
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice", "grid")


@dataclass
class AshaSettings:
    """ASHA's rungs, in epochs (Ray's ASHAScheduler; MO-ASHA for several objectives)."""

    grace_period: int = field(default=1, metadata=_spec(low=1))
    reduction_factor: float = field(default=3.0, metadata=_spec(low=1.0, strict=True))


@dataclass
class SchedulerSettings:
    """``tune.scheduler``: ``{asha: {...}}`` (``scheduler: none`` is no scheduler: every trial trains in full)."""

    asha: AshaSettings = field(default_factory=AshaSettings)


@dataclass
class TuneSettings:
    num_samples: int = field(default=8, metadata=_spec(low=1))
    # a name, or a list of names for a multi-objective search; each mode "max"/"min", one per metric
    metric: str | list[str] = RankConfig.metric
    mode: str | list[str] = field(default=RankConfig.mode, metadata=_spec(choices=("max", "min")))
    searcher: str = field(default="auto", metadata=_spec(choices=("auto", *SEARCHERS)))
    scheduler: SchedulerSettings | None = field(default_factory=SchedulerSettings)
    max_concurrent_trials: int = field(default=2, metadata=_spec(low=1))
    workers_per_trial: int = field(default=1, metadata=_spec(low=1))
    # Ray resources of each worker: CPU, GPU and custom ones ({CPU: 1, node_a: 0.1}, see RunConfig.resources)
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0}, metadata=_spec(low=0.0))
    time_budget_s: float | None = field(default=None, metadata=_spec(low=0.0, strict=True))
    # How long the sweep waits while its live nodes cannot fit one trial (a node lost mid-sweep and not
    # back); then it stops with one line and exit 1. A node that rejoins in time is used again.
    wait_for_nodes_s: float = field(default=600.0, metadata=_spec(low=0.0))
    seed: int = 0
    keep_checkpoints: int = field(default=1, metadata=_spec(low=1))
    delete_stopped_checkpoints: bool = True
    # The searcher's Optuna study (an RDB URL, e.g. postgresql://... on a cluster); default: an sqlite
    # file beside the MLflow store. Its study is named after the sweep run and --resume continues it.
    optuna_storage: str | None = None
    # Budgets on the costs known before training: {model/size_bytes: {max: N}, model/bitops: {max: N, min: M}}.
    # A configuration over budget is rejected before it trains (see ofq_ray.sweep.budget).
    constraints: dict[str, Bounds] = field(default_factory=dict)
    # The most over-budget configurations the searcher may draw in a row for one trial; then the search ends.
    max_rejections: int = field(default=100, metadata=_spec(low=1))

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def modes(self) -> list[str]:
        return [self.mode] if isinstance(self.mode, str) else list(self.mode)

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1


@dataclass
class MlflowSettings:
    tracking_uri: str | None = None
    experiment: str | None = None  # default: the sweep's name
    cache_experiment: str = "ofq-ray-stages"  # where shared stages are cached across sweeps
    register: bool = True  # register the best trial's model as <name>@champion


@dataclass
class Sweep:
    name: str
    base: dict[str, Any]
    search: dict[str, dict[str, Any]]
    tune: TuneSettings
    mlflow: MlflowSettings
    stages: dict[str, dict[str, Any]]
    spec_text: str = ""
    # Searched layer groups (search.quant.layers, see .groups): search key quant.layers.<group> -> glob.
    layer_groups: dict[str, str] = field(default_factory=dict)

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or self.name

    @property
    def rank(self) -> RankConfig:
        """What ranks every trial's epochs and the trials themselves: the first objective."""
        return RankConfig(self.tune.metrics[0], self.tune.modes[0])


# --- parsing and validation ----------------------------------------------------------------------------


def _check_distribution(key: str, dist: Any) -> dict[str, Any]:
    if not isinstance(dist, dict) or len(dist) != 1:
        raise ConfigError(f"search.{key}: {dist!r} is not allowed; allowed: one of {{{', '.join(DISTRIBUTIONS)}: ...}}")
    ((kind, args),) = dist.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(
            f"search.{key}: distribution {kind!r} is not allowed; allowed: {', '.join(DISTRIBUTIONS)}"
            f"{did_you_mean(str(kind), DISTRIBUTIONS)}"
        )
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"search.{key}.{kind}: {args!r} is not allowed; allowed: a non-empty list of values")
        return {kind: args}
    if (
        not isinstance(args, list)
        or len(args) != 2
        or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)
        or not args[0] < args[1]
    ):
        raise ConfigError(f"search.{key}.{kind}: {args!r} is not allowed; allowed: [low, high] with low < high")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"search.{key}.loguniform: {args!r} is not allowed; allowed: [low, high] with 0 < low < high")
    if kind == "int" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"search.{key}.int: {args!r} is not allowed; allowed: two integers [low, high]")
    return {kind: [float(a) for a in args] if kind != "int" else args}


def _candidate_values(dist: dict[str, Any]) -> list[Any]:
    ((_kind, args),) = dist.items()
    return list(args)  # choices, or the two bounds


def load_sweep(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Reads and fully validates a sweep spec (one-line :class:`ConfigError` on any mistake)."""
    if not os.path.isfile(path):
        raise ConfigError(f"spec: {path} does not exist")
    with open(path) as handle:
        text = handle.read()
    try:
        raw = load_yaml(text) or {}
    except yaml.YAMLError:
        raise ConfigError(f"spec: {path} is not valid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"spec: {path} must hold a mapping")
    for item in overrides:
        key, equals, value = item.partition("=")
        if not equals:
            raise ConfigError(f"--set: {item!r} is not allowed; allowed: KEY=VALUE, e.g. tune.num_samples=4")
        parts = key.strip().split(".")
        if parts[0] == "search" and len(parts) > 2:  # search keys are dotted config keys themselves
            key_parts = parts[1:]
            if key_parts[:2] == GROUP_KEY.split(".") and len(key_parts) > 2 and key_parts[2] in GROUP_FORM_KEYS:
                parts = ["search", GROUP_KEY, *key_parts[2:]]  # inside the layer-group form
            else:
                parts = ["search", ".".join(key_parts)]
        try:
            parsed = load_yaml(value) if value.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set: {item!r} is not allowed; the value is not valid YAML") from None
        apply_override(raw, parts, parsed)
    allowed = ["name", "description", "base", "search", "tune", "mlflow", "stages"]
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{key}: unknown key; allowed: {', '.join(allowed)}{did_you_mean(str(key), allowed)}")
    return sweep_from_dict(raw, text)


def sweep_from_dict(raw: dict[str, Any], text: str = "") -> Sweep:
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("name: a sweep needs a name; allowed: a non-empty string")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError("base: allowed: a run config mapping")
    if "rank" in base:
        raise ConfigError("base.rank: a sweep ranks by tune.metric and tune.mode; allowed: nothing (set tune.metric)")
    base_config = _base_config(base)  # validates the base on its own
    if base_config.stage == "pretrain" and raw.get("stages"):
        raise ConfigError("stages: a pretrain sweep has no earlier stages; allowed: nothing")
    tune_settings: TuneSettings = _build(TuneSettings, raw.get("tune") or {}, "tune.")
    _check_tune(tune_settings)
    mlflow_settings: MlflowSettings = _build(MlflowSettings, raw.get("mlflow") or {}, "mlflow.")
    stages = raw.get("stages") or {}
    if not isinstance(stages, dict) or any(s not in SHARED_KEYS for s in stages):
        bad = [s for s in stages if s not in SHARED_KEYS] if isinstance(stages, dict) else [stages]
        raise ConfigError(f"stages.{bad[0]}: unknown stage; allowed: pretrain, qat")
    search = raw.get("search") or {}
    if not isinstance(search, dict) or not search:
        raise ConfigError("search: allowed: a mapping of dotted config keys to distributions")
    layer_groups: dict[str, str] = {}
    checked: dict[str, dict[str, Any]] = {}
    for key, value in search.items():
        if str(key) == GROUP_KEY:
            group_search, layer_groups = layer_groups_of(value, base_config)
            checked.update(group_search)
        else:
            checked[str(key)] = _check_distribution(str(key), value)
    search = checked
    if tune_settings.searcher == "grid" and any(next(iter(d)) not in ("choice", "grid") for d in search.values()):
        raise ConfigError("tune.searcher: 'grid' needs every search key as choice/grid; allowed: tpe, nsga2, random")
    sweep = Sweep(str(name), base, search, tune_settings, mlflow_settings, stages, text, layer_groups)
    _check_metrics(sweep)
    if layer_groups:  # the groups' rules, checked at their first widths in one run config
        first = {key: _candidate_values(search[key])[0] for key in layer_groups}
        try:
            trial_config(sweep, first)
        except ConfigError as error:
            raise ConfigError(f"search.{GROUP_KEY}: {first!r} gives an invalid run: {error}") from None
    for key, dist in search.items():  # every candidate value must make a valid run config
        if key in layer_groups:
            continue
        for value in _candidate_values(dist):
            if key.split(".")[0] in ("stage", "init_from", "runs_dir", "tracking", "rank"):
                raise ConfigError(
                    f"search.{key}: this key cannot be searched; "
                    "allowed: model, data, quant, optim, kd, cga, epochs, ..."
                )
            try:
                trial_config(sweep, {key: value})
            except ConfigError as error:
                raise ConfigError(f"search.{key}: {value!r} gives an invalid run: {error}") from None
    for stage in plan_stages(sweep)[0]:  # each starts from the one before, once that one has trained
        stage_config(sweep, stage, {}, init_from=None)
    classes = class_count(base)
    if tune_settings.constraints and classes is not None:  # else the runner checks, once it knows the data
        check_feasible(sweep, Budget(sweep, classes))
    return sweep


def _check_tune(settings: TuneSettings) -> None:
    """What the settings' types cannot say (:func:`_build` checked those)."""
    if len(settings.metrics) != len(settings.modes):
        raise ConfigError(
            f"tune.mode: {settings.mode!r} does not match tune.metric {settings.metric!r}; allowed: one mode per metric"
        )
    storage = settings.optuna_storage
    if storage is not None and "://" not in storage:
        raise ConfigError(
            f"tune.optuna_storage: {storage!r} is not allowed; allowed: a database URL such as "
            "sqlite:////abs/optuna.db or postgresql://user@host/db (or null for one beside the MLflow store)"
        )
    check_constraints(settings.constraints)
    if settings.searcher == "nsga2" and not settings.multi_objective:
        raise ConfigError("tune.searcher: 'nsga2' needs several metrics; allowed: tpe, random, grid for one metric")


def _check_metrics(sweep: Sweep) -> None:
    """Every tune.metric must be one that each stage a trial runs reports (Ray's strict metric check
    would fail the trial only after the shared stages trained)."""
    base = _base_config(sweep.base)
    _, trial_stages = plan_stages(sweep)
    per_stage = [
        reported_metrics(stage, bool(sweep.stages.get(stage, {}).get("track_oscillation", base.track_oscillation)))
        for stage in trial_stages
    ]
    allowed = [m for m in per_stage[0] if all(m in names for names in per_stage)]
    for metric in sweep.tune.metrics:
        if metric not in allowed:
            raise ConfigError(
                f"tune.metric: {metric!r} is not reported by a {' + '.join(trial_stages)} trial; "
                f"allowed: {', '.join(allowed)}{metric_hint(metric, allowed)}"
            )
