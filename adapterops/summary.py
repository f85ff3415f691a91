"""A plain-data description of an adapter file, for ``adapterops info``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .formats import load


def summarize(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> dict[str, Any]:
    """Format, size, ranks, scales, parameter count and per-layer delta norms of the adapter at ``path``."""
    path = Path(path)
    adapter = load(path, allow_nonfinite=allow_nonfinite)
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    norms = {} if adapter.is_dora else adapter.norm(per_layer=True)
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
        "norm": None if adapter.is_dora else adapter.norm(),
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
