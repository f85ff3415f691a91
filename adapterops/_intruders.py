"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence", sec. 4) from the base's SVD and the adapter's factors, never a dense SVD of ``W + dW``.

The paper's definition: with ``W = U S Vh`` (thin, ``n = min(out, in)`` columns) and ``M = W + dW``,
take the top ``k`` left singular vectors ``m_j`` of ``M``; ``sim_j = max_i |<u_i, m_j>|`` over *all*
columns of ``U``; ``m_j`` is an intruder when ``sim_j < epsilon``.

The route here. Write ``dW = B A`` (``B`` already scaled, (out, r); ``A`` (r, in)) and let
``Ub = [U, P]`` with ``P`` an orthonormal basis of the part of ``col(B)`` outside ``col(U)`` (empty
when ``U`` is square, at most ``min(r, out - n)`` columns for a tall ``W``). Then ``M = Ub K`` with ``K = Ub^T M``
and, because ``U^T W = S Vh``, ``P^T W = 0`` and ``Vh Vh^T = I``::

    K K^T = diag(S^2, 0) + L C L^T,   L = Ub^T [W A^T, B]  (N, 2r),   C = [[0, I], [I, A A^T]]

so the left singular vectors of ``M`` are ``Ub y_j`` for the eigenvectors ``y_j`` of this
``N x N`` diagonal-plus-rank-2r matrix ``G`` (``N = n + cols(P)``), its eigenvalues are the squared
singular values, and ``sim_j = max_{i < n} |y_j[i]|`` because ``U^T Ub = [I, 0]``. ``G`` is applied
to a block of ``p`` vectors in ``O(N r p)``; its top ``k`` eigenpairs come from restarted block
Krylov iteration with Rayleigh-Ritz (``top_eigh``), started from the top base directions and ``L``,
run to a residual of ``1e-10 * lambda_1`` (a dense ``eigh`` of ``G`` where that stalls or ``N`` is small). Only ``U``,
``S`` and ``U^T W = S Vh`` of the base are needed (never ``W`` itself), which is what the on-disk cache keeps.

Every function is batched over a leading dimension and device-agnostic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import linalg

__all__ = ["base_svd", "MergedTop", "merged_top", "top_eigh", "shrink_directions"]

TOL = 1e-10  # eigen-residual, relative to the largest eigenvalue
MAX_RESTARTS = 100
KRYLOV_STEPS = 4  # blocks per Krylov space: 4 products with G per restart
DENSE_BELOW = 384  # N at or below which G is formed and solved densely
OVERSAMPLE = 16


