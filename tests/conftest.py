"""Shared fixtures: tiny timm models on small images, so CPU tests stay fast."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import timm
import torch
from torch import nn

from ofq_ray.quant import QuantConfig, init_activation_scales, quantize_model


def make_tiny_vit(seed: int = 0, **overrides: object) -> nn.Module:
    """A DeiT-tiny-shaped ViT for 32 px grayscale: patch 4, width 48, 3 heads, depth 2, qkv biases."""
    torch.manual_seed(seed)
    kwargs: dict[str, object] = dict(
        pretrained=False,
        num_classes=10,
        img_size=32,
        patch_size=4,
        in_chans=1,
        depth=2,
        embed_dim=48,
        num_heads=3,
        qkv_bias=True,
    )
    kwargs.update(overrides)
    return timm.create_model("deit_tiny_patch16_224", **kwargs)


def randomize_biases(model: nn.Module, std: float = 0.3) -> None:
    """timm initializes biases to zero; pretrained models have non-zero ones, which QKR must handle."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "relative_position_bias_table" in name:
                param.normal_(0.0, std)


@pytest.fixture
def tiny_vit() -> Callable[..., nn.Module]:
    return make_tiny_vit


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """One local Ray per test module (starting Ray costs seconds), with the dashboard: Ray Train needs
    its state API to clean up after stopped runs. Module scope, because test_tune starts its own
    `ray start --head` cluster and Ray's helpers refuse to guess between two clusters on one machine."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    ray.init(address="local", num_cpus=4, object_store_memory=1_000_000_000, include_dashboard=True, log_to_driver=True)
    yield
    ray.shutdown()


def make_tiny_swin(seed: int = 0, in_chans: int = 1) -> nn.Module:
    """A two-stage Swin for 32 px: patch 4, window 4, width 24, depths (2, 2), heads (2, 4)."""
    torch.manual_seed(seed)
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        num_classes=10,
        img_size=32,
        in_chans=in_chans,
        window_size=4,
        embed_dim=24,
        depths=(2, 2),
        num_heads=(2, 4),
    )


def trained_tiny_vit(config: QuantConfig, steps: int = 3) -> tuple[nn.Module, torch.Tensor]:
    """A quantized tiny ViT after ``steps`` AdamW steps (steps and shifts moved off their init), in eval
    mode, and its batch."""
    model = quantize_model(make_tiny_vit(), config)
    randomize_biases(model, std=0.1)
    x = torch.randn(4, 1, 32, 32)
    init_activation_scales(model, x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):  # move LSQ steps and shifts away from their init
        optimizer.zero_grad()
        model(x).logsumexp(dim=1).mean().backward()
        optimizer.step()
    return model.eval(), x
