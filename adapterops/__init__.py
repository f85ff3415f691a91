"""adapterops: LoRA adapters as values.

The names below load on first use (PEP 562), so ``import adapterops`` and the command line's
start-up do not pay for torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Adapter": "adapter",
    "LoraLayer": "adapter",
    "blend": "adapter",
    "cosine": "adapter",
    "interpolate": "adapter",
    "lora_scale": "adapter",
    "compare": "diagnostics",
    "diagnose": "diagnostics",
    "reduce_intruders": "diagnostics",
    "AdapterOpsError": "errors",
    "extract": "extraction",
    "load": "formats",
    "save": "formats",
    "merge": "merging",
    "unmerge": "merging",
    "dequantize_nf4": "quant",
    "quantize_checkpoint": "quant",
    "quantize_nf4": "quant",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adapterops' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .adapter import Adapter, LoraLayer, blend, cosine, interpolate, lora_scale
    from .diagnostics import compare, diagnose, reduce_intruders
    from .errors import AdapterOpsError
    from .extraction import extract
    from .formats import load, save
    from .merging import merge, unmerge
    from .quant import dequantize_nf4, quantize_checkpoint, quantize_nf4
