"""The sweep's trial callback on a real MLflow store and real checkpoint folders (no Ray runtime needed:
the callback's work happens in the driver, on files and runs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from ofq_ray.checkpoint import read_checkpoint, save_checkpoint
from ofq_ray.sweep import sweep_from_dict
from ofq_ray.sweep.lifecycle import _error_line, close_trial, fail_trial
from ofq_ray.tracking import RunTracker, default_tracking_uri, download_artifacts, ensure_experiment

TUNE_NAME = "lc-20260101-000000"


def _context(tmp_path: Path, *, delete_stopped: bool, metric: str = "val/loss", mode: str = "min") -> dict[str, Any]:
    runs = tmp_path / "runs"
    sweep = sweep_from_dict(
        {
            "name": "lc",
            "base": {
                "stage": "qat",
                "init_from": str(tmp_path / "fp.pt"),  # a file path: the trial runs qat only
                "model": {"name": "vit_digits"},
                "data": {"name": "digits"},
                "epochs": 3,
                "runs_dir": str(runs),
            },
            "search": {"optim.lr": {"loguniform": [1e-5, 1e-3]}},
            "tune": {"metric": metric, "mode": mode, "delete_stopped_checkpoints": delete_stopped},
        }
    )
    uri = default_tracking_uri(str(runs))
    ensure_experiment(uri, "lc", str(runs))
    parent = RunTracker.create(uri, "lc", str(runs), run_name="sweep-lc", params={}, tags={"ofq.kind": "sweep"})
    return {
        "sweep": sweep,
        "tracking_uri": uri,
        "runs_dir": str(runs),
        "parent_run_id": parent.run_id,
        "tune_name": TUNE_NAME,
        "trial_stages": ["qat"],
        "total_epochs": 3,
    }


def _trial(context: dict[str, Any], trial_id: str, losses: list[float]) -> str:
    """A trial's child run and the Ray checkpoint folders of its epochs (one per loss)."""
    run = RunTracker.create(
        context["tracking_uri"],
        "lc",
        context["runs_dir"],
        run_name=trial_id,
        params={},
        tags={"ofq.trial_id": trial_id},
        parent_run_id=context["parent_run_id"],
    )
    stage_dir = Path(context["runs_dir"]) / "ray" / f"{TUNE_NAME}-{trial_id}-qat"
    history: list[dict[str, float]] = []
    for epoch, loss in enumerate(losses):
        history.append({"epoch": float(epoch), "val/loss": loss, "val/top1": 50.0 + epoch})
        save_checkpoint(str(stage_dir / f"checkpoint_{epoch:06d}"), {"history": list(history), "marker": epoch})
    return run.run_id


def _run(context: dict[str, Any], run_id: str) -> Any:
    return MlflowClient(context["tracking_uri"]).get_run(run_id)


def _logged_best_epoch(context: dict[str, Any], run_id: str, tmp_path: Path) -> int:
    local = download_artifacts(
        f"runs:/{run_id}/checkpoints/best", str(tmp_path / run_id), tracking_uri=context["tracking_uri"]
    )
    return int(read_checkpoint(local)["marker"])


def test_a_trial_stopped_before_its_last_epoch_is_killed_with_the_epoch_it_reached(tmp_path: Path) -> None:
    context = _context(tmp_path, delete_stopped=False)
    run_id = _trial(context, "t1", [0.9, 0.5])
    assert close_trial(context, "t1", {"epoch": 1.0, "done": True}) == "KILLED"
    run = _run(context, run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["ofq.stopped_by"] == "scheduler"
    assert run.data.tags["ofq.stopped_at_epoch"] == "2"
    # kept checkpoints stay reachable from MLflow: the best by the sweep's own ranking (val/loss, min)
    assert _logged_best_epoch(context, run_id, tmp_path) == 1
    assert run.data.tags["ofq.qat.best_epoch"] == "1"


def test_with_delete_stopped_checkpoints_a_killed_trial_logs_no_checkpoint(tmp_path: Path) -> None:
    context = _context(tmp_path, delete_stopped=True)
    run_id = _trial(context, "t1", [0.9])
    assert close_trial(context, "t1", {"epoch": 0.0}) == "KILLED"
    assert MlflowClient(context["tracking_uri"]).list_artifacts(run_id, "checkpoints") == []


def test_a_trial_stopped_on_its_last_epoch_is_finished_with_its_best_checkpoint_by_the_ranking(
    tmp_path: Path,
) -> None:
    context = _context(tmp_path, delete_stopped=True)
    run_id = _trial(context, "t2", [0.7, 0.4, 0.6])  # val/top1 rises every epoch; val/loss is lowest at epoch 1
    assert close_trial(context, "t2", {"epoch": 2.0, "done": True}) == "FINISHED"
    run = _run(context, run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ofq.finished_by"] == "sweep driver"
    assert _logged_best_epoch(context, run_id, tmp_path) == 1
    assert run.data.tags["ofq.qat.best_val_loss"] == "0.4"

    maxed = _context(tmp_path / "max", delete_stopped=True, metric="val/top1", mode="max")
    run_id = _trial(maxed, "t2", [0.7, 0.4, 0.6])
    assert close_trial(maxed, "t2", {"epoch": 2.0}) == "FINISHED"
    assert _logged_best_epoch(maxed, run_id, tmp_path / "max") == 2


def test_a_run_the_trial_closed_itself_is_left_as_it_is(tmp_path: Path) -> None:
    context = _context(tmp_path, delete_stopped=False)
    run_id = _trial(context, "t3", [0.5])
    RunTracker(context["tracking_uri"], run_id).finish("FINISHED")
    assert close_trial(context, "t3", {"epoch": 0.0}) == "FINISHED"
    run = _run(context, run_id)
    assert "ofq.stopped_by" not in run.data.tags and "ofq.finished_by" not in run.data.tags
    assert close_trial(context, "never-started", {"epoch": 0.0}) is None


def test_an_errored_trial_is_failed_with_the_exception_line(tmp_path: Path) -> None:
    context = _context(tmp_path, delete_stopped=False)
    run_id = _trial(context, "t4", [0.5])
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback (most recent call last):\n  File 'x', line 1\nRuntimeError: worker lost\n\n")

    class Trial:  # what Tune hands the callback: the error file's path
        trial_id = "t4"

    trial = Trial()
    trial.error_file = str(error_file)  # type: ignore[attr-defined]
    fail_trial(context, "t4", _error_line(trial))
    run = _run(context, run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["ofq.error"] == "RuntimeError: worker lost"
    os.remove(error_file)
    assert _error_line(trial).startswith("unknown error")
