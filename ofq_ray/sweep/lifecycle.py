"""A trial from start to end: the trial function (its stages in one MLflow child run) and the driver-side
Tune callbacks that own that run's status while the sweep runs."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from ray.tune import Callback

from ..config import RankConfig
from .cluster import in_process_trials
from .spec import Sweep
from .stages import stage_config
from .summary import _short

# --- the trial ---------------------------------------------------------------------------------------------


def run_trial(params: dict[str, Any], context: dict[str, Any]) -> None:
    """One Tune trial: the per-trial stages in one MLflow child run (reused if Ray restarts the trial)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..train import run_training

    sweep: Sweep = context["sweep"]
    trial = ray.tune.get_context()
    trial_id = trial.get_trial_id()
    values = {k: v for k, v in params.items()}
    run_id = _child_run(context, trial_id, trial_run_name(values, trial_id), values)
    _note_node(context["tracking_uri"], run_id)
    source = context["shared_source"]
    offset = 0
    stages = context["trial_stages"]
    in_process = in_process_trials(sweep)
    for index, stage in enumerate(stages):
        config = stage_config(sweep, stage, values, init_from=source)
        config = dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, experiment=sweep.experiment))
        last = index == len(stages) - 1
        prefix = "" if last else f"stages/{stage}/"
        run_training(
            config,
            run_id=run_id,
            in_process=in_process,
            ray_callbacks=None if in_process else [TuneReportCallback()],
            ray_run_name=f"{context['tune_name']}-{trial_id}-{stage}",
            epoch_offset=offset,
            finish_run=last,
            artifact_prefix=prefix,
        )
        offset += config.epochs
        source = f"runs:/{run_id}/{prefix}checkpoints/best"


def _note_node(uri: str, run_id: str) -> None:
    """Appends the Ray node this trial (re)starts on to its run's ``ofq.trial_nodes`` (comma-separated node
    ids, in order: a trial restarted after losing its node names both). With a worker group per trial it
    is the node of the process that drives the group; the workers go wherever their resources are."""
    import ray

    from ..tracking import RunTracker

    tracker = RunTracker(uri, run_id)
    node = ray.get_runtime_context().get_node_id()
    before = tracker.info()["tags"].get("ofq.trial_nodes", "")
    tracker.set_tags({"ofq.trial_nodes": f"{before},{node}" if before else node})


def trial_run_name(values: dict[str, Any], trial_id: str, limit: int = 120) -> str:
    """A child run's name in the MLflow UI: its searched values, short (``lr=3.2e-04 bits=2/2``), then its
    trial id, which keeps it unique (Tune's own ``run_trial_<id>`` says nothing in a runs table). A key is
    shortened to its last part (``optim.lr`` -> ``lr``) unless two searched keys end alike."""
    ends = [key.rsplit(".", 1)[-1] for key in values]
    parts = []
    for key, end in zip(values, ends, strict=True):
        value = values[key]
        if isinstance(value, float) and value != 0 and not 1e-2 <= abs(value) < 1e4:
            text = f"{value:.1e}"
        elif isinstance(value, float):
            text = f"{value:.3g}"
        else:
            text = str(value)
        parts.append(f"{end if ends.count(end) == 1 else key}={text}")
    shown = " ".join(parts)
    if len(shown) > limit:
        shown = shown[: limit - 3].rstrip() + "..."
    return f"{shown} [{trial_id}]" if shown else trial_id


