"""ofq_ray.tracking against a real MLflow sqlite store (one per module: creating it runs migrations)."""

from __future__ import annotations

import math
import pickle
import threading
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from ofq_ray.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    MAX_TAG_VALUE_LENGTH,
    PARENT_RUN_TAG,
    RunTracker,
    artifact_bytes,
    default_tracking_uri,
    download_artifacts,
    ensure_experiment,
    flatten,
    register_checkpoint,
    resolve_alias,
    resolve_tracking_uri,
    sanitize_model_name,
    search_runs,
)

pytestmark = [
    pytest.mark.integration,
    # MLflow 3.17's sqlite store triggers this SQLAlchemy deprecation on first use; not ours to fix.
    pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"),
]

METRICS = ("train/loss", "val/top1", "val/top5", "lr", "osc/mean_freq", "osc/frac_gt_0.005", "throughput/img_s")


class Store:
    """One sqlite store shared by the module; tests keep apart by experiment name."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = str(runs_dir)
        self.uri = default_tracking_uri(self.runs_dir)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def tracker(self, experiment: str, **kwargs: object) -> RunTracker:
        options: dict = {"run_name": "run", "params": {"lr": "0.1"}}
        options.update(kwargs)
        return RunTracker.create(self.uri, experiment, self.runs_dir, **options)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    shared = Store(tmp_path_factory.mktemp("mlruns"))
    ensure_experiment(shared.uri, "warm-up", shared.runs_dir)  # pays the schema migration once
    return shared


def epoch_metrics(epoch: int) -> dict[str, float]:
    return {name: 10.0 * epoch + index for index, name in enumerate(METRICS)}


# --- URIs, params, experiments --------------------------------------------------------------------


def test_default_tracking_uri_is_absolute_and_creates_runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri("nested/runs")
    assert uri == f"sqlite:///{tmp_path / 'nested' / 'runs' / 'mlflow.db'}"
    assert uri.startswith("sqlite:////")
    assert (tmp_path / "nested" / "runs").is_dir()


def test_resolve_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, "runs") == default_tracking_uri("runs")
    assert resolve_tracking_uri("", "runs") == default_tracking_uri("runs")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None, "runs") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:////abs/x.db", "runs") == "sqlite:////abs/x.db"
    # A relative sqlite file would be a different database in each Ray worker's working directory.
    assert resolve_tracking_uri("sqlite:///rel/x.db", "runs") == f"sqlite:///{tmp_path / 'rel' / 'x.db'}"


def test_flatten_nested_config() -> None:
    config = {
        "model": {"name": "deit_tiny", "quant": {"w_bits": 2, "qkr": True}},
        "milestones": [10, 20],
        "shape": (1, 32),
        "init_from": None,
        "extra": {},
        "lr": 1e-4,
    }
    assert flatten(config) == {
        "model.name": "deit_tiny",
        "model.quant.w_bits": "2",
        "model.quant.qkr": "True",
        "milestones": "[10, 20]",
        "shape": "[1, 32]",
        "init_from": "None",
        "extra": "{}",
        "lr": "0.0001",
    }
    assert flatten({"w_bits": 2}, prefix="quant") == {"quant.w_bits": "2"}
    long_value = flatten({"note": "x" * 10_000})["note"]
    assert len(long_value) == MAX_PARAM_VALUE_LENGTH and long_value.endswith("...")
    assert (MAX_PARAM_VALUE_LENGTH, MAX_TAG_VALUE_LENGTH) == (MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH)


def test_ensure_experiment_uses_absolute_artifact_location_and_is_idempotent(store: Store) -> None:
    experiment_id = ensure_experiment(store.uri, "exp-location", store.runs_dir)
    assert ensure_experiment(store.uri, "exp-location", store.runs_dir) == experiment_id
    location = store.client.get_experiment(experiment_id).artifact_location
    assert location == (Path(store.runs_dir).resolve() / "mlartifacts" / "exp-location").as_uri()


def test_ensure_experiment_concurrent_creation_yields_one_experiment(store: Store) -> None:
    barrier = threading.Barrier(4)
    ids: list[str] = []

    def create() -> None:
        barrier.wait()
        ids.append(ensure_experiment(store.uri, "exp-race", store.runs_dir))

    threads = [threading.Thread(target=create) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 4 and len(set(ids)) == 1


def test_ensure_experiment_rejects_deleted_and_empty_names(store: Store) -> None:
    experiment_id = ensure_experiment(store.uri, "exp-deleted", store.runs_dir)
    store.client.delete_experiment(experiment_id)
    with pytest.raises(ValueError, match="was deleted"):
        ensure_experiment(store.uri, "exp-deleted", store.runs_dir)
    with pytest.raises(ValueError, match="non-empty"):
        ensure_experiment(store.uri, " ", store.runs_dir)


# --- runs -----------------------------------------------------------------------------------------


def test_create_logs_params_tags_config_and_finish_sets_status(store: Store) -> None:
    params = flatten({"optim": {"lr": 1e-4}, "quant": {"w_bits": 2}})
    tracker = store.tracker(
        "exp-create", run_name="qat", params=params, tags={"stage": "qat"}, config_yaml="stage: qat\nepochs: 3\n"
    )
    info = tracker.info()
    assert info["status"] == "RUNNING" and info["end_time"] is None
    assert info["run_name"] == "qat"
    assert info["params"] == params
    assert info["tags"]["stage"] == "qat"
    assert info["experiment_id"] == ensure_experiment(store.uri, "exp-create", store.runs_dir)
    assert info["artifact_uri"] == tracker.artifact_uri
    assert tracker.artifact_uri.startswith(Path(store.runs_dir).resolve().as_uri())
    config_path = download_artifacts(f"runs:/{tracker.run_id}/config.yaml", tracking_uri=store.uri)
    assert Path(config_path).read_text() == "stage: qat\nepochs: 3\n"

    with pytest.raises(ValueError, match="did you mean 'FINISHED'"):
        tracker.finish("FINISH")
    assert tracker.info()["status"] == "RUNNING"
    tracker.finish()
    assert tracker.info()["status"] == "FINISHED"
    failed = store.tracker("exp-create")
    failed.finish("failed")
    assert failed.info()["status"] == "FAILED"


def test_create_rejects_bad_names_before_creating_anything(store: Store) -> None:
    with pytest.raises(ValueError, match="invalid param name 'bad key!'"):
        store.tracker("exp-bad-names", params={"bad key!": "1"})
    with pytest.raises(ValueError, match="invalid tag name 'a//b'"):
        store.tracker("exp-bad-names", tags={"a//b": "1"})
    assert store.client.get_experiment_by_name("exp-bad-names") is None


def test_log_epoch_puts_every_metric_at_step_epoch(store: Store) -> None:
    tracker = store.tracker("exp-log-epoch")
    for epoch in range(3):
        tracker.log_epoch(epoch, epoch_metrics(epoch))
    for name in (*METRICS, "epoch"):
        history = store.client.get_metric_history(tracker.run_id, name)
        assert sorted(metric.step for metric in history) == [0, 1, 2], name
    by_step = {metric.step: metric.value for metric in store.client.get_metric_history(tracker.run_id, "val/top1")}
    assert by_step == {epoch: epoch_metrics(epoch)["val/top1"] for epoch in range(3)}
    assert tracker.logged_epochs() == [0, 1, 2]
    assert tracker.info()["metrics"]["train/loss"] == epoch_metrics(2)["train/loss"]


def test_log_epoch_accepts_nan_and_rejects_bad_input(store: Store) -> None:
    np = pytest.importorskip("numpy")
    tracker = store.tracker("exp-log-epoch-values")
    tracker.log_epoch(0, {"train/loss": float("nan"), "val/top1": np.float32(3.5), "epoch": 0})
    assert math.isnan(tracker.info()["metrics"]["train/loss"])
    assert tracker.info()["metrics"]["val/top1"] == 3.5
    for bad in ("1.0", None, True, [1.0]):
        with pytest.raises(ValueError, match="must be a real number"):
            tracker.log_epoch(1, {"train/loss": bad})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="non-negative int"):
        tracker.log_epoch(-1, {"train/loss": 1.0})
    with pytest.raises(ValueError, match="invalid metric name 'val/top1/'"):
        tracker.log_epoch(1, {"val/top1/": 1.0})
    with pytest.raises(ValueError, match="does not match"):
        tracker.log_epoch(1, {"train/loss": 1.0, "epoch": 2})
    assert tracker.logged_epochs() == [0]


def test_sync_history_logs_each_missing_epoch_exactly_once(store: Store) -> None:
    tracker = store.tracker("exp-sync")
    tracker.log_epoch(0, epoch_metrics(0))
    tracker.log_epoch(1, epoch_metrics(1))
    history = [{"epoch": epoch, **epoch_metrics(epoch)} for epoch in range(4)]
    # A resumed worker builds its own handle from the run id.
    resumed = RunTracker(tracker.uri, tracker.run_id)
    assert resumed.sync_history(history) == 2
    for name in (*METRICS, "epoch"):
        steps = [metric.step for metric in store.client.get_metric_history(tracker.run_id, name)]
        assert sorted(steps) == [0, 1, 2, 3], name
    assert resumed.sync_history(history) == 0
    assert tracker.logged_epochs() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"history\[1\]"):
        resumed.sync_history([{"epoch": 0}, {"epoch": 5}])


def test_two_handles_on_one_run_write_into_it(store: Store) -> None:
    driver = store.tracker("exp-two-handles")
    worker = pickle.loads(pickle.dumps(driver))
    assert worker == driver and worker is not driver
    assert RunTracker(driver.uri, driver.run_id) == driver
    worker.log_epoch(0, {"val/top1": 50.0})
    worker.set_tags({"worker": "rank0"})
    driver.log_epoch(1, {"val/top1": 60.0})
    driver.finish()
    info = worker.info()
    assert info["status"] == "FINISHED"
    assert info["tags"]["worker"] == "rank0"
    assert info["metrics"]["val/top1"] == 60.0
    assert worker.logged_epochs() == [0, 1]
    assert len(search_runs(store.uri, "exp-two-handles")) == 1


def test_parent_and_child_runs(store: Store) -> None:
    parent = store.tracker("exp-sweep", run_name="sweep")
    child = store.tracker("exp-sweep", run_name="trial-0", parent_run_id=parent.run_id)
    assert child.info()["tags"][PARENT_RUN_TAG] == parent.run_id
    runs = {run["run_id"]: run for run in search_runs(store.uri, "exp-sweep")}
    assert set(runs) == {parent.run_id, child.run_id}
    assert runs[child.run_id]["parent_run_id"] == parent.run_id
    assert runs[parent.run_id]["parent_run_id"] is None
    children = search_runs(store.uri, "exp-sweep", f"tags.`{PARENT_RUN_TAG}` = '{parent.run_id}'")
    assert [run["run_name"] for run in children] == ["trial-0"]
    with pytest.raises(ValueError, match="parent run 'nope' not found"):
        store.tracker("exp-sweep", parent_run_id="nope")
    with pytest.raises(ValueError, match="did you mean 'exp-sweep'"):
        search_runs(store.uri, "exp-swep")


# --- artifacts and registry -----------------------------------------------------------------------


def make_checkpoint_dir(root: Path, content: str) -> Path:
    checkpoint = root / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_text(content)
    (checkpoint / "config.yaml").write_text("stage: qat\n")
    return checkpoint


def test_log_artifact_and_download_artifacts(store: Store, tmp_path: Path) -> None:
    tracker = store.tracker("exp-artifacts")
    made = make_checkpoint_dir(tmp_path / "out", "weights")
    tracker.log_artifact(str(made))  # lands in checkpoint/
    (tmp_path / "plot.txt").write_text("plot")
    tracker.log_artifact(str(tmp_path / "plot.txt"), "plots")
    with pytest.raises(FileNotFoundError):
        tracker.log_artifact(str(tmp_path / "missing"))

    folder = Path(download_artifacts(f"runs:/{tracker.run_id}/checkpoint", tracking_uri=store.uri))
    assert folder.name == "checkpoint" and (folder / "model.safetensors").read_text() == "weights"
    # Downloads are copies: the store's own files are never handed out.
    assert not str(folder).startswith(str(Path(store.runs_dir).resolve()))
    copied = download_artifacts(f"runs:/{tracker.run_id}/plots/plot.txt", str(tmp_path / "dst"), tracking_uri=store.uri)
    assert copied == str(tmp_path / "dst" / "plot.txt") and Path(copied).read_text() == "plot"
    whole = Path(download_artifacts(f"runs:/{tracker.run_id}", tracking_uri=store.uri))
    assert (whole / "checkpoint" / "config.yaml").is_file() and (whole / "plots" / "plot.txt").is_file()
    # sizes listed through the store; a run that does not exist counts nothing
    expected = sum(p.stat().st_size for p in Path(made).rglob("*") if p.is_file()) + len("plot")
    assert artifact_bytes(store.uri, [tracker.run_id, "0123456789abcdef"]) == expected

    plain = str(tmp_path / "plot.txt")
    assert download_artifacts(plain, tracking_uri=store.uri) == plain
    assert download_artifacts((tmp_path / "plot.txt").as_uri(), tracking_uri=store.uri) == plain

    bad_uris = [
        f"runs:/{tracker.run_id}/nope",
        "runs:/0123456789abcdef/checkpoint",
        str(tmp_path / "nope"),
        "models:/no-such-model@champion",
        "models:/no-such-model",
        "mlflow-artifacts:/1/abc/artifacts",
    ]
    for bad in bad_uris:
        with pytest.raises(ValueError) as raised:
            download_artifacts(bad, tracking_uri=store.uri)
        message = str(raised.value)
        assert bad in message and "\n" not in message, message


def test_register_checkpoint_versions_alias_and_download(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow's own models:/ resolution opens ./mlflow.db; ours must not touch the working directory.
    monkeypatch.chdir(tmp_path)
    first = store.tracker("exp-registry", run_name="trial-0")
    first.log_artifact(str(make_checkpoint_dir(tmp_path / "a", "first")), "checkpoint")
    second = store.tracker("exp-registry", run_name="trial-1")
    second.log_artifact(str(make_checkpoint_dir(tmp_path / "b", "second")), "checkpoint")

    assert register_checkpoint(store.uri, first.run_id, "checkpoint", "deit-w2a2") == 1
    assert resolve_alias(store.uri, "deit-w2a2")["version"] == 1
    assert register_checkpoint(store.uri, second.run_id, "checkpoint", "deit-w2a2", tags={"val/top1": "71.2"}) == 2

    champion = resolve_alias(store.uri, "deit-w2a2", "champion")
    assert champion["version"] == 2 and champion["run_id"] == second.run_id
    assert champion["source"] == f"runs:/{second.run_id}/checkpoint"
    assert champion["tags"] == {"val/top1": "71.2"}

    folder = Path(download_artifacts("models:/deit-w2a2@champion", tracking_uri=store.uri))
    assert (folder / "model.safetensors").read_text() == "second"
    assert (folder / "config.yaml").is_file()
    older = Path(download_artifacts("models:/deit-w2a2/1", str(tmp_path / "v1"), tracking_uri=store.uri))
    assert (older / "model.safetensors").read_text() == "first"
    latest = download_artifacts("models:/deit-w2a2/latest/model.safetensors", tracking_uri=store.uri)
    assert Path(latest).read_text() == "second"
    assert not (tmp_path / "mlflow.db").exists()

    with pytest.raises(ValueError, match="has no alias 'staging'"):
        resolve_alias(store.uri, "deit-w2a2", "staging")
    with pytest.raises(ValueError, match="no registered model named 'nope'"):
        resolve_alias(store.uri, "nope")
    with pytest.raises(ValueError, match="has no version '9'"):
        download_artifacts("models:/deit-w2a2/9", tracking_uri=store.uri)


def test_register_checkpoint_rejects_bad_input(store: Store, tmp_path: Path) -> None:
    tracker = store.tracker("exp-registry-errors")
    tracker.log_artifact(str(make_checkpoint_dir(tmp_path, "w")), "checkpoint")
    with pytest.raises(ValueError, match="try 'deit-s-w2a2'"):
        register_checkpoint(store.uri, tracker.run_id, "checkpoint", "deit/s:w2a2")
    with pytest.raises(ValueError, match="invalid alias"):
        register_checkpoint(store.uri, tracker.run_id, "checkpoint", "ok-name", alias="latest")
    with pytest.raises(ValueError, match="has no artifact 'missing'"):
        register_checkpoint(store.uri, tracker.run_id, "missing", "ok-name")
    with pytest.raises(ValueError, match="not found"):
        register_checkpoint(store.uri, "0123456789abcdef", "checkpoint", "ok-name")
    assert store.client.search_registered_models("name = 'ok-name'") == []
    assert sanitize_model_name(" deit-s/w2a2: cga ") == "deit-s-w2a2-cga"
