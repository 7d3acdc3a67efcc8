"""After the trials: the table, the Pareto front, the plots from the sweep's Optuna study, the champion;
and ``ofq-ray best`` over a finished sweep."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, RankConfig, metric_hint
from .spec import Sweep


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    tracking_uri: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    champion: str | None
    wall_s: float
    bytes_kept: int
    pareto: list[dict[str, Any]] = field(default_factory=list)
    rejected: int = 0  # configurations over tune.constraints, rejected before they trained
    budget_stop: str = ""  # why the search ended early when too many were rejected in a row


_STATUS = {"FINISHED": "completed", "KILLED": "stopped", "FAILED": "errored"}


def summarize(sweep: Sweep, grid: Any, context: dict[str, Any], parent: Any, log: Any) -> SweepResult:
    """Reads each trial's outcome from its MLflow run (closed by the trial or by :class:`TrialLifecycle` as
    it ended), frees stopped trials' checkpoints, registers the champion, logs the summary."""
    from ..tracking import RunTracker, register_checkpoint, sanitize_model_name, search_runs

    uri, runs_dir = context["tracking_uri"], context["runs_dir"]
    rank = sweep.rank
    metric = rank.metric
    children = {
        run["tags"].get("ofq.trial_id"): run
        for run in search_runs(uri, sweep.experiment, f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    }
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    trials = []
    for result in grid:
        trial_id = os.path.basename(result.path)  # see trial_dirname
        child = children.get(trial_id)
        if child is not None and child["status"] == "RUNNING":
            # Tune ends the trials still running when the sweep ends (its time budget, or the cluster lost the
            # nodes to run them) without a trial event.
            why = context.get("stopped_by") or ("time budget" if sweep.tune.time_budget_s is not None else "sweep end")
            tracker = RunTracker(uri, child["run_id"])
            tracker.set_tags({"ofq.stopped_by": why})
            tracker.finish("KILLED")
            child["status"] = "KILLED"
        status = "errored" if result.error is not None else _STATUS.get(child["status"] if child else "", "stopped")
        history = sorted(client.get_metric_history(child["run_id"], metric), key=lambda m: m.step) if child else []
        last_stage = [m for m in history if m.step >= context["ranked_from_epoch"]]
        best_point = rank.best(last_stage, lambda m: m.value)  # the epoch its checkpoints/best holds
        best_value = best_point.value if best_point is not None else None
        if status == "stopped" and sweep.tune.delete_stopped_checkpoints:
            for folder in _trial_checkpoint_dirs(runs_dir, context["tune_name"], trial_id):
                shutil.rmtree(folder, ignore_errors=True)
        trials.append(
            {
                "trial_id": trial_id,
                "status": status,
                "epochs": len({m.step for m in history}),
                "best": best_value,
                "best_epoch": best_point.step if best_point is not None else None,
                # the first objective at its best epoch (the checkpoint kept), the others as last reported
                "objectives": {
                    m: best_value if m == metric else (child["metrics"].get(m) if child else None)
                    for m in sweep.tune.metrics
                },
                "config": dict(result.config or {}),
                "costs": {m: child["metrics"].get(m) if child else None for m in sweep.tune.constraints},
                "run_id": child["run_id"] if child else None,
                "overhead_s": _float_tag(child, "ofq.overhead_s"),
                "worker_setup_s": sum(
                    _float_tag(child, f"ofq.worker_setup_s.{stage}") or 0.0 for stage in context["trial_stages"]
                ),
            }
        )
    completed = [t for t in trials if t["status"] == "completed" and t["best"] is not None and t["run_id"]]
    # Ties (RankConfig.best takes the first): the earlier best epoch, then the earlier started run, as in best_trial.
    started = {run["run_id"]: run["start_time"] for run in children.values()}
    completed.sort(key=lambda t: (t["best_epoch"], started[t["run_id"]]))
    best = rank.best(completed, lambda t: t["best"])
    champion = None
    if best is not None and sweep.mlflow.register:
        name = sanitize_model_name(sweep.name)
        tags = {
            "ofq.sweep": sweep.name,
            "ofq.rank": f"{metric} {rank.mode}",
            f"ofq.best_{rank.slug}": _fmt(best["best"]),
            "ofq.best_epoch": str(best["best_epoch"]),
        }
        searched = ", ".join(f"`{k}`={_fmt(v)}" for k, v in best["config"].items()) or "none"
        version = register_checkpoint(
            uri,
            best["run_id"],
            "checkpoints/best",
            name,
            tags=tags,
            description=(
                f"Champion of sweep `{sweep.name}` (experiment `{sweep.experiment}`, parent run "
                f"`{parent.run_id}`): trial `{best['trial_id']}`, {metric} ({rank.mode}) = {_fmt(best['best'])} "
                f"at epoch {best['best_epoch']}; searched values: {searched}."
            ),
            model_description=(
                f"Quantized models of the ofq-ray sweep `{sweep.name}` (experiment `{sweep.experiment}`): each "
                f"version is a sweep's best trial by {metric} ({rank.mode}); the alias `champion` is the latest."
            ),
        )
        champion = f"models:/{name}@champion"
        parent.set_tags({"ofq.champion": f"{champion} (version {version})"})
        log(
            f"[sweep] champion: trial {best['trial_id']} {metric} {best['best']:.4g} (epoch {best['best_epoch']}) "
            f"-> {champion} (version {version})"
        )
    if best is not None:
        _log_best_metrics(client, parent.run_id, best["run_id"], best["best_epoch"])
    pareto = _pareto_front(trials, sweep) if sweep.tune.multi_objective else []
    bytes_kept = _bytes_kept(runs_dir, context["tune_name"], uri, [t["run_id"] for t in trials if t["run_id"]])
    result = SweepResult(sweep.name, parent.run_id, uri, trials, best, champion, 0.0, bytes_kept, pareto)
    if sweep.tune.constraints:
        result.rejected, result.budget_stop = _rejections(context)
    _log_summary(sweep, result, parent, log, context)
    return result


BEST_PREFIX = "best/"


def _log_best_metrics(client: Any, parent_run_id: str, run_id: str, epoch: int) -> None:
    """The best trial's metrics on the sweep's parent run, so the runs table shows them on its row: each at
    the best epoch (the checkpoint registered), or as last logged if it was not logged then (costs logged
    once). Named ``best/<metric>``: not the trial's own names, so nothing that ranks or plots runs by
    ``val/top1`` takes the parent for a run that trained, and the name says it is a best, not a last value."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []
    for key, last in client.get_run(run_id).data.metrics.items():
        at_best = [m.value for m in client.get_metric_history(run_id, key) if m.step == epoch]
        metrics.append(Metric(f"{BEST_PREFIX}{key}", at_best[-1] if at_best else last, now, 0))
    if metrics:
        client.log_batch(parent_run_id, metrics=metrics, synchronous=True)


def _rejections(context: dict[str, Any]) -> tuple[int, str]:
    """How many configurations the budget rejected (from the sweep's Optuna study, so a resumed sweep counts
    them all) and why the search stopped early, if it did."""
    import optuna

    from .budget import REJECTED, STOPPED

    study = optuna.load_study(study_name=context["tune_name"], storage=context["optuna_storage"])
    rejected = sum(REJECTED in trial.user_attrs for trial in study.get_trials(deepcopy=False))
    return rejected, str(study.user_attrs.get(STOPPED, ""))


def _trial_checkpoint_dirs(runs_dir: str, tune_name: str, trial_id: str) -> list[str]:
    root = os.path.join(runs_dir, "ray")
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, d) for d in os.listdir(root) if d.startswith(f"{tune_name}-{trial_id}-")]


def _folder_bytes(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files if os.path.isfile(os.path.join(folder, f)))
    return total


def _bytes_kept(runs_dir: str, tune_name: str, uri: str, run_ids: list[str]) -> int:
    """Ray's checkpoints of this sweep plus its trials' MLflow artifacts, listed through the tracking store:
    behind a tracking server they are not under this machine's runs folder."""
    from ..tracking import artifact_bytes

    root = os.path.join(runs_dir, "ray")
    ray_bytes = sum(
        _folder_bytes(os.path.join(root, d))
        for d in (os.listdir(root) if os.path.isdir(root) else [])
        if d.startswith(f"{tune_name}-")
    )
    return ray_bytes + artifact_bytes(uri, run_ids)


def _pareto_front(trials: list[dict[str, Any]], sweep: Sweep) -> list[dict[str, Any]]:
    """Non-dominated trials. Stopped trials count too: their size is exact and their accuracy a lower
    bound, so a small model that ASHA stopped can still be on the front (marked by its status)."""
    points = [t for t in trials if t["status"] != "errored" and all(v is not None for v in t["objectives"].values())]
    signs = [1 if mode == "max" else -1 for mode in sweep.tune.modes]

    def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
        pairs = [
            (s * a["objectives"][m], s * b["objectives"][m]) for m, s in zip(sweep.tune.metrics, signs, strict=True)
        ]
        return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)

    return [p for p in points if not any(dominates(q, p) for q in points if q is not p)]


