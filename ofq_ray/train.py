"""Ray Train: one OFQ training stage on N workers, checkpointed every epoch and tracked in one MLflow run.

The driver (:func:`run_training`) validates everything, resolves ``init_from``/teacher sources (paths or
MLflow URIs) into state dicts in the object store, creates the MLflow run, and launches a
``TorchTrainer``. Each worker builds the model, trains with :mod:`ofq_ray.engine`, and rank 0 writes a
checkpoint and syncs the per-epoch history to MLflow after every epoch. A worker that dies is restarted
by Ray from the last checkpoint (``max_failures``); the history sync logs every epoch exactly once.

A sweep trial with one worker runs the same loop in its own Ray Tune process instead (``in_process``):
:class:`LocalSession` keeps the checkpoints and reports to Tune, where :class:`RayTrainSession` goes
through Ray Train.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .checkpoint import (
    CheckpointError,
    build_model,
    checkpoint_config,
    load_model_state,
    read_checkpoint,
    save_checkpoint,
)
from .config import ConfigError, RankConfig, RunConfig, config_from_dict
from .data import DatasetInfo, build_datasets, build_loader
from .engine import LRSchedule, build_optimizer, evaluate, train_one_epoch, unwrap
from .errors import UserError
from .models import _read_state_dict, create_model, get_spec, load_pretrained, teacher_logits

URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


# --- driver-side helpers ----------------------------------------------------------------------------------


def ensure_ray(address: str | None = None) -> None:
    """Connects to ``address`` (or ``RAY_ADDRESS``; ``auto`` finds a local `ray start` cluster), or starts
    a private local Ray; no-op if already connected."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster on 127.0.0.1
    ray.init(
        address=address,
        log_to_driver=True,
        include_dashboard=True if address == "local" else None,
        logging_level=logging.WARNING,  # keep stderr for our own one-line errors
    )


def check_resources(config: RunConfig, concurrent: int = 1, driver_cpus: float = 0.0, key: str = "resources") -> None:
    """Fails with one line, naming ``key``, when ``concurrent`` trainings of ``config`` (each with a
    driver holding ``driver_cpus``) cannot fit the Ray cluster: its CPUs, GPUs and custom resources."""
    import ray

    total = ray.cluster_resources()
    for name, amount in config.worker_resources.items():
        driver = driver_cpus if name == "CPU" else 0.0
        need, have = concurrent * (driver + config.workers * amount), total.get(name, 0.0)
        if need > have + 1e-9:
            raise ConfigError(
                f"{key}: {concurrent} x ({driver:g} driver + {config.workers} workers x {amount:g} {name}) = "
                f"{need:g} {name}, but the cluster has {have:g}; allowed: fewer workers or concurrent trials, "
                f"or less {name} per worker"
            )


def scaling_config(config: RunConfig) -> Any:
    """Ray Train's ScalingConfig of ``config``: its workers, each holding ``config.worker_resources``."""
    import ray.train

    return ray.train.ScalingConfig(
        num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker=config.worker_resources
    )


def pin_source(source: str, tracking_uri: str) -> str:
    """``models:/name@alias`` -> ``models:/name/<version>``, so a later stage reads the same weights."""
    if source.startswith("models:/") and "@" in source:
        from .tracking import resolve_alias

        name, _, alias = source[len("models:/") :].partition("@")
        alias, _, rest = alias.partition("/")
        try:
            version = resolve_alias(tracking_uri, name, alias)["version"]
        except UserError as error:
            raise ConfigError(f"{source}: {error}") from None
        return f"models:/{name}/{version}" + (f"/{rest}" if rest else "")
    return source


def resolve_source(source: str, tracking_uri: str, field_name: str) -> str:
    """A local path for a checkpoint/weights source given as a path or an MLflow URI."""
    if source.startswith(URI_SCHEMES):
        from .tracking import download_artifacts

        try:
            return download_artifacts(source, tracking_uri=tracking_uri)
        except UserError as error:
            raise ConfigError(f"{field_name}: {error}") from None
    if not os.path.exists(source):
        raise ConfigError(f"{field_name}: {source} does not exist; allowed: a checkpoint path or an MLflow URI")
    return source


