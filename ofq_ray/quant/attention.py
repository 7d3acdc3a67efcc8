"""Quantized self-attention for timm's ViT/DeiT ``Attention`` and Swin ``WindowAttention``.

With QKR (query-key reparameterization) the per-head product ``M_h = W_q^h^T W_k^h`` ([C, C]) is
formed in float, quantized as one weight, and the logits become ``x_n^T Q(M_h) x_m`` with the
``M_h x_m`` product ("qkx") quantized as an activation. Without QKR, q and k are quantized separately
(one step per token, learnable shifts before and after): that is also the paper's LSQ baseline when
the weights use LSQ.
The order is always: quantized matmul, then the ``head_dim ** -0.5`` scaling, then (Swin) the
relative-position bias and window mask, a float softmax, and an unsigned quantization of the
probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from torch import nn

from .layers import QLinear, WeightSource, make_weight_quantizer
from .lean import QkrLogits, fused, merged_product
from .quantizers import LsqQuantizer, StatsQuantizer


def _token_quantizer(bits: int | None, features: int) -> LsqQuantizer | None:
    if bits is None:
        return None
    return LsqQuantizer(bits, signed=True, granularity="token", shift_shape=(features,))


def _head_quantizer(bits: int | None, heads: int, head_dim: int) -> LsqQuantizer | None:
    """Quantizer for q or k laid out [B, H, N, d]: per token, shifts over the H*d features."""
    if bits is None:
        return None
    return LsqQuantizer(bits, signed=True, granularity="query", shift_shape=(heads, 1, head_dim))


@dataclass(frozen=True)
class AttentionBits:
    """The widths inside one attention block (None keeps that tensor in float).

    Attributes:
        qkv_weight: W_q, W_k and W_v, or with QKR the merged product ``W_q^T W_k`` and W_v.
        qkv_act: the block input x (the operand of the qkv projection, or of QKR's product).
        proj_weight: the output projection's weight.
        proj_act: the output projection's input.
        matmul_act: the operands of the attention matmuls: q and k (or QKR's ``M_h x``), v and the
            softmax probabilities.
    """

    qkv_weight: int | None
    qkv_act: int | None
    proj_weight: int | None
    proj_act: int | None
    matmul_act: int | None

    @classmethod
    def uniform(cls, weight_bits: int | None, act_bits: int | None) -> AttentionBits:
        return cls(weight_bits, act_bits, weight_bits, act_bits, act_bits)


class QuantAttention(nn.Module):
    """Multi-head self-attention with OFQ quantization, built from a timm attention's layers.

    Args:
        dim: input width C.
        num_heads: H.
        head_dim: d (``H * d`` is the attention width A, usually C).
        qkv: the fused [3A, C] projection to split (its parameters are reused or copied).
        proj: the output projection (reused).
        weight_bits / act_bits: widths, or None to keep that side in float.
        bits: per-tensor widths (:class:`AttentionBits`); when given, ``weight_bits``/``act_bits``
            are not read.
        weight_quantizer: ``"statsq"`` or ``"lsq"`` (LSQ only without QKR, as the paper's baseline).
        qkr: merge W_q and W_k per head (OFQ) instead of quantizing q and k separately.
        keep_query_bias: with QKR, keep the part of the query bias that depends on the key token
            (``b_q^T W_k x_m``), so that QKR is exact in float for a pretrained model with biases.
            The key bias and the rest of the query bias do not change the softmax and are dropped.
            False reproduces the reference, which drops both biases.
    """

    key_bias_override: torch.Tensor | None

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        head_dim: int,
        qkv: nn.Linear,
        proj: nn.Linear,
        weight_bits: int | None = None,
        act_bits: int | None = None,
        bits: AttentionBits | None = None,
        weight_quantizer: str = "statsq",
        qkr: bool = True,
        keep_query_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5
        self.qkr = qkr

        bits = bits or AttentionBits.uniform(weight_bits, act_bits)
        self.bits = bits
        act_bits = bits.matmul_act  # the widths of the matmul operands below

        def weight_q(weight: torch.Tensor, width: int | None = bits.qkv_weight) -> nn.Module | None:
            return None if width is None else make_weight_quantizer(weight_quantizer, width, weight)

        self.input_quantizer = _token_quantizer(bits.qkv_act, dim)
        if qkr:
            with torch.no_grad():
                weight, bias = qkv.weight.detach(), qkv.bias
                self.q_weight = nn.Parameter(weight[:attn_dim].clone())
                self.k_weight = nn.Parameter(weight[attn_dim : 2 * attn_dim].clone())
                keep = keep_query_bias and bias is not None
                self.q_bias = nn.Parameter(bias.detach()[:attn_dim].clone()) if keep else None  # type: ignore[union-attr]
                v = nn.Linear(dim, attn_dim, bias=bias is not None)
                v.weight.copy_(weight[2 * attn_dim :])
                if bias is not None:
                    v.bias.copy_(bias.detach()[2 * attn_dim :])
            self.v = QLinear(v, weight_q(v.weight), None)
            self.merged_quantizer = weight_q(self.merged_weight())
            self.register_buffer("key_bias_override", None)
            self.qkx_quantizer = (
                None
                if act_bits is None
                else LsqQuantizer(act_bits, signed=True, granularity="token", shift_shape=(num_heads, dim))
            )
        else:
            self.qkv = QLinear(qkv, weight_q(qkv.weight), None)
            # q and k ([B, H, N, d]): one step per token, shared over batch and heads, and learnable
            # per-feature shifts before and after, as the reference (and as v below).
            self.q_quantizer = _head_quantizer(act_bits, num_heads, head_dim)
            self.k_quantizer = _head_quantizer(act_bits, num_heads, head_dim)
        self.v_quantizer = (
            None
            if act_bits is None
            else LsqQuantizer(act_bits, signed=True, granularity="channel", shift_shape=(attn_dim,))
        )
        self.softmax_quantizer = None if act_bits is None else LsqQuantizer(act_bits, signed=False, granularity="query")
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = QLinear(proj, weight_q(proj.weight, bits.proj_weight), _token_quantizer(bits.proj_act, attn_dim))
        self.proj_drop = nn.Dropout(proj_drop)

    # --- QKR pieces -------------------------------------------------------------------------------
    def merged_weight(self) -> torch.Tensor:
        """The float merged product, stacked per head: ``[H * C, C]`` with block h = W_q^h^T W_k^h.

        Always computed in float32 (also under autocast): its rounding thresholds decide the codes.
        """
        return merged_product(self.q_weight, self.k_weight, self.num_heads)

    def key_bias(self) -> torch.Tensor | None:
        """``u_h = W_k^h^T b_q^h`` ([H, C]); the logit term ``u_h . x_m`` depends on the key only."""
        if self.key_bias_override is not None:
            return self.key_bias_override
        if self.q_bias is None:
            return None
        heads, d = self.num_heads, self.head_dim
        k = self.k_weight.view(heads, d, self.dim)
        return torch.einsum("hd,hdc->hc", self.q_bias.view(heads, d), k)

    def _qkr_logits(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        heads = self.num_heads
        merged_q, qkx_q = self.merged_quantizer, self.qkx_quantizer
        if fused() and isinstance(merged_q, StatsQuantizer) and qkx_q is not None and qkx_q.initialized:
            # Fused (saves less for backward); the same numbers as the module-by-module path below.
            grad = torch.is_grad_enabled() and (self.q_weight.requires_grad or self.k_weight.requires_grad)
            masked = merged_q.boundary_range is not None and merged_q.training and grad
            merged_logits: torch.Tensor = QkrLogits.apply(
                x,
                self.q_weight,
                self.k_weight,
                qkx_q.step,
                qkx_q.shift_before,
                qkx_q.shift_after,
                heads,
                merged_q.levels_half,
                merged_q.boundary_range if masked else None,
                qkx_q.qn,
                qkx_q.qp,
                qkx_q.grad_scale_for(batch * tokens * heads * dim),
            )
            logits = merged_logits.view(batch, tokens, tokens, heads).permute(0, 3, 1, 2)
        else:
            logits = self._qkr_logits_unfused(x)
        key_bias = self.key_bias()
        if key_bias is not None:
            logits = logits + F.linear(x, key_bias.to(x.dtype)).transpose(1, 2).unsqueeze(2)
        return logits

    def _qkr_logits_unfused(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        heads = self.num_heads
        merged = self.merged_weight()
        if self.merged_quantizer is not None:
            merged = self.merged_quantizer(merged)
        # One GEMM for all heads: qkx[b, m, h] = M_h x_m (a [B, N, H, C] layout keeps it contiguous).
        qkx = F.linear(x, merged).view(batch, tokens, heads, dim)
        if self.qkx_quantizer is not None:
            qkx = self.qkx_quantizer(qkx)
        # logits[b, n, (m, h)] = x_n . qkx[b, m, h], then to [B, H, N, M]
        logits = torch.matmul(x, qkx.reshape(batch, tokens * heads, dim).transpose(1, 2))
        return logits.view(batch, tokens, tokens, heads).permute(0, 3, 1, 2)

    # --- shared ------------------------------------------------------------------------------------
    def _logits_and_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, _ = x.shape
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.qkr:
            logits = self._qkr_logits(x)
            v = self.v(x)
        else:
            qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim)
            q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
            if self.q_quantizer is not None and self.k_quantizer is not None:
                q, k = self.q_quantizer(q), self.k_quantizer(k)
            logits = torch.matmul(q, k.transpose(-2, -1))
            v = qkv[:, :, 2].reshape(batch, tokens, self.attn_dim)
        if self.v_quantizer is not None:
            v = self.v_quantizer(v)
        v = v.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        return logits * self.scale, v

    def _attend(self, logits: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        attn = logits.softmax(dim=-1)
        if self.softmax_quantizer is not None:
            attn = self.softmax_quantizer(attn)
        attn = self.attn_drop(attn)
        out = torch.matmul(attn, v)  # [B, H, N, d]
        batch, _, tokens, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        return self.proj_drop(self.proj(out))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        logits, v = self._logits_and_values(x)
        bias = resolve_self_attn_mask(x.shape[1], logits, attn_mask, is_causal)
        return self._attend(maybe_add_mask(logits, bias), v)

    def quantized_weight_sources(self) -> list[WeightSource]:
        if not self.qkr or self.merged_quantizer is None:
            return []
        return [WeightSource("merged_qk", self.merged_quantizer, self.merged_weight, None, "block")]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, qkr={self.qkr}"


class QuantWindowAttention(QuantAttention):
    """Swin window attention: adds the relative-position bias and the shifted-window mask in float."""

    relative_position_index: torch.Tensor

    def __init__(
        self,
        *,
        relative_position_bias_table: nn.Parameter,
        relative_position_index: torch.Tensor,
        window_area: int,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.window_area = window_area
        self.relative_position_bias_table = relative_position_bias_table
        self.register_buffer("relative_position_index", relative_position_index, persistent=False)

    def _relative_position_bias(self) -> torch.Tensor:
        index = self.relative_position_index.view(-1)
        bias = self.relative_position_bias_table[index].view(self.window_area, self.window_area, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)  # [1, H, N, N]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        logits, v = self._logits_and_values(x)
        logits = logits + self._relative_position_bias()
        if mask is not None:
            windows, tokens = mask.shape[0], x.shape[1]
            logits = logits.view(-1, windows, self.num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
            logits = logits.view(-1, self.num_heads, tokens, tokens)
        return self._attend(logits, v)
