"""Top-1 on Fashion-MNIST: FP, W4A4, W3A3, W2A2 (full OFQ) and the W2A2 ablation ladder
LSQ -> StatsQ -> +QKR -> +CGA, over several seeds (mean and std, and each ladder step's paired
per-seed difference).

    python benchmarks/accuracy.py --quick          # subset, small ViT, 3 seeds, CPU (about 15 minutes)
    python benchmarks/accuracy.py --mode resolve   # the ladder on the whole test set, 3 seeds (about 1 hour)
    python benchmarks/accuracy.py                  # full data, more epochs

    # the same, one seed per process (in parallel, or across sessions), then the combined result:
    python benchmarks/accuracy.py --mode resolve --seed 1 & python benchmarks/accuracy.py --mode resolve --seed 2
    python benchmarks/accuracy.py --mode resolve --combine

Every quantized model starts from the same FP model of its seed, which is also its KD teacher, and
trains the same steps; the score is the final top-1 (no picking of the best epoch). A ladder step is
judged on its per-seed differences (both rungs share the seed's FP model, data order and test set):
"helps" when their mean is more than two standard errors above 0, "hurts" when below, else
"not resolved". Prints a table, writes benchmarks/results/accuracy.json and docs/accuracy.png, logs
to MLflow.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import statistics

import torch
from _common import (
    RESULTS,
    fashion,
    fp_model,
    frozen_teacher,
    machine,
    publish,
    quantized,
    save_figure,
    second_stage,
    train,
)

from ofq_ray.quant import CGA, QuantConfig

# (label, quant config, run the CGA stage). The W2A2 ladder is the last four rows, in order.
ROWS = [
    ("W4A4 OFQ", QuantConfig(weight_bits=4, act_bits=4), True),
    ("W3A3 OFQ", QuantConfig(weight_bits=3, act_bits=3), True),
    ("W2A2 LSQ", QuantConfig(weight_bits=2, act_bits=2, qkr=False, weight_quantizer="lsq"), False),
    ("W2A2 StatsQ", QuantConfig(weight_bits=2, act_bits=2, qkr=False), False),
    ("W2A2 StatsQ+QKR", QuantConfig(weight_bits=2, act_bits=2), False),
    ("W2A2 StatsQ+QKR+CGA (OFQ)", QuantConfig(weight_bits=2, act_bits=2), True),
]


# data (train, val images), epochs (FP, QAT, second stage), seeds, rows (None: all)
MODES: dict[str, dict] = {
    "quick": {"data": (15000, 5000), "epochs": (10, 5, 2), "seeds": 3, "rows": None},
    # The W2A2 ladder on one CPU core in about an hour: the whole test set, paired seeds, the W2A2 rows
    # and W4A4 (W3A3 adds time and no ladder step).
    "resolve": {
        "data": (20000, 10000),
        "epochs": (12, 6, 3),
        "seeds": 3,
        "rows": ("W4A4 OFQ", *(label for label, *_ in ROWS[2:])),
    },
    "full": {"data": (60000, 10000), "epochs": (30, 15, 5), "seeds": 3, "rows": None},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="same as --mode quick")
    parser.add_argument("--mode", choices=sorted(MODES), default="full")
    parser.add_argument("--model", default="vit_fmnist_small")
    parser.add_argument("--seeds", type=int, help="default: 3")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument(
        "--seed",
        type=int,
        action="append",
        dest="only_seeds",
        help="run only this seed (repeatable) and keep its scores in benchmarks/results/partial/; seeds run "
        "apart (in parallel processes, or across sessions) and are then combined with --combine",
    )
    parser.add_argument("--combine", action="store_true", help="build the result from the kept per-seed scores")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else args.mode
    settings = MODES[mode]
    seeds = args.seeds or settings["seeds"]
    train_subset, val_subset = settings["data"]
    fp_epochs, qat_epochs, cga_epochs = settings["epochs"]
    rows = [row for row in ROWS if row[0] in settings["rows"]] if settings["rows"] else ROWS
    scores: dict[str, list[float]] = {"FP": []}
    if args.combine:
        for seed in range(seeds):
            kept = load_seed(mode, args.model, seed)
            for label, value in kept.items():
                scores.setdefault(label, []).append(value)
    for seed in [] if args.combine else (args.only_seeds or range(seeds)):
        seed_scores: dict[str, float] = {}
        data = fashion(train_subset, val_subset, 128, seed)
        fp = fp_model(args.model, data, seed)
        fp_run, _ = train(fp, data, epochs=fp_epochs, lr=2e-3, warmup_epochs=1)
        scores["FP"].append(fp_run.last)
        seed_scores["FP"] = fp_run.last
        print(f"seed {seed} {'FP':<28} {fp_run.last:6.2f}", flush=True)
        teacher = frozen_teacher(fp)
        qat_done: dict[str, tuple] = {}
        for label, config, use_cga in rows:
            # Every row gets the same steps: QAT on a cosine schedule, then the second stage at the
            # constant LR 1e-5 with the same optimizer, where only the OFQ rows apply CGA. So "+CGA"
            # differs from "+QKR" by the CGA mask alone, not by extra training.
            key = repr(config)
            if key not in qat_done:
                torch.manual_seed(seed)
                model = quantized(fp, config, data)
                _, optimizer = train(model, data, epochs=qat_epochs, lr=1e-3, teacher=teacher)
                qat_done[key] = (copy.deepcopy(model), copy.deepcopy(optimizer.state_dict()))
            model = copy.deepcopy(qat_done[key][0])
            run = second_stage(
                model,
                data,
                epochs=cga_epochs,
                teacher=teacher,
                optimizer=qat_done[key][1],
                cga=CGA(model, 0.005) if use_cga else None,
            )
            scores.setdefault(label, []).append(run.last)
            seed_scores[label] = run.last
            print(f"seed {seed} {label:<28} {run.last:6.2f}", flush=True)
        keep_seed(mode, args.model, seed, seed_scores)
    if args.only_seeds:
        print(f"kept seeds {args.only_seeds}; combine with --mode {mode} --combine once every seed has run")
        return 0
    table = {
        label: {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values,
        }
        for label, values in scores.items()
    }
    print(f"\n{'model':<30}{'top-1 mean':>12}{'std':>8}")
    for label, row in table.items():
        print(f"{label:<30}{row['mean']:>12.2f}{row['std']:>8.2f}")
    steps = ladder_steps(scores)
    print(f"\n{'ladder step':<52}{'diff mean':>10}{'std':>7}{'helped':>8}  verdict")
    for step in steps:
        print(
            f"{step['from'] + ' -> ' + step['to']:<52}{step['mean']:>+10.2f}{step['std']:>7.2f}"
            f"{step['helped']:>5}/{len(step['diffs'])}  {step['verdict']}"
        )
    checks = {"ladder_each_step_helps": all(step["verdict"] == "helps" for step in steps)}
    if "W4A4 OFQ" in table:
        checks = {"w4a4_within_1_point_of_fp": table["FP"]["mean"] - table["W4A4 OFQ"]["mean"] <= 1.0, **checks}
    print("\nexpectations:", ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in checks.items()))
    payload = {
        "benchmark": "accuracy",
        "quick": mode == "quick",
        "mode": mode,
        "model": args.model,
        "machine": machine(),
        "seeds": seeds,
        "epochs": {"fp": fp_epochs, "qat": qat_epochs, "cga": cga_epochs},
        "train_subset": train_subset,
        "val_subset": val_subset,
        "table": table,
        "steps": steps,
        "checks": checks,
    }
    publish(
        "accuracy",
        payload,
        plot(table),
        mlflow=not args.no_mlflow,
        params={"mode": mode, "model": args.model, "seeds": seeds},
        metrics={label: row["mean"] for label, row in table.items()},
    )
    return 0


def _seed_path(mode: str, model: str, seed: int) -> str:
    return os.path.join(RESULTS, "partial", f"accuracy-{mode}-{model}-seed{seed}.json")


def keep_seed(mode: str, model: str, seed: int, scores: dict[str, float]) -> None:
    """One seed's final top-1 per row, so that seeds can run apart and be combined."""
    os.makedirs(os.path.dirname(_seed_path(mode, model, seed)), exist_ok=True)
    with open(_seed_path(mode, model, seed), "w") as handle:
        json.dump({"mode": mode, "model": model, "seed": seed, "scores": scores}, handle, indent=1)


