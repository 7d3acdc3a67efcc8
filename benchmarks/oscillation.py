"""Weight oscillation at W2A2: the paper's LSQ baseline vs StatsQ (without and with QKR) vs StatsQ + QKR +
CGA, over several seeds, per weight kind; and the StatsQ scale trajectories during CGA for boundary
ranges 0.003/0.005/0.007/0.01 (the paper's Fig. 1).

    python benchmarks/oscillation.py --quick      # Fashion-MNIST subset, small ViT, 3 seeds, CPU
    python benchmarks/oscillation.py --tiny       # smoke run of the whole pipeline (minutes)
    python benchmarks/oscillation.py              # more data and epochs

Per seed: an FP model, then QAT of each variant from it with KD (same data order and steps), then the
reference's second stage (constant LR 1e-5, same optimizer). The CGA variant is the StatsQ + QKR QAT
checkpoint continued with CGA, so it differs from "StatsQ + QKR" only by CGA. Prints the tables and a
plain verdict, writes benchmarks/results/oscillation.json and docs/oscillation.png, logs to MLflow.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from _common import (
    Data,
    Run,
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
from torch import nn

from ofq_ray.quant import CGA, OscillationTracker, QuantConfig, StatsQuantizer, weight_kind
from ofq_ray.quant.layers import QLinear, iter_quantized_weights

BOUNDARY_RANGES = (0.003, 0.005, 0.007, 0.01)
CGA_BOUNDARY = 0.005
NEAR_WIDTH = 0.05  # "near a rounding threshold": within this many quantization steps of one
ABOUT_ZERO = 0.1  # CGA drives oscillation to about 0 if it leaves at most this share of the no-CGA stage's

LSQ = "LSQ, no QKR (paper's LSQ baseline)"
STATSQ_NO_QKR = "StatsQ, no QKR"
STATSQ = "StatsQ + QKR"
OFQ = "StatsQ + QKR + CGA (OFQ)"


@dataclass(frozen=True)
class Variant:
    label: str
    weight_quantizer: str
    qkr: bool
    cga: bool

    def config(self) -> QuantConfig:
        # qkr is explicit: LSQ on the merged W_q^T W_k product is not the reference's LSQ baseline.
        return QuantConfig(weight_bits=2, act_bits=2, weight_quantizer=self.weight_quantizer, qkr=self.qkr)


VARIANTS = (
    Variant(LSQ, "lsq", qkr=False, cga=False),
    Variant(STATSQ_NO_QKR, "statsq", qkr=False, cga=False),
    Variant(STATSQ, "statsq", qkr=True, cga=False),
    Variant(OFQ, "statsq", qkr=True, cga=True),
)


@dataclass(frozen=True)
class Settings:
    model: str
    train_subset: int
    val_subset: int
    fp_epochs: int
    qat_epochs: int
    cga_epochs: int
    batch_size: int = 128


QUICK = Settings("vit_fmnist_small", 20000, 2000, fp_epochs=10, qat_epochs=6, cga_epochs=3)
FULL = Settings("vit_fmnist_small", 60000, 10000, fp_epochs=10, qat_epochs=8, cga_epochs=6)
TINY = Settings("vit_fmnist_micro", 1024, 500, fp_epochs=1, qat_epochs=2, cga_epochs=2)


# --- what is measured on a model ----------------------------------------------------------------------
def near_counts(model: nn.Module, width: float = NEAR_WIDTH) -> dict[str, tuple[int, int]]:
    """Per low-bit block weight: how many of its unclipped entries lie within ``width`` steps of a
    rounding threshold (the weights a tiny update can flip), and how many are unclipped. StatsQ has a
    threshold at 0, where the weights are densest; LSQ has a zero level there."""
    counts = {}
    for name, source in iter_quantized_weights(model, "block"):
        quantizer, latent = source.quantizer, source.latent().detach()
        if isinstance(quantizer, StatsQuantizer):
            z = quantizer.prequant(latent)
            inside = (z > -quantizer.levels_half - 0.5) & (z < quantizer.levels_half - 0.5)
        else:
            z = latent / quantizer.step.detach().clamp_min(1e-5)
            inside = (z > quantizer.qn) & (z < quantizer.qp)
        distance = (z - torch.floor(z) - 0.5).abs()
        counts[name] = (int(((distance <= width) & inside).sum()), int(inside.sum()))
    return counts


def near_threshold(model: nn.Module, width: float = NEAR_WIDTH) -> float:
    """Share of the unclipped low-bit block weights within ``width`` steps of a rounding threshold."""
    counts = near_counts(model, width).values()
    return sum(close for close, _ in counts) / max(sum(total for _, total in counts), 1)


def oscillation_probe(model: nn.Module, tracker: OscillationTracker) -> dict[str, Any]:
    """The tracker's statistics overall and per weight kind, each with its share ``near`` a threshold,
    and the steps of the tracker's current window (one epoch)."""
    counts = near_counts(model)

    def near(names: Sequence[str]) -> float:
        return sum(counts[n][0] for n in names) / max(sum(counts[n][1] for n in names), 1)

    kinds = tracker.summary_by(weight_kind)
    for kind, stats in kinds.items():
        stats["near"] = near([name for name in tracker.names if weight_kind(name) == kind])
    overall = tracker.summary()["overall"] | {"near": near(tracker.names)}
    return {"steps": tracker.window_steps, "overall": overall, "kinds": kinds}


