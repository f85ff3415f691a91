"""Independent float64 references for the merge-method tests: plain numpy, entry by entry."""

import numpy as np


def ref_topk(t: np.ndarray, density: float) -> np.ndarray:
    """Keep-mask of the top ``density`` entries of ``t`` by magnitude (stable order)."""
    flat = np.abs(t).ravel()
    k = max(1, int(density * flat.size)) if density < 1 else flat.size
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return keep.reshape(t.shape)


def ref_combine(sparse: np.ndarray, w: np.ndarray, *, consensus: bool, vote: str = "total", peft: bool = False,
                normalize: bool = True) -> np.ndarray:
    """Weighted (disjoint) merge of sparsified tasks, one entry at a time."""
    weighted = sparse * w.reshape((-1,) + (1,) * (sparse.ndim - 1))
    if not consensus:
        total = weighted.sum(axis=0)
        return total / (w.sum() if abs(w.sum()) >= 1e-8 else 1.0) if normalize else total
    out = np.zeros(sparse.shape[1:])
    for idx in np.ndindex(*sparse.shape[1:]):
        col = sparse[(slice(None),) + idx] if peft else weighted[(slice(None),) + idx]
        score = col.sum() if vote == "total" else np.sign(col).sum()
        s = 1.0 if score >= 0 else -1.0
        agree = [i for i in range(len(sparse)) if np.sign(col[i]) == s]
        total = sum((weighted[(i,) + idx] for i in agree), 0.0)
        if not normalize:
            out[idx] = total
        elif peft:
            out[idx] = total / max(1, len(agree))
        else:
            div = sum(w[i] for i in agree)
            out[idx] = total / (div if div != 0 else 1.0)
    return out


def ref_ties(x: np.ndarray, w: np.ndarray, density: float, vote: str, peft: bool) -> np.ndarray:
    trimmed = np.stack([t * ref_topk(t, density) for t in x])
    return ref_combine(trimmed, w, consensus=True, vote=vote, peft=peft)


def ref_breadcrumbs(t: np.ndarray, density: float, gamma: float) -> np.ndarray:
    flat = np.abs(t).ravel()
    m = flat.size
    keep_n, top_n = int(density * m), int(gamma * m)
    bottom = max(0, m - keep_n - top_n)
    keep = np.zeros(m, bool)
    keep[np.argsort(flat, kind="stable")[bottom: bottom + keep_n]] = True
    return t * keep.reshape(t.shape)


def ref_l1_rescaled(t: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """mergekit's rescale: the kept entries scaled so the task keeps its L1 norm."""
    kept = t * keep
    before, after = np.abs(t).sum(), np.abs(kept).sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def ref_della_keep(t: np.ndarray, density: float, epsilon: float, uniform: np.ndarray) -> np.ndarray:
    """DELLA's MagPrune draw: within each row, keep probability rising linearly with magnitude rank."""
    keep = np.zeros(t.shape, bool)
    cols = t.shape[-1]
    for r in range(t.shape[0]):
        rank = np.empty(cols)
        rank[np.argsort(np.abs(t[r]), kind="stable")] = np.arange(cols)
        p = density - epsilon + 2 * epsilon * rank / (cols - 1)
        keep[r] = uniform[r] < p
    return keep


def ref_truncation_error(M: np.ndarray, k: int) -> float:
    """Frobenius error of the best rank-k approximation (Eckart-Young), from numpy's SVD."""
    S = np.linalg.svd(M, compute_uv=False)
    return float(np.sqrt((S[k:] ** 2).sum()))
