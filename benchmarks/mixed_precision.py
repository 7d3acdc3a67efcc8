"""Mixed precision vs uniform widths on Fashion-MNIST: the same number of trained trials, each the same
QAT epochs from the same FP model; top-1 vs packed model bytes.

    python benchmarks/mixed_precision.py --quick --plan   # validate both arms' sweeps and price the widths; no Ray
    python benchmarks/mixed_precision.py --quick          # 6 + 6 trials x 4 QAT epochs on 8000 images, local Ray
    python benchmarks/mixed_precision.py                  # 12 + 12 trials x 8 QAT epochs on 30000 images
    python benchmarks/mixed_precision.py --from-json benchmarks/results/mixed_precision.json   # re-analyse

Both arms train vit_fmnist_small with QKR from one FP model (the sweeps' shared ``pretrain`` stage, cached
in MLflow: trained once, and the same one ``sweep_efficiency.py`` uses at the same mode), with a fixed
learning rate and no early stopping (scheduler none), so every trial trains every epoch:

- uniform: W2A2, W3A3 and W4A4 (``quant.bits`` on a grid), each with ``k`` QAT seeds: one 3-trial sweep
  per seed (a searched ``seed`` would un-share the FP stage, so the seed is the base's and
  ``stages.pretrain.seed`` pins the FP model's). ``3 k`` trials; a width's top-1 is its best seed's (the
  arm's front), its spread over seeds shows the noise the targets must clear;
- mixed: ``3 k`` trials of NSGA-II on (top-1 max, bytes min) over one width pair per attention and per
  MLP of each block (``quant.layers: {each: [blocks.*.attn, blocks.*.mlp], choice: [2/2, 3/3, 4/4]}``,
  6 groups, 729 configurations), by default within uniform W3A3's exact bytes (``tune.constraints``,
  as search_spaces/mixed.yaml; ``--no-budget`` lifts it). A configuration over budget is rejected before
  it trains (counted, not a trained trial). With fewer trials than NSGA-II's population (50) its
  proposals are its random first generation: this arm is a random search over the groups' widths.

Each arm is scored by the hypervolume of its points against the reference (top-1 10 %, chance on 10
classes; 1.1 x the largest model's bytes of either arm), in top-1 points x MiB. The issue's targets,
each judged on the mixed arm's points (best top-1 among those within the bytes):

- the mixed front reaches uniform W4A4's top-1 at no more than 75 % of W4A4's bytes, or
- it beats uniform W3A3's top-1 by at least 0.5 points at W3A3's bytes or fewer.

Prints the tables, writes benchmarks/results/mixed_precision.json and docs/mixed_precision.png (both
arms' points and fronts in one plot), logs both to MLflow (``--no-mlflow`` to skip).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any

from _common import REFERENCE_TOP1, hypervolume, machine, publish, save_figure, trial_points

from ofq_ray.sweep import Sweep, run_sweep, sweep_from_dict

WIDTHS = ("2/2", "3/3", "4/4")
GROUPS = ["blocks.*.attn", "blocks.*.mlp"]
W4A4_BYTES_FRACTION = 0.75  # target 1: W4A4's top-1 at no more than this share of its bytes
W3A3_MARGIN = 0.5  # target 2: top-1 points above W3A3 at no more than its bytes
TOLERANCE = 1e-9  # top-1 sums such as 80.35 + 0.5 are compared to this


@dataclass(frozen=True)
class Setup:
    quick: bool
    train_subset: int
    val_subset: int
    pretrain_epochs: int
    epochs: int  # QAT epochs of every trial of both arms
    seeds: tuple[int, ...]  # the uniform arm's QAT seeds; the mixed arm trains len(WIDTHS) x len(seeds) trials
    lr: float = 1.0e-3
    weight_decay: float = 0.05

    @property
    def trials(self) -> int:
        return len(WIDTHS) * len(self.seeds)


# The data and FP stage match sweep_efficiency.py's at the same mode, so the cached FP model is shared.
QUICK = Setup(quick=True, train_subset=8000, val_subset=2000, pretrain_epochs=5, epochs=4, seeds=(0, 1))
FULL = Setup(quick=False, train_subset=30000, val_subset=5000, pretrain_epochs=10, epochs=8, seeds=(0, 1, 2, 3))


# --- the two arms' sweeps ---------------------------------------------------------------------------------


def _spec(name: str, setup: Setup, runs_dir: str, seed: int) -> dict[str, Any]:
    return {
        "name": name,
        "base": {
            "stage": "qat",
            "model": {"name": "vit_fmnist_small"},
            "data": {
                "name": "fashion_mnist",
                "train_subset": setup.train_subset,
                "val_subset": setup.val_subset,
                "augment": False,
            },
            "quant": {"weight_bits": 2, "act_bits": 2, "qkr": True},
            "optim": {"lr": setup.lr, "weight_decay": setup.weight_decay},
            "epochs": setup.epochs,
            "batch_size": 128,
            "seed": seed,
            "runs_dir": runs_dir,
        },
        # seed 0 pins the FP model: every arm and seed starts from the same cached pretrain run
        "stages": {
            "pretrain": {"epochs": setup.pretrain_epochs, "seed": 0, "optim": {"lr": 2.0e-3, "warmup_epochs": 1}}
        },
        "tune": {
            "scheduler": "none",  # every trial trains every epoch
            "seed": 0,
            "max_concurrent_trials": 2,
            "resources_per_worker": {"CPU": 0.99},
        },
        "mlflow": {"experiment": name, "register": False},
    }


def uniform_spec(setup: Setup, runs_dir: str, seed: int, stamp: str) -> dict[str, Any]:
    """One seed of the uniform arm: W2A2, W3A3, W4A4 on a grid, one trial each."""
    spec = _spec(f"mixed-precision-uniform-s{seed}-{stamp}", setup, runs_dir, seed)
    spec["search"] = {"quant.bits": {"grid": list(WIDTHS)}}
    spec["tune"] |= {"num_samples": len(WIDTHS), "searcher": "grid"}
    return spec


def mixed_spec(setup: Setup, runs_dir: str, stamp: str, budget_bytes: float | None) -> dict[str, Any]:
    """The mixed arm: NSGA-II over one width pair per attention and per MLP of each block."""
    spec = _spec(f"mixed-precision-mixed-{stamp}", setup, runs_dir, setup.seeds[0])
    spec["search"] = {"quant.layers": {"each": list(GROUPS), "choice": list(WIDTHS)}}
    spec["tune"] |= {
        "num_samples": setup.trials,
        "searcher": "nsga2",
        "metric": ["val/top1", "model/size_bytes"],
        "mode": ["max", "min"],
    }
    if budget_bytes is not None:
        spec["tune"]["constraints"] = {"model/size_bytes": {"max": budget_bytes}}
    return spec


@dataclass
class Plan:
    setup: Setup
    uniform: list[Sweep]  # one sweep per seed
    mixed: Sweep
    sizes: dict[str, float]  # uniform width -> packed bytes, priced before training
    budget_bytes: float | None


def width_bytes(sweep: Sweep) -> dict[str, float]:
    """Each uniform width's ``model/size_bytes``, priced from the architecture alone (no training)."""
    from ofq_ray.cost import run_cost
    from ofq_ray.sweep.budget import class_count
    from ofq_ray.sweep.stages import trial_config

    classes = class_count(sweep.base)
    assert classes is not None
    return {
        w: run_cost(trial_config(sweep, {"quant.bits": w}), num_classes=classes)["model/size_bytes"] for w in WIDTHS
    }


