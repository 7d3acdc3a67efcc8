"""Shared pieces of the benchmarks: in-process training (no Ray), result files, MLflow logging.

The accuracy and oscillation benchmarks train through ``ofq_ray.engine`` in one process, the same
code the Ray workers run, so their numbers are about the method and not about scheduling.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ofq_ray.data import DatasetInfo, build_datasets, build_loader
from ofq_ray.engine import LRSchedule, build_optimizer, evaluate, train_one_epoch
from ofq_ray.models import create_model, teacher_logits
from ofq_ray.quant import CGA, OscillationTracker, QuantConfig, init_activation_scales, quantize_model

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


@dataclass
class Data:
    train: Any
    val: Any
    info: DatasetInfo
    batch_size: int
    seed: int

    def loaders(self) -> tuple[Any, Any]:
        train = build_loader(
            self.train, self.info, batch_size=self.batch_size, train=True, seed=self.seed, augment=False
        )
        val = build_loader(self.val, self.info, batch_size=1000, train=False)
        return train, val


def fashion(train_subset: int, val_subset: int, batch_size: int, seed: int, img_size: int = 28) -> Data:
    train, val, info = build_datasets(
        "fashion_mnist", None, img_size, train_subset=train_subset, val_subset=val_subset, seed=0
    )
    return Data(train, val, info, batch_size, seed)


@dataclass
class Run:
    """One training stage's per-epoch history (and whatever the hooks collected per step and per epoch)."""

    history: list[dict[str, float]] = field(default_factory=list)
    steps: list[dict[str, float]] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def best(self) -> float:
        return max(row["val/top1"] for row in self.history)

    @property
    def last(self) -> float:
        return self.history[-1]["val/top1"]


def train(
    model: nn.Module,
    data: Data,
    *,
    epochs: int,
    lr: float,
    schedule: str = "cosine",
    warmup_epochs: int = 0,
    teacher: nn.Module | None = None,
    cga: CGA | None = None,
    tracker: OscillationTracker | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    step_hook: Callable[[], dict[str, float]] | None = None,
    epoch_probe: Callable[[], dict[str, Any]] | None = None,
) -> tuple[Run, torch.optim.Optimizer]:
    """Trains ``epochs`` epochs on the CPU through ofq_ray.engine; returns the history and the optimizer.

    ``step_hook`` runs after each optimizer step, ``epoch_probe`` after each epoch's evaluation and
    before the tracker's flip-rate window restarts (so it can read that epoch's window)."""
    device = torch.device("cpu")
    optimizer = optimizer or build_optimizer(model, lr, 0.05)
    plan = LRSchedule(lr=lr, min_lr=min(lr, 1e-5), epochs=epochs, warmup_epochs=warmup_epochs, kind=schedule)
    train_loader, val_loader = data.loaders()
    run = Run()
    start = time.time()
    soft = (lambda images: teacher_logits(teacher, images)) if teacher is not None else None

    class _AfterStep:  # what the engine calls after each optimizer step: the tracker, then the hook
        def update(self) -> None:
            if tracker is not None:
                tracker.update()
            if step_hook is not None:
                run.steps.append(step_hook())

    hooked = _AfterStep() if (tracker is not None or step_hook is not None) else None
    for epoch in range(epochs):
        train_loader.set_epoch(epoch)
        metrics = train_one_epoch(
            model,
            train_loader,
            optimizer,
            plan,
            epoch,
            device=device,
            teacher=soft,
            cga=cga,
            tracker=hooked,  # type: ignore[arg-type]
        )
        metrics.update(evaluate(model, val_loader, device=device))
        if epoch_probe is not None:
            run.probes.append(epoch_probe())
        if tracker is not None:
            metrics.update(tracker.metrics(reset_window=True))
        if cga is not None:
            metrics["cga/frozen_frac"] = cga.frozen_fraction()
        metrics["epoch"] = float(epoch)
        run.history.append(metrics)
    run.wall_s = time.time() - start
    return run, optimizer


