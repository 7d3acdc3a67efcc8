"""Weight oscillation at W2A2: LSQ weights vs StatsQ vs StatsQ + CGA, same seed and steps; and the
StatsQ scale trajectories during CGA for boundary ranges 0.003/0.005/0.007/0.01 (the paper's Fig. 1).

    python benchmarks/oscillation.py --quick      # Fashion-MNIST subset, small ViT, CPU (minutes)
    python benchmarks/oscillation.py              # more data and epochs

Prints a table, writes benchmarks/results/oscillation.json and docs/oscillation.png, logs to MLflow.
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import (
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

from ofq_ray.quant import CGA, OscillationTracker, QuantConfig, StatsQuantizer
from ofq_ray.quant.layers import QLinear, iter_quantized_weights

BOUNDARY_RANGES = (0.003, 0.005, 0.007, 0.01)


def near_threshold(model: torch.nn.Module, width: float = 0.05) -> float:
    """Fraction of the unclipped low-bit weights whose pre-round value lies within ``width`` steps of a
    rounding threshold (the weights a tiny update can flip). StatsQ has a threshold at 0, where the
    weights are densest; LSQ has a zero level there."""
    close = total = 0
    for _, source in iter_quantized_weights(model, "block"):
        quantizer, latent = source.quantizer, source.latent().detach()
        if isinstance(quantizer, StatsQuantizer):
            z = quantizer.prequant(latent)
            inside = (z > -quantizer.levels_half - 0.5) & (z < quantizer.levels_half - 0.5)
        else:
            z = latent / quantizer.step.detach().clamp_min(1e-5)
            inside = (z > quantizer.qn) & (z < quantizer.qp)
        distance = (z - torch.floor(z) - 0.5).abs()
        close += int(((distance <= width) & inside).sum())
        total += int(inside.sum())
    return close / max(total, 1)


def scale_probe(model: torch.nn.Module) -> dict[str, float]:
    """Mean StatsQ row scale 2*mean|W_r| of a few block weights (what Fig. 1 plots during CGA)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QLinear) and name.endswith(
            ("blocks.0.mlp.fc1", "blocks.0.attn.proj", "blocks.1.mlp.fc2")
        ):
            out[name] = float(2 * module.weight.detach().abs().mean(dim=1).mean())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="vit_fmnist_small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_subset, fp_epochs, qat_epochs, cga_epochs = (20000, 10, 6, 3) if args.quick else (60000, 10, 8, 6)
    data = fashion(train_subset, 2000 if args.quick else 10000, 128, args.seed)
    fp = fp_model(args.model, data, args.seed)
    fp_run, _ = train(fp, data, epochs=fp_epochs, lr=2e-3, warmup_epochs=1)
    teacher = frozen_teacher(fp)
    print(f"FP: {fp_run.best:.2f} % after {fp_epochs} epochs ({fp_run.wall_s:.0f} s)")

    variants, near = {}, {}
    for label, config, use_cga in (
        ("LSQ weights", QuantConfig(weight_bits=2, act_bits=2, weight_quantizer="lsq"), False),
        ("StatsQ", QuantConfig(weight_bits=2, act_bits=2), False),
        ("StatsQ + CGA", QuantConfig(weight_bits=2, act_bits=2), True),
    ):
        # Same seed, data order and steps for all three: QAT on a cosine schedule, then the reference's
        # second stage (constant LR 1e-5, same optimizer), where only the last variant applies CGA.
        torch.manual_seed(args.seed)
        model = quantized(fp, config, data)
        tracker = OscillationTracker(model)
        first, optimizer = train(model, data, epochs=qat_epochs, lr=1e-3, teacher=teacher, tracker=tracker)
        near[label] = near_threshold(model)
        if label == "StatsQ":  # the QAT checkpoint every CGA trajectory below starts from
            base, base_optimizer_state = copy.deepcopy(model), copy.deepcopy(optimizer.state_dict())
        second = second_stage(
            model,
            data,
            epochs=cga_epochs,
            teacher=teacher,
            optimizer=optimizer,
            cga=CGA(model, 0.005) if use_cga else None,
            tracker=tracker,
        )
        history = first.history + second.history
        variants[label] = history
        end_qat, last = first.history[-1], history[-1]
        print(
            f"{label:>14}: top1 {last['val/top1']:.2f}  osc mean f {end_qat['osc/mean_freq']:.2e} -> "
            f"{last['osc/mean_freq']:.2e}  frac f>0.005 {last['osc/frac_gt_0.005']:.4f}  "
            f"flip rate {last['osc/flip_rate']:.2e}  near a threshold {100 * near[label]:.2f} %",
            flush=True,
        )

    # Scale trajectories during CGA from the StatsQ QAT checkpoint, per boundary range.
    trajectories = {}
    for boundary in BOUNDARY_RANGES:
        model = copy.deepcopy(base)
        run = second_stage(
            model,
            data,
            epochs=cga_epochs,
            teacher=teacher,
            optimizer=base_optimizer_state,
            cga=CGA(model, boundary),
            step_hook=lambda m=model: scale_probe(m),
        )
        trajectories[str(boundary)] = {
            "steps": run.steps,
            "frozen_frac": [r["cga/frozen_frac"] for r in run.history],
            "top1": [r["val/top1"] for r in run.history],
        }
        print(f"CGA BR {boundary}: frozen {100 * run.history[-1]['cga/frozen_frac']:.2f} %  top1 {run.last:.2f}")

    payload = {
        "benchmark": "oscillation",
        "quick": args.quick,
        "model": args.model,
        "machine": machine(),
        "epochs": {"fp": fp_epochs, "qat": qat_epochs, "cga": cga_epochs},
        "fp_top1": fp_run.best,
        "variants": variants,
        "near_threshold_end_of_qat": near,
        "cga_trajectories": trajectories,
    }
    publish(
        "oscillation",
        payload,
        plot(payload),
        mlflow=not args.no_mlflow,
        params={"quick": args.quick, "model": args.model},
        metrics={
            f"{k}/{m}": v[-1][m] for k, v in variants.items() for m in ("val/top1", "osc/mean_freq", "osc/flip_rate")
        },
    )
    return 0


def plot(payload: dict) -> str:

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, history in payload["variants"].items():
        epochs = list(range(1, len(history) + 1))
        axes[0].plot(epochs, [row["osc/mean_freq"] for row in history], marker="o", label=label)
        axes[1].plot(epochs, [row["osc/flip_rate"] for row in history], marker="o", label=label)
    qat = payload["epochs"]["qat"]
    for axis, title in ((axes[0], "mean oscillation frequency"), (axes[1], "code flips per step")):
        axis.axvline(qat + 0.5, color="gray", linestyle=":", label="stage 2: LR 1e-5 (+ CGA)")
        axis.set_yscale("log")
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.legend()
    for boundary, trajectory in payload["cga_trajectories"].items():
        steps = trajectory["steps"]
        if not steps:
            continue
        names = sorted(steps[0])
        change = [sum(s[n] / steps[0][n] - 1 for n in names) * 100 / len(names) for s in steps]
        axes[2].plot(change, label=f"BR {boundary}")
    axes[2].set_title("StatsQ scale 2 mean|W| during CGA (% change)")
    axes[2].set_xlabel("step")
    axes[2].legend()
    return save_figure(figure, "oscillation")


if __name__ == "__main__":
    raise SystemExit(main())