def plan(setup: Setup, runs_dir: str, stamp: str, budget: bool = True) -> Plan:
    """Both arms' sweeps, validated (no Ray), and the uniform widths' bytes (the mixed arm's budget)."""
    uniform = [sweep_from_dict(uniform_spec(setup, runs_dir, seed, stamp)) for seed in setup.seeds]
    sizes = width_bytes(uniform[0])
    budget_bytes = sizes["3/3"] if budget else None
    mixed = sweep_from_dict(mixed_spec(setup, runs_dir, stamp, budget_bytes))
    return Plan(setup, uniform, mixed, sizes, budget_bytes)


# --- the analysis (pure: points in, numbers out) -------------------------------------------------------------


def label(width: str) -> str:
    """``"3/3"`` -> ``"W3A3"``."""
    weight, act = width.split("/")
    return f"W{weight}A{act}"


def by_width(points: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The uniform arm per width: its bytes, its best seed's top-1 (the arm's front) and the seeds' spread."""
    out: dict[str, dict[str, Any]] = {}
    for width in WIDTHS:
        group = [p for p in points if p["config"]["quant.bits"] == width]
        if not group:
            continue
        sizes = {p["bytes"] for p in group}
        if len(sizes) != 1:
            raise ValueError(f"uniform {label(width)}: its trials report different sizes {sorted(sizes)}")
        runs = [p["top1"] for p in group]
        out[width] = {
            "bytes": sizes.pop(),
            "top1": max(runs),
            "mean": statistics.mean(runs),
            "std": statistics.stdev(runs) if len(runs) > 1 else None,
            "runs": runs,
        }
    return out


