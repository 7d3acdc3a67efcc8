"""A run config's cost metrics without training it (e.g. to reject configurations over a budget)."""

from __future__ import annotations

import torch

from .checkpoint import build_model
from .config import RunConfig
from .models import get_spec
from .quant import init_activation_scales
from .quant.cost import model_cost


def run_cost(
    config: RunConfig, *, num_classes: int, in_chans: int | None = None, img_size: int | None = None
) -> dict[str, float]:
    """``{"model/size_bytes", "model/bitops"}`` of the model ``config`` trains: the values its runs report
    every epoch, computed from the architecture and widths alone (random weights, a zero batch to
    shape the activation steps; no data, no training; the global RNG is left as it was).

    A ``pretrain`` config gives the float model's costs (4 bytes per value, 32 x 32 bits per MAC).

    Args:
        config: a validated run config.
        num_classes: the dataset's class count (it sizes the classifier head).
        in_chans, img_size: the input's channels and side; default: ``data.img_size``, then the
            model's registered values.

    Example:
        >>> run_cost(load_config("configs/fmnist_w2a2.yaml"), num_classes=10)
        {'model/size_bytes': ..., 'model/bitops': ...}
    """
    spec = get_spec(config.model.name)
    in_chans = in_chans or spec.in_chans
    img_size = img_size or config.data.img_size or spec.img_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config, num_classes, in_chans, img_size, quantized=config.quantized)
    model.eval()
    if config.quantized:
        init_activation_scales(model, torch.zeros(1, in_chans, img_size, img_size))
    return model_cost(model, (in_chans, img_size, img_size))
