"""What an adapter does to its model: spectra, effective rank, intruder dimensions, interference.

- ``diagnose(adapter)``: per layer, the singular values of ``dW`` (from the factors, never a dense
  SVD), effective rank (Roy & Vetterli 2007), stable rank, and the ranks keeping 90% / 99% of the
  energy. With ``base=``: ``||dW|| / ||W||`` and intruder dimensions (Shuttleworth et al. 2024).
- ``compare(a, b)``: cosine of the deltas and overlap of their subspaces (principal angles), with a
  verdict on how a blend of the two will behave.
- ``reduce_intruders(adapter, base)``: shrink the intruder directions, re-expressed at the adapter's rank.

Results are plain dataclasses (``.to_dict()``, ``.to_json()``, ``.to_pandas()``); ``adapterops.report``
renders them as tables and plots.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from . import _intruders, linalg
from ._progress import Progress
from ._svd_cache import BaseWeights, SvdCache, base_svd_chunks
from .adapter import Adapter, LoraLayer
from .checkpoint import Checkpoint
from .errors import AdapterOpsError, NonFiniteError, ShapeMismatchError, UnsupportedOperationError
from .rewrite import resolve_device

__all__ = [
    "diagnose",
    "compare",
    "reduce_intruders",
    "spectrum_stats",
    "LayerDiagnosis",
    "DiagnosisSummary",
    "DiagnosisReport",
    "LayerComparison",
    "ComparisonSummary",
    "Comparison",
    "VERDICTS",
]

BaseLike = Checkpoint | Mapping[str, torch.Tensor] | str | os.PathLike
AdapterLike = Adapter | str | os.PathLike
CacheLike = bool | str | os.PathLike | None


class _Record:
    """``to_dict`` / ``to_json`` / ``from_dict`` / ``from_json`` for the frozen result dataclasses."""

    _nested: dict[str, Any] = {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        values = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            v = data[f.name]
            if f.name in cls._nested:
                kind = cls._nested[f.name]
                v = tuple(kind.from_dict(x) for x in v) if isinstance(v, (list, tuple)) else kind.from_dict(v)
            elif isinstance(v, list):
                v = tuple(v)
            values[f.name] = v
        return cls(**values)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


def _to_pandas(rows: list[dict[str, Any]]):
    try:
        import pandas as pd
    except ImportError:
        raise AdapterOpsError("to_pandas() needs pandas, which is not installed: pip install pandas (or use to_dict())") from None
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------- diagnose


@dataclass(frozen=True)
class LayerDiagnosis(_Record):
    """One layer's numbers. Spectral quantities are of ``dW`` (singular values above round-off);
    the ``base``/``merged`` ones exist only when a base was given."""

    name: str
    shape: tuple[int, int]  # (out, in)
    rank: int  # stored rank r of the factors
    numerical_rank: int  # singular values of dW above round-off
    norm: float  # ||dW||_F
    spectral_norm: float  # ||dW||_2
    effective_rank: float  # exp(entropy of s / sum s), Roy & Vetterli 2007
    stable_rank: float  # ||dW||_F^2 / ||dW||_2^2
    rank_90: int  # smallest rank keeping 90% of sum s^2 (what compress(energy=0.9) keeps)
    rank_99: int
    singular_values: tuple[float, ...]
    base_tensor: str | None = None
    base_norm: float | None = None  # ||W||_F
    relative_norm: float | None = None  # ||dW||_F / ||W||_F
    intruders: int | None = None  # top-k singular vectors of W + dW with similarity < epsilon
    similarities: tuple[float, ...] | None = None  # per top-k vector: max_i |<u_i(W), u_j(W + dW)>|
    merged_singular_values: tuple[float, ...] | None = None  # top-k of W + dW
    base_singular_values: tuple[float, ...] | None = None  # top-k of W

    @property
    def depth(self) -> int | None:
        """The block index in the layer name (``model.layers.12.mlp.up_proj`` -> 12), if any."""
        m = re.search(r"(?:^|[._])(\d+)(?:[._]|$)", self.name)
        return int(m.group(1)) if m else None

    @property
    def module(self) -> str:
        """The last dotted part of the name (``q_proj``)."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def min_similarity(self) -> float | None:
        return min(self.similarities) if self.similarities else None


