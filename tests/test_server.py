"""`ofq-ray ui` as the one MLflow server: this process logs, uploads, registers and downloads only over HTTP;
the server alone opens the sqlite file and keeps the artifacts under <runs_dir>/mlartifacts. Then the MLflow
UI in headless Chromium on what was logged (tests/browser.py). No Ray."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from browser import browser_page, check_sweep_ui, ui_server
from mlflow import MlflowClient

from ofq_ray.checkpoint import STATE_FILE, build_model, load_model, save_checkpoint
from ofq_ray.cli import main
from ofq_ray.config import load_config
from ofq_ray.quant import init_activation_scales
from ofq_ray.sweep.summary import NOTE_TAG
from ofq_ray.tracking import (
    DB_FILE_NAME,
    RunTracker,
    artifact_bytes,
    download_artifacts,
    register_checkpoint,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "test-output" / "test_server"  # git-ignored; kept after the run to look at
EXPERIMENT = "served"
MODEL = "served-champion"
CONFIG = {
    "stage": "qat",
    "model": {"name": "vit_digits"},
    "data": {"name": "digits"},
    "kd": {"enabled": False},
    "quant": {"weight_bits": 2, "act_bits": 2},
}


@dataclass
class Server:
    url: str
    runs_dir: Path
    process: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`ofq-ray ui --workers 2` on a fresh runs folder (tests/browser.py: ui_server)."""
    runs = tmp_path_factory.mktemp("served-runs")
    with ui_server(runs, workers=2, log_path=runs.parent / "server.log") as (url, process):
        yield Server(url, runs, process)


@dataclass
class Sweep:
    parent: RunTracker
    trials: list[RunTracker]
    checkpoint: Path  # the champion's checkpoint folder as saved here
    model: torch.nn.Module
    batch: torch.Tensor


