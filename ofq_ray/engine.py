"""One training epoch and one evaluation, the KD loss, the optimizer and the LR schedule.

No Ray and no MLflow here: everything runs in a plain process. Under ``torch.distributed`` (set up by
Ray Train) metrics are summed over ranks so that every rank returns the global numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .quant.cga import CGA
from .quant.oscillation import OscillationTracker
from .quant.quantizers import LsqQuantizer

StepHook = Callable[[int, int], None]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or torch.compile) wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod  # type: ignore[assignment]
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for biases, norms, tokens, position tables and every quantizer parameter."""
    skip_names = set(getattr(model, "no_weight_decay", lambda: set())())
    quantizer_params = {id(p) for m in model.modules() if isinstance(m, LsqQuantizer) for p in m.parameters()}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = param.ndim <= 1 or name.endswith("bias") or name in skip_names or id(param) in quantizer_params
        (no_decay if plain else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, fused (one kernel per step) where every parameter allows it.

    The quantized model has about 2.7x as many parameter tensors as the float one (a step and two
    shifts per quantizer), most of them tiny; the per-tensor AdamW (~10 ops each, the CPU default)
    then cost ~10 ms of a ~180 ms CPU training step of ``vit_fmnist_small``. The update is AdamW's
    formula either way.
    """
    groups = param_groups(model, weight_decay)
    params = [param for group in groups for param in group["params"]]
    fused = all(param.device.type in ("cpu", "cuda") and param.is_floating_point() for param in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


@dataclass(frozen=True)
class LRSchedule:
    """Epoch-indexed LR: linear warmup, cosine to ``min_lr`` over ``epochs - cooldown_epochs``, then flat.

    Matches timm's per-epoch cosine (warmup from ``warmup_lr`` with no prefix, so the cosine uses the
    raw epoch index), evaluated at fractional epochs so the LR also moves within an epoch. With
    ``kind="constant"`` the LR is ``lr`` throughout (the CGA stage).
    """

    lr: float
    min_lr: float
    epochs: int
    warmup_epochs: int = 0
    warmup_lr: float = 1e-6
    cooldown_epochs: int = 0
    kind: str = "cosine"

    def __call__(self, epoch: float) -> float:
        if self.kind == "constant":
            return self.lr
        if epoch < self.warmup_epochs:
            return self.warmup_lr + epoch * (self.lr - self.warmup_lr) / self.warmup_epochs
        cosine_epochs = max(1, self.epochs - self.cooldown_epochs)
        if epoch >= cosine_epochs:
            return self.min_lr
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * epoch / cosine_epochs))

    def apply(self, optimizer: torch.optim.Optimizer, epoch: float) -> float:
        lr = self(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``-sum softmax(t) * log_softmax(s)`` at temperature 1 (the reference's soft KD term)."""
    return torch.sum(-target_logits.float().softmax(dim=-1) * logits.float().log_softmax(dim=-1), dim=-1).mean()


def training_loss(
    output: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    targets: torch.Tensor,
    teacher: torch.Tensor | None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and the logits to score. Two-head students: CE on the class head + soft CE of the
    distillation head against the teacher; one head: CE + soft CE on the same logits. Without a
    teacher both heads learn the labels.

    ``targets`` are class indices (then ``label_smoothing`` applies here) or, under mixup/cutmix,
    per-class probabilities that timm's ``Mixup`` has already smoothed: those go to a soft-target
    cross-entropy as they are, so smoothing happens once (timm's ``SoftTargetCrossEntropy``).
    """

    def hard(logits: torch.Tensor) -> torch.Tensor:
        if targets.is_floating_point():
            return torch.sum(-targets.float() * logits.float().log_softmax(dim=-1), dim=-1).mean()
        return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)

    if isinstance(output, tuple):
        cls_logits, dist_logits = output
        if teacher is None:
            return (hard(cls_logits) + hard(dist_logits)) / 2, (cls_logits + dist_logits) / 2
        return hard(cls_logits) + soft_cross_entropy(dist_logits, teacher), cls_logits
    if teacher is None:
        return hard(output), output
    return hard(output) + soft_cross_entropy(output, teacher), output


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    epoch: int,
    *,
    device: torch.device,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
    cga: CGA | None = None,
    tracker: OscillationTracker | None = None,
    autocast_dtype: torch.dtype | None = None,
    clip_grad: float | None = None,
    mixup: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    label_smoothing: float = 0.0,
    step_hook: StepHook | None = None,
) -> dict[str, float]:
    """Trains one epoch; returns global ``train/loss``, ``train/top1``, ``lr`` and ``throughput/img_s``.

    With ``cga`` the optimizer step goes through :meth:`CGA.step` (mask, step, restore); ``tracker`` is
    updated after every step. ``teacher(images)`` returns the soft-target logits.
    """
    model.train()
    steps = len(loader)  # type: ignore[arg-type]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    lr = schedule(epoch)
    start = time.perf_counter()
    for step, (images, targets) in enumerate(loader):
        if step_hook is not None:
            step_hook(epoch, step)
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        labels = targets
        if mixup is not None:
            images, targets = mixup(images, targets)
        lr = schedule.apply(optimizer, epoch + step / max(1, steps))
        with _autocast(device, autocast_dtype):
            soft = teacher(images) if teacher is not None else None
            output = model(images)
            loss, logits = training_loss(output, targets, soft, label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        if cga is not None:
            cga.step(optimizer)
        else:
            optimizer.step()
        if tracker is not None:
            tracker.update()
        batch = images.shape[0]
        loss_sum += loss.detach().double() * batch
        correct += (logits.detach().argmax(dim=-1) == labels).sum()
        seen += batch
    elapsed = time.perf_counter() - start
    total_loss, total_correct, total_seen = _all_reduce([loss_sum.item(), correct.item(), float(seen)], device)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return {
        "train/loss": total_loss / max(1.0, total_seen),
        "train/top1": 100.0 * total_correct / max(1.0, total_seen),
        "lr": lr,
        # every rank runs the same number of steps, so the global rate is world x the local one
        "throughput/img_s": world * seen / max(elapsed, 1e-9),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean CE loss over every example of every rank's shard."""
    model.eval()
    correct1 = correct5 = loss_sum = 0.0
    count = 0
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with _autocast(device, autocast_dtype):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += (top[:, 0] == targets).sum().item()
        correct5 += (top == targets[:, None]).any(dim=-1).sum().item()
        count += targets.numel()
    correct1, correct5, loss_sum, total = _all_reduce([correct1, correct5, loss_sum, float(count)], device)
    total = max(total, 1.0)
    return {"val/top1": 100.0 * correct1 / total, "val/top5": 100.0 * correct5 / total, "val/loss": loss_sum / total}
