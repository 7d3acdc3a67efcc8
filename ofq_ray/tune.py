"""Sweeps: a YAML search space -> Ray Tune with OptunaSearch (TPE / NSGA-II) and ASHA (MO-ASHA for several
objectives), trials in MLflow.

A sweep spec has a ``base`` run config whose ``stage`` is what every trial trains, a ``search`` over
dotted keys, ``tune`` settings and ``mlflow`` settings. Stages before the trial stage (the FP model,
the QAT model under a CGA search) are built from ``stages`` overrides; those that no searched key
touches run once, are cached by config fingerprint in MLflow and reused by later sweeps. The others
run inside each trial, in the trial's single MLflow run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import yaml
from ray.tune import Callback

from .config import (
    ConfigError,
    RankConfig,
    RunConfig,
    _build,
    _merge,
    _spec,
    apply_override,
    config_from_dict,
    load_yaml,
    metric_hint,
    reported_metrics,
)
from .hints import did_you_mean

SEARCHERS = ("tpe", "nsga2", "random", "grid")
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice", "grid")
STAGE_ORDER = ("pretrain", "qat", "cga")
# Run-config sections each prerequisite stage reads from the sweep's base (the rest is the trial stage's own).
SHARED_KEYS = {
    "pretrain": ("model", "data", "seed", "batch_size", "eval_batch_size", "precision", "compile"),
    "qat": ("model", "data", "seed", "batch_size", "eval_batch_size", "precision", "compile", "quant", "kd"),
}
# Keys every stage of a sweep inherits (how to run, not what to train).
RUN_KEYS = (
    "workers",
    "cpus_per_worker",
    "use_gpu",
    "runs_dir",
    "max_failures",
    "keep_checkpoints",
    "track_oscillation",
)
TRIAL_CPU = 0.01  # the Tune trial only drives a TorchTrainer; its workers hold the real resources


@dataclass
class TuneSettings:
    num_samples: int = field(default=8, metadata=_spec(low=1))
    metric: Any = RankConfig.metric  # a name, or a list of names for a multi-objective search
    mode: Any = RankConfig.mode  # "max"/"min", or a list matching metric
    searcher: str = field(default="auto", metadata=_spec(choices=("auto", *SEARCHERS)))
    scheduler: Any = field(default_factory=lambda: {"asha": {"grace_period": 1, "reduction_factor": 3}})
    max_concurrent_trials: int = field(default=2, metadata=_spec(low=1))
    workers_per_trial: int = field(default=1, metadata=_spec(low=1))
    resources_per_worker: Any = field(default_factory=lambda: {"CPU": 1})
    time_budget_s: float | None = field(default=None, metadata=_spec(low=0.0, strict=True))
    seed: int = 0
    keep_checkpoints: int = field(default=1, metadata=_spec(low=1))
    delete_stopped_checkpoints: bool = True
    # The searcher's Optuna study (an RDB URL, e.g. postgresql://... on a cluster); default: an sqlite
    # file beside the MLflow store. Its study is named after the sweep run and --resume continues it.
    optuna_storage: str | None = None

    @property
    def metrics(self) -> list[str]:
        return list(self.metric) if isinstance(self.metric, list) else [self.metric]

    @property
    def modes(self) -> list[str]:
        return list(self.mode) if isinstance(self.mode, list) else [self.mode]

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


def _with_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(base)
    for key, value in values.items():
        apply_override(data, key.split("."), value)
    return data


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
            parts = ["search", ".".join(parts[1:])]
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
    search = {str(k): _check_distribution(str(k), v) for k, v in search.items()}
    if tune_settings.searcher == "grid" and any(next(iter(d)) not in ("choice", "grid") for d in search.values()):
        raise ConfigError("tune.searcher: 'grid' needs every search key as choice/grid; allowed: tpe, nsga2, random")
    sweep = Sweep(str(name), base, search, tune_settings, mlflow_settings, stages, text)
    _check_metrics(sweep)
    for key, dist in search.items():  # every candidate value must make a valid run config
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
    for stage in plan_stages(sweep)[0]:
        stage_config(sweep, stage, {}, init_from=_PLACEHOLDER)
    return sweep


def _check_tune(settings: TuneSettings) -> None:
    metrics, modes = settings.metrics, settings.modes
    if not all(isinstance(m, str) for m in metrics) or len(metrics) != len(modes):
        raise ConfigError(
            f"tune.mode: {settings.mode!r} does not match tune.metric {settings.metric!r}; allowed: one mode per metric"
        )
    for mode in modes:
        if mode not in ("max", "min"):
            raise ConfigError(f"tune.mode: {mode!r} is not allowed; allowed: max, min")
    scheduler = settings.scheduler
    if scheduler not in (None, "none") and not (
        isinstance(scheduler, dict) and list(scheduler) == ["asha"] and isinstance(scheduler["asha"] or {}, dict)
    ):
        raise ConfigError(
            f"tune.scheduler: {scheduler!r} is not allowed; "
            "allowed: {asha: {grace_period, reduction_factor}} or none"
        )
    if isinstance(scheduler, dict):
        for key, value in (scheduler["asha"] or {}).items():
            if key not in ("grace_period", "reduction_factor"):
                raise ConfigError(f"tune.scheduler.asha.{key}: unknown key; allowed: grace_period, reduction_factor")
            low = 1 if key == "grace_period" else 1.000001
            if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
                allowed = "a number >= 1" if key == "grace_period" else "a number > 1"
                raise ConfigError(f"tune.scheduler.asha.{key}: {value!r} is not allowed; allowed: {allowed}")
    resources = settings.resources_per_worker
    if not isinstance(resources, dict) or any(
        k not in ("CPU", "GPU") or not isinstance(v, int | float) or v < 0 for k, v in resources.items()
    ):
        raise ConfigError(f"tune.resources_per_worker: {resources!r} is not allowed; allowed: {{CPU: n, GPU: m}}")
    storage = settings.optuna_storage
    if storage is not None and not (isinstance(storage, str) and "://" in storage):
        raise ConfigError(
            f"tune.optuna_storage: {storage!r} is not allowed; allowed: a database URL such as "
            "sqlite:////abs/optuna.db or postgresql://user@host/db (or null for one beside the MLflow store)"
        )
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


# --- planning ------------------------------------------------------------------------------------------


_PLACEHOLDER = "runs:/earlier-stage/checkpoints/best"


def _base_config(base: dict[str, Any]) -> RunConfig:
    """The base as a run config; without ``init_from`` it starts from the sweep's earlier stages."""
    stage = base.get("stage", "pretrain")
    if stage != "pretrain" and base.get("init_from") is None:
        return config_from_dict({**base, "init_from": _PLACEHOLDER})
    return config_from_dict(base)