def _log_summary(sweep: Sweep, result: SweepResult, parent: Any, log: Any, context: dict[str, Any]) -> None:
    import tempfile

    from .budget import describe_constraints

    metric = sweep.tune.metrics[0]
    costs = list(sweep.tune.constraints)
    lines = [
        f"| trial | status | epochs | best {metric} | " + " | ".join([*sweep.search, *costs]) + " | run |",
        "|" + "---|" * (5 + len(sweep.search) + len(costs)),
    ]
    for t in sorted(
        result.trials,
        key=lambda t: math.inf if t["best"] is None else (-t["best"] if sweep.tune.modes[0] == "max" else t["best"]),
    ):
        exact = ["-" if t["costs"][m] is None else f"{t['costs'][m]:.0f}" for m in costs]  # bytes, BitOPs
        params = " | ".join([*(_fmt(t["config"].get(k)) for k in sweep.search), *exact])
        best = "-" if t["best"] is None else _fmt(t["best"])
        lines.append(f"| {t['trial_id']} | {t['status']} | {t['epochs']} | {best} | {params} | {t['run_id'] or '-'} |")
    table = "\n".join(lines)
    counts = {s: sum(t["status"] == s for t in result.trials) for s in ("completed", "stopped", "errored")}
    summary = (
        f"\nsweep {sweep.name}: {len(result.trials)} trials ({counts['completed']} completed, "
        f"{counts['stopped']} stopped by the scheduler, {counts['errored']} errored); "
        f"checkpoints kept: {result.bytes_kept / 2**20:.1f} MiB\n"
    )
    overheads = sorted(t["overhead_s"] for t in result.trials if t["overhead_s"] is not None)
    if overheads:
        setups = sorted(t["worker_setup_s"] for t in result.trials if t["overhead_s"] is not None)
        summary += (
            "Ray overhead per trial (wall time outside training and evaluation): "
            f"median {statistics.median(overheads):.1f} s, "
            f"max {overheads[-1]:.1f} s; of it, the workers' setup (data, model, teacher): median "
            f"{statistics.median(setups):.1f} s\n"
        )
    if sweep.tune.constraints:
        summary += (
            f"budget ({describe_constraints(sweep.tune.constraints)}): {result.rejected} configurations over budget "
            "rejected before training\n"
        )
        if result.budget_stop:
            summary += f"budget: {result.budget_stop}\n"
    summary += f"{table}\n"
    if result.best:
        top = result.best
        summary += f"\nbest: trial {top['trial_id']} {metric} {_fmt(top['best'])}  {_short(top['config'])}\n"
        summary += f"      MLflow run {result.best['run_id']}  model {result.champion or '-'}\n"
    if result.pareto:
        summary += (
            "pareto front: "
            + "; ".join(
                ", ".join(f"{m}={_fmt(p['objectives'][m])}" for m in sweep.tune.metrics)
                + f" ({p['trial_id']}, {p['status']})"
                for p in result.pareto
            )
            + "\n"
        )
    log(summary)
    markdown = _markdown(summary)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "summary.md"), "w") as handle:
            handle.write(markdown)
        with open(os.path.join(tmp, "trials.json"), "w") as handle:
            json.dump(result.trials, handle, indent=2, default=str)
        for path in _plots(sweep, context, tmp).values():
            parent.log_artifact(path, "plots")
        parent.log_artifact(os.path.join(tmp, "summary.md"))
        parent.log_artifact(os.path.join(tmp, "trials.json"))
    tags = {
        "ofq.best_trial": result.best["trial_id"] if result.best else "",
        f"ofq.best_{metric}": _fmt(result.best["best"]) if result.best else "",
        # The run's description in the MLflow UI, rendered as markdown: what a user opening the sweep sees.
        NOTE_TAG: _note(markdown),
    }
    if overheads:
        tags["ofq.overhead_s_median"] = f"{statistics.median(overheads):.2f}"
    if sweep.tune.constraints:
        tags["ofq.constraints"] = describe_constraints(sweep.tune.constraints)
        tags["ofq.rejected_over_budget"] = str(result.rejected)
        if result.budget_stop:
            tags["ofq.budget_stop"] = result.budget_stop
    parent.set_tags(tags)


