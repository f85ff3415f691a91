"""Quantize a base checkpoint to NF4, streaming, in the layout transformers + bitsandbytes load.

Every 2-D floating ``*.weight`` whose module path matches no skip pattern becomes the six
bitsandbytes entries of an NF4 weight (see ``quant.nf4.to_state_dict``); everything else (output
head, embeddings, norms, biases, any tensor that is not 2-D) is copied byte for byte. The same
streaming engine as ``merge`` does the work (``adapterops.rewrite``): shards, index,
metadata and side files carry over, weights of equal shape are quantized in batches on a GPU.
``config.json`` gains the ``quantization_config`` transformers itself writes for a
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...)`` model.

Each report row gives ``rel_error = ||Q(W) - W|| / ||W||`` (Frobenius; ``Q`` quantize then
dequantize), the error NF4 adds to that weight. With calibration text (``calibration=``) rows
also carry ``output_error = ||(Q(W) - W) X|| / ||W X||`` for the inputs ``X`` of that layer
(``adapterops.quant.calibration``); ``rounding="gptq"`` then chooses the codes by error feedback
on bitsandbytes' own scales (``adapterops.quant.gptq``), and the rows carry nearest rounding's
``rel_error_nearest`` and ``output_error_nearest`` beside them.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint
from ..errors import AdapterOpsError, UnsupportedOperationError
from ..rewrite import Job, Task, check_output, resolve_device, rewrite
from .gptq import quantize_gptq_many, relative_output_error
from .nf4 import BLOCKSIZES, FLOAT_DTYPES, dequantize_nf4_many, quantize_nf4_many, to_state_dict

__all__ = ["quantize_checkpoint", "QuantizeReport", "DEFAULT_SKIP", "quantization_config"]

# Module paths left unquantized by default: output heads, embeddings, norms (regex, searched).
DEFAULT_SKIP = (r"lm_head", r"embed", r"norm", r"(^|\.)(wte|wpe|shared)$", r"(^|\.)(score|classifier|qa_outputs)$")


@dataclass(frozen=True)
class _Settings:
    blocksize: int
    double_quant: bool
    rounding: str = "nearest"


@dataclass
class QuantizeReport:
    """What ``quantize_checkpoint`` did: one row per quantized weight (``name``, ``shape``,
    ``rel_error``), the 2-D weights it left alone (``skipped``), and totals."""

    base: str
    out: str
    blocksize: int
    double_quant: bool
    device: str
    rows: list[dict[str, Any]]
    skipped: list[str]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    rounding: str = "nearest"
    calibration: dict[str, Any] | None = None

    @property
    def totals(self) -> dict[str, Any]:
        rows = [r for r in self.rows if r.get("rel_error") is not None and r.get("weight_norm")]
        err = math.fsum((r["rel_error"] * r["weight_norm"]) ** 2 for r in rows)
        norm = math.fsum(r["weight_norm"] ** 2 for r in rows)
        return {
            "tensors": self.tensors,
            "quantized": len(self.rows),
            "skipped": len(self.skipped),
            "rel_error": math.sqrt(err / norm) if norm else None,
            "rel_error_max": max((r["rel_error"] for r in rows), default=None),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "seconds": self.seconds,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": "quantize", "base": self.base, "out": self.out, "quant_type": "nf4", "blocksize": self.blocksize,
            "double_quant": self.double_quant, "device": self.device, "rounding": self.rounding,
            "calibration": self.calibration, "totals": self.totals,
            "skipped": self.skipped, "rows": self.rows,
        }


def quantization_config(*, compute_dtype: str, double_quant: bool, skip_modules: list[str] | None) -> dict[str, Any]:
    """The ``quantization_config`` transformers writes for a bitsandbytes NF4 model (same keys)."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def _compile(patterns: Sequence[str]) -> list[re.Pattern]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise AdapterOpsError(f"skip pattern {p!r} is not a valid regular expression ({exc})") from None
    return compiled


def _select(checkpoint: Checkpoint, skip: Sequence[re.Pattern]) -> tuple[list[str], list[str]]:
    """(weights to quantize, 2-D floating weights left alone), in checkpoint order."""
    chosen, left = [], []
    for name in checkpoint.names():
        if not name.endswith(".weight") or len(checkpoint.shape(name)) != 2 or checkpoint.entry(name).dtype not in ("F16", "BF16", "F32"):
            continue
        module = name[: -len(".weight")]
        (left if any(p.search(module) for p in skip) else chosen).append(name)
    return chosen, left


def _quantize_compute(tasks: Sequence[Task]) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    settings: _Settings = tasks[0].job.info
    weights = [t.tensors[t.name] for t in tasks]
    nearest = quantize_nf4_many(weights, blocksize=settings.blocksize, double_quant=settings.double_quant)
    H = torch.stack([t.extras["H"] for t in tasks]).float() if "H" in tasks[0].extras else None  # (G, in, in)
    qs = nearest
    if settings.rounding == "gptq":
        qs = quantize_gptq_many(torch.stack([w.float() for w in weights]), H, like=nearest)
    restored = dequantize_nf4_many(qs, dtype=torch.float32)
    near_restored = dequantize_nf4_many(nearest, dtype=torch.float32) if qs is not nearest else restored
    results = []
    for g, (task, w, q, r) in enumerate(zip(tasks, weights, qs, restored)):
        w32 = w.float()
        norm = torch.linalg.vector_norm(w32)
        row = {"name": task.name, "shape": list(w.shape), "rel_error": torch.linalg.vector_norm(r - w32) / norm, "weight_norm": norm}
        if H is not None:
            row["output_error"] = relative_output_error(r - w32, w32, H[g])
            if qs is not nearest:
                e_near = near_restored[g] - w32
                row.update(rel_error_nearest=torch.linalg.vector_norm(e_near) / norm, output_error_nearest=relative_output_error(e_near, w32, H[g]))
        results.append((to_state_dict(q, task.name), row))
    return results