@dataclass(frozen=True)
class DiagnosisSummary(_Record):
    num_layers: int
    norm: float  # sqrt(sum of ||dW||_F^2)
    mean_effective_rank: float
    mean_stable_rank: float
    rank_90: int  # the largest per-layer rank_90: compress(rank=this) keeps >= 90% in every layer
    rank_99: int
    base: str | None = None
    top_k: int | None = None
    epsilon: float | None = None
    relative_norm: float | None = None  # sqrt(sum ||dW||^2) / sqrt(sum ||W||^2) over these layers
    intruders: int | None = None  # total over layers
    layers_with_intruders: int | None = None
    base_svds_cached: int | None = None  # base SVDs read from the cache ...
    base_svds_computed: int | None = None  # ... and computed in this run


@dataclass(frozen=True)
class DiagnosisReport(_Record):
    """``layers`` in the adapter's order; ``worst_first()`` for reading."""

    adapter: str | None
    layers: tuple[LayerDiagnosis, ...]
    summary: DiagnosisSummary
    _nested = {"layers": LayerDiagnosis, "summary": DiagnosisSummary}

    def __getitem__(self, name: str) -> LayerDiagnosis:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(name)

    def worst_first(self) -> list[LayerDiagnosis]:
        """Most intruders first (then lowest similarity, then largest ``||dW||/||W||``); without a
        base, largest ``||dW||`` first."""
        if self.summary.base is None:
            return sorted(self.layers, key=lambda r: -r.norm)
        return sorted(self.layers, key=lambda r: (-(r.intruders or 0), r.min_similarity if r.min_similarity is not None else 1.0, -(r.relative_norm or 0.0)))

    def to_pandas(self):
        """One row per layer (needs pandas)."""
        return _to_pandas([r.to_dict() for r in self.layers])


def spectrum_stats(S: torch.Tensor) -> dict[str, float | int]:
    """Effective, stable and energy ranks of one spectrum ``S`` (descending, round-off removed).

    - effective rank (Roy & Vetterli 2007, def. 1): ``exp(-sum p_i log p_i)`` with ``p_i = s_i / sum s``;
    - stable rank: ``sum s_i^2 / s_1^2 = ||dW||_F^2 / ||dW||_2^2``;
    - ``rank_90`` / ``rank_99``: the smallest ``k`` with ``sum_{i<=k} s_i^2 >= 0.9 (0.99) sum s_i^2``.
    """
    S = S.detach().double().cpu()
    if S.numel() == 0 or float(S[0]) == 0.0:
        return {"effective_rank": 0.0, "stable_rank": 0.0, "rank_90": 0, "rank_99": 0}
    p = S / S.sum()
    entropy = -float(torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum())
    energy = {}
    for frac in (0.9, 0.99):
        energy[frac] = linalg.RANK_RULES["energy"]({"x": S}, {"x": 0}, frac)["x"]
    return {
        "effective_rank": math.exp(entropy),
        "stable_rank": float((S**2).sum() / S[0] ** 2),
        "rank_90": energy[0.9],
        "rank_99": energy[0.99],
    }


