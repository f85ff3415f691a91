"""LoRA-native merge methods: KnOTS, core space and TSV, computed from the factors alone.

Every method here works on the low-rank factors of each layer and never forms an (out, in) delta:
the shared bases come from QR of the stacked factors and SVDs of small cores, so a layer costs
O((out + in) R^2 + R^3) for a total input rank ``R = r_1 + ... + r_n``, and the elementwise merge
(TIES, DARE from ``sparsify``) runs on R x in or R x R coordinates. Layers of equal shape (and
equal input ranks) go through the linear algebra as one batch on the device, and those of them that
keep equally many directions through the elementwise merge as one batch (one item per task and
layer). Basis signs are fixed (``_canonical_signs``) so that results do not depend on the SVD route.

With task deltas ``dW_i = s_i B_i A_i`` (``s_i`` the LoRA scale) and weights ``w_i``:

- KnOTS (Stoica et al. 2024, "Model merging with SVD to tie the KnOTS", sec. 4): the SVD of the
  concatenation ``[dW_1 ... dW_n] = U S [V_1^T ... V_n^T]`` gives every task in one basis,
  ``dW_i = U (S V_i^T)``; the task coordinates ``S V_i^T`` (k, in) are merged, and the result is
  ``U merge(S V_i^T)``. As in the authors' code, the singular values sit on the V side
  (``s_on_V``) and the concatenation runs along the input axis (``concat_across_output``). TIES'
  trim is per layer and task, as mergekit and PEFT trim each tensor; the authors' code trims each
  task over all its layers at once (the same at their LLM setting, ``density=1``).
- Core space (Panariello et al. 2025, "Accurate and efficient low-rank model merging in core
  space", sec. 3): reference bases ``U_B`` (left singular vectors of ``[B_1 ... B_n]``) and ``V_A``
  (right singular vectors of ``[A_1; ...; A_n]``) hold every task exactly:
  ``dW_i = U_B M_i V_A^T`` with the small core ``M_i = U_B^T dW_i V_A`` (R x R). Cores are merged
  and ``U_B merge(M_i) V_A^T`` is the result; a linear merge there is the exact weighted sum.
  The bases are the singular vectors the authors use (their code), computed here through QR; an
  elementwise merge does not change when a basis vector flips sign, so the SVD's sign choice is
  immaterial.
- TSV (Gargiulo et al. 2025, "Task singular vectors: reducing task interference in model
  merging", sec. 4, TSV-Merge): each task's truncated SVD ``U_i S_i V_i^T``; the concatenated
  bases ``[U_1 ... U_n]`` and ``[V_1 ... V_n]`` are replaced by their nearest orthonormal matrices
  (orthogonal Procrustes: ``X = P Sigma Q^T -> P Q^T``), and ``U_perp diag(w_i S_i) V_perp^T`` is
  the merge.

Weights enter as in mergekit and the authors' code: the elementwise merges receive them
(``sparsify.ties_merge(x, weights, ...)``), the linear core merge is ``sum w_i M_i``, and TSV scales
each task's singular values by ``w_i``.

Missing layers: a layer present in only some adapters is merged from the tasks that have it. For
every method here that equals treating the absent task as a zero delta (its coordinates are zero:
TIES and DARE leave zeros out of the sign election and the disjoint mean, and add nothing to a sum).

The merged layer is re-compressed optimally (Eckart-Young) under the ``rule`` that ``blend`` passes,
through ``Adapter.compress``; ``metadata["blend"]`` reports each layer's kept rank and energy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import linalg
from ..adapter import Adapter, LoraLayer, _check_same_shape, _combined_metadata, _result_dtype
from ..errors import AdapterOpsError
from . import register_method, sparsify
from .dense import _MISSING, _generators
from .dense import _options as _known_options

__all__ = ["knots_ties", "knots_dare", "core_linear", "core_ties", "core_dare", "tsv"]

Factors = tuple[torch.Tensor, torch.Tensor]  # (B (out, k), A (k, in)), scale 1


@dataclass(frozen=True)
class _Group:
    """Layers that share shape and input ranks, stacked: one batch for the linear algebra."""

    names: list[str]
    B: list[torch.Tensor]  # per present task: (L, out, r_i), LoRA scale folded in
    A: list[torch.Tensor]  # per present task: (L, r_i, in)
    weights: torch.Tensor  # (n,) weights of the present tasks

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B[0].shape[-2], self.A[0].shape[-1])


# ---------------------------------------------------------------------------------------------
# Options


def _density(value: Any) -> float:
    value = float(value)
    if not 0 < value <= 1:
        raise AdapterOpsError(f"density must be in (0, 1], got {value:g}")
    return value


def _majority_sign(value: Any) -> str:
    if value not in sparsify.MAJORITY_SIGNS:
        raise AdapterOpsError(f"majority_sign must be one of {', '.join(sparsify.MAJORITY_SIGNS)}, got {value!r}")
    return value


def _convention(value: Any) -> str:
    if value not in sparsify.CONVENTIONS:
        raise AdapterOpsError(f"convention must be one of {', '.join(sparsify.CONVENTIONS)}, got {value!r}")
    return value


def _flag(name: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is not None and not isinstance(value, bool):
            raise AdapterOpsError(f"{name} must be true or false, got {value!r}")
        return value

    return check


def _fraction(value: Any) -> float:
    value = float(value)
    if not 0 < value <= 1:
        raise AdapterOpsError(f"fraction must be in (0, 1], got {value:g}")
    return value


_CHECKS = {"density": _density, "majority_sign": _majority_sign, "convention": _convention, "ties": _flag("ties"),
           "normalize": _flag("normalize"), "fraction": _fraction}


def _options(method: str, given: Mapping[str, Any], known: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` checked against ``known`` (name -> default; required ones as in ``dense``), values checked."""
    values = _known_options(method, given, known)
    return {name: _CHECKS[name](value) for name, value in values.items()}