def base_svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U`` (b, out, n), ``S`` (b, n), descending, and ``U^T W = S Vh`` (b, n, in) of a batch of base
    weights ``W`` (b, out, in): all that ``merged_top`` needs.

    From the float64 Gram matrix: ``eigh(W W^T)`` when ``out <= in``; otherwise ``eigh(W^T W) = V S^2 V^T``
    and ``U = W V S^-1`` -- or, when some ``s_i < 1e-5 s_1`` (a rank-deficient ``W``), ``U`` from a QR of
    ``W V``, which stays orthonormal there. In float64 the squared spectrum is exact to ``1e-16 s_1^2``:
    singular values above ``1e-5 s_1`` and their vectors come out at least as accurate as a float32
    ``svd``, and symmetric eigensolvers are several times faster than SVD drivers on GPUs. Returned
    in float32.
    """
    Wd = W.to(torch.float64)
    out, inp = W.shape[-2:]
    if out <= inp:
        evals, U = torch.linalg.eigh(Wd @ Wd.mT)  # (b, out, out), ascending
        U = U.flip(-1)
        S = evals.flip(-1).clamp_min(0).sqrt()
        UtW = U.mT @ Wd  # (b, n, in)
    else:
        evals, V = torch.linalg.eigh(Wd.mT @ Wd)  # (b, in, in)
        S = evals.flip(-1).clamp_min(0).sqrt()
        V = V.flip(-1)
        Y = Wd @ V  # (b, out, in): columns s_i u_i, descending
        if bool((S[..., -1] > 1e-5 * S[..., 0]).all()):
            U = Y / S[..., None, :]
        else:
            Q, R = torch.linalg.qr(Y)
            sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
            U = Q * torch.where(sign == 0, torch.ones_like(sign), sign)[..., None, :]
        UtW = U.mT @ Wd  # (b, n, in): S Vh, also where U came from the QR
    return U.to(torch.float32), S.to(torch.float32), UtW.to(torch.float32)


class MergedTop(NamedTuple):
    """Top ``k`` singular values and left singular vectors of ``W + dW``, and their similarity to ``U``."""

    values: torch.Tensor  # (b, k), descending
    similarity: torch.Tensor  # (b, k): max_i |<u_i, m_j>|
    left: torch.Tensor  # (b, out, k), in the original coordinates
    converged: torch.Tensor  # (b,) bool: False where the dense fallback ran


def merged_top(
    UtW: torch.Tensor, U: torch.Tensor, S: torch.Tensor, B: torch.Tensor, A: torch.Tensor, k: int, *, dense_below: int | None = None
) -> MergedTop:
    """The paper's quantities for ``M = W + B A``, batched: ``UtW = U^T W`` (b, n, in), ``U`` (b, out, n),
    ``S`` (b, n), ``B`` (b, out, r) scaled, ``A`` (b, r, in); ``k <= n``. See the module docstring.

    ``W`` itself is not needed: ``L = Ub^T [W A^T, B]`` has ``U^T W A^T = (U^T W) A^T`` on top and
    ``P^T W A^T = 0`` below (``P`` is orthogonal to ``col(W)``)."""
    b, out, n = U.shape
    r = A.shape[-2]
    cdt = torch.float32
    UtW, U, B, A = UtW.to(cdt), U.to(cdt), B.to(cdt), A.to(cdt)
    L = torch.cat([UtW @ A.mT, U.mT @ B], dim=-1).double()  # (b, n, in) @ (b, in, r) | (b, n, r) -> (b, n, 2r)
    D = S.double() ** 2  # (b, n)
    P = None
    if n < out:  # tall W: col(U) is not everything, add the part of col(B) outside it
        q = min(r, out - n)
        R = B - U @ (U.mT @ B)
        R = R - U @ (U.mT @ R)  # projecting twice is enough (Giraud et al. 2005)
        P = torch.linalg.svd(R, full_matrices=False)[0][..., :q]  # (b, out, q): spans col(R)
        P, _ = torch.linalg.qr(P - U @ (U.mT @ P))
        tail = torch.cat([torch.zeros(b, q, r, dtype=cdt, device=B.device), P.mT @ B], dim=-1)  # P^T W A^T = 0
        L = torch.cat([L, tail.double()], dim=-2)  # (b, n + q, 2r)
        D = torch.cat([D, D.new_zeros(b, q)], dim=-1)
    Ad = A.double()
    C = torch.zeros(b, 2 * r, 2 * r, dtype=torch.float64, device=A.device)
    eye = torch.eye(r, dtype=torch.float64, device=A.device)
    C[:, :r, r:] = eye
    C[:, r:, :r] = eye
    C[:, r:, r:] = Ad @ Ad.mT  # (b, r, r)
    evals, Y, converged = top_eigh(D, L, C, k, dense_below=dense_below)
    similarity = Y[:, :n, :].abs().amax(dim=-2)  # (b, k)
    Yf = Y.to(cdt)
    left = U @ Yf[:, :n, :]  # (b, out, k)
    if P is not None:
        left = left + P @ Yf[:, n:, :]
    return MergedTop(evals.clamp_min(0).sqrt().float(), similarity.float(), left, converged)


def _apply(D: torch.Tensor, L: torch.Tensor, C: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``G X = D X + L C L^T X``: (b, N, p) in O(N r p)."""
    return D[..., None] * X + L @ (C @ (L.mT @ X))