def _float_weights(path: str, field_name: str) -> dict[str, torch.Tensor]:
    """FP weights from an ofq-ray pretrain checkpoint or a plain weights file."""
    try:
        state = read_checkpoint(path)
    except CheckpointError:
        try:
            return _read_state_dict(path if os.path.isfile(path) else os.path.join(path, "state.pt"))
        except UserError:
            raise ConfigError(f"{field_name}: {path} holds neither an ofq-ray checkpoint nor FP weights") from None
    if state["stage"] != "pretrain":
        raise ConfigError(f"{field_name}: {path} is a {state['stage']} checkpoint; allowed: a float (pretrain) one")
    weights: dict[str, torch.Tensor] = state["model_state"]
    return weights


@dataclass
class Sources:
    """What the workers receive besides the config (object-store references, so any node can read them)."""

    init_weights: Any = None  # FP state dict (qat) or quantized state dict (cga)
    init_optimizer: Any = None  # the QAT optimizer state (cga resumes it, as the reference)
    teacher_weights: Any = None
    teacher_source: str | None = None


PRETRAINED = "pretrained:"  # teacher source prefix: the float weights of model.pretrained(_path)


def pretrained_weights(config: RunConfig, info: DatasetInfo, source: str) -> tuple[Any, bool]:
    """The float state dict of ``config.model`` with pretrained weights (``source``: a file, or ``timm`` for
    timm's hub), and whether its classifier head started fresh (seeded) for another class count."""
    hub = source == "timm"
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        try:
            model = create_model(
                config.model.name, info.num_classes, in_chans=info.in_chans, img_size=info.img_size, pretrained=hub
            )
            if hub:
                fresh_head = (
                    getattr(model, "pretrained_cfg", {}).get("num_classes", info.num_classes) != info.num_classes
                )
            else:
                fresh_head = bool(load_pretrained(model, source))
        except UserError as error:
            raise ConfigError(str(error)) from None
    return model.state_dict(), fresh_head


def prepare_sources(config: RunConfig, tracking_uri: str, info: DatasetInfo) -> tuple[dict[str, Any], str | None]:
    """Reads init/teacher sources in the driver; returns plain dicts (to ray.put) and the teacher source.

    A pretrain or qat stage without ``init_from`` starts from ``model.pretrained(_path)`` when set, and
    a qat stage takes its teacher from there unless ``kd.teacher`` names one.
    """
    out: dict[str, Any] = {}
    teacher_source = config.kd.teacher
    loaded: dict[str, tuple[Any, bool]] = {}  # pretrained source -> (weights, fresh head): read once
    if config.init_from is None and config.stage != "cga" and config.has_pretrained:
        source = os.path.abspath(config.model.pretrained_path) if config.model.pretrained_path else "timm"
        loaded[source] = pretrained_weights(config, info, source)
        out["init_weights"] = loaded[source][0]
        if config.stage == "qat" and config.kd.enabled:
            teacher_source = teacher_source or PRETRAINED + source
    if config.init_from is not None:
        path = resolve_source(config.init_from, tracking_uri, "init_from")
        if config.stage == "cga":
            state = read_checkpoint(path)
            previous = checkpoint_config(state)
            if state["stage"] not in ("qat", "cga"):
                raise ConfigError(f"init_from: {config.init_from} is a {state['stage']} checkpoint; allowed: qat, cga")
            if previous.quant != config.quant or previous.model.name != config.model.name:
                raise ConfigError(
                    f"init_from: {config.init_from} was trained as {previous.model.name} with {previous.quant}; "
                    f"this config asks for {config.model.name} with {config.quant}"
                )
            out["init_weights"] = state["model_state"]
            out["init_optimizer"] = state.get("optimizer_state")
            teacher_source = teacher_source or state.get("teacher_source")
        else:
            out["init_weights"] = _float_weights(path, "init_from")
            teacher_source = teacher_source or pin_source(config.init_from, tracking_uri)
    if config.stage != "pretrain" and config.kd.enabled:
        if teacher_source is None:
            raise ConfigError("kd.teacher: no teacher found; allowed: an FP checkpoint path or MLflow URI")
        if teacher_source.startswith(PRETRAINED):
            source = teacher_source[len(PRETRAINED) :]
            weights, fresh_head = loaded.get(source) or pretrained_weights(config, info, source)
            if fresh_head:
                raise ConfigError(
                    f"kd.teacher: the pretrained weights ({source}) have no head for {info.num_classes} classes; "
                    "allowed: an FP checkpoint trained on this data as kd.teacher (or kd.enabled=false)"
                )
            out["teacher_weights"] = weights
        else:
            out["teacher_weights"] = _float_weights(
                resolve_source(teacher_source, tracking_uri, "kd.teacher"), "kd.teacher"
            )
    return out, teacher_source


