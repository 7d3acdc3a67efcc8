"""Training-step time of the OFQ model vs the same FP model, measured alternately in one process.

One step = forward + backward + AdamW step, with the KD teacher's forward included for both models
(so the ratio isolates the cost of quantization), plus an FP step without a teacher for reference.

    python benchmarks/step_speed.py --quick                      # CPU, the Fashion-MNIST ViT
    python benchmarks/step_speed.py --model vit_fmnist_small --out benchmarks/results/step_speed_cpu_small.json
    OMP_NUM_THREADS=1 python benchmarks/step_speed.py --clock process   # a CPU shared with other jobs
    python benchmarks/step_speed.py --device cuda --compile      # DeiT-S at 224 px, bf16, batch 128
    OMP_NUM_THREADS=1 python benchmarks/step_speed.py --clock process --breakdown   # where OFQ's extra time goes

Prints a table and writes JSON (``--out``). Only torch and timm are needed (no Ray, no MLflow), so
it runs on a bare GPU machine with ``PYTHONPATH=.``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ofq_ray.engine import build_optimizer, soft_cross_entropy
from ofq_ray.models import create_model, get_spec, teacher_logits
from ofq_ray.quant import QuantConfig, init_activation_scales, quantize_model

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(os.path.dirname(HERE), "docs")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(
    model: nn.Module, teacher: nn.Module | None, images: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype | None
) -> Callable[[], None]:
    optimizer = build_optimizer(model, 1e-4, 0.05)
    device = images.device

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            soft = teacher_logits(teacher, images) if teacher is not None else None
            out = model(images)
            logits = out[0] if isinstance(out, tuple) else out
            loss = F.cross_entropy(logits.float(), labels)
            if soft is not None:
                loss = loss + soft_cross_entropy(out[1] if isinstance(out, tuple) else out, soft)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}


def time_steps(step: Callable[[], None], steps: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds per step on ``clock``: ``wall``, or ``process`` (CPU seconds of this process, all threads).

    On a CPU shared with other jobs, wall time counts the time slices those jobs take; process time
    does not (with one thread it is the step's own compute time).
    """
    now = CLOCKS[clock]
    _sync(device)
    start = now()
    for _ in range(steps):
        step()
    _sync(device)
    return (now() - start) / steps


