"""Elementwise building blocks of the sparsify-and-merge methods: trim, drop, elect signs, merge.

Every function works on stacked task tensors ``x`` of shape ``(n, *items)``: task ``i`` is
``x[i]``. A tensor is ranked or dropped per *item*: the trailing ``item_dims`` dimensions
(default: all of them, so one item per task). Stacking equal-shape layers as ``(n, L, out, in)``
with ``item_dims=2`` treats each (task, layer) pair on its own, which is how ``dense`` batches
layers. Nothing here knows about adapters: the factored methods call the same functions on core
matrices or singular-vector coordinates.

How per-task weights enter differs between the two tools people compare against, and both are
reproduced exactly (``convention=``):

- ``"mergekit"`` (default; mergekit's ``generalized_task_arithmetic``): tasks are sparsified,
  then weighted, ``d_i = w_i * x~_i``; signs are elected on the weighted ``d_i``; with
  ``normalize`` the (disjoint) sum is divided by the total weight of the tasks that take part in
  each entry. DARE and DELLA rescale each task so its L1 norm is unchanged (mergekit's
  ``rescale``), which is the paper's ``1 / density`` in expectation.
- ``"peft"`` (PEFT's ``utils/merge_utils``): signs are elected on the unweighted sparsified
  tasks, the weighted sum is divided by the *number* of agreeing tasks (TIES-type), DARE
  rescales by exactly ``1 / density`` (Yu et al. 2024, eq. 1).

Ties in magnitude are broken deterministically: a top-``k`` mask keeps every entry whose
magnitude is at least the ``k``-th largest (so more than ``k`` only when values are equal), and
ranks are stable (by position). Random masks come from the caller's ``torch.Generator``, one per
item, so a result does not depend on how items were batched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import AdapterOpsError

__all__ = [
    "CONVENTIONS",
    "MAJORITY_SIGNS",
    "magnitude_mask",
    "elect_sign",
    "disjoint_mean",
    "dare_mask",
    "della_keep_probability",
    "breadcrumbs_mask",
    "ties_merge",
    "dare_merge",
    "della_merge",
    "breadcrumbs_merge",
    "magnitude_prune_merge",
]

CONVENTIONS = ("mergekit", "peft")
MAJORITY_SIGNS = ("total", "frequency")
Generators = torch.Generator | Sequence[torch.Generator]


# ---------------------------------------------------------------------------------------------
# Masks


def magnitude_mask(x: torch.Tensor, density: float, *, item_dims: int | None = None) -> torch.Tensor:
    """Keep the top ``density`` fraction of each item by ``|x|`` (TIES step 1, "trim").

    ``k = max(1, int(density * m))`` of the ``m`` entries of an item (mergekit's count; PEFT's
    ``int(density * m)`` agrees whenever that is at least 1); ``density >= 1`` keeps everything.
    Entries tied with the ``k``-th largest magnitude are all kept.
    """
    _check_density(density)
    flat = _items(x, item_dims)  # (items, m)
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    m = flat.shape[1]
    k = max(1, int(density * m))
    mag = flat.abs()
    # the k-th largest is the (m - k + 1)-th smallest
    threshold = torch.kthvalue(mag, m - k + 1, dim=1, keepdim=True).values  # (items, 1)
    return (mag >= threshold).reshape(x.shape)


def dare_mask(shape: Sequence[int], density: float, generator: Generators, *, item_dims: int | None = None) -> torch.Tensor:
    """Bernoulli keep-mask, each entry kept with probability ``density`` (DARE's drop, Yu et al. 2024 sec. 3).

    The caller rescales the kept entries (by ``1 / density``, or to the task's L1 norm).
    ``generator`` is one ``torch.Generator``, or one per item (the leading dims of ``shape`` not in
    the trailing ``item_dims``), each drawing that item's mask; the mask lives on their device.
    """
    _check_density(density)
    return _uniform(shape, generator, item_dims) < density


def della_keep_probability(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities (Deep et al. 2024, sec. 3.1), as mergekit computes them.

    Within each row (last dim) the entries are ranked by magnitude, ``rank = 0 .. c-1`` from the
    smallest; ``p = (density - epsilon) + 2 * epsilon * rank / (c - 1)``, so the smallest entry is
    kept with probability ``density - epsilon`` and the largest with ``density + epsilon``, mean
    ``density``. mergekit ranks within rows of a matrix (and over the whole of a vector); so do we.
    Both ``density - epsilon`` and ``density + epsilon`` must lie in (0, 1).
    """
    _check_density(density)
    if not (0 < density - epsilon and density + epsilon < 1) or epsilon < 0:
        raise AdapterOpsError(
            f"della needs 0 <= epsilon with density - epsilon > 0 and density + epsilon < 1, "
            f"got density={density}, epsilon={epsilon}; lower epsilon"
        )
    c = x.shape[-1]
    if c == 1:
        return torch.full_like(x, density)
    order = torch.argsort(x.abs(), dim=-1, stable=True)
    ranks = torch.argsort(order, dim=-1, stable=True).to(x.dtype)  # 0 .. c-1 per row
    return (density - epsilon) + ranks * (2 * epsilon / (c - 1))


def breadcrumbs_mask(x: torch.Tensor, density: float, gamma: float, *, item_dims: int | None = None) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024, sec. 3): drop the largest and the smallest.

    Of an item's ``m`` entries sorted by magnitude, keep ``t = int(density * m)`` of them after
    skipping the ``b = max(0, m - t - int(gamma * m))`` smallest: the top ``m - b - t`` (the
    ``gamma`` outliers, fewer when ``density + gamma > 1``) are dropped too. This is mergekit's
    ``magnitude_outliers`` exactly, including its floor rounding; ``density >= 1`` keeps all.
    """
    _check_density(density)
    if not 0 <= gamma < 1:
        raise AdapterOpsError(f"gamma must be in [0, 1), got {gamma}")
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    flat = _items(x, item_dims).abs()
    m = flat.shape[1]
    t = int(density * m)
    b = max(0, m - t - int(gamma * m))
    if t == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    # rank by (magnitude, position), so equal magnitudes split deterministically like a stable sort
    order = torch.argsort(flat, dim=1, stable=True)  # ascending
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep.scatter_(1, order[:, b : b + t], True)
    return keep.reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# Sign election and disjoint merge


def elect_sign(x: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES step 2 (Yadav et al. 2023, sec. 3, "elect"): the sign each entry agrees on, over dim 0.

    ``"total"``: ``sign(sum_i x_i)`` (the paper's mass vote); ``"frequency"``: ``sign(sum_i
    sign(x_i))`` (a head count). A tie (zero) elects ``+1``, as PEFT and mergekit do. Returns
    ``+-1`` in ``x``'s dtype, shape ``x.shape[1:]``.
    """
    if method not in MAJORITY_SIGNS:
        raise AdapterOpsError(f"majority_sign must be one of {', '.join(MAJORITY_SIGNS)}, got {method!r}")
    vote = x.sum(dim=0) if method == "total" else x.sign().sum(dim=0)
    return torch.where(vote >= 0, 1.0, -1.0).to(x.dtype)


def disjoint_mean(x: torch.Tensor, sign: torch.Tensor, *, weights: torch.Tensor | None = None,
                  agree: torch.Tensor | None = None) -> torch.Tensor:
    """TIES step 3 ("disjoint merge"): average over the tasks whose entry has the elected sign.

    ``sum_i [sign(x_i) == s] x_i / max(1, #{i : sign(x_i) == s})`` (PEFT's count). With
    ``weights`` (n,), the denominator is the agreeing tasks' total weight instead, 1 where that
    is 0 (mergekit's ``normalize``; ``x`` is then already weighted). ``agree`` overrides which
    tasks take part (a bool tensor like ``x``); zero entries never do.
    """
    if agree is None:
        agree = x.sign() == sign
    total = (x * agree).sum(dim=0)
    if weights is None:
        return total / agree.sum(dim=0).clamp(min=1)
    divisor = (_per_task(weights, x) * agree).sum(dim=0)
    return total / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


# ---------------------------------------------------------------------------------------------
# Whole merges


def ties_merge(x: torch.Tensor, weights: torch.Tensor, *, density: float, majority_sign: str = "total",
               convention: str = "mergekit", normalize: bool | None = None, item_dims: int | None = None) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, Algorithm 1): trim, elect sign, disjoint merge.

    ``x~_i = x_i * top_density(|x_i|)``; ``s = elect(w_i x~_i)``; result
    ``sum_i [sign(w_i x~_i) = s] w_i x~_i / sum_i [..] w_i`` (mergekit, ``normalize`` default on);
    under ``convention="peft"`` the vote is on the unweighted ``x~_i`` and the divisor counts the
    agreeing tasks. ``x`` (n, *items), ``weights`` (n,); returns ``x.shape[1:]``.
    """
    trimmed = x * magnitude_mask(x, density, item_dims=item_dims)
    return _combine(trimmed, weights, consensus=True, majority_sign=majority_sign, convention=convention,
                    normalize=_default(normalize, True))


def dare_merge(x: torch.Tensor, weights: torch.Tensor, *, density: float, generator: Generators, ties: bool = False,
               majority_sign: str = "total", convention: str = "mergekit", normalize: bool | None = None,
               item_dims: int | None = None) -> torch.Tensor:
    """DARE (Yu et al. 2024, sec. 3 eq. 1): drop each entry with probability ``1 - density``, rescale.

    ``x~_i = m_i * x_i * c_i`` with ``m_i ~ Bernoulli(density)`` and ``c_i = 1 / density``
    (``convention="peft"``, the paper) or ``c_i = ||x_i||_1 / ||m_i x_i||_1`` (mergekit: the L1
    norm is kept, ``1 / density`` in expectation); then ``sum_i w_i x~_i`` (``dare_linear``), or
    with ``ties`` the sign election and disjoint merge of ``ties_merge`` on ``x~`` (``dare_ties``;
    mergekit does not normalise it by default, PEFT always divides by the agreeing count).
    """
    keep = dare_mask(x.shape, density, generator, item_dims=item_dims)
    dropped = _rescale(x, keep, convention=convention, inverse=density, item_dims=item_dims)
    return _combine(dropped, weights, consensus=ties, majority_sign=majority_sign, convention=convention,
                    normalize=_default(normalize, False))


def della_merge(x: torch.Tensor, weights: torch.Tensor, *, density: float, epsilon: float, generator: Generators,
                ties: bool = True, majority_sign: str = "total", normalize: bool | None = None,
                item_dims: int | None = None) -> torch.Tensor:
    """DELLA-Merging (Deep et al. 2024, sec. 3): MagPrune, then elect and fuse like TIES.

    Each entry is kept with the magnitude-ranked probability ``p`` of ``della_keep_probability``,
    so large entries survive more often; kept entries are rescaled so each item keeps its L1
    norm (mergekit's ``rescale``; the paper's ``1 / p`` per entry preserves the same mass in
    expectation). With ``ties`` (``della``): sign election and a disjoint mean normalised by the
    agreeing weight; without (``della_linear``): ``sum_i w_i x~_i``. mergekit's convention only.
    """
    if density >= 1:  # mergekit: nothing dropped, epsilon not checked
        dropped = x
    else:
        keep = _uniform(x.shape, generator, item_dims) < della_keep_probability(x, density, epsilon)
        dropped = _rescale(x, keep, convention="mergekit", inverse=density, item_dims=item_dims)
    return _combine(dropped, weights, consensus=ties, majority_sign=majority_sign, convention="mergekit",
                    normalize=_default(normalize, ties))


def breadcrumbs_merge(x: torch.Tensor, weights: torch.Tensor, *, density: float, gamma: float = 0.01, ties: bool = False,
                      majority_sign: str = "total", normalize: bool | None = None,
                      item_dims: int | None = None) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024, sec. 3): mask both tails, then sum.

    ``x~_i = x_i * breadcrumbs_mask(x_i)``; ``sum_i w_i x~_i`` (``breadcrumbs``), or with ``ties``
    the sign election and disjoint sum of TIES (``breadcrumbs_ties``; not normalised by default,
    as in mergekit). mergekit's convention only.
    """
    masked = x * breadcrumbs_mask(x, density, gamma, item_dims=item_dims)
    return _combine(masked, weights, consensus=ties, majority_sign=majority_sign, convention="mergekit",
                    normalize=_default(normalize, False))