_SPARSIFY = {"majority_sign": "total", "convention": "mergekit", "normalize": None}
_TIES_OPTIONS = {"density": _MISSING, **_SPARSIFY}
_DARE_OPTIONS = {"density": _MISSING, "ties": True, **_SPARSIFY}


# ---------------------------------------------------------------------------------------------
# Elementwise merges of stacked task coordinates x (n, L, a, b) -> (L, a, b): one item per (task, layer)

Combine = Callable[[torch.Tensor, torch.Tensor, list[torch.Generator], Mapping[str, Any]], torch.Tensor]


def _sparsify_knobs(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: options[k] for k in _SPARSIFY}


def _ties(x: torch.Tensor, weights: torch.Tensor, generators: list[torch.Generator], options: Mapping[str, Any]) -> torch.Tensor:
    return sparsify.ties_merge(x, weights, density=options["density"], item_dims=2, **_sparsify_knobs(options))


def _dare(x: torch.Tensor, weights: torch.Tensor, generators: list[torch.Generator], options: Mapping[str, Any]) -> torch.Tensor:
    return sparsify.dare_merge(x, weights, density=options["density"], generator=generators, ties=options["ties"],
                               item_dims=2, **_sparsify_knobs(options))


def _linear(x: torch.Tensor, weights: torch.Tensor, generators: list[torch.Generator], options: Mapping[str, Any]) -> torch.Tensor:
    return torch.einsum("n,n...->...", weights, x)  # sum_i w_i x_i


# ---------------------------------------------------------------------------------------------
# Grouping layers and the shared finish


