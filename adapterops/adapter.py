"""LoRA adapters as immutable values with exact algebra in factored form.

A layer holds ``A`` (r, in), ``B`` (out, r) and ``alpha``; its delta is ``alpha / r * B @ A``
(Hu et al. 2021, LoRA, eq. 3). Sums concatenate ranks, so every operator is exact; results fold
their scale into ``B`` and set ``alpha = rank``. ``compress`` re-factors optimally (Eckart-Young).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from . import linalg
from .errors import AdapterOpsError, NonFiniteError, ShapeMismatchError, UnsupportedOperationError

__all__ = ["LoraLayer", "Adapter", "lora_scale", "blend", "interpolate", "cosine"]


def lora_scale(alpha: float, rank: int, *, rslora: bool = False) -> float:
    """The LoRA scale: ``alpha / rank``, or ``alpha / sqrt(rank)`` for rsLoRA (Kalajdzievski 2023).

    The one place this formula lives; every format and path calls it.
    """
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """One low-rank update: ``delta = alpha / rank * B @ A``.

    ``magnitude`` is set only for DoRA layers (Liu et al. 2024): their merged weight is
    ``magnitude * (W + delta) / ||W + delta||_row``, which is not linear in the factors.
    """

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    alpha: float
    magnitude: torch.Tensor | None = None  # (out,), DoRA only

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2:
            raise ShapeMismatchError(f"LoRA factors must be 2-D, got A {list(self.A.shape)} and B {list(self.B.shape)}")
        if self.B.shape[1] != self.A.shape[0]:
            raise ShapeMismatchError(f"B is {list(self.B.shape)} but A is {list(self.A.shape)}: inner ranks differ")
        if self.A.shape[0] == 0:
            raise ShapeMismatchError("a LoRA layer needs rank >= 1")
        if self.magnitude is not None and self.magnitude.shape != (self.B.shape[0],):
            raise ShapeMismatchError(f"DoRA magnitude is {list(self.magnitude.shape)}, expected [{self.B.shape[0]}]")
        object.__setattr__(self, "alpha", float(self.alpha))

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the delta: (out, in)."""
        return (self.B.shape[0], self.A.shape[1])

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def num_params(self) -> int:
        return self.A.numel() + self.B.numel() + (0 if self.magnitude is None else self.magnitude.numel())

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``scale * B @ A`` (out, in), computed in at least float32."""
        cdt = linalg.compute_dtype(self.A, self.B)
        out = self.scale * (self.B.to(cdt) @ self.A.to(cdt))  # (out, r) @ (r, in) -> (out, in)
        return out.to(dtype or torch.promote_types(self.A.dtype, self.B.dtype))

    def folded(self, weight: float = 1.0, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors ``(weight * scale * B, A)`` in ``dtype`` (default: the compute dtype)."""
        cdt = dtype or linalg.compute_dtype(self.A, self.B)
        return (weight * self.scale) * self.B.to(cdt), self.A.to(cdt)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoraLayer:
        mag = None if self.magnitude is None else self.magnitude.to(device=device, dtype=dtype)
        return LoraLayer(self.A.to(device=device, dtype=dtype), self.B.to(device=device, dtype=dtype), self.alpha, mag)

    def __repr__(self) -> str:
        dora = ", dora" if self.is_dora else ""
        return f"LoraLayer(shape={self.shape}, rank={self.rank}, alpha={self.alpha:g}{dora}, dtype={self.A.dtype})"


Scalar = int | float


