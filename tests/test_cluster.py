"""Sweeps on a cluster of several Ray nodes on one machine (`ray start` processes, each with its own CPUs
and a custom resource), logging to one MLflow server over HTTP; and what the sweep does when it loses one."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from browser import ui_server
from mlflow.tracking import MlflowClient
from raynodes import ENV, RayNodes

from ofq_ray.checkpoint import load_model
from ofq_ray.sweep.cluster import ClusterWatch, missing_for_one_trial
from ofq_ray.tracking import default_tracking_uri, search_runs

REPO = Path(__file__).resolve().parents[1]


def test_one_trial_fits_only_when_each_bundle_finds_a_node_with_room() -> None:
    nodes = [{"CPU": 1.0, "slot": 1.0}, {"CPU": 1.0, "slot": 1.0}, {"CPU": 4.0}]
    group = [{"CPU": 0.01}, {"CPU": 0.99, "slot": 1.0}, {"CPU": 0.99, "slot": 1.0}]
    assert missing_for_one_trial(group, nodes) is None
    assert missing_for_one_trial(group, nodes[1:]) == (
        "no live node has 0.99 CPU, 1 slot left for one of a trial's 3 bundle(s)"
    )
    # a bundle cannot span nodes: two half-free nodes do not hold one 2-CPU worker
    assert missing_for_one_trial([{"CPU": 2.0}], [{"CPU": 1.0}, {"CPU": 1.0}]) is not None
    assert missing_for_one_trial([{"CPU": 1.0, "GPU": 1.0}], [{"CPU": 8.0}]) is not None


def test_the_watch_stops_the_sweep_only_after_waiting_and_a_returning_node_resets_it() -> None:
    now = [0.0]
    live = [[{"CPU": 1.0}]]
    watch = ClusterWatch([{"CPU": 1.0}], wait_s=60.0, nodes=lambda: live[0], clock=lambda: now[0], every_s=0.0)
    assert not watch.stop_all() and watch.reason is None
    live[0] = []  # the node is lost
    for t in (1.0, 30.0, 60.0):
        now[0] = t
        assert not watch.stop_all()
    live[0] = [{"CPU": 2.0}]  # a node (re)joins in time: waiting starts over
    now[0] = 62.0
    assert not watch.stop_all()
    live[0] = []
    now[0] = 70.0
    assert not watch.stop_all()
    now[0] = 130.0
    assert watch.stop_all()
    assert watch.reason is not None and "tune.wait_for_nodes_s" in watch.reason and "60 s" in watch.reason
    assert watch.stop_all()  # stays stopped
    assert not watch("trial", {})  # single trials are never stopped by it


def test_the_watch_notes_why_it_stopped_and_tunes_restored_copy_starts_afresh(tmp_path: Path) -> None:
    from ray import cloudpickle

    now, note = [0.0], tmp_path / "sweep.cluster-stop"
    watch = ClusterWatch(
        [{"CPU": 1.0}], wait_s=10.0, nodes=lambda: [], clock=lambda: now[0], every_s=0.0, note=str(note)
    )
    assert not watch.stop_all()
    now[0] = 10.0
    assert watch.stop_all() and note.read_text() == watch.reason
    # A resumed sweep: the driver's own watch is not the one Tune runs; it learns the reason from the note.
    driver = ClusterWatch([{"CPU": 1.0}], wait_s=10.0, note=str(note))
    assert driver.stop_reason() == watch.reason
    # Tune's copy, restored from the experiment state, neither stays stopped nor counts the earlier wait.
    restored = cloudpickle.loads(cloudpickle.dumps(watch))
    later = [1000.0]
    restored.nodes, restored.clock = lambda: [], lambda: later[0]
    assert restored.reason is None and not restored.stop_all()
    later[0] = 1009.0
    assert not restored.stop_all()
    later[0] = 1010.0
    assert restored.stop_all()
    driver.forget()  # what a (re)started sweep does first
    assert not note.exists() and driver.stop_reason() is None


# --- on a cluster of three nodes ------------------------------------------------------------------------
# A head with no CPUs (the job's driver runs there, no trial) and two worker nodes of one CPU each, each
# offering one `slot` and its own name as custom resources. The worker nodes share the head's Ray folder
# (one machine), as in the setup where a job's uploaded working folder was replaced under its driver.


def _spec(runs: Path, name: str, **tune: Any) -> dict[str, Any]:
    return {
        "name": name,
        "base": {
            "stage": "pretrain",
            "model": {"name": "vit_digits"},
            "data": {"name": "digits", "augment": False},
            "epochs": 1,
            "batch_size": 64,
            "eval_batch_size": 300,
            "runs_dir": str(runs),
            "optim": {"warmup_epochs": 0},
        },
        "search": {"optim.lr": {"loguniform": [3.0e-4, 3.0e-3]}},
        "tune": {"seed": 0, "scheduler": "none", **tune},
        "mlflow": {"experiment": name},
    }


@pytest.fixture(scope="module")
def nodes() -> Iterator[RayNodes]:
    cluster = RayNodes(head_cpus=0)
    cluster.connect()
    try:
        cluster.add("a", 1, {"slot": 1, "node_a": 1})
        cluster.add("b", 1, {"slot": 1, "node_b": 1})
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.integration
def test_a_job_spreads_each_trials_two_workers_over_two_nodes_and_logs_through_one_server(
    nodes: RayNodes, tmp_path: Path
) -> None:
    from ray.util.state import list_actors, list_nodes

    runs = tmp_path / "runs"
    spec = _spec(
        runs,
        "cluster",
        num_samples=1,  # one trial's worker group shows the spread; a second only repeats it (~50 s)
        max_concurrent_trials=1,
        workers_per_trial=2,
        resources_per_worker={"CPU": 0.99, "slot": 1},
    )
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(spec))
    with ui_server(tmp_path / "server", log_path=tmp_path / "server.log") as (url, _):
        env = {**ENV, "RAY_ADDRESS": nodes.dashboard, "OFQ_RUNS_DIR": str(runs), "MLFLOW_TRACKING_URI": url}
        done = subprocess.run(
            [str(REPO / "jobs" / "submit.sh"), str(tmp_path / "cluster.yaml")],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in done.stdout.lower()
        parents = search_runs(url, "cluster", "tags.`ofq.kind` = 'sweep'")
        assert len(parents) == 1 and parents[0]["status"] == "FINISHED"
        children = search_runs(url, "cluster", f"tags.`mlflow.parentRunId` = '{parents[0]['run_id']}'")
        assert [c["status"] for c in children] == ["FINISHED"]
        # everything went through the server: proxied artifacts, and no store of the job's own
        assert all(c["artifact_uri"].startswith("mlflow-artifacts:/") for c in children)
        assert not (runs / "mlflow.db").exists() and not (runs / "mlruns").exists()
        model = load_model("models:/cluster@champion", tracking_uri=url)
        assert sum(p.numel() for p in model.parameters()) > 0

    # Where the workers ran, from Ray's state API: the trial's two on two different nodes, never the head.
    names = {n.node_id: n.resources_total for n in list_nodes(address=nodes.dashboard, limit=100, detail=True)}
    workers = list_actors(
        address=nodes.dashboard, filters=[("class_name", "=", "RayTrainWorker")], limit=1000, detail=True
    )
    placed = sorted(
        next(k for k in ("node_a", "node_b", "head") if k in names.get(w.node_id, {}) or k == "head") for w in workers
    )
    assert placed == ["node_a", "node_b"], placed


def _sweep(spec: dict[str, Any], path: Path, address: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    """`ofq-ray tune` on ``spec`` in the background; its output goes to ``<path>.log`` (see :func:`_output`)."""
    path.write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "ofq_ray.cli", "tune", str(path), "--address", address]
    with open(f"{path}.log", "w") as log:
        return subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=cwd)


def _output(driver: subprocess.Popen[str], timeout: float) -> str:
    driver.wait(timeout=timeout)
    return Path(f"{driver.args[4]}.log").read_text()  # type: ignore[index]


def _wait_for_epochs(uri: str, experiment: str, epochs: int, driver: subprocess.Popen[str]) -> dict[str, Any]:
    """The first trial run that has logged ``epochs`` epochs (and so has a checkpoint to resume from)."""
    client = MlflowClient(uri)
    deadline = time.time() + 600
    while time.time() < deadline:
        assert driver.poll() is None, _output(driver, 60)[-3000:]
        known = client.get_experiment_by_name(experiment) is not None
        for run in search_runs(uri, experiment, "tags.`ofq.trial_id` != ''") if known else []:
            logged = len(client.get_metric_history(run["run_id"], "val/top1"))
            if logged >= epochs and run["tags"].get("ofq.trial_nodes"):
                return run
        time.sleep(0.5)
    raise AssertionError("no trial trained that far")


@pytest.mark.integration
def test_a_node_lost_mid_trial_restarts_the_trial_from_its_checkpoint_and_a_rejoined_node_is_used(
    nodes: RayNodes, tmp_path: Path
) -> None:
    # One worker per trial, trained in the trial's own process: 4 trials, 2 at a time, one per node (after
    # the loss: the restarted trial and two more, more than the surviving node finishes before the other is back).
    spec = _spec(
        tmp_path, "lost", num_samples=4, max_concurrent_trials=2, resources_per_worker={"CPU": 1}, wait_for_nodes_s=120
    )
    spec["base"]["epochs"] = 6  # a margin: the trial must still be training when its node goes
    uri = default_tracking_uri(str(tmp_path))
    # The driver starts in a folder that then vanishes, as a Ray job's unpacked copy of the repo can.
    (tmp_path / "start").mkdir()
    driver = _sweep(spec, tmp_path / "lost.yaml", nodes.address, cwd=tmp_path / "start")
    node_ids = {"a": nodes.node_id("node_a"), "b": nodes.node_id("node_b")}
    run = _wait_for_epochs(uri, "lost", 2, driver)  # an epoch is logged, then checkpointed: epoch 1's is there
    shutil.rmtree(tmp_path / "start")
    lost = next(name for name, node in node_ids.items() if run["tags"]["ofq.trial_nodes"] == node)
    gone = nodes.remove(lost, f"node_{lost}", wait=False)
    nodes.add(lost, 1, {"slot": 1, f"node_{lost}": 1})  # the machine comes back at once (a new node id)
    nodes.wait_dead(gone)
    rejoined = nodes.node_id(f"node_{lost}")
    output = _output(driver, 900)
    assert driver.returncode == 0, output[-3000:]

    parent = search_runs(uri, "lost", "tags.`ofq.kind` = 'sweep'")[0]
    children = search_runs(uri, "lost", f"tags.`mlflow.parentRunId` = '{parent['run_id']}'")
    assert len(children) == 4 and {c["status"] for c in children} == {"FINISHED"}
    restarted = next(c for c in children if c["run_id"] == run["run_id"])
    trail = restarted["tags"]["ofq.trial_nodes"].split(",")
    assert trail[0] == node_ids[lost] and len(trail) == 2 and trail[1] != node_ids[lost], trail
    # resumed from its last checkpoint (at least the first of the two epochs seen: each epoch is logged just
    # before its checkpoint), every epoch logged exactly once
    assert int(restarted["tags"]["ofq.resumed_at_epoch.pretrain"]) >= 1
    steps = [m.step for m in MlflowClient(uri).get_metric_history(run["run_id"], "val/top1")]
    assert sorted(steps) == list(range(6)), steps
    assert any(rejoined in c["tags"]["ofq.trial_nodes"].split(",") for c in children), "the rejoined node idled"


@pytest.mark.integration
def test_when_the_cluster_can_no_longer_fit_a_trial_the_sweep_says_so_and_stops(
    nodes: RayNodes, tmp_path: Path
) -> None:
    # Trials that need node_a's own resource: lose node_a mid-trial and do not bring it back.
    spec = _spec(
        tmp_path,
        "stranded",
        num_samples=2,
        max_concurrent_trials=1,
        resources_per_worker={"CPU": 1, "node_a": 1},
        wait_for_nodes_s=10,
    )
    spec["base"]["epochs"] = 50  # still training when its node goes (the sweep never gets that far)
    uri = default_tracking_uri(str(tmp_path))
    driver = _sweep(spec, tmp_path / "stranded.yaml", nodes.address)
    _wait_for_epochs(uri, "stranded", 1, driver)
    started = time.time()
    nodes.remove("a", "node_a")
    try:
        output = _output(driver, 300)
    finally:
        nodes.add("a", 1, {"slot": 1, "node_a": 1})
    assert driver.returncode == 1, output[-3000:]
    assert output.strip().splitlines()[-1] == (
        "ofq-ray: error: the cluster can no longer fit a trial (no live node has 1 CPU, 1 node_a left for one of "
        "a trial's 1 bundle(s)) after waiting 10 s (tune.wait_for_nodes_s); the sweep stopped"
    )
    assert time.time() - started < 200  # it waited its 10 s (plus the node's death to be noticed), not forever
    parent = search_runs(uri, "stranded", "tags.`ofq.kind` = 'sweep'")[0]
    assert parent["status"] == "FAILED" and parent["tags"]["ofq.stopped_by"] == "cluster"
    children = search_runs(uri, "stranded", f"tags.`mlflow.parentRunId` = '{parent['run_id']}'")
    assert children and all(c["status"] == "KILLED" for c in children)
    assert all(c["tags"]["ofq.stopped_by"] == "cluster" for c in children)