def best_within(points: list[dict[str, Any]], max_bytes: float) -> dict[str, Any] | None:
    """The point of best top-1 among those of at most ``max_bytes``; None if there is none."""
    within = [p for p in points if p["bytes"] <= max_bytes]
    return max(within, key=lambda p: p["top1"]) if within else None


def front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The non-dominated points (top-1 max, bytes min), smallest first."""
    out: list[dict[str, Any]] = []
    for point in sorted(points, key=lambda p: (p["bytes"], -p["top1"])):
        if not out or point["top1"] > out[-1]["top1"]:
            out.append(point)
    return out


def _natural(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def widths_label(config: dict[str, Any]) -> str:
    """A mixed configuration in short: ``"attn 2-3-4, mlp 2-2-3"`` (per block; ``W/A`` where they differ)."""
    kinds: dict[str, list[str]] = {}
    prefix = "quant.layers."
    for key in sorted((k for k in config if k.startswith(prefix)), key=_natural):
        kind = key.rsplit(".", 1)[-1]
        weight, _, act = str(config[key]).partition("/")
        kinds.setdefault(kind, []).append(weight if act in ("", weight) else f"{weight}/{act}")
    return ", ".join(f"{kind} {'-'.join(values)}" for kind, values in sorted(kinds.items()))


def _mixed_row(name: str, max_bytes: float, uniform_top1: float, mixed: list[dict[str, Any]]) -> dict[str, Any]:
    best = best_within(mixed, max_bytes)
    return {
        "label": name,
        "bytes": max_bytes,
        "uniform_top1": uniform_top1,
        "mixed_top1": None if best is None else best["top1"],
        "mixed_bytes": None if best is None else best["bytes"],
        "mixed_widths": None if best is None else widths_label(best["config"]),
        "difference": None if best is None else best["top1"] - uniform_top1,
    }


def byte_model(sizes: dict[str, float]) -> dict[str, float]:
    """Uniform widths' bytes -> ``fixed + per_bit x bits``: what a model costs apart from its low-bit
    weights (the 8-bit first and last layers, float norms, biases, position embedding and quantizer
    steps), what each weight bit adds, and the average weight bits that the targets' budgets buy."""
    bits = {int(w.split("/")[0]): b for w, b in sizes.items()}
    low, high = min(bits), max(bits)
    per_bit = (bits[high] - bits[low]) / (high - low)
    fixed = bits[low] - low * per_bit
    w3, w4 = bits[3], bits[4]
    return {
        "fixed_bytes": fixed,
        "bytes_per_weight_bit": per_bit,
        "fixed_share_of_w4a4": fixed / w4,
        "bits_at_75pct_w4a4": (W4A4_BYTES_FRACTION * w4 - fixed) / per_bit,
        "bits_at_w3a3": (w3 - fixed) / per_bit,
    }