def diagnose(
    adapter: AdapterLike,
    base: BaseLike | None = None,
    top_k: int = 10,
    epsilon: float = 0.5,
    device: torch.device | str | None = None,
    cache: CacheLike = None,
    progress: bool = True,
) -> DiagnosisReport:
    """Diagnose every layer of ``adapter`` (an Adapter or a path).

    Without ``base``, everything comes from the thin SVD of the factors (``Adapter.svd``). With
    ``base`` (directory, file, Hub id, Checkpoint, NF4 checkpoint -- dequantized -- or a state dict),
    adds ``||dW|| / ||W||`` and intruder dimensions: for each of the ``top_k`` left singular vectors
    of ``W + dW``, its largest ``|cos|`` with all left singular vectors of ``W``; below ``epsilon``
    it is an intruder (Shuttleworth et al. 2024, sec. 4). Base SVDs run batched on ``device``
    (default: CUDA when available) and are cached on disk by content (``cache``: None or True for
    the default directory, a path, or False for none); see ``adapterops._svd_cache``. ``progress``
    draws a progress line on stderr when it is a terminal.
    """
    adapter = _as_adapter(adapter)
    _check_options(top_k, epsilon)
    dev = resolve_device(device)
    spectra = _spectra(adapter, dev)
    extra: dict[str, dict[str, Any]] = {n: {} for n in adapter}
    summary_extra: dict[str, Any] = {}
    if base is not None:
        weights = BaseWeights(base)
        store = _cache(cache)
        targets = weights.match({n: layer.shape for n, layer in adapter.items()}, fan_in_fan_out=bool(adapter.metadata.get("fan_in_fan_out")))
        base_sq = 0.0
        for chunk, _, _, top in _merged(adapter, weights, targets, top_k, dev, store, progress, "diagnosing"):
            for i, name in enumerate(chunk.names):
                k = top.values.shape[-1]
                base_norm = float(chunk.S[i].double().square().sum().sqrt())
                base_sq += base_norm**2
                sims = top.similarity[i].tolist()
                extra[name] = {
                    "base_tensor": targets[name].tensor,
                    "base_norm": base_norm,
                    "relative_norm": spectra[name]["norm"] / base_norm if base_norm else None,
                    "intruders": sum(s < epsilon for s in sims),
                    "similarities": tuple(sims),
                    "merged_singular_values": tuple(top.values[i].tolist()),
                    "base_singular_values": tuple(chunk.S[i, :k].tolist()),
                }
        total_sq = sum(spectra[n]["norm"] ** 2 for n in adapter)
        summary_extra = {
            "base": weights.source,
            "top_k": top_k,
            "epsilon": epsilon,
            "relative_norm": math.sqrt(total_sq / base_sq) if base_sq else None,
            "intruders": sum(e["intruders"] for e in extra.values()),
            "layers_with_intruders": sum(e["intruders"] > 0 for e in extra.values()),
            "base_svds_cached": store.hits,
            "base_svds_computed": store.misses,
        }
    rows = tuple(LayerDiagnosis(name=n, **spectra[n], **extra[n]) for n in adapter)
    count = len(rows)
    summary = DiagnosisSummary(
        num_layers=count,
        norm=math.sqrt(sum(r.norm**2 for r in rows)),
        mean_effective_rank=sum(r.effective_rank for r in rows) / count if count else 0.0,
        mean_stable_rank=sum(r.stable_rank for r in rows) / count if count else 0.0,
        rank_90=max((r.rank_90 for r in rows), default=0),
        rank_99=max((r.rank_99 for r in rows), default=0),
        **summary_extra,
    )
    return DiagnosisReport(adapter.metadata.get("source"), rows, summary)


def reduce_intruders(
    adapter: AdapterLike,
    base: BaseLike,
    scale: float = 0.75,
    top_k: int = 10,
    epsilon: float = 0.5,
    device: torch.device | str | None = None,
    cache: CacheLike = None,
    progress: bool = True,
) -> Adapter:
    """Shrink the intruder dimensions of ``adapter`` against ``base``, keeping each layer's rank.

    For each layer with intruders ``q_j`` (left singular vectors of ``M = W + dW`` found as in
    ``diagnose``), ``dW' = dW - (1 - scale) sum_j q_j q_j^T M``: the intruders' singular values in
    ``M`` become ``scale`` times what they were (0 removes them), everything else in ``M`` stays.
    The result, of rank up to ``r + #intruders``, is re-factored to the layer's rank ``r`` by
    Eckart-Young (Shuttleworth et al. 2024, sec. 6; PEFT offers the same since 0.19). Layers without
    intruders are kept as they are; changed layers get ``alpha = rank`` (scale folded into B).
    """
    adapter = _as_adapter(adapter)
    _check_options(top_k, epsilon)
    if not 0.0 <= scale <= 1.0:
        raise AdapterOpsError(f"scale must be in [0, 1] (the fraction of each intruder direction kept), got {scale}")
    dev = resolve_device(device)
    _check_adapter(adapter)
    weights = BaseWeights(base)
    targets = weights.match({n: layer.shape for n, layer in adapter.items()}, fan_in_fan_out=bool(adapter.metadata.get("fan_in_fan_out")))
    layers: dict[str, LoraLayer] = dict(adapter.items())
    for chunk, B, A, top in _merged(adapter, weights, targets, top_k, dev, _cache(cache), progress, "reducing intruders", need_weight=True):
        for i, name in enumerate(chunk.names):
            hits = (top.similarity[i] < epsilon).nonzero().flatten()
            if hits.numel() == 0:
                continue
            old = adapter[name]
            Bn, An = _intruders.shrink_directions(chunk.W[i], B[i], A[i], top.left[i][:, hits], scale, old.rank)
            dtype = torch.promote_types(old.A.dtype, old.B.dtype)
            device_ = old.A.device
            layers[name] = LoraLayer(An.to(device=device_, dtype=dtype), Bn.to(device=device_, dtype=dtype), float(An.shape[0]))
    note = f"reduce_intruders(scale={scale}, top_k={top_k}, epsilon={epsilon})"
    return Adapter(layers, {**adapter.metadata, "notes": note})


