"""Error-feedback (GPTQ) rounding into NF4: choose the 4-bit codes that keep a layer's outputs.

For a linear weight ``W`` (out, in) and its inputs ``X`` (in, tokens), nearest rounding minimises
each weight's own error; GPTQ (Frantar et al. 2023, sec. 3) minimises the error of the outputs

    ||(deq(Q) - W) X||_F^2 = tr(E H E^T),    E = deq(Q) - W (out, in),  H = X X^T (in, in)

one row at a time (rows are independent and share ``H``). Columns are rounded in turn; after
column ``j`` is rounded the columns not yet rounded absorb its error (the Optimal Brain Surgeon
update, sec. 3). With ``U`` the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``) the update is

    e = (w_j - q_j) / U_jj          w_k <- w_k - e * U_jk       for the columns k after j

which is the sequence of OBS updates with the inverse Hessian of the remaining columns (sec. 4,
"Cholesky reformulation"). Columns go in blocks of ``BLOCK``: inside a block the updates touch
the block only, the rest of the matrix gets one matmul per block (sec. 4, "Lazy batch-updates").
``H`` is damped to ``H + damp * mean(diag H) * I`` (sec. 4), inputs that never fire
(``H_jj = 0``) get ``H_jj = 1``, and with ``act_order`` the columns go in order of decreasing
``H_jj`` (the "act-order" heuristic of the GPTQ reference code).

**The NF4 grid and its scales.** The output is an ordinary bitsandbytes NF4 weight: blocks of
``blocksize`` values of the row-major flattened weight, one scale per block (double-quantized
when asked), codes from ``NF4_CODE``. The scales are fixed before any column is rounded: a value
can only be rounded against a scale that is already known, and a block (up to 64 columns of a
row, or the end of one row and the start of the next) would otherwise get its scale from values
that error feedback has not finished moving. Fixing them also makes every later step exact: the
rounding sees the scale the checkpoint will store, after its own 8-bit double quantization,
so ``deq(Q)`` is exactly what the loop computed, in any column order. Where they come from:

- re-quantizing a merge into an NF4 base: the base's own stored scales (absmax codes, nested
  absmax and offset unchanged). The base ``W`` lies exactly on that grid, so the best codes start
  from the base's and only the delta has to be encoded; fresh scales from ``W + dW`` would move
  the grid of every block whose absmax changed and re-round it, an error of NF4's own size
  (~9% of ``W``) that dwarfs a LoRA delta (~1%). A value of ``W + dW`` past its block's scale
  takes the extreme code; the error feedback carries the rest.
- quantizing a dense weight: the scales bitsandbytes would choose (``quantize_nf4``: absmax per
  block, then double quantization with offset ``mean(absmax)`` in blocks of 256).

Rounding a value against its scale is nf4's own (``w * (1 / s)``, clamped to [-1, 1], nearest
code, ties to the lower), and the value fed back is ``c[q] * s`` in float32 cast to the weight's
dtype, as bitsandbytes dequantizes. With a diagonal ``H`` nothing is fed back and the codes are
the nearest ones on the fixed scales (bitsandbytes' own codes when the scales are its float32
absmax).

All of it is batched over a leading dimension of equal-shape weights, each with its own ``H``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..errors import AdapterOpsError
from .nf4 import NF4_CODE, NF4Tensor, _nf4_index, _on, _pack, quantize_nf4_many

__all__ = ["DAMP", "BLOCK", "gptq_codes", "quantize_gptq_many", "output_error_sq", "relative_output_error"]

DAMP = 0.01  # H + DAMP * mean(diag H) * I, as in the GPTQ paper
BLOCK = 128  # columns per lazy batch update


def _batched(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == ndim else t


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper ``U`` with ``U^T U = (H + damp * mean(diag H) * I)^-1``, batched ``(G, n, n)``.

    The damping grows tenfold (up to three times) while ``H`` is not numerically positive definite.
    """
    n = H.shape[-1]
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    diag = H.diagonal(dim1=-2, dim2=-1)
    scale = diag.mean(dim=-1).clamp(min=torch.finfo(H.dtype).tiny)[:, None, None]  # (G, 1, 1)
    for attempt in range(4):
        L, info = torch.linalg.cholesky_ex(H + (damp * 10**attempt) * scale * eye)
        if not bool(info.any()):
            break
    else:
        raise AdapterOpsError("the Hessian of a layer is not positive definite even with strong damping; check the calibration inputs for NaN or Inf")
    Hinv = torch.cholesky_inverse(L)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if bool(info.any()):
        raise AdapterOpsError("the inverse Hessian of a layer lost positive definiteness in float32; raise the damping")
    return U


