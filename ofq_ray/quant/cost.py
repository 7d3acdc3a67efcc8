"""Costs of a model known before training: exact packed size and BitOPs per image.

``model/size_bytes`` is :func:`~ofq_ray.quant.export.quantized_size_bytes`: what
:func:`~ofq_ray.quant.export.export_quantized` stores, byte for byte (packed codes at each layer's own
width, their scales, the float rest). ``model/bitops`` is the usual mixed-precision compute cost
(HAQ, HAWQ-V3): for one image, the sum over the model's linear and matmul operations of
``MACs x weight bits x activation bits``, each operand at its own width (see :func:`count_bitops`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers.attention import Attention
from timm.models.swin_transformer import WindowAttention
from torch import nn

from .attention import QuantAttention
from .export import quantized_size_bytes
from .layers import QConv2d, QLinear

FLOAT_BITS = 32


@dataclass(frozen=True)
class OpCost:
    """One linear or matmul operation of a forward pass over one image."""

    macs: int
    left_bits: int  # the weight's width (or the first operand's, for an activation-activation matmul)
    right_bits: int  # the activation's width (the second operand's)

    @property
    def bitops(self) -> int:
        return self.macs * self.left_bits * self.right_bits


def _bits(quantizer: nn.Module | None) -> int:
    """A quantizer's width; float (no quantizer, or one without a width) counts 32 bits."""
    bits = None if quantizer is None else getattr(quantizer, "bits", None)
    return FLOAT_BITS if bits is None else int(bits)


def _attention_ops(module: nn.Module, x: torch.Tensor) -> dict[str, OpCost]:
    """The operations inside one attention call on ``x`` = [windows, N, C], except ``proj`` (a QLinear
    or Linear child, counted on its own)."""
    windows, tokens, dim = x.shape
    heads = int(module.num_heads)  # type: ignore[arg-type]
    if isinstance(module, QuantAttention):
        head_dim, attn_dim = module.head_dim, module.attn_dim
    else:  # timm's float Attention / WindowAttention
        attn_dim = int(module.qkv.out_features) // 3  # type: ignore[union-attr,arg-type]
        head_dim = attn_dim // heads
    pairs = windows * heads * tokens * tokens * head_dim  # MACs of q k^T, and of attn v
    if not isinstance(module, QuantAttention):
        return {"q@k": OpCost(pairs, FLOAT_BITS, FLOAT_BITS), "attn@v": OpCost(pairs, FLOAT_BITS, FLOAT_BITS)}
    x_bits = _bits(module.input_quantizer)
    ops: dict[str, OpCost] = {}
    rows = windows * tokens
    if module.qkr:
        # qkx = M_h x_m for every head ([H*C, C] weight), then logits x_n . qkx_m, plus the float
        # key-bias term u_h . x_m that keeps QKR exact with query biases.
        ops["merged_qk"] = OpCost(rows * heads * dim * dim, _bits(module.merged_quantizer), x_bits)
        ops["x@qkx"] = OpCost(windows * tokens * tokens * heads * dim, x_bits, _bits(module.qkx_quantizer))
        if module.key_bias() is not None:
            ops["key_bias"] = OpCost(rows * heads * dim, FLOAT_BITS, x_bits)
        ops["v"] = OpCost(rows * attn_dim * dim, _bits(module.v.weight_quantizer), x_bits)
    else:
        ops["qkv"] = OpCost(rows * 3 * attn_dim * dim, _bits(module.qkv.weight_quantizer), x_bits)
        ops["q@k"] = OpCost(pairs, _bits(module.q_quantizer), _bits(module.k_quantizer))
    ops["attn@v"] = OpCost(pairs, _bits(module.softmax_quantizer), _bits(module.v_quantizer))
    return ops