def top_eigh(
    D: torch.Tensor, L: torch.Tensor, C: torch.Tensor, k: int, *, dense_below: int | None = None, tol: float = TOL, max_restarts: int = MAX_RESTARTS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``k`` eigenpairs of ``G = diag(D) + L C L^T`` (symmetric), batched.

    ``D`` (b, N) with the large entries first, ``L`` (b, N, m), ``C`` (b, m, m). Block Krylov with
    thick restarts: from a block ``X`` of ``p`` orthonormal vectors, build ``[X, G X, ..., G^(s-1) X]``
    (each block orthogonalised against the ones before, twice), take Rayleigh-Ritz over that space,
    and restart from the top ``p`` Ritz vectors until the top ``k`` residuals ``||G x - theta x||``
    are below ``tol * theta_1``. Krylov spaces hold the best polynomial filter of their degree, so
    clustered spectra (random-matrix-like top singular values) converge in a few restarts.
    Returns eigenvalues (b, k) descending, eigenvectors (b, N, k), and whether it converged (b,)
    (where not, a dense ``eigh`` of ``G`` answered).
    """
    b, N = D.shape
    m = L.shape[-1]
    p = min(N, k + m + OVERSAMPLE)
    if N <= max(DENSE_BELOW if dense_below is None else dense_below, KRYLOV_STEPS * p):
        evals, vecs = _dense_top(D, L, C, k)
        return evals, vecs, torch.ones(b, dtype=torch.bool, device=D.device)
    start = torch.zeros(b, N, p - m, dtype=D.dtype, device=D.device)
    diag = torch.arange(p - m, device=D.device)
    start[:, diag, diag] = 1.0  # the top base directions ...
    X = _orthonormal(torch.cat([start, L], dim=-1))  # ... and the span of the update
    for _ in range(max_restarts):
        blocks, images = [X], []
        for step in range(KRYLOV_STEPS):
            Y = _apply(D, L, C, blocks[-1])  # (b, N, p)
            images.append(Y)
            if step == KRYLOV_STEPS - 1:
                break
            Q = torch.cat(blocks, dim=-1)
            for _ in range(2):  # classical Gram-Schmidt, twice (Giraud et al. 2005)
                Y = Y - Q @ (Q.mT @ Y)
            Y = _orthonormal(Y)
            Y = _orthonormal(Y - Q @ (Q.mT @ Y))  # once more after QR: stays orthogonal when Y was ~0
            blocks.append(Y)
        Q, GQ = torch.cat(blocks, dim=-1), torch.cat(images, dim=-1)  # (b, N, s p)
        H = Q.mT @ GQ
        theta, Z = torch.linalg.eigh((H + H.mT) / 2)  # Rayleigh-Ritz, ascending
        theta, Z = theta.flip(-1)[:, :p], Z.flip(-1)[..., :p]
        X, GX = Q @ Z, GQ @ Z
        residual = torch.linalg.vector_norm(GX[..., :k] - X[..., :k] * theta[:, None, :k], dim=-2)  # (b, k)
        done = residual.amax(dim=-1) <= tol * theta[:, 0].abs().clamp_min(torch.finfo(D.dtype).tiny)
        if bool(done.all()):
            break
    evals, vecs = theta[:, :k], X[..., :k]
    if not bool(done.all()):  # did not converge (or lost orthogonality): solve those densely
        idx = (~done).nonzero().flatten()
        e2, v2 = _dense_top(D[idx], L[idx], C[idx], k)
        evals, vecs = evals.clone(), vecs.clone()
        evals[idx], vecs[idx] = e2, v2
    return evals, vecs, done


def _dense_top(D: torch.Tensor, L: torch.Tensor, C: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    G = torch.diag_embed(D) + L @ C @ L.mT  # (b, N, N)
    evals, vecs = torch.linalg.eigh((G + G.mT) / 2)
    return evals.flip(-1)[:, :k], vecs.flip(-1)[..., :k]


def shrink_directions(
    W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, left: torch.Tensor, scale: float, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of rank ``rank`` for ``dW' = dW - (1 - scale) Q Q^T (W + dW)``, one layer.

    ``Q`` (out, t): orthonormal left singular vectors of ``M = W + dW`` (the intruders). Since
    ``Q Q^T M = sum_j s_j q_j v_j^T``, this scales those singular components of ``M`` by ``scale``,
    leaving ``W`` and the rest of ``M`` alone (the mitigation of Shuttleworth et al. 2024, sec. 6).
    In factored form ``dW' = [B - c Q (Q^T B), -c Q] @ [A; Q^T W]`` with ``c = 1 - scale``, rank
    ``r + t``; the best rank-``rank`` approximation (Eckart-Young, ``linalg.factored_svd``) follows.
    ``W`` (out, in), ``B`` (out, r) scaled, ``A`` (r, in). Returns ``B'`` (out, k), ``A'`` (k, in), ``k <= rank``.
    """
    c = 1.0 - scale
    Bx = torch.cat([B - c * left @ (left.mT @ B), -c * left], dim=-1)  # (out, r + t)
    Ax = torch.cat([A, left.mT @ W], dim=-2)  # (r + t, in)
    U, S, Vh = linalg.factored_svd(Bx, Ax)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    return U[:, :k] * root, root[:, None] * Vh[:k]


def _orthonormal(Y: torch.Tensor, *, cholesky: bool | None = None) -> torch.Tensor:
    """An orthonormal basis of the columns of each ``Y`` (b, N, p), ``N >= p``, of the same shape.

    With ``cholesky`` (default: on a GPU, where cuSOLVER's QR runs one matrix at a time), Cholesky
    QR twice (Yamamoto et al. 2015): batched Gram matrices, Cholesky factors and triangular solves.
    That is exact only for well-conditioned blocks, so each result is checked
    (``max |Q^T Q - I| <= 1e-12``) and a block that fails (near rank deficiency, say) gets
    Householder QR instead, as every block does without ``cholesky``.
    """
    if not (Y.is_cuda if cholesky is None else cholesky):
        return torch.linalg.qr(Y)[0]
    eye = torch.eye(Y.shape[-1], dtype=Y.dtype, device=Y.device)
    Q, ok = Y, torch.ones(Y.shape[0], dtype=torch.bool, device=Y.device)
    for _ in range(2):
        Lc, info = torch.linalg.cholesky_ex(Q.mT @ Q)
        ok &= info == 0
        Lc = torch.where(ok[:, None, None], Lc, eye)  # a failed block goes on harmlessly and is replaced below
        Q = torch.linalg.solve_triangular(Lc.mT, Q, upper=True, left=False)  # Q_new L^T = Q
    error = (Q.mT @ Q - eye).abs().amax(dim=(-2, -1))
    bad = ~(ok & (error <= 1e-12))
    if bool(bad.any()):
        Q = Q.clone()
        Q[bad] = torch.linalg.qr(Y[bad])[0]
    return Q
