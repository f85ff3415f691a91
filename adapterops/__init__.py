"""adapterops: LoRA adapters as values."""

from .adapter import Adapter, LoraLayer, blend, cosine, interpolate, lora_scale
from .errors import AdapterOpsError
from .formats import load, save

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "LoraLayer",
    "AdapterOpsError",
    "blend",
    "cosine",
    "interpolate",
    "load",
    "lora_scale",
    "save",
]