def _groups(adapters: Sequence[Adapter], weights: Sequence[float], device: torch.device | None) -> list[_Group]:
    """Layers grouped by (shape, which tasks hold them and at what rank, dtype), factors stacked."""
    names = list(dict.fromkeys(n for a in adapters for n in a))
    keyed: dict[tuple, list[str]] = {}
    for name in names:
        present = [i for i, a in enumerate(adapters) if name in a]
        layers = [adapters[i][name] for i in present]
        _check_same_shape(name, layers)
        key = (layers[0].shape, tuple((i, adapters[i][name].rank) for i in present), _result_dtype(layers))
        keyed.setdefault(key, []).append(name)
    groups = []
    for (_, tasks, _), members in keyed.items():
        first = adapters[tasks[0][0]][members[0]]
        dev = first.A.device if device is None else torch.device(device)
        cdt = linalg.compute_dtype(*(t for i, _ in tasks for n in members for t in (adapters[i][n].A, adapters[i][n].B)))
        Bs, As = [], []
        for i, _ in tasks:
            folded = [adapters[i][n].folded(dtype=cdt) for n in members]
            Bs.append(torch.stack([f[0] for f in folded]).to(dev))  # (L, out, r_i)
            As.append(torch.stack([f[1] for f in folded]).to(dev))  # (L, r_i, in)
        w = torch.tensor([float(weights[i]) for i, _ in tasks], dtype=cdt, device=dev)
        groups.append(_Group(members, Bs, As, w))
    return groups


def _finish(
    method: str,
    options: Mapping[str, Any],
    adapters: Sequence[Adapter],
    merged: Mapping[str, Factors],
    rule: Mapping[str, Any],
    device: torch.device | None,
) -> Adapter:
    """Re-compress the merged factors under ``rule`` and attach the ``blend`` report."""
    order = [n for n in dict.fromkeys(n for a in adapters for n in a) if n in merged]
    exact = Adapter({n: LoraLayer(merged[n][1], merged[n][0], float(merged[n][1].shape[0])) for n in order})
    kept = exact.compress(**rule, device=device) if rule else exact
    before, after = exact.norm(per_layer=True), kept.norm(per_layer=True)
    report = {}
    for name in dict.fromkeys(n for a in adapters for n in a):
        total = before.get(name, 0.0) ** 2
        share = 1.0 if total == 0 else after.get(name, 0.0) ** 2 / total
        report[name] = {"rank": kept[name].rank if name in kept else 0, "energy_kept": min(share, 1.0)}
    layers = {}
    for name, layer in kept.items():
        dtype = _result_dtype([adapters[i][name] for i in range(len(adapters)) if name in adapters[i]])
        layers[name] = layer.to(dtype=dtype)
    meta = _combined_metadata(adapters)
    meta["blend"] = {"method": method, "options": {k: v for k, v in options.items() if v is not None}, "layers": report}
    return Adapter(layers, meta)


def _canonical_signs(U: torch.Tensor) -> torch.Tensor:
    """Signs (..., 1, k) that make each column's largest-magnitude entry positive.

    A singular vector is defined up to sign, and LAPACK's choice differs between routes and
    devices; TIES breaks exact vote ties (an even ``"frequency"`` split, a zero ``"total"``) towards
    ``+``, so the basis signs are fixed here to keep results independent of how they were computed.
    """
    peak = torch.gather(U, -2, U.abs().argmax(dim=-2, keepdim=True))  # (..., 1, k)
    return torch.where(peak < 0, -1.0, 1.0).to(U.dtype)


def _trim(S: torch.Tensor, shape: tuple[int, int], floor: float = 0.0) -> int:
    return linalg.numerical_rank(S, shape, floor=floor)


# ---------------------------------------------------------------------------------------------
# KnOTS