@pytest.fixture(scope="module")
def sweep(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """A sweep's shape, logged through the server: a parent run with the summary as description and a plot,
    two trials with metrics, the better one's checkpoint registered as the champion."""
    config = load_config(None, base=CONFIG)
    torch.manual_seed(0)
    model = build_model(config, 10, 1, 16, quantized=True)
    batch = torch.randn(4, 1, 16, 16)
    init_activation_scales(model, batch)
    local = tmp_path_factory.mktemp("local")
    checkpoint = local / "best"
    state = {"stage": "qat", "config": config.to_dict(), "model_state": model.state_dict()}
    save_checkpoint(str(checkpoint), {**state, "data_info": {"num_classes": 10, "in_chans": 1, "img_size": 16}})
    unused = str(local / "no-runs-dir")  # a tracking server chooses the artifact location: nothing is made here
    parent = RunTracker.create(
        server.url,
        EXPERIMENT,
        unused,
        run_name="sweep-served",
        params={"tune.metric": "val/top1"},
        tags={"ofq.kind": "sweep", "ofq.sweep": EXPERIMENT, "ofq.rank.metric": "val/top1", "ofq.rank.mode": "max"},
    )
    trials = []
    for index, (lr, top1) in enumerate([(1e-3, 61.5), (3e-4, 72.25)]):
        trial = RunTracker.create(
            server.url,
            EXPERIMENT,
            unused,
            run_name=f"lr={lr:.1e} [trial_{index}]",
            params={"search.optim.lr": str(lr)},
            tags={"ofq.trial_id": f"trial_{index}"},
            parent_run_id=parent.run_id,
            config_yaml=config.to_yaml(),
        )
        trial.log_epoch(0, {"val/top1": top1 - 10, "train/loss": 1.5})
        trial.log_epoch(1, {"val/top1": top1, "train/loss": 1.2})
        trials.append(trial)
    trials[1].log_artifact(str(checkpoint), "checkpoints/best")
    for trial in trials:
        trial.finish()
    register_checkpoint(
        server.url, trials[1].run_id, "checkpoints/best", MODEL, description="champion", model_description="served"
    )
    plot = local / "history.png"
    plot.write_bytes(_png())
    parent.log_artifact(str(plot), "plots")
    summary = local / "summary.md"
    summary.write_text(
        f"sweep {EXPERIMENT}: 2 trials (2 completed, 0 stopped by the scheduler, 0 errored)\n\n"
        f"best: trial trial_1 val/top1 72.25\n\nMLflow run {trials[1].run_id}  model models:/{MODEL}@champion\n"
    )
    parent.log_artifact(str(summary))
    (local / "trials.json").write_text("[]")
    parent.log_artifact(str(local / "trials.json"))
    parent.set_tags({NOTE_TAG: summary.read_text()})
    MlflowClient(server.url).log_metric(parent.run_id, "best/val/top1", 72.25)
    parent.finish()
    assert not os.path.exists(unused)
    return Sweep(parent, trials, checkpoint, model.eval(), batch)


def _png() -> bytes:
    """A real (tiny, gray) PNG, so the UI previews it as an image."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    width = height = 16
    raw = b"".join(b"\x00" + bytes([128]) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _openers(path: Path) -> set[int]:
    """Processes with ``path`` open, from /proc/<pid>/fd (Linux)."""
    target = str(path.resolve())
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # gone, or not ours to read
            continue
        if target in links:
            found.add(int(pid))
    return found


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_ui_serves_a_database_store_not_a_server(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert main(["ui", "--tracking-uri", "http://127.0.0.1:5000"]) == 2
    assert "is a tracking server already" in capsys.readouterr().err
    # MLFLOW_TRACKING_URI pointing at the server (where clients log) leaves the runs folder's store served.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # what `ofq-ray ui` sets, undone after
    started: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda _, command: started.append(command))
    assert main(["ui", "--runs-dir", str(tmp_path / "runs"), "--port", "5999"]) == 0
    command = started[0]
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'runs' / DB_FILE_NAME}"
    assert command[command.index("--artifacts-destination") + 1] == str(tmp_path / "runs" / "mlartifacts")
    assert "--serve-artifacts" in command and command[command.index("--host") + 1] == "127.0.0.1"


def test_the_server_runs_the_worker_processes_asked_for(server: Server) -> None:
    # `--workers 2`: uvicorn's two worker processes in the server's process group (with 1 it serves in-process).
    workers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ")
        except OSError:
            continue
        if _group(int(pid)) == server.process.pid and b"multiprocessing.spawn" in command:
            workers.append(pid)
    assert len(workers) == 2, workers


def test_runs_log_upload_register_and_download_through_the_server(server: Server, sweep: Sweep) -> None:
    champion = sweep.trials[1]
    assert champion.artifact_uri.startswith("mlflow-artifacts:/")
    # The server keeps the files under the runs folder's mlartifacts/, in the run's own folder.
    stored = [p for p in (server.runs_dir / "mlartifacts").rglob(STATE_FILE) if champion.run_id in p.parts]
    assert len(stored) == 1 and stored[0].parent.name == "best"
    original = (sweep.checkpoint / STATE_FILE).read_bytes()
    assert stored[0].read_bytes() == original

    folder = download_artifacts(f"models:/{MODEL}@champion", tracking_uri=server.url)
    assert hashlib.sha256(Path(folder, STATE_FILE).read_bytes()).digest() == hashlib.sha256(original).digest()
    direct = download_artifacts(f"{champion.artifact_uri}/checkpoints/best/{STATE_FILE}", tracking_uri=server.url)
    assert Path(direct).read_bytes() == original
    rebuilt = load_model(f"models:/{MODEL}@champion", tracking_uri=server.url)
    assert torch.equal(rebuilt(sweep.batch), sweep.model(sweep.batch))
    config_file = download_artifacts(f"runs:/{champion.run_id}/config.yaml", tracking_uri=server.url)
    assert artifact_bytes(server.url, [champion.run_id]) == len(original) + os.path.getsize(config_file)

    # Only the server's processes have the database open; this one (the client) never did.
    openers = _openers(server.runs_dir / DB_FILE_NAME)
    assert openers, "the server should hold its database open"
    assert os.getpid() not in openers
    assert all(_group(pid) == server.process.pid for pid in openers), openers


def test_the_ui_shows_the_sweep_and_its_champion_in_a_browser(server: Server, sweep: Sweep) -> None:
    with browser_page() as page:
        check_sweep_ui(server.url, EXPERIMENT, MODEL, SHOTS, page=page)
    assert {p.name for p in SHOTS.glob("*.png")} >= {"runs.png", "parent.png", "plots.png", "model.png"}
