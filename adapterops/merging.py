"""Merge LoRA adapters into base checkpoints, streaming; unmerge; merge into a live module.

The merged weight (Hu et al. 2021, LoRA, eq. 3), computed in float32 on the device, cast once:

    W' = W + sum_i w_i * s_i * B_i @ A_i      s_i = alpha_i / r_i,  B_i (out, r_i),  A_i (r_i, in)

A DoRA layer (Liu et al. 2024, DoRA, eq. 5, in PEFT's convention) rescales each output row of the
updated weight to its learned magnitude ``m`` (out,):

    V = W + s * B @ A;    W' = m * V / ||V||_row          (2-norm over the in-features of a row)

Into an NF4 base, ``rounding`` picks how ``W'`` is re-quantized: ``"nearest"`` (bitsandbytes'
rounding with fresh scales) or ``"gptq"`` (error feedback on the base's scales, for the inputs of
calibration text or, without it, the adapter's own input directions; ``adapterops.quant.gptq``).
With a Hessian at hand, rows also carry ``output_error = ||(deq(Q) - W') X|| / ||dW X||``, and
for ``"gptq"`` the ``codes_changed``, ``retained`` and ``output_error`` nearest rounding gives
(suffixed ``_nearest``).

``unmerge`` is ``merge`` with the weights negated, exact up to the output dtype's rounding; it is
refused for DoRA, whose row norms cannot be recovered from the merged weight and the adapter.
Each report row carries ``rel_change = ||dW|| / ||W||`` and ``retained``, the part of ``dW`` that
survived the cast (``1 + <enc(W') - W', dW> / ||dW||^2``: about 1 for bf16, low for NF4).

A merge is a set of jobs for the rewrite engine (``adapterops.rewrite``), one per touched weight,
reading and writing it through its codec (``adapterops.storage``). Jobs of equal-shape weights
share a key, so on CUDA the engine hands them over together and they are merged in one batched
matmul; on the CPU a dense merge works a block of rows at a time instead (``_merge_rows``),
keeping its float32 temporaries in cache. ``merge(..., dtype=...)`` on a base stored by another
codec means "write it dequantized": every weight of that codec is decoded and written by dense in
``dtype``, and config.json is adjusted.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapter import Adapter, LoraLayer
from .checkpoint import Checkpoint, match_layers
from .errors import AdapterOpsError, BaseMismatchError, ShapeMismatchError, UnsupportedOperationError
from .rewrite import Job, Task, check_output, checkpoint_inputs, resolve_device, rewrite
from .safety import Inputs
from .storage import CODECS, DENSE, Codec, logical_weights, parse_dtype
from .quant.calibration import adapter_hessian
from .quant.gptq import relative_output_error

__all__ = ["merge", "unmerge", "merge_into", "applied", "plan_merge", "MergeReport", "ROUNDINGS"]


@dataclass
class MergeReport:
    """What a merge did: one row per merged weight (``name``, ``shape``, ``rank``, ``rel_change``,
    ``retained``, ``delta_norm``, ``weight_norm``, plus any codec extras), and totals."""

    op: str
    base: str
    out: str
    adapters: list[str]
    weights: list[float]
    device: str
    dtype: str
    rows: list[dict[str, Any]]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    rounding: str = "nearest"
    calibration: dict[str, Any] | None = None

    @property
    def totals(self) -> dict[str, Any]:
        dn = math.fsum((r.get("delta_norm") or 0.0) ** 2 for r in self.rows)
        wn = math.fsum((r.get("weight_norm") or 0.0) ** 2 for r in self.rows)
        rel = [r["rel_change"] for r in self.rows if r.get("rel_change") is not None]
        kept = [r["retained"] for r in self.rows if r.get("retained") is not None]
        return {
            "tensors": self.tensors,
            "merged": len(self.rows),
            "rel_change": math.sqrt(dn / wn) if wn else None,
            "rel_change_max": max(rel, default=None),
            "retained_min": min(kept, default=None),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "seconds": self.seconds,
            "bytes_per_second": self.bytes_written / self.seconds if self.seconds else None,
            "output_error_median": _median(r.get("output_error") for r in self.rows),
            "output_error_nearest_median": _median(r.get("output_error_nearest") for r in self.rows),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op, "base": self.base, "out": self.out, "adapters": self.adapters, "weights": self.weights,
            "device": self.device, "dtype": self.dtype, "rounding": self.rounding, "calibration": self.calibration,
            "totals": self.totals, "rows": self.rows,
        }


def _median(values: Iterator[Any]) -> float | None:
    found = sorted(v for v in values if v is not None)
    return found[len(found) // 2] if found else None


@dataclass(frozen=True)
class _Term:
    adapter: str
    layer_name: str
    layer: LoraLayer
    weight: float
    transposed: bool


@dataclass(frozen=True)
class _MergeInfo:
    codec: Codec
    out_codec: Codec
    dtype: torch.dtype | None
    transposed: bool = False
    dora: bool = False
    rank: int = 0
    rounding: str = "nearest"


def merge(
    base: str | Path,
    adapters: Adapter | str | Path | Sequence[Adapter | str | Path],
    out: str | Path,
    weights: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    force: bool = False,
    rounding: str = "nearest",
    calibration: str | os.PathLike | Sequence[Sequence[int]] | None = None,
    calibration_samples: int = 128,
    max_len: int = 2048,
    allow_nonfinite: bool = False,
) -> MergeReport:
    """Write ``base`` with ``sum_i weights[i] * adapters[i]`` merged in, to ``out``, streaming.

    ``base``: a checkpoint directory, a safetensors file or a Hub repo id. ``adapters``: one or a
    list of Adapters or paths. ``weights`` default to 1. ``device``: where to compute (default CUDA
    when present). ``dtype``: output dtype (default: each tensor's own). Everything is checked
    before anything is written; the output appears only when complete, never over an input (not
    even with ``force``), and not at all when the base, an adapter or the calibration file changed
    meanwhile or a written tensor holds NaN/Inf (an fp16 overflow, a NaN in the base; with
    ``allow_nonfinite`` it is written anyway, and adapters holding NaN/Inf load).

    NF4 outputs: ``rounding`` is ``"nearest"`` or ``"gptq"`` (see the module docstring);
    ``calibration``: a JSONL file in ``train``'s shapes (or token id sequences) whose first
    ``calibration_samples`` rows, cut to ``max_len`` tokens, give the Hessians.
    """
    return _merge("merge", base, adapters, out, weights, device, dtype, progress, force,
                  (rounding, calibration, calibration_samples, max_len), allow_nonfinite=allow_nonfinite)


def unmerge(
    base: str | Path,
    adapters: Adapter | str | Path | Sequence[Adapter | str | Path],
    out: str | Path,
    weights: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    force: bool = False,
    allow_nonfinite: bool = False,
) -> MergeReport:
    """Subtract adapters that were merged into ``base`` (``weights``: those they were merged with).

    The same engine with the weights negated, and the same guarantees. Refused for DoRA adapters.
    """
    return _merge("unmerge", base, adapters, out, weights, device, dtype, progress, force, allow_nonfinite=allow_nonfinite)


def _merge(op, base, adapters, out, weights, device, dtype, progress, force, rounding_options=("nearest", None, 128, 2048), *,
           allow_nonfinite=False) -> MergeReport:
    start = time.perf_counter()
    out_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    items = [adapters] if isinstance(adapters, (Adapter, str, os.PathLike)) else list(adapters)
    if not items:
        raise AdapterOpsError(f"{op} needs at least one adapter")
    ws = [1.0] * len(items) if weights is None else [float(w) for w in weights]
    if len(ws) != len(items):
        raise AdapterOpsError(f"{len(items)} adapters but {len(ws)} weights")
    if not all(math.isfinite(w) for w in ws):
        raise AdapterOpsError(f"weights must be finite numbers, got {ws}")
    checkpoint = Checkpoint(base)
    read = [*checkpoint_inputs(checkpoint), *(i for i in (*items, rounding_options[1]) if isinstance(i, (str, os.PathLike)))]
    watched = Inputs(read)  # before anything is read: each must be unchanged when the output appears
    check_output(out, checkpoint, force, watched)
    values, labels = _load_adapters(items, allow_nonfinite)
    if op == "unmerge":
        dora = [label for a, label in zip(values, labels) if a.is_dora]
        if dora:
            raise UnsupportedOperationError(
                f"{dora[0]} is a DoRA adapter: unmerge is not defined for DoRA, because the merge rescaled each row "
                "to a learned magnitude and the original row norms cannot be recovered; merge the adapter into the original base instead"
            )
        ws = [-w for w in ws]
    rounding, calibration, samples, max_len = rounding_options
    jobs, codecs = plan_merge(checkpoint, values, ws, labels=labels, dtype=out_dtype, rounding=rounding)
    calibrated = _calibrate(checkpoint, jobs, calibration, samples, max_len, dev, progress)
    result = rewrite(checkpoint, out, jobs, device=dev, progress=progress, force=force, config=_config_editor(out_dtype, codecs), label=op,
                     inputs=watched, allow_nonfinite=allow_nonfinite)
    return MergeReport(
        op=op, base=checkpoint.source, out=str(out), adapters=labels, weights=ws, device=str(dev),
        dtype=str(out_dtype).removeprefix("torch.") if out_dtype else "as base", rows=result.rows,
        tensors=result.tensors_in, bytes_read=result.bytes_read, bytes_written=result.bytes_written,
        seconds=time.perf_counter() - start, rounding=rounding, calibration=calibrated,
    )


ROUNDINGS = ("nearest", "gptq")  # how a merge re-quantizes into NF4 (the nf4 codec's encode_many)


def _calibrate(checkpoint: Checkpoint, jobs: dict[str, Job], data, samples: int, max_len: int, device, progress: bool) -> dict[str, Any] | None:
    """Attach calibration Hessians (``extras["H"]``) to the jobs that re-quantize into NF4, in place."""
    if data is None:
        return None
    from .quant.calibration import collect_hessians

    quantized = [n for n, j in jobs.items() if j.compute is _merge_compute and j.info.out_codec.name != DENSE.name]
    if not quantized:
        raise AdapterOpsError("calibration only changes merges into a quantized (NF4) base written as NF4; drop --calibration or --dtype")
    deltas = {n: (j.extras["L"], j.extras["R"]) for n, j in jobs.items() if j.compute is _merge_compute}
    hessians = collect_hessians(checkpoint, data, quantized, deltas=deltas, samples=samples, max_len=max_len, device=device, progress=progress)
    for name in quantized:
        jobs[name] = dataclasses.replace(jobs[name], extras={**jobs[name].extras, "H": hessians[name]})
    source = str(data) if isinstance(data, (str, os.PathLike)) else "token sequences"
    return {"source": source, **hessians.summary(), "max_len": max_len}


def _load_adapters(items: Sequence[Adapter | str | Path], allow_nonfinite: bool = False) -> tuple[list[Adapter], list[str]]:
    from .formats import load

    values, labels = [], []
    for i, item in enumerate(items):
        if isinstance(item, Adapter):
            values.append(item)
            labels.append(str(item.metadata.get("source", f"adapter {i}")))
        elif isinstance(item, (str, os.PathLike)):
            values.append(load(item, allow_nonfinite=allow_nonfinite))
            labels.append(str(item))
        else:
            raise AdapterOpsError(f"adapter {i} is a {type(item).__name__}; pass an Adapter or a path")
    return values, labels


def plan_merge(
    checkpoint: Checkpoint,
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    *,
    labels: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    rounding: str = "nearest",
) -> tuple[dict[str, Job], set[str]]:
    """The jobs of a merge, and the names of the codecs whose weights are written dense.

    Every adapter is matched against the base; all problems are raised at once. ``rounding``:
    how weights re-quantized into NF4 are rounded (``ROUNDINGS``).
    """
    if rounding not in ROUNDINGS:
        raise AdapterOpsError(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")
    if rounding != "nearest" and (dtype is not None or not any(c.name != DENSE.name for c, _ in logical_weights(checkpoint).values())):
        raise AdapterOpsError(
            f"rounding {rounding!r} chooses NF4 codes, so it needs an NF4 base written as NF4; "
            "a dense output (--dtype, or a dense base) keeps the whole delta without it"
        )
    if rounding != "nearest" and any(a.is_dora for a in adapters):
        raise UnsupportedOperationError(f"rounding {rounding!r} is not supported for DoRA adapters; merge them with nearest rounding or --dtype bf16")
    labels = list(labels or [f"adapter {i}" for i in range(len(adapters))])
    stored = logical_weights(checkpoint)
    shapes = {w: codec.shape(checkpoint, w) for w, (codec, _) in stored.items()}
    terms: dict[str, list[_Term]] = {}
    problems = []
    for adapter, w, label in zip(adapters, weights, labels):
        try:
            targets = match_layers(
                {n: layer.shape for n, layer in adapter.items()}, checkpoint,
                fan_in_fan_out=bool(adapter.metadata.get("fan_in_fan_out")),
                weight_shape=lambda t: shapes[t] if t in shapes else checkpoint.shape(t),
            )
        except BaseMismatchError as exc:
            problems.append(f"{label}: {exc}")
            continue
        for name, target in targets.items():
            if target.tensor not in stored:
                problems.append(f"{label}: layer {name} maps to {target.tensor}, a {checkpoint.entry(target.tensor).dtype} tensor that cannot take a merge")
                continue
            terms.setdefault(target.tensor, []).append(_Term(label, name, adapter[name], w, target.transposed))
    for tensor, ts in terms.items():
        if len({t.transposed for t in ts}) > 1:
            problems.append(f"{tensor}: the adapters disagree on whether it is stored transposed (fan_in_fan_out)")
        if any(t.layer.is_dora for t in ts) and (len(ts) > 1 or ts[0].weight != 1.0):
            problems.append(
                f"{tensor}: DoRA layers merge only alone and with weight 1 (the DoRA update rescales rows, "
                "so it is not linear); merge the DoRA adapter in its own pass"
            )
    if problems:
        raise BaseMismatchError("; ".join(problems))
    jobs: dict[str, Job] = {}
    for tensor, ts in terms.items():
        codec, members = stored[tensor]
        jobs[tensor] = _merge_job(codec, members, ts, shapes[tensor], dtype, rounding)
    dense_codecs: set[str] = set()
    if dtype is not None:
        for weight, (codec, members) in stored.items():
            if codec.name != DENSE.name:
                dense_codecs.add(codec.name)
            if weight in jobs or (codec.name == DENSE.name and checkpoint.dtype(weight) == dtype):
                continue
            info = _MergeInfo(codec, DENSE, dtype)
            nbytes = math.prod(shapes[weight]) * dtype.itemsize
            jobs[weight] = Job(members, _convert_compute, info=info, nbytes=nbytes)
    return jobs, dense_codecs


def _merge_job(codec: Codec, members: tuple[str, ...], terms: list[_Term], shape: tuple[int, ...], dtype: torch.dtype | None, rounding: str = "nearest") -> Job:
    folded = [t.layer.to(device="cpu").folded(t.weight) for t in terms]
    cdt = torch.promote_types(*(f[0].dtype for f in folded)) if len(folded) > 1 else folded[0][0].dtype
    B = torch.cat([f[0].to(cdt) for f in folded], dim=1)  # (out, R), scales folded in
    A = torch.cat([f[1].to(cdt) for f in folded], dim=0)  # (R, in)
    transposed = terms[0].transposed
    L, R = (A.mT.contiguous(), B.mT.contiguous()) if transposed else (B, A)  # stored delta = L @ R
    extras = {"L": L, "R": R}
    dora = terms[0].layer.is_dora
    if dora:
        extras["m"] = terms[0].layer.magnitude.to(device="cpu", dtype=cdt)
    out_codec = DENSE if dtype is not None else codec
    rounding = rounding if out_codec is not DENSE else "nearest"
    info = _MergeInfo(codec, out_codec, dtype, transposed, dora, A.shape[0], rounding)
    key = None if dora else ("merge", codec.name, out_codec.name, shape, A.shape[0], transposed, dtype, cdt, rounding)
    nbytes = math.prod(shape) * dtype.itemsize if dtype is not None else None
    return Job(tuple(members), _merge_compute, extras=extras, key=key, info=info, nbytes=nbytes)


def _merge_compute(tasks: Sequence[Task]) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """``W' = W + L @ R`` for a batch of equal-shape weights (DoRA: one at a time), with stats."""
    info: _MergeInfo = tasks[0].job.info
    on_cpu = tasks[0].tensors[tasks[0].name].device.type == "cpu"
    if on_cpu and len(tasks) == 1 and info.codec is DENSE and info.out_codec is DENSE and not info.dora:
        return [_merge_rows(tasks[0], info)]
    W = _decode_batch(info.codec, [t.tensors for t in tasks], [t.name for t in tasks])  # (G, o, i) as stored
    L = torch.stack([t.extras["L"] for t in tasks]).to(W.dtype)  # (G, o, R)
    R = torch.stack([t.extras["R"] for t in tasks]).to(W.dtype)  # (G, R, i)
    w_norm = torch.linalg.vector_norm(W, dim=(-2, -1))  # (G,)
    D = torch.matmul(L, R)  # (G, o, R) @ (G, R, i) -> (G, o, i)
    if info.dora:
        V = W + D
        m = tasks[0].extras["m"].to(W.dtype)  # (out,)
        if info.transposed:  # stored (in, out): a row of the (out, in) weight is a column here
            new = V * (m / torch.linalg.vector_norm(V, dim=-2))[:, None, :]
        else:
            new = V * (m / torch.linalg.vector_norm(V, dim=-1))[:, :, None]
        D = new - W
    else:
        new = W.add_(D)
    d_norm = torch.linalg.vector_norm(D, dim=(-2, -1))  # (G,)
    H = _hessians(tasks, info, L, R)  # (G, in, in) or None
    nearest = _encode_batch(info.out_codec, new, tasks, info.dtype) if info.rounding == "nearest" or H is not None else None
    if info.rounding == "gptq":
        outputs_, extras_ = info.out_codec.encode_many(new, [t.name for t in tasks], [t.tensors for t in tasks], info.dtype, hessians=H)
        chosen = list(zip(outputs_, extras_))
    else:
        chosen = nearest
    results = []
    for g, (task, (outputs, extra)) in enumerate(zip(tasks, chosen)):
        err = _storage_error(info.out_codec, outputs, task.name, new[g])
        row = {
            "name": task.name, "shape": list(new.shape[1:]), "rank": info.rank,
            "rel_change": d_norm[g] / w_norm[g], "retained": _retained(err, D[g], d_norm[g]), "delta_norm": d_norm[g], "weight_norm": w_norm[g],
            **({"dora": True} if info.dora else {}), **extra,
        }
        if H is not None:
            row["output_error"] = relative_output_error(err, D[g], H[g])
            if info.rounding != "nearest":
                near_outputs, near_extra = nearest[g]
                near_err = _storage_error(info.out_codec, near_outputs, task.name, new[g])
                row.update(retained_nearest=_retained(near_err, D[g], d_norm[g]), output_error_nearest=relative_output_error(near_err, D[g], H[g]),
                           **{f"{k}_nearest": v for k, v in near_extra.items()})
        results.append((outputs, row))
    return results


def _retained(err: torch.Tensor | None, D: torch.Tensor, d_norm: torch.Tensor) -> torch.Tensor | float:
    """``1 + <err, dW> / ||dW||^2``: the share of the delta a stored weight kept (err = stored - W')."""
    return 1.0 if err is None else 1.0 + torch.dot(err.reshape(-1), D.reshape(-1)) / d_norm**2


def _hessians(tasks: Sequence[Task], info: _MergeInfo, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor | None:
    """``(G, in, in)``: calibration Hessians when the jobs carry them, the adapter's own for data-free
    GPTQ, else None (nearest rounding needs none)."""
    if "H" in tasks[0].extras:
        return torch.stack([t.extras["H"] for t in tasks]).to(L.dtype)
    if info.rounding == "gptq":
        return adapter_hessian(L, R)  # (G, o, R), (G, R, i): the stored delta L @ R
    return None


def _storage_error(codec: Codec, outputs: Mapping[str, torch.Tensor], name: str, W: torch.Tensor) -> torch.Tensor | None:
    """``decode(outputs) - W``: what storing ``W`` lost; None when it is stored exactly."""
    if codec is DENSE and outputs[name].dtype == W.dtype:
        return None
    decoded = codec.decode(outputs, name)
    return decoded.sub_(W) if decoded.dtype == W.dtype else decoded - W


_ROW_BLOCK = 1 << 18  # elements per block of rows in ``_merge_rows``: ~1 MB of float32, stays in cache


def _merge_rows(task: Task, info: _MergeInfo) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The dense merge of one weight on the CPU, a block of rows at a time.

    Same result and statistics as the batched path, but every float32 temporary is a block that
    stays in cache: on the CPU, memory traffic and page faults of whole-matrix temporaries cost
    more than the arithmetic (measured 2-4x).
    """
    src = task.tensors[task.name]  # (o, i) as stored
    cdt = torch.promote_types(src.dtype, torch.float32)
    L, R = task.extras["L"].to(cdt), task.extras["R"].to(cdt)  # (o, R), (R, i)
    out = torch.empty(src.shape, dtype=info.dtype or src.dtype)
    exact = out.dtype == cdt
    rows = max(1, _ROW_BLOCK // max(1, src.shape[1]))
    w2 = d2 = kept = 0.0  # ||W||^2, ||dW||^2, <stored - W', dW>, in float64
    for r0 in range(0, src.shape[0], rows):
        W = src[r0 : r0 + rows].to(cdt)
        D = L[r0 : r0 + rows] @ R  # (rows, R) @ (R, i) -> (rows, i)
        w2 += float(torch.dot(W.view(-1), W.view(-1)))
        d2 += float(torch.dot(D.view(-1), D.view(-1)))
        W += D
        block = out[r0 : r0 + rows]
        block.copy_(W)
        if not exact:
            kept += float(torch.dot(block.to(cdt).sub_(W).view(-1), D.view(-1)))
    w_norm, d_norm = math.sqrt(w2), math.sqrt(d2)
    row = {
        "name": task.name, "shape": list(src.shape), "rank": info.rank,
        "rel_change": d_norm / w_norm if w_norm else math.inf, "retained": 1.0 + kept / d2 if d2 else math.nan,
        "delta_norm": d_norm, "weight_norm": w_norm,
    }
    return {task.name: out}, row


def _decode_batch(codec: Codec, tensors: list[dict[str, torch.Tensor]], names: list[str]) -> torch.Tensor:
    """``(G, ...)`` float32: one ``codec.decode_many`` call when the codec has it, else a decode per weight."""
    if len(names) > 1 and hasattr(codec, "decode_many"):
        return codec.decode_many(tensors, names)
    decoded = [codec.decode(t, n) for t, n in zip(tensors, names)]
    return decoded[0].unsqueeze(0) if len(decoded) == 1 else torch.stack(decoded)


def _encode_batch(codec: Codec, W: torch.Tensor, tasks: Sequence[Task], dtype: torch.dtype | None) -> list[tuple[dict, dict]]:
    """``[(outputs, extras)]`` per weight of ``W`` ``(G, ...)``: one ``codec.encode_many`` call when the codec has it."""
    if len(tasks) > 1 and hasattr(codec, "encode_many"):
        outputs, extras = codec.encode_many(W, [t.name for t in tasks], [t.tensors for t in tasks], dtype)
        return list(zip(outputs, extras))
    return [codec.encode(W[g], t.name, t.tensors, dtype) for g, t in enumerate(tasks)]


def _convert_compute(tasks: Sequence[Task]) -> list[tuple[dict[str, torch.Tensor], None]]:
    """Re-store a weight without changing it (an output dtype, or writing a quantized one dense)."""
    results = []
    for task in tasks:
        info: _MergeInfo = task.job.info
        W = info.codec.decode(task.tensors, task.name)
        results.append((info.out_codec.encode(W, task.name, task.tensors, info.dtype)[0], None))
    return results


def _config_editor(dtype: torch.dtype | None, dense_codecs: set[str]) -> Callable[[dict], dict] | None:
    if dtype is None:
        return None

    def edit(config: dict[str, Any]) -> dict[str, Any]:
        for codec in dense_codecs:
            config = CODECS[codec].dense_config(config)
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = str(dtype).removeprefix("torch.")
        return config

    return edit


# ---------------------------------------------------------------------------------------------
# In-memory merge into a live module


def _module_targets(adapter: Adapter, module: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, bool]]:
    """``{adapter layer: (submodule, stored (in, out))}`` for nn.Linear and GPT-2 style Conv1D layers."""
    candidates: dict[str, tuple[torch.nn.Module, bool]] = {}
    for name, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if isinstance(sub, torch.nn.Linear):
            candidates[f"{name}.weight"] = (sub, False)
        elif type(sub).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.ndim == 2:
            candidates[f"{name}.weight"] = (sub, True)
    shapes = {n: tuple(m.weight.shape[::-1] if t else m.weight.shape) for n, (m, t) in candidates.items()}  # (out, in)
    targets = match_layers({n: layer.shape for n, layer in adapter.items()}, shapes)
    flipped = [n for n, t in targets.items() if t.transposed]
    if flipped:
        raise ShapeMismatchError(f"layer {flipped[0]}: the adapter's delta is the transpose of the module's weight; was it made for another model?")
    return {n: candidates[t.tensor] for n, t in targets.items()}


def merge_into(adapter: Adapter, module: torch.nn.Module, *, weight: float = 1.0) -> list[str]:
    """Add ``weight * delta`` to the matching weights of ``module`` in place; returns the layers changed.

    Computed in float32 on each weight's device and cast once to its dtype. DoRA layers take the
    DoRA formula (weight 1 only).
    """
    weight = float(weight)
    if adapter.is_dora and weight != 1.0:
        raise UnsupportedOperationError("a DoRA adapter merges only with weight 1 (the DoRA update is not linear)")
    targets = _module_targets(adapter, module)
    with torch.no_grad():
        for name, (sub, transposed) in targets.items():
            W = sub.weight
            layer = adapter[name].to(device=W.device)
            B, A = layer.folded(weight)
            D = B @ A  # (out, r) @ (r, in) -> (out, in)
            V = W.to(D.dtype) + (D.mT if transposed else D)
            if layer.is_dora:
                m = layer.magnitude.to(D.dtype)
                V = V * (m / torch.linalg.vector_norm(V, dim=0))[None, :] if transposed else V * (m / torch.linalg.vector_norm(V, dim=1))[:, None]
            W.copy_(V.to(W.dtype))
    return list(targets)


@contextmanager
def applied(adapter: Adapter, module: torch.nn.Module, *, weight: float = 1.0) -> Iterator[torch.nn.Module]:
    """``with applied(adapter, model): ...`` runs with the adapter merged, then restores the exact weights.

    Keeps a copy of each touched weight (on its device) while inside.
    """
    targets = _module_targets(adapter, module)
    saved = {name: sub.weight.detach().clone() for name, (sub, _) in targets.items()}
    try:
        merge_into(adapter, module, weight=weight)
        yield module
    finally:
        with torch.no_grad():
            for name, (sub, _) in targets.items():
                sub.weight.copy_(saved[name])
