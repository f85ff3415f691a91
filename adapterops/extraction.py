"""LoRA extraction: the adapter that best approximates ``tuned - base``, layer by layer.

For every 2-D linear weight that differs, ``D = W_tuned - W_base`` (out, in) in float32 (float64
when the checkpoints are) is truncated by SVD, ``D ~ U_k S_k Vh_k``, optimal in Frobenius norm
(Eckart & Young 1936), and stored as ``B = U_k sqrt(S_k)`` (out, k), ``A = sqrt(S_k) Vh_k``
(k, in) with ``alpha = k`` (scale 1). Layers of equal shape are stacked and decomposed in one
batched call on the device:

- ``energy=``: a full ``torch.linalg.svd`` (the whole spectrum is needed to know the energy);
- ``rank=``: a randomized SVD (``torch.svd_lowrank``: Halko, Martinsson & Tropp 2011, with ``k + 10``
  columns and 4 power iterations) when ``k + 10`` is at most a quarter of the smaller side, else
  the full SVD.

The energy captured per layer, ``sum(S_k^2) / ||D||_F^2``, and the method used are recorded in
``adapter.metadata["extraction"]``, along with tensors that changed but cannot be held by a LoRA
(norms, biases, embeddings).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import torch

from . import linalg
from ._progress import Progress
from .adapter import Adapter, LoraLayer
from .checkpoint import Checkpoint
from .errors import AdapterOpsError, BaseMismatchError, NonFiniteError
from .rewrite import resolve_device
from .storage import logical_weights

__all__ = ["extract"]

_EMBEDDING = re.compile(r"(^|\.)(\w*embed\w*|wte|wpe|shared)\.weight$")
_OVERSAMPLE = 10
_POWER_ITERATIONS = 4
_CHUNK_BYTES = 512 * 1024 * 1024  # float32 differences held on the device at once


def extract(
    base: str | Path,
    tuned: str | Path,
    rank: int | None = None,
    energy: float | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Adapter:
    """An Adapter approximating ``tuned - base`` on every 2-D linear weight that differs.

    Exactly one of ``rank`` (at most this rank per layer) or ``energy`` (the smallest rank keeping
    this fraction of each layer's squared singular values). ``base`` and ``tuned`` are checkpoint
    directories, safetensors files or Hub repo ids of the same architecture.
    """
    if (rank is None) == (energy is None):
        raise AdapterOpsError("extract needs exactly one of rank= or energy=")
    if rank is not None and (int(rank) != rank or rank < 1):
        raise AdapterOpsError(f"rank must be a positive integer, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise AdapterOpsError(f"energy must be in (0, 1], got {energy}")
    start = time.perf_counter()
    dev = resolve_device(device)
    b, t = Checkpoint(base), Checkpoint(tuned)
    wb, wt = logical_weights(b), logical_weights(t)
    shape_b = {n: codec.shape(b, n) for n, (codec, _) in wb.items()}
    shape_t = {n: codec.shape(t, n) for n, (codec, _) in wt.items()}
    missing = [n for n in wb if n not in wt]
    misfit = [f"{n}: base {list(shape_b[n])}, tuned {list(shape_t[n])}" for n in wb if n in wt and shape_b[n] != shape_t[n]]
    if missing or misfit:
        problems = ([f"{len(missing)} weight(s) of the base are not in the tuned checkpoint, e.g. {', '.join(missing[:3])}"] if missing else [])
        problems += [f"{len(misfit)} shape mismatch(es): {'; '.join(misfit[:3])}"] if misfit else []
        raise BaseMismatchError("; ".join(problems) + " -- are these the same architecture?")
    linear = [n for n in wb if len(shape_b[n]) == 2 and n.endswith(".weight") and not _EMBEDDING.search(n)]
    others = [n for n in wb if n not in set(linear)]
    conv1d = b.is_conv1d()
    rule, value = ("rank", int(rank)) if rank is not None else ("energy", float(energy))

    layers: dict[str, LoraLayer] = {}
    report: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[int, ...], list[str]] = {}
    for n in linear:
        groups.setdefault(shape_b[n], []).append(n)
    total = sum(2 * math.prod(shape_b[n]) for n in linear)
    with Progress("extracting", total_items=len(linear), total_bytes=total, enabled=progress) as prog, torch.no_grad():
        for shape, names in groups.items():
            per = max(1, _CHUNK_BYTES // (4 * math.prod(shape)))
            for i in range(0, len(names), per):
                chunk = names[i : i + per]
                diffs = [_read(t, wt, n, dev) - _read(b, wb, n, dev) for n in chunk]
                prog.advance(len(chunk), sum(2 * math.prod(shape) for _ in chunk))
                bad = [n for n, d in zip(chunk, diffs) if not bool(torch.isfinite(d).all())]
                if bad:
                    raise NonFiniteError(f"{bad[0]}: NaN or Inf in the base or the fine-tuned weight, whose difference then has no SVD")
                changed = [(n, d.mT if conv1d else d) for n, d in zip(chunk, diffs) if bool(d.any())]
                if changed:
                    _decompose(changed, rule, value, layers, report)
    skipped = [n for n in others if not torch.equal(_read(t, wt, n, "cpu"), _read(b, wb, n, "cpu"))]
    layers = {n[: -len(".weight")]: layers[n] for n in linear if n in layers}
    methods = {r["method"] for r in report.values()}
    metadata = {
        "base_model": b.source,
        "notes": f"extract({rule}={value}) from {t.source}",
        "extraction": {
            "rule": rule,
            "value": value,
            "method": methods.pop() if len(methods) == 1 else ("mixed" if methods else "none"),
            "device": str(dev),
            "seconds": time.perf_counter() - start,
            "unchanged": len(linear) - len(report),
            "skipped": skipped,
            "layers": {n[: -len(".weight")]: report[n] for n in linear if n in report},
        },
    }
    if conv1d:
        metadata["fan_in_fan_out"] = True
    return Adapter(layers, metadata)


def _read(ck: Checkpoint, stored: dict, name: str, device: torch.device | str) -> torch.Tensor:
    codec, members = stored[name]
    tensors = {m: ck.read(m).to(device) for m in members}
    return codec.decode(tensors, name)


def _decompose(changed: list[tuple[str, torch.Tensor]], rule: str, value: float, layers: dict, report: dict) -> None:
    """Truncated SVD of equal-shape differences (out, in), stacked; fills ``layers`` and ``report``."""
    D = torch.stack([d for _, d in changed])  # (G, out, in)
    out, inp = D.shape[-2:]
    q = int(value) + _OVERSAMPLE if rule == "rank" else 0
    randomized = rule == "rank" and 4 * q <= min(out, inp)
    if randomized:
        U, S, V = torch.svd_lowrank(D, q=q, niter=_POWER_ITERATIONS)  # (G, out, q), (G, q), (G, in, q)
        Vh = V.mT
    else:
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)  # (G, out, k), (G, k), (G, k, in)
    totals = torch.linalg.vector_norm(D, dim=(-2, -1)).double() ** 2  # ||D||_F^2, exact either way
    spectra = {n: S[i] for i, (n, _) in enumerate(changed)}
    ranks = linalg.select_ranks(spectra, {n: (out, inp) for n, _ in changed}, rule=rule, value=value)
    for i, (name, _) in enumerate(changed):
        k = max(ranks[name], 1)
        root = S[i, :k].sqrt()
        B = U[i, :, :k] * root  # (out, k)
        A = root[:, None] * Vh[i, :k]  # (k, in)
        layers[name] = LoraLayer(A.contiguous().cpu(), B.contiguous().cpu(), float(k))
        captured = float((S[i, :k].double() ** 2).sum() / totals[i]) if totals[i] > 0 else 1.0
        report[name] = {"rank": k, "energy": min(captured, 1.0), "method": "randomized" if randomized else "full"}