def gptq_codes(
    W: torch.Tensor,
    H: torch.Tensor,
    scales: torch.Tensor,
    *,
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
    damp: float = DAMP,
    act_order: bool = True,
    block: int = BLOCK,
) -> torch.Tensor:
    """NF4 code indices (uint8, shaped like ``W``) that GPTQ picks for ``W`` on fixed block scales.

    ``W``: (out, in) or (G, out, in), float32 or float64 (the precision of the whole computation).
    ``H``: (in, in) or (G, in, in), symmetric positive semi-definite. ``scales``: the dequantized
    scale of each block of the flattened weight, (blocks,) or (G, blocks). ``dtype``: what the
    weight dequantizes to (its values are fed back as bitsandbytes rebuilds them).
    """
    squeeze = W.dim() == 2
    W, H, scales = _batched(W, 2), _batched(H, 2), _batched(scales, 1)
    G, out, n = W.shape
    if H.shape != (G, n, n):
        raise AdapterOpsError(f"Hessian of shape {list(H.shape)} does not fit weights of shape {list(W.shape)}")
    cdt = W.dtype
    # Work on the transposes (G, in, out): column j of the weight is then one contiguous row.
    # The scale of every value: block b covers flat positions [b * blocksize, (b + 1) * blocksize).
    S = scales.to(cdt).repeat_interleave(blocksize, dim=1)[:, : out * n].reshape(G, out, n).transpose(1, 2)
    inv = torch.where(S != 0, 1.0 / S, torch.zeros((), dtype=cdt, device=S.device))
    H = H.to(cdt).clone()
    diag = H.diagonal(dim1=-2, dim2=-1)
    diag.masked_fill_(diag == 0, 1.0)  # an input that never fires: its column rounds to nearest
    Wt = W.transpose(1, 2).clone(memory_format=torch.contiguous_format)  # updated in place: never the caller's
    perm = None
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True)  # (G, in)
        pick = lambda t: torch.stack([t_g.index_select(0, p) for t_g, p in zip(t, perm)])  # noqa: E731  (rows of each weight)
        Wt, S, inv = pick(Wt), pick(S), pick(inv)
        H = torch.stack([h.index_select(0, p).index_select(1, p) for h, p in zip(H, perm)])
    S, inv = S.contiguous(), inv.contiguous()
    U = _inverse_cholesky(H, damp)  # (G, in, in)
    code = _on(W.device, "nf4").to(cdt)
    codes = torch.empty(G, n, out, dtype=torch.int32, device=W.device)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = Wt[:, i1:i2]  # (G, b, out), a view: updated in place
        U1 = U[:, i1:i2, i1:i2]  # (G, b, b)
        err = torch.empty_like(W1)
        for k in range(i2 - i1):
            j = i1 + k
            w = W1[:, k]  # (G, out)
            q = _nf4_index(torch.clamp(w * inv[:, j], -1, 1))
            value = (code[q] * S[:, j]).to(dtype).to(cdt)  # what the checkpoint will dequantize to
            e = torch.div(w - value, U1[:, k, k, None], out=err[:, k])  # (G, out)
            if k + 1 < i2 - i1:  # the rest of the block: (G, b-k-1, 1) x (G, 1, out)
                W1[:, k + 1 :].baddbmm_(U1[:, k, k + 1 :, None], e[:, None, :], alpha=-1)
            codes[:, j] = q
        if i2 < n:  # the columns after the block: (G, in-i2, b) @ (G, b, out)
            Wt[:, i2:].baddbmm_(U[:, i1:i2, i2:].transpose(1, 2), err, alpha=-1)
    if perm is not None:
        codes = torch.empty_like(codes).scatter_(1, perm[:, :, None].expand(G, n, out), codes)
    codes = codes.transpose(1, 2).to(torch.uint8)
    return codes[0] if squeeze else codes


def quantize_gptq_many(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    like: Sequence[NF4Tensor] | None = None,
    blocksize: int = 64,
    double_quant: bool = True,
    dtype: torch.dtype | None = None,
    damp: float = DAMP,
    act_order: bool = True,
) -> list[NF4Tensor]:
    """NF4 of each weight of ``W`` (G, out, in) with GPTQ-chosen codes for its Hessian ``H`` (G, in, in).

    ``like``: one NF4 weight per weight whose stored scales (and blocksize, double quantization,
    dtype) are kept; without it the scales are those ``quantize_nf4`` picks for ``W`` and the
    weights dequantize to ``dtype`` (default: ``W``'s). Only the 4-bit codes differ from ``like``.
    """
    if like is None:
        start = quantize_nf4_many(W if dtype is None else W.to(dtype), blocksize=blocksize, double_quant=double_quant)
    else:
        start = list(like)
        if len(start) != W.shape[0] or any(q.shape != tuple(W.shape[1:]) for q in start):
            raise AdapterOpsError(f"{len(start)} NF4 weights to take scales from do not fit weights of shape {list(W.shape)}")
    bs = {q.blocksize for q in start}
    if len(bs) > 1:
        return [quantize_gptq_many(W[g : g + 1], H[g : g + 1], like=[q], damp=damp, act_order=act_order)[0] for g, q in enumerate(start)]
    scales = torch.stack([q.scales().to(W.device) for q in start])  # (G, blocks) float32
    target = dtype or (start[0].dtype if like is not None else W.dtype)
    Wc = W if W.dtype in (torch.float32, torch.float64) else W.float()
    codes = gptq_codes(Wc, H, scales, blocksize=bs.pop(), dtype=target, damp=damp, act_order=act_order)
    return [dataclasses.replace(q, codes=_pack(c.reshape(-1))) for q, c in zip(start, codes)]


def output_error_sq(E: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``||E X||_F^2 = tr(E H E^T)`` for ``E`` (..., out, in) and ``H = X X^T`` (..., in, in)."""
    return (torch.matmul(E, H.to(E.dtype)) * E).sum(dim=(-2, -1))


def relative_output_error(E: torch.Tensor, D: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``||E X|| / ||D X||``: the output error ``E`` leaves, relative to the effect of ``D``
    (a merge's delta, or a dense weight itself), for the inputs ``H = X X^T`` summarises."""
    return (output_error_sq(E, H) / output_error_sq(D, H)).clamp(min=0).sqrt()