def _knots_batches(group: _Group) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """``(layers, U (L', out, k), S V_i^T stacked (n, L', k, in))`` for layers keeping ``k`` directions.

    ``[dW_1 ... dW_n] = [B_1 ... B_n] blockdiag(A_1, ..., A_n)``; with ``[B_1 ... B_n] = Qb Rb`` and
    ``A_i^T = Qa_i Ra_i`` the concatenation is ``Qb [Rb_1 Ra_1^T ... Rb_n Ra_n^T] blockdiag(Qa_i^T)``,
    so the SVD of the small core ``[Rb_i Ra_i^T]_i = Uc S Vc^T`` gives ``U = Qb Uc`` and
    ``V_i^T = Vc_i^T Qa_i^T``. Singular values at round-off level are dropped (as the authors drop
    ``S <= 1e-5``), so rank-deficient stacks give one well-defined basis.
    """
    Bcat = torch.cat(group.B, dim=-1)  # (L, out, R)
    Qb, Rb = torch.linalg.qr(Bcat)  # (L, out, m), (L, m, R)
    Rb_blocks = torch.split(Rb, [B.shape[-1] for B in group.B], dim=-1)  # (L, m, r_i)
    QRa = [torch.linalg.qr(A.mT) for A in group.A]  # (L, in, n_i), (L, n_i, r_i)
    core = torch.cat([Rbi @ Rai.mT for Rbi, (_, Rai) in zip(Rb_blocks, QRa)], dim=-1)  # (L, m, sum n_i)
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)  # (L, m, k), (L, k), (L, k, sum n_i)
    U = Qb @ Uc  # (L, out, k)
    flip = _canonical_signs(U)  # (L, 1, k)
    U, Vch = U * flip, Vch * flip.mT
    Vh_blocks = torch.split(Vch, [Rai.shape[-2] for _, Rai in QRa], dim=-1)  # (L, k, n_i)
    coords = torch.stack([S[..., None] * (Vhi @ Qai.mT) for Vhi, (Qai, _) in zip(Vh_blocks, QRa)])  # (n, L, k, in)
    floors = linalg.noise_floor(Bcat, torch.cat(group.A, dim=-2)).tolist()  # same norms as blockdiag(A_i)
    out, inp = group.shape
    spectra = S.cpu()
    kept = [(_trim(spectra[j], (out, inp * len(group.A)), floor),) for j, floor in enumerate(floors)]
    for (k,), rows in _batches(kept):
        if k == 0:
            continue
        idx = torch.tensor(rows, device=U.device)
        yield rows, U[idx, :, :k], coords[:, idx, :k]


def _batches(sizes: Sequence[tuple[int, ...]]) -> Iterator[tuple[tuple[int, ...], list[int]]]:
    """Layer indices grouped by the sizes they keep: each group merges as one batch."""
    found: dict[tuple[int, ...], list[int]] = {}
    for layer, size in enumerate(sizes):
        found.setdefault(size, []).append(layer)
    yield from found.items()


def _knots(method: str, combine: Combine, known: Mapping, adapters, weights, *, rule, seed, device, **options) -> Adapter:
    opts = _options(method, options, known)
    merged: dict[str, Factors] = {}
    for group in _groups(adapters, weights, device):
        for rows, U, x in _knots_batches(group):
            names = [group.names[j] for j in rows]
            generators = _generators(seed, names, x.shape[0], x.device, "mask")  # per (task, layer), from (seed, layer)
            X = combine(x, group.weights, generators, opts)  # (n, L', k, in) -> (L', k, in)
            merged.update({name: (U[j], X[j]) for j, name in enumerate(names)})  # (out, k), (k, in)
    return _finish(method, opts, adapters, merged, rule, device)


@register_method("knots_ties")
def knots_ties(adapters: Sequence[Adapter], weights: Sequence[float], *, rule: Mapping[str, Any], seed: int = 0,
               device: torch.device | None = None, **options: Any) -> Adapter:
    """KnOTS-TIES (Stoica et al. 2024): TIES on the task coordinates in the concatenation's SVD basis.

    ``[dW_1 ... dW_n] = U S [V_1^T ... V_n^T]``;  result ``U ties(S V_1^T, ..., S V_n^T)``, where
    ``ties`` trims each task to its top ``density`` entries by magnitude, elects a sign per entry
    (``majority_sign``: ``"total"`` mass or ``"frequency"``) and takes the disjoint mean (Yadav et al.
    2023). Options: ``density`` (required; the authors use 1.0, no trimming, for LLMs),
    ``majority_sign`` (default ``"total"``), ``convention`` and ``normalize`` (see ``sparsify``).
    """
    return _knots("knots_ties", _ties, _TIES_OPTIONS, adapters, weights, rule=rule, seed=seed, device=device, **options)