ROUNDINGS = ("nearest", "gptq")


def quantize_checkpoint(
    base: str | Path,
    out: str | Path,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    skip: Sequence[str] = (),
    device: str | torch.device | None = None,
    progress: bool = True,
    force: bool = False,
    allow_nonfinite: bool = False,
    rounding: str = "nearest",
    calibration: str | Path | Sequence[Sequence[int]] | None = None,
    calibration_samples: int = 128,
    max_len: int = 2048,
) -> QuantizeReport:
    """Write ``base`` with its linear weights in NF4 to ``out`` (a directory), streaming.

    ``skip``: regular expressions; a weight whose module path (its name without ``.weight``)
    matches one stays unquantized, in addition to ``DEFAULT_SKIP``. ``double_quant``: store the
    block scales in 8 bits too (QLoRA's double quantization). ``rounding``: ``"nearest"``
    (bitsandbytes') or ``"gptq"``, which needs ``calibration``: a JSONL file in ``train``'s shapes
    (or token id sequences), its first ``calibration_samples`` rows cut to ``max_len`` tokens.
    Everything is checked before anything is written; the output appears only when complete, and
    not at all when a quantized weight holds NaN/Inf (unless ``allow_nonfinite``) or the base
    changed meanwhile.
    """
    start = time.perf_counter()
    if rounding not in ROUNDINGS:
        raise AdapterOpsError(f"unknown rounding {rounding!r}; choose one of {', '.join(ROUNDINGS)}")
    if rounding == "gptq" and calibration is None:
        raise AdapterOpsError(
            "rounding 'gptq' needs calibration text when quantizing a dense model (pass calibration=, or --calibration on the "
            "command line); only a merge has an adapter whose directions can stand in for data"
        )
    if blocksize not in BLOCKSIZES:
        raise AdapterOpsError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize}")
    checkpoint = Checkpoint(base)
    check_output(out, checkpoint, force)
    if checkpoint.is_nf4():
        raise UnsupportedOperationError(f"{checkpoint.source} is already quantized (it holds bitsandbytes NF4 weights)")
    if checkpoint.is_conv1d():
        raise UnsupportedOperationError(
            f"{checkpoint.source}: GPT-2 style Conv1D weights are stored (in, out), which bitsandbytes' Linear4bit does not load; "
            "quantize such models at load time with transformers instead"
        )
    if checkpoint.path.is_file() and Path(out).suffix == ".safetensors":
        raise AdapterOpsError(f"{out}: quantize writes a directory (weights, config.json with quantization_config); give a directory path")
    dev = resolve_device(device)
    chosen, left = _select(checkpoint, _compile([*DEFAULT_SKIP, *skip]))
    if not chosen:
        raise AdapterOpsError(f"{checkpoint.source}: no 2-D float16/bfloat16/float32 weight to quantize (after the skip patterns)")
    settings = _Settings(blocksize, double_quant, rounding)
    hessians = None
    if calibration is not None:
        from .calibration import collect_hessians

        hessians = collect_hessians(checkpoint, calibration, chosen, samples=calibration_samples, max_len=max_len, device=dev, progress=progress)
    jobs = {}
    for name in chosen:
        shape = checkpoint.shape(name)
        n = math.prod(shape)
        blocks = -(-n // blocksize)
        nbytes = (n + 1) // 2 + (blocks + 4 * -(-blocks // 256) + 1024 + 256 if double_quant else 4 * blocks + 256) + 64
        extras = {} if hessians is None else {"H": hessians[name]}
        jobs[name] = Job((name,), _quantize_compute, extras=extras, key=("nf4-quantize", shape, checkpoint.entry(name).dtype), info=settings, nbytes=nbytes)
    dtype = checkpoint.dtype(chosen[0])
    config = checkpoint.config() or {}
    compute = str(config.get("dtype") or config.get("torch_dtype") or FLOAT_DTYPES[dtype])
    skip_modules = None
    if skip:  # transformers then skips exactly these modules, so name every one left unquantized
        skip_modules = sorted({n[: -len(".weight")] for n in left} | {"lm_head"})
    qconfig = quantization_config(compute_dtype=compute, double_quant=double_quant, skip_modules=skip_modules)

    def edit(cfg: dict[str, Any]) -> dict[str, Any]:
        return {**cfg, "quantization_config": qconfig}

    result = rewrite(checkpoint, out, jobs, device=dev, progress=progress, force=force, config=edit, label="quantize", allow_nonfinite=allow_nonfinite,
                     inputs=[calibration] if isinstance(calibration, (str, Path)) else ())
    order = {name: i for i, name in enumerate(chosen)}
    rows = sorted(result.rows, key=lambda r: order[r["name"]])
    return QuantizeReport(
        base=checkpoint.source, out=str(out), blocksize=blocksize, double_quant=double_quant, device=str(dev),
        rows=rows, skipped=left, tensors=result.tensors_in, bytes_read=result.bytes_read,
        bytes_written=result.bytes_written, seconds=time.perf_counter() - start, rounding=rounding,
        calibration=None if hessians is None else {"source": str(calibration) if isinstance(calibration, (str, Path)) else "token sequences",
                                                   **hessians.summary(), "max_len": max_len},
    )
