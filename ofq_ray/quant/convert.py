"""``quantize_model``: turn a timm ViT/DeiT/Swin into its OFQ quantization-aware counterpart, in place."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from fnmatch import fnmatchcase
from typing import Any, cast

import torch
from timm.layers import Mlp, PatchEmbed, to_2tuple, trunc_normal_
from timm.layers.attention import Attention
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import ConfigError
from ..hints import did_you_mean
from .attention import AttentionBits, QuantAttention, QuantWindowAttention
from .layers import QConv2d, QLinear, Role, make_weight_quantizer, quantized_head
from .quantizers import LsqQuantizer, check_bits

WEIGHT_QUANTIZERS = ("statsq", "lsq")
SUPPORTED_MODELS = (VisionTransformer, SwinTransformer)
LAYER_RULE_KEYS = ("match", "weight_bits", "act_bits")
_WIDTH_KEYS = ("weight_bits", "act_bits")


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
        layers: per-layer widths on top of the uniform ones: an ordered list of rules
            ``{"match": glob, "weight_bits": b, "act_bits": b}`` (either width may be left out, and
            None keeps that side in float). A rule applies to every quantizable module whose name, or
            the name of a module containing it, matches the glob (``fnmatch``, case-sensitive: ``*``
            crosses dots); later rules win, a key left out keeps the earlier value. See
            :func:`quant_sites` for the names and :func:`resolve_widths` for the result.
    """

    weight_bits: int | None = 2
    act_bits: int | None = 2
    qkr: bool = True
    first_last_bits: int | None = 8
    weight_quantizer: str = "statsq"
    faithful: bool = False
    layers: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits", "first_last_bits"):
            value = getattr(self, name)
            if value is not None:
                check_bits(value, f"quant.{name}")
        for name in ("qkr", "faithful"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"quant.{name}: {getattr(self, name)!r} is not allowed; allowed: true, false")
        if self.weight_quantizer not in WEIGHT_QUANTIZERS:
            hint = did_you_mean(str(self.weight_quantizer), WEIGHT_QUANTIZERS)
            raise ConfigError(
                f"quant.weight_quantizer: {self.weight_quantizer!r} is not allowed; "
                f"allowed: {', '.join(WEIGHT_QUANTIZERS)}{hint}"
            )
        self.layers = check_layer_rules(self.layers)
        quantized_weights = self.weight_bits is not None or any(
            rule.get("weight_bits") is not None for rule in self.layers
        )
        if self.weight_quantizer == "lsq" and self.qkr and quantized_weights:
            # The paper's LSQ baseline ignores QKR and quantizes q and k separately; LSQ on the merged
            # W_q^T W_k product is no baseline of the paper's, so it is not offered.
            raise ConfigError(
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
                raise ConfigError(
                    f"quant.{key}: unknown key; allowed: {', '.join(allowed)}{did_you_mean(key, allowed)}"
                )
        return cls(**values)


def check_layer_rules(rules: Any) -> list[dict[str, Any]]:
    """Validates ``quant.layers`` (everything but whether each glob matches a module) and returns a
    normalized copy: a list of ``{"match": str, ...}`` dicts holding only the keys given.

    Raises:
        ValueError: one line naming the rule's field (``quant.layers[1].weight_bits: ...``).
    """
    if isinstance(rules, tuple):
        rules = list(rules)
    if not isinstance(rules, list):
        raise ConfigError(
            f"quant.layers: {rules!r} is not allowed; allowed: a list of rules "
            "{match: GLOB, weight_bits: B, act_bits: B}"
        )
    checked: list[dict[str, Any]] = []
    for index, rule in enumerate(rules):
        where = f"quant.layers[{index}]"
        if not isinstance(rule, Mapping):
            raise ConfigError(
                f"{where}: {rule!r} is not allowed; allowed: a mapping with match and weight_bits and/or act_bits"
            )
        for key in rule:
            if key not in LAYER_RULE_KEYS:
                raise ConfigError(
                    f"{where}.{key}: unknown key; allowed: {', '.join(LAYER_RULE_KEYS)}"
                    f"{did_you_mean(str(key), LAYER_RULE_KEYS)}"
                )
        match = rule.get("match")
        if not isinstance(match, str) or not match.strip():
            raise ConfigError(
                f"{where}.match: {match!r} is not allowed; allowed: a glob over module names, e.g. 'blocks.0.*'"
            )
        widths = [key for key in _WIDTH_KEYS if key in rule]
        if not widths:
            raise ConfigError(f"{where}: sets no width; allowed: weight_bits and/or act_bits (2 to 8, or null)")
        for key in widths:
            value = rule[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8):
                raise ConfigError(
                    f"{where}.{key}: {value!r} is not allowed; allowed: an integer from 2 to 8, or null (float)"
                )
        checked.append({"match": match, **{key: rule[key] for key in widths}})
    return checked


@dataclass(frozen=True)
class QuantSite:
    """A module that ``quantize_model`` gives widths to, named as in the float timm model.

    ``blocks.0.attn.qkv`` (weights: W_q, W_k, W_v, or QKR's merged product and W_v; activation: the
    block input), ``blocks.0.attn.proj``, ``blocks.0.mlp.fc1``/``fc2``, Swin's
    ``layers.1.downsample.reduction``, the attention module itself (``blocks.0.attn``: no weight; its
    activation width is that of the attention matmuls' operands q, k or QKR's ``M x``, v and the
    softmax probabilities), and the first/last layers ``patch_embed.proj`` and ``head`` (``head.fc``
    for Swin, also ``head_dist`` for distilled DeiTs), whose defaults are ``first_last_bits``.
    """

    name: str
    role: Role
    has_weight: bool = True


@dataclass(frozen=True)
class LayerWidths:
    """The resolved widths of one :class:`QuantSite` (None: float)."""

    weight_bits: int | None
    act_bits: int | None


def quant_sites(model: nn.Module) -> list[QuantSite]:
    """The quantizable modules of a float timm ViT/DeiT/Swin, in module order (see :class:`QuantSite`)."""
    _check_supported(model)
    heads = _classifier_linears(model)
    sites: list[QuantSite] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if id(module) in heads:
            sites.append(QuantSite(name, "first_last"))
        elif isinstance(module, PatchEmbed):
            sites.append(QuantSite(f"{prefix}proj", "first_last"))
        elif isinstance(module, (Attention, WindowAttention)):
            sites += [
                QuantSite(name, "block", has_weight=False),
                QuantSite(f"{prefix}qkv", "block"),
                QuantSite(f"{prefix}proj", "block"),
            ]
        elif isinstance(module, Mlp):
            sites += [QuantSite(f"{prefix}fc1", "block"), QuantSite(f"{prefix}fc2", "block")]
        elif isinstance(module, PatchMerging):
            sites.append(QuantSite(f"{prefix}reduction", "block"))
    return sites


def _scopes(name: str) -> list[str]:
    """``"blocks.0.attn.qkv"`` -> the names a rule may match for it: itself and every enclosing module."""
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts) + 1)]


