"""Merge methods for ``blend``: a registry of functions keyed by name.

A method combines whole adapters into one:

    method(adapters, weights, *, rule, seed, device, **options) -> Adapter

- ``adapters``: a list of non-DoRA ``Adapter`` values (``blend`` refuses DoRA before dispatch);
  ``weights``: one finite float per adapter.
- ``rule``: the re-compression rule, exactly one of ``{"rank": k}``, ``{"energy": e}``,
  ``{"budget": n}`` (``blend`` fills in the default, the largest input rank); ``"linear"`` ignores
  it unless one was asked for.
- ``seed``: for the random methods (DARE, DELLA), so a result is reproducible.
- ``device``: a resolved ``torch.device`` (or None for the factors' own).
- ``options``: the method's own knobs (``density``, ``majority_sign``, ``epsilon``, ``gamma``,
  ...); a method raises ``AdapterOpsError`` for one it does not know or a value out of range.

The result's ``metadata["blend"]`` holds ``{"method": name, "options": {...}, "layers": {module:
{"rank": kept rank, "energy_kept": share of the merged delta's squared Frobenius norm that the
re-compression kept}}}`` for the methods that re-compress.

Methods live in ``dense`` (per-layer dense deltas: TIES, DARE, DELLA, breadcrumbs, magnitude
prune) and ``native`` (factored, never a dense delta: KnOTS, core space, TSV); the elementwise
building blocks they share live in ``sparsify``.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import AdapterOpsError

__all__ = ["METHODS", "register_method", "get_method"]

MergeMethod = Callable[..., "object"]
METHODS: dict[str, MergeMethod] = {}


def register_method(name: str) -> Callable[[MergeMethod], MergeMethod]:
    """Decorator: make ``fn`` available to ``blend(..., method=name)``."""

    def decorate(fn: MergeMethod) -> MergeMethod:
        if name in METHODS:
            raise RuntimeError(f"merge method {name!r} registered twice")
        METHODS[name] = fn
        return fn

    return decorate


def get_method(name: str) -> MergeMethod:
    _load_builtin()
    try:
        return METHODS[name]
    except KeyError:
        raise AdapterOpsError(f"unknown merge method {name!r}; choose one of {', '.join(sorted(METHODS))}") from None


def _load_builtin() -> None:
    """Import the modules that register the built-in methods (lazily, so ``adapter`` can import us)."""
    import importlib

    for module in ("dense", "native"):
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module}":
                raise
