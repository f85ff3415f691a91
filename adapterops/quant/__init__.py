"""Quantized storage of base weights: NF4 in the bitsandbytes layout.

``quantize_nf4`` / ``dequantize_nf4`` work on tensors; ``quantize_checkpoint`` rewrites a whole
checkpoint; importing this package registers the ``nf4`` codec with the merge engine, so
``adapterops.merge`` reads and writes NF4 bases.
"""

from .nf4 import NF4Tensor, dequantize_nf4, dequantize_nf4_many, from_state_dict, quantize_nf4, quantize_nf4_many, to_state_dict
from . import codec  # noqa: E402,F401  (registers the nf4 codec)
from .checkpoint import QuantizeReport, quantize_checkpoint

__all__ = [
    "NF4Tensor",
    "quantize_nf4",
    "dequantize_nf4",
    "quantize_nf4_many",
    "dequantize_nf4_many",
    "to_state_dict",
    "from_state_dict",
    "quantize_checkpoint",
    "QuantizeReport",
]
