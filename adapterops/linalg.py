"""Pure tensor functions on low-rank factors: SVD, inner products and rank selection.

A LoRA delta is ``B @ A`` with ``B`` (out, r) and ``A`` (r, in). Everything here works on the
factors and costs O((out + in) r^2 + r^3); the dense (out, in) matrix is never formed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .errors import AdapterOpsError

__all__ = [
    "compute_dtype",
    "factored_svd",
    "factored_inner",
    "numerical_rank",
    "noise_floor",
    "frobenius",
    "select_ranks",
    "RANK_RULES",
]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: never compute in half precision."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def factored_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``B @ A`` from its factors; batched over leading dimensions.

    ``B = Qb Rb`` and ``A.T = Qa Ra`` give ``B @ A = Qb (Rb Ra.T) Qa.T``, so the SVD of the small
    core ``Rb @ Ra.T = U S Vh`` yields ``B @ A = (Qb U) S (Vh Qa.T)``. Eckart-Young makes any
    truncation of it optimal in Frobenius and spectral norm.

    Returns ``U`` (..., out, k), ``S`` (..., k) descending, ``Vh`` (..., k, in) with
    ``k = min(out, in, r)``.
    """
    Qb, Rb = torch.linalg.qr(B)  # (out, m), (m, r) with m = min(out, r)
    Qa, Ra = torch.linalg.qr(A.mT)  # (in, n), (n, r) with n = min(in, r)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.mT, full_matrices=False)  # core (m, n)
    return Qb @ U, S, Vh @ Qa.mT  # (out, k), (k,), (k, in)


def factored_inner(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """Frobenius inner product ``<B1 A1, B2 A2> = sum((B1.T B2) * (A1 A2.T))``, batched."""
    return ((B1.mT @ B2) * (A1 @ A2.mT)).sum(dim=(-2, -1))  # (r1, r2) * (r1, r2)


def numerical_rank(S: torch.Tensor, shape: tuple[int, int], *, floor: float = 0.0) -> int:
    """Number of singular values above round-off.

    The tolerance is the larger of LAPACK's ``max(shape) * eps * S.max()`` and ``floor``: an absolute
    noise level for values computed from factors, where cancellation (``a + (-a)``) leaves singular
    values near ``eps * ||B||_F * ||A||_F`` however small ``S.max()`` is (see ``noise_floor``).
    """
    if S.numel() == 0:
        return 0
    info = torch.finfo(S.dtype)
    tol = max(float(S.max()) * max(shape) * info.eps, floor, info.tiny)  # below tiny: subnormal noise
    return int((S > tol).sum())


def noise_floor(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Round-off level of singular values of ``B @ A`` computed from the factors, batched.

    ``(r + 8) * eps * ||B||_F * ||A||_F`` with ``r`` the inner rank. Exact cancellations such as
    ``a - a`` leave singular values of up to about ``4 * eps * ||B|| ||A||`` (measured over random
    shapes up to 4096x4096, float32 and float64; largest at small ranks), so a value below this
    floor cannot be told from zero.
    """
    eps = torch.finfo(compute_dtype(B, A)).eps
    return (B.shape[-1] + 8) * eps * frobenius(B) * frobenius(A)


def frobenius(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm over the last two dims, batched; NaN where ``x`` holds NaN or Inf.

    One fused pass normally; where that under- or overflows (squares of entries beyond the dtype's
    range), the entries are scaled by their largest magnitude first.
    """
    norm = torch.linalg.vector_norm(x, dim=(-2, -1))
    redo = (norm == 0) | ~torch.isfinite(norm)
    if bool(redo.any()):
        peak = x.abs().amax(dim=(-2, -1))
        safe = torch.where((peak > 0) & torch.isfinite(peak), peak, torch.ones_like(peak))
        scaled = torch.linalg.vector_norm(x / safe[..., None, None], dim=(-2, -1)) * peak
        scaled = torch.where(torch.isfinite(peak), scaled, torch.full_like(scaled, float("nan")))
        norm = torch.where(redo, scaled, norm)
    return norm


RankRule = Callable[[Mapping[str, torch.Tensor], Mapping[str, int], float], dict[str, int]]
RANK_RULES: dict[str, RankRule] = {}


def _rule(name: str) -> Callable[[RankRule], RankRule]:
    def register(fn: RankRule) -> RankRule:
        RANK_RULES[name] = fn
        return fn

    return register


@_rule("rank")
def _fixed_rank(spectra, costs, value):
    k = int(value)
    if k < 0 or k != value:
        raise AdapterOpsError(f"rank must be a non-negative integer, got {value}")
    return {name: min(k, S.numel()) for name, S in spectra.items()}


@_rule("energy")
def _energy(spectra, costs, value):
    if not 0 < value <= 1:
        raise AdapterOpsError(f"energy must be in (0, 1], got {value}")
    ranks = {}
    for name, S in spectra.items():
        if S.numel() == 0:
            ranks[name] = 0
            continue
        kept = torch.cumsum(S.double() ** 2, 0)
        ranks[name] = min(int(torch.searchsorted(kept, value * kept[-1])) + 1, S.numel())
    return ranks


@_rule("budget")
def _budget(spectra, costs, value):
    """One singular-value threshold for the whole adapter; each kept value costs out + in params."""
    if value < 0:
        raise AdapterOpsError(f"budget must be a non-negative parameter count, got {value}")
    names = list(spectra)
    values = torch.cat([spectra[n].double().cpu() for n in names]) if names else torch.zeros(0)
    owner = torch.cat([torch.full((spectra[n].numel(),), i) for i, n in enumerate(names)]) if names else torch.zeros(0)
    order = torch.argsort(values, descending=True, stable=True)
    cost = torch.tensor([float(costs[names[i]]) for i in owner[order].tolist()], dtype=torch.float64)
    keep = int((torch.cumsum(cost, 0) <= value).sum())
    counts = torch.bincount(owner[order][:keep].long(), minlength=len(names))
    return {n: int(counts[i]) for i, n in enumerate(names)}


def select_ranks(
    spectra: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    *,
    rule: str,
    value: float,
    floors: Mapping[str, float] | None = None,
) -> dict[str, int]:
    """Rank to keep per layer under one of ``RANK_RULES``, never above the numerical rank.

    ``floors`` gives each layer's absolute round-off level (``noise_floor``); values below it count as zero.
    """
    if rule not in RANK_RULES:
        raise AdapterOpsError(f"unknown rank rule {rule!r}; choose one of {sorted(RANK_RULES)}")
    floors = floors or {}
    trimmed = {n: S[: numerical_rank(S, shapes[n], floor=floors.get(n, 0.0))] for n, S in spectra.items()}
    costs = {n: shapes[n][0] + shapes[n][1] for n in spectra}
    return RANK_RULES[rule](trimmed, costs, value)
