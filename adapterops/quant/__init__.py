"""Quantized storage of base weights: NF4 in the bitsandbytes layout."""

from .nf4 import NF4Tensor, dequantize_nf4, dequantize_nf4_many, from_state_dict, quantize_nf4, quantize_nf4_many, to_state_dict

__all__ = [
    "NF4Tensor",
    "quantize_nf4",
    "dequantize_nf4",
    "quantize_nf4_many",
    "dequantize_nf4_many",
    "to_state_dict",
    "from_state_dict",
]