def _child_run(context: dict[str, Any], trial_id: str, run_name: str, values: dict[str, Any]) -> str:
    from ..tracking import RunTracker, flatten

    sweep: Sweep = context["sweep"]
    uri = context["tracking_uri"]
    found = _trial_run(context, trial_id)  # a restarted trial keeps its run
    if found is not None:
        return str(found["run_id"])
    config = stage_config(sweep, context["trial_stages"][-1], values, init_from=context["shared_source"])
    params = {f"search.{k}": str(v) for k, v in values.items()}
    params.update(flatten(config.to_dict()))
    tracker = RunTracker.create(
        uri,
        sweep.experiment,
        context["runs_dir"],
        run_name=run_name,
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


# --- the trial's end, as it happens -------------------------------------------------------------------------


class TrialLifecycle(Callback):  # type: ignore[misc]
    """Closes each trial's MLflow child run in the driver the moment Tune ends the trial, so the MLflow UI is
    right while the sweep runs:

    - ``FINISHED`` when it trained every epoch. The trial function closes its own run when it returns; a
      trial that the scheduler stopped on its last report (an ASHA rung can fall on the last epoch) is
      closed here, with its best kept checkpoint by the sweep's ranking logged as ``checkpoints/best``.
    - ``KILLED`` when the scheduler stopped it earlier: tags ``ofq.stopped_by`` and
      ``ofq.stopped_at_epoch`` (the epochs the scheduler saw; its workers may log one more before they
      go). Its best kept checkpoint of the last stage is logged too unless ``tune.delete_stopped_checkpoints``
      (the sweep deletes those checkpoints at its end).
    - ``FAILED`` when it errored after its retries: tag ``ofq.error`` with the error's last line.

    Trials still running when the sweep ends (its time budget) are closed by the summary.
    """

    def __init__(self, context: dict[str, Any]) -> None:
        self.context = context
        self.started: dict[str, float] = {}
        self.epoch_s: dict[str, dict[float, float]] = {}  # per trial: epoch -> its training + evaluation time

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = time.time()

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        if "time/epoch_s" in result:  # an epoch repeated after a restart counts once (its last try)
            self.epoch_s.setdefault(trial.trial_id, {})[result.get("epoch", -1.0)] = float(result["time/epoch_s"])

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        close_trial(self.context, trial.trial_id, dict(trial.last_result or {}), self._timing(trial.trial_id))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        fail_trial(self.context, trial.trial_id, _error_line(trial))

    def _timing(self, trial_id: str) -> dict[str, str]:
        """Where the trial's wall time went: ``ofq.overhead_s`` is what Ray, the workers' start and the
        trial's stage hand-overs cost on top of training and evaluating (a resumed sweep times what it ran)."""
        if trial_id not in self.started:
            return {}
        wall = time.time() - self.started[trial_id]
        working = sum(self.epoch_s.get(trial_id, {}).values())
        return {
            "ofq.trial_wall_s": f"{wall:.2f}",
            "ofq.train_eval_s": f"{working:.2f}",
            "ofq.overhead_s": f"{wall - working:.2f}",
        }


def _trial_run(context: dict[str, Any], trial_id: str) -> dict[str, Any] | None:
    from ..tracking import search_runs

    found = search_runs(
        context["tracking_uri"],
        context["sweep"].experiment,
        f"tags.`ofq.trial_id` = '{trial_id}' and tags.`mlflow.parentRunId` = '{context['parent_run_id']}'",
    )
    return found[0] if found else None


def close_trial(
    context: dict[str, Any], trial_id: str, last_result: dict[str, Any], tags: dict[str, str] | None = None
) -> str | None:
    """Closes an ended trial's run (see :class:`TrialLifecycle`), adding ``tags``; returns the status it
    has, or None when the trial never opened one."""
    from ..tracking import RunTracker

    run = _trial_run(context, trial_id)
    if run is None:
        return None
    tracker = RunTracker(context["tracking_uri"], run["run_id"])
    if tags:
        tracker.set_tags(tags)
    if run["status"] != "RUNNING":  # the trial function finished it (or an earlier event closed it)
        return str(run["status"])
    sweep: Sweep = context["sweep"]
    epochs = int(last_result.get("epoch", -1)) + 1
    best = best_kept_checkpoint(context, trial_id)
    stage = context["trial_stages"][-1]
    rank = sweep.rank
    if epochs >= context["total_epochs"] and best is not None:
        tracker.log_artifact(best[1], "checkpoints/best")
        tracker.set_tags({"ofq.finished_by": "sweep driver", **rank.stage_tags(stage, best[0])})
        tracker.finish("FINISHED")
        return "FINISHED"
    tags = {"ofq.stopped_by": "scheduler", "ofq.stopped_at_epoch": str(max(epochs, 0))}
    if best is not None and not sweep.tune.delete_stopped_checkpoints:
        tracker.log_artifact(best[1], "checkpoints/best")
        tags.update(rank.stage_tags(stage, best[0]))
    tracker.set_tags(tags)
    tracker.finish("KILLED")
    return "KILLED"


def fail_trial(context: dict[str, Any], trial_id: str, error: str) -> None:
    from ..tracking import RunTracker

    run = _trial_run(context, trial_id)
    if run is None:
        return
    tracker = RunTracker(context["tracking_uri"], run["run_id"])
    tracker.set_tags({"ofq.error": error})
    if run["status"] != "FAILED":
        tracker.finish("FAILED")


def _error_line(trial: Any) -> str:
    """The exception line of a trial's error (the last line of its traceback)."""
    try:
        path = trial.error_file
        with open(path) as handle:
            lines = [line.strip() for line in handle.read().splitlines() if line.strip()]
        return lines[-1][:500] if lines else "unknown error"
    except (OSError, TypeError):
        return "unknown error (no error file)"


def best_kept_checkpoint(context: dict[str, Any], trial_id: str) -> tuple[dict[str, float], str] | None:
    """The trial's best checkpoint of its last stage that Ray still keeps, by the sweep's ranking:
    (that epoch's metrics, folder)."""
    from ..train import kept_checkpoints

    rank: RankConfig = context["sweep"].rank
    stage_dir = os.path.join(
        context["runs_dir"], "ray", f"{context['tune_name']}-{trial_id}-{context['trial_stages'][-1]}"
    )
    candidates = [(metrics, path) for path, metrics in kept_checkpoints(stage_dir)]
    candidates.sort(key=lambda c: c[0].get("epoch", 0.0))
    return rank.best(candidates, lambda c: c[0].get(rank.metric))