def peak_memory(step: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def build(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    spec = get_spec(args.model)
    torch.manual_seed(0)
    fp = create_model(args.model, num_classes=args.classes).to(device)
    teacher = copy.deepcopy(fp).eval().requires_grad_(False)
    images = torch.randn(args.batch, spec.in_chans, spec.img_size, spec.img_size, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    ofq = quantize_model(copy.deepcopy(fp), QuantConfig(weight_bits=args.bits, act_bits=args.bits, qkr=not args.no_qkr))
    init_activation_scales(ofq, images)
    for model in (fp, ofq):
        model.train()
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(True)
    return {"fp": fp, "ofq": ofq, "teacher": teacher, "images": images, "labels": labels, "spec": spec}


def saved_for_backward_mib(model: nn.Module, images: torch.Tensor) -> float:
    """MiB that autograd keeps for backward in one training forward, each storage counted once."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(images)
    return sum(storages.values()) / 2**20


def saved_for_backward(model_name: str, batch: int, bits: int, qkr: bool) -> dict[str, Any]:
    """The device-independent memory cost of OFQ: saved-for-backward bytes of the OFQ model over the FP
    one, on the CPU at a small batch (the ratio does not depend on the batch)."""
    spec = get_spec(model_name)
    torch.manual_seed(0)
    fp = create_model(model_name, num_classes=1000).train()
    images = torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size)
    ofq = quantize_model(copy.deepcopy(fp), QuantConfig(weight_bits=bits, act_bits=bits, qkr=qkr))
    init_activation_scales(ofq, images)
    ofq.train()
    fp_mib, ofq_mib = saved_for_backward_mib(fp, images), saved_for_backward_mib(ofq, images)
    return {"model": model_name, "batch": batch, "fp_mib": fp_mib, "ofq_mib": ofq_mib, "ratio": ofq_mib / fp_mib}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else None
    if device.type == "cpu":
        torch.set_num_threads(args.threads or torch.get_num_threads())
    parts = build(args, device)
    variants: dict[str, Callable[[], None]] = {
        "fp": make_step(parts["fp"], None, parts["images"], parts["labels"], dtype),
        "fp+kd": make_step(parts["fp"], parts["teacher"], parts["images"], parts["labels"], dtype),
        "ofq+kd": make_step(parts["ofq"], parts["teacher"], parts["images"], parts["labels"], dtype),
    }
    # Profiled before anything is compiled: with inductor's compile workers in the process, the same eager
    # OFQ step profiled up to 1.5x slower than it timed.
    split = breakdown(variants["fp+kd"], variants["ofq+kd"]) if args.breakdown else None
    if args.compile:
        for name in ("fp+kd", "ofq+kd"):
            base = parts["fp"] if name.startswith("fp") else parts["ofq"]
            compiled = torch.compile(copy.deepcopy(base))
            variants[f"{name} compiled"] = make_step(
                compiled, parts["teacher"], parts["images"], parts["labels"], dtype
            )
    compile_s = {}
    for name, step in variants.items():  # warm-up (and compilation) outside the timed rounds
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        _sync(device)
        compile_s[name] = time.perf_counter() - start
    memory = {name: peak_memory(step, device) for name, step in variants.items()}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):  # alternate so drift and noise hit every variant alike
        for name, step in variants.items():
            samples[name].append(time_steps(step, args.steps, device, args.clock))
    median = {name: statistics.median(values) for name, values in samples.items()}
    ratios = {"ofq+kd / fp+kd": median["ofq+kd"] / median["fp+kd"], "ofq+kd / fp": median["ofq+kd"] / median["fp"]}
    if args.compile:
        ratios["ofq+kd / fp+kd (compiled)"] = median["ofq+kd compiled"] / median["fp+kd compiled"]
        ratios["compiled / eager (ofq+kd)"] = median["ofq+kd compiled"] / median["ofq+kd"]
    if device.type == "cuda" and memory["fp+kd"]:
        ratios["peak memory ofq+kd / fp+kd"] = memory["ofq+kd"] / memory["fp+kd"]  # type: ignore[operator]
    profile = _profile(variants["ofq+kd"], device, args.profile_rows) if args.profile_rows else None
    saved = saved_for_backward(args.saved_model, 4, args.bits, not args.no_qkr)
    ratios["saved for backward ofq / fp"] = saved["ratio"]
    return {
        "benchmark": "step_speed",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": args.model,
        "img_size": parts["spec"].img_size,
        "batch": args.batch,
        "bits": args.bits,
        "qkr": not args.no_qkr,
        "precision": "bf16" if args.bf16 else "fp32",
        "clock": args.clock,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "step_s_median": median,
        "step_s_samples": samples,
        "img_per_s": {name: args.batch / value for name, value in median.items()},
        "warmup_s": compile_s,
        "peak_memory_mib": memory,
        "ratios": ratios,
        "saved_for_backward": saved,
        "profile": profile,
        "breakdown": split,
    }


# Profiler op names -> what they are, for the breakdown of OFQ's extra time (first match wins).
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GEMM", ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product", "aten::mkldnn_convolution",
              "aten::convolution_backward", "aten::baddbmm")),
    ("GELU", ("aten::gelu",)),
    ("softmax", ("aten::_softmax",)),
    ("layer norm", ("aten::native_layer_norm",)),
    ("optimizer", ("Optimizer.", "aten::_fused_adam")),
    ("elementwise math", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::addc", "aten::clamp",
                          "aten::round", "aten::eq", "aten::sum", "aten::abs", "aten::mean", "aten::floor",
                          "aten::where", "aten::copy_", "aten::fill_", "aten::zero_", "aten::ne", "aten::le",
                          "aten::ge", "aten::lt", "aten::gt", "aten::bitwise", "aten::logical", "aten::neg")),
)  # fmt: skip


def op_category(name: str) -> str:
    """The breakdown's category of a profiler op: one of CATEGORIES' names, else ``framework`` (autograd
    nodes, custom Functions' own Python, views, dtype casts, allocation: time no kernel spends)."""
    for category, prefixes in CATEGORIES:
        if name.startswith(prefixes):
            return category
    return "framework"


def breakdown(fp_step: Callable[[], None], ofq_step: Callable[[], None], steps: int = 5) -> dict[str, Any]:
    """Self CPU ms per step of the FP+KD and OFQ+KD steps, per category and per op (profiler, one thread
    recommended): where the OFQ step's extra time goes. CPU only: on a GPU the kernels run asynchronously,
    and ``--profile-rows`` shows device times instead."""
    from torch.profiler import ProfilerActivity, profile

    per_op: dict[str, dict[str, list[float]]] = {}
    for name, step in (("fp+kd", fp_step), ("ofq+kd", ofq_step)):
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        for event in prof.key_averages():
            row = per_op.setdefault(event.key, {"fp+kd": [0.0, 0.0], "ofq+kd": [0.0, 0.0]})
            row[name][0] += event.self_cpu_time_total / 1000 / steps
            row[name][1] += event.count / steps
    categories: dict[str, dict[str, float]] = {}
    for op, row in per_op.items():
        category = categories.setdefault(op_category(op), {"fp+kd": 0.0, "ofq+kd": 0.0})
        for name in ("fp+kd", "ofq+kd"):
            category[name] += row[name][0]
    for category in categories.values():
        category["extra"] = category["ofq+kd"] - category["fp+kd"]
    total = {name: sum(c[name] for c in categories.values()) for name in ("fp+kd", "ofq+kd")}
    ops = sorted(per_op.items(), key=lambda item: item[1]["fp+kd"][0] - item[1]["ofq+kd"][0])
    return {
        "unit": "self CPU ms per step (profiled)",
        "steps": steps,
        "total": total | {"extra": total["ofq+kd"] - total["fp+kd"]},
        "categories": dict(sorted(categories.items(), key=lambda item: -item[1]["extra"])),
        "ops": [
            {
                "op": op,
                "category": op_category(op),
                "fp+kd_ms": row["fp+kd"][0],
                "ofq+kd_ms": row["ofq+kd"][0],
                "fp+kd_calls": row["fp+kd"][1],
                "ofq+kd_calls": row["ofq+kd"][1],
            }
            for op, row in ops[:15]
        ],
    }


def print_breakdown(data: dict[str, Any]) -> None:
    total = data["total"]
    print(f"\nwhere OFQ+KD's extra time goes ({data['unit']}, {data['steps']} steps each)")
    print(f"{'category':<20}{'FP+KD':>9}{'OFQ+KD':>9}{'extra':>9}{'share':>8}")
    for category, row in [*data["categories"].items(), ("total", total)]:
        share = row["extra"] / total["extra"] if total["extra"] else 0.0
        print(f"{category:<20}{row['fp+kd']:>9.1f}{row['ofq+kd']:>9.1f}{row['extra']:>9.1f}{share:>8.0%}")
    print(f"{'op':<46}{'FP+KD ms':>10}{'OFQ+KD ms':>11}{'calls':>12}")
    for op in data["ops"]:
        calls = f"{op['fp+kd_calls']:.0f}/{op['ofq+kd_calls']:.0f}"
        print(f"{op['op'][:45]:<46}{op['fp+kd_ms']:>10.2f}{op['ofq+kd_ms']:>11.2f}{calls:>12}")


def _profile(step: Callable[[], None], device: torch.device, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        _sync(device)
    averages = prof.key_averages()
    if device.type != "cuda":
        return str(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    try:  # the key was renamed across torch releases
        return str(averages.table(sort_by="self_device_time_total", row_limit=rows))
    except (AttributeError, KeyError, ValueError):
        return str(averages.table(sort_by="self_cuda_time_total", row_limit=rows))


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\nstep_speed on {result['device']} ({result['precision']}, {result['model']} @ {result['img_size']} px, "
        f"batch {result['batch']}, W{result['bits']}A{result['bits']}, QKR {'on' if result['qkr'] else 'off'}, "
        f"{result.get('clock', 'wall')} clock)"
    )
    print(f"{'variant':<22}{'step ms':>10}{'img/s':>10}{'peak MiB':>10}{'warm-up s':>11}")
    for name, seconds in result["step_s_median"].items():
        memory = result["peak_memory_mib"][name]
        print(
            f"{name:<22}{1000 * seconds:>10.1f}{result['img_per_s'][name]:>10.0f}"
            f"{(f'{memory:.0f}' if memory else '-'):>10}{result['warmup_s'][name]:>11.1f}"
        )
    for name, value in result["ratios"].items():
        print(f"ratio {name:<36}{value:>8.3f}")
    saved = result["saved_for_backward"]
    print(
        f"saved for backward ({saved['model']}, batch {saved['batch']}, CPU): "
        f"FP {saved['fp_mib']:.0f} MiB, OFQ {saved['ofq_mib']:.0f} MiB"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default=None, help="registered model (default: vit_fmnist on CPU, DeiT-S on GPU)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument(
        "--saved-model", default="deit_small_patch16_224", help="model whose saved-for-backward bytes are counted"
    )
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--no-qkr", action="store_true")
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--clock",
        default="wall",
        choices=tuple(CLOCKS),
        help="wall time, or the process's CPU time (for a CPU shared with other jobs; use one thread)",
    )
    parser.add_argument("--quick", action="store_true", help="7 rounds of 4 steps (default 9 of 5)")
    parser.add_argument("--profile-rows", type=int, default=0, help="append a profiler table of the OFQ step")
    parser.add_argument(
        "--breakdown", action="store_true", help="profile FP+KD and OFQ+KD: OFQ's extra time per kind of op (CPU)"
    )
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/step_speed_<device>.json)")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    args.model = args.model or ("deit_small_distilled_patch16_224" if gpu else "vit_fmnist")
    args.batch = args.batch or 128
    args.classes = args.classes or (1000 if gpu else 10)
    args.bf16 = gpu if args.bf16 is None else args.bf16
    if args.breakdown and gpu:
        parser.error("--breakdown: CPU only (on a GPU use --profile-rows)")
    if args.quick:
        args.rounds, args.steps = 7, 4
    result = run(args)
    print_table(result)
    if result["breakdown"]:
        print_breakdown(result["breakdown"])
    if result["profile"]:
        print(result["profile"])
    out = args.out or os.path.join(HERE, "results", f"step_speed_{args.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"\nwrote {out}")
    # A bare GPU machine may have only torch and timm: the plot and the MLflow run are then skipped
    # (benchmarks/report.py draws missing plots from the JSON later).
    if importlib.util.find_spec("matplotlib") is None:
        print("no plot: matplotlib is not installed")
        return 0
    stem = os.path.splitext(os.path.basename(out))[0]
    in_results = os.path.dirname(os.path.abspath(out)) == os.path.join(HERE, "results")
    png = plot(result, os.path.join(DOCS, f"{stem}.png") if in_results else os.path.splitext(out)[0] + ".png")
    print(f"wrote {png}")
    if args.no_mlflow:
        return 0
    if importlib.util.find_spec("mlflow") is None:
        print("not logged to MLflow: mlflow is not installed")
        return 0
    from _common import log_to_mlflow

    params = {k: result[k] for k in ("device", "model", "batch", "bits", "qkr", "precision", "threads")}
    log_to_mlflow("step_speed", params, result["ratios"], [out, png])
    return 0


def plot(result: dict[str, Any], path: str) -> str:
    """Bar chart of the median step time per variant, saved at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["step_s_median"])
    figure, axis = plt.subplots(figsize=(8, 3.2))
    colors = ["tab:blue" if name.startswith("ofq") else "gray" for name in names]
    axis.barh(names, [1000 * result["step_s_median"][n] for n in names], color=colors)
    axis.invert_yaxis()
    axis.set_xlabel("ms per training step (median)")
    axis.set_title(f"{result['model']} on {result['device']}, {result['precision']}, batch {result['batch']}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