def second_stage(
    model: nn.Module,
    data: Data,
    *,
    epochs: int,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, Any],
    cga: CGA | None = None,
    tracker: OscillationTracker | None = None,
    step_hook: Callable[[], dict[str, float]] | None = None,
    epoch_probe: Callable[[], dict[str, Any]] | None = None,
) -> Run:
    """The reference's CGA stage without (``cga=None``) or with CGA: the constant LR 1e-5, continuing
    the QAT optimizer (the object, or a saved state dict of it for a copy of the model)."""
    if isinstance(optimizer, dict):
        state, optimizer = optimizer, build_optimizer(model, 1e-5, 0.05)  # same groups as the QAT one
        optimizer.load_state_dict(state)
    run, _ = train(
        model,
        data,
        epochs=epochs,
        lr=1e-5,
        schedule="constant",
        teacher=teacher,
        cga=cga,
        tracker=tracker,
        optimizer=optimizer,
        step_hook=step_hook,
        epoch_probe=epoch_probe,
    )
    return run


def save_figure(figure: Any, name: str) -> str:
    """Saves a matplotlib figure as docs/<name>.png and returns the path."""
    import matplotlib.pyplot as plt

    os.makedirs(DOCS, exist_ok=True)
    path = os.path.join(DOCS, f"{name}.png")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def fp_model(name: str, data: Data, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, data.info.num_classes, in_chans=data.info.in_chans, img_size=data.info.img_size)


def quantized(fp: nn.Module, config: QuantConfig, data: Data) -> nn.Module:
    model = quantize_model(copy.deepcopy(fp).train(), config)
    loader, _ = data.loaders()
    loader.set_epoch(0)
    images, _ = next(iter(loader))
    init_activation_scales(model, images)
    return model


def frozen_teacher(fp: nn.Module) -> nn.Module:
    return copy.deepcopy(fp).eval().requires_grad_(False)


REFERENCE_TOP1 = 10.0  # a top-1 vs bytes front's reference: chance on 10 classes


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by (top-1 to maximize, bytes to minimize) points and bounded by ``reference``."""
    ref_top1, ref_bytes = reference
    front = sorted((b, t) for t, b in points if t > ref_top1 and b < ref_bytes)  # by bytes, smallest first
    area, best_top1 = 0.0, ref_top1
    for index, (size, top1) in enumerate(front):
        best_top1 = max(best_top1, top1)
        next_size = front[index + 1][0] if index + 1 < len(front) else ref_bytes
        area += (next_size - size) * (best_top1 - ref_top1)
    return area


def trial_points(result: Any) -> list[dict[str, Any]]:
    """A finished sweep's trials as (top-1 at its best epoch, packed bytes) points, with their searched
    values; trials without a result (errored before an epoch) are left out."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(result.tracking_uri)
    points = []
    for t in result.trials:
        if t["best"] is None or t["run_id"] is None:
            continue
        size = client.get_run(t["run_id"]).data.metrics["model/size_bytes"]
        points.append(
            {"trial_id": t["trial_id"], "status": t["status"], "top1": t["best"], "bytes": size, "config": t["config"]}
        )
    return points


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def publish(
    name: str, payload: dict[str, Any], png: str, *, mlflow: bool, params: dict[str, Any], metrics: dict[str, float]
) -> str:
    """Writes benchmarks/results/<name>.json and, with ``mlflow``, logs it and the plot ``png``."""
    path = os.path.join(RESULTS, f"{name}.json")
    os.makedirs(RESULTS, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2, default=float)
    print(f"wrote {path} and {png}")
    if mlflow:
        log_to_mlflow(name, params, metrics, [path, png])
    return path


def log_to_mlflow(name: str, params: dict[str, Any], metrics: dict[str, float], files: list[str]) -> str | None:
    """Logs a benchmark run to the project's MLflow store (experiment "benchmarks"); returns the run id."""
    from ofq_ray.tracking import RunTracker, ensure_experiment, flatten, resolve_tracking_uri

    metrics = {_metric_name(key): float(value) for key, value in metrics.items()}  # checked before the run exists
    runs_dir = os.path.abspath("ofq-runs")
    uri = resolve_tracking_uri(None, runs_dir)
    ensure_experiment(uri, "benchmarks", runs_dir)
    tracker = RunTracker.create(
        uri, "benchmarks", runs_dir, run_name=name, params=flatten(params), tags={"ofq.benchmark": name}
    )
    try:
        if metrics:
            tracker.log_epoch(0, metrics)
        for path in files:
            tracker.log_artifact(path)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return tracker.run_id


def _metric_name(label: str) -> str:
    """A benchmark label as an MLflow metric name: "W2A2 StatsQ+QKR (OFQ)" -> "W2A2_StatsQplusQKR_OFQ"."""
    name = label.replace("+", "plus").replace(" / ", "_over_")
    return re.sub(r"_+", "_", re.sub(r"[^0-9A-Za-z_\-./]", "_", name)).strip("_")
