"""One short QAT epoch (KD), one CGA epoch and an export round trip through ofq_ray.engine on a device.

A smoke check of the training path the Ray workers run (no Ray here): synthetic images, the real
model, AdamW, the LR schedule, CGA, the oscillation tracker, bf16 autocast and optionally
torch.compile. Prints throughput per stage and the export's logit agreement; writes JSON.

    python benchmarks/engine_check.py --device cuda --compile
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ofq_ray.engine import LRSchedule, build_optimizer, evaluate, train_one_epoch
from ofq_ray.models import create_model, get_spec, teacher_logits
from ofq_ray.quant import (
    CGA,
    OscillationTracker,
    QuantConfig,
    export_quantized,
    init_activation_scales,
    load_exported,
    quantize_model,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    name = args.model or ("deit_small_distilled_patch16_224" if gpu else "vit_fmnist_small")
    batch = args.batch or (128 if gpu else 64)
    spec = get_spec(name)
    classes = 1000 if gpu else 10
    torch.manual_seed(0)
    images = torch.randn(args.steps * batch, spec.in_chans, spec.img_size, spec.img_size)
    labels = torch.randint(0, classes, (args.steps * batch,))
    loader = list(zip(images.split(batch), labels.split(batch), strict=True))
    teacher = create_model(name, classes).to(device).eval().requires_grad_(False)
    model = quantize_model(copy.deepcopy(teacher).train(), QuantConfig(weight_bits=args.bits, act_bits=args.bits))
    init_activation_scales(model, loader[0][0].to(device))
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)
    optimizer = build_optimizer(model, 5e-4, 0.05)
    tracker = OscillationTracker(model)
    runner = torch.compile(model) if args.compile else model
    dtype = torch.bfloat16 if gpu else None
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "model": name,
        "batch": batch,
    }
    for stage, cga in (("qat", None), ("cga", CGA(model, 0.005))):
        schedule = LRSchedule(
            lr=5e-4 if stage == "qat" else 1e-5, min_lr=1e-5, epochs=1, kind="cosine" if stage == "qat" else "constant"
        )
        start = time.perf_counter()
        metrics = train_one_epoch(
            runner,
            loader,
            optimizer,
            schedule,
            0,
            device=device,
            cga=cga,
            tracker=tracker,
            autocast_dtype=dtype,
            teacher=lambda x: teacher_logits(teacher, x),
        )
        metrics["wall_s"] = time.perf_counter() - start
        metrics.update({f"osc/{k}": v for k, v in tracker.summary()["overall"].items()})
        if cga is not None:
            metrics["cga/frozen_frac"] = cga.frozen_fraction()
        report[stage] = metrics
        print(stage, json.dumps(metrics, default=float), flush=True)
    model.eval()
    val = evaluate(model, loader[:2], device=device, autocast_dtype=None)
    skeleton = quantize_model(
        create_model(name, classes).to(device), QuantConfig(weight_bits=args.bits, act_bits=args.bits)
    )
    load_exported(skeleton, export_quantized(model)).eval()
    with torch.no_grad():
        x = loader[0][0].to(device)
        difference = (skeleton(x) - model(x)).abs().max().item()
    report["export_max_abs_logit_difference"] = difference
    report["export_bytes"] = export_quantized(model)["size"]["total_bytes"]
    report["val"] = val
    print("export max |logit difference|", difference, "bytes", report["export_bytes"], flush=True)
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"engine_check_{device.type}.json"
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as handle:
        json.dump(report, handle, indent=2, default=float)
    return 0 if difference < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
