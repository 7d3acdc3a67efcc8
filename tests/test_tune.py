"""Sweeps end to end on a real `ray start --head` cluster, a real MLflow store and real (digits) data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from raynodes import RayNodes

from ofq_ray.checkpoint import load_model, read_checkpoint
from ofq_ray.cost import run_cost
from ofq_ray.data import build_datasets, build_loader
from ofq_ray.engine import evaluate
from ofq_ray.sweep import best_trial, load_sweep, run_sweep
from ofq_ray.sweep.mo_asha import MultiObjectiveASHA
from ofq_ray.sweep.search import make_scheduler
from ofq_ray.sweep.stages import trial_config
from ofq_ray.tracking import default_tracking_uri, download_artifacts, resolve_alias, search_runs

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """A private `ray start --head --block` cluster on 127.0.0.1 with 4 CPUs."""
    nodes = RayNodes(head_cpus=4)
    nodes.connect()
    try:
        yield {"address": nodes.address, "dashboard": nodes.dashboard}
    finally:
        nodes.stop()


def _spec(runs: Path, name: str, **tune: Any) -> dict[str, Any]:
    return {
        "name": name,
        "base": {
            "stage": "qat",
            "model": {"name": "vit_digits"},
            "data": {"name": "digits", "augment": False},
            "quant": {"weight_bits": 4, "act_bits": 4},
            "epochs": 3,
            "batch_size": 64,
            "eval_batch_size": 300,
            "runs_dir": str(runs),
        },
        "stages": {"pretrain": {"epochs": 6, "optim": {"lr": 3.0e-3, "warmup_epochs": 1}}},
        "search": {"optim.lr": {"loguniform": [1.0e-6, 3.0e-3]}},
        "tune": {
            "num_samples": 6,
            "max_concurrent_trials": 2,
            "resources_per_worker": {"CPU": 1},
            "seed": 0,
            "scheduler": {"asha": {"grace_period": 1, "reduction_factor": 2}},
            **tune,
        },
        "mlflow": {"experiment": name},
    }


def _write(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def _children(uri: str, experiment: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    parents = search_runs(uri, experiment, "tags.`ofq.kind` = 'sweep'")
    assert len(parents) == 1
    children = search_runs(uri, experiment, f"tags.`mlflow.parentRunId` = '{parents[0]['run_id']}'")
    return parents[0], children


@pytest.fixture(scope="module")
def smoke(cluster: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    # A relative runs folder, as in the shipped specs: Tune moves each trial into its own working folder,
    # so the sweep must hand trials absolute paths. ASHA with rf 3 has a rung on the last epoch (3).
    home = tmp_path_factory.mktemp("sweep")
    spec = _spec(Path("runs"), "smoke", scheduler={"asha": {"grace_period": 1, "reduction_factor": 3}})
    previous = os.getcwd()
    os.chdir(home)
    try:
        sweep = load_sweep(str(_write(home / "smoke.yaml", spec)))
        yield run_sweep(sweep, address=cluster["address"]), home / "runs"
    finally:
        os.chdir(previous)


def test_smoke_sweep_one_parent_one_child_per_trial_asha_and_champion(smoke: tuple[Any, Path]) -> None:
    result, runs = smoke
    uri = default_tracking_uri(str(runs))
    statuses = [t["status"] for t in result.trials]
    assert len(result.trials) == 6 and "errored" not in statuses
    assert statuses.count("stopped") >= 1  # ASHA cut some trials short
    parent, children = _children(uri, "smoke")
    assert parent["status"] == "FINISHED"
    assert len(children) == 6
    assert len({c["tags"]["ofq.trial_id"] for c in children}) == 6
    by_status = {c["status"] for c in children}
    assert by_status <= {"FINISHED", "KILLED"} and "KILLED" in by_status  # stopped trials are closed as KILLED
    # ... by the sweep's trial callback when the scheduler stopped them, before the trials ended (not after).
    trials_ended = int(parent["tags"]["ofq.trials_ended_ms"])
    for child in children:
        if child["status"] == "KILLED":
            assert child["tags"]["ofq.stopped_by"] == "scheduler"
            assert child["end_time"] < trials_ended
            epochs = len(MlflowClient(uri).get_metric_history(child["run_id"], "val/top1"))
            # the scheduler saw fewer than all 3 epochs; its workers may have logged one more before they went
            assert 1 <= int(child["tags"]["ofq.stopped_at_epoch"]) <= min(epochs, 2)
    # Every child holds contiguous per-epoch metrics.
    client = MlflowClient(uri)
    for child in children:
        steps = sorted(m.step for m in client.get_metric_history(child["run_id"], "val/top1"))
        assert steps == list(range(len(steps))) and steps
    # The champion alias points at the best finished trial and reloads to its logged accuracy.
    finished = [c for c in children if c["status"] == "FINISHED"]
    best_value = max(max(m.value for m in client.get_metric_history(c["run_id"], "val/top1")) for c in finished)
    alias = resolve_alias(uri, "smoke")
    assert alias["run_id"] == result.best["run_id"]
    champion_best = max(m.value for m in client.get_metric_history(alias["run_id"], "val/top1"))
    assert champion_best == pytest.approx(best_value)
    model = load_model("models:/smoke@champion", tracking_uri=uri)
    _, val_set, info = build_datasets("digits", None, 16, seed=0)
    accuracy = evaluate(
        model, build_loader(val_set, info, batch_size=300, train=False), device=model.head.weight.device
    )
    assert accuracy["val/top1"] == pytest.approx(champion_best, abs=1e-6)
    # Stopped trials' checkpoints are gone; the summary says what is kept.
    for trial in result.trials:
        folders = [d for d in os.listdir(runs / "ray") if f"-{trial['trial_id']}-" in d]
        assert (folders == []) == (trial["status"] == "stopped"), trial
    assert result.bytes_kept > 0
    artifacts = {a.path for a in client.list_artifacts(parent["run_id"])}
    assert {"summary.md", "trials.json"} <= artifacts
    # Ray's overhead per trial: its wall time (Tune's start to end events) minus its epochs' training and
    # evaluation (time/epoch_s, from the workers), on each run and, as a median, in the summary.
    for child in children:
        tags = child["tags"]
        epoch_s = sum(m.value for m in client.get_metric_history(child["run_id"], "time/epoch_s"))
        assert 0 < float(tags["ofq.train_eval_s"]) <= epoch_s + 0.01
        assert float(tags["ofq.trial_wall_s"]) == pytest.approx(
            float(tags["ofq.train_eval_s"]) + float(tags["ofq.overhead_s"]), abs=0.02
        )
        assert float(tags["ofq.overhead_s"]) > 0 and float(tags["ofq.worker_setup_s.qat"]) > 0
    overheads = sorted(float(c["tags"]["ofq.overhead_s"]) for c in children)
    median = (overheads[2] + overheads[3]) / 2
    assert float(parent["tags"]["ofq.overhead_s_median"]) == pytest.approx(median, abs=0.01)
    summary = Path(download_artifacts(f"runs:/{parent['run_id']}/summary.md", tracking_uri=uri)).read_text()
    assert f"Ray overhead per trial (wall time outside training and evaluation): median {median:.1f} s" in summary


def test_shared_stage_is_trained_once_and_reused_by_the_next_sweep(
    smoke: tuple[Any, Path], cluster: dict[str, str]
) -> None:
    _, runs = smoke
    uri = default_tracking_uri(str(runs))
    cached = search_runs(uri, "ofq-ray-stages", "tags.`ofq.chain_fingerprint` != ''")
    assert len(cached) == 1 and cached[0]["tags"]["ofq.stage"] == "pretrain"
    # The second sweep is also the multi-objective one: accuracy vs bytes over the attention and MLP widths
    # (searched layer groups), under MO-ASHA, within a size budget that only 4 of their 9 pairs meet.
    spec = _spec(
        runs,
        "smoke-again",
        num_samples=3,
        metric=["val/top1", "model/size_bytes"],
        mode=["max", "min"],
        scheduler={"asha": {"grace_period": 1, "reduction_factor": 2}},
    )
    widths = ["2/2", "4/4", "8/8"]
    spec["search"]["quant.layers"] = {"groups": {"attn": "blocks.*.attn", "mlp": "blocks.*.mlp"}, "choice": widths}
    free = load_sweep(str(_write(runs / "again.yaml", spec)))
    sizes = {
        (a, m): run_cost(trial_config(free, {"quant.layers.attn": a, "quant.layers.mlp": m}), num_classes=10)[
            "model/size_bytes"
        ]
        for a in widths
        for m in widths
    }
    budget = sizes["4/4", "4/4"]
    assert sum(size <= budget for size in sizes.values()) == 4
    spec["tune"]["constraints"] = {"model/size_bytes": {"max": budget}}
    again = load_sweep(str(_write(runs / "again.yaml", spec)))
    assert isinstance(make_scheduler(again, 3), MultiObjectiveASHA)
    result = run_sweep(again, address=cluster["address"])
    assert len(search_runs(uri, "ofq-ray-stages", "tags.`ofq.chain_fingerprint` != ''")) == 1
    # Over-budget configurations were rejected before training: no trained trial is over budget, each shows
    # its group widths as MLflow params, and the rejections are counted (summary, parent tag, Optuna study).
    parent, children = _children(uri, "smoke-again")
    for child in children:
        pair = (child["params"]["search.quant.layers.attn"], child["params"]["search.quant.layers.mlp"])
        assert child["metrics"]["model/size_bytes"] == sizes[pair] <= budget
    assert result.rejected >= 1 and parent["tags"]["ofq.rejected_over_budget"] == str(result.rejected)
    study = optuna.load_study(
        study_name=parent["tags"]["ofq.optuna_study"], storage=parent["tags"]["ofq.optuna_storage"]
    )
    rejected = [t for t in study.trials if "ofq.rejected" in t.user_attrs]
    assert len(rejected) == result.rejected and all(t.state == optuna.trial.TrialState.PRUNED for t in rejected)
    assert all(sizes[t.params["quant.layers.attn"], t.params["quant.layers.mlp"]] > budget for t in rejected)
    summary = Path(download_artifacts(f"runs:/{parent['run_id']}/summary.md", tracking_uri=uri)).read_text()
    assert f"{result.rejected} configurations over budget rejected before training" in summary
    assert "| quant.layers.attn | quant.layers.mlp | model/size_bytes |" in summary
    # MO-ASHA never stops the first trial of the smallest size at a rung: no trial recorded before it is
    # smaller, so it is non-dominated and an extreme of its front. It trains every epoch.
    client = MlflowClient(uri)
    _, children = _children(uri, "smoke-again")
    assert len(children) == 3
    smallest = min(c["metrics"]["model/size_bytes"] for c in children)
    histories = {
        c["run_id"]: client.get_metric_history(c["run_id"], "val/top1")
        for c in children
        if c["metrics"]["model/size_bytes"] == smallest
    }
    first = min(histories, key=lambda run_id: min(m.timestamp for m in histories[run_id] if m.step == 0))
    assert sorted(m.step for m in histories[first]) == [0, 1, 2]


def test_a_sweep_ranked_by_val_loss_registers_the_trial_and_the_epoch_with_the_lowest_loss(
    smoke: tuple[Any, Path], cluster: dict[str, str]
) -> None:
    # In smoke's store, so the shared FP stage comes from the cache; no ASHA: every trial finishes.
    _, runs = smoke
    uri = default_tracking_uri(str(runs))
    spec = _spec(runs, "rank-loss", num_samples=3, scheduler="none", metric="val/loss", mode="min")
    spec["base"]["epochs"] = 2
    result = run_sweep(load_sweep(str(_write(runs / "rank-loss.yaml", spec))), address=cluster["address"])
    _, children = _children(uri, "rank-loss")
    assert len(children) == 3 and all(c["status"] == "FINISHED" for c in children)
    client = MlflowClient(uri)
    lowest = {  # each trial's lowest val/loss point (the earliest epoch on a tie), from MLflow's histories
        c["run_id"]: min(client.get_metric_history(c["run_id"], "val/loss"), key=lambda m: (m.value, m.step))
        for c in children
    }
    champion = min(lowest, key=lambda run_id: lowest[run_id].value)
    alias = resolve_alias(uri, "rank-loss")
    assert alias["run_id"] == champion == result.best["run_id"]
    assert alias["tags"]["ofq.rank"] == "val/loss min"
    registered = read_checkpoint(download_artifacts("models:/rank-loss@champion", tracking_uri=uri))
    assert registered["history"][-1]["epoch"] == lowest[champion].step  # that trial's lowest-loss epoch
    assert registered["history"][-1]["val/loss"] == pytest.approx(lowest[champion].value)
    best = best_trial("rank-loss", uri)  # `ofq-ray best` ranks by the sweep's own metric by default
    assert (best["run_id"], best["rank"], best["best_epoch"]) == (champion, "val/loss min", lowest[champion].step)


def test_resume_after_killing_the_driver_finishes_exactly_num_samples(
    smoke: tuple[Any, Path], cluster: dict[str, str], tmp_path: Path
) -> None:
    _, runs = smoke  # in smoke's store: the shared FP stage comes from its cache
    raw = _spec(runs, "resume", num_samples=4, scheduler="none")
    raw["base"]["epochs"] = 2
    spec = _write(tmp_path / "resume.yaml", raw)
    uri = default_tracking_uri(str(runs))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    command = [sys.executable, "-m", "ofq_ray.cli", "tune", str(spec), "--address", cluster["address"]]
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    started: dict[str, str] = {}
    while time.time() < deadline and driver.poll() is None:
        time.sleep(2)
        try:
            _, children = _children(uri, "resume")
        except Exception:  # experiment or parent not there yet
            continue
        reported = [c for c in children if "val/top1" in c["metrics"]]
        if len(reported) >= 2:
            started = {c["tags"]["ofq.trial_id"]: c["run_id"] for c in children}
            break
    assert started, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, children = _children(uri, "resume")
    assert len(children) == 4
    assert len({c["tags"]["ofq.trial_id"] for c in children}) == 4
    assert len({c["params"]["search.optim.lr"] for c in children}) == 4  # no configuration ran twice
    for trial_id, run_id in started.items():  # trials that had started kept their MLflow run
        assert [c["run_id"] for c in children if c["tags"]["ofq.trial_id"] == trial_id] == [run_id]
    assert all(c["status"] == "FINISHED" for c in children), [
        (c["tags"]["ofq.trial_id"], c["status"], sorted(c["metrics"])) for c in children
    ]
    # The searcher's study lives in Optuna storage beside the MLflow store; the resumed driver continued
    # it: every trial told once, none left running.
    parent, _ = _children(uri, "resume")
    assert parent["tags"]["ofq.optuna_storage"] == f"sqlite:///{runs / 'optuna.db'}"
    study = optuna.load_study(
        study_name=parent["tags"]["ofq.optuna_study"], storage=parent["tags"]["ofq.optuna_storage"]
    )
    states = [trial.state for trial in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 4, states
    assert sorted(t.params["optim.lr"] for t in study.trials) == sorted(
        float(c["params"]["search.optim.lr"]) for c in children
    )


BAD_SWEEPS = [
    ({"search": {"optim.lrr": {"loguniform": [1e-4, 1e-3]}}}, "optim.lrr: unknown key"),
    ({"search": {"optim.lr": {"logunif": [1e-4, 1e-3]}}}, "distribution 'logunif' is not allowed"),
    ({"search": {"optim.lr": {"loguniform": [1e-3, 1e-4]}}}, "low < high"),
    ({"search": {"quant.bits": {"choice": ["2/2", "9/9"]}}}, "quant.weight_bits: 9 is not allowed"),
    ({"tune": {"max_concurrent_trials": 8, "resources_per_worker": {"CPU": 2}}}, "tune.resources_per_worker:"),
    ({"base": {"data": {"name": "fashion_mnist", "root": "/nonexistent"}}}, "data.root:"),
    ({"tuen": {}}, "tuen: unknown key"),
]


def _bad_spec(tmp_path: Path, change: dict[str, Any]) -> Path:
    spec = _spec(tmp_path, "bad")
    for key, value in change.items():
        spec[key] = {**spec[key], **value} if isinstance(spec.get(key), dict) and key != "search" else value
    return _write(tmp_path / "bad.yaml", spec)


@pytest.mark.parametrize(("change", "message"), BAD_SWEEPS)
def test_bad_sweep_input_is_one_line_exit_2_and_creates_nothing(
    cluster: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any], message: str
) -> None:
    # In this process (connected to the cluster), through the CLI's own entry point.
    from ofq_ray.cli import main

    assert main(["tune", str(_bad_spec(tmp_path, change)), "--address", cluster["address"]]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ofq-ray: error: ") and message in lines[0], lines
    assert not (tmp_path / "mlflow.db").exists()


def test_a_bad_sweep_from_the_shell_prints_only_its_one_line(cluster: dict[str, str], tmp_path: Path) -> None:
    # A fresh process that connects to the cluster before it finds the mistake: Ray's own start-up
    # output must not bury the one line either.
    change, message = BAD_SWEEPS[4]
    spec = _bad_spec(tmp_path, change)
    done = subprocess.run(
        [sys.executable, "-m", "ofq_ray.cli", "tune", str(spec), "--address", cluster["address"]],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ofq-ray: error: ") and message in lines[0], done.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_best_cli_names_the_champion(smoke: tuple[Any, Path]) -> None:
    result, runs = smoke
    done = subprocess.run(
        [sys.executable, "-m", "ofq_ray.cli", "best", "smoke", "--runs-dir", str(runs)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    best = json.loads(done.stdout)
    assert best["run_id"] == result.best["run_id"]
    assert best["champion"].startswith("models:/smoke@champion")


def test_the_ui_shows_the_sweep_in_a_browser(smoke: tuple[Any, Path]) -> None:
    # `ofq-ray ui` on the real sweep's store, in headless Chromium: the runs page with the parent and its six
    # trials, the parent's summary and plots, the champion alias (tests/browser.py; screenshots kept).
    from browser import check_sweep_ui, ui_server

    _, runs = smoke
    with ui_server(runs) as (url, _):
        check_sweep_ui(url, "smoke", "smoke", REPO / "test-output" / "test_tune")