def plan_stages(sweep: Sweep) -> tuple[list[str], list[str]]:
    """(shared stages run once before the trials, stages each trial runs), in order."""
    base = _base_config(sweep.base)
    if base.stage == "pretrain" or sweep.base.get("init_from") is not None:
        return [], [base.stage]
    chain = list(STAGE_ORDER[: STAGE_ORDER.index(base.stage) + 1])
    searched = {key.split(".")[0] for key in sweep.search}
    shared: list[str] = []
    for stage in chain[:-1]:
        if searched & set(SHARED_KEYS[stage]):
            break
        shared.append(stage)
    return shared, chain[len(shared) :]


def stage_config(sweep: Sweep, stage: str, values: dict[str, Any], init_from: str | None) -> RunConfig:
    """The run config of one stage: the trial stage is ``base``; earlier ones take the shared keys of
    ``base`` plus ``stages.<stage>`` overrides. ``values`` are the trial's searched values."""
    base = _base_config(sweep.base)
    if stage == base.stage:
        data = _with_values(sweep.base, values)
    else:
        data = {k: copy.deepcopy(v) for k, v in sweep.base.items() if k in SHARED_KEYS[stage] or k in RUN_KEYS}
        shared_values = {k: v for k, v in values.items() if k.split(".")[0] in SHARED_KEYS[stage]}
        data = _with_values(data, shared_values)
        data = _merge(data, copy.deepcopy(sweep.stages.get(stage, {})))
        data["stage"] = stage
        data.pop("tracking", None)
    data["init_from"] = init_from if stage != "pretrain" else data.get("init_from")
    data.setdefault("tracking", {})
    data["tracking"] = {**data["tracking"], "uri": sweep.mlflow.tracking_uri, "register_as": None}
    data["workers"] = sweep.tune.workers_per_trial
    resources = sweep.tune.resources_per_worker
    data["use_gpu"] = bool(resources.get("GPU", 0))
    data["cpus_per_worker"] = float(resources.get("CPU", 1))
    data["keep_checkpoints"] = sweep.tune.keep_checkpoints
    if stage in plan_stages(sweep)[1]:  # a trial's stages rank by the sweep's metric; shared ones keep their own
        data["rank"] = {"metric": sweep.rank.metric, "mode": sweep.rank.mode}
    if stage != "pretrain" and init_from is None and data.get("init_from") is None:
        raise ConfigError(f"stages.{stage}: no checkpoint to start from")
    try:
        return config_from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"stages.{stage}: {error}" if stage != base.stage else str(error)) from None


def trial_config(sweep: Sweep, values: dict[str, Any]) -> RunConfig:
    base = _base_config(sweep.base)
    return stage_config(sweep, base.stage, values, init_from=base.init_from)


# --- Optuna / Tune plumbing -----------------------------------------------------------------------------


