"""Merge methods on dense deltas: TIES, DARE, DELLA, breadcrumbs, magnitude prune (and ``linear``).

Each layer's task deltas ``dW_i = s_i B_i A_i`` (``s_i`` the LoRA scale, an absent layer a zero
delta) are stacked, merged elementwise by ``sparsify``, and the merged (out, in) delta ``M`` is
re-compressed to LoRA factors by the ``rule`` (Eckart-Young: the best approximation of ``M`` under
it). One chunk of equal-shape layers is dense on the device at a time, never the whole adapter:
as many layers as fit a memory budget go through the merge and the SVD as one batch.

The re-compression of ``M`` (out, in) to rank ``k``:

- ``svd="randomized"`` (the default for the rank rule when ``min(out, in) > 4 l``): randomized
  subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4) with ``l = 2k + 8`` columns and
  ``q = 8`` iterations, then the exact SVD of ``Q^T M`` (l, in). The result is ``P P^T M`` for an
  orthonormal ``P`` (out, k), so its error is exactly ``||M||^2 - sum S_k^2`` and never below the
  optimum. Bound, checked by the tests on spectra without a gap at ``k`` (the hard case) and
  measured by ``benchmarks/bench_methods.py``: ``||M - M~_k||_F <= (1 + 1e-3) ||M - M_k||_F``.
  It is a probabilistic bound (gap-free analyses: Musco & Musco 2015, Thm 1): pass
  ``svd="exact"`` for the exact truncation.
- ``svd="exact"``: ``torch.linalg.svd`` of ``M``, as PEFT does; always used by the ``energy``
  rule (it needs the whole spectrum) and for the spectra of the ``budget`` rule, which first
  collects every layer's singular values (one pass), picks one global threshold, then merges
  again and truncates each layer to its share (a second pass, same masks from the same seeds).

Missing layers: an adapter without a layer contributes a zero delta there. For the TIES-type
methods a zero takes no part in the sign vote or the disjoint mean, so the layer is merged from the
adapters that have it, as PEFT does; for the sums (``dare_linear``, ``breadcrumbs``,
``magnitude_prune``) a zero adds nothing.

Randomness (DARE, DELLA, and the randomized SVD's test matrix) is seeded per layer and task from
``(seed, layer name)``, so a result is reproducible and does not depend on batching; masks drawn
on CUDA differ from those drawn on the CPU (different generators).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from .. import linalg
from ..adapter import Adapter, LoraLayer, _check_same_shape, _combined_metadata, _exact_sum, _result_dtype
from ..errors import AdapterOpsError
from . import register_method, sparsify

__all__ = [
    "linear",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "della",
    "della_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "SVD_MODES",
]

SVD_MODES = ("auto", "randomized", "exact")
OVERSAMPLE = 8  # l = 2k + OVERSAMPLE columns in the randomized range finder
POWER_ITERATIONS = 8
CPU_CHUNK_BYTES = 1 << 30  # working memory of one chunk of layers on the CPU
WORKING_COPIES = 16  # temporaries per stacked delta entry (masks, signs, sort indices)

Combine = Callable[[torch.Tensor, torch.Tensor, list[torch.Generator] | None], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Options


_MISSING = object()


def _options(method: str, given: Mapping[str, Any], known: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` checked against ``known`` (name -> default, ``_MISSING`` when required)."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise AdapterOpsError(f"{method} does not take {', '.join(unknown)}; its options: {', '.join(known) or 'none'}")
    missing = [name for name, default in known.items() if default is _MISSING and given.get(name) is None]
    if missing:
        raise AdapterOpsError(f"{method} needs {', '.join(missing)} (e.g. density=0.5: the fraction of each delta kept)")
    values = {name: given[name] if given.get(name) is not None else default for name, default in known.items()}
    for name, value in values.items():
        if name not in _KINDS or value is None:
            continue
        types, what = _KINDS[name]
        if not isinstance(value, types) or isinstance(value, bool) and types is not bool:
            raise AdapterOpsError(f"{method}: {name} must be {what}, got {value!r}")
    if values.get("svd", "auto") not in SVD_MODES:
        raise AdapterOpsError(f"svd must be one of {', '.join(SVD_MODES)}, got {values['svd']!r}")
    return values


_KINDS = {  # option -> (accepted types, what to say)
    "density": ((int, float), "a number in (0, 1]"),
    "epsilon": ((int, float), "a number"),
    "gamma": ((int, float), "a number in [0, 1)"),
    "normalize": (bool, "true or false"),
    "majority_sign": (str, "total or frequency"),
    "convention": (str, "mergekit or peft"),
    "svd": (str, "auto, randomized or exact"),
}


_SIGNED = {"majority_sign": "total"}
_CONVENTION = {"convention": "mergekit", "normalize": None}
_COMMON = {"svd": "auto"}


def _sparsified(method: str, merge: Callable[..., torch.Tensor], known: Mapping[str, Any], adapters, weights, *,
                rule, seed, device, options, ties: bool | None = None, random: bool = False) -> Adapter:
    """Run a ``sparsify`` merge (with its options ``known``) through the dense loop.

    ``ties`` (True/False) is passed on to the families that have both variants; with it, the
    sign-election option is accepted too. ``random`` merges receive one generator per item.
    """
    known = {**known, **(_SIGNED if ties else {}), **_COMMON}
    values = _options(method, options, known)
    knobs = {n: values[n] for n in known if n not in _COMMON}
    if ties is not None:
        knobs["ties"] = ties

    def combine(x: torch.Tensor, w: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
        return merge(x, w, item_dims=2, **({"generator": generators} if random else {}), **knobs)

    return _dense(method, values, adapters, weights, combine, rule=rule, seed=seed, device=device, random=random)


# ---------------------------------------------------------------------------------------------
# The methods


@register_method("linear")
def linear(adapters: Sequence[Adapter], weights: Sequence[float], *, rule: Mapping[str, Any] | None, seed: int = 0,
           device: torch.device | None = None, **options: Any) -> Adapter:
    """Task arithmetic (Ilharco et al. 2023): ``sum_i w_i dW_i``, exact in factored form.

    Without a rule the ranks concatenate (nothing is lost); with one, the sum is re-compressed
    from its factors (``Adapter.compress``, exact Eckart-Young, no dense delta).
    """
    _options("linear", options, {})
    exact = _exact_sum(adapters, weights)
    if rule is None:
        return exact
    spectra = exact.to(device=device)._factored_svd(device)
    per_layer = {n: (U, S, Vh, float((S.double() ** 2).sum()), floor) for n, (U, S, Vh, floor) in spectra.items()}
    ranks = _select(per_layer, {n: layer.shape for n, layer in exact.items()}, rule)
    kept = {n: (f[0], f[1], f[2], f[3], ranks[n]) for n, f in per_layer.items()}
    return _assemble("linear", {}, adapters, kept)


@register_method("ties")
def ties(adapters: Sequence[Adapter], weights: Sequence[float], *, rule: Mapping[str, Any], seed: int = 0,
         device: torch.device | None = None, **options: Any) -> Adapter:
    """TIES-Merging (Yadav et al. 2023, sec. 3): trim, elect sign, disjoint merge, per layer.

    ``dW~_i = dW_i * top_density(|dW_i|)``; ``s = sign(sum_i w_i dW~_i)``;
    ``M = sum_i [sign(w_i dW~_i) = s] w_i dW~_i / sum_i [..] w_i`` (mergekit; ``normalize=False``
    skips the division). ``convention="peft"`` votes on the unweighted ``dW~_i`` and divides by the
    agreeing count (PEFT's ``ties_svd``). Options: ``density`` (required), ``majority_sign``
    (``total`` | ``frequency``), ``convention``, ``normalize``, ``svd``.
    """
    return _sparsified("ties", sparsify.ties_merge, {"density": _MISSING, **_SIGNED, **_CONVENTION}, adapters, weights,
                       rule=rule, seed=seed, device=device, options=options)


_DARE = {"density": _MISSING, **_CONVENTION}


@register_method("dare_linear")
def dare_linear(adapters: Sequence[Adapter], weights: Sequence[float], *, rule: Mapping[str, Any], seed: int = 0,
                device: torch.device | None = None, **options: Any) -> Adapter:
    """DARE (Yu et al. 2024, sec. 3, eq. 1) then a weighted sum: ``M = sum_i w_i (m_i * dW_i) c_i``.

    ``m_i ~ Bernoulli(density)`` entrywise; ``c_i = 1 / density`` (``convention="peft"``, the
    paper, PEFT's ``dare_linear_svd``) or ``||dW_i||_1 / ||m_i dW_i||_1`` (mergekit's rescale).
    Seeded by ``seed``. Options: ``density`` (required), ``convention``, ``normalize``, ``svd``.
    """
    return _sparsified("dare_linear", sparsify.dare_merge, _DARE, adapters, weights, rule=rule, seed=seed, device=device,
                       options=options, ties=False, random=True)


@register_method("dare_ties")
def dare_ties(adapters: Sequence[Adapter], weights: Sequence[float], *, rule: Mapping[str, Any], seed: int = 0,
              device: torch.device | None = None, **options: Any) -> Adapter:
    """DARE's drop-and-rescale, then TIES' sign election and disjoint merge (Yu et al. 2024, sec. 4.3).

    mergekit sums the agreeing entries (``normalize=False`` by default); PEFT's ``dare_ties_svd``
    divides by their count: ``convention="peft", normalize=True``. Options: ``density``
    (required), ``majority_sign``, ``convention``, ``normalize``, ``svd``.
    """
    return _sparsified("dare_ties", sparsify.dare_merge, _DARE, adapters, weights, rule=rule, seed=seed, device=device,
                       options=options, ties=True, random=True)


@register_method("magnitude_prune")
def magnitude_prune(adapters: Sequence[Adapter], weights: Sequence[float], *, rule: Mapping[str, Any], seed: int = 0,
                    device: torch.device | None = None, **options: Any) -> Adapter:
    """Trim each delta to its top ``density`` entries by magnitude, then ``M = sum_i w_i dW~_i``.

    The trim step of TIES (Yadav et al. 2023, sec. 3) alone; PEFT's ``magnitude_prune_svd``.
    Options: ``density`` (required), ``svd``.
    """
    return _sparsified("magnitude_prune", sparsify.magnitude_prune_merge, {"density": _MISSING}, adapters, weights,
                       rule=rule, seed=seed, device=device, options=options)


_DELLA = {"density": _MISSING, "epsilon": 0.15, "normalize": None}


@register_method("della")
def della(adapters: Sequence[Adapter], weights: Sequence[float], *, rule: Mapping[str, Any], seed: int = 0,
          device: torch.device | None = None, **options: Any) -> Adapter:
    """DELLA-Merging (Deep et al. 2024, sec. 3): MagPrune, elect sign, disjoint mean.

    Within each row, an entry of magnitude rank ``j`` (0 = smallest, of ``c``) is kept with
    probability ``density - epsilon + 2 epsilon j / (c - 1)`` and the kept ones rescaled to the
    task's L1 norm (the whole layer's delta), then TIES' vote and a mean normalised by the agreeing weight. As
    mergekit's ``della``. Options: ``density`` (required), ``epsilon`` (0.15), ``majority_sign``,
    ``normalize``, ``svd``.
    """
    return _sparsified("della", sparsify.della_merge, _DELLA, adapters, weights, rule=rule, seed=seed, device=device,
                       options=options, ties=True, random=True)


@register_method("della_linear")
def della_linear(adapters: Sequence[Adapter], weights: Sequence[float], *, rule: Mapping[str, Any], seed: int = 0,
                 device: torch.device | None = None, **options: Any) -> Adapter:
    """DELLA's MagPrune, then the weighted sum ``M = sum_i w_i dW~_i`` (mergekit's ``della_linear``).

    Options: ``density`` (required), ``epsilon`` (0.15), ``normalize``, ``svd``.
    """
    return _sparsified("della_linear", sparsify.della_merge, _DELLA, adapters, weights, rule=rule, seed=seed, device=device,
                       options=options, ties=False, random=True)


_BREADCRUMBS = {"density": _MISSING, "gamma": 0.01, "normalize": None}


@register_method("breadcrumbs")
def breadcrumbs(adapters: Sequence[Adapter], weights: Sequence[float], *, rule: Mapping[str, Any], seed: int = 0,
                device: torch.device | None = None, **options: Any) -> Adapter:
    """Model Breadcrumbs (Davari & Belilovsky 2024, sec. 3): drop both tails of each delta, then sum.

    Of a delta's ``m`` entries by magnitude, the ``int(gamma m)`` largest and the smallest are
    dropped so that ``int(density m)`` remain; ``M = sum_i w_i dW~_i`` (mergekit's
    ``breadcrumbs``). Options: ``density`` (required), ``gamma`` (0.01), ``normalize``, ``svd``.
    """
    return _sparsified("breadcrumbs", sparsify.breadcrumbs_merge, _BREADCRUMBS, adapters, weights, rule=rule, seed=seed,
                       device=device, options=options, ties=False)


@register_method("breadcrumbs_ties")
def breadcrumbs_ties(adapters: Sequence[Adapter], weights: Sequence[float], *, rule: Mapping[str, Any], seed: int = 0,
                     device: torch.device | None = None, **options: Any) -> Adapter:
    """Breadcrumbs' mask, then TIES' sign election and disjoint sum (mergekit's ``breadcrumbs_ties``).

    Options: ``density`` (required), ``gamma`` (0.01), ``majority_sign``, ``normalize``, ``svd``.
    """
    return _sparsified("breadcrumbs_ties", sparsify.breadcrumbs_merge, _BREADCRUMBS, adapters, weights, rule=rule, seed=seed,
                       device=device, options=options, ties=True)


linear.exact_by_default = True  # blend passes no rule unless one was asked for


# ---------------------------------------------------------------------------------------------
# The shared loop: one chunk of equal-shape layers dense at a time


def _dense(method: str, options: Mapping[str, Any], adapters: Sequence[Adapter], weights: Sequence[float], combine: Combine,
           *, rule: Mapping[str, Any], seed: int, device: torch.device | None, random: bool) -> Adapter:
    names, shapes = _layout(adapters)
    (rule_name, value), = rule.items()
    linalg.select_ranks({}, {}, rule=rule_name, value=value)  # validates the value
    svd = options["svd"]
    merged = lambda: _merged_chunks(adapters, weights, names, combine, seed=seed, device=device, random=random)  # noqa: E731
    kept: dict[str, tuple] = {}
    if rule_name == "budget":
        spectra, floors = {}, {}
        for chunk, M, floor in merged():  # pass 1: every layer's singular values, nothing else kept
            for name, S, f in zip(chunk, torch.linalg.svdvals(M), floor):
                spectra[name], floors[name] = S.cpu(), f
        ranks = linalg.select_ranks(spectra, shapes, rule="budget", value=value, floors=floors)
        for chunk, M, floor in merged():  # pass 2: truncate each layer to its share
            k = max(ranks[n] for n in chunk)
            for name, f in zip(chunk, _truncate(M, k, chunk, seed=seed, svd=svd, floors=floor)):
                kept[name] = (*f[:4], ranks[name])
    else:
        for chunk, M, floor in merged():
            mode = "exact" if rule_name == "energy" else svd
            k = min(int(value), min(M.shape[-2:])) if rule_name == "rank" else min(M.shape[-2:])
            factors = dict(zip(chunk, _truncate(M, k, chunk, seed=seed, svd=mode, floors=floor)))
            ranks = _select(factors, shapes, rule)
            kept.update({n: (*f[:4], ranks[n]) for n, f in factors.items()})
    return _assemble(method, options, adapters, kept)


def _layout(adapters: Sequence[Adapter]) -> tuple[list[str], dict[str, tuple[int, int]]]:
    names = list(dict.fromkeys(n for a in adapters for n in a))
    shapes = {}
    for name in names:
        layers = [a[name] for a in adapters if name in a]
        _check_same_shape(name, layers)
        shapes[name] = layers[0].shape
    return names, shapes


def _merged_chunks(adapters: Sequence[Adapter], weights: Sequence[float], names: Sequence[str], combine: Combine, *,
                   seed: int, device: torch.device | None, random: bool) -> Iterator[tuple[list[str], torch.Tensor, list[float]]]:
    """Yield ``(names, M (L, out, in), noise floors)`` for chunks of equal-shape layers, in order."""
    n = len(adapters)
    groups: dict[tuple, list[str]] = {}
    for name in names:
        layers = [a[name] for a in adapters if name in a]
        cdt = linalg.compute_dtype(*(t for layer in layers for t in (layer.A, layer.B)))
        dev = layers[0].A.device if device is None else torch.device(device)
        groups.setdefault((layers[0].shape, cdt, dev), []).append(name)
    for (shape, cdt, dev), members in groups.items():
        size = _chunk_size(n, shape, cdt, dev)
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            x = torch.zeros((n, len(chunk), *shape), dtype=cdt, device=dev)  # (tasks, layers, out, in)
            norms = torch.zeros(len(chunk), dtype=torch.float64)
            for i, adapter in enumerate(adapters):
                for j, name in enumerate(chunk):
                    if name in adapter:
                        B, A = adapter[name].to(device=dev).folded(dtype=cdt)
                        torch.matmul(B, A, out=x[i, j])  # (out, r) @ (r, in) -> (out, in)
                        norms[j] += abs(float(weights[i])) * float(linalg.frobenius(x[i, j]))
            w = torch.tensor([float(v) for v in weights], dtype=cdt, device=dev)
            gens = _generators(seed, chunk, n, dev, "mask") if random else None
            M = combine(x, w, gens)  # (layers, out, in)
            del x
            eps = torch.finfo(cdt).eps
            yield chunk, M, [max(shape) * eps * float(v) for v in norms]
            del M


def _chunk_size(n: int, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> int:
    """Layers per chunk: as many as fit the working memory (half the free GPU memory, or 1 GiB on CPU)."""
    per_layer = (n + 1) * shape[0] * shape[1] * torch.finfo(dtype).bits // 8 * WORKING_COPIES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 2
    else:
        budget = CPU_CHUNK_BYTES
    return max(1, int(budget // per_layer))


def _generators(seed: int, names: Sequence[str], n: int, device: torch.device, role: str) -> list[torch.Generator]:
    """One generator per (task, layer), task-major like the stacked (n, L, ...) deltas."""
    return [torch.Generator(device=device).manual_seed(_seed(seed, role, name, i)) for i in range(n) for name in names]


def _seed(seed: int, *parts: Any) -> int:
    digest = hashlib.blake2b(":".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# ---------------------------------------------------------------------------------------------
# Re-compression


def _truncate(M: torch.Tensor, k: int, names: Sequence[str], *, seed: int, svd: str, floors: Sequence[float]) -> list[tuple]:
    """Top-``k`` SVD of each ``M[j]``: ``(U (out, k'), S (k',), Vh (k', in), ||M_j||_F^2, floor)``, ``k' >= k``."""
    small = min(M.shape[-2:])
    cols = min(2 * k + OVERSAMPLE, small)
    randomized = svd == "randomized" or (svd == "auto" and small > 4 * cols)
    energy = (M.double() ** 2).sum(dim=(-2, -1))  # (L,) exact ||M||_F^2
    if randomized and k < small:
        U, S, Vh = _randomized_svd(M, cols, [_seed(seed, "svd", n) for n in names])
    else:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return [(U[j], S[j], Vh[j], float(energy[j]), floors[j]) for j in range(M.shape[0])]


def _randomized_svd(M: torch.Tensor, cols: int, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized subspace iteration (Halko et al. 2011, Alg. 4.4), batched: ``M ~ U S Vh`` with ``cols`` terms.

    ``Q = orth(M Omega)``, then ``q`` times ``Q = orth(M orth(M^T Q))``; ``U S Vh = svd(Q^T M)``,
    ``U <- Q U``. ``M`` (L, out, in), one Gaussian ``Omega`` (in, cols) per layer from its seed.
    """
    omega = torch.stack([
        torch.randn(M.shape[-1], cols, generator=torch.Generator(device=M.device).manual_seed(s), device=M.device, dtype=M.dtype)
        for s in seeds
    ])  # (L, in, cols)
    Q = torch.linalg.qr(M @ omega).Q  # (L, out, cols)
    for _ in range(POWER_ITERATIONS):
        Z = torch.linalg.qr(M.mT @ Q).Q  # (L, in, cols)
        Q = torch.linalg.qr(M @ Z).Q
    U, S, Vh = torch.linalg.svd(Q.mT @ M, full_matrices=False)  # (L, cols, cols), (L, cols), (L, cols, in)
    return Q @ U, S, Vh


def _select(factors: Mapping[str, tuple], shapes: Mapping[str, tuple[int, int]], rule: Mapping[str, Any]) -> dict[str, int]:
    """Ranks under ``rule`` from each layer's spectrum; for ``energy``, shares of the exact ``||M||_F^2``."""
    (rule_name, value), = rule.items()
    spectra = {n: f[1] for n, f in factors.items()}
    floors = {n: f[4] for n, f in factors.items()}
    return linalg.select_ranks(spectra, shapes, rule=rule_name, value=value, floors=floors)


def _assemble(method: str, options: Mapping[str, Any], adapters: Sequence[Adapter], kept: Mapping[str, tuple]) -> Adapter:
    """LoRA layers ``B = U_k S_k^1/2``, ``A = S_k^1/2 Vh_k`` (alpha = k) and the ``blend`` report."""
    layers, report = {}, {}
    for name in dict.fromkeys(n for a in adapters for n in a):
        U, S, Vh, energy, k = kept[name]
        share = float((S[:k].double() ** 2).sum()) / energy if energy > 0 else 1.0
        report[name] = {"rank": k, "energy_kept": min(share, 1.0)}
        if k == 0:
            continue
        dtype = _result_dtype([a[name] for a in adapters if name in a])
        root = S[:k].sqrt()
        B = (U[:, :k] * root).to(dtype)  # (out, k)
        A = (root[:, None] * Vh[:k]).to(dtype)  # (k, in)
        layers[name] = LoraLayer(A, B, float(k))
    meta = _combined_metadata(adapters)
    meta["blend"] = {"method": method, "options": {k: v for k, v in options.items() if v is not None}, "layers": report}
    return Adapter(layers, meta)