@dataclass
class TrainingResult:
    run_id: str
    tracking_uri: str
    stage: str
    best: dict[str, float]
    last: dict[str, float]
    history: list[dict[str, float]]
    best_checkpoint: str | None
    last_checkpoint: str | None
    wall_s: float
    artifact_uri: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def dataset_info(config: RunConfig) -> DatasetInfo:
    """Validates the dataset (one-line error if missing) and returns its shape facts."""
    spec = get_spec(config.model.name)
    try:
        _, _, info = build_datasets(
            config.data.name,
            config.data.root,
            config.data.img_size or spec.img_size,
            train_subset=config.data.train_subset,
            val_subset=config.data.val_subset,
            seed=config.seed,
        )
    except UserError as error:  # DatasetMissingError included
        raise ConfigError(str(error)) from None
    if info.in_chans != spec.in_chans and config.model.pretrained:
        raise ConfigError(
            f"data.name: {info.name} has {info.in_chans} channels; {spec.name} was pretrained on {spec.in_chans}"
        )
    return info


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def run_training(
    config: RunConfig,
    *,
    run_id: str | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    ray_callbacks: list[Any] | None = None,
    ray_run_name: str | None = None,
    test_hooks: dict[str, Any] | None = None,
    epoch_offset: int = 0,
    finish_run: bool = True,
    artifact_prefix: str = "",
    address: str | None = None,
    in_process: bool = False,
) -> TrainingResult:
    """Runs one stage end to end; returns where its checkpoints and metrics are.

    Everything that can be checked is checked before an MLflow run is created, so bad input leaves
    nothing behind. ``run_id`` reuses an existing MLflow run (a restarted sweep trial, or the next
    stage of a trial that chains stages: then ``epoch_offset`` continues its epoch axis,
    ``artifact_prefix`` keeps the stages' checkpoints apart and ``finish_run=False`` leaves it open).

    ``in_process`` (a sweep trial with one worker) trains in this process, which already holds the
    worker's resources, instead of starting a Ray Train worker group: same loop, same checkpoint folders
    and retention, epochs reported to Ray Tune directly. A failure is then retried by Tune (the trial
    restarts and resumes from the stage's last checkpoint), and the run is left open for the sweep to
    close.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from .tracking import RunTracker, ensure_experiment, flatten, resolve_tracking_uri

    started = time.time()
    # Ray Train's preemption watcher (an extra actor per run, and an error-level line from Ray core each
    # time) only helps on nodes that announce they will go (spot instances); opt in with =1 there.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    config.check_start()  # a sweep's chained stage is built before its init_from exists; it must have one now
    runs_dir = os.path.abspath(config.runs_dir)
    tracking_uri = resolve_tracking_uri(config.tracking.uri, runs_dir)
    info = dataset_info(config)
    sources, teacher_source = prepare_sources(config, tracking_uri, info)
    ensure_ray(address)
    check_resources(config)

    if run_id is None:
        ensure_experiment(tracking_uri, config.tracking.experiment, runs_dir)
        tracker = RunTracker.create(
            tracking_uri,
            config.tracking.experiment,
            runs_dir,
            run_name=run_name or config.tracking.run_name or f"{config.stage}-{config.model.name}",
            params=flatten(config.to_dict()),
            tags={"ofq.stage": config.stage, "ofq.fingerprint": config.fingerprint(), **(tags or {})},
            parent_run_id=parent_run_id,
            config_yaml=config.to_yaml(),
        )
    else:
        tracker = RunTracker(tracking_uri, run_id)

    loop_config = {
        "config": config.to_dict(),
        "data_info": info.__dict__,
        "tracking_uri": tracking_uri,
        "run_id": tracker.run_id,
        "teacher_source": teacher_source,
        "sources": {k: ray.put(v) for k, v in sources.items() if v is not None},
        "test_hooks": test_hooks or {},
        "epoch_offset": epoch_offset,
    }
    storage = os.path.join(runs_dir, "ray", ray_run_name or f"{config.stage}-{tracker.run_id}")
    if in_process:
        session = LocalSession(storage, config)
        try:
            _train_loop(loop_config, session)
        except BaseException:
            if run_id is None:  # a sweep trial's run stays open: Tune may retry, the sweep closes it
                _close_run(tracker, "FAILED", reused=False)
            raise
        kept, last_path = session.kept(), session.latest()
    else:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=scaling_config(config),
            run_config=ray.train.RunConfig(
                name=os.path.basename(storage),
                storage_path=os.path.dirname(storage),
                failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=config.keep_checkpoints,
                    checkpoint_score_attribute=config.rank.metric,
                    checkpoint_score_order=config.rank.mode,  # type: ignore[arg-type]
                ),
                callbacks=ray_callbacks,
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # type: ignore[call-arg]
            ),
        )
        try:
            result = trainer.fit()
        except BaseException:
            _close_run(tracker, "FAILED", reused=run_id is not None)
            raise
        kept = [(str(c.path), m) for c, m in result.best_checkpoints or []]
        last_path = result.checkpoint.path if result.checkpoint else None
    last_state = read_checkpoint(last_path) if last_path else None
    history: list[dict[str, float]] = last_state["history"] if last_state else []
    best_path = best_checkpoint(kept, config.rank) or last_path
    if best_path:
        tracker.log_artifact(best_path, f"{artifact_prefix}checkpoints/best")
    if last_path and last_path != best_path:
        tracker.log_artifact(last_path, f"{artifact_prefix}checkpoints/last")
    best = config.rank.best(history) or {}
    tracker.set_tags(config.rank.stage_tags(config.stage, best))
    if finish_run:
        _close_run(tracker, "FINISHED", reused=run_id is not None)
    extra: dict[str, Any] = {}
    if config.tracking.register_as and best_path:
        from .tracking import register_checkpoint

        version = register_checkpoint(
            tracking_uri, tracker.run_id, f"{artifact_prefix}checkpoints/best", config.tracking.register_as
        )
        extra["registered"] = f"models:/{config.tracking.register_as}@champion (version {version})"
    return TrainingResult(
        run_id=tracker.run_id,
        tracking_uri=tracking_uri,
        stage=config.stage,
        best=best,
        last=history[-1] if history else {},
        history=history,
        best_checkpoint=best_path,
        last_checkpoint=last_path,
        wall_s=time.time() - started,
        artifact_uri=tracker.artifact_uri,
        extra=extra,
    )


def _close_run(tracker: Any, status: str, *, reused: bool) -> None:
    """Ends the run with ``status``, unless it is a reused run (a sweep trial's) that the sweep closed
    already: when the scheduler stops a trial, the sweep marks its run KILLED before Ray stops the trial,
    and the stop then surfaces here as an error (or, if the workers were on their last epoch, as an
    end); the sweep's outcome stands."""
    if reused:
        try:
            if tracker.info()["status"] != "RUNNING":
                return
        except Exception:  # the store is unreachable: try to close it anyway
            pass
    tracker.finish(status)


def best_checkpoint(kept: list[tuple[str, dict[str, float]]], rank: RankConfig) -> str | None:
    """Of the kept (folder, metrics) checkpoints, the one with the best ranking metric (the earliest epoch on
    ties); None when none is kept."""
    ordered = sorted(kept, key=lambda pair: pair[1].get("epoch", 0.0))
    best = rank.best(ordered, lambda pair: pair[1].get(rank.metric))
    return best[0] if best is not None else None


# --- worker side ------------------------------------------------------------------------------------------


def _kill_hook(spec: dict[str, Any] | None, rank: int) -> Any:
    """Test-only: ``os._exit`` once at (epoch, step) on one rank, as a crashing worker would."""
    if not spec or spec.get("rank", 0) != rank:
        return None

    def hook(epoch: int, step: int) -> None:
        if epoch == spec["epoch"] and step == spec["step"] and not os.path.exists(spec["marker"]):
            with open(spec["marker"], "w") as handle:
                handle.write(f"killed rank {rank} at epoch {epoch} step {step}\n")
            os._exit(1)

    return hook


def _quiet_ray_train_reports() -> None:
    """Ray Train V2 logs every ``ray.train.report`` at INFO (the whole metrics dict, once per epoch and
    worker) under a logger named by its source file, which ``LoggingConfig`` does not reach."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: leave its logging alone
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


class RayTrainSession:
    """The loop's view of a Ray Train worker: its rank, device, the checkpoint to resume from, and where an
    epoch's report goes (``ray.train.report``, which Ray persists and ranks for retention)."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        if self.world > 1 or self.device().type != "cpu":
            return ray.train.torch.prepare_model(model)
        return model

    def resume_from(self) -> str | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return checkpoint.path if checkpoint is not None else None

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None, epoch: int) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if state is not None:
                save_checkpoint(tmp, state)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


