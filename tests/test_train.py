"""Ray Train + MLflow integration: a real Ray session, a real sqlite MLflow store, real digits data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from ofq_ray.checkpoint import CheckpointError, model_from_checkpoint, read_checkpoint
from ofq_ray.config import ConfigError, RankConfig, load_config, reported_metrics
from ofq_ray.tracking import RunTracker
from ofq_ray.train import (
    LocalSession,
    TrainingResult,
    best_checkpoint,
    dataset_info,
    prepare_sources,
    run_training,
)

pytestmark = pytest.mark.integration

BASE = {
    "model": {"name": "vit_digits"},
    "data": {"name": "digits", "augment": False},
    "batch_size": 64,
    "eval_batch_size": 300,
    "cpus_per_worker": 1,
    "tracking": {"experiment": "train-tests"},
}


def config(runs_dir: Path, **overrides: Any) -> Any:
    data = {**BASE, "runs_dir": str(runs_dir)}
    for key, value in overrides.items():
        node = data
        parts = key.split("__")
        for part in parts[:-1]:
            node[part] = dict(node.get(part, {}))
            node = node[part]
        node[parts[-1]] = value
    return load_config(None, base=data)


def metric_steps(result: TrainingResult, key: str) -> list[int]:
    client = MlflowClient(result.tracking_uri)
    return sorted(m.step for m in client.get_metric_history(result.run_id, key))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def pretrained(ray_session: None, runs_dir: Path) -> TrainingResult:
    cfg = config(runs_dir, stage="pretrain", epochs=12, workers=2, optim__lr=3e-3, optim__warmup_epochs=1)
    return run_training(cfg)


def test_pretrain_learns_and_logs_one_run_with_contiguous_epochs(pretrained: TrainingResult) -> None:
    assert pretrained.best["val/top1"] > 70.0  # 10 classes: chance is 10 %
    assert set(pretrained.history[-1]) == set(reported_metrics("pretrain"))  # what rank/tune.metric may name
    assert metric_steps(pretrained, "val/top1") == list(range(12))
    assert metric_steps(pretrained, "train/loss") == list(range(12))
    runs = MlflowClient(pretrained.tracking_uri).search_runs(
        [MlflowClient(pretrained.tracking_uri).get_run(pretrained.run_id).info.experiment_id]
    )
    assert [r.info.run_id for r in runs if r.data.tags.get("ofq.stage") == "pretrain"] == [pretrained.run_id]
    info = RunTracker(pretrained.tracking_uri, pretrained.run_id).info()
    assert info["status"] == "FINISHED"
    assert info["params"]["model.name"] == "vit_digits"


def test_checkpoints_load_with_weights_only_and_rebuild_the_model(pretrained: TrainingResult) -> None:
    assert pretrained.best_checkpoint is not None
    state = torch.load(os.path.join(pretrained.best_checkpoint, "state.pt"), weights_only=True)
    assert state["stage"] == "pretrain" and state["epoch"] >= 1
    model, _ = model_from_checkpoint(pretrained.best_checkpoint)
    assert not any("quantizer" in name for name in model.state_dict())
    client = MlflowClient(pretrained.tracking_uri)
    artifacts = [a.path for a in client.list_artifacts(pretrained.run_id, "checkpoints")]
    assert "checkpoints/best" in artifacts


def test_qat_with_kd_then_cga_chain(pretrained: TrainingResult, runs_dir: Path) -> None:
    qat = run_training(
        config(
            runs_dir,
            stage="qat",
            epochs=3,
            workers=2,
            init_from=f"runs:/{pretrained.run_id}/checkpoints/best",
            quant={"weight_bits": 4, "act_bits": 4},
            optim__lr=5e-4,
        )
    )
    assert qat.best["val/top1"] > pretrained.best["val/top1"] - 15.0
    assert set(qat.history[-1]) == set(reported_metrics("qat"))
    assert metric_steps(qat, "osc/mean_freq") == [0, 1, 2]
    cga = run_training(
        config(
            runs_dir,
            stage="cga",
            epochs=2,
            workers=2,
            init_from=f"runs:/{qat.run_id}/checkpoints/best",
            quant={"weight_bits": 4, "act_bits": 4},
            optim__lr=1e-5,
            cga__boundary_range=0.005,
        )
    )
    assert cga.best["val/top1"] > 50.0
    assert set(cga.history[-1]) == set(reported_metrics("cga"))
    assert metric_steps(cga, "cga/frozen_frac") == [0, 1]
    assert cga.last["cga/frozen_frac"] > 0.9  # BR 0.005 freezes almost everything
    state = read_checkpoint(cga.last_checkpoint)  # type: ignore[arg-type]
    assert state["stage"] == "cga"
    assert state["teacher_source"].startswith("runs:/")  # the QAT stage's teacher carried over
    model, _ = model_from_checkpoint(cga.last_checkpoint)  # type: ignore[arg-type]
    assert any("merged_quantizer" in name or "qkx_quantizer" in name for name in model.state_dict())


def test_runs_start_from_model_pretrained_path_and_qat_distils_from_it(
    pretrained: TrainingResult, runs_dir: Path, tmp_path: Path
) -> None:
    # A plain timm-style weights file ({"model": state_dict}) holding the FP fixture's best weights.
    weights = tmp_path / "fp.pth"
    torch.save({"model": read_checkpoint(pretrained.best_checkpoint)["model_state"]}, weights)  # type: ignore[arg-type]
    # At lr 1e-9 one epoch cannot move the weights: the first eval is the file's model.
    still = run_training(
        config(
            runs_dir,
            stage="pretrain",
            epochs=1,
            model__pretrained_path=str(weights),
            optim__lr=1e-9,
            optim__min_lr=0.0,
            optim__weight_decay=0.0,
            tracking__experiment="pretrained-path",
        )
    )
    assert still.last["val/loss"] == pytest.approx(pretrained.best["val/loss"], rel=1e-4)
    assert still.last["val/top1"] == pytest.approx(pretrained.best["val/top1"], abs=0.5)
    # QAT with no init_from and no kd.teacher: starts from the file and distils from it.
    qat = run_training(
        config(
            runs_dir,
            stage="qat",
            epochs=1,
            model__pretrained_path=str(weights),
            quant={"weight_bits": 4, "act_bits": 4},
            optim__lr=1e-4,
            tracking__experiment="pretrained-path",
        )
    )
    assert qat.last["val/top1"] > pretrained.best["val/top1"] - 15.0  # a random start scores ~10 %
    state = read_checkpoint(qat.last_checkpoint)  # type: ignore[arg-type]
    assert state["teacher_source"] == f"pretrained:{weights}"


def test_pretrained_weights_without_a_head_for_these_classes_cannot_teach(tmp_path: Path) -> None:
    from ofq_ray.models import create_model

    weights = tmp_path / "other-classes.pth"
    torch.save(create_model("vit_digits", num_classes=7).state_dict(), weights)
    cfg = config(tmp_path, stage="qat", model__pretrained_path=str(weights), quant={"weight_bits": 4})
    info = dataset_info(cfg)
    with pytest.raises(ConfigError, match=r"^kd.teacher: the pretrained weights .* have no head for 10 classes"):
        prepare_sources(cfg, "sqlite:///unused.db", info)
    # Without KD the same file is a fine starting point: its head starts fresh, the rest is the file's.
    cfg = config(tmp_path, stage="qat", model__pretrained_path=str(weights), kd__enabled=False)
    sources, teacher = prepare_sources(cfg, "sqlite:///unused.db", info)
    assert teacher is None and "teacher_weights" not in sources
    file_state = torch.load(weights, weights_only=True)
    assert torch.equal(sources["init_weights"]["blocks.0.mlp.fc1.weight"], file_state["blocks.0.mlp.fc1.weight"])
    assert sources["init_weights"]["head.weight"].shape == (10, file_state["head.weight"].shape[1])


def test_the_ranking_metric_chooses_the_kept_checkpoint_the_best_row_and_the_tag(
    ray_session: None, runs_dir: Path
) -> None:
    # lr falls every epoch under the cosine schedule while top-1 rises: ranked by lr (max), the first
    # epoch is the best, and Ray must keep that checkpoint (keep 1), not the most accurate one.
    cfg = config(
        runs_dir,
        stage="pretrain",
        epochs=3,
        data__train_subset=256,
        optim__lr=3e-3,
        keep_checkpoints=1,
        rank={"metric": "lr", "mode": "max"},
        tracking__experiment="rank",
    )
    result = run_training(cfg)
    assert [row["lr"] for row in result.history] == sorted((row["lr"] for row in result.history), reverse=True)
    assert result.best == result.history[0]
    assert read_checkpoint(result.best_checkpoint)["epoch"] == 1  # type: ignore[arg-type]
    tags = RunTracker(result.tracking_uri, result.run_id).info()["tags"]
    assert tags["ofq.pretrain.best_lr"] == f"{result.history[0]['lr']:.6g}"
    assert tags["ofq.pretrain.best_epoch"] == "0" and tags["ofq.pretrain.rank"] == "lr max"


def test_best_checkpoint_follows_the_mode_takes_the_earliest_tie_and_skips_nan() -> None:
    def kept(*rows: tuple[str, float, float]) -> list[tuple[str, dict[str, float]]]:
        return [(path, {"epoch": epoch, "val/loss": loss}) for path, epoch, loss in rows]

    pairs = kept(("c3", 3.0, 0.2), ("c1", 1.0, 0.2), ("c0", 0.0, float("nan")), ("c2", 2.0, 0.5))
    assert best_checkpoint(pairs, RankConfig("val/loss", "min")) == "c1"
    assert best_checkpoint(pairs, RankConfig("val/loss", "max")) == "c2"
    assert best_checkpoint(kept(), RankConfig()) is None


def test_an_in_process_stage_keeps_the_best_checkpoints_and_the_latest_as_ray_train_does(tmp_path: Path) -> None:
    from ofq_ray.config import RunConfig

    config = RunConfig(keep_checkpoints=2, rank=RankConfig("val/loss", "min"))
    session = LocalSession(str(tmp_path / "stage"), config)
    assert session.resume_from() is None and session.kept() == []
    losses = [0.9, 0.5, 0.7, 0.5, 0.8]  # epoch 3 ties epoch 1: the earlier one ranks first
    history: list[dict[str, float]] = []
    for epoch, loss in enumerate(losses):
        history.append({"epoch": float(epoch), "val/loss": loss})
        session.save({"stage": "qat", "epoch": epoch + 1, "history": list(history)}, epoch)
    kept = {os.path.basename(path): metrics["val/loss"] for path, metrics in session.kept()}
    # the 2 best (epochs 1 and 3) and the latest (4), as Ray Train's num_to_keep + score attribute keep
    assert kept == {"checkpoint_000001": 0.5, "checkpoint_000003": 0.5, "checkpoint_000004": 0.8}
    assert session.resume_from() == str(tmp_path / "stage" / "checkpoint_000004")
    assert best_checkpoint(session.kept(), config.rank) == str(tmp_path / "stage" / "checkpoint_000001")
    # restarted: a new session finds them on disk, where a folder whose state.pt was never written (killed
    # mid-save) is neither resumed from nor kept
    (tmp_path / "stage" / "checkpoint_000005").mkdir()
    restarted = LocalSession(str(tmp_path / "stage"), config)
    assert restarted.resume_from() == str(tmp_path / "stage" / "checkpoint_000004")
    assert len(restarted.kept()) == 3
    assert sorted(os.listdir(tmp_path / "stage")) == [*kept, "checkpoint_000005"]  # retention deleted the rest
    # what another process deletes there (a restarted trial's predecessor retaining) is gone for this one too
    shutil.rmtree(tmp_path / "stage" / "checkpoint_000003")
    assert [os.path.basename(path) for path, _ in restarted.kept()] == ["checkpoint_000001", "checkpoint_000004"]


def _preemption_watchers() -> int:
    from ray.util.state import list_actors

    return len(list_actors(filters=[("class_name", "=", "PreemptionWatcher")], limit=1000))


def test_a_killed_worker_resumes_from_the_last_checkpoint(
    pretrained: TrainingResult, runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The runs before (the pretrained fixture's) had no preemption watcher: it is off unless asked for.
    assert _preemption_watchers() == 0
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # as a user on spot instances would
    marker = tmp_path / "killed"
    cfg = config(runs_dir, stage="pretrain", epochs=3, workers=2, max_failures=1, tracking__experiment="fault")
    result = run_training(cfg, test_hooks={"kill_at": {"epoch": 1, "step": 3, "rank": 1, "marker": str(marker)}})
    assert _preemption_watchers() >= 1
    assert marker.exists()  # the worker really died mid-epoch 1
    assert metric_steps(result, "val/top1") == [0, 1, 2]  # epoch 0 not repeated, none missing
    assert metric_steps(result, "epoch") == [0, 1, 2]
    client = MlflowClient(result.tracking_uri)
    experiment = client.get_experiment_by_name("fault")
    assert len(client.search_runs([experiment.experiment_id])) == 1


@pytest.mark.parametrize("stage", ["pretrain", "qat"])
def test_two_workers_match_one_worker_with_the_same_global_batch(
    pretrained: TrainingResult, runs_dir: Path, stage: str
) -> None:
    # 4 AdamW steps at lr 5e-4 on the same 64-image global batches (no augmentation): 2 workers x 32
    # must train like 1 worker x 64, LSQ step sizes included (their gradient scale counts the global batch).
    states, metrics = {}, {}
    extra = {"init_from": f"runs:/{pretrained.run_id}/checkpoints/best"} if stage == "qat" else {}
    for workers in (1, 2):
        result = run_training(
            config(
                runs_dir,
                stage=stage,
                epochs=1,
                workers=workers,
                quant={"weight_bits": 4, "act_bits": 4},
                data__train_subset=256,
                optim__lr=5e-4,
                tracking__experiment=f"ddp-{stage}-{workers}",
                **extra,
            )
        )
        states[workers] = read_checkpoint(result.last_checkpoint)["model_state"]  # type: ignore[arg-type]
        metrics[workers] = result.last
    for name, one in states[1].items():
        two = states[2][name]
        if name.endswith(".step"):  # LSQ steps: relative agreement
            assert (two - one).norm() <= 1e-2 * one.norm(), name
        else:  # AdamW moves an element by about lr per step; allow about two steps of disagreement
            assert torch.allclose(one, two, atol=1e-3), name
    # In float the losses agree closely; quantized, the all-reduce's rounding differences flip a few
    # codes near thresholds, which moves the loss by a few percent at 4 bits (measured: 3 %).
    tolerance = 1e-3 if stage == "pretrain" else 6e-2
    assert metrics[2]["val/loss"] == pytest.approx(metrics[1]["val/loss"], rel=tolerance)
    assert metrics[2]["train/loss"] == pytest.approx(metrics[1]["train/loss"], rel=tolerance)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.name=vit_tiny_imaginary"], "model.name: unknown model 'vit_tiny_imaginary'"),
        (["quant.weight_bits=9"], "quant.weight_bits: 9 is not allowed"),
        (["data.name=fashion_mnist", "data.root=/nonexistent/fmnist"], "data.root:"),
        (["stage=cga", "init_from=/nonexistent", "cga.boundary_range=-0.1"], "cga.boundary_range: -0.1 is not allowed"),
        (["optimm.lr=1e-3"], "optimm: unknown key"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_creates_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    overrides: list[str],
    message: str,
) -> None:
    from ofq_ray.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["train", str(_bad_config(tmp_path))] + [f"--set={o}" for o in overrides]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ofq-ray: error: ") and message in lines[0], lines
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_bad_input_from_the_shell_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # The installed entry point in a fresh process: nothing else on stderr, the exit status itself.
    args = [str(Path(sys.executable).parent / "ofq-ray"), "train", str(_bad_config(tmp_path)), "--set=optimm.lr=1e-3"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ofq-ray: error: optimm: unknown key; allowed: "), done.stderr
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def _bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump({**BASE, "stage": "qat", "kd": {"enabled": False}, "runs_dir": str(tmp_path / "runs")})
    )
    return path


def test_corrupt_and_foreign_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"^checkpoint: .* is not readable"):
        read_checkpoint(str(broken))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="is not an ofq-ray checkpoint"):
        read_checkpoint(str(foreign))


def test_eval_cli_reproduces_the_logged_accuracy(pretrained: TrainingResult, runs_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**BASE, "runs_dir": str(runs_dir)}))
    uri = f"runs:/{pretrained.run_id}/checkpoints/best"
    done = subprocess.run(
        [sys.executable, "-m", "ofq_ray.cli", "eval", str(path), "--checkpoint", uri],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    reported = yaml.safe_load(done.stdout)
    assert reported["val/top1"] == pytest.approx(pretrained.best["val/top1"], abs=1e-6)