NOTE_TAG = "mlflow.note.content"  # MLflow's run description


def _float_tag(run: dict[str, Any] | None, key: str) -> float | None:
    value = (run or {}).get("tags", {}).get(key)
    return float(value) if value else None


def _markdown(summary: str) -> str:
    """The terminal summary as markdown: each line its own paragraph, the table's rows together."""
    out: list[str] = []
    in_table = False
    for line in (line.strip() for line in summary.strip().splitlines()):
        if not line:
            continue
        row = line.startswith("|")
        if out and not (row and in_table):
            out.append("")
        out.append(line)
        in_table = row
    return "\n".join(out) + "\n"


def _note(markdown: str) -> str:
    """``markdown`` within MLflow's tag limit: the table's last rows (the worst trials) give way first."""
    from ..tracking import MAX_TAG_VALUE_LENGTH

    lines = markdown.splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("| ")][1:]  # not the header
    dropped = 0
    while len("\n".join(lines)) > MAX_TAG_VALUE_LENGTH - 100 and rows:
        del lines[rows.pop()]
        dropped += 1
    if dropped:
        end = max((i for i, line in enumerate(lines) if line.startswith("|")), default=len(lines) - 1)
        lines.insert(end + 1, f"\n({dropped} more trials in the artifact summary.md)")
    return "\n".join(lines)[:MAX_TAG_VALUE_LENGTH]


