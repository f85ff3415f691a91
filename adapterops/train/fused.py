"""LoRA layers that read one input, run as one: q/k/v of an attention block, gate/up of an MLP.

For members ``i`` with frozen bases ``W_i`` (out_i, in), factors ``A_i`` (r_i, in), ``B_i``
(out_i, r_i) and scales ``s_i``, all applied to the same ``x`` (N, in):

    W = [W_1; ...; W_k]  (O, in)       A = [A_1; ...; A_k]  (R, in)
    Y = x @ W.T  (N, O),   Z = x @ A.T  (N, R),   Y[:, o_i] += s_i Z[:, r_i] @ B_i.T

one base GEMM and one LoRA-A GEMM for the group instead of k of each (the small k/v projections
of a grouped-query model make poor GEMMs alone, and every LoRA-A GEMM reads all of ``x``).
Backward, with G = [G_1, ..., G_k] (N, O) and GZ_i = s_i G_i @ B_i:

    dx = G @ W + GZ @ A,   dA = GZ.T @ x  (R, in, split by rows),   dB_i = s_i G_i.T @ Z_i.

The model's code still calls each member; the first call with an input computes the group's
outputs and the others pick theirs up when they are called with that same tensor (another input
computes afresh, so a member used alone stays correct). Members are grouped by name among
siblings (``SHARED_INPUT_GROUPS``); only plain ``nn.Linear`` bases without dropout, hooks or a
trainable weight join.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .layers import LoraLinear, _add_mm_, _compute_dtype

__all__ = ["SHARED_INPUT_GROUPS", "SharedInput", "fuse_shared_inputs"]

# Sibling module names that read the same tensor in the models' own forward code.
SHARED_INPUT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen, Gemma, OLMo, ... self-attention
    ("gate_proj", "up_proj"),  # their gated MLPs
)


class SharedInput:
    """A group of LoRA layers evaluated together on one shared input (see the module docstring)."""

    def __init__(self, members: Sequence[LoraLinear]) -> None:
        self.members = tuple(members)
        self._x: torch.Tensor | None = None
        self._outs: tuple[torch.Tensor, ...] = ()
        self._taken = 0

    def __call__(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        i = self.members.index(layer)
        if self._x is None or x is not self._x:
            self._x, self._outs, self._taken = x, self._run(x), 0
        out = self._outs[i]
        self._taken += 1
        if self._taken >= len(self.members):  # every member has its output: hold nothing more
            self._x, self._outs, self._taken = None, (), 0
        return out

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.members
        tensors = [l.base.weight for l in m] + [l.base.bias for l in m] + [l.lora_A for l in m] + [l.lora_B for l in m]
        return _SharedInputFn.apply(x, tuple(l.scale for l in m), len(m), *tensors)

    def eligible(self) -> bool:
        return len(self.members) > 1 and all(_can_join(l) for l in self.members) and len(
            {(l.in_features, l.base.weight.dtype, l.lora_A.dtype, l.base.bias is None) for l in self.members}) == 1


def _can_join(layer: LoraLinear) -> bool:
    base = layer.base
    return (type(base) is nn.Linear and layer.fused and layer.dropout is None and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad))


def fuse_shared_inputs(model: nn.Module, groups: Sequence[Sequence[str]] = SHARED_INPUT_GROUPS) -> Callable[[], None]:
    """Join the LoRA layers of ``model`` that read one input into ``SharedInput`` groups, in place.

    Returns what undoes it. Only complete groups of eligible layers join (see the module docstring).
    """
    joined: list[LoraLinear] = []
    for parent in model.modules():
        for names in groups:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(l, LoraLinear) and l.group is None for l in members):
                continue
            group = SharedInput(members)
            if group.eligible():
                for l in members:
                    l.group = group
                joined += members

    def undo() -> None:
        for l in joined:
            l.group = None

    return undo


class _SharedInputFn(torch.autograd.Function):
    """Forward and backward of one group; ``tensors`` = W_1..W_k, b_1..b_k, A_1..A_k, B_1..B_k."""

    @staticmethod
    def forward(ctx, x, scales, k, *tensors):
        Ws, bs, As, Bs = (tensors[j * k : (j + 1) * k] for j in range(4))
        dtype = _compute_dtype(x)
        xc = x if x.dtype == dtype else x.to(dtype)
        x2 = xc.reshape(-1, x.shape[-1])  # (N, in)
        outs_i = [w.shape[0] for w in Ws]
        ranks = [a.shape[0] for a in As]
        W = torch.cat([w.to(dtype) for w in Ws])  # (O, in)
        A = torch.cat([a.to(dtype) for a in As])  # (R, in)
        if bs[0] is None:
            y = torch.mm(x2, W.t())  # (N, in) @ (in, O) -> (N, O)
        else:
            y = torch.addmm(torch.cat([b.to(dtype) for b in bs]), x2, W.t())
        z = torch.mm(x2, A.t())  # (N, in) @ (in, R) -> (N, R)
        o = r = 0
        for n_out, rank, B, s in zip(outs_i, ranks, Bs, scales):
            _add_mm_(y[:, o : o + n_out], z[:, r : r + rank], B.to(dtype).t(), s)  # += s (N, r_i) @ (r_i, out_i)
            o, r = o + n_out, r + rank
        ctx.save_for_backward(x2, z, *Ws, *As, *Bs)
        ctx.meta = (k, scales, outs_i, ranks, dtype, x.shape, x.dtype)
        lead = x.shape[:-1]
        out, o = [], 0
        for n_out in outs_i:
            out.append(y[:, o : o + n_out].reshape(*lead, n_out))  # views of y: no copies
            o += n_out
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        k, scales, outs_i, ranks, dtype, x_shape, x_dtype = ctx.meta
        saved = ctx.saved_tensors
        x2, z = saved[0], saved[1]
        Ws, As, Bs = saved[2 : 2 + k], saved[2 + k : 2 + 2 * k], saved[2 + 2 * k :]
        need_x = ctx.needs_input_grad[0]
        with torch.autocast(x2.device.type, enabled=False):
            gs = [g.reshape(-1, n).to(dtype) for g, n in zip(grads, outs_i)]  # (N, out_i)
            gz = torch.cat([torch.mm(g, B.to(dtype)).mul_(s) for g, B, s in zip(gs, Bs, scales)], dim=1)  # (N, R)
            dA = torch.mm(gz.t(), x2)  # (R, N) @ (N, in) -> (R, in)
            dAs, dBs, r = [], [], 0
            for i, (g, rank, s) in enumerate(zip(gs, ranks, scales)):
                dAs.append(dA[r : r + rank].to(As[i].dtype) if ctx.needs_input_grad[3 + 2 * k + i] else None)
                dBs.append(torch.mm(g.t(), z[:, r : r + rank]).mul_(s).to(Bs[i].dtype)
                           if ctx.needs_input_grad[3 + 3 * k + i] else None)  # (out_i, N) @ (N, r_i)
                r += rank
            dx = None
            if need_x:
                W = torch.cat([w.to(dtype) for w in Ws])  # (O, in)
                dx = torch.mm(torch.cat(gs, dim=1), W)  # (N, O) @ (O, in) -> (N, in)
                _add_mm_(dx, gz, torch.cat([a.to(dtype) for a in As]), 1.0)  # += (N, R) @ (R, in)
                dx = dx.reshape(x_shape).to(x_dtype)
        none: list[Any] = [None] * (2 * k)  # the frozen weights and biases
        return (dx, None, None, *none, *dAs, *dBs)
