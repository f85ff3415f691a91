"""Attention over packed sequences: each packed example attends only to itself.

A packed batch (``data.pack`` + ``data.collate``) holds several examples per row, with position ids
that restart at every example and ``cu_seq_lens``, the offsets of the examples in the flattened
(B T) tokens. Causal attention then has to be block-diagonal:

    out_t = softmax(q_t K_s^T / sqrt(d)) V_s   over the keys s <= t of t's own example.

Two routes give it:

- transformers' masking utilities (5.x) already build that mask from the position ids when the
  forward gets ``position_ids`` and no ``attention_mask`` (and no cache): eager, sdpa and flex
  attention all honour it, Llama-family models included (measured: packed logits equal the
  examples' own to 1e-16 in float64). This is the exact route, and the CPU's.
- ``"adapterops_varlen"``, registered here in transformers' attention interface: on CUDA, for
  16-bit inputs, torch's flash-attention varlen kernel (``torch.nn.attention.varlen``), which
  computes only the blocks inside each example instead of a (T, T) masked square; elsewhere one
  ``scaled_dot_product_attention`` per example (slow, exact, what the tests check the kernel's
  wrapper with). ``packed_attention(model)`` switches a model to it for a ``with`` block.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterOpsError

__all__ = ["VARLEN", "varlen_attention", "register_varlen", "packed_attention", "varlen_kernel_available"]

VARLEN = "adapterops_varlen"


def varlen_kernel_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's flash varlen kernel runs (forward and backward) for ``dtype`` inputs on
    ``device``: tried once on a tiny problem, and remembered."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    key = (str(device), dtype)
    if key not in _PROBED:
        _PROBED[key] = _probe(device, dtype)
    return _PROBED[key]


_PROBED: dict[tuple[str, torch.dtype], bool] = {}


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        q = torch.randn(16, 4, 64, device=device, dtype=dtype, requires_grad=True)  # (N, H, D)
        kv = torch.randn(16, 2, 64, device=device, dtype=dtype, requires_grad=True)  # grouped-query heads
        cu = torch.tensor([0, 7, 16], device=device, dtype=torch.int32)
        _flash_varlen(q, kv, kv, cu, 16, None).float().sum().backward()
        return True
    except Exception as exc:  # no kernel in this torch build or for this GPU
        warnings.warn(f"flash varlen attention is not available here ({type(exc).__name__}: {exc}); "
                      "packed batches use transformers' packed-sequence masks instead", stacklevel=3)
        return False


def varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q (B, H, T, D), k and v (B, Hkv, T, D) ->
    (B, T, H, D). With ``cu_seq_lens_q`` (S + 1,) causal attention within each of the S segments
    of the flattened tokens; without it, plain sdpa with ``attention_mask``."""
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if dropout and module.training:
        raise AdapterOpsError("packed attention has no attention dropout; set the model's attention_dropout to 0")
    b, h, t, d = query.shape
    hkv = key.shape[1]
    q = query.transpose(1, 2).reshape(b * t, h, d)  # (B T, H, D)
    k = key.transpose(1, 2).reshape(b * t, hkv, d)  # (B T, Hkv, D)
    v = value.transpose(1, 2).reshape(b * t, hkv, d)
    if varlen_kernel_available(q.device, q.dtype):
        out = _flash_varlen(q, k, v, cu_seq_lens_q, max_length_q or t, scaling)
    else:
        out = _per_segment(q, k, v, cu_seq_lens_q, scaling)
    return out.reshape(b, t, h, d), None


def _flash_varlen(q, k, v, cu, max_len: int, scaling: float | None) -> torch.Tensor:
    """torch's flash varlen kernel, causal within each segment; (N, H, D) -> (N, H, D)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    extra: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    if scaling is not None:
        extra["scale"] = scaling
    cu = cu.to(device=q.device, dtype=torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)


def _per_segment(q, k, v, cu, scaling: float | None) -> torch.Tensor:
    """One causal ``scaled_dot_product_attention`` per segment: the exact reference route."""
    rep = q.shape[1] // k.shape[1]
    bounds = cu.tolist()
    out = torch.empty_like(q)
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e <= s:
            continue
        qs = q[s:e].transpose(0, 1)[None]  # (1, H, l, D)
        ks = k[s:e].transpose(0, 1)[None].repeat_interleave(rep, dim=1)  # (1, H, l, D)
        vs = v[s:e].transpose(0, 1)[None].repeat_interleave(rep, dim=1)
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling)[0].transpose(0, 1)
    return out


def _varlen_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mask builder for ``VARLEN``: none for packed (and unpadded) batches, the segments are
    the mask; sdpa's for padded ones."""
    if kwargs.get("attention_mask") is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


_REGISTERED = False


def register_varlen() -> None:
    """Register ``VARLEN`` with transformers' attention and mask interfaces (once)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)
    _REGISTERED = True


def _configs(model: nn.Module) -> list[Any]:
    """The distinct configs of ``model`` and its submodules that choose an attention function."""
    seen: dict[int, Any] = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextmanager
def packed_attention(model: nn.Module, *, enabled: bool = True) -> Iterator[bool]:
    """Run ``model``'s attention through ``VARLEN`` inside the block (then restore it).

    Yields whether it switched: only Hugging Face models whose attention goes through
    transformers' attention interface (eager or sdpa) switch; others keep their own.
    """
    configs = [c for c in _configs(model) if c._attn_implementation in ("sdpa", "eager")] if enabled else []
    if not configs:
        yield False
        return
    register_varlen()
    before = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = VARLEN
    try:
        yield True
    finally:
        for c, name in zip(configs, before):
            c._attn_implementation = name