@register_method("knots_dare")
def knots_dare(adapters: Sequence[Adapter], weights: Sequence[float], *, rule: Mapping[str, Any], seed: int = 0,
               device: torch.device | None = None, **options: Any) -> Adapter:
    """KnOTS-DARE (Stoica et al. 2024): DARE on the task coordinates in the concatenation's SVD basis.

    Each entry of ``S V_i^T`` is kept with probability ``density`` and rescaled by ``1 / density``
    (Yu et al. 2024), then the tasks are combined with TIES' sign election and disjoint mean
    (``ties=True``, the authors' KnOTS-DARE-TIES) or summed with their weights (``ties=False``).
    Options: ``density`` (required), ``ties`` (default True), ``majority_sign``, ``convention``,
    ``normalize``. Seeded per layer and task by ``(seed, layer name)``, as the dense methods are.
    """
    return _knots("knots_dare", _dare, _DARE_OPTIONS, adapters, weights, rule=rule, seed=seed, device=device, **options)


# ---------------------------------------------------------------------------------------------
# Core space


def _singular_basis(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors (..., rows, m) and values of a tall stack, through ``X = Q R``, ``R = u s v^T``."""
    Q, R = torch.linalg.qr(X)  # (L, rows, m), (L, m, cols)
    u, s, _ = torch.linalg.svd(R, full_matrices=False)  # (L, m, m'), (L, m')
    basis = Q @ u
    return basis * _canonical_signs(basis), s


def _core_batches(group: _Group) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(layers, U_B (L', out, kb), V_A (L', in, ka), cores M_i stacked (n, L', kb, ka))``, by kept sizes."""
    UB, sb = _singular_basis(torch.cat(group.B, dim=-1))  # (L, out, m), (L, m): from [B_1 ... B_n]
    VA, sa = _singular_basis(torch.cat(group.A, dim=-2).mT)  # (L, in, n), (L, n): from [A_1; ...; A_n]
    cores = torch.stack([(UB.mT @ B) @ (A @ VA) for B, A in zip(group.B, group.A)])  # (m, r_i) @ (r_i, n) -> (n, L, m, n)
    out, inp = group.shape
    rank = sum(B.shape[-1] for B in group.B)
    sb, sa = sb.cpu(), sa.cpu()
    kept = [(_trim(sb[j], (out, rank)), _trim(sa[j], (inp, rank))) for j in range(len(group.names))]
    for (kb, ka), rows in _batches(kept):
        if kb == 0 or ka == 0:
            continue
        idx = torch.tensor(rows, device=UB.device)
        yield rows, UB[idx, :, :kb], VA[idx, :, :ka], cores[:, idx, :kb, :ka]


def _core(method: str, combine: Combine, known: Mapping, adapters, weights, *, rule, seed, device, **options) -> Adapter:
    opts = _options(method, options, known)
    merged: dict[str, Factors] = {}
    for group in _groups(adapters, weights, device):
        for rows, UB, VA, cores in _core_batches(group):
            names = [group.names[j] for j in rows]
            generators = _generators(seed, names, cores.shape[0], cores.device, "mask")  # per (task, layer)
            M = combine(cores, group.weights, generators, opts)  # (n, L', kb, ka) -> (L', kb, ka)
            B = UB @ M  # (L', out, kb) @ (L', kb, ka) -> (L', out, ka)
            merged.update({name: (B[j], VA[j].mT) for j, name in enumerate(names)})  # (out, ka), (ka, in)
    return _finish(method, opts, adapters, merged, rule, device)


@register_method("core_linear")
def core_linear(adapters: Sequence[Adapter], weights: Sequence[float], *, rule: Mapping[str, Any], seed: int = 0,
                device: torch.device | None = None, **options: Any) -> Adapter:
    """Linear merge in core space (Panariello et al. 2025): ``U_B (sum_i w_i M_i) V_A^T``.

    Exactly ``sum_i w_i dW_i`` (the bases span every task); like ``linear`` it is re-compressed
    only when a rule is asked for. No options.
    """
    return _core("core_linear", _linear, {}, adapters, weights, rule=rule, seed=seed, device=device, **options)


core_linear.exact_by_default = True  # blend passes no rule unless one was asked for


@register_method("core_ties")
def core_ties(adapters: Sequence[Adapter], weights: Sequence[float], *, rule: Mapping[str, Any], seed: int = 0,
              device: torch.device | None = None, **options: Any) -> Adapter:
    """TIES in core space (Panariello et al. 2025): ``U_B ties(M_1, ..., M_n) V_A^T``.

    ``M_i = U_B^T dW_i V_A`` (R x R); ``ties`` as in ``knots_ties`` (Yadav et al. 2023).
    Options: ``density`` (required), ``majority_sign`` (default ``"total"``), ``convention``, ``normalize``.
    """
    return _core("core_ties", _ties, _TIES_OPTIONS, adapters, weights, rule=rule, seed=seed, device=device, **options)


@register_method("core_dare")
def core_dare(adapters: Sequence[Adapter], weights: Sequence[float], *, rule: Mapping[str, Any], seed: int = 0,
              device: torch.device | None = None, **options: Any) -> Adapter:
    """DARE in core space (Panariello et al. 2025): drop core entries w.p. ``1 - density``, rescale.

    Then TIES' sign election and disjoint mean (``ties=True``, default) or the weighted sum
    (``ties=False``). Options: ``density`` (required), ``ties``, ``majority_sign``, ``convention``,
    ``normalize``. Seeded per layer and task by ``(seed, layer name)``.
    """
    return _core("core_dare", _dare, _DARE_OPTIONS, adapters, weights, rule=rule, seed=seed, device=device, **options)


# ---------------------------------------------------------------------------------------------
# TSV


def _polar(X: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (or rows, if wide): ``X = P Sigma Q^T -> P Q^T``."""
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


@register_method("tsv")
def tsv(adapters: Sequence[Adapter], weights: Sequence[float], *, rule: Mapping[str, Any], seed: int = 0,
        device: torch.device | None = None, **options: Any) -> Adapter:
    """TSV-Merge (Gargiulo et al. 2025): decorrelated task singular vectors, then summed.

    Per layer and task, ``dW_i ~ U_i S_i V_i^T`` keeping the top ``ceil(fraction * rank_i)``
    singular triplets; with ``U = [U_1 ... U_n]``, ``V = [V_1 ... V_n]`` and
    ``S = blockdiag(w_i S_i)``, the merge is ``polar(U) S polar(V)^T`` where ``polar`` is the
    orthogonal Procrustes solution ``P Q^T`` of ``X = P Sigma Q^T``. The paper keeps ``1 / n`` of a
    full-rank task's spectrum; a LoRA task has only ``rank_i`` nonzero singular values, which that
    share covers whenever ``n * rank_i <= min(out, in)``, hence the default ``fraction=1.0``.
    """
    opts = _options("tsv", options, {"fraction": 1.0})
    merged: dict[str, Factors] = {}
    for group in _groups(adapters, weights, device):
        svds = [linalg.factored_svd(B, A) for B, A in zip(group.B, group.A)]  # (L, out, k_i), (L, k_i), (L, k_i, in)
        floors = [linalg.noise_floor(B, A).tolist() for B, A in zip(group.B, group.A)]
        spectra = [S.cpu() for _, S, _ in svds]
        kept = [tuple(math.ceil(opts["fraction"] * _trim(S[j], group.shape, f[j])) for S, f in zip(spectra, floors))
                for j in range(len(group.names))]
        for keep, rows in _batches(kept):
            if sum(keep) == 0:
                continue
            idx = torch.tensor(rows, device=group.weights.device)
            U = torch.cat([Ui[idx, :, :k] for (Ui, _, _), k in zip(svds, keep)], dim=-1)  # (L', out, C)
            Vh = torch.cat([Vhi[idx, :k] for (_, _, Vhi), k in zip(svds, keep)], dim=-2)  # (L', C, in)
            s = torch.cat([w * Si[idx, :k] for (_, Si, _), k, w in zip(svds, keep, group.weights)], dim=-1)  # (L', C)
            B, A = _polar(U) * s[:, None, :], _polar(Vh.mT).mT  # (L', out, C), (L', C, in)
            for j, layer in enumerate(rows):
                merged[group.names[layer]] = (B[j], A[j])
    return _finish("tsv", opts, adapters, merged, rule, device)