def load_seed(mode: str, model: str, seed: int) -> dict[str, float]:
    path = _seed_path(mode, model, seed)
    if not os.path.isfile(path):
        raise SystemExit(f"--combine: seed {seed} has not run yet ({path} is missing); run it with --seed {seed}")
    with open(path) as handle:
        return dict(json.load(handle)["scores"])


def ladder_steps(scores: dict[str, list[float]]) -> list[dict]:
    """Each W2A2 ladder step as paired per-seed differences (upper rung minus lower rung)."""
    labels = [label for label, *_ in ROWS[2:] if label in scores]
    steps = []
    for lower, upper in itertools.pairwise(labels):
        diffs = [b - a for a, b in zip(scores[lower], scores[upper], strict=True)]
        mean = statistics.mean(diffs)
        std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        margin = 2 * std / math.sqrt(len(diffs))
        verdict = "helps" if mean - margin > 0 else "hurts" if mean + margin < 0 else "not resolved"
        helped = sum(d > 0 for d in diffs)
        steps.append(
            {"from": lower, "to": upper, "mean": mean, "std": std, "diffs": diffs, "helped": helped, "verdict": verdict}
        )
    return steps


def plot(table: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(table)
    means = [table[label]["mean"] for label in labels]
    stds = [table[label]["std"] for label in labels]
    figure, axis = plt.subplots(figsize=(11, 4))
    axis.bar(range(len(labels)), means, yerr=stds, capsize=4, color=["gray"] + ["tab:blue"] * (len(labels) - 1))
    axis.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    axis.set_ylim(min(means) - 5, max(means) + 2)
    axis.set_ylabel("top-1 (%)")
    axis.set_title("Fashion-MNIST top-1, mean and std over seeds")
    return save_figure(figure, "accuracy")


if __name__ == "__main__":
    raise SystemExit(main())