def scale_probe(model: nn.Module) -> dict[str, float]:
    """Mean StatsQ row scale 2*mean|W_r| of a few block weights (what Fig. 1 plots during CGA)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QLinear) and name.endswith(
            ("blocks.0.mlp.fc1", "blocks.0.attn.proj", "blocks.1.mlp.fc2")
        ):
            out[name] = float(2 * module.weight.detach().abs().mean(dim=1).mean())
    return out


# --- one seed ----------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A model at the end of QAT, with what continuing it needs: the optimizer state and tracker state."""

    model: nn.Module
    optimizer_state: dict[str, Any]
    tracker_state: dict[str, Any]

    def restore(self) -> tuple[nn.Module, OscillationTracker]:
        model = copy.deepcopy(self.model)
        tracker = OscillationTracker(model)
        tracker.load_state_dict(self.tracker_state)
        return model, tracker


def run_seed(settings: Settings, seed: int, trajectories: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every variant for one seed; returns ``({"fp_top1", "runs": {label: run}}, cga_trajectories)``
    where a run is ``{"history": [per-epoch metrics], "probes": [per-epoch oscillation_probe]}`` and the
    trajectories (empty unless ``trajectories``) are those of the paper's Fig. 1."""
    data = fashion(settings.train_subset, settings.val_subset, settings.batch_size, seed)
    fp = fp_model(settings.model, data, seed)
    fp_run, _ = train(fp, data, epochs=settings.fp_epochs, lr=2e-3, warmup_epochs=1)
    teacher = frozen_teacher(fp)
    print(f"seed {seed}: FP {fp_run.best:.2f} % after {settings.fp_epochs} epochs ({fp_run.wall_s:.0f} s)", flush=True)

    runs: dict[str, dict[str, Any]] = {}
    base: Checkpoint | None = None
    for variant in VARIANTS:
        if variant.cga:  # continues the StatsQ + QKR QAT checkpoint, so CGA is the only difference
            assert base is not None
            model, tracker = base.restore()
            optimizer: torch.optim.Optimizer | dict[str, Any] = base.optimizer_state
            first = runs[STATSQ]["qat"]
        else:
            torch.manual_seed(seed)
            model = quantized(fp, variant.config(), data)
            tracker = OscillationTracker(model)
            first, optimizer = train(
                model,
                data,
                epochs=settings.qat_epochs,
                lr=1e-3,
                teacher=teacher,
                tracker=tracker,
                epoch_probe=lambda m=model, t=tracker: oscillation_probe(m, t),
            )
            if variant.label == STATSQ:
                base = Checkpoint(
                    copy.deepcopy(model), copy.deepcopy(optimizer.state_dict()), copy.deepcopy(tracker.state_dict())
                )
        second = second_stage(
            model,
            data,
            epochs=settings.cga_epochs,
            teacher=teacher,
            optimizer=optimizer,
            cga=CGA(model, CGA_BOUNDARY) if variant.cga else None,
            tracker=tracker,
            step_hook=(lambda m=model: scale_probe(m)) if variant.cga and trajectories else None,
            epoch_probe=lambda m=model, t=tracker: oscillation_probe(m, t),
        )
        runs[variant.label] = {"qat": first, "second": second}
        _print_run(variant.label, first, second)

    cga_trajectories = {}
    if trajectories:
        assert base is not None
        for boundary in BOUNDARY_RANGES:
            cga_trajectories[str(boundary)] = _trajectory(base, boundary, data, teacher, settings, runs[OFQ]["second"])
    stored = {
        label: {
            "history": run["qat"].history + run["second"].history,
            "probes": run["qat"].probes + run["second"].probes,
        }
        for label, run in runs.items()
    }
    return {"fp_top1": fp_run.best, "runs": stored}, cga_trajectories


def _trajectory(
    base: Checkpoint, boundary: float, data: Data, teacher: nn.Module, settings: Settings, at_cga_boundary: Run
) -> dict[str, Any]:
    """The CGA stage from the StatsQ + QKR checkpoint at one boundary range (the CGA variant's own run
    at its boundary range is reused)."""
    if boundary == CGA_BOUNDARY:
        run = at_cga_boundary
    else:
        model, _ = base.restore()
        run = second_stage(
            model,
            data,
            epochs=settings.cga_epochs,
            teacher=teacher,
            optimizer=base.optimizer_state,
            cga=CGA(model, boundary),
            step_hook=lambda m=model: scale_probe(m),
        )
    print(f"  CGA BR {boundary}: frozen {100 * run.history[-1]['cga/frozen_frac']:.2f} %  top1 {run.last:.2f}")
    return {
        "steps": run.steps,
        "frozen_frac": [row["cga/frozen_frac"] for row in run.history],
        "top1": [row["val/top1"] for row in run.history],
    }


def _print_run(label: str, first: Run, second: Run) -> None:
    end_qat, last = first.probes[-1]["overall"], second.probes[-1]["overall"]
    print(
        f"  {label:>36}: top1 {second.last:.2f}  EMA f {end_qat['mean_freq']:.2e} -> {last['mean_freq']:.2e}  "
        f"flips/step {last['flip_rate']:.2e}  near a threshold {100 * end_qat['near']:.2f} % -> "
        f"{100 * last['near']:.2f} %",
        flush=True,
    )


# --- from runs to numbers ---------------------------------------------------------------------------
MEASURES = {
    "freq_qat": "oscillation events per weight per step, averaged over QAT",
    "near_qat": "share of unclipped weights within 0.05 steps of a threshold, mean over the QAT epochs",
    "freq_qat_norm": "freq_qat / near_qat",
    "ema_end_qat": "the spec's EMA frequency (m = 0.01) at the end of QAT",
    "freq_last": "oscillation events per weight per step in the last epoch of the second stage",
    "near_last": "share near a threshold at the end",
    "freq_last_norm": "freq_last / near_last",
    "ema_end": "the spec's EMA frequency at the end",
    "flips_last": "share of codes that changed per step in the last epoch",
}


def _rate(probes: Sequence[dict[str, Any]], key: str, kind: str | None, before: int, until: int) -> float:
    """Oscillation events per weight per step over the epochs ``before``..``until - 1`` of ``probes``."""

    def stats(index: int) -> dict[str, Any]:
        return probes[index]["overall"] if kind is None else probes[index]["kinds"][kind]

    events = stats(until - 1)[key] - (stats(before - 1)[key] if before > 0 else 0)
    steps = sum(probes[i]["steps"] for i in range(before, until))
    return events / max(stats(until - 1)["elements"] * steps, 1)


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def run_measures(run: dict[str, Any], qat_epochs: int, kind: str | None = None) -> dict[str, float | None]:
    """The :data:`MEASURES` of one run, overall (``kind=None``) or for one weight kind."""
    probes = run["probes"]
    at = [p["overall"] if kind is None else p["kinds"][kind] for p in probes]
    freq_qat = _rate(probes, "oscillations", kind, 0, qat_epochs)
    near_qat = statistics.mean(stats["near"] for stats in at[:qat_epochs])
    freq_last = _rate(probes, "oscillations", kind, len(probes) - 1, len(probes))
    return {
        "freq_qat": freq_qat,
        "near_qat": near_qat,
        "freq_qat_norm": _ratio(freq_qat, near_qat),
        "ema_end_qat": at[qat_epochs - 1]["mean_freq"],
        "freq_last": freq_last,
        "near_last": at[-1]["near"],
        "freq_last_norm": _ratio(freq_last, at[-1]["near"]),
        "ema_end": at[-1]["mean_freq"],
        "flips_last": at[-1]["flip_rate"],
    }


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample std over seeds (None where any seed's value is undefined), and the values."""
    known = [v for v in values if v is not None]
    complete = len(known) == len(values) and bool(known)
    return {
        "mean": statistics.mean(known) if complete else None,
        "std": (statistics.stdev(known) if len(known) > 1 else 0.0) if complete else None,
        "runs": list(values),
    }


def variant_measures(seeds: Sequence[dict[str, Any]], label: str, qat_epochs: int) -> dict[str, Any]:
    """One variant's measures over seeds: ``{"top1", "overall": {measure: spread}, "kinds": {...}}``."""
    runs = [seed["runs"][label] for seed in seeds]
    kinds = list(runs[0]["probes"][0]["kinds"])

    def over_seeds(kind: str | None) -> dict[str, Any]:
        per_seed = [run_measures(run, qat_epochs, kind) for run in runs]
        return {key: spread([m[key] for m in per_seed]) for key in MEASURES}

    return {
        "top1": spread([run["history"][-1]["val/top1"] for run in runs]),
        "overall": over_seeds(None),
        "kinds": {kind: over_seeds(kind) for kind in kinds},
    }


# --- the verdict --------------------------------------------------------------------------------------
def compare(lower: Sequence[float | None], higher: Sequence[float | None]) -> dict[str, Any]:
    """Seed-paired check that ``lower`` < ``higher``: both spreads, the per-seed ratio's spread, and
    ``"outcome"``: ``"holds"`` (lower in every seed), ``"reversed"`` (higher in every seed) or ``"mixed"``."""
    pairs = [(a, b) for a, b in zip(lower, higher, strict=True) if a is not None and b is not None]
    below = sum(a < b for a, b in pairs)
    above = sum(a > b for a, b in pairs)
    outcome = "holds" if pairs and below == len(pairs) else "reversed" if pairs and above == len(pairs) else "mixed"
    return {
        "lower": spread(lower),
        "higher": spread(higher),
        "ratio": spread([_ratio(a, b) for a, b in pairs]),
        "lower_in": below,
        "seeds": len(pairs),
        "outcome": outcome,
    }


def _claim(measures: dict[str, Any], lower: str, higher: str, keys: Sequence[str]) -> dict[str, Any]:
    """:func:`compare` of two variants on each of ``keys``, overall and per weight kind both have."""
    shared = [kind for kind in measures[lower]["kinds"] if kind in measures[higher]["kinds"]]

    def on(scope: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        return {key: compare(scope(measures[lower])[key]["runs"], scope(measures[higher])[key]["runs"]) for key in keys}

    return {
        "lower": lower,
        "higher": higher,
        "overall": on(lambda m: m["overall"]),
        "kinds": {kind: on(lambda m, k=kind: m["kinds"][k]) for kind in shared},
    }


def verdict(measures: dict[str, Any]) -> dict[str, Any]:
    """Whether StatsQ oscillates less than LSQ over QAT (raw and normalized), like for like (neither
    with QKR) and as OFQ runs it (with QKR); and whether CGA drives the last epoch's oscillation to
    about 0 against the same stage without CGA."""
    qat_keys, last_keys = ("freq_qat", "freq_qat_norm"), ("freq_last", "freq_last_norm", "ema_end")
    cga = _claim(measures, OFQ, STATSQ, last_keys)
    ratios = cga["overall"]["freq_last"]["ratio"]["runs"]
    cga["about_zero"] = bool(ratios) and all(r is not None and r <= ABOUT_ZERO for r in ratios)
    cga["about_zero_means"] = f"CGA's freq_last at most {ABOUT_ZERO:g} x the no-CGA stage's in every seed"
    result = {
        "statsq_below_lsq_like_for_like": _claim(measures, STATSQ_NO_QKR, LSQ, qat_keys),
        "statsq_qkr_below_lsq": _claim(measures, STATSQ, LSQ, qat_keys),
        "cga_about_zero": cga,
    }
    result["text"] = verdict_text(result)
    return result


def _pm(spread_: dict[str, Any], digits: str = ".2e") -> str:
    if spread_["mean"] is None:
        return "n/a"
    return f"{spread_['mean']:{digits}} ± {spread_['std']:{digits}}"


def _sentence(comparison: dict[str, Any], key: str) -> str:
    c = comparison["overall"][key]
    word = {"holds": "holds", "reversed": "does not hold (the reverse holds)", "mixed": "unresolved"}[c["outcome"]]
    return (
        f"{word}: {_pm(c['lower'])} vs {_pm(c['higher'])}, ratio {_pm(c['ratio'], '.2f')}, "
        f"lower in {c['lower_in']} of {c['seeds']} seeds"
    )


def verdict_text(result: dict[str, Any]) -> list[str]:
    """The verdict in plain sentences (printed, and rendered into the README)."""
    lines = []
    for key, how in (
        ("statsq_below_lsq_like_for_like", "like for like, neither with QKR"),
        ("statsq_qkr_below_lsq", "StatsQ with QKR, as in OFQ"),
    ):
        claim = result[key]
        lines.append(
            f'"StatsQ oscillates less than LSQ" ({how}; events per weight per step over QAT): '
            f"raw {_sentence(claim, 'freq_qat')}; normalized by the share near a threshold "
            f"{_sentence(claim, 'freq_qat_norm')}."
        )
    cga = result["cga_about_zero"]
    last = cga["overall"]["freq_last"]
    lines.append(
        f'"CGA drives oscillation to about 0" (last epoch of the second stage, CGA vs the same stage '
        f"without it): {'yes' if cga['about_zero'] else 'no'}: {_pm(last['lower'])} vs {_pm(last['higher'])} "
        f"events per weight per step, ratio {_pm(last['ratio'], '.3f')} ({cga['about_zero_means']})."
    )
    return lines


# --- output -------------------------------------------------------------------------------------------
def print_tables(measures: dict[str, Any]) -> None:
    print(f"\n{'variant':<38}{'top-1':>16}{'freq QAT':>22}{'near QAT':>10}{'freq QAT/near':>22}{'freq last':>22}")
    for label, m in measures.items():
        o = m["overall"]
        print(
            f"{label:<38}{_pm(m['top1'], '.2f'):>16}{_pm(o['freq_qat']):>22}{100 * o['near_qat']['mean']:>9.2f}%"
            f"{_pm(o['freq_qat_norm']):>22}{_pm(o['freq_last']):>22}"
        )
    print("\nper kind, freq over QAT (normalized):")
    for label, m in measures.items():
        cells = [f"{kind} {_pm(v['freq_qat'])} ({_pm(v['freq_qat_norm'])})" for kind, v in m["kinds"].items()]
        print(f"  {label}: " + "; ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--tiny", action="store_true", help="smoke run; writes oscillation_tiny.json, no MLflow")
    parser.add_argument("--model", default=None, help="default: vit_fmnist_small (vit_fmnist_micro with --tiny)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1, every variant per seed")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds: {args.seeds} is not allowed; allowed: 1 or more")
    settings = TINY if args.tiny else QUICK if args.quick else FULL
    if args.model:
        settings = replace(settings, model=args.model)

    seeds, trajectories = [], {}
    for seed in range(args.seeds):
        result, seed_trajectories = run_seed(settings, seed, trajectories=seed == 0)
        seeds.append(result)
        trajectories = trajectories or seed_trajectories
    measures = {v.label: variant_measures(seeds, v.label, settings.qat_epochs) for v in VARIANTS}
    outcome = verdict(measures)
    print_tables(measures)
    print("\n" + "\n".join(outcome["text"]))

    name = "oscillation_tiny" if args.tiny else "oscillation"
    payload = {
        "benchmark": "oscillation",
        "schema": 2,
        "quick": args.quick,
        "tiny": args.tiny,
        "model": settings.model,
        "machine": machine(),
        "settings": asdict(settings) | {"weight_bits": 2, "act_bits": 2, "momentum": 0.01, "near_width": NEAR_WIDTH},
        "epochs": {"fp": settings.fp_epochs, "qat": settings.qat_epochs, "cga": settings.cga_epochs},
        "seeds": list(range(args.seeds)),
        "variants": {v.label: asdict(v) for v in VARIANTS},
        "measure_definitions": MEASURES,
        "fp_top1": spread([seed["fp_top1"] for seed in seeds]),
        "measures": measures,
        "verdict": outcome,
        "runs": {v.label: [seed["runs"][v.label] for seed in seeds] for v in VARIANTS},
        "cga_trajectories": trajectories,
    }
    publish(
        name,
        payload,
        plot(payload, name),
        mlflow=not (args.no_mlflow or args.tiny),
        params={"quick": args.quick, "model": settings.model, "seeds": args.seeds},
        metrics={
            f"{label}/{key}": m["overall"][key]["mean"]
            for label, m in measures.items()
            for key in ("freq_qat", "freq_qat_norm", "freq_last")
            if m["overall"][key]["mean"] is not None
        }
        | {f"{label}/top1": m["top1"]["mean"] for label, m in measures.items()},
    )
    return 0


def plot(payload: dict[str, Any], name: str = "oscillation") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    qat = payload["epochs"]["qat"]
    for label, runs in payload["runs"].items():
        per_epoch = [statistics.mean(values) for values in zip(*(_ema_curve(run) for run in runs), strict=True)]
        axes[0].plot(range(1, len(per_epoch) + 1), per_epoch, marker="o", label=label)
    axes[0].axvline(qat + 0.5, color="gray", linestyle=":", label="stage 2: LR 1e-5 (+ CGA)")
    axes[0].set(yscale="log", xlabel="epoch", title="EMA oscillation frequency (mean over seeds)")
    axes[0].legend(fontsize=7)

    qat_variants = {label for label, variant in payload["variants"].items() if not variant["cga"]}
    measures = {label: m for label, m in payload["measures"].items() if label in qat_variants}  # CGA: same QAT
    kinds = list(dict.fromkeys(kind for m in measures.values() for kind in m["kinds"]))
    width = 0.8 / len(measures)
    for index, (label, m) in enumerate(measures.items()):
        xs = [k + index * width for k, kind in enumerate(kinds) if kind in m["kinds"]]
        stats = [m["kinds"][kind]["freq_qat"] for kind in kinds if kind in m["kinds"]]
        axes[1].bar(xs, [s["mean"] or 0 for s in stats], width, yerr=[s["std"] or 0 for s in stats], label=label)
    axes[1].set_xticks([k + 0.4 - width / 2 for k in range(len(kinds))], kinds)
    axes[1].set_title("oscillation events per weight per step over QAT")
    axes[1].legend(fontsize=7)

    for boundary, trajectory in payload["cga_trajectories"].items():
        steps = trajectory["steps"]
        if not steps:
            continue
        names = sorted(steps[0])
        change = [sum(s[n] / steps[0][n] - 1 for n in names) * 100 / len(names) for s in steps]
        axes[2].plot(change, label=f"BR {boundary}")
    axes[2].set(title="StatsQ scale 2 mean|W| during CGA (% change)", xlabel="step")
    axes[2].legend()
    return save_figure(figure, name)


def _ema_curve(run: dict[str, Any]) -> list[float]:
    return [probe["overall"]["mean_freq"] for probe in run["probes"]]


if __name__ == "__main__":
    raise SystemExit(main())
