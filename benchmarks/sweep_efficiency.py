"""ASHA vs running every trial to its full budget: same search space, same seeded configurations.

    python benchmarks/sweep_efficiency.py --quick     # 12 W2A2 QAT trials x 9 epochs on 8000 images, local Ray
    python benchmarks/sweep_efficiency.py             # 24 trials on 30000 images
    python benchmarks/sweep_efficiency.py --quick --multi-objective   # top-1 vs bytes: full, ASHA, MO-ASHA

The random searcher is used so both sweeps draw the same configurations; the FP stage is shared
(trained once, cached). Reports the best top-1 found, the trial-epochs spent and the wall time of
each, writes benchmarks/results/sweep_efficiency.json and docs/sweep_efficiency.png.
Target: ASHA's best within 0.3 points of the full-budget best, with at most 40 % of the trial-epochs.

``--multi-objective`` searches the learning rate and the bit widths (2/2, 3/3, 4/4: sizes differ) for
top-1 (max) and model bytes (min), and runs the same seeded configurations three times: to the full
budget, under ASHA on top-1 alone, and under MO-ASHA. Each is scored by the hypervolume of its final
front (every trial at its best epoch, stopped ones included: their size is exact, their top-1 a lower
bound) against the reference point (top-1 10 %, chance on 10 classes; 1.1 x the largest model's bytes),
in points x MiB. Writes benchmarks/results/sweep_efficiency_mo.json and docs/sweep_efficiency_mo.png.
Target: MO-ASHA's hypervolume at least 98 % of the full budget's with at most 50 % of its trial-epochs,
and above ASHA-on-top-1's.
"""

from __future__ import annotations

import argparse
import os
import time

from _common import REFERENCE_TOP1, hypervolume, machine, publish, save_figure, trial_points

from ofq_ray.sweep import run_sweep, sweep_from_dict


def spec(
    name: str, scheduler: object, quick: bool, runs_dir: str, search: dict | None = None, objectives: int = 1
) -> dict:
    out = {
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
    if search is not None:
        out["search"] = search
    if objectives == 2:
        out["tune"] |= {"metric": ["val/top1", "model/size_bytes"], "mode": ["max", "min"]}
    return out


SEARCH_MO = {"optim.lr": {"loguniform": [1.0e-5, 3.0e-3]}, "quant.bits": {"choice": ["2/2", "3/3", "4/4"]}}


def multi_objective(args: argparse.Namespace, runs_dir: str, stamp: str) -> int:
    asha = {"asha": {"grace_period": 1, "reduction_factor": 3}}
    variants = (("full budget", "none", 2), ("ASHA (top-1)", asha, 1), ("MO-ASHA", asha, 2))
    results: dict = {}
    for label, scheduler, objectives in variants:
        slug = {"full budget": "full", "ASHA (top-1)": "asha", "MO-ASHA": "moasha"}[label]
        sweep = sweep_from_dict(spec(f"mo-{slug}-{stamp}", scheduler, args.quick, runs_dir, SEARCH_MO, objectives))
        started = time.time()
        result = run_sweep(sweep, log=lambda text: None)
        results[label] = {
            "points": trial_points(result),
            "trial_epochs": sum(t["epochs"] for t in result.trials),
            "stopped": sum(t["status"] == "stopped" for t in result.trials),
            "wall_s": time.time() - started,
        }
    largest = max(p["bytes"] for row in results.values() for p in row["points"])
    reference = (REFERENCE_TOP1, 1.1 * largest)
    for row in results.values():
        row["hypervolume"] = hypervolume([(p["top1"], p["bytes"]) for p in row["points"]], reference) / 2**20
    full, asha_row, mo = results["full budget"], results["ASHA (top-1)"], results["MO-ASHA"]
    ratios = {
        "moasha_hv_fraction": mo["hypervolume"] / full["hypervolume"],
        "moasha_epoch_fraction": mo["trial_epochs"] / full["trial_epochs"],
        "asha_hv_fraction": asha_row["hypervolume"] / full["hypervolume"],
        "asha_epoch_fraction": asha_row["trial_epochs"] / full["trial_epochs"],
        "moasha_wall_fraction": mo["wall_s"] / full["wall_s"],
    }
    targets = {
        "moasha_hv_at_least_98pct": ratios["moasha_hv_fraction"] >= 0.98,
        "moasha_at_most_50pct_epochs": ratios["moasha_epoch_fraction"] <= 0.5,
        "moasha_hv_above_asha": mo["hypervolume"] > asha_row["hypervolume"],
    }
    print(f"\nreference point: top-1 {reference[0]:.0f} %, {reference[1] / 2**20:.3f} MiB")
    print(f"{'':<14}{'hypervolume':>13}{'vs full':>9}{'trial-epochs':>14}{'stopped':>9}{'wall s':>9}")
    for label, row in results.items():
        print(
            f"{label:<14}{row['hypervolume']:>13.3f}{row['hypervolume'] / full['hypervolume']:>9.3f}"
            f"{row['trial_epochs']:>14}{row['stopped']:>9}{row['wall_s']:>9.0f}"
        )
    print(", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in targets.items()))
    payload = {
        "benchmark": "sweep_efficiency_mo",
        "quick": args.quick,
        "machine": machine(),
        "reference_point": {"top1": reference[0], "bytes": reference[1]},
        "hypervolume_unit": "top-1 points x MiB",
        "results": results,
        "ratios": ratios,
        "targets": targets,
    }
    publish(
        "sweep_efficiency_mo",
        payload,
        plot_fronts(results),
        mlflow=not args.no_mlflow,
        params={"quick": args.quick},
        metrics=ratios,
    )
    return 0


def plot_fronts(results: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for (label, row), color in zip(results.items(), ("gray", "tab:orange", "tab:blue"), strict=True):
        xs = [p["bytes"] / 1024 for p in row["points"]]
        ys = [p["top1"] for p in row["points"]]
        axes.scatter(
            xs,
            ys,
            label=f"{label} (HV {row['hypervolume']:.2f}, {row['trial_epochs']} trial-epochs)",
            color=color,
            alpha=0.7,
        )
    axes.set_xlabel("model size (KiB)")
    axes.set_ylabel("best top-1 (%)")
    axes.legend(fontsize=8)
    return save_figure(figure, "sweep_efficiency_mo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs-dir", default="ofq-runs")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--multi-objective", action="store_true", help="top-1 vs bytes: full budget, ASHA, MO-ASHA")
    args = parser.parse_args(argv)
    runs_dir = os.path.abspath(args.runs_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.multi_objective:
        return multi_objective(args, runs_dir, stamp)
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