def _examples(names: list[str], limit: int = 6) -> str:
    """A few representative module names: those of the first block (indices 0), then the last name."""
    first = [name for name in names if all(part == "0" for part in name.split(".") if part.isdigit())]
    shown = (first or names)[:limit]
    if names and names[-1] not in shown:
        shown.append(names[-1])
    return ", ".join(shown)


def resolve_widths(model: nn.Module, config: QuantConfig) -> dict[str, LayerWidths]:
    """The widths of every :func:`quant_sites` module of a float model under ``config``.

    Each site starts from the uniform widths (``weight_bits``/``act_bits`` for blocks,
    ``first_last_bits`` for the first and last layers); then every rule of ``config.layers`` whose
    glob matches the site's name or an enclosing module's name sets the widths it names, in order.

    Raises:
        ValueError: one line when a rule's glob matches no quantizable module.
    """
    sites = quant_sites(model)
    widths: dict[str, LayerWidths] = {}
    for site in sites:
        default = config.first_last_bits if site.role == "first_last" else None
        weight = default if site.role == "first_last" else config.weight_bits
        act = default if site.role == "first_last" else config.act_bits
        widths[site.name] = LayerWidths(weight if site.has_weight else None, act)
    scopes = {site.name: _scopes(site.name) for site in sites}
    for index, rule in enumerate(config.layers):
        pattern = rule["match"]
        matched = [site for site in sites if any(fnmatchcase(scope, pattern) for scope in scopes[site.name])]
        if not matched:
            names = [site.name for site in sites]
            raise ConfigError(
                f"quant.layers[{index}].match: {pattern!r} matches no quantizable module; allowed: a glob "
                f"over names such as {_examples(names)}{did_you_mean(pattern, names)}"
            )
        for site in matched:
            current = widths[site.name]
            weight = rule.get("weight_bits", current.weight_bits) if site.has_weight else None
            widths[site.name] = LayerWidths(weight, rule.get("act_bits", current.act_bits))
    return widths