class LocalSession:
    """The loop's view of a one-worker stage trained in the calling process (a Ray Tune trial, which holds
    the worker's resources): the same ``checkpoint_*`` folders and retention as Ray Train would keep under
    ``storage`` (the ``keep_checkpoints`` best by the ranking metric, and the latest), and each epoch's
    metrics reported to Ray Tune, whose scheduler may stop the trial there."""

    rank, world = 0, 1

    def __init__(self, storage: str, config: RunConfig) -> None:
        self.storage, self.keep, self.rank_by = storage, config.keep_checkpoints, config.rank
        self.use_gpu = config.use_gpu
        # Each checkpoint's metrics, read once: the folder itself is listed afresh at every look, so what
        # another process wrote or deleted there (a restarted trial's predecessor) is seen as it is.
        self.metrics: dict[str, dict[str, float]] = {}

    def device(self) -> torch.device:
        # Ray hands a trial that holds a GPU exactly that one (CUDA_VISIBLE_DEVICES): it is cuda:0 here.
        return torch.device("cuda", 0) if self.use_gpu else torch.device("cpu")

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def kept(self) -> list[tuple[str, dict[str, float]]]:
        return kept_checkpoints(self.storage, self.metrics)

    def latest(self) -> str | None:
        found = self.kept()
        return found[-1][0] if found else None

    def resume_from(self) -> str | None:
        return self.latest()

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None, epoch: int) -> None:
        from ray import tune

        if state is not None:
            self.save(state, epoch)
        tune.report(metrics)

    def save(self, state: dict[str, Any], epoch: int) -> str:
        path = os.path.join(self.storage, f"checkpoint_{epoch:06d}")
        save_checkpoint(path, state)
        self.metrics[path] = state["history"][-1] if state["history"] else {}
        self._retain()
        return path

    def _retain(self) -> None:
        """Deletes what Ray Train's CheckpointConfig(num_to_keep, score attribute, order) would: every
        checkpoint but the ``keep`` best by the ranking metric (the earliest on ties) and the latest."""
        found = self.kept()
        remaining, kept = list(found), {found[-1][0]} if found else set()
        for _ in range(self.keep):
            best = self.rank_by.best(remaining, lambda pair: pair[1].get(self.rank_by.metric))
            if best is None:  # the rest lack the metric (or it is NaN)
                break
            kept.add(best[0])
            remaining.remove(best)
        for path, _ in found:
            if path not in kept:
                shutil.rmtree(path, ignore_errors=True)
                self.metrics.pop(path, None)


