"""Next-token cross entropy, and a fused output-head + cross-entropy that never holds all logits.

The plain path computes ``logits = model(...)`` (B, T, V), upcasts them to float32 and takes the
cross entropy: for a 32k vocabulary and 8 x 1024 tokens that is about 3 GB of logits, their float32
copy, log-probabilities and gradients, often the largest allocation of a LoRA run.

The fused path (Hugging Face causal LMs whose logits are exactly ``lm_head(hidden)``, with a frozen
head) runs the decoder for the hidden states, then walks over chunks of tokens: logits of the chunk
(float32), their loss, and right there the gradient of the hidden states,
``dL/dh = scale * (softmax(logits) - onehot(label)) @ W`` (the head is frozen, so nothing else is
needed). Backward then only scales the stored (N, H) gradient. Same arithmetic as the plain path;
peak memory of one chunk instead of the whole batch's logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterOpsError
from .data import IGNORE
from .layers import autocast_dtype

__all__ = ["loss_fn", "fused_head_supported", "shifted_labels", "model_inputs"]

# Decoders whose causal-LM forward is ``lm_head(decoder(...).last_hidden_state)`` and nothing else.
_PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "smollm3"}
_CHUNK_BYTES = 256 * 2**20  # float32 logits per chunk


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels[:, t + 1]`` at position ``t`` (IGNORE at the end): what logits[:, t] predicts. (B, T)"""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def fused_head_supported(model: nn.Module) -> bool:
    """Whether ``model`` is a causal LM the fused head + loss reproduces exactly."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_MODELS or not type(model).__name__.endswith("ForCausalLM"):
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad or not isinstance(decoder, nn.Module):
        return False
    return not (head._forward_hooks or head._forward_pre_hooks)


def loss_fn(model: nn.Module, *, fused: bool | None = None, compile: bool = False) -> Callable[[dict[str, torch.Tensor], float], torch.Tensor]:
    """``f(batch, scale) -> scale * summed cross entropy`` over the trained tokens of ``batch``.

    ``fused``: None picks the fused head when ``fused_head_supported(model)``. ``compile``: the
    fused head's per-chunk softmax and gradient run through ``torch.compile``.
    """
    if fused is None:
        fused = fused_head_supported(model)
    forward = _forward_fn(model)
    if not fused:
        def plain(batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
            out = forward(batch)
            logits = out if isinstance(out, torch.Tensor) else out.logits  # (B, T, V)
            labels = shifted_labels(batch["labels"]).reshape(-1)  # (B T,)
            logits = logits.reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(logits.to(_at_least_float32(logits.dtype)), labels, ignore_index=IGNORE, reduction="sum")
            return loss * scale
        return plain

    decoder = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    segments = _takes_kwargs(decoder)
    chunk_fn = compiled_chunk_loss_grad() if compile else chunk_loss_grad

    def fused_loss(batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        hidden = decoder(**model_inputs(batch, segments=segments), use_cache=False).last_hidden_state
        labels = shifted_labels(batch["labels"]).reshape(-1)  # (B T,)
        return _HeadCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, labels, scale, chunk_fn)

    return fused_loss


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def model_inputs(batch: dict[str, torch.Tensor], *, segments: bool = True) -> dict[str, Any]:
    """Keyword arguments of a Hugging Face forward for ``batch``.

    Padded batches: ``input_ids`` and ``attention_mask``. Packed ones (``position_ids``, see
    ``data.collate``): ``input_ids``, ``position_ids`` and no ``attention_mask``, which is how
    transformers' masking utilities know to keep each example to itself, plus the segment offsets
    (``cu_seq_lens_q/k``, ``max_length_q/k``: the row length, an upper bound) that the varlen
    attention of ``adapterops.train.attention`` reads (left out with ``segments=False``, for a
    forward that takes no extra keyword arguments).
    """
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if segments:
        cu, length = batch["cu_seq_lens"], batch["input_ids"].shape[1]
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=length, max_length_k=length)
    return inputs


def _takes_kwargs(module: nn.Module) -> bool:
    import inspect

    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(module.forward).parameters.values())


def _forward_fn(model: nn.Module) -> Callable[[dict[str, torch.Tensor]], Any]:
    """``model(**model_inputs(batch), use_cache=False)`` for Hugging Face style models,
    ``model(input_ids)`` for any other (which cannot take packed batches)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    segments = _takes_kwargs(model)
    hf = "attention_mask" in params
    positions = hf and "position_ids" in params
    extra = {"use_cache": False} if "use_cache" in params else {}

    def forward(b: dict[str, torch.Tensor]) -> Any:
        if "position_ids" in b and not positions:
            raise AdapterOpsError(
                f"{type(model).__name__}.forward takes no position_ids, so packed examples would attend to each "
                "other; train it without packing, or use a Hugging Face causal LM"
            )
        return model(**model_inputs(b, segments=segments), **extra) if hf else model(b["input_ids"])

    return forward


