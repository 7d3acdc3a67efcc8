"""``quantize_model``: turn a timm ViT/DeiT/Swin into its OFQ quantization-aware counterpart, in place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import torch
from timm.layers import Mlp, PatchEmbed, to_2tuple, trunc_normal_
from timm.layers.attention import Attention
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..hints import did_you_mean
from .attention import QuantAttention, QuantWindowAttention
from .layers import QConv2d, QLinear, make_weight_quantizer, quantized_head
from .quantizers import LsqQuantizer, check_bits

WEIGHT_QUANTIZERS = ("statsq", "lsq")
SUPPORTED_MODELS = (VisionTransformer, SwinTransformer)


@dataclass
class QuantConfig:
    """What to quantize and how.

    Args:
        weight_bits: width of the block weights (attention, MLP, Swin patch merging), 2..8, or None
            to keep them in float.
        act_bits: width of the block activations, 2..8, or None for float activations.
        qkr: query-key reparameterization (merge W_q^T W_k per head and quantize the product).
        first_last_bits: width of the patch embedding and classifier heads (LSQ weights and inputs),
            2..8, or None to keep them in float.
        weight_quantizer: ``"statsq"`` (OFQ) or ``"lsq"`` (the paper's learnable-step baseline, which
            has no QKR: ``lsq`` needs ``qkr: false``).
        faithful: reproduce the reference implementation's quirks (random ``proj`` init, dropped q/k
            biases, re-initialized Swin position tables, CGA that skips the QKR product) so that paper
            numbers can be compared like for like. The default fixes them.
    """

    weight_bits: int | None = 2
    act_bits: int | None = 2
    qkr: bool = True
    first_last_bits: int | None = 8
    weight_quantizer: str = "statsq"
    faithful: bool = False

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits", "first_last_bits"):
            value = getattr(self, name)
            if value is not None:
                check_bits(value, f"quant.{name}")
        for name in ("qkr", "faithful"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"quant.{name}: {getattr(self, name)!r} is not allowed; allowed: true, false")
        if self.weight_quantizer not in WEIGHT_QUANTIZERS:
            hint = did_you_mean(str(self.weight_quantizer), WEIGHT_QUANTIZERS)
            raise ValueError(
                f"quant.weight_quantizer: {self.weight_quantizer!r} is not allowed; "
                f"allowed: {', '.join(WEIGHT_QUANTIZERS)}{hint}"
            )
        if self.weight_quantizer == "lsq" and self.qkr and self.weight_bits is not None:
            # The paper's LSQ baseline ignores QKR and quantizes q and k separately; LSQ on the merged
            # W_q^T W_k product is no baseline of the paper's, so it is not offered.
            raise ValueError(
                "quant.qkr: true is not allowed with quant.weight_quantizer 'lsq'; allowed: false "
                "(the paper's LSQ baseline quantizes q and k separately)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QuantConfig:
        allowed = [f.name for f in fields(cls)]
        for key in values:
            if key not in allowed:
                raise ValueError(f"quant.{key}: unknown key; allowed: {', '.join(allowed)}{did_you_mean(key, allowed)}")
        return cls(**values)


def _fresh_linear(like: nn.Linear, bias: bool) -> nn.Linear:
    """A randomly initialized Linear of the same shape (what the reference's rebuilt modules hold)."""
    weight = like.weight
    return nn.Linear(like.in_features, like.out_features, bias=bias, device=weight.device, dtype=weight.dtype)


def _attention_kwargs(config: QuantConfig, qkv: nn.Linear, proj: nn.Linear) -> dict[str, Any]:
    if config.faithful:
        proj = _fresh_linear(proj, bias=proj.bias is not None)
        if not config.qkr:
            qkv = _fresh_linear(qkv, bias=True)
    return dict(
        qkv=qkv,
        proj=proj,
        weight_bits=config.weight_bits,
        act_bits=config.act_bits,
        weight_quantizer=config.weight_quantizer,
        qkr=config.qkr,
        keep_query_bias=not config.faithful,
    )


def _convert_attention(module: Attention, config: QuantConfig) -> nn.Module:
    unsupported = [
        name
        for name, present in (
            ("qk_norm", not isinstance(module.q_norm, nn.Identity)),
            ("scale_norm", not isinstance(module.norm, nn.Identity)),
            ("gated", getattr(module, "gate", None) is not None),
        )
        if present
    ]
    if unsupported:
        raise ValueError(f"model: attention with {', '.join(unsupported)} cannot be quantized; allowed: plain")
    return QuantAttention(
        dim=module.qkv.in_features,
        num_heads=module.num_heads,
        head_dim=module.head_dim,
        attn_drop=module.attn_drop.p,
        proj_drop=module.proj_drop.p,
        **_attention_kwargs(config, module.qkv, module.proj),
    )


def _convert_window_attention(module: WindowAttention, config: QuantConfig) -> nn.Module:
    table = module.relative_position_bias_table
    if config.faithful:
        table = nn.Parameter(torch.empty_like(table))
        trunc_normal_(table, std=0.02)
    return QuantWindowAttention(
        dim=module.dim,
        num_heads=module.num_heads,
        head_dim=module.qkv.out_features // 3 // module.num_heads,
        attn_drop=module.attn_drop.p,
        proj_drop=module.proj_drop.p,
        relative_position_bias_table=table,
        relative_position_index=cast(torch.Tensor, module.relative_position_index),
        window_area=module.window_area,
        **_attention_kwargs(config, module.qkv, module.proj),
    )


def _block_linear(linear: nn.Linear, config: QuantConfig, signed_input: bool) -> QLinear:
    weight_quantizer = (
        None
        if config.weight_bits is None
        else make_weight_quantizer(config.weight_quantizer, config.weight_bits, linear.weight)
    )
    input_quantizer = (
        None
        if config.act_bits is None
        else LsqQuantizer(config.act_bits, signed=signed_input, granularity="token", shift_shape=(linear.in_features,))
    )
    return QLinear(linear, weight_quantizer, input_quantizer)


class QuantMlp(Mlp):
    """timm's ``Mlp`` with quantized fc1/fc2: the same module (submodules, state-dict keys) with one
    change in ``forward``: a GELU followed by fc2's input quantizer runs inside fc2's fused function,
    which keeps only the pre-GELU tensor for backward (unfused: that tensor, the GELU output and its
    quantized copy). :func:`quantize_model` turns an ``Mlp`` into one by swapping its class.
    """

    def _fused_gelu(self) -> str | None:
        """GELU's ``approximate`` when fc2 can apply it itself (nothing between the GELU and fc2)."""
        if not isinstance(self.act, nn.GELU) or not isinstance(self.norm, nn.Identity):
            return None
        if not isinstance(self.fc2, QLinear) or self.fc2.input_quantizer is None:
            return None
        if self.training and isinstance(self.drop1, nn.Dropout) and self.drop1.p > 0:
            return None
        return self.act.approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        gelu = self._fused_gelu()
        if gelu is not None:
            x = self.fc2(x, gelu=gelu)
        else:
            x = self.norm(self.drop1(self.act(x)))
            x = self.fc2(x)
        return self.drop2(x)  # type: ignore[no-any-return]


def _convert_mlp(module: Mlp, config: QuantConfig) -> nn.Module:
    if not isinstance(module.fc1, nn.Linear) or not isinstance(module.fc2, nn.Linear):
        raise ValueError("model: convolutional Mlp (use_conv=True) cannot be quantized; allowed: Linear Mlp")
    module.fc1 = _block_linear(module.fc1, config, signed_input=True)  # type: ignore[assignment]
    # The fc2 input is a GELU output: an unsigned grid, with negatives kept only through the shift.
    module.fc2 = _block_linear(module.fc2, config, signed_input=False)  # type: ignore[assignment]
    module.__class__ = QuantMlp
    return module


def _convert_patch_merging(module: PatchMerging, config: QuantConfig) -> nn.Module:
    reduction = module.reduction
    if config.faithful and reduction.bias is None:  # the reference's replacement always has a bias
        with_bias = _fresh_linear(reduction, bias=True)
        with_bias.weight = reduction.weight
        reduction = with_bias
    module.reduction = _block_linear(reduction, config, signed_input=True)  # type: ignore[assignment]
    return module


def _convert_patch_embed(module: PatchEmbed, config: QuantConfig) -> nn.Module:
    if config.first_last_bits is None:
        return module
    if module.img_size is None or not isinstance(module.proj, nn.Conv2d):
        raise ValueError("model: patch embedding needs a fixed img_size and a Conv2d projection")
    module.proj = QConv2d(module.proj, config.first_last_bits, tuple(module.img_size))  # type: ignore[arg-type,assignment]
    return module


_HANDLERS: dict[type[nn.Module], Callable[[Any, QuantConfig], nn.Module]] = {
    Attention: _convert_attention,
    WindowAttention: _convert_window_attention,
    Mlp: _convert_mlp,
    PatchMerging: _convert_patch_merging,
    PatchEmbed: _convert_patch_embed,
}


def _classifier_linears(model: nn.Module) -> set[int]:
    classifier = model.get_classifier()  # type: ignore[operator]
    heads = classifier if isinstance(classifier, tuple) else (classifier,)
    return {id(head) for head in heads if isinstance(head, nn.Linear)}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Converts a timm ``VisionTransformer`` (DeiT, distilled DeiT) or ``SwinTransformer`` in place.

    Attention and MLP blocks (and Swin's patch merging) get ``config.weight_bits`` weights and
    ``config.act_bits`` activations; the patch embedding and classifier heads get
    ``config.first_last_bits`` LSQ weights and inputs. Pretrained values are reused (or, with
    ``faithful``, partly re-initialized as the reference does). Call :func:`init_activation_scales`
    afterwards, before building the optimizer.

    Example:
        >>> model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10)
        >>> quantize_model(model, QuantConfig(weight_bits=2, act_bits=2))
        >>> init_activation_scales(model, images)
    """
    if not isinstance(model, SUPPORTED_MODELS):
        allowed = ", ".join(cls.__name__ for cls in SUPPORTED_MODELS)
        raise ValueError(f"model: {type(model).__name__} cannot be quantized; allowed: {allowed} (timm)")
    reference = next(model.parameters())
    heads = _classifier_linears(model)
    for name, module in list(model.named_modules()):
        if id(module) in heads:
            if config.first_last_bits is not None:
                _set_submodule(model, name, quantized_head(module, config.first_last_bits))  # type: ignore[arg-type]
            continue
        handler = _HANDLERS.get(type(module))
        if handler is not None:
            new = handler(module, config)
            if new is not module:
                _set_submodule(model, name, new)
    if config.faithful and isinstance(model, SwinTransformer):
        _reference_swin_granularity(model)
    # New quantizer parameters are created on the CPU: follow the model's device and dtype.
    model.to(device=reference.device, dtype=reference.dtype)
    model.ofq_config = config  # type: ignore[assignment]
    return model


def _reference_swin_granularity(model: SwinTransformer) -> None:
    """The reference's Swin keeps feature maps NHWC, where its per-token LSQ reads ``x.shape[-2]``: the
    MLP (fc1, fc2) and patch-merging inputs get one step per W column, shared over batch, rows and
    channels, with the gradient scale counting B*H*C. The fixed default keeps one step per token (per
    pixel), as every ViT layer has; ``faithful`` restores the column form.
    """
    for module in model.modules():
        linears: list[tuple[Any, tuple[int, int] | None]] = []
        if isinstance(module, SwinTransformerBlock):
            height, width = to_2tuple(module.input_resolution)
            linears = [(module.mlp.fc1, (height, width)), (module.mlp.fc2, (height, width))]
        elif isinstance(module, PatchMerging):
            linears = [(module.reduction, None)]  # its input is NHWC already
        for linear, grid in linears:
            if isinstance(linear, QLinear) and linear.input_quantizer is not None:
                linear.input_quantizer.granularity = "column"
                linear.input_grid = grid


def set_data_parallel_replicas(model: nn.Module, replicas: int) -> None:
    """Makes LSQ gradient scales count the global batch of ``replicas`` data-parallel workers.

    With it, N workers with per-worker batch B/N train exactly like one worker with batch B. The
    reference counts the per-GPU batch (its step sizes learn faster on more GPUs); leave
    ``replicas=1`` to reproduce that.
    """
    for module in model.modules():
        if isinstance(module, LsqQuantizer):
            module.replicas = replicas


@torch.no_grad()
def init_activation_scales(model: nn.Module, images: torch.Tensor) -> None:
    """Initializes every LSQ step from one batch (eval mode, no grad). Run before building the optimizer.

    Raises:
        RuntimeError: if some quantizer saw no input in that pass (it would stay uninitialized).
    """
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        model.train(was_training)
    missing = [n for n, m in model.named_modules() if isinstance(m, LsqQuantizer) and not m.initialized]
    if missing:
        raise RuntimeError(f"activation quantizers not reached by the init batch: {', '.join(missing[:5])}")