def kept_checkpoints(
    folder: str, metrics: dict[str, dict[str, float]] | None = None
) -> list[tuple[str, dict[str, float]]]:
    """(folder, that epoch's metrics) of every readable ``checkpoint_*`` under a stage's folder (Ray Train's
    or :class:`LocalSession`'s), in name order; one whose state.pt was never written (killed mid-save) or
    is still being written is skipped. ``metrics`` caches what was read, by folder (a checkpoint is written
    once), so a caller that looks every epoch loads each checkpoint once."""
    found = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if not name.startswith("checkpoint_") or not os.path.isdir(path):
            continue
        if metrics is not None and path in metrics:
            found.append((path, metrics[path]))
            continue
        try:
            history = read_checkpoint(path)["history"]
        except CheckpointError:
            continue
        last = history[-1] if history else {}
        if metrics is not None:
            metrics[path] = last
        found.append((path, last))
    return found


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The per-worker loop Ray Train runs: see :func:`_train_loop`."""
    _quiet_ray_train_reports()
    _train_loop(loop_config, RayTrainSession())


def _train_loop(loop_config: dict[str, Any], session: Any) -> None:
    """Build, resume, then one train epoch + eval + MLflow log + checkpoint report per epoch, on the worker
    ``session`` describes (a Ray Train worker, or this process for an in-process trial)."""
    import ray

    from .quant.cost import model_cost
    from .tracking import RunTracker

    entered = time.perf_counter()
    config = config_from_dict(loop_config["config"])
    info = DatasetInfo(**loop_config["data_info"])
    rank, world = session.rank, session.world
    torch.set_num_threads(max(1, int(config.cpus_per_worker)))
    device = session.device()
    sources = {k: ray.get(v) for k, v in loop_config["sources"].items()}

    train_set, train_loader, val_loader = _worker_data(config, info, rank, world)
    model = _worker_model(config, info, sources, world, lambda: _init_batch(config, train_set, info, train_loader))
    model.to(device)
    teacher_fn = _worker_teacher(config, info, sources, device)
    optimizer, schedule, cga, tracker = _worker_optimization(config, model, sources)
    start_epoch, history = _resume(model, optimizer, tracker, session.resume_from())

    # Exact packed size (each layer at its own width) and BitOPs per image: known before training, so
    # free objectives (and budgets) for sweeps; run_cost (ofq_ray.cost) gives the same numbers up front.
    costs = model_cost(model, (info.in_chans, info.img_size, info.img_size))
    model = session.prepare(model)
    if config.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    offset = int(loop_config.get("epoch_offset", 0))
    mixup = _mixup(config, info)
    autocast = torch.bfloat16 if config.precision == "bf16" else None
    kill = _kill_hook(loop_config["test_hooks"].get("kill_at"), rank)
    run = RunTracker(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    if run is not None and history:
        run.sync_history(history)  # epochs checkpointed before a crash but not yet logged
    if run is not None:  # what a run costs before its first step (a sweep's per-trial overhead has it)
        setup = {f"ofq.worker_setup_s.{config.stage}": f"{time.perf_counter() - entered:.2f}"}
        if start_epoch:  # restarted (a lost worker or node): where it picked up
            setup[f"ofq.resumed_at_epoch.{config.stage}"] = str(start_epoch)
        run.set_tags(setup)

    if history and start_epoch >= config.epochs:
        # Restarted after its last epoch (its driver died before it heard): say the final result again,
        # or the scheduler and searcher would see a trial that ended with none.
        session.report(history[-1], None, start_epoch - 1)
    for epoch in range(start_epoch, config.epochs):
        epoch_started = time.perf_counter()
        train_loader.set_epoch(epoch)
        metrics = train_one_epoch(
            model,
            train_loader,
            optimizer,
            schedule,
            epoch,
            device=device,
            teacher=teacher_fn,
            cga=cga,
            tracker=tracker,
            autocast_dtype=autocast,
            clip_grad=config.optim.clip_grad,
            mixup=mixup,
            label_smoothing=config.data.label_smoothing,
            step_hook=kill,
        )
        metrics.update(evaluate(model, val_loader, device=device, autocast_dtype=autocast))
        if tracker is not None:
            metrics.update(tracker.metrics())
            tracker.summary(reset_window=True)
        if cga is not None:
            metrics["cga/frozen_frac"] = cga.frozen_fraction()
        metrics.update(costs)  # model/size_bytes, model/bitops
        metrics["epoch"] = float(offset + epoch)
        metrics["time/epoch_s"] = time.perf_counter() - epoch_started  # training + evaluation
        history.append(metrics)
        if run is not None:
            # Logged before the report: a scheduler may stop the trial as soon as it sees the report.
            # A crash between here and the checkpoint repeats the epoch; MLflow keeps its first values.
            run.sync_history(history)
            sys.stdout.write(_progress_line(config, epoch, metrics) + "\n")
            sys.stdout.flush()
        _report(session, metrics, loop_config, config, info, epoch, model, optimizer, tracker, history)


def _worker_data(config: RunConfig, info: DatasetInfo, rank: int, world: int) -> tuple[Any, Any, Any]:
    """This rank's shard of the train set (a global batch split over the workers) and of the val set."""
    train_set, val_set, _ = build_datasets(
        config.data.name,
        config.data.root,
        info.img_size,
        train_subset=config.data.train_subset,
        val_subset=config.data.val_subset,
        seed=config.seed,
    )
    common: dict[str, Any] = {"rank": rank, "world_size": world, "seed": config.seed}
    train_loader = build_loader(
        train_set,
        info,
        batch_size=config.batch_size // world,
        train=True,
        augment=config.data.augment,
        num_workers=config.data.num_workers,
        **common,
    )
    val_loader = build_loader(
        val_set,
        info,
        batch_size=max(1, config.eval_batch_size // world),
        train=False,
        num_workers=config.data.num_workers,
        **common,
    )
    return train_set, train_loader, val_loader


def _worker_model(
    config: RunConfig, info: DatasetInfo, sources: dict[str, Any], world: int, init_batch: Any
) -> torch.nn.Module:
    """The stage's model: float weights (init_from / pretrained) -> quantized -> (cga) the QAT state,
    (qat) activation steps initialized on ``init_batch()``; identical on every rank."""
    from .quant import init_activation_scales, quantize_model, set_data_parallel_replicas

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = build_model(config, info.num_classes, info.in_chans, info.img_size, quantized=False)
    if config.stage in ("pretrain", "qat") and "init_weights" in sources:  # float weights
        load_model_state(model, sources["init_weights"], config.init_from or "init_from")
    if config.quantized:
        quantize_model(model, config.quant)
    if config.stage == "cga":
        load_model_state(model, sources["init_weights"], config.init_from or "init_from")
    elif config.stage == "qat":
        init_activation_scales(model, init_batch())
    if config.quantized and not config.quant.faithful:
        set_data_parallel_replicas(model, world)
    distilled = getattr(model, "set_distilled_training", None)
    if distilled is not None:
        distilled(True)  # two-head students return (class, distillation) logits while training
    return model


def _worker_teacher(config: RunConfig, info: DatasetInfo, sources: dict[str, Any], device: Any) -> Any:
    """The KD teacher's logits function, or None without a teacher."""
    if "teacher_weights" not in sources:
        return None
    teacher = build_model(config, info.num_classes, info.in_chans, info.img_size, quantized=False)
    load_model_state(teacher, sources["teacher_weights"], "kd.teacher")
    teacher.to(device).eval().requires_grad_(False)
    return lambda images: teacher_logits(teacher, images)


def _worker_optimization(
    config: RunConfig, model: torch.nn.Module, sources: dict[str, Any]
) -> tuple[Any, Any, Any, Any]:
    """(optimizer, LR schedule, CGA or None, oscillation tracker or None)."""
    from .quant.cga import CGA
    from .quant.oscillation import OscillationTracker

    optimizer = build_optimizer(model, config.optim.lr, config.optim.weight_decay)
    if config.stage == "cga" and sources.get("init_optimizer") is not None:
        optimizer.load_state_dict(sources["init_optimizer"])  # CGA continues the QAT optimizer, as the reference
    schedule = LRSchedule(
        lr=config.optim.lr,
        min_lr=config.optim.min_lr,
        epochs=config.epochs,
        warmup_epochs=config.optim.warmup_epochs,
        warmup_lr=config.optim.warmup_lr,
        cooldown_epochs=config.optim.cooldown_epochs,
        kind=config.schedule,
    )
    cga = (
        CGA(model, config.cga.boundary_range, include_merged=config.cga.include_merged)
        if config.stage == "cga"
        else None
    )
    tracker = OscillationTracker(model) if config.quantized and config.track_oscillation else None
    return optimizer, schedule, cga, tracker


def _resume(
    model: torch.nn.Module, optimizer: Any, tracker: Any, path: str | None
) -> tuple[int, list[dict[str, float]]]:
    """(first epoch to train, history so far): from the stage's latest checkpoint after a restart."""
    if path is None:
        return 0, []
    state = read_checkpoint(path)
    load_model_state(model, state["model_state"], path)
    optimizer.load_state_dict(state["optimizer_state"])
    if tracker is not None and state.get("tracker_state"):
        tracker.load_state_dict(state["tracker_state"])
    torch.set_rng_state(state["rng_state"])
    return int(state["epoch"]), list(state["history"])


def _report(
    session: Any,
    metrics: dict[str, float],
    loop_config: dict[str, Any],
    config: RunConfig,
    info: DatasetInfo,
    epoch: int,
    model: torch.nn.Module,
    optimizer: Any,
    tracker: Any,
    history: list[dict[str, float]],
) -> None:
    """Reports the epoch with rank 0's checkpoint (everything a restart resumes from)."""
    state = None
    if session.rank == 0:
        state = {
            "stage": config.stage,
            "config": config.to_dict(),
            "data_info": info.__dict__,
            "epoch": epoch + 1,
            "model_state": unwrap(model).state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "tracker_state": tracker.state_dict() if tracker is not None else {},
            "history": history,
            "rng_state": torch.get_rng_state(),
            "teacher_source": loop_config.get("teacher_source"),
            "mlflow_run_id": loop_config["run_id"],
        }
    session.report(metrics, state, epoch)


def _init_batch(config: RunConfig, train_set: Any, info: DatasetInfo, local_loader: Any) -> torch.Tensor:
    """The batch that initializes LSQ steps: the first global batch, identical on every rank (so N
    workers start like one); ``faithful`` uses the local batch, as the reference (rank 0's wins)."""
    loader = local_loader
    if not config.quant.faithful:
        loader = build_loader(
            train_set,
            info,
            batch_size=min(config.batch_size, 1024),
            train=True,
            augment=config.data.augment,
            rank=0,
            world_size=1,
            seed=config.seed,
        )
    loader.set_epoch(0)
    images, _ = next(iter(loader))
    return images


def _progress_line(config: RunConfig, epoch: int, metrics: dict[str, float]) -> str:
    # (written with sys.stdout.write: Ray Train patches print() to also log, which shows lines twice)
    line = (
        f"[{config.stage}] epoch {epoch + 1}/{config.epochs}  loss {metrics['train/loss']:.4f}  "
        f"top1 {metrics['val/top1']:.2f}  top5 {metrics['val/top5']:.2f}  lr {metrics['lr']:.2e}  "
        f"{metrics['throughput/img_s']:,.0f} img/s"
    )
    if "osc/mean_freq" in metrics:
        line += f"  osc {metrics['osc/mean_freq']:.2e}"
    if "cga/frozen_frac" in metrics:
        line += f"  frozen {100 * metrics['cga/frozen_frac']:.1f}%"
    return line


def _mixup(config: RunConfig, info: DatasetInfo) -> Any:
    if config.data.mixup <= 0 and config.data.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=config.data.mixup,
        cutmix_alpha=config.data.cutmix,
        label_smoothing=config.data.label_smoothing,
        num_classes=info.num_classes,
    )