def _merged(
    adapter: Adapter,
    weights: BaseWeights,
    targets: Mapping[str, Any],
    top_k: int,
    device: torch.device,
    cache: SvdCache,
    progress: bool,
    label: str,
    need_weight: bool = False,
) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor, _intruders.MergedTop]]:
    """Per chunk of same-shape layers: the base chunk, scaled ``B`` and ``A`` on device, and the top-k of ``W + dW``."""
    groups: dict[tuple, list[str]] = {}
    for name, layer in adapter.items():
        groups.setdefault((layer.shape, layer.rank), []).append(name)
    total = sum(weights.nbytes(t) for t in targets.values())
    with Progress(label, total_items=len(targets), total_bytes=total, enabled=progress) as bar:
        for chunk in base_svd_chunks(weights, targets, list(groups.values()), device=device, cache=cache, need_weight=need_weight):
            folded = [adapter[n].to(device=device).folded(dtype=torch.float32) for n in chunk.names]
            B = torch.stack([f[0] for f in folded])  # (b, out, r)
            A = torch.stack([f[1] for f in folded])  # (b, r, in)
            k = min(top_k, chunk.S.shape[-1])
            yield chunk, B, A, _intruders.merged_top(chunk.UtW, chunk.U, chunk.S, B, A, k)
            bar.advance(len(chunk.names), sum(weights.nbytes(targets[n]) for n in chunk.names))


def _spectra(adapter: Adapter, device: torch.device) -> dict[str, dict[str, Any]]:
    """The base-free numbers of every layer, from ``Adapter.svd`` (batched by shape on ``device``)."""
    _check_adapter(adapter)
    svd = adapter._factored_svd(device)
    result = {}
    for name, layer in adapter.items():
        _, S, _, floor = svd[name]
        S = S.cpu()
        keep = linalg.numerical_rank(S, layer.shape, floor=floor)
        S = S[:keep].double()
        result[name] = {
            "shape": layer.shape,
            "rank": layer.rank,
            "numerical_rank": keep,
            "norm": float(S.square().sum().sqrt()),
            "spectral_norm": float(S[0]) if keep else 0.0,
            "singular_values": tuple(S.tolist()),
            **spectrum_stats(S),
        }
    return result


# ----------------------------------------------------------------------------------------- compare

VERDICTS = {
    "identical": "the deltas are the same",
    "scaled": "the same direction at a different strength",
    "opposite": "one undoes the other; a blend cancels",
    "disjoint": "they act on (nearly) orthogonal subspaces; a blend keeps both intact",
    "aligned": "they push the same way; a blend reinforces",
    "conflicting": "they push against each other in shared subspaces; a blend cancels part of each",
    "interfering": "they share subspaces but do different things there; check both tasks after a blend",
    "independent": "they share little; a blend mostly keeps both",
    "empty": "one of them is zero here",
}
SAME = 1e-4  # |cosine| within this of 1 counts as the same direction
DISJOINT = 0.05  # subspace overlap at or below this counts as orthogonal
ALIGNED = 0.5  # |cosine| from here on is (anti-)aligned
SHARED = 0.3  # overlap on both sides from here on is a shared subspace