def _fresh_linear(like: nn.Linear, bias: bool) -> nn.Linear:
    """A randomly initialized Linear of the same shape (what the reference's rebuilt modules hold)."""
    weight = like.weight
    return nn.Linear(like.in_features, like.out_features, bias=bias, device=weight.device, dtype=weight.dtype)


Widths = Callable[[str], LayerWidths]  # a site's widths, by its name relative to the module converted


def _attention_kwargs(config: QuantConfig, qkv: nn.Linear, proj: nn.Linear, at: Widths) -> dict[str, Any]:
    if config.faithful:
        proj = _fresh_linear(proj, bias=proj.bias is not None)
        if not config.qkr:
            qkv = _fresh_linear(qkv, bias=True)
    qkv_widths, proj_widths = at("qkv"), at("proj")
    return dict(
        qkv=qkv,
        proj=proj,
        bits=AttentionBits(
            qkv_weight=qkv_widths.weight_bits,  # with QKR also the merged product's width
            qkv_act=qkv_widths.act_bits,
            proj_weight=proj_widths.weight_bits,
            proj_act=proj_widths.act_bits,
            matmul_act=at("").act_bits,
        ),
        weight_quantizer=config.weight_quantizer,
        qkr=config.qkr,
        keep_query_bias=not config.faithful,
    )


def _convert_attention(module: Attention, config: QuantConfig, at: Widths) -> nn.Module:
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
        raise ConfigError(f"model: attention with {', '.join(unsupported)} cannot be quantized; allowed: plain")
    return QuantAttention(
        dim=module.qkv.in_features,
        num_heads=module.num_heads,
        head_dim=module.head_dim,
        attn_drop=module.attn_drop.p,
        proj_drop=module.proj_drop.p,
        **_attention_kwargs(config, module.qkv, module.proj, at),
    )


def _convert_window_attention(module: WindowAttention, config: QuantConfig, at: Widths) -> nn.Module:
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
        **_attention_kwargs(config, module.qkv, module.proj, at),
    )


