"""The sweep's trial callback on a real MLflow store and real checkpoint folders (no Ray runtime needed:
the callback's work happens in the driver, on files and runs)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient

from ofq_ray.checkpoint import read_checkpoint, save_checkpoint
from ofq_ray.cli import where_to_look
from ofq_ray.sweep import sweep_from_dict
from ofq_ray.sweep.lifecycle import _child_run, _error_line, close_trial, fail_trial, trial_run_name
from ofq_ray.sweep.summary import _markdown, _note, summarize
from ofq_ray.tracking import (
    MAX_TAG_VALUE_LENGTH,
    RunTracker,
    default_tracking_uri,
    download_artifacts,
    ensure_experiment,
    runs_view_url,
)

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


# --- what a user lands on in the MLflow UI after a sweep ----------------------------------------------------


def test_a_trial_run_is_named_by_its_searched_values_and_keeps_its_trial_id(tmp_path: Path) -> None:
    assert trial_run_name({"optim.lr": 3.2e-4, "quant.bits": "2/2"}, "ab12_00001") == "lr=3.2e-04 bits=2/2 [ab12_00001]"
    assert trial_run_name({"optim.weight_decay": 0.05, "quant.qkr": True}, "t") == "weight_decay=0.05 qkr=True [t]"
    # two keys ending alike keep their full names; no searched values leaves the trial id
    assert trial_run_name({"a.lr": 1.0, "b.lr": 2.0}, "t") == "a.lr=1 b.lr=2 [t]"
    assert trial_run_name({}, "t") == "t"
    assert len(trial_run_name({"optim.lr": 1e-4, "x": "y" * 500}, "t")) < 140

    context = _context(tmp_path, delete_stopped=False)
    context["shared_source"] = None
    values = {"optim.lr": 3.2e-4}
    run_id = _child_run(context, "ab12_00001", trial_run_name(values, "ab12_00001"), values)
    run = _run(context, run_id)
    assert run.info.run_name == "lr=3.2e-04 [ab12_00001]"
    assert run.data.tags["ofq.trial_id"] == "ab12_00001" and run.data.params["search.optim.lr"] == "0.00032"
    # a restarted trial finds its run by the trial id tag, whatever its name
    assert _child_run(context, "ab12_00001", "another name", values) == run_id


@dataclass
class _Result:  # what summarize reads of Tune's ResultGrid: a stand-in for Ray, the store is real MLflow
    path: str
    config: dict[str, Any]
    error: Exception | None = None


def _finished_trial(context: dict[str, Any], trial_id: str, lr: float, top1: list[float], tmp_path: Path) -> str:
    values = {"optim.lr": lr}
    run_id = _child_run(context, trial_id, trial_run_name(values, trial_id), values)
    tracker = RunTracker(context["tracking_uri"], run_id)
    for epoch, value in enumerate(top1):
        tracker.log_epoch(epoch, {"val/top1": value, "val/loss": 1.0 - value / 100})
    folder = tmp_path / f"ckpt-{trial_id}"
    save_checkpoint(str(folder), {"history": [], "marker": 0})
    tracker.log_artifact(str(folder), "checkpoints/best")
    tracker.finish("FINISHED")
    return run_id


def test_after_the_sweep_the_parent_shows_the_summary_and_the_best_trial_and_the_champion_says_why(
    tmp_path: Path,
) -> None:
    context = _context(tmp_path, delete_stopped=False, metric="val/top1", mode="max")
    context.update(shared_source=None, ranked_from_epoch=0, optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    optuna.create_study(study_name=TUNE_NAME, storage=context["optuna_storage"], direction="maximize")
    other_run = _finished_trial(context, "ab12_00000", 1e-4, [50.0, 60.0, 55.0], tmp_path)
    best_run = _finished_trial(context, "ab12_00001", 3.2e-4, [52.0, 71.5, 70.0], tmp_path)
    grid = [
        _Result(str(tmp_path / "ray" / "ab12_00000"), {"optim.lr": 1e-4}),
        _Result(str(tmp_path / "ray" / "ab12_00001"), {"optim.lr": 3.2e-4}),
    ]
    sweep, uri = context["sweep"], context["tracking_uri"]
    parent = RunTracker(uri, context["parent_run_id"])
    lines: list[str] = []
    result = summarize(sweep, grid, context, parent, lines.append)
    assert result.best is not None and result.best["run_id"] == best_run
    # checkpoints kept: the trials' artifacts (no Ray folder here), counted through the store
    stored = [p for p in Path(context["runs_dir"]).rglob("*") if p.is_file() and {other_run, best_run} & set(p.parts)]
    assert result.bytes_kept == sum(p.stat().st_size for p in stored) > 0

    run = _run(context, parent.run_id)
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("sweep lc: 2 trials (2 completed")
    assert "\n\n| trial | status | epochs | best val/top1 | optim.lr | run |\n|---|" in note
    assert f"| ab12_00001 | completed | 3 | 71.5 | 0.00032 | {best_run} |" in note
    summary_md = Path(download_artifacts(f"runs:/{parent.run_id}/summary.md", tracking_uri=uri)).read_text()
    assert summary_md.strip() == note.strip()
    # the best trial's metrics at its best epoch (1), not its last
    assert run.data.metrics["best/val/top1"] == 71.5
    assert run.data.metrics["best/val/loss"] == pytest.approx(1.0 - 0.715)
    assert run.data.metrics["best/epoch"] == 1

    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("lc", "champion")
    assert version.run_id == best_run
    for text in ("`lc`", parent.run_id, "ab12_00001", "val/top1 (max) = 71.5", "epoch 1", "`optim.lr`=0.00032"):
        assert text in version.description
    assert "`lc`" in client.get_registered_model("lc").description
    assert client.get_experiment_by_name("lc").tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_long_summary_keeps_the_best_trials_in_the_description() -> None:
    rows = [f"| t{i} | completed | 3 | {99 - i * 0.01:.2f} | {'x' * 80} |" for i in range(200)]
    markdown = _markdown("\nsweep s: 200 trials\n| trial | status |\n|---|---|\n" + "\n".join(rows) + "\nbest: t0\n")
    note = _note(markdown)
    assert len(note) <= MAX_TAG_VALUE_LENGTH and "| t0 |" in note and "| t199 |" not in note
    assert "more trials in the artifact summary.md" in note and note.rstrip().endswith("best: t0")


def test_the_cli_points_at_the_sweeps_runs_page(tmp_path: Path) -> None:
    runs = str(tmp_path / "runs")
    uri = default_tracking_uri(runs)
    experiment_id = ensure_experiment(uri, "lc", runs)
    local = where_to_look(uri, "lc", runs)
    assert f"ofq-ray ui --runs-dir {runs}\n" in local and "--tracking-uri" not in local
    assert f"http://127.0.0.1:5000/#/experiments/{experiment_id}?workflowType=machine_learning" in local
    other = default_tracking_uri(str(tmp_path / "elsewhere"))
    ensure_experiment(other, "lc", runs)
    assert f"--tracking-uri {other}" in where_to_look(other, "lc", runs)
    assert (
        runs_view_url("http://mlflow:5000/", "7") == "http://mlflow:5000/#/experiments/7?workflowType=machine_learning"
    )


def test_a_resumed_searcher_takes_the_suggestion_its_killed_driver_never_saved(tmp_path: Path) -> None:
    from ofq_ray.sweep.search import make_searcher, open_optuna_storage

    sweep = sweep_from_dict(
        {
            "name": "rs",
            "base": {"stage": "pretrain", "model": {"name": "vit_digits"}, "data": {"name": "digits"}},
            "search": {"optim.lr": {"loguniform": [1e-5, 1e-2]}},
            "tune": {"num_samples": 3, "searcher": "random", "seed": 0},
        }
    )
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(sweep, open_optuna_storage(url), "rs-study")
    first = searcher.suggest("t1")
    searcher.save(str(tmp_path / "searcher.pkl"))  # Tune's last save of the searcher...
    orphan = searcher.suggest("t2")  # ...then a suggestion the study records, and the driver is killed
    study = optuna.load_study(study_name="rs-study", storage=url)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.RUNNING] * 2

    resumed = make_searcher(sweep, open_optuna_storage(url), "rs-study")
    resumed.restore(str(tmp_path / "searcher.pkl"))
    again = resumed.suggest("t3")  # the restored Tune asks for the trial it never saw started
    assert again == orphan and again != first
    states = [t.state for t in optuna.load_study(study_name="rs-study", storage=url).trials]
    assert states == [optuna.trial.TrialState.RUNNING] * 2  # no third trial: the orphan was taken up
    # The next, fresh suggestion does not repeat the orphan's draw (the saved random state had not made it).
    fresh = resumed.suggest("t4")
    assert fresh not in (first, orphan)
    resumed.on_trial_complete("t3", {"val/top1": 50.0})
    resumed.on_trial_complete("t1", {"val/top1": 40.0})
    resumed.on_trial_complete("t4", {"val/top1": 45.0})
    final = optuna.load_study(study_name="rs-study", storage=url).trials
    assert [t.state for t in final] == [optuna.trial.TrialState.COMPLETE] * 3
    assert [t.value for t in final] == [40.0, 50.0, 45.0]
