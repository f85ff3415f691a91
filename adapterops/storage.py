"""How a logical weight is stored in a checkpoint: the codec registry the rewrite engine reads through.

A codec is registered by name in ``CODECS`` (``register_codec(codec)``); a module that defines one
registers it at import, and ``_CODEC_MODULES`` lists the built-in ones to import on first use.
``dense`` (F16/BF16/F32/F64 tensors) is built in and is the fallback. A codec provides:

- ``name: str``
- ``groups(checkpoint) -> {weight: (member tensor names, ...)}``: the logical weights it stores
  (e.g. NF4: ``"X.weight" -> ("X.weight", "X.weight.absmax", "X.weight.quant_map", ...)``).
  Codecs other than dense are asked first; dense takes the floating tensors nobody claimed.
- ``shape(checkpoint, weight) -> tuple``: the logical shape, ``(out, in)`` for a linear weight.
- ``decode(tensors, weight) -> Tensor``: the float32 weight (on the device of ``tensors``, which
  maps member names to tensors); the engine may modify the result in place.
- ``encode(W, weight, like, dtype) -> ({name: tensor}, extras)``: store float32 ``W``; ``like`` is
  the decoded input's member tensors, ``dtype`` is only non-None for dense. ``extras`` is a dict
  of extra report fields (e.g. ``codes_changed``); values may be 0-dim device tensors.
- ``dense_config(config) -> config``: config.json once this codec's weights are written dense
  (e.g. drop ``quantization_config``).
- optional ``decode_many(tensors list, weights) -> (G, ...)`` and ``encode_many(W (G, ...),
  weights, likes, dtype) -> (outputs list, extras list)``: the same for a batch of equal-shape
  weights in one pass (a merge batch uses them when present).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from .checkpoint import Checkpoint
from .errors import AdapterOpsError, FormatError

__all__ = [
    "Codec",
    "DenseCodec",
    "DENSE",
    "CODECS",
    "register_codec",
    "logical_weights",
    "DTYPES",
    "parse_dtype",
]

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
_CODEC_MODULES = ("adapterops.quant.nf4",)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``, ``"fp16"``, ``"fp32"`` (or their torch names, or a torch dtype) -> torch dtype."""
    if dtype is None:
        return None
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise AdapterOpsError(f"unsupported output dtype {dtype!r}; choose bf16, fp16 or fp32")
    return DTYPES[key]


class Codec(Protocol):
    """How one logical weight is stored; see the module docstring for the contract."""

    name: str

    def groups(self, checkpoint: Checkpoint) -> dict[str, tuple[str, ...]]: ...

    def shape(self, checkpoint: Checkpoint, weight: str) -> tuple[int, ...]: ...

    def decode(self, tensors: Mapping[str, torch.Tensor], weight: str) -> torch.Tensor: ...

    def encode(
        self, W: torch.Tensor, weight: str, like: Mapping[str, torch.Tensor], dtype: torch.dtype | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    def dense_config(self, config: dict[str, Any]) -> dict[str, Any]: ...


class DenseCodec:
    """Plain floating tensors: decode to float32 (float64 stays), encode by one cast."""

    name = "dense"
    FLOATS = ("F16", "BF16", "F32", "F64")

    def groups(self, checkpoint: Checkpoint) -> dict[str, tuple[str, ...]]:
        return {n: (n,) for n in checkpoint.names() if checkpoint.entry(n).dtype in self.FLOATS}

    def shape(self, checkpoint: Checkpoint, weight: str) -> tuple[int, ...]:
        return checkpoint.shape(weight)

    def decode(self, tensors: Mapping[str, torch.Tensor], weight: str) -> torch.Tensor:
        t = tensors[weight]
        return t.to(torch.promote_types(t.dtype, torch.float32))

    def encode(
        self, W: torch.Tensor, weight: str, like: Mapping[str, torch.Tensor], dtype: torch.dtype | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {weight: W.to(dtype or like[weight].dtype)}, {}

    def dense_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return config


CODECS: dict[str, Codec] = {}
DENSE = DenseCodec()


def register_codec(codec: Codec) -> Codec:
    """Add (or replace) the codec instance ``codec`` under ``codec.name``; returns it."""
    CODECS[codec.name] = codec
    return codec


register_codec(DENSE)


def logical_weights(checkpoint: Checkpoint) -> dict[str, tuple[Codec, tuple[str, ...]]]:
    """Every weight a codec can decode: ``{weight: (codec, member tensor names)}``."""
    for module in _CODEC_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if not module.startswith(str(exc.name)):
                raise
    claimed: dict[str, str] = {}
    found: dict[str, tuple[Codec, tuple[str, ...]]] = {}
    for codec in [c for n, c in CODECS.items() if n != DENSE.name] + [CODECS[DENSE.name]]:
        for weight, members in codec.groups(checkpoint).items():
            taken = [m for m in members if m in claimed]
            if taken and codec.name == DENSE.name:
                continue
            if taken:
                raise FormatError(f"{checkpoint.source}: tensor {taken[0]} is claimed by codecs {claimed[taken[0]]} and {codec.name}")
            found[weight] = (codec, tuple(members))
            claimed.update(dict.fromkeys(members, codec.name))
    return found