def optuna_space(search: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import optuna

    space: dict[str, Any] = {}
    for key, dist in search.items():
        ((kind, args),) = dist.items()
        if kind in ("choice", "grid"):
            space[key] = optuna.distributions.CategoricalDistribution(args)
        elif kind == "int":
            space[key] = optuna.distributions.IntDistribution(args[0], args[1])
        else:
            space[key] = optuna.distributions.FloatDistribution(args[0], args[1], log=kind == "loguniform")
    return space


def optuna_storage_url(sweep: Sweep, runs_dir: str) -> str:
    """Where the sweep's Optuna study lives: ``tune.optuna_storage`` or ``<runs_dir>/optuna.db``."""
    return sweep.tune.optuna_storage or f"sqlite:///{os.path.join(os.path.abspath(runs_dir), 'optuna.db')}"


def open_optuna_storage(url: str) -> Any:
    """An Optuna RDB storage, or a one-line ConfigError (checked before a sweep creates anything)."""
    import optuna

    try:
        return optuna.storages.RDBStorage(url)
    except Exception as error:  # unreachable server, bad URL, missing driver
        raise ConfigError(f"tune.optuna_storage: cannot open {url} ({type(error).__name__})") from None


def make_searcher(sweep: Sweep, storage: Any = None, study_name: str | None = None) -> Any:
    """OptunaSearch with the sweep's sampler; with ``storage`` (see :func:`open_optuna_storage`) its study
    is kept in that database under ``study_name`` (so optuna-dashboard can watch it and --resume
    continues it), else in memory."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    settings = sweep.tune
    kind = settings.searcher
    if kind == "auto":
        kind = "nsga2" if settings.multi_objective else "tpe"
    if kind == "grid":
        grid = {key: next(iter(dist.values())) for key, dist in sweep.search.items()}
        sampler: Any = optuna.samplers.GridSampler(grid, seed=settings.seed)
    elif kind == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=settings.seed)
    elif kind == "random":
        sampler = optuna.samplers.RandomSampler(seed=settings.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=settings.seed, multivariate=True)
    metric: Any = settings.metrics if settings.multi_objective else settings.metrics[0]
    mode: Any = settings.modes if settings.multi_objective else settings.modes[0]
    return OptunaSearch(
        space=optuna_space(sweep.search),
        metric=metric,
        mode=mode,
        sampler=sampler,
        storage=storage,
        study_name=study_name,
    )


def make_scheduler(sweep: Sweep, max_t: int) -> Any:
    scheduler = sweep.tune.scheduler
    if not isinstance(scheduler, dict):
        return None
    from ray.tune.schedulers import ASHAScheduler

    from .sweep.mo_asha import MultiObjectiveASHA

    options = scheduler["asha"] or {}
    grace_period = int(options.get("grace_period", 1))
    reduction_factor = float(options.get("reduction_factor", 3))
    # One past the last epoch: ASHA stops a trial that reaches max_t, which would kill it before it
    # logs its checkpoints and closes its MLflow run; trials end on their own instead.
    if sweep.tune.multi_objective:  # promote by non-dominated rank over every objective (MO-ASHA)
        return MultiObjectiveASHA(
            sweep.tune.metrics,
            sweep.tune.modes,
            max_t=max_t + 1,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
        )
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=sweep.tune.metrics[0],
        mode=sweep.tune.modes[0],
        max_t=max_t + 1,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
    )


def check_sweep_resources(sweep: Sweep) -> None:
    import ray

    total = ray.cluster_resources()
    resources = sweep.tune.resources_per_worker
    workers, trials = sweep.tune.workers_per_trial, sweep.tune.max_concurrent_trials
    need_cpu = trials * (TRIAL_CPU + workers * float(resources.get("CPU", 1)))
    if need_cpu > total.get("CPU", 0.0) + 1e-9:
        raise ConfigError(
            f"tune.resources_per_worker: {trials} concurrent trials x ({TRIAL_CPU} driver + {workers} workers x "
            f"{resources.get('CPU', 1)} CPU) = {need_cpu:g} CPUs, but the cluster has {total.get('CPU', 0.0):g}; "
            "lower tune.max_concurrent_trials, tune.workers_per_trial or resources_per_worker.CPU"
        )
    need_gpu = trials * workers * float(resources.get("GPU", 0))
    if need_gpu > total.get("GPU", 0.0) + 1e-9:
        raise ConfigError(
            f"tune.resources_per_worker: {trials} trials x {workers} workers x {resources.get('GPU')} GPU = "
            f"{need_gpu:g} GPUs, but the cluster has {total.get('GPU', 0.0):g}"
        )


# --- shared stages (cached) -------------------------------------------------------------------------------


def run_shared_stages(
    sweep: Sweep, stages: list[str], tracking_uri: str, runs_dir: str, log: Any = print
) -> str | None:
    """Runs (or reuses from the MLflow cache) the shared stages; returns the last one's checkpoint URI."""
    from .tracking import ensure_experiment, register_checkpoint, sanitize_model_name, search_runs
    from .train import run_training

    source: str | None = None
    previous_fp = ""
    for stage in stages:
        config = stage_config(sweep, stage, {}, init_from=source)
        config = dataclasses.replace(
            config, tracking=dataclasses.replace(config.tracking, experiment=sweep.mlflow.cache_experiment)
        )
        fingerprint = _chain_fingerprint(config, previous_fp)
        ensure_experiment(tracking_uri, sweep.mlflow.cache_experiment, runs_dir)
        cached = search_runs(
            tracking_uri,
            sweep.mlflow.cache_experiment,
            f"tags.`ofq.chain_fingerprint` = '{fingerprint}' and attributes.status = 'FINISHED'",
        )
        if cached:
            run_id = cached[0]["run_id"]
            log(f"[sweep] {stage}: reusing cached run {run_id} (fingerprint {fingerprint})")
        else:
            log(f"[sweep] {stage}: training once for all trials (fingerprint {fingerprint})")
            result = run_training(
                config,
                run_name=f"{stage}-{config.model.name}-{fingerprint[:8]}",
                tags={"ofq.chain_fingerprint": fingerprint, "ofq.first_sweep": sweep.name},
            )
            run_id = result.run_id
            register_checkpoint(
                tracking_uri, run_id, "checkpoints/best", sanitize_model_name(f"ofq-{stage}-{fingerprint[:12]}")
            )
        source = f"runs:/{run_id}/checkpoints/best"
        previous_fp = fingerprint
    return source


# Settings that do not change what a stage learns (N workers train like one; init_from is the chain itself).
_NOT_TRAINING = ("tracking", "runs_dir", "max_failures", "workers", "init_from", "cpus_per_worker", "keep_checkpoints")


def _chain_fingerprint(config: RunConfig, previous: str) -> str:
    import hashlib

    return hashlib.sha256(f"{previous}|{config.fingerprint(exclude=_NOT_TRAINING)}".encode()).hexdigest()[:16]


# --- the trial ---------------------------------------------------------------------------------------------


def run_trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """One Tune trial: the per-trial stages in one MLflow child run (reused if Ray restarts the trial)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import run_training

    sweep: Sweep = context["sweep"]
    trial = ray.tune.get_context()
    trial_id = trial.get_trial_id()
    values = {k: v for k, v in params.items()}
    run_id = _child_run(context, trial_id, trial.get_trial_name(), values)
    source = context["shared_source"]
    offset = 0
    stages = context["trial_stages"]
    for index, stage in enumerate(stages):
        config = stage_config(sweep, stage, values, init_from=source)
        config = dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, experiment=sweep.experiment))
        last = index == len(stages) - 1
        prefix = "" if last else f"stages/{stage}/"
        run_training(
            config,
            run_id=run_id,
            ray_callbacks=[TuneReportCallback()],
            ray_run_name=f"{context['tune_name']}-{trial_id}-{stage}",
            epoch_offset=offset,
            finish_run=last,
            artifact_prefix=prefix,
        )
        offset += config.epochs
        source = f"runs:/{run_id}/{prefix}checkpoints/best"


def _child_run(context: dict[str, Any], trial_id: str, trial_name: str, values: dict[str, Any]) -> str:
    from .tracking import RunTracker, flatten, search_runs

    sweep: Sweep = context["sweep"]
    uri = context["tracking_uri"]
    found = search_runs(
        uri,
        sweep.experiment,
        f"tags.`ofq.trial_id` = '{trial_id}' and tags.`mlflow.parentRunId` = '{context['parent_run_id']}'",
    )
    if found:
        return str(found[0]["run_id"])
    config = stage_config(
        sweep, context["trial_stages"][-1], values, init_from=context["shared_source"] or _PLACEHOLDER
    )
    params = {f"search.{k}": str(v) for k, v in values.items()}
    params.update(flatten(config.to_dict()))
    tracker = RunTracker.create(
        uri,
        sweep.experiment,
        context["runs_dir"],
        run_name=trial_name,
        params=params,
        tags={"ofq.trial_id": trial_id, "ofq.sweep": sweep.name, "ofq.stage": config.stage},
        parent_run_id=context["parent_run_id"],
        config_yaml=config.to_yaml(),
    )
    return tracker.run_id


class ProgressPrinter(Callback):  # type: ignore[misc]
    """A compact terminal line per trial event, with the status counts (Tune's own tables are off)."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.status: dict[str, str] = {}
        self.started = time.time()

    def _line(self, text: str) -> None:
        print(f"[sweep {time.time() - self.started:6.0f}s] {text}", flush=True)

    def _counts(self) -> str:
        counts: dict[str, int] = {}
        for value in self.status.values():
            counts[value] = counts.get(value, 0) + 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.status[trial.trial_id] = "running"
        self._line(f"trial {trial.trial_id} started  {_short(trial.config)}")

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        value = result.get(self.metric, float("nan"))
        epoch = result.get("training_iteration")
        self._line(f"trial {trial.trial_id} epoch {epoch}  {self.metric} {value:.2f}  ({self._counts()})")

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.status[trial.trial_id] = "done"

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.status[trial.trial_id] = "errored"
        self._line(f"trial {trial.trial_id} ERRORED")


def trial_dirname(trial: Any) -> str:
    """Trial folders named by trial id, so results map back to MLflow runs and checkpoints."""
    return str(trial.trial_id)


def _short(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


# --- the sweep ---------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    tracking_uri: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    champion: str | None
    wall_s: float
    bytes_kept: int
    pareto: list[dict[str, Any]] = field(default_factory=list)


def _state_path(runs_dir: str, name: str) -> str:
    return os.path.join(runs_dir, "sweeps", f"{name}.json")


def run_sweep(sweep: Sweep, *, resume: bool = False, address: str | None = None, log: Any = print) -> SweepResult:
    """Runs a validated sweep end to end (or resumes the last interrupted run of the same name)."""
    from ray import tune

    from .tracking import RunTracker, ensure_experiment, flatten, resolve_tracking_uri
    from .train import dataset_info, ensure_ray

    started = time.time()
    base = _base_config(sweep.base)
    runs_dir = os.path.abspath(base.runs_dir)
    # Tune runs each trial in its own working folder: every path a trial uses must be absolute.
    sweep.base["runs_dir"] = runs_dir
    tracking_uri = resolve_tracking_uri(sweep.mlflow.tracking_uri, runs_dir)
    sweep.mlflow.tracking_uri = tracking_uri
    dataset_info(base)  # a missing dataset fails here, before anything is created
    state_file = _state_path(runs_dir, sweep.name)
    state: dict[str, Any] = {}
    if resume:
        if not os.path.isfile(state_file):
            raise ConfigError(f"--resume: no earlier run of sweep {sweep.name!r} under {runs_dir}")
        with open(state_file) as handle:
            state = json.load(handle)
    ensure_ray(address)
    check_sweep_resources(sweep)
    shared, trial_stages = plan_stages(sweep)

    storage_url = optuna_storage_url(sweep, runs_dir)
    optuna_storage = open_optuna_storage(storage_url)  # a bad URL fails here, before anything is created
    ensure_experiment(tracking_uri, sweep.experiment, runs_dir)
    if resume:
        parent = RunTracker(tracking_uri, state["parent_run_id"])
    else:
        parent = RunTracker.create(
            tracking_uri,
            sweep.experiment,
            runs_dir,
            run_name=f"sweep-{sweep.name}",
            params={**flatten({"search": sweep.search}), **flatten({"tune": dataclasses.asdict(sweep.tune)})},
            tags={
                "ofq.sweep": sweep.name,
                "ofq.kind": "sweep",
                "ofq.rank.metric": sweep.rank.metric,
                "ofq.rank.mode": sweep.rank.mode,
            },
            config_yaml=sweep.spec_text or yaml.safe_dump(sweep.base),
        )
        state = {"parent_run_id": parent.run_id, "tune_name": f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"}
        parent.set_tags({"ofq.optuna_storage": storage_url, "ofq.optuna_study": state["tune_name"]})
        os.makedirs(os.path.dirname(state_file), exist_ok=True)
        with open(state_file, "w") as handle:
            json.dump(state, handle)
    try:
        shared_source = (
            run_shared_stages(sweep, shared, tracking_uri, runs_dir, log) if shared else sweep.base.get("init_from")
        )
        parent.set_tags({"ofq.shared_source": shared_source or "", "ofq.trial_stages": ",".join(trial_stages)})
        context = {
            "sweep": sweep,
            "tracking_uri": tracking_uri,
            "runs_dir": runs_dir,
            "parent_run_id": parent.run_id,
            "shared_source": shared_source,
            "trial_stages": trial_stages,
            "tune_name": state["tune_name"],
        }
        epochs = [stage_config(sweep, s, {}, init_from=shared_source or _PLACEHOLDER).epochs for s in trial_stages]
        max_t = sum(epochs)
        context["total_epochs"] = max_t
        # Only the last stage's epochs can be a trial's checkpoints/best (and so its champion candidate).
        context["ranked_from_epoch"] = max_t - epochs[-1]
        parent.set_tags({"ofq.rank.from_epoch": str(max_t - epochs[-1])})
        # Save the experiment state often, so a killed driver loses little (resume picks it up).
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
        trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"cpu": TRIAL_CPU})
        storage = os.path.join(runs_dir, "tune")
        path = os.path.join(storage, state["tune_name"])
        if resume and tune.Tuner.can_restore(path):
            log(f"[sweep] resuming {path}")
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=make_searcher(sweep, optuna_storage, state["tune_name"]),
                    scheduler=make_scheduler(sweep, max_t),
                    num_samples=sweep.tune.num_samples,
                    max_concurrent_trials=sweep.tune.max_concurrent_trials,
                    time_budget_s=sweep.tune.time_budget_s,
                    trial_dirname_creator=trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=state["tune_name"],
                    storage_path=storage,
                    verbose=0,
                    callbacks=[ProgressPrinter(sweep.tune.metrics[0])],
                    checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
                ),
            )
        grid = tuner.fit()
        result = _finish(sweep, grid, context, parent, log)
    except BaseException:
        parent.finish("FAILED")
        raise
    result.wall_s = time.time() - started
    parent.set_tags({"ofq.wall_s": f"{result.wall_s:.0f}", "ofq.bytes_kept": str(result.bytes_kept)})
    parent.finish("FINISHED")
    return result


