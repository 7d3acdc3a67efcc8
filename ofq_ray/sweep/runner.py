"""Runs a sweep: shared stages, then the trials under Ray Tune, then the summary; ``--resume`` picks up an
interrupted sweep of the same name."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import yaml

from ..config import ConfigError
from ..errors import ClusterError
from .budget import Budget, check_feasible
from .cluster import (
    ClusterWatch,
    check_sweep_resources,
    in_process_trials,
    trial_bundles,
    trial_resources,
)
from .lifecycle import ProgressPrinter, TrialLifecycle, run_trial, trial_dirname
from .search import make_scheduler, make_searcher, open_optuna_storage, optuna_storage_url
from .spec import Sweep
from .stages import _base_config, absolute_paths, plan_stages, run_shared_stages, stage_config, trial_config
from .summary import SweepResult, summarize

# --- the sweep ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _working_folder(folder: str) -> Iterator[None]:
    try:
        previous: str | None = os.getcwd()
    except OSError:  # already gone
        previous = None
    os.chdir(folder)
    try:
        yield
    finally:
        if previous is not None:
            with contextlib.suppress(OSError):  # it vanished meanwhile: stay where the sweep ran
                os.chdir(previous)


def _state_path(runs_dir: str, name: str) -> str:
    return os.path.join(runs_dir, "sweeps", f"{name}.json")


def run_sweep(sweep: Sweep, *, resume: bool = False, address: str | None = None, log: Any = print) -> SweepResult:
    """Runs a validated sweep end to end (or resumes the last interrupted run of the same name).

    Once checked, it runs in its runs folder: the caller's working folder can vanish under a running
    driver (a Ray job's uploaded copy of the repo, unpacked anew by another raylet sharing the machine's
    Ray folder), and Ray Tune reads the working folder as the sweep ends. The caller's is restored after.
    """
    from ray import tune

    from ..tracking import RunTracker, ensure_experiment, flatten, resolve_tracking_uri
    from ..train import dataset_info, ensure_ray

    started = time.time()
    base = _base_config(sweep.base)
    runs_dir = os.path.abspath(base.runs_dir)
    # Tune runs each trial in its own working folder: every path a trial uses must be absolute.
    sweep.base["runs_dir"] = runs_dir
    absolute_paths(sweep)
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
    with _working_folder(runs_dir):
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
            trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), trial_resources(sweep))
            storage = os.path.join(runs_dir, "tune")
            path = os.path.join(storage, state["tune_name"])
            os.makedirs(storage, exist_ok=True)
            note = os.path.join(storage, f"{state['tune_name']}.cluster-stop")
            watch = ClusterWatch(trial_bundles(sweep), sweep.tune.wait_for_nodes_s, note=note)
            watch.forget()
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
                        stop=watch,
                        # A trial that trains in its own process is retried by Tune (from its stage's last
                        # checkpoint); a worker group retries its workers itself.
                        failure_config=tune.FailureConfig(
                            max_failures=trial_config(sweep, {}).max_failures if in_process_trials(sweep) else 0
                        ),
                    ),
                )
            grid = tuner.fit()
            # When the trials ended: every run a trial event closed (TrialLifecycle) ended before this.
            parent.set_tags({"ofq.trials_ended_ms": str(int(time.time() * 1000))})
            reason = watch.stop_reason()
            if reason:
                parent.set_tags({"ofq.stopped_by": "cluster", "ofq.error": reason})
                context["stopped_by"] = "cluster"
            result = summarize(sweep, grid, context, parent, log)
        except BaseException:
            parent.finish("FAILED")
            raise
        result.wall_s = time.time() - started
        parent.set_tags({"ofq.wall_s": f"{result.wall_s:.0f}", "ofq.bytes_kept": str(result.bytes_kept)})
        if reason:  # the summary of what did train is kept; the sweep itself did not finish
            parent.finish("FAILED")
            raise ClusterError(reason)
        parent.finish("FINISHED")
        return result