@dataclass(frozen=True)
class LayerComparison(_Record):
    name: str
    shape: tuple[int, int]
    cosine: float  # <dA, dB>_F / (||dA|| ||dB||)
    norm_a: float
    norm_b: float
    output_overlap: float  # mean cos^2 of the principal angles between the column spaces, in [0, 1]
    input_overlap: float  # the same for the row spaces
    principal_cosines: tuple[float, ...]  # cosines of the principal angles between the column spaces
    verdict: str


@dataclass(frozen=True)
class ComparisonSummary(_Record):
    verdict: str
    line: str  # the one-line verdict for people
    cosine: float  # over all shared layers
    norm_a: float
    norm_b: float
    output_overlap: float  # averaged over shared layers, weighted by ||dA|| ||dB||
    input_overlap: float
    shared: int
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    counts: dict[str, int]  # layers per verdict


@dataclass(frozen=True)
class Comparison(_Record):
    a: str | None
    b: str | None
    layers: tuple[LayerComparison, ...]
    summary: ComparisonSummary
    _nested = {"layers": LayerComparison, "summary": ComparisonSummary}

    def to_pandas(self):
        return _to_pandas([r.to_dict() for r in self.layers])


def compare(a: AdapterLike, b: AdapterLike, *, device: torch.device | str | None = None) -> Comparison:
    """How two adapters relate, layer by layer, before blending them.

    Per shared layer: the cosine of the deltas (``<dA, dB>_F`` from the factors), and the principal
    angles between their column spaces (output side) and row spaces (input side): with orthonormal
    bases ``Qa``, ``Qb`` (from the factored SVD, trimmed to the numerical rank), the cosines are the
    singular values of ``Qa^T Qb`` (Bjorck & Golub 1973); the overlap is their mean square, 1 for
    the same subspace, 0 for orthogonal ones. Verdicts (``VERDICTS``): identical / scaled /
    opposite by the cosine (within ``SAME`` of +-1), disjoint when either overlap is at most
    ``DISJOINT``, aligned / conflicting when ``|cosine| >= ALIGNED``, interfering when both
    overlaps reach ``SHARED``, independent otherwise. The summary applies the same rule to the
    whole adapters (overlaps weighted by ``||dA|| ||dB||``).
    """
    a, b = _as_adapter(a), _as_adapter(b)
    dev = resolve_device(device)
    shared = [n for n in a if n in b]
    for n in shared:
        if a[n].shape != b[n].shape:
            raise ShapeMismatchError(f"layer {n}: delta shapes differ ({list(a[n].shape)} vs {list(b[n].shape)}); were these adapters trained on different models?")
    sub_a, sub_b = _subset(a, shared), _subset(b, shared)
    dots = sub_a.dot(sub_b, per_layer=True)
    norms_a, norms_b = sub_a.norm(per_layer=True), sub_b.norm(per_layer=True)
    bases_a, bases_b = _bases(sub_a, dev), _bases(sub_b, dev)
    rows = []
    for n in shared:
        na, nb = norms_a[n], norms_b[n]
        cos = _ratio(dots[n], na * nb)
        out_cos = _principal_cosines(bases_a[n][0], bases_b[n][0])
        in_cos = _principal_cosines(bases_a[n][1], bases_b[n][1])
        out_ov, in_ov = _overlap(out_cos), _overlap(in_cos)
        rows.append(LayerComparison(n, a[n].shape, cos, na, nb, out_ov, in_ov, tuple(out_cos.tolist()), _verdict(cos, out_ov, in_ov, na, nb)))
    na_all = math.sqrt(sum(v * v for v in norms_a.values()))
    nb_all = math.sqrt(sum(v * v for v in norms_b.values()))
    cos_all = _ratio(math.fsum(dots.values()), na_all * nb_all)
    weights = [r.norm_a * r.norm_b for r in rows]
    total = sum(weights)
    out_all = sum(w * r.output_overlap for w, r in zip(weights, rows)) / total if total else 0.0
    in_all = sum(w * r.input_overlap for w, r in zip(weights, rows)) / total if total else 0.0
    verdict = _verdict(cos_all, out_all, in_all, na_all, nb_all) if rows else "disjoint"
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    only_a = tuple(n for n in a if n not in b)
    only_b = tuple(n for n in b if n not in a)
    line = _line(verdict, cos_all, out_all, in_all, len(rows), counts, only_a, only_b)
    summary = ComparisonSummary(verdict, line, cos_all, na_all, nb_all, out_all, in_all, len(rows), only_a, only_b, counts)
    return Comparison(a.metadata.get("source"), b.metadata.get("source"), tuple(rows), summary)