def _finish(sweep: Sweep, grid: Any, context: dict[str, Any], parent: Any, log: Any) -> SweepResult:
    """Closes stopped trials' runs, frees their checkpoints, registers the champion, logs the summary."""
    from .tracking import RunTracker, register_checkpoint, sanitize_model_name, search_runs

    uri, runs_dir = context["tracking_uri"], context["runs_dir"]
    rank = sweep.rank
    metric = rank.metric
    children = {
        run["tags"].get("ofq.trial_id"): run
        for run in search_runs(uri, sweep.experiment, f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    }
    # MLflow is the record: a trial whose function returned closed its run as FINISHED; one that ASHA
    # (or the time budget) stopped is still RUNNING. Tune's own counters restart when a trial resumes.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    trials = []
    for result in grid:
        trial_id = os.path.basename(result.path)  # see trial_dirname
        child = children.get(trial_id)
        errored = result.error is not None
        history = sorted(client.get_metric_history(child["run_id"], metric), key=lambda m: m.step) if child else []
        last_stage = [m for m in history if m.step >= context["ranked_from_epoch"]]
        best_point = rank.best(last_stage, lambda m: m.value)  # the epoch its checkpoints/best holds
        best_value = best_point.value if best_point is not None else None
        if errored:
            status = "errored"
        elif child is not None and child["status"] == "FINISHED":
            status = "completed"
        elif child is not None and len({m.step for m in history}) >= context["total_epochs"]:
            # Trained every epoch, but the scheduler stopped it on its last report (an ASHA rung can fall
            # on the last epoch) before it logged its checkpoints: finish it here from its Ray storage.
            status = "completed" if _finish_in_driver(child["run_id"], uri, runs_dir, context, trial_id) else "stopped"
        else:
            status = "stopped"
        if child is not None and status == "stopped":
            tracker = RunTracker(uri, child["run_id"])
            tracker.set_tags({"ofq.stopped_by": "scheduler"})
            tracker.finish("KILLED")
        if status == "stopped" and sweep.tune.delete_stopped_checkpoints:
            for folder in _trial_checkpoint_dirs(runs_dir, context["tune_name"], trial_id):
                shutil.rmtree(folder, ignore_errors=True)
        trials.append(
            {
                "trial_id": trial_id,
                "status": status,
                "epochs": len({m.step for m in history}),
                "best": best_value,
                "best_epoch": best_point.step if best_point is not None else None,
                # the first objective at its best epoch (the checkpoint kept), the others as last reported
                "objectives": {
                    m: best_value if m == metric else (child["metrics"].get(m) if child else None)
                    for m in sweep.tune.metrics
                },
                "config": dict(result.config or {}),
                "run_id": child["run_id"] if child else None,
            }
        )
    completed = [t for t in trials if t["status"] == "completed" and t["best"] is not None and t["run_id"]]
    # Ties (RankConfig.best takes the first): the earlier best epoch, then the earlier started run, as in best_trial.
    started = {run["run_id"]: run["start_time"] for run in children.values()}
    completed.sort(key=lambda t: (t["best_epoch"], started[t["run_id"]]))
    best = rank.best(completed, lambda t: t["best"])
    champion = None
    if best is not None and sweep.mlflow.register:
        name = sanitize_model_name(sweep.name)
        tags = {
            "ofq.sweep": sweep.name,
            "ofq.rank": f"{metric} {rank.mode}",
            f"ofq.best_{rank.slug}": _fmt(best["best"]),
            "ofq.best_epoch": str(best["best_epoch"]),
        }
        version = register_checkpoint(uri, best["run_id"], "checkpoints/best", name, tags=tags)
        champion = f"models:/{name}@champion"
        parent.set_tags({"ofq.champion": f"{champion} (version {version})"})
        log(
            f"[sweep] champion: trial {best['trial_id']} {metric} {best['best']:.4g} (epoch {best['best_epoch']}) "
            f"-> {champion} (version {version})"
        )
    pareto = _pareto_front(trials, sweep) if sweep.tune.multi_objective else []
    bytes_kept = _bytes_kept(runs_dir, context["tune_name"], sweep.experiment)
    result = SweepResult(sweep.name, parent.run_id, uri, trials, best, champion, 0.0, bytes_kept, pareto)
    _log_summary(sweep, result, parent, log)
    return result


def _finish_in_driver(run_id: str, uri: str, runs_dir: str, context: dict[str, Any], trial_id: str) -> bool:
    """Logs the best kept checkpoint (by the sweep's ranking) of a fully trained trial's last stage and
    closes its run."""
    from .checkpoint import CheckpointError, read_checkpoint
    from .tracking import RunTracker

    rank: RankConfig = context["sweep"].rank

    stage_dir = os.path.join(runs_dir, "ray", f"{context['tune_name']}-{trial_id}-{context['trial_stages'][-1]}")
    candidates = []
    for folder in sorted(os.listdir(stage_dir)) if os.path.isdir(stage_dir) else []:
        path = os.path.join(stage_dir, folder)
        if folder.startswith("checkpoint_") and os.path.isdir(path):
            try:
                history = read_checkpoint(path)["history"]
            except CheckpointError:
                continue
            candidates.append((history[-1], path))
    best = rank.best(sorted(candidates, key=lambda c: c[0].get("epoch", 0.0)), lambda c: c[0].get(rank.metric))
    if best is None:
        return False
    tracker = RunTracker(uri, run_id)
    tracker.log_artifact(best[1], "checkpoints/best")
    stage = context["trial_stages"][-1]
    tracker.set_tags(
        {
            "ofq.finished_by": "sweep driver",
            f"ofq.{stage}.best_{rank.slug}": _fmt(best[0].get(rank.metric)),
            f"ofq.{stage}.best_epoch": str(int(best[0].get("epoch", -1))),
            f"ofq.{stage}.rank": f"{rank.metric} {rank.mode}",
        }
    )
    tracker.finish("FINISHED")
    return True


def _trial_checkpoint_dirs(runs_dir: str, tune_name: str, trial_id: str) -> list[str]:
    root = os.path.join(runs_dir, "ray")
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, d) for d in os.listdir(root) if d.startswith(f"{tune_name}-{trial_id}-")]


