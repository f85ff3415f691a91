"""adapterops: LoRA adapters as values."""

from .adapter import Adapter, LoraLayer, blend, cosine, interpolate, lora_scale
from .errors import AdapterOpsError
from .extract import extract
from .formats import load, save
from .merge import merge, unmerge

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "LoraLayer",
    "AdapterOpsError",
    "blend",
    "cosine",
    "extract",
    "interpolate",
    "load",
    "lora_scale",
    "merge",
    "save",
    "unmerge",
]