def _verdict(cos: float, out_overlap: float, in_overlap: float, na: float, nb: float) -> str:
    if na == 0.0 or nb == 0.0:
        return "empty"
    if cos >= 1 - SAME:
        return "identical" if abs(na - nb) <= SAME * max(na, nb) else "scaled"
    if cos <= -1 + SAME:
        return "opposite"
    if min(out_overlap, in_overlap) <= DISJOINT:
        return "disjoint"
    if cos >= ALIGNED:
        return "aligned"
    if cos <= -ALIGNED:
        return "conflicting"
    if min(out_overlap, in_overlap) >= SHARED:
        return "interfering"
    return "independent"


def _line(verdict: str, cos: float, out_ov: float, in_ov: float, shared: int, counts: dict[str, int], only_a: tuple, only_b: tuple) -> str:
    text = f"{verdict}: {VERDICTS[verdict]} (cosine {cos:+.3f}, output overlap {out_ov:.2f}, input overlap {in_ov:.2f}, {shared} shared layers"
    if len(counts) > 1:
        text += "; " + ", ".join(f"{c} {v}" for v, c in sorted(counts.items(), key=lambda kv: -kv[1]))
    if only_a or only_b:
        text += f"; {len(only_a)} only in the first, {len(only_b)} only in the second"
    return text + ")"


def _bases(adapter: Adapter, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Orthonormal bases (out, k) and (in, k) of each delta's column and row space, at its numerical rank."""
    svd = adapter.svd(device=device)
    result = {}
    for name, (U, S, Vh) in svd.items():
        B, A = adapter[name].folded()
        k = linalg.numerical_rank(S, adapter[name].shape, floor=float(linalg.noise_floor(B, A)))
        result[name] = (U[:, :k], Vh[:k].mT)
    return result


def _principal_cosines(Qa: torch.Tensor, Qb: torch.Tensor) -> torch.Tensor:
    if Qa.shape[1] == 0 or Qb.shape[1] == 0:
        return torch.zeros(0)
    cdt = linalg.compute_dtype(Qa, Qb)
    return torch.linalg.svdvals(Qa.to(cdt).mT @ Qb.to(device=Qa.device, dtype=cdt)).clamp(0, 1).cpu()  # (ka, kb)


def _overlap(cosines: torch.Tensor) -> float:
    return float(cosines.double().square().mean()) if cosines.numel() else 0.0


def _subset(adapter: Adapter, names: list[str]) -> Adapter:
    return Adapter({n: adapter[n] for n in names}, adapter.metadata)


def _ratio(num: float, den: float) -> float:
    return 0.0 if den == 0.0 else max(-1.0, min(1.0, num / den))


# ----------------------------------------------------------------------------------------- helpers


def _as_adapter(value: AdapterLike) -> Adapter:
    if isinstance(value, Adapter):
        return value
    from .formats import load

    return load(value)


def _check_adapter(adapter: Adapter) -> None:
    dora = [n for n, layer in adapter.items() if layer.is_dora]
    if dora:
        raise UnsupportedOperationError(
            f"DoRA adapters cannot be diagnosed from their factors: the update rescales each row of W + BA by a learned "
            f"magnitude ({len(dora)} DoRA layers, e.g. {dora[0]}); merge it into its base and extract a LoRA instead"
        )
    bad = adapter.nonfinite_layers()
    if bad:
        raise NonFiniteError(f"cannot diagnose layers holding NaN or Inf ({len(bad)}, e.g. {bad[0]}): their spectra are undefined")


def _check_options(top_k: int, epsilon: float) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise AdapterOpsError(f"top_k must be a positive integer, got {top_k!r}")
    if not 0.0 < epsilon <= 1.0:
        raise AdapterOpsError(f"epsilon must be in (0, 1] (a threshold on |cosine|), got {epsilon}")


def _cache(cache: CacheLike) -> SvdCache:
    if cache is False:
        return SvdCache(enabled=False)
    if cache is None or cache is True:
        return SvdCache()
    return SvdCache(cache)