class _HeadCrossEntropy(torch.autograd.Function):
    """``scale * sum_t CE(h_t @ W.T, y_t)`` over tokens with ``y_t != IGNORE``, chunk by chunk.

    h (N, H), W (V, H) frozen, y (N,). Per chunk: logits = h_c @ W.T in the compute dtype, then
    ``chunk_fn`` (``chunk_loss_grad``, compiled or not) in float32 (or wider): lse = logsumexp(logits);
    loss += lse - logits[y]; dL/dh_c = scale * (exp(logits - lse) - onehot(y)) @ W, stored for backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, chunk_fn):
        dtype = autocast_dtype(hidden.device.type) or hidden.dtype
        h = hidden.to(dtype)
        W = weight.to(dtype)
        n, vocab = h.shape[0], W.shape[0]
        chunk = max(1, min(n, _CHUNK_BYTES // (4 * vocab)))
        need_grad = hidden.requires_grad
        grad = torch.empty_like(h) if need_grad else None
        total = torch.zeros((), dtype=_at_least_float32(dtype), device=hidden.device)
        scale_t = torch.full((), scale, dtype=total.dtype, device=hidden.device)  # a tensor: one compiled graph for every step
        for s in range(0, n, chunk):
            logits = torch.mm(h[s : s + chunk], W.t())  # (c, H) @ (H, V) -> (c, V)
            loss, dlogits = chunk_fn(logits, labels[s : s + chunk], scale_t, need_grad)
            total += loss
            if need_grad:
                grad[s : s + chunk] = torch.mm(dlogits, W)  # (c, V) @ (V, H) -> (c, H)
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None
        return (grad * grad_output.to(grad.dtype)).to(ctx.hidden_dtype), None, None, None, None


def chunk_loss_grad(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(sum of CE over the valid tokens, dL/dlogits)`` of one chunk of logits (c, V), computed in
    float32 at least; the gradient ``scale * (softmax - onehot(y))`` (zero rows where ``y`` is
    IGNORE) comes back in the logits' dtype, or None without ``grad``. Overwrites ``logits`` when
    they already are float32."""
    x = logits.to(_at_least_float32(logits.dtype))
    valid = labels != IGNORE  # (c,)
    target = labels.clamp(min=0)
    lse = torch.logsumexp(x, dim=1)  # (c,)
    picked = x.gather(1, target[:, None]).squeeze(1)  # (c,)
    loss = ((lse - picked) * valid).sum()
    if not grad:
        return loss, None
    probs = x.sub_(lse[:, None]).exp_()  # softmax, in place
    probs[torch.arange(len(labels), device=probs.device), target] -= 1.0
    probs.mul_((valid.to(probs.dtype) * scale)[:, None])
    return loss, probs.to(logits.dtype)


_compiled_chunk = None


def compiled_chunk_loss_grad() -> Callable:
    """``chunk_loss_grad`` through ``torch.compile``: one pass over the logits for the softmax and
    one that writes the gradient, instead of the float32 copy and the half-dozen passes of eager
    mode (on an H200, 1.1B model, 8 x 1024 tokens a step: about 1.5 ms a step instead of 6)."""
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(chunk_loss_grad)
    return _compiled_chunk