def magnitude_prune_merge(x: torch.Tensor, weights: torch.Tensor, *, density: float,
                          item_dims: int | None = None) -> torch.Tensor:
    """Trim each task to its top ``density`` by magnitude, then ``sum_i w_i x~_i`` (PEFT's ``magnitude_prune``)."""
    trimmed = x * magnitude_mask(x, density, item_dims=item_dims)
    return (_per_task(weights, trimmed) * trimmed).sum(dim=0)


# ---------------------------------------------------------------------------------------------
# Helpers


def _combine(x: torch.Tensor, weights: torch.Tensor, *, consensus: bool, majority_sign: str, convention: str,
             normalize: bool) -> torch.Tensor:
    """Weight the sparsified tasks and merge them: a (disjoint) sum, optionally normalised."""
    if convention not in CONVENTIONS:
        raise AdapterOpsError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    w = _per_task(weights, x)
    weighted = w * x
    if not consensus:
        total = weighted.sum(dim=0)
        if not normalize:
            return total
        divisor = weights.sum()
        return total / (divisor if abs(float(divisor)) >= 1e-8 else 1.0)  # mergekit's guard
    if convention == "peft":  # vote on the unweighted tasks, divide by the agreeing count
        sign = elect_sign(x, majority_sign)
        agree = x.sign() == sign
        return disjoint_mean(weighted, sign, agree=agree) if normalize else (weighted * agree).sum(dim=0)
    sign = elect_sign(weighted, majority_sign)
    agree = weighted.sign() == sign
    if not normalize:
        return (weighted * agree).sum(dim=0)
    return disjoint_mean(weighted, sign, weights=weights, agree=agree)


