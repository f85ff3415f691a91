"""adapterops: LoRA adapters as values."""

from .adapter import Adapter, LoraLayer, blend, cosine, interpolate, lora_scale
from .diagnostics import compare, diagnose, reduce_intruders
from .errors import AdapterOpsError
from .extraction import extract
from .formats import load, save
from .merging import merge, unmerge
from .quant import dequantize_nf4, quantize_checkpoint, quantize_nf4

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "LoraLayer",
    "AdapterOpsError",
    "blend",
    "compare",
    "cosine",
    "dequantize_nf4",
    "diagnose",
    "extract",
    "interpolate",
    "load",
    "lora_scale",
    "merge",
    "quantize_checkpoint",
    "quantize_nf4",
    "reduce_intruders",
    "save",
    "unmerge",
]