def _block_linear(linear: nn.Linear, config: QuantConfig, widths: LayerWidths, signed_input: bool) -> QLinear:
    weight_quantizer = (
        None
        if widths.weight_bits is None
        else make_weight_quantizer(config.weight_quantizer, widths.weight_bits, linear.weight)
    )
    input_quantizer = (
        None
        if widths.act_bits is None
        else LsqQuantizer(widths.act_bits, signed=signed_input, granularity="token", shift_shape=(linear.in_features,))
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


def _convert_mlp(module: Mlp, config: QuantConfig, at: Widths) -> nn.Module:
    if not isinstance(module.fc1, nn.Linear) or not isinstance(module.fc2, nn.Linear):
        raise ConfigError("model: convolutional Mlp (use_conv=True) cannot be quantized; allowed: Linear Mlp")
    module.fc1 = _block_linear(module.fc1, config, at("fc1"), signed_input=True)  # type: ignore[assignment]
    # The fc2 input is a GELU output: an unsigned grid, with negatives kept only through the shift.
    module.fc2 = _block_linear(module.fc2, config, at("fc2"), signed_input=False)  # type: ignore[assignment]
    module.__class__ = QuantMlp
    return module


def _convert_patch_merging(module: PatchMerging, config: QuantConfig, at: Widths) -> nn.Module:
    reduction = module.reduction
    if config.faithful and reduction.bias is None:  # the reference's replacement always has a bias
        with_bias = _fresh_linear(reduction, bias=True)
        with_bias.weight = reduction.weight
        reduction = with_bias
    module.reduction = _block_linear(reduction, config, at("reduction"), signed_input=True)  # type: ignore[assignment]
    return module


def _convert_patch_embed(module: PatchEmbed, config: QuantConfig, at: Widths) -> nn.Module:
    widths = at("proj")
    if widths.weight_bits is None and widths.act_bits is None:
        return module
    if module.img_size is None or not isinstance(module.proj, nn.Conv2d):
        raise ConfigError("model: patch embedding needs a fixed img_size and a Conv2d projection")
    module.proj = QConv2d(module.proj, widths.weight_bits, widths.act_bits, tuple(module.img_size))  # type: ignore[arg-type,assignment]
    return module


_HANDLERS: dict[type[nn.Module], Callable[[Any, QuantConfig, Widths], nn.Module]] = {
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


def _widths_under(widths: dict[str, LayerWidths], prefix: str) -> Widths:
    """The widths of the sites under the module named ``prefix`` (with its dot), by relative name."""

    def at(suffix: str) -> LayerWidths:
        return widths[f"{prefix}{suffix}".rstrip(".")]

    return at


def _check_supported(model: nn.Module) -> None:
    if not isinstance(model, SUPPORTED_MODELS):
        allowed = ", ".join(cls.__name__ for cls in SUPPORTED_MODELS)
        raise ConfigError(f"model: {type(model).__name__} cannot be quantized; allowed: {allowed} (timm)")


def quantize_model(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Converts a timm ``VisionTransformer`` (DeiT, distilled DeiT) or ``SwinTransformer`` in place.

    Attention and MLP blocks (and Swin's patch merging) get ``config.weight_bits`` weights and
    ``config.act_bits`` activations; the patch embedding and classifier heads get
    ``config.first_last_bits`` LSQ weights and inputs; ``config.layers`` rules change any of these per
    module (:func:`resolve_widths`; the result is kept as ``model.ofq_widths``). Pretrained values are
    reused (or, with ``faithful``, partly re-initialized as the reference does). Call
    :func:`init_activation_scales` afterwards, before building the optimizer.

    Example:
        >>> model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10)
        >>> quantize_model(model, QuantConfig(weight_bits=2, act_bits=2, layers=[{"match": "head", "weight_bits": 4}]))
        >>> init_activation_scales(model, images)

    Raises:
        ValueError: for an unsupported model, or a ``config.layers`` glob that matches no module.
    """
    _check_supported(model)
    reference = next(model.parameters())
    heads = _classifier_linears(model)
    widths = resolve_widths(model, config)
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if id(module) in heads:
            head = widths[name]
            if head.weight_bits is not None or head.act_bits is not None:
                _set_submodule(model, name, quantized_head(module, head.weight_bits, head.act_bits))  # type: ignore[arg-type]
            continue
        handler = _HANDLERS.get(type(module))
        if handler is not None:
            new = handler(module, config, _widths_under(widths, prefix))
            if new is not module:
                _set_submodule(model, name, new)
    if config.faithful and isinstance(model, SwinTransformer):
        _reference_swin_granularity(model)
    # New quantizer parameters are created on the CPU: follow the model's device and dtype.
    model.to(device=reference.device, dtype=reference.dtype)
    model.ofq_config = config  # type: ignore[assignment]
    model.ofq_widths = widths  # type: ignore[assignment]
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