def _fmt(value: Any) -> str:
    """4 significant digits, but whole numbers (bytes, BitOPs) in full: 106028, not 1.06e+05."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plots(sweep: Sweep, context: dict[str, Any], folder: str) -> dict[str, str]:
    """Optuna's plots of the sweep's own study (what the searcher saw, from its storage): the history,
    parameter importances and parallel coordinates for one objective; the Pareto front and the
    importances per objective for several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = optuna.load_study(study_name=context["tune_name"], storage=context["optuna_storage"])
    plots: dict[str, str] = {}
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(done) < 2:
        return plots
    names = sweep.tune.metrics
    makers: dict[str, Any] = {}
    if sweep.tune.multi_objective:
        makers["pareto_front"] = lambda: ovm.plot_pareto_front(study, target_names=names)
        for index, name in enumerate(names):
            slug = name.replace("/", "_")
            if len(sweep.search) > 1:
                makers[f"param_importances_{slug}"] = lambda i=index, n=name: ovm.plot_param_importances(
                    study, target=lambda t: t.values[i], target_name=n
                )
    else:
        makers["history"] = lambda: ovm.plot_optimization_history(study, target_name=names[0])
        makers["parallel_coordinate"] = lambda: ovm.plot_parallel_coordinate(study, target_name=names[0])
        if len(sweep.search) > 1:
            makers["param_importances"] = lambda: ovm.plot_param_importances(study, target_name=names[0])
    for name, make in makers.items():
        try:
            axes = make()
            figure = axes.figure if hasattr(axes, "figure") else plt.gcf()
            path = os.path.join(folder, f"{name}.png")
            figure.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(figure)
            plots[name] = path
        except (ValueError, RuntimeError) as error:  # e.g. importances need variance in the results
            print(f"[sweep] plot {name} skipped: {error}")
    return plots


