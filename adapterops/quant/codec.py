"""The ``nf4`` storage codec: how the merge engine reads and writes bitsandbytes NF4 weights.

Registered with ``adapterops.storage.register_codec`` when this module is imported. A weight
``X.weight`` stored as NF4 is the group of tensors ``X.weight`` (packed codes),
``X.weight.absmax``, ``X.weight.quant_map``, ``X.weight.nested_absmax``,
``X.weight.nested_quant_map`` and ``X.weight.quant_state.bitsandbytes__nf4``.

- decode: the dequantized weight (bitsandbytes' ``dequantize_4bit`` output, in the dtype the
  quantization state records) as float32. This is the weight a QLoRA adapter was trained against.
- encode: re-quantize with fresh scales, the same blocksize and double quantization as the input
  (nearest rounding, bitsandbytes' own); given Hessians (``hessians=``), choose the codes by
  error feedback instead (``adapterops.quant.gptq``), on the input's own stored scales. The
  report gets ``codes_changed``, the share of 4-bit codes that differ from the input's.

``decode_many`` / ``encode_many`` do the same for a batch of equal-shape weights in one pass each.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..checkpoint import NF4_STATE_SUFFIX, Checkpoint
from ..errors import FormatError
from ..storage import register_codec
from .nf4 import STATE_SUFFIXES, NF4Tensor, dequantize_nf4, from_state_dict, parse_state, quantize_nf4_many, to_state_dict
from .nf4 import _dequantize_flat
from .gptq import quantize_gptq_many

__all__ = ["NF4Codec", "NF4", "codes_changed"]


def codes_changed(old: NF4Tensor, new: NF4Tensor) -> torch.Tensor:
    """Share of the 4-bit codes of ``new`` that differ from ``old`` (0-dim float32, on the device).

    Compared on the packed bytes: a padding nibble is the same in both, so it never counts.
    """
    diff = old.codes.reshape(-1) ^ new.codes.reshape(-1)
    moved = (diff & 15).ne(0).sum() + (diff >> 4).ne(0).sum()
    return moved.float() / new.numel


class NF4Codec:
    """Weights stored as bitsandbytes NF4 (see the module docstring)."""

    name = "nf4"

    def __init__(self) -> None:
        self._states: weakref.WeakKeyDictionary[Checkpoint, dict[str, dict[str, Any]]] = weakref.WeakKeyDictionary()

    def groups(self, checkpoint: Checkpoint) -> dict[str, tuple[str, ...]]:
        found = {}
        for name in checkpoint.names():
            if name.endswith(NF4_STATE_SUFFIX):
                weight = name[: -len(NF4_STATE_SUFFIX)]
                if weight in checkpoint:
                    found[weight] = (weight, *(weight + s for s in STATE_SUFFIXES if weight + s in checkpoint))
        return found

    def state(self, checkpoint: Checkpoint, weight: str) -> dict[str, Any]:
        """The JSON quantization state of ``weight`` (read once per checkpoint)."""
        states = self._states.setdefault(checkpoint, {})
        if weight not in states:
            states[weight] = parse_state(checkpoint.read(weight + NF4_STATE_SUFFIX), f"{checkpoint.source}: {weight}")
        return states[weight]

    def shape(self, checkpoint: Checkpoint, weight: str) -> tuple[int, ...]:
        try:
            return tuple(int(s) for s in self.state(checkpoint, weight)["shape"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{checkpoint.source}: {weight}: quantization state has no valid shape") from None

    def decode(self, tensors: Mapping[str, torch.Tensor], weight: str) -> torch.Tensor:
        return dequantize_nf4(from_state_dict(tensors, weight)).float()

    def decode_many(self, tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[str]) -> torch.Tensor:
        """Equal-shape weights -> float32 ``(G, *shape)``, dequantized in one pass."""
        qs = [from_state_dict(t, w) for t, w in zip(tensors, weights)]
        if len({(q.shape, q.dtype) for q in qs}) > 1:
            return torch.stack([self.decode(t, w) for t, w in zip(tensors, weights)])
        flat = _dequantize_flat(qs)  # float32 products, all weights back to back
        if qs[0].dtype != torch.float32:
            flat = flat.to(qs[0].dtype).float()  # the values bitsandbytes returns, in float32
        return flat.view(len(qs), *qs[0].shape)

    def encode(
        self, W: torch.Tensor, weight: str, like: Mapping[str, torch.Tensor], dtype: torch.dtype | None,
        *, hessian: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        hessians = None if hessian is None else hessian.unsqueeze(0)
        outputs, extras = self.encode_many(W.unsqueeze(0), [weight], [like], dtype, hessians=hessians)
        return outputs[0], extras[0]

    def encode_many(
        self, W: torch.Tensor, weights: Sequence[str], likes: Sequence[Mapping[str, torch.Tensor]], dtype: torch.dtype | None,
        *, hessians: torch.Tensor | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, Any]]]:
        """Re-quantize ``W`` ``(G, *shape)`` float32 like each input weight, in one pass when they agree.

        ``hessians`` ``(G, in, in)``: GPTQ rounding for these inputs, keeping each input's scales.
        """
        olds = [from_state_dict(like, w) for like, w in zip(likes, weights)]
        settings = {(q.blocksize, q.double_quant) for q in olds}
        if hessians is not None:
            news = quantize_gptq_many(W, hessians, like=olds)
        elif len(settings) == 1:
            blocksize, nested = settings.pop()
            news = quantize_nf4_many(W, blocksize=blocksize, double_quant=nested)
        else:
            news = [quantize_nf4_many(W[g : g + 1], blocksize=q.blocksize, double_quant=q.double_quant)[0] for g, q in enumerate(olds)]
        news = [dataclasses.replace(n, dtype=q.dtype) for n, q in zip(news, olds)]  # dequantizes to the base's dtype
        outputs = [to_state_dict(n, w) for n, w in zip(news, weights)]
        extras = [{"codes_changed": codes_changed(q, n)} for q, n in zip(olds, news)]
        return outputs, extras

    def dense_config(self, config: dict[str, Any]) -> dict[str, Any]:
        config = dict(config)
        config.pop("quantization_config", None)
        return config


NF4 = register_codec(NF4Codec())