def _rescale(x: torch.Tensor, keep: torch.Tensor, *, convention: str, inverse: float, item_dims: int | None) -> torch.Tensor:
    """Masked ``x`` rescaled by ``1 / inverse`` (peft) or to each item's own L1 norm (mergekit)."""
    if convention not in CONVENTIONS:
        raise AdapterOpsError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    masked = x * keep
    if convention == "peft":
        return masked / inverse
    before = _items(x, item_dims).abs().sum(dim=1)  # (items,)
    after = _items(masked, item_dims).abs().sum(dim=1)
    tiny = (before < 1e-7) | (after < 1e-7)  # mergekit leaves such items unscaled
    factor = torch.where(tiny, torch.ones_like(before), before / torch.where(tiny, torch.ones_like(after), after))
    return (_items(masked, item_dims) * factor[:, None]).reshape(x.shape)


def _uniform(shape: Sequence[int], generator: Generators, item_dims: int | None) -> torch.Tensor:
    """Uniform [0, 1) draws of ``shape``: one generator for all, or one per item (row-major order)."""
    shape = tuple(shape)
    if isinstance(generator, torch.Generator):
        return torch.rand(shape, generator=generator, device=generator.device)
    lead = len(shape) - (len(shape) - 1 if item_dims is None else item_dims)
    count = 1
    for size in shape[:lead]:
        count *= size
    generator = list(generator)
    if len(generator) != count:
        raise AdapterOpsError(f"{len(generator)} generators for {count} items of a {list(shape)} tensor")
    item_shape = shape[lead:]
    draws = [torch.rand(item_shape, generator=g, device=g.device) for g in generator]
    return torch.stack(draws).reshape(shape)


def _items(x: torch.Tensor, item_dims: int | None) -> torch.Tensor:
    """``x`` as (number of items, entries per item)."""
    dims = x.ndim - 1 if item_dims is None else item_dims
    if not 0 <= dims < x.ndim:
        raise AdapterOpsError(f"item_dims={item_dims} does not fit a {x.ndim}-D tensor of stacked tasks")
    size = 1
    for s in x.shape[x.ndim - dims:]:
        size *= s
    return x.reshape(-1, size)


def _per_task(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Weights (n,) shaped to broadcast over ``x`` (n, *items)."""
    w = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
    if w.shape != (x.shape[0],):
        raise AdapterOpsError(f"{w.numel()} weights for {x.shape[0]} stacked tasks")
    return w.reshape((-1,) + (1,) * (x.ndim - 1))


def _default(value: bool | None, default: bool) -> bool:
    return default if value is None else bool(value)


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise AdapterOpsError(f"density must be in (0, 1], got {density}")
