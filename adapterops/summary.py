"""A plain-data description of an adapter file, for ``adapterops info``."""

from __future__ import annotations

import math
import os
from typing import Any

from .formats import load, locate


def summarize(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> dict[str, Any]:
    """Format, size, ranks, scales, parameter count and per-layer delta norms of the adapter at ``path``.

    Norms are None for DoRA adapters and for layers holding NaN/Inf (listed in ``nonfinite_layers``),
    so that the result is always valid JSON.
    """
    adapter = load(path, allow_nonfinite=allow_nonfinite)
    local, _ = locate(path)  # a Hub id's files are in the cache
    files = [p for p in local.rglob("*") if p.is_file()] if local.is_dir() else [local]
    norms = {} if adapter.is_dora else {n: _finite(v) for n, v in adapter.norm(per_layer=True).items()}
    dtypes = sorted({str(layer.A.dtype).removeprefix("torch.") for layer in adapter.values()})
    return {
        "path": str(path),
        "format": adapter.metadata.get("format"),
        "base_model": adapter.metadata.get("base_model"),
        "dora": adapter.is_dora,
        "num_layers": len(adapter),
        "rank": adapter.rank,
        "num_params": adapter.num_params,
        "file_size": sum(p.stat().st_size for p in files),
        "dtypes": dtypes,
        "norm": None if adapter.is_dora else _finite(adapter.norm()),
        "nonfinite_layers": adapter.nonfinite_layers(),
        "layers": [
            {
                "name": name,
                "shape": list(layer.shape),
                "rank": layer.rank,
                "alpha": layer.alpha,
                "scale": layer.scale,
                "norm": norms.get(name),
            }
            for name, layer in adapter.items()
        ],
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
