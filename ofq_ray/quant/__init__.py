"""The OFQ method in plain PyTorch: quantizers, quantized timm modules, CGA, oscillation tracking, export."""

from .attention import QuantAttention, QuantWindowAttention
from .cga import CGA, cga_mask
from .convert import QuantConfig, init_activation_scales, quantize_model, set_data_parallel_replicas
from .export import export_quantized, load_exported, quantized_size_bytes
from .layers import QConv2d, QLinear, WeightSource, iter_quantized_weights
from .oscillation import OscillationTracker, weight_kind
from .quantizers import LsqQuantizer, StatsQuantizer

__all__ = [
    "CGA",
    "LsqQuantizer",
    "OscillationTracker",
    "QConv2d",
    "QLinear",
    "QuantAttention",
    "QuantConfig",
    "QuantWindowAttention",
    "StatsQuantizer",
    "WeightSource",
    "cga_mask",
    "export_quantized",
    "init_activation_scales",
    "iter_quantized_weights",
    "load_exported",
    "quantize_model",
    "quantized_size_bytes",
    "set_data_parallel_replicas",
    "weight_kind",
]