def _module_ops(module: nn.Module, args: tuple[Any, ...], output: Any) -> dict[str, OpCost]:
    x = args[0]
    if isinstance(module, (QuantAttention, Attention, WindowAttention)):
        return _attention_ops(module, x)
    if isinstance(module, QLinear):
        rows = x.numel() // module.in_features
        macs = rows * module.in_features * module.out_features
        return {"": OpCost(macs, _bits(module.weight_quantizer), _bits(module.input_quantizer))}
    if isinstance(module, nn.Linear):
        rows = x.numel() // module.in_features
        return {"": OpCost(rows * module.in_features * module.out_features, FLOAT_BITS, FLOAT_BITS)}
    if isinstance(module, (QConv2d, nn.Conv2d)):
        macs = output.numel() * module.weight[0].numel()  # every output value: in/groups x kh x kw MACs
        if isinstance(module, QConv2d):
            return {"": OpCost(macs, _bits(module.weight_quantizer), _bits(module.input_quantizer))}
        return {"": OpCost(macs, FLOAT_BITS, FLOAT_BITS)}
    return {}


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def count_bitops(model: nn.Module, image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """BitOPs of one image: the sum over linear and matmul operations of MACs x their operands' widths.

    Counted, each with the widths it runs at: every linear layer and convolution (weight width x input
    width: the patch embedding, qkv or QKR's v, proj, fc1, fc2, Swin's reduction, the heads), the
    attention matmuls ``q k^T`` (q width x k width) and ``attn v`` (softmax-probability width x v
    width), and with QKR its product ``M_h x`` (merged-product width x input width), the logits
    ``x_n . (M_h x_m)`` (input width x qkx width) and the float key-bias term ``u_h . x_m`` (32 x input
    width). **A float operand counts 32 bits**: a float layer costs ``MACs x 32 x 32``. Element-wise work
    (norms, softmax, GELU, biases, shifts, the Swin position bias) is not counted.

    Runs one forward pass of a zero image in eval mode (no grad; the model's mode is restored), so
    the model's activation quantizers must be initialized already (:func:`init_activation_scales`).

    Args:
        model: a float or converted timm model (not wrapped in DDP or ``torch.compile``).
        image_shape: ``(channels, height, width)`` of one input image.

    Returns:
        ``{"total": int, "layers": {op name: {"macs", "weight_bits", "act_bits", "bitops"}}}``; the op
        names are module names, with attention ops named ``<attn>.merged_qk``, ``<attn>.x@qkx``,
        ``<attn>.key_bias``, ``<attn>.v``, ``<attn>.qkv``, ``<attn>.q@k``, ``<attn>.attn@v``.

    Raises:
        ValueError: if an activation quantizer is not initialized.
    """
    from .quantizers import LsqQuantizer

    missing = [n for n, m in model.named_modules() if isinstance(m, LsqQuantizer) and not m.initialized]
    if missing:
        raise ValueError(f"bitops: activation quantizers not initialized ({missing[0]}); run init_activation_scales")
    # The q/k/v projection inside a converted attention is counted with its attention (its input width
    # is the attention's input quantizer), so its own hook is skipped.
    inner = set()
    for module in model.modules():
        if isinstance(module, QuantAttention):
            inner.add(id(module.v if module.qkr else module.qkv))
    ops: dict[str, OpCost] = {}
    handles = []
    for name, module in model.named_modules():
        if id(module) in inner:
            continue

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any, name: str = name) -> None:
            for suffix, op in _module_ops(module, args, output).items():
                key = f"{name}.{suffix}" if suffix else name
                previous = ops.get(key)
                ops[key] = op if previous is None else OpCost(previous.macs + op.macs, op.left_bits, op.right_bits)

        handles.append(module.register_forward_hook(hook))
    reference = next(model.parameters())
    try:
        with _eval_mode(model):
            model(torch.zeros((1, *image_shape), device=reference.device, dtype=reference.dtype))
    finally:
        for handle in handles:
            handle.remove()
    # In module order (a hook fires when its module returns: an attention's ops after its proj's).
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    names = sorted(ops, key=lambda key: order.get(key, order.get(key.rpartition(".")[0], 0)))
    layers = {
        name: {"macs": op.macs, "weight_bits": op.left_bits, "act_bits": op.right_bits, "bitops": op.bitops}
        for name, op in ((name, ops[name]) for name in names)
    }
    return {"total": sum(op.bitops for op in ops.values()), "layers": layers}


def model_cost(model: nn.Module, image_shape: tuple[int, int, int]) -> dict[str, float]:
    """``{"model/size_bytes": ..., "model/bitops": ...}`` of a float or converted (and initialized) model.

    The size of a float model is its float32 state (4 bytes per value); of a converted one, the exact
    export size (:func:`~ofq_ray.quant.export.quantized_size_bytes`).
    """
    return {
        "model/size_bytes": float(quantized_size_bytes(model)),
        "model/bitops": float(count_bitops(model, image_shape)["total"]),
    }