def _folder_bytes(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files if os.path.isfile(os.path.join(folder, f)))
    return total


def _bytes_kept(runs_dir: str, tune_name: str, experiment: str) -> int:
    root = os.path.join(runs_dir, "ray")
    ray_bytes = sum(
        _folder_bytes(os.path.join(root, d))
        for d in (os.listdir(root) if os.path.isdir(root) else [])
        if d.startswith(f"{tune_name}-")
    )
    return ray_bytes + _folder_bytes(os.path.join(runs_dir, "mlartifacts", experiment))


def _pareto_front(trials: list[dict[str, Any]], sweep: Sweep) -> list[dict[str, Any]]:
    """Non-dominated trials. Stopped trials count too: their size is exact and their accuracy a lower
    bound, so a small model that ASHA stopped can still be on the front (marked by its status)."""
    points = [t for t in trials if t["status"] != "errored" and all(v is not None for v in t["objectives"].values())]
    signs = [1 if mode == "max" else -1 for mode in sweep.tune.modes]

    def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
        pairs = [
            (s * a["objectives"][m], s * b["objectives"][m]) for m, s in zip(sweep.tune.metrics, signs, strict=True)
        ]
        return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)

    return [p for p in points if not any(dominates(q, p) for q in points if q is not p)]


def _log_summary(sweep: Sweep, result: SweepResult, parent: Any, log: Any) -> None:
    import tempfile

    metric = sweep.tune.metrics[0]
    lines = [
        f"| trial | status | epochs | best {metric} | " + " | ".join(sweep.search) + " | run |",
        "|" + "---|" * (5 + len(sweep.search)),
    ]
    for t in sorted(
        result.trials,
        key=lambda t: -(t["best"] or -math.inf) if sweep.tune.modes[0] == "max" else (t["best"] or math.inf),
    ):
        params = " | ".join(_fmt(t["config"].get(k)) for k in sweep.search)
        best = "-" if t["best"] is None else f"{t['best']:.2f}"
        lines.append(f"| {t['trial_id']} | {t['status']} | {t['epochs']} | {best} | {params} | {t['run_id'] or '-'} |")
    table = "\n".join(lines)
    counts = {s: sum(t["status"] == s for t in result.trials) for s in ("completed", "stopped", "errored")}
    summary = (
        f"\nsweep {sweep.name}: {len(result.trials)} trials ({counts['completed']} completed, "
        f"{counts['stopped']} stopped by the scheduler, {counts['errored']} errored); "
        f"checkpoints kept: {result.bytes_kept / 2**20:.1f} MiB\n{table}\n"
    )
    if result.best:
        top = result.best
        summary += f"\nbest: trial {top['trial_id']} {metric} {top['best']:.2f}  {_short(top['config'])}\n"
        summary += f"      MLflow run {result.best['run_id']}  model {result.champion or '-'}\n"
    if result.pareto:
        summary += (
            "pareto front: "
            + "; ".join(
                ", ".join(f"{m}={_fmt(p['objectives'][m])}" for m in sweep.tune.metrics)
                + f" ({p['trial_id']}, {p['status']})"
                for p in result.pareto
            )
            + "\n"
        )
    log(summary)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "summary.md"), "w") as handle:
            handle.write(summary)
        with open(os.path.join(tmp, "trials.json"), "w") as handle:
            json.dump(result.trials, handle, indent=2, default=str)
        for path in _plots(sweep, result, tmp).values():
            parent.log_artifact(path, "plots")
        parent.log_artifact(os.path.join(tmp, "summary.md"))
        parent.log_artifact(os.path.join(tmp, "trials.json"))
    parent.set_tags(
        {
            "ofq.best_trial": result.best["trial_id"] if result.best else "",
            f"ofq.best_{metric}": _fmt(result.best["best"]) if result.best else "",
        }
    )


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plots(sweep: Sweep, result: SweepResult, folder: str) -> dict[str, str]:
    """Optuna's history / importance / Pareto plots, from a study rebuilt out of the finished trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    space = optuna_space(sweep.search)
    directions: list[Any] = ["maximize" if m == "max" else "minimize" for m in sweep.tune.modes]
    study = optuna.create_study(directions=directions)
    for trial in result.trials:
        values = [trial["objectives"].get(m) for m in sweep.tune.metrics]
        params = {k: trial["config"].get(k) for k in sweep.search}
        usable = trial["status"] == "completed" or (sweep.tune.multi_objective and trial["status"] == "stopped")
        if not usable or any(v is None for v in values) or any(v is None for v in params.values()):
            continue
        study.add_trial(optuna.trial.create_trial(params=params, distributions=space, values=values))
    plots: dict[str, str] = {}
    if len(study.trials) < 2:
        return plots
    makers: dict[str, Any] = {}
    if sweep.tune.multi_objective:
        makers["pareto_front"] = lambda: ovm.plot_pareto_front(study, target_names=sweep.tune.metrics)
    else:
        makers["history"] = lambda: ovm.plot_optimization_history(study)
        if len(space) > 1:
            makers["param_importances"] = lambda: ovm.plot_param_importances(study)
    for name, make in makers.items():
        try:
            axes = make()
            figure = axes.figure if hasattr(axes, "figure") else plt.gcf()
            path = os.path.join(folder, f"{name}.png")
            figure.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(figure)
            plots[name] = path
        except (ValueError, RuntimeError) as error:  # e.g. importances need variance in the results
            print(f"[sweep] plot {name} skipped: {error}")
    return plots


# --- after the sweep ---------------------------------------------------------------------------------------


def best_trial(name: str, tracking_uri: str, metric: str | None = None, mode: str | None = None) -> dict[str, Any]:
    """The best finished trial of the latest sweep named ``name`` (for ``ofq-ray best``).

    ``metric``/``mode`` default to the sweep's own ranking (its ``tune.metric``/``tune.mode``, which
    also chose each trial's checkpoint and the champion); ``val/top1``/``max`` for sweeps that predate it.
    """
    from .tracking import resolve_alias, sanitize_model_name, search_runs

    parents = search_runs(tracking_uri, name, "tags.`ofq.kind` = 'sweep'", order_by=["attributes.start_time DESC"])
    if not parents:
        raise ConfigError(f"sweep: no sweep named {name!r} in {tracking_uri}")
    parent = parents[0]
    tags = parent["tags"]
    own = RankConfig(tags.get("ofq.rank.metric", RankConfig.metric), tags.get("ofq.rank.mode", RankConfig.mode))
    metric = metric or own.metric
    rank = RankConfig(metric, mode or (own.mode if metric == own.metric else "max"))
    children = search_runs(tracking_uri, name, f"tags.`mlflow.parentRunId` = '{parent['run_id']}'")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    # Rank by each trial's best epoch of its last stage (its registered checkpoint), as the sweep does when it
    # picks the champion.
    first = int(tags.get("ofq.rank.from_epoch", 0))
    peak: dict[str, Any] = {}
    for child in children:
        if child["status"] == "FINISHED" and metric in child["metrics"]:
            history = sorted(client.get_metric_history(child["run_id"], metric), key=lambda m: m.step)
            point = rank.best([m for m in history if m.step >= first], lambda m: m.value)
            if point is not None:
                peak[child["run_id"]] = point
    # Ties as in the champion's choice (_finish): the earlier best epoch, then the earlier started run.
    candidates = sorted(
        (c for c in children if c["run_id"] in peak), key=lambda c: (peak[c["run_id"]].step, c["start_time"])
    )
    best = rank.best(candidates, lambda c: peak[c["run_id"]].value)
    if best is None:
        logged = sorted({m for c in children for m in c["metrics"]})
        hint = "" if metric in logged else f"; logged: {', '.join(logged) or 'nothing'}{metric_hint(metric, logged)}"
        raise ConfigError(f"sweep: {name!r} has no finished trial with metric {metric!r}{hint}")
    out = {
        "sweep": name,
        "parent_run_id": parent["run_id"],
        "trial_id": best["tags"].get("ofq.trial_id"),
        "run_id": best["run_id"],
        "rank": f"{rank.metric} {rank.mode}",
        f"best_{metric}": peak[best["run_id"]].value,
        "best_epoch": peak[best["run_id"]].step,
        "metrics": best["metrics"],
        "params": {k[len("search.") :]: v for k, v in best["params"].items() if k.startswith("search.")},
        "checkpoint_uri": f"runs:/{best['run_id']}/checkpoints/best",
        "trials": len(children),
    }
    try:
        alias = resolve_alias(tracking_uri, sanitize_model_name(name))
        out["champion"] = (
            f"models:/{sanitize_model_name(name)}@champion (version {alias['version']}, run {alias['run_id']})"
        )
    except ValueError:
        out["champion"] = None
    return out
