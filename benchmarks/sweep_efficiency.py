"""ASHA vs running every trial to its full budget: same search space, same seeded configurations.

    python benchmarks/sweep_efficiency.py --quick     # 12 W2A2 QAT trials x 9 epochs on 8000 images, local Ray
    python benchmarks/sweep_efficiency.py             # 24 trials on 30000 images

The random searcher is used so both sweeps draw the same configurations; the FP stage is shared
(trained once, cached). Reports the best top-1 found, the trial-epochs spent and the wall time of
each, writes benchmarks/results/sweep_efficiency.json and docs/sweep_efficiency.png.
Target: ASHA's best within 0.3 points of the full-budget best, with at most 40 % of the trial-epochs.
"""

from __future__ import annotations

import argparse
import os
import time

from _common import machine, publish, save_figure

from ofq_ray.tune import run_sweep, sweep_from_dict


def spec(name: str, scheduler: object, quick: bool, runs_dir: str) -> dict:
    return {
        "name": name,
        "base": {
            "stage": "qat",
            "model": {"name": "vit_fmnist_small"},
            "data": {
                "name": "fashion_mnist",
                "train_subset": 8000 if quick else 30000,
                "val_subset": 2000 if quick else 5000,
                "augment": False,
            },
            "quant": {"weight_bits": 2, "act_bits": 2},
            "epochs": 9,
            "batch_size": 128,
            "runs_dir": runs_dir,
        },
        "stages": {"pretrain": {"epochs": 5 if quick else 10, "optim": {"lr": 2.0e-3, "warmup_epochs": 1}}},
        "search": {"optim.lr": {"loguniform": [1.0e-5, 3.0e-3]}, "optim.weight_decay": {"uniform": [0.0, 0.1]}},
        "tune": {
            "num_samples": 12 if quick else 24,
            "searcher": "random",
            "scheduler": scheduler,
            "seed": 0,
            "max_concurrent_trials": 2,
            "resources_per_worker": {"CPU": 0.99},
        },
        "mlflow": {"experiment": name, "register": False},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs-dir", default="ofq-runs")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args(argv)
    runs_dir = os.path.abspath(args.runs_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {}
    for label, scheduler in (("full budget", "none"), ("ASHA", {"asha": {"grace_period": 1, "reduction_factor": 3}})):
        sweep = sweep_from_dict(spec(f"efficiency-{label.split()[0].lower()}-{stamp}", scheduler, args.quick, runs_dir))
        started = time.time()
        result = run_sweep(sweep, log=lambda text: None)
        results[label] = {
            "best_top1": max(t["best"] for t in result.trials if t["best"] is not None),
            "trial_epochs": sum(t["epochs"] for t in result.trials),
            "stopped": sum(t["status"] == "stopped" for t in result.trials),
            "wall_s": time.time() - started,
            "trials": [{k: t[k] for k in ("trial_id", "status", "epochs", "best", "config")} for t in result.trials],
        }
    full, asha = results["full budget"], results["ASHA"]
    ratios = {
        "top1_gap_points": full["best_top1"] - asha["best_top1"],
        "trial_epoch_fraction": asha["trial_epochs"] / full["trial_epochs"],
        "wall_fraction": asha["wall_s"] / full["wall_s"],
    }
    targets = {
        "within_0.3_points": ratios["top1_gap_points"] <= 0.3,
        "at_most_40pct_epochs": ratios["trial_epoch_fraction"] <= 0.4,
    }
    print(f"\n{'':<13}{'best top-1':>12}{'trial-epochs':>14}{'stopped':>9}{'wall s':>9}")
    for label, row in results.items():
        print(f"{label:<13}{row['best_top1']:>12.2f}{row['trial_epochs']:>14}{row['stopped']:>9}{row['wall_s']:>9.0f}")
    print(
        f"ASHA - full: {-ratios['top1_gap_points']:+.2f} points with {100 * ratios['trial_epoch_fraction']:.0f} % of "
        f"the trial-epochs and {100 * ratios['wall_fraction']:.0f} % of the wall time; "
        + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in targets.items())
    )
    payload = {
        "benchmark": "sweep_efficiency",
        "quick": args.quick,
        "machine": machine(),
        "results": results,
        "ratios": ratios,
        "targets": targets,
    }
    publish(
        "sweep_efficiency",
        payload,
        plot(results),
        mlflow=not args.no_mlflow,
        params={"quick": args.quick},
        metrics=ratios,
    )
    return 0


def plot(results: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    labels = list(results)
    axes[0].bar(labels, [results[k]["trial_epochs"] for k in labels], color=["gray", "tab:blue"])
    axes[0].set_title("trial-epochs spent")
    axes[1].bar(labels, [results[k]["best_top1"] for k in labels], color=["gray", "tab:blue"])
    low = min(results[k]["best_top1"] for k in labels)
    axes[1].set_ylim(low - 3, low + 2)
    axes[1].set_title("best top-1 found (%)")
    return save_figure(figure, "sweep_efficiency")


if __name__ == "__main__":
    raise SystemExit(main())
