"""From the tensors of a file to checked LoraLayers: what every format refuses, in one place.

Each problem is a ``FormatError`` naming the file and the layer: two tensors for one factor
(``x.lora_A.weight`` beside ``x.lora_A.default.weight``), factors that are not floating point
(integer or bool), factors that are not 2-D, a zero dimension (``in_features`` 0, say), inner
ranks that disagree, a DoRA magnitude of the wrong shape, and a file with no LoRA layers at all.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..adapter import LoraLayer
from ..errors import FormatError

__all__ = ["FACTOR_DTYPES", "collect", "make_layer", "require_layers"]

# The dtypes a LoRA factor may have (torch's matmul and our algebra are defined on these).
FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def collect(source: str, parts: Iterable[tuple[str, str, str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {role: tensor}}`` from ``(key, layer, role, tensor)``; a role given twice raises."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[tuple[str, str], str] = {}
    for key, layer, role, tensor in parts:
        if (layer, role) in keys:
            raise FormatError(f"{source}: layer {layer} has two {role} tensors, {keys[layer, role]} and {key}; remove one")
        keys[layer, role] = key
        out.setdefault(layer, {})[role] = tensor
    return out


def make_layer(
    source: str, layer: str, A: torch.Tensor, B: torch.Tensor, alpha: float, magnitude: torch.Tensor | None = None,
    *, names: tuple[str, str] = ("lora_A", "lora_B"),
) -> LoraLayer:
    """A LoraLayer from file tensors ``A`` (r, in) and ``B`` (out, r), checked first.

    ``names`` are the format's words for A and B (kohya: ``lora_down``, ``lora_up``).
    """
    where = f"{source}: layer {layer}"
    for name, t in zip(names, (A, B)):
        if t.dtype not in FACTOR_DTYPES:
            raise FormatError(f"{where}: {name} is {str(t.dtype).removeprefix('torch.')}; LoRA factors must be float16, bfloat16, float32 or float64")
    if A.ndim != 2 or B.ndim != 2:
        dims = A.ndim if A.ndim != 2 else B.ndim
        kind = "as in a convolution LoRA" if dims > 2 else "not a matrix"
        raise FormatError(f"{where}: {dims}-D factors ({names[0]} {list(A.shape)}, {names[1]} {list(B.shape)}), {kind}; only linear layers (2-D factors) are supported")
    if 0 in A.shape or 0 in B.shape:
        raise FormatError(f"{where}: a zero dimension ({names[0]} {list(A.shape)}, {names[1]} {list(B.shape)}); rank, in_features and out_features must be at least 1")
    if B.shape[1] != A.shape[0]:
        raise FormatError(f"{where}: {names[0]} is {list(A.shape)} but {names[1]} is {list(B.shape)}; their ranks ({A.shape[0]} and {B.shape[1]}) must agree")
    if magnitude is not None:
        if magnitude.dtype not in FACTOR_DTYPES:
            raise FormatError(f"{where}: the DoRA magnitude is {str(magnitude.dtype).removeprefix('torch.')}; it must be floating point")
        if tuple(magnitude.shape) != (B.shape[0],):
            raise FormatError(f"{where}: the DoRA magnitude is {list(magnitude.shape)}, expected [{B.shape[0]}] (one per output feature)")
    return LoraLayer(A, B, alpha, magnitude)


def require_layers(source: str, layers: dict[str, LoraLayer]) -> dict[str, LoraLayer]:
    """``layers``, unless there are none: a file without LoRA tensors is not an adapter."""
    if not layers:
        raise FormatError(f"{source}: holds no LoRA tensors, so it is not an adapter (an empty or wrong file?)")
    return layers