class Adapter(Mapping[str, LoraLayer]):
    """An immutable mapping from module path (``model.layers.0.self_attn.q_proj``) to LoraLayer.

    Supports ``a + b``, ``a - b``, ``-a``, ``a * s``, ``s * a`` and ``a / s``, all exact.
    """

    __slots__ = ("_layers", "_metadata")
    __array_ufunc__ = None  # `numpy_scalar * adapter` defers to Adapter.__rmul__

    def __init__(self, layers: Mapping[str, LoraLayer], metadata: Mapping[str, Any] | None = None) -> None:
        for name, layer in layers.items():
            if not isinstance(layer, LoraLayer):
                raise TypeError(f"layer {name!r} is {type(layer).__name__}, expected LoraLayer")
        object.__setattr__(self, "_layers", dict(layers))
        object.__setattr__(self, "_metadata", MappingProxyType(dict(metadata or {})))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Adapter is immutable; operations return new adapters")

    # Mapping protocol
    def __getitem__(self, name: str) -> LoraLayer:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        return f"Adapter({len(self)} layers, rank {self.rank}, {self.num_params:,} params)"

    # Properties
    @property
    def metadata(self) -> Mapping[str, Any]:
        return self._metadata

    @property
    def rank(self) -> int:
        """The largest layer rank (0 for an empty adapter)."""
        return max((layer.rank for layer in self.values()), default=0)

    @property
    def ranks(self) -> dict[str, int]:
        return {name: layer.rank for name, layer in self.items()}

    @property
    def num_params(self) -> int:
        return sum(layer.num_params for layer in self.values())

    @property
    def is_dora(self) -> bool:
        return any(layer.is_dora for layer in self.values())

    def delta(self, name: str) -> torch.Tensor:
        """Dense delta (out, in) of one layer."""
        return self._layers[name].delta()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Adapter:
        return Adapter({n: layer.to(device, dtype) for n, layer in self.items()}, self.metadata)

    def with_metadata(self, **updates: Any) -> Adapter:
        """A copy with metadata entries added or replaced."""
        return Adapter(self._layers, {**self.metadata, **updates})

    def nonfinite_layers(self) -> list[str]:
        """Names of layers whose factors (or alpha) hold NaN or Inf."""
        bad = []
        for name, layer in self.items():
            tensors = [layer.A, layer.B] + ([layer.magnitude] if layer.is_dora else [])
            if not math.isfinite(layer.alpha) or not all(bool(torch.isfinite(t).all()) for t in tensors):
                bad.append(name)
        return bad

    # Algebra
    def __add__(self, other: Adapter) -> Adapter:
        if not isinstance(other, Adapter):
            return NotImplemented
        return _exact_sum([self, other], [1.0, 1.0])

    def __sub__(self, other: Adapter) -> Adapter:
        if not isinstance(other, Adapter):
            return NotImplemented
        return _exact_sum([self, other], [1.0, -1.0])

    def __neg__(self) -> Adapter:
        return _exact_sum([self], [-1.0])

    def __mul__(self, s: Scalar) -> Adapter:
        if not _is_scalar(s):
            return NotImplemented
        return _exact_sum([self], [float(s)])

    __rmul__ = __mul__

    def __truediv__(self, s: Scalar) -> Adapter:
        if not _is_scalar(s):
            return NotImplemented
        if s == 0:
            raise ZeroDivisionError("adapter divided by zero")
        return _exact_sum([self], [1.0 / float(s)])

    def dot(self, other: Adapter, *, per_layer: bool = False) -> float | dict[str, float]:
        """Frobenius inner product of the deltas, summed over shared layers (or per shared layer)."""
        _refuse_dora("dot", self, other)
        values = {}
        for name in self.keys() & other.keys():
            a, b = self[name], other[name]
            _check_same_shape(name, [a, b])
            wide = torch.float64 if a.A.device.type != "mps" else None  # the squares of large deltas overflow float32
            Ba, Aa = a.folded(dtype=wide)
            Bb, Ab = b.to(device=a.A.device).folded(dtype=Ba.dtype)
            values[name] = float(linalg.factored_inner(Ba, Aa, Bb, Ab))
        values = {n: values[n] for n in self if n in values}
        return values if per_layer else math.fsum(values.values())

    def norm(self, *, per_layer: bool = False) -> float | dict[str, float]:
        """Frobenius norm of the whole delta (or of each layer's)."""
        _refuse_dora("norm", self)
        squares = self.dot(self, per_layer=True)
        if per_layer:
            return {n: math.sqrt(max(v, 0.0)) for n, v in squares.items()}
        return math.sqrt(max(math.fsum(squares.values()), 0.0))

    def svd(self, *, device: torch.device | str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Thin SVD ``(U, S, Vh)`` of every layer's delta, from the factors, batched by shape."""
        return {n: f[:3] for n, f in self._factored_svd(device).items()}

    def _factored_svd(self, device: torch.device | str | None) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
        """``(U, S, Vh, noise floor)`` per layer; layers of equal shape, rank and dtype run as one batch.

        Raises NonFiniteError for layers holding NaN or Inf (their SVD is undefined).
        """
        _refuse_dora("svd", self)
        result = {}
        for names in _groups_by_shape(self).values():
            layers = [self[n] for n in names]
            cdt = linalg.compute_dtype(layers[0].A, layers[0].B)
            dev = layers[0].A.device if device is None else torch.device(device)
            scales = torch.tensor([layer.scale for layer in layers], dtype=cdt, device=dev)
            B = torch.stack([layer.B for layer in layers]).to(device=dev, dtype=cdt) * scales[:, None, None]  # (n, out, r)
            A = torch.stack([layer.A for layer in layers]).to(device=dev, dtype=cdt)  # (n, r, in)
            floors = linalg.noise_floor(B, A)  # (n,), NaN where a factor is not finite
            bad = [name for name, ok in zip(names, torch.isfinite(floors).tolist()) if not ok]
            if bad:
                raise NonFiniteError(f"cannot compute the SVD of layers holding NaN or Inf ({len(bad)}, e.g. {bad[0]}); fix or drop them first")
            U, S, Vh = linalg.factored_svd(B, A)
            for i, (name, floor) in enumerate(zip(names, floors.tolist())):
                result[name] = (U[i], S[i], Vh[i], floor)
        return {n: result[n] for n in self}

    def compress(
        self,
        rank: int | None = None,
        energy: float | None = None,
        budget: int | None = None,
        device: torch.device | str | None = None,
    ) -> Adapter:
        """The best approximation (Frobenius norm) under exactly one of:

        - ``rank``: at most this rank per layer;
        - ``energy``: keep this fraction of each layer's squared singular values;
        - ``budget``: total parameter count, shared by one global singular-value threshold.

        With ``B @ A = U S Vh`` (from QR of the factors and an SVD of the r x r core, see
        ``linalg.factored_svd``), keeping the top ``k`` values gives ``B' = U_k S_k^1/2``,
        ``A' = S_k^1/2 Vh_k``, alpha = k: by Eckart-Young (1936) no rank-k matrix is closer to the
        delta. Singular values at round-off level count as zero, so ``(a - a).compress(...)`` is
        empty. Layers that end with rank 0 are dropped. Results are on ``device`` when given.
        """
        given = {k: v for k, v in {"rank": rank, "energy": energy, "budget": budget}.items() if v is not None}
        if len(given) != 1:
            raise AdapterOpsError("compress needs exactly one of rank=, energy= or budget=")
        (rule, value), = given.items()
        _refuse_dora("compress", self)
        factors = self._factored_svd(device)
        ranks = linalg.select_ranks(
            {n: f[1] for n, f in factors.items()},
            {n: layer.shape for n, layer in self.items()},
            rule=rule,
            value=value,
            floors={n: f[3] for n, f in factors.items()},
        )
        layers = {}
        for name, (U, S, Vh, _) in factors.items():
            k = ranks[name]
            if k == 0:
                continue
            root = S[:k].sqrt()
            dtype = _result_dtype([self[name]])
            B = (U[:, :k] * root).to(dtype)  # (out, k)
            A = (root[:, None] * Vh[:k]).to(dtype)  # (k, in)
            layers[name] = LoraLayer(A, B, float(k))
        return Adapter(layers, _combined_metadata([self], note=f"compress({rule}={value})"))

    def save(
        self, path: str, format: str | None = None, *, force: bool = False, base: str | None = None, inputs: Any = (), allow_nonfinite: bool = False
    ) -> None:
        """Write to ``path`` as ``native`` (one safetensors file), ``peft`` (directory), ``kohya`` or
        ``gguf`` (llama.cpp; needs ``base``, the base model's HF directory, Hub id or GGUF file).

        The format defaults to ``peft`` for a path without a suffix, ``gguf`` for ``.gguf`` and
        ``native`` otherwise. ``inputs`` (never overwritten) and ``allow_nonfinite``: see ``formats.save``.
        """
        from .formats import save

        save(self, path, format=format, force=force, base=base, inputs=inputs, allow_nonfinite=allow_nonfinite)

    def merge_into(self, module: Any, weight: float = 1.0) -> list[str]:
        """Add ``weight * delta`` to the matching weights of a live ``nn.Module`` in place (see ``merging.merge_into``)."""
        from .merging import merge_into

        return merge_into(self, module, weight=weight)

    def applied(self, module: Any, weight: float = 1.0) -> Any:
        """Context manager: merged into ``module`` inside, exact original weights restored on exit."""
        from .merging import applied

        return applied(self, module, weight=weight)


def blend(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    method: str = "linear",
    density: float | None = None,
    rank: int | None = None,
    energy: float | None = None,
    budget: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    **options: Any,
) -> Adapter:
    """Merge ``adapters`` with ``weights`` (default: equal, summing to 1) by a named ``method``.

    ``"linear"`` is ``sum_i weights[i] * adapters[i]``, exact: ranks concatenate, scales fold into
    B; with ``rank``/``energy``/``budget`` it is re-compressed optimally. Every other method
    (``ties``, ``dare_ties``, ``knots_ties``, ...; see ``adapterops.methods``) is re-compressed
    by at most one of ``rank``, ``energy``, ``budget``, default the largest input rank, and
    reports per layer the kept rank and energy in ``metadata["blend"]``. ``density`` (in (0, 1])
    and ``options`` (``majority_sign``, ``epsilon``, ``gamma``, ...) go to the method, which
    refuses those it does not take; ``seed`` makes the random methods reproducible; ``device``
    is where the work runs (default: where the factors are).
    """
    from .methods import get_method

    adapters = list(adapters)
    if not adapters:
        raise AdapterOpsError("blend needs at least one adapter")
    for i, adapter in enumerate(adapters):
        if not isinstance(adapter, Adapter):
            raise AdapterOpsError(f"blend input {i} is a {type(adapter).__name__}, expected an Adapter")
    weights = [1.0 / len(adapters)] * len(adapters) if weights is None else _finite_weights(weights)
    if len(adapters) != len(weights):
        raise AdapterOpsError(f"{len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
    _refuse_dora(f"blend (method {method})", *adapters)
    fn = get_method(method)
    bad = [n for a in adapters for n in a.nonfinite_layers()] if method != "linear" else []
    if bad:
        raise NonFiniteError(f"layer {bad[0]} holds NaN or Inf, which method {method!r} cannot work with; only the exact 'linear' sum carries them")
    if density is not None:
        if not _is_scalar(density) or not 0 < float(density) <= 1:
            raise AdapterOpsError(f"density must be in (0, 1], got {density}")
        options["density"] = float(density)
    given = {k: v for k, v in {"rank": rank, "energy": energy, "budget": budget}.items() if v is not None}
    if len(given) > 1:
        raise AdapterOpsError(f"give at most one of rank=, energy=, budget= (got {', '.join(given)})")
    if given or not getattr(fn, "exact_by_default", False):
        rule = given or {"rank": max(a.rank for a in adapters)}
    else:
        rule = None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise AdapterOpsError(f"seed must be an integer, got {seed!r}")
    if device is not None:
        from .rewrite import resolve_device

        device = resolve_device(device)
    return fn(adapters, weights, rule=rule, seed=int(seed), device=device, **options)


def _finite_weights(weights: Sequence[float]) -> list[float]:
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise AdapterOpsError(f"weights must be numbers, got {list(weights)!r}") from None
    bad = [i for i, w in enumerate(values) if not math.isfinite(w)]
    if bad:
        raise AdapterOpsError(f"weight {bad[0]} is {values[bad[0]]}; weights must be finite numbers")
    return values


def _exact_sum(adapters: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """``sum_i weights[i] * adapters[i]``, exact: ranks concatenate, scales fold into B.

    A layer present in only some adapters gets only their terms.
    """
    adapters = list(adapters)
    weights = [float(w) for w in weights]
    if len(adapters) != len(weights):
        raise AdapterOpsError(f"{len(adapters)} adapters but {len(weights)} weights")
    if not adapters:
        raise AdapterOpsError("blend needs at least one adapter")
    _refuse_dora("linear algebra", *adapters)
    names = list(dict.fromkeys(n for a in adapters for n in a))
    layers = {}
    for name in names:
        terms = [(a[name], w) for a, w in zip(adapters, weights) if name in a]
        _check_same_shape(name, [t[0] for t in terms])
        device = terms[0][0].A.device
        cdt = linalg.compute_dtype(*(t for layer, _ in terms for t in (layer.A, layer.B)))
        folded = [layer.to(device=device).folded(w, dtype=cdt) for layer, w in terms]
        dtype = _result_dtype([t[0] for t in terms])
        B = torch.cat([f[0] for f in folded], dim=1).to(dtype)  # (out, r1 + r2 + ...)
        A = torch.cat([f[1] for f in folded], dim=0).to(dtype)  # (r1 + r2 + ..., in)
        layers[name] = LoraLayer(A, B, float(A.shape[0]))
    return Adapter(layers, _combined_metadata(adapters))


def interpolate(a: Adapter, b: Adapter, t: float) -> Adapter:
    """``(1 - t) * a + t * b``."""
    return blend([a, b], [1.0 - t, t])


def cosine(a: Adapter, b: Adapter, *, per_layer: bool = False) -> float | dict[str, float]:
    """Cosine similarity of two adapters' deltas: overall (over all layers), or per shared layer.

    0.0 where either side is zero.
    """
    if per_layer:
        dots, na, nb = a.dot(b, per_layer=True), a.norm(per_layer=True), b.norm(per_layer=True)
        return {n: _safe_ratio(d, na[n] * nb[n]) for n, d in dots.items()}
    return _safe_ratio(a.dot(b), a.norm() * b.norm())


def _safe_ratio(num: float, den: float) -> float:
    return 0.0 if den == 0.0 else max(-1.0, min(1.0, num / den))


def _is_scalar(s: Any) -> bool:
    if isinstance(s, torch.Tensor):
        return s.numel() == 1
    return isinstance(s, numbers.Real) and not isinstance(s, bool)  # numpy scalars too


def _refuse_dora(op: str, *adapters: Adapter) -> None:
    for adapter in adapters:
        dora = [n for n, layer in adapter.items() if layer.is_dora]
        if dora:
            raise UnsupportedOperationError(
                f"{op} is not defined for DoRA adapters: the DoRA update rescales each row by a learned "
                f"magnitude over the norm of W + BA, which is not linear in the factors "
                f"({len(dora)} DoRA layers, e.g. {dora[0]}); merge it into its base instead"
            )


def _check_same_shape(name: str, layers: Sequence[LoraLayer]) -> None:
    shapes = {layer.shape for layer in layers}
    if len(shapes) > 1:
        listed = " vs ".join(str(list(s)) for s in dict.fromkeys(layer.shape for layer in layers))
        raise ShapeMismatchError(f"layer {name}: delta shapes differ ({listed}); were these adapters trained on different models?")


def _result_dtype(layers: Sequence[LoraLayer]) -> torch.dtype:
    dtype = layers[0].A.dtype
    for layer in layers:
        dtype = torch.promote_types(dtype, torch.promote_types(layer.A.dtype, layer.B.dtype))
    return dtype


def _groups_by_shape(adapter: Adapter) -> dict[tuple, list[str]]:
    groups: dict[tuple, list[str]] = {}
    for name, layer in adapter.items():
        key = (layer.shape, layer.rank, layer.A.device, layer.A.dtype, layer.B.dtype)
        groups.setdefault(key, []).append(name)
    return groups


def _combined_metadata(adapters: Sequence[Adapter], note: str | None = None) -> dict[str, Any]:
    """Metadata every operand agrees on (base model, task type), plus an optional note.

    Operands made for different base models still combine (the shapes decide), with a warning.
    """
    meta: dict[str, Any] = {}
    for key in ("base_model", "task_type"):
        values = {a.metadata.get(key) for a in adapters}
        if len(values) == 1 and None not in values:
            meta[key] = values.pop()
    bases = sorted({str(a.metadata["base_model"]) for a in adapters if a.metadata.get("base_model")})
    if len(bases) > 1:
        warnings.warn(f"the adapters were made for different base models ({', '.join(bases)}); the result records none", stacklevel=3)
    if note:
        meta["notes"] = note
    return meta