def headroom(widths: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How much either target could be met at all, from the uniform arm alone.

    - Target 1 asks a model of 75 % of W4A4's bytes, i.e. :func:`byte_model`'s average weight bits, for
      W4A4's top-1: the fewer bits that is (the larger the fixed bytes), the harder.
    - Target 2 asks a reallocation within W3A3's bytes to gain 0.5 points. Raising every group from 3 to 4
      bits (uniform W4A4, a third more weight bytes) gains ``W4A4 - W3A3``; if the groups' gains add up, no
      reallocation that also takes bits away from some groups gains more. A gain below 0.5 puts the
      target out of reach of any configuration of these widths at this scale."""
    w3, w4 = widths["3/3"], widths["4/4"]
    return {
        **byte_model({w: row["bytes"] for w, row in widths.items()}),
        "w4a4_minus_w3a3_best": w4["top1"] - w3["top1"],
        "w4a4_minus_w3a3_mean": w4["mean"] - w3["mean"],
        "w3a3_margin": W3A3_MARGIN,
    }


def analyze(uniform: list[dict[str, Any]], mixed: list[dict[str, Any]]) -> dict[str, Any]:
    """Both arms' points (``{"top1", "bytes", "config"}``) -> the widths, the hypervolumes, the comparison at
    each uniform width's bytes (and at 75 % of W4A4's), the two target checks."""
    widths = by_width(uniform)
    missing = [label(w) for w in ("3/3", "4/4") if w not in widths]
    if missing:
        raise ValueError(f"uniform arm: no trained trial of {', '.join(missing)}; the targets need both")
    largest = max(p["bytes"] for p in [*uniform, *mixed])
    reference = (REFERENCE_TOP1, 1.1 * largest)
    volumes = {
        arm: hypervolume([(p["top1"], p["bytes"]) for p in points], reference) / 2**20
        for arm, points in (("uniform", uniform), ("mixed", mixed))
    }
    comparison = [_mixed_row(label(w), row["bytes"], row["top1"], mixed) for w, row in widths.items()]
    w3, w4 = widths["3/3"], widths["4/4"]
    at_75 = _mixed_row(f"{W4A4_BYTES_FRACTION:g} x W4A4", W4A4_BYTES_FRACTION * w4["bytes"], w4["top1"], mixed)
    comparison.append(at_75)
    at_w3 = next(row for row in comparison if row["label"] == "W3A3")
    checks = {
        "w4a4_top1_at_75pct_bytes": {
            "max_bytes": at_75["bytes"],
            "needed_top1": w4["top1"],
            "mixed_top1": at_75["mixed_top1"],
            "margin": at_75["difference"],
        },
        "w3a3_plus_0.5_at_its_bytes": {
            "max_bytes": w3["bytes"],
            "needed_top1": w3["top1"] + W3A3_MARGIN,
            "mixed_top1": at_w3["mixed_top1"],
            "margin": None if at_w3["difference"] is None else at_w3["difference"] - W3A3_MARGIN,
        },
    }
    targets = {key: check["margin"] is not None and check["margin"] >= -TOLERANCE for key, check in checks.items()}
    targets["either"] = any(targets.values())
    return {
        "reference_point": {"top1": reference[0], "bytes": reference[1]},
        "hypervolume_unit": "top-1 points x MiB",
        "hypervolume": volumes,
        "widths": widths,
        "comparison": comparison,
        "fronts": {
            "uniform": front(uniform),
            "mixed": [{**p, "widths": widths_label(p["config"])} for p in front(mixed)],
        },
        "checks": checks,
        "targets": targets,
        "headroom": headroom(widths),
    }


# --- running ------------------------------------------------------------------------------------------------


def run_arm(name: str, sweeps: list[Sweep]) -> dict[str, Any]:
    """Runs an arm's sweeps one after the other; its points and what it spent."""
    started = time.time()
    row: dict[str, Any] = {"points": [], "trials": 0, "errored": 0, "rejected": 0, "trial_epochs": 0, "budget_stop": ""}
    for sweep in sweeps:
        result = run_sweep(sweep, log=lambda text: None)
        points = trial_points(result)
        row["points"] += points
        row["trials"] += len(result.trials)
        row["errored"] += sum(t["status"] == "errored" for t in result.trials)
        row["rejected"] += result.rejected
        row["trial_epochs"] += sum(t["epochs"] for t in result.trials)
        row["budget_stop"] = row["budget_stop"] or result.budget_stop
        print(f"[mixed_precision] {name}: {sweep.name}: {len(points)} trained trials", flush=True)
    row["trained"] = len(row["points"])
    row["wall_s"] = time.time() - started
    return row


def print_plan(p: Plan) -> None:
    s = p.setup
    print(
        f"vit_fmnist_small QAT (QKR), {s.train_subset} training / {s.val_subset} test images, FP stage "
        f"{s.pretrain_epochs} epochs (shared, cached), {s.epochs} QAT epochs per trial, lr {s.lr:g}, no early stopping"
    )
    print("uniform bytes: " + ", ".join(f"{label(w)} {b:.0f}" for w, b in p.sizes.items()))
    print(
        f"uniform: {len(p.uniform)} sweeps (seeds {', '.join(map(str, s.seeds))}) x {len(WIDTHS)} widths = "
        f"{s.trials} trials x {s.epochs} epochs = {s.trials * s.epochs} trial-epochs"
    )
    budget = f"within {p.budget_bytes:.0f} bytes (uniform W3A3)" if p.budget_bytes is not None else "no budget"
    print(
        f"mixed: NSGA-II over {len(p.mixed.layer_groups)} groups x {len(WIDTHS)} widths, {budget}, "
        f"{s.trials} trials x {s.epochs} epochs = {s.trials * s.epochs} trial-epochs"
    )


