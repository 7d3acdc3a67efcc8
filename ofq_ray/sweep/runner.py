"""Runs a sweep: shared stages, then the trials under Ray Tune, then the summary; ``--resume`` picks up an
interrupted sweep of the same name."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import yaml

from ..config import ConfigError
from .budget import Budget, check_feasible
from .lifecycle import ProgressPrinter, TrialLifecycle, run_trial, trial_dirname
from .search import make_scheduler, make_searcher, open_optuna_storage, optuna_storage_url
from .spec import Sweep
from .stages import _base_config, plan_stages, run_shared_stages, stage_config, trial_config
from .summary import SweepResult, summarize

TRIAL_CPU = 0.01  # the Tune trial only drives a TorchTrainer; its workers hold the real resources


def check_sweep_resources(sweep: Sweep) -> None:
    """Fails with one line when ``tune.max_concurrent_trials`` trials, each a driver and its workers,
    cannot fit the Ray cluster (every resource of ``tune.resources_per_worker``, custom ones included)."""
    from ..train import check_resources

    config = trial_config(sweep, {})  # every stage of a trial runs with the same workers and resources
    check_resources(config, sweep.tune.max_concurrent_trials, TRIAL_CPU, key="tune.resources_per_worker")


# --- the sweep ---------------------------------------------------------------------------------------------


def _state_path(runs_dir: str, name: str) -> str:
    return os.path.join(runs_dir, "sweeps", f"{name}.json")


def run_sweep(sweep: Sweep, *, resume: bool = False, address: str | None = None, log: Any = print) -> SweepResult:
    """Runs a validated sweep end to end (or resumes the last interrupted run of the same name)."""
    from ray import tune

    from ..tracking import RunTracker, ensure_experiment, flatten, resolve_tracking_uri
    from ..train import dataset_info, ensure_ray

    started = time.time()
    base = _base_config(sweep.base)
    runs_dir = os.path.abspath(base.runs_dir)
    # Tune runs each trial in its own working folder: every path a trial uses must be absolute.
    sweep.base["runs_dir"] = runs_dir
    tracking_uri = resolve_tracking_uri(sweep.mlflow.tracking_uri, runs_dir)
    sweep.mlflow.tracking_uri = tracking_uri
    info = dataset_info(base)  # a missing dataset fails here, before anything is created
    budget = None
    if sweep.tune.constraints:  # costs on the real data's classes and channels; a budget none can meet fails here
        budget = Budget(sweep, info.num_classes, info.in_chans)
        check_feasible(sweep, budget)
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
            params={
                **flatten({"search": sweep.search}),
                **{f"search.{key}.match": glob for key, glob in sweep.layer_groups.items()},
                **flatten({"tune": dataclasses.asdict(sweep.tune)}),
            },
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
            "optuna_storage": storage_url,
        }
        epochs = [stage_config(sweep, s, {}, init_from=shared_source).epochs for s in trial_stages]
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
                    search_alg=make_searcher(sweep, optuna_storage, state["tune_name"], budget, log),
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
                    callbacks=[TrialLifecycle(context), ProgressPrinter(sweep.tune.metrics[0])],
                    checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
                ),
            )
        grid = tuner.fit()
        # When the trials ended: every run a trial event closed (TrialLifecycle) ended before this.
        parent.set_tags({"ofq.trials_ended_ms": str(int(time.time() * 1000))})
        result = summarize(sweep, grid, context, parent, log)
    except BaseException:
        parent.finish("FAILED")
        raise
    result.wall_s = time.time() - started
    parent.set_tags({"ofq.wall_s": f"{result.wall_s:.0f}", "ofq.bytes_kept": str(result.bytes_kept)})
    parent.finish("FINISHED")
    return result
