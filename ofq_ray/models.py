"""Model registry: the paper's models plus small-image variants, pretrained weights from timm or a local file.

Every entry is data: a timm architecture name and the keyword overrides that shape it. New variants are
added with one :func:`register` call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from .errors import ConfigError
from .hints import did_you_mean


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: ``timm.create_model(arch, **kwargs)`` at ``img_size`` with ``in_chans`` channels."""

    name: str
    arch: str
    img_size: int
    in_chans: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def distilled(self) -> bool:
        """Two heads (class + distillation token), as the paper's DeiT students."""
        return "distilled" in self.arch


MODELS: dict[str, ModelSpec] = {}


def register(name: str, arch: str, img_size: int, in_chans: int, description: str, **kwargs: Any) -> ModelSpec:
    spec = ModelSpec(name, arch, img_size, in_chans, kwargs, description)
    MODELS[name] = spec
    return spec


# The paper's students and teachers (ImageNet, 224 px).
register("deit_tiny_distilled_patch16_224", "deit_tiny_distilled_patch16_224", 224, 3, "DeiT-T (distilled), paper")
register("deit_small_distilled_patch16_224", "deit_small_distilled_patch16_224", 224, 3, "DeiT-S (distilled), paper")
register("deit_tiny_patch16_224", "deit_tiny_patch16_224", 224, 3, "DeiT-T")
register("deit_small_patch16_224", "deit_small_patch16_224", 224, 3, "DeiT-S")
register("swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224", 224, 3, "Swin-T, paper")

# Small-image variants for real small data (Fashion-MNIST 28x28 gray, digits upsampled).
_SMALL = dict(patch_size=4, embed_dim=96, num_heads=3, qkv_bias=True)
register(
    "vit_fmnist",
    "deit_tiny_patch16_224",
    28,
    1,
    "DeiT-tiny-shaped ViT for 28 px gray: patch 4, width 96, depth 4",
    depth=4,
    **_SMALL,
)
register(
    "vit_fmnist_distilled",
    "deit_tiny_distilled_patch16_224",
    28,
    1,
    "two-head variant of vit_fmnist",
    depth=4,
    **_SMALL,
)
register(
    "vit_fmnist_small",
    "deit_tiny_patch16_224",
    28,
    1,
    "sweeps on CPU: patch 7, width 64, depth 3",
    patch_size=7,
    embed_dim=64,
    num_heads=2,
    depth=3,
    qkv_bias=True,
)
register(
    "vit_fmnist_micro",
    "deit_tiny_patch16_224",
    28,
    1,
    "tests: patch 7, width 48, depth 2",
    patch_size=7,
    embed_dim=48,
    num_heads=3,
    depth=2,
    qkv_bias=True,
)
register(
    "vit_digits",
    "deit_tiny_patch16_224",
    16,
    1,
    "tests: digits at 16 px, patch 4, width 48, depth 2",
    patch_size=4,
    embed_dim=48,
    num_heads=3,
    depth=2,
    qkv_bias=True,
)


def get_spec(name: str) -> ModelSpec:
    """The registered spec, or a one-line ``ValueError`` naming ``model.name`` and the allowed names."""
    if name not in MODELS:
        hint = did_you_mean(name, MODELS)
        raise ConfigError(f"model.name: unknown model {name!r}; allowed: {', '.join(MODELS)}{hint}")
    return MODELS[name]


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ConfigError(f"model.pretrained_path: {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the same user error
        raise ConfigError(f"model.pretrained_path: cannot read {path}: {type(error).__name__}") from None
    for key in ("model_state", "model", "state_dict"):  # ofq-ray, DeiT/timm and Lightning-style wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.pretrained_path: {path} holds no state dict of tensors")
    return state


def load_pretrained(model: nn.Module, path: str) -> list[str]:
    """Loads float weights from a local file into ``model``; returns the keys skipped for a shape mismatch.

    Classifier heads whose class count differs are skipped (fine-tuning to a new dataset); any other
    missing, unexpected or mismatched key is an error, so a wrong file never half-loads.
    """
    state = _read_state_dict(path)
    own = model.state_dict()
    heads = {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias", "head.fc.weight", "head.fc.bias"}
    skipped = [k for k, v in state.items() if k in heads and k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and k not in skipped]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        detail = (mismatched and f"shape mismatch {mismatched[:2]}") or (missing and f"missing {missing[:2]}")
        detail = detail or f"unexpected {unexpected[:2]}"
        raise ConfigError(f"model.pretrained_path: {path} does not fit this model ({detail})")
    model.load_state_dict(state, strict=False)
    return skipped


def create_model(
    name: str,
    num_classes: int,
    *,
    in_chans: int | None = None,
    img_size: int | None = None,
    pretrained: bool = False,
    pretrained_path: str | None = None,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """Builds a registered model (float). ``pretrained`` uses timm's hub; ``pretrained_path`` a local file.

    Example:
        >>> model = create_model("vit_fmnist", num_classes=10)
    """
    spec = get_spec(name)
    kwargs = dict(spec.kwargs)
    kwargs.update(
        num_classes=num_classes,
        img_size=img_size or spec.img_size,
        in_chans=in_chans or spec.in_chans,
        drop_path_rate=drop_path_rate,
    )
    if pretrained and pretrained_path is None:
        try:
            return timm.create_model(spec.arch, pretrained=True, **kwargs)
        except Exception as error:  # hub unreachable, or no weights for these overrides
            raise ConfigError(
                f"model.pretrained: could not fetch weights for {spec.arch} ({type(error).__name__}); "
                "set model.pretrained_path to a local weights file"
            ) from None
    model = timm.create_model(spec.arch, pretrained=False, **kwargs)
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path)
    return model


def teacher_logits(teacher: Any, images: torch.Tensor) -> torch.Tensor:
    """Soft targets for distillation: the teacher's class-head logits (as the reference), no grad.

    For two-head (distilled) DeiTs in eval mode timm averages both heads; the reference distils from
    the class head alone, so that head is read directly.
    """
    with torch.no_grad():
        if hasattr(teacher, "head_dist"):
            features = teacher.forward_features(images)
            return teacher.head(features[:, 0])
        return teacher(images)