def _fmt(value: float | None, spec: str = ".2f", sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+{spec}}" if sign else f"{value:{spec}}"


def print_results(arms: dict[str, dict[str, Any]], analysis: dict[str, Any]) -> None:
    reference = analysis["reference_point"]
    print(f"\nreference point: top-1 {reference['top1']:.0f} %, {reference['bytes'] / 2**20:.3f} MiB")
    print(f"{'arm':<9}{'trials':>8}{'trained':>9}{'rejected':>10}{'trial-epochs':>14}{'hypervolume':>13}{'wall s':>8}")
    for arm, row in arms.items():
        print(
            f"{arm:<9}{row['trials']:>8}{row['trained']:>9}{row['rejected']:>10}{row['trial_epochs']:>14}"
            f"{analysis['hypervolume'][arm]:>13.4f}{row['wall_s']:>8.0f}"
        )
    print(
        f"\n{'at bytes <=':<22}{'uniform top-1':>14}{'mixed best':>12}{'its bytes':>11}{'mixed - uniform':>17}  widths"
    )
    for row in analysis["comparison"]:
        print(
            f"{row['label'] + ' ' + format(row['bytes'], '.0f'):<22}{row['uniform_top1']:>14.2f}"
            f"{_fmt(row['mixed_top1']):>12}{_fmt(row['mixed_bytes'], '.0f'):>11}"
            f"{_fmt(row['difference'], sign=True):>17}  {row['mixed_widths'] or ''}"
        )
    print(
        "\nuniform seeds: "
        + "; ".join(f"{label(w)} {', '.join(f'{v:.2f}' for v in row['runs'])}" for w, row in analysis["widths"].items())
    )
    print(", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in analysis["targets"].items()))


def print_headroom(room: dict[str, Any]) -> None:
    """What the targets ask of this model, in weight bits and in the uniform arm's own gain."""
    reference = room["reference"]
    print(
        f"\nbytes = fixed + per weight bit x bits: {room['fixed_bytes']:.0f} + {room['bytes_per_weight_bit']:.0f} x "
        f"bits; fixed = {room['fixed_share_of_w4a4']:.0%} of W4A4 ({reference['model']}: "
        f"{reference['fixed_share_of_w4a4']:.0%})"
    )
    print(
        f"75 % of W4A4's bytes buys {room['bits_at_75pct_w4a4']:.2f} weight bits on average "
        f"({reference['model']}: {reference['bits_at_75pct_w4a4']:.2f})"
    )
    if "w4a4_minus_w3a3_best" in room:
        print(
            f"uniform W4A4 - W3A3: {room['w4a4_minus_w3a3_best']:+.2f} (best seeds), "
            f"{room['w4a4_minus_w3a3_mean']:+.2f} (means); target 2 needs a reallocation within W3A3's bytes "
            f"to gain {room['w3a3_margin']:g}"
        )


def plot(arms: dict[str, dict[str, Any]], analysis: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for arm, color, marker in (("uniform", "gray", "s"), ("mixed", "tab:blue", "o")):
        points = arms[arm]["points"]
        axes.scatter(
            [p["bytes"] / 1024 for p in points],
            [p["top1"] for p in points],
            color=color,
            marker=marker,
            alpha=0.6,
            label=f"{arm} ({arms[arm]['trained']} trials, HV {analysis['hypervolume'][arm]:.3f})",
        )
        steps = analysis["fronts"][arm]
        if steps:
            xs = [p["bytes"] / 1024 for p in steps]
            axes.step(xs, [p["top1"] for p in steps], where="post", color=color, alpha=0.8)
    for width, row in analysis["widths"].items():
        axes.annotate(label(width), (row["bytes"] / 1024, row["top1"]), textcoords="offset points", xytext=(4, 4))
    targets = (
        ("w4a4_top1_at_75pct_bytes", "tab:red", "target: W4A4's top-1 at 75 % of its bytes"),
        ("w3a3_plus_0.5_at_its_bytes", "tab:green", "target: W3A3's top-1 + 0.5 at its bytes"),
    )
    for key, color, label_text in targets:  # each target's corner: at most these bytes, at least this top-1
        check = analysis["checks"][key]
        axes.axvline(check["max_bytes"] / 1024, color=color, ls=":", lw=1)
        axes.axhline(check["needed_top1"], color=color, ls=":", lw=1, label=label_text)
    axes.set_xlabel("model size (KiB)")
    axes.set_ylabel("best top-1 (%)")
    axes.legend(fontsize=8)
    return save_figure(figure, "mixed_precision")


def reference_byte_model(model: str = "deit_small_patch16_224") -> dict[str, float]:
    """:func:`byte_model` of an ImageNet model (1000 classes, 3 x 224 px, QKR), priced without training: the
    fixed-bytes share the targets were written for, against this benchmark's small model."""
    from ofq_ray.config import config_from_dict
    from ofq_ray.cost import run_cost

    sizes = {}
    for width in WIDTHS:
        bits = int(width.split("/")[0])
        config = config_from_dict(
            {
                "stage": "qat",
                "model": {"name": model},
                "quant": {"weight_bits": bits, "act_bits": bits, "qkr": True},
                "kd": {"enabled": False},  # pricing only: no teacher to load
            }
        )
        sizes[width] = run_cost(config, num_classes=1000, in_chans=3, img_size=224)["model/size_bytes"]
    return {"model": model, **byte_model(sizes)}


def report(payload: dict[str, Any], reference: dict[str, float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Analyses both arms' points of ``payload`` (a run's, or a stored JSON's) and adds ``reference``."""
    arms = payload["arms"]
    analysis = analyze(arms["uniform"]["points"], arms["mixed"]["points"])
    analysis["headroom"]["reference"] = reference
    for arm, row in arms.items():
        row["hypervolume"] = analysis["hypervolume"][arm]
    print_results(arms, analysis)
    return {**payload, **analysis}, analysis


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plan", action="store_true", help="validate both arms and price the widths; train nothing")
    parser.add_argument("--no-budget", action="store_true", help="the mixed arm without uniform W3A3's size budget")
    parser.add_argument(
        "--from-json",
        metavar="PATH",
        help="re-analyse a run's stored points (e.g. benchmarks/results/mixed_precision.json); train nothing",
    )
    parser.add_argument("--runs-dir", default="ofq-runs")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args(argv)
    if args.from_json:
        import json

        with open(args.from_json) as handle:
            stored = json.load(handle)
        setup = QUICK if stored["quick"] else FULL
        budget = stored["settings"]["budget_bytes"] is not None
        payload, analysis = report(stored, reference_byte_model())
        print_headroom(analysis["headroom"])
    else:
        setup = QUICK if args.quick else FULL
        stamp = time.strftime("%Y%m%d-%H%M%S")
        p = plan(setup, os.path.abspath(args.runs_dir), stamp, budget=not args.no_budget)
        print_plan(p)
        reference = reference_byte_model()
        print_headroom({**byte_model(p.sizes), "reference": reference})
        if args.plan:
            return 0
        budget = p.budget_bytes is not None
        arms = {"uniform": run_arm("uniform", p.uniform), "mixed": run_arm("mixed", [p.mixed])}
        payload = {
            "benchmark": "mixed_precision",
            "quick": args.quick,
            "machine": machine(),
            "settings": {
                "model": "vit_fmnist_small",
                "train_subset": setup.train_subset,
                "val_subset": setup.val_subset,
                "pretrain_epochs": setup.pretrain_epochs,
                "epochs": setup.epochs,
                "lr": setup.lr,
                "weight_decay": setup.weight_decay,
                "seeds": list(setup.seeds),
                "widths": list(WIDTHS),
                "groups": GROUPS,
                "group_count": len(p.mixed.layer_groups),
                "mixed_searcher": "nsga2",
                "budget_bytes": p.budget_bytes,
            },
            "priced_bytes": p.sizes,
            "arms": arms,
        }
        payload, analysis = report(payload, reference)
        for width, row in analysis["widths"].items():
            if row["bytes"] != p.sizes[width]:
                print(
                    f"warning: uniform {label(width)} trained at {row['bytes']:.0f} bytes, "
                    f"priced at {p.sizes[width]:.0f}"
                )
        print_headroom(analysis["headroom"])
    metrics = {f"hypervolume_{arm}": value for arm, value in analysis["hypervolume"].items()}
    metrics |= {f"uniform_{label(w)}_top1": row["top1"] for w, row in analysis["widths"].items()}
    metrics |= {f"{key}_margin": c["margin"] for key, c in analysis["checks"].items() if c["margin"] is not None}
    publish(
        "mixed_precision",
        payload,
        plot(payload["arms"], analysis),
        mlflow=not args.no_mlflow,
        params={"quick": payload["quick"], "budget": budget, "trials_per_arm": setup.trials},
        metrics=metrics,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