# --- after the sweep ---------------------------------------------------------------------------------------


def best_trial(name: str, tracking_uri: str, metric: str | None = None, mode: str | None = None) -> dict[str, Any]:
    """The best finished trial of the latest sweep named ``name`` (for ``ofq-ray best``).

    ``metric``/``mode`` default to the sweep's own ranking (its ``tune.metric``/``tune.mode``, which
    also chose each trial's checkpoint and the champion); ``val/top1``/``max`` for sweeps that predate it.
    """
    from ..tracking import resolve_alias, sanitize_model_name, search_runs

    parents = search_runs(tracking_uri, name, "tags.`ofq.kind` = 'sweep'", order_by=["attributes.start_time DESC"])
    if not parents:
        raise ConfigError(f"sweep: no sweep named {name!r} in {tracking_uri}")
    parent = parents[0]
    tags = parent["tags"]
    own = RankConfig(tags.get("ofq.rank.metric", RankConfig.metric), tags.get("ofq.rank.mode", RankConfig.mode))
    metric = metric or own.metric
    rank = RankConfig(metric, mode or (own.mode if metric == own.metric else "max"))
    children = search_runs(tracking_uri, name, f"tags.`mlflow.parentRunId` = '{parent['run_id']}'")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    # Rank by each trial's best epoch of its last stage (its registered checkpoint), as the sweep does when it
    # picks the champion.
    first = int(tags.get("ofq.rank.from_epoch", 0))
    peak: dict[str, Any] = {}
    for child in children:
        if child["status"] == "FINISHED" and metric in child["metrics"]:
            history = sorted(client.get_metric_history(child["run_id"], metric), key=lambda m: m.step)
            point = rank.best([m for m in history if m.step >= first], lambda m: m.value)
            if point is not None:
                peak[child["run_id"]] = point
    # Ties as in the champion's choice (_finish): the earlier best epoch, then the earlier started run.
    candidates = sorted(
        (c for c in children if c["run_id"] in peak), key=lambda c: (peak[c["run_id"]].step, c["start_time"])
    )
    best = rank.best(candidates, lambda c: peak[c["run_id"]].value)
    if best is None:
        logged = sorted({m for c in children for m in c["metrics"]})
        hint = "" if metric in logged else f"; logged: {', '.join(logged) or 'nothing'}{metric_hint(metric, logged)}"
        raise ConfigError(f"sweep: {name!r} has no finished trial with metric {metric!r}{hint}")
    out = {
        "sweep": name,
        "parent_run_id": parent["run_id"],
        "trial_id": best["tags"].get("ofq.trial_id"),
        "run_id": best["run_id"],
        "rank": f"{rank.metric} {rank.mode}",
        f"best_{metric}": peak[best["run_id"]].value,
        "best_epoch": peak[best["run_id"]].step,
        "metrics": best["metrics"],
        "params": {k[len("search.") :]: v for k, v in best["params"].items() if k.startswith("search.")},
        "checkpoint_uri": f"runs:/{best['run_id']}/checkpoints/best",
        "trials": len(children),
    }
    try:
        alias = resolve_alias(tracking_uri, sanitize_model_name(name))
        out["champion"] = (
            f"models:/{sanitize_model_name(name)}@champion (version {alias['version']}, run {alias['run_id']})"
        )
    except ValueError:
        out["champion"] = None
    return out


def _short(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())
