"""``ofq-ray``: pretrain | train | eval (and, with the sweep layer, tune | best | ui | export).

Bad input is reported as one line, ``ofq-ray: error: <key>: ...``, with exit status 2 and nothing
created (no MLflow run, no checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
from collections.abc import Callable
from typing import Any

from .config import RunConfig, load_config
from .errors import ClusterError, ConfigError, UsageError, UserError

USAGE_ERROR = 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by its dotted key, e.g. --set optim.lr=1e-4 (repeatable)",
    )
    parser.add_argument("--workers", type=int, default=None, help="Ray Train workers (overrides `workers`)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def _load(args: argparse.Namespace, stage: str | None = None) -> RunConfig:
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"workers={args.workers}")
    if stage is not None:
        overrides.append(f"stage={stage}")
    return load_config(args.config, overrides)


def _summary(config: RunConfig, result: Any) -> None:
    best, metric = result.best, config.rank.metric
    print(
        f"\n{result.stage} finished in {result.wall_s:.0f} s: best {metric} {best.get(metric, float('nan')):.4g} "
        f"(epoch {int(best.get('epoch', -1)) + 1}, ranked by {metric} {config.rank.mode}; "
        f"val/top1 {best.get('val/top1', float('nan')):.2f}), last {result.last.get(metric, float('nan')):.4g}\n"
        f"  MLflow run:  {result.run_id}  ({result.tracking_uri})\n"
        f"  checkpoint:  runs:/{result.run_id}/checkpoints/best   (local: {result.best_checkpoint})"
    )
    if "registered" in result.extra:
        print(f"  registered:  {result.extra['registered']}")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .train import run_training

    config = _load(args, stage="pretrain")
    _summary(config, run_training(config, address=args.address))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import run_training

    config = _load(args)
    if config.stage == "pretrain":
        raise ConfigError(
            "stage: 'pretrain' is not allowed for `ofq-ray train`; allowed: qat, cga (or `ofq-ray pretrain`)"
        )
    _summary(config, run_training(config, address=args.address))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import model_from_checkpoint
    from .data import build_datasets, build_loader
    from .engine import evaluate
    from .tracking import resolve_tracking_uri
    from .train import resolve_source

    base = load_config(args.config, args.overrides) if args.config else None
    runs_dir = os.path.abspath(base.runs_dir if base else "ofq-runs")
    tracking_uri = resolve_tracking_uri(base.tracking.uri if base else None, runs_dir)
    path = resolve_source(args.checkpoint, tracking_uri, "--checkpoint")
    model, state = model_from_checkpoint(path)
    config = base or load_config(None, base=state["config"])
    info = state["data_info"]
    _, val_set, data_info = build_datasets(
        config.data.name, config.data.root, info["img_size"], val_subset=config.data.val_subset, seed=config.seed
    )
    if data_info.num_classes != info["num_classes"]:
        raise ConfigError(f"data.name: {data_info.num_classes} classes, but the checkpoint has {info['num_classes']}")
    loader = build_loader(val_set, data_info, batch_size=config.eval_batch_size, train=False)
    device = torch.device("cuda" if torch.cuda.is_available() and config.use_gpu else "cpu")
    metrics = evaluate(model.to(device), loader, device=device)
    metrics["examples"] = data_info.val_size
    print(json.dumps({"checkpoint": args.checkpoint, "stage": state["stage"], **metrics}, indent=2))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .sweep import load_sweep, run_sweep

    sweep = load_sweep(args.spec, args.overrides)
    result = run_sweep(sweep, resume=args.resume, address=args.address)
    stopped = sum(t["status"] == "stopped" for t in result.trials)
    print(
        f"sweep {result.name} done in {result.wall_s:.0f} s: {len(result.trials)} trials, {stopped} stopped early; "
        f"MLflow parent run {result.parent_run_id} ({result.tracking_uri})"
    )
    print(where_to_look(result.tracking_uri, sweep.experiment, sweep.base["runs_dir"]))
    return 0 if result.best is not None else 1


def where_to_look(uri: str, experiment: str, runs_dir: str) -> str:
    """Where the sweep's runs are in the MLflow UI: the page on a tracking server, or for a local store the
    ``ofq-ray ui`` command that serves it and the page it will have."""
    import shlex
    import urllib.parse

    from .tracking import _client, default_tracking_uri, runs_view_url

    found = _client(uri).get_experiment_by_name(experiment)
    if found is None:
        return f"  MLflow UI:   no experiment {experiment!r} in {uri}"
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        return f"  MLflow UI:   {runs_view_url(uri, found.experiment_id)}"
    if scheme == "databricks":
        return f"  MLflow UI:   experiment {experiment!r} (id {found.experiment_id}) in your Databricks workspace"
    command = f"ofq-ray ui --runs-dir {shlex.quote(runs_dir)}"
    if uri != default_tracking_uri(runs_dir):
        command += f" --tracking-uri {shlex.quote(uri)}"
    return (
        f"  MLflow UI:   {command}\n"
        f"               then open {runs_view_url('http://127.0.0.1:5000', found.experiment_id)}"
    )


def _tracking(args: argparse.Namespace) -> str:
    from .tracking import resolve_tracking_uri

    return resolve_tracking_uri(args.tracking_uri, os.path.abspath(args.runs_dir))


def cmd_best(args: argparse.Namespace) -> int:
    from .sweep import best_trial

    print(json.dumps(best_trial(args.sweep, _tracking(args), args.metric, args.mode), indent=2, default=str))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """``mlflow server`` over the runs folder's store, proxying artifacts: the one process that opens the
    sqlite file, and the tracking server every process (and every node) logs and uploads through."""
    from .tracking import ARTIFACTS_DIR_NAME, default_tracking_uri

    def is_server(uri: str) -> bool:
        return urllib.parse.urlparse(uri).scheme in ("http", "https", "databricks")

    if args.tracking_uri and is_server(args.tracking_uri):
        raise UsageError(
            f"--tracking-uri: {args.tracking_uri} is a tracking server already (open it in a browser); "
            "`ofq-ray ui` serves a database store, by default the runs folder's sqlite file"
        )
    uri = _tracking(args)
    if is_server(uri):  # MLFLOW_TRACKING_URI names where clients log, likely this very server: serve the folder
        uri = default_tracking_uri(os.path.abspath(args.runs_dir))
    artifacts = os.path.join(os.path.abspath(args.runs_dir), ARTIFACTS_DIR_NAME)
    os.makedirs(artifacts, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        # New experiments get mlflow-artifacts:/ locations: clients upload and download over HTTP, and the
        # server keeps the files under <runs_dir>/mlartifacts. Experiments a local store created earlier keep
        # their file:// locations; the server reads those folders directly, so the UI still shows them.
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        str(args.workers),
    ]
    # MLflow 3.x's server also starts a job runner and three task queues for its GenAI features (scorers,
    # trace roll-ups), none of which a training store uses: off unless the user asks for them.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print(
        f"MLflow UI and tracking server on http://{args.host}:{args.port} (store {uri}, artifacts {artifacts}); "
        f"Ctrl-C stops it\n"
        f"  log through it with MLFLOW_TRACKING_URI=http://{args.host}:{args.port}\n"
        "  MLflow 3.x opens in its GenAI view: pick 'Model training' once in the GenAI / Model training switch "
        "on the home page (the browser keeps it), or add ?workflowType=machine_learning to a page's URL",
        flush=True,
    )
    os.execv(sys.executable, command)
    return 0  # not reached


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_model
    from .quant import export_quantized
    from .quant.export import size_table

    model = load_model(args.checkpoint, tracking_uri=args.tracking_uri, runs_dir=args.runs_dir)
    export = export_quantized(model)
    if not export["layers"]:
        raise UsageError(f"--checkpoint: {args.checkpoint} holds a float model; allowed: a qat or cga checkpoint")
    torch.save(export, args.out)
    size = export["size"]
    print(
        f"wrote {args.out}: {len(export['layers'])} quantized tensors, codes {size['code_bytes']:,} B + scales "
        f"{size['scale_bytes']:,} B + float {size['float_bytes']:,} B = {size['total_bytes']:,} B"
    )
    print(size_table(size))
    return 0


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", default="ofq-runs", help="the runs folder (default ./ofq-runs)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the runs folder's sqlite store)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ofq-ray", description="OFQ quantization-aware training on Ray, tracked in MLflow"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    pretrain = commands.add_parser("pretrain", help="train the FP model (QAT init and KD teacher)")
    _common(pretrain)
    pretrain.set_defaults(func=cmd_pretrain)
    train = commands.add_parser("train", help="run a qat or cga stage (stage from the config)")
    _common(train)
    train.set_defaults(func=cmd_train)
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint (path or MLflow URI) on the validation split")
    evaluate.add_argument("config", nargs="?", default=None, help="run config for the data (default: the checkpoint's)")
    evaluate.add_argument(
        "--checkpoint", required=True, help="checkpoint dir/file, runs:/<id>/checkpoints/best, models:/name@alias"
    )
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    evaluate.set_defaults(func=cmd_eval)
    tune = commands.add_parser("tune", help="run a sweep (Ray Tune + Optuna + ASHA) from a search-space YAML")
    tune.add_argument("spec", help="sweep spec YAML (see search_spaces/)")
    tune.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec value, e.g. --set tune.num_samples=4 or --set base.epochs=2",
    )
    tune.add_argument("--resume", action="store_true", help="continue the last interrupted run of this sweep")
    tune.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    tune.set_defaults(func=cmd_tune)
    best = commands.add_parser("best", help="the best trial of a sweep, its metrics and model URI")
    best.add_argument("sweep", help="sweep name (its MLflow experiment)")
    best.add_argument("--metric", default=None, help="rank by this metric (default: the sweep's tune.metric)")
    best.add_argument("--mode", default=None, choices=("max", "min"), help="default: the sweep's tune.mode")
    _store_options(best)
    best.set_defaults(func=cmd_best)
    ui = commands.add_parser("ui", help="the MLflow UI over the project's store, on 127.0.0.1")
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
    _store_options(ui)
    ui.set_defaults(func=cmd_ui)
    export = commands.add_parser("export", help="packed integer codes + scales of a quantized checkpoint")
    export.add_argument("--checkpoint", required=True, help="checkpoint path or MLflow URI (models:/name@champion)")
    export.add_argument("--out", required=True, help="output file (torch.save; loads with weights_only=True)")
    _store_options(export)
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except UserError as error:  # bad input (ofq_ray.errors); anything else is a bug and keeps its traceback
        print(f"ofq-ray: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except ClusterError as error:  # the cluster, not the input: say what is missing
        print(f"ofq-ray: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ofq-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
