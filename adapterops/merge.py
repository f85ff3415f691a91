"""Merge LoRA adapters into base checkpoints, streaming; unmerge; and the engine behind both.

The merged weight (Hu et al. 2021, LoRA, eq. 3), computed in float32 on the device, cast once:

    W' = W + sum_i w_i * s_i * B_i @ A_i      s_i = alpha_i / r_i,  B_i (out, r_i),  A_i (r_i, in)

A DoRA layer (Liu et al. 2024, DoRA, eq. 5, in PEFT's convention) rescales each output row of the
updated weight to its learned magnitude ``m`` (out,):

    V = W + s * B @ A;    W' = m * V / ||V||_row          (2-norm over the in-features of a row)

``unmerge`` is ``merge`` with the weights negated, exact up to the output dtype's rounding; it is
refused for DoRA, whose row norms cannot be recovered from the merged weight and the adapter.
Each report row carries ``rel_change = ||dW|| / ||W||`` and ``retained``, the part of ``dW`` that
survived the cast (``1 + <enc(W') - W', dW> / ||dW||^2``: about 1 for bf16, low for NF4).

The engine: ``rewrite(checkpoint, out, jobs)``
----------------------------------------------
Streams a checkpoint into a new one, tensor by tensor, and is what ``merge`` and a ``quantize``
command share. A ``Job`` names the checkpoint tensors it reads (``inputs``, any shards) and a
``compute(tasks) -> [(outputs, row)]`` that turns them, on the device, into output tensors
(``{name: tensor}``, one or many, any names) and an optional report row (a dict; 0-dim device
tensors in it are converted to floats once the results reach the host). The outputs of a job go
to the shard of its first input, in the position of that input; every tensor no job reads is
copied as raw bytes, never decoded. Output shards have the input names and header metadata; the
index keeps its keys, with ``weight_map`` rebuilt from what was written and ``total_size``
updated; config, tokenizer and other side files are copied (``config=`` may edit config.json).
All of it goes to a temporary sibling renamed onto ``out`` at the end.

Three threads overlap: a reader (reads byte ranges into pinned memory, copies them to the device
on its own CUDA stream), the caller's thread (computes on a compute stream, then copies results to
pinned host memory on a third stream), and a writer (appends bytes to the output shard). Bounded
queues keep a few tensors in flight, never a shard. Jobs with equal, non-None ``key`` that arrive
together are handed to ``compute`` as one list (up to ``batch``; on CUDA merges stack them and use
one batched matmul), so equal keys must mean the same ``compute``. On the CPU a dense merge works
a block of rows at a time instead (``_merge_rows``), keeping its float32 temporaries in cache.

Codecs: how one logical weight is stored
----------------------------------------
A codec is registered by name in ``CODECS`` (``register_codec(codec)``); a module that defines one
registers it at import, and ``_CODEC_MODULES`` lists the built-in ones to import on first use.
``dense`` (F16/BF16/F32/F64 tensors) is built in and is the fallback. A codec provides:

- ``name: str``
- ``groups(checkpoint) -> {weight: (member tensor names, ...)}``: the logical weights it stores
  (e.g. NF4: ``"X.weight" -> ("X.weight", "X.weight.absmax", "X.weight.quant_map", ...)``).
  Codecs other than dense are asked first; dense takes the floating tensors nobody claimed.
- ``shape(checkpoint, weight) -> tuple``: the logical shape, ``(out, in)`` for a linear weight.
- ``decode(tensors, weight) -> Tensor``: the float32 weight (on the device of ``tensors``, which
  maps member names to tensors); the engine may modify the result in place.
- ``encode(W, weight, like, dtype) -> ({name: tensor}, extras)``: store float32 ``W``; ``like`` is
  the decoded input's member tensors, ``dtype`` is only non-None for dense. ``extras`` is a dict
  of extra report fields (e.g. ``codes_changed``); values may be 0-dim device tensors.
- ``dense_config(config) -> config``: config.json once this codec's weights are written dense
  (e.g. drop ``quantization_config``).
- optional ``decode_many(tensors list, weights) -> (G, ...)`` and ``encode_many(W (G, ...),
  weights, likes, dtype) -> (outputs list, extras list)``: the same for a batch of equal-shape
  weights in one pass (a merge batch uses them when present).

``merge(..., dtype=...)`` on a base stored by another codec means "write it dequantized": every
weight of that codec is decoded and written by dense in ``dtype``, and config.json is adjusted.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ._files import atomic_output
from ._progress import Progress, format_bytes
from .adapter import Adapter, LoraLayer
from .checkpoint import INDEX_NAME, ST_DTYPES, Checkpoint, ShardWriter, match_layers, read_exact
from .errors import AdapterOpsError, BaseMismatchError, FormatError, OutputExistsError, ShapeMismatchError, UnsupportedOperationError

__all__ = [
    "merge",
    "unmerge",
    "merge_into",
    "applied",
    "plan_merge",
    "MergeReport",
    "Codec",
    "DenseCodec",
    "CODECS",
    "register_codec",
    "logical_weights",
    "Job",
    "Task",
    "RewriteResult",
    "rewrite",
    "check_output",
    "parse_dtype",
    "resolve_device",
]

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
_CODEC_MODULES = ("adapterops.quant.nf4",)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``, ``"fp16"``, ``"fp32"`` (or their torch names, or a torch dtype) -> torch dtype."""
    if dtype is None:
        return None
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise AdapterOpsError(f"unsupported output dtype {dtype!r}; choose bf16, fp16 or fp32")
    return DTYPES[key]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to compute on: CUDA when present, else CPU; a clear error for one that is not here."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise AdapterOpsError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AdapterOpsError(f"device {device} was asked for, but torch sees no CUDA GPU here; use --device cpu")
    return dev


# ---------------------------------------------------------------------------------------------
# Codecs


class Codec(Protocol):
    """How one logical weight is stored; see the module docstring for the contract."""

    name: str

    def groups(self, checkpoint: Checkpoint) -> dict[str, tuple[str, ...]]: ...

    def shape(self, checkpoint: Checkpoint, weight: str) -> tuple[int, ...]: ...

    def decode(self, tensors: Mapping[str, torch.Tensor], weight: str) -> torch.Tensor: ...

    def encode(
        self, W: torch.Tensor, weight: str, like: Mapping[str, torch.Tensor], dtype: torch.dtype | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    def dense_config(self, config: dict[str, Any]) -> dict[str, Any]: ...


class DenseCodec:
    """Plain floating tensors: decode to float32 (float64 stays), encode by one cast."""

    name = "dense"
    FLOATS = ("F16", "BF16", "F32", "F64")

    def groups(self, checkpoint: Checkpoint) -> dict[str, tuple[str, ...]]:
        return {n: (n,) for n in checkpoint.names() if checkpoint.entry(n).dtype in self.FLOATS}

    def shape(self, checkpoint: Checkpoint, weight: str) -> tuple[int, ...]:
        return checkpoint.shape(weight)

    def decode(self, tensors: Mapping[str, torch.Tensor], weight: str) -> torch.Tensor:
        t = tensors[weight]
        return t.to(torch.promote_types(t.dtype, torch.float32))

    def encode(
        self, W: torch.Tensor, weight: str, like: Mapping[str, torch.Tensor], dtype: torch.dtype | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {weight: W.to(dtype or like[weight].dtype)}, {}

    def dense_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return config


CODECS: dict[str, Codec] = {}
DENSE = DenseCodec()


def register_codec(codec: Codec) -> Codec:
    """Add (or replace) the codec instance ``codec`` under ``codec.name``; returns it."""
    CODECS[codec.name] = codec
    return codec


register_codec(DENSE)


def logical_weights(checkpoint: Checkpoint) -> dict[str, tuple[Codec, tuple[str, ...]]]:
    """Every weight a codec can decode: ``{weight: (codec, member tensor names)}``."""
    for module in _CODEC_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if not module.startswith(str(exc.name)):
                raise
    claimed: dict[str, str] = {}
    found: dict[str, tuple[Codec, tuple[str, ...]]] = {}
    for codec in [c for n, c in CODECS.items() if n != DENSE.name] + [CODECS[DENSE.name]]:
        for weight, members in codec.groups(checkpoint).items():
            taken = [m for m in members if m in claimed]
            if taken and codec.name == DENSE.name:
                continue
            if taken:
                raise FormatError(f"{checkpoint.source}: tensor {taken[0]} is claimed by codecs {claimed[taken[0]]} and {codec.name}")
            found[weight] = (codec, tuple(members))
            claimed.update(dict.fromkeys(members, codec.name))
    return found


# ---------------------------------------------------------------------------------------------
# The streaming engine


@dataclass(frozen=True, eq=False)
class Job:
    """Read ``inputs``, run ``compute`` on the device, write what it returns (see module docstring).

    ``extras`` are tensors moved to the device with the inputs (LoRA factors, say); ``info`` is
    free for ``compute``; ``nbytes`` estimates the output size (default: the input size).
    """

    inputs: tuple[str, ...]
    compute: Callable[[Sequence[Task]], Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, Any] | None]]]
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)
    key: Hashable | None = None
    info: Any = None
    nbytes: int | None = None


@dataclass(eq=False)
class Task:
    """A job with its tensors on the device, as ``compute`` receives it."""

    name: str
    job: Job
    tensors: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor]


@dataclass
class RewriteResult:
    out: Path
    rows: list[dict[str, Any]]
    tensors_in: int
    tensors_out: int
    bytes_read: int
    bytes_written: int
    seconds: float


@dataclass
class _Shard:
    source: Path
    dest: str  # relative to the output directory (or "" for a single-file output)
    metadata: dict[str, str]
    reserve: int
    items: list[tuple[str, str]]  # ("copy", tensor) or ("job", job name)
    nbytes: int = 0


class _Stopped(Exception):
    """Another stage failed; unwind quietly."""


_END = object()


def check_output(out: str | Path, checkpoint: Checkpoint, force: bool) -> None:
    """Refuse an output that exists (unless ``force``) or that would replace or hold the base."""
    target = Path(out).resolve()
    for p in {checkpoint.root.resolve(), checkpoint.path.resolve(), *(f.resolve() for f in checkpoint.files)}:
        if target == p or target in p.parents:
            raise AdapterOpsError(f"{out}: writing there would overwrite the base checkpoint {checkpoint.source}; choose another output path")
    if Path(out).exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass force=True (--force on the command line) to overwrite it")


def rewrite(
    checkpoint: Checkpoint,
    out: str | Path,
    jobs: Mapping[str, Job],
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    force: bool = False,
    config: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    label: str = "writing",
    batch: int | None = None,
) -> RewriteResult:
    """Stream ``checkpoint`` into ``out``, replacing the inputs of each job by its outputs.

    ``out`` is a directory, or a ``.safetensors`` file when the base is a single file.
    ``batch``: most jobs per ``compute`` call (default 8 on CUDA, 1 elsewhere).
    """
    start = time.perf_counter()
    dev = resolve_device(device)
    out = Path(out)
    check_output(out, checkpoint, force)
    single_file = checkpoint.index is None and checkpoint.path.is_file() and out.suffix == ".safetensors"
    shards = _plan(checkpoint, jobs, single_file)
    need = sum(s.nbytes for s in shards)
    _check_space(out, need)
    batch = batch or (8 if dev.type == "cuda" else 1)
    total_items = sum(len(s.items) for s in shards)
    with atomic_output(out, force=force) as tmp:
        if not single_file:
            tmp.mkdir()
        with Progress(label, total_items=total_items, total_bytes=checkpoint.total_size, enabled=progress) as prog:
            rows, written, read, nbytes = _Pipeline(checkpoint, jobs, dev, batch, prog).run(shards, tmp)
        if not single_file:
            _finish_directory(checkpoint, tmp, written, nbytes, config)
    tensors_out = sum(len(v) for v in written.values())
    return RewriteResult(out, rows, len(checkpoint.names()), tensors_out, read, nbytes, time.perf_counter() - start)


def _plan(checkpoint: Checkpoint, jobs: Mapping[str, Job], single_file: bool) -> list[_Shard]:
    owner: dict[str, str] = {}
    for name, job in jobs.items():
        if not job.inputs:
            raise AdapterOpsError(f"job {name} reads no tensor")
        for tensor in job.inputs:
            if tensor not in checkpoint:
                raise FormatError(f"{checkpoint.source}: job {name} reads {tensor}, which the checkpoint does not hold")
            if tensor in owner:
                raise AdapterOpsError(f"jobs {owner[tensor]} and {name} both read {tensor}")
            owner[tensor] = name
    order = {n: i for i, n in enumerate(n for f in checkpoint.files for n in checkpoint.names_in(f))}
    first = {name: min(job.inputs, key=order.__getitem__) for name, job in jobs.items()}
    shards = []
    for file in checkpoint.files:
        items, nbytes, njobs = [], 0, 0
        for tensor in checkpoint.names_in(file):
            job_name = owner.get(tensor)
            if job_name is None:
                items.append(("copy", tensor))
                nbytes += checkpoint.nbytes(tensor)
            elif first[job_name] == tensor:
                items.append(("job", job_name))
                job = jobs[job_name]
                nbytes += job.nbytes if job.nbytes is not None else sum(checkpoint.nbytes(t) for t in job.inputs)
                njobs += 1
        dest = "" if single_file else file.relative_to(checkpoint.root).as_posix()
        reserve = 2 * checkpoint.header_size(file) + 1024 * njobs + 4096
        shards.append(_Shard(file, dest, dict(checkpoint.metadata(file)), reserve, items, nbytes))
    return shards


def _check_space(out: Path, need: int) -> None:
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < need:
        raise AdapterOpsError(f"{out}: the output needs about {format_bytes(need)} and {parent} has {format_bytes(free)} free; free some space or write elsewhere")


def _finish_directory(checkpoint: Checkpoint, tmp: Path, written: Mapping[str, list[str]], nbytes: int, config: Callable | None) -> None:
    """Index (same keys, weight_map from what was written) and side files (config.json edited by ``config``)."""
    if checkpoint.index is not None:
        shard_of = {t: shard for shard, names in written.items() for t in names}
        original = checkpoint.index["weight_map"]
        weight_map = {t: shard_of[t] for t in original if t in shard_of}
        weight_map.update({t: shard_of[t] for t in sorted(shard_of) if t not in weight_map})
        index = dict(checkpoint.index)
        index["metadata"] = {**(index.get("metadata") or {}), "total_size": nbytes}
        index["weight_map"] = weight_map
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    for path in checkpoint.side_files():
        if path.name == "config.json" and config is not None:
            text = json.dumps(config(checkpoint.config() or {}), indent=2) + "\n"
            (tmp / path.name).write_text(text, encoding="utf-8")
        else:
            shutil.copyfile(path, tmp / path.name)


class _Pipeline:
    """reader thread -> compute (calling thread) -> writer thread, joined by bounded queues."""

    def __init__(self, checkpoint: Checkpoint, jobs: Mapping[str, Job], device: torch.device, batch: int, progress: Progress):
        self.ck, self.jobs, self.dev, self.batch, self.progress = checkpoint, jobs, device, max(1, batch), progress
        self.cuda = device.type == "cuda"
        self.inbox: queue.Queue = queue.Queue(maxsize=self.batch + 1)
        self.outbox: queue.Queue = queue.Queue(maxsize=2)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.rows: list[dict[str, Any]] = []
        self.written: dict[str, list[str]] = {}
        self.read_by_reader = 0  # one counter per thread: no shared read-modify-write
        self.read_by_writer = 0
        self.bytes_written = 0

    # queue helpers that give up when another stage failed
    def _put(self, q: queue.Queue, item: Any) -> None:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                pass
        raise _Stopped

    def _get(self, q: queue.Queue) -> Any:
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if self.stop.is_set():
                    raise _Stopped from None

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the calling thread, which re-raises it
            self.errors.append(exc)
            self.stop.set()

    def run(self, shards: list[_Shard], root: Path) -> tuple[list[dict[str, Any]], dict[str, list[str]], int, int]:
        threads = [
            threading.Thread(target=self._guard, args=(self._read, shards), name="adapterops-reader", daemon=True),
            threading.Thread(target=self._guard, args=(self._write, root), name="adapterops-writer", daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            self._compute()
            while threads[1].is_alive() and not self.stop.is_set():
                threads[1].join(timeout=0.1)
        except _Stopped:
            pass
        except BaseException:
            self.stop.set()
            raise
        finally:
            if self.errors or not threads[1].is_alive():
                self.stop.set()
            for t in threads:
                t.join()
        if self.errors:
            raise self.errors[0]
        return self.rows, self.written, self.read_by_reader + self.read_by_writer, self.bytes_written

    # stage 1: read byte ranges, move them to the device
    def _read(self, shards: list[_Shard]) -> None:
        stream = torch.cuda.Stream(self.dev) if self.cuda else None
        for shard in shards:
            self._put(self.inbox, ("start", shard))
            for kind, name in shard.items:
                if kind == "copy":
                    self._put(self.inbox, ("copy", name))
                    continue
                job = self.jobs[name]
                host = {t: self._read_host(t) for t in job.inputs}
                self.read_by_reader += sum(self.ck.nbytes(t) for t in job.inputs)
                if self.cuda:
                    with torch.cuda.stream(stream):
                        tensors = {t: v.to(self.dev, non_blocking=True) for t, v in host.items()}
                        extras = {k: v.to(self.dev, non_blocking=True) for k, v in job.extras.items()}
                        ready = torch.cuda.Event()
                        ready.record(stream)
                else:
                    tensors, extras, ready = host, {k: v.to(self.dev) for k, v in job.extras.items()}, None
                self._put(self.inbox, ("job", name, job, tensors, extras, ready))
            self._put(self.inbox, ("end", shard))
        self._put(self.inbox, _END)

    def _read_host(self, tensor: str) -> torch.Tensor:
        e = self.ck.entry(tensor)
        if e.dtype not in ST_DTYPES:
            raise FormatError(f"{e.file}: tensor {tensor} has dtype {e.dtype}, which torch cannot hold")
        buf = torch.empty(e.nbytes, dtype=torch.uint8, pin_memory=self.cuda)
        with open(e.file, "rb", buffering=0) as f:
            read_exact(f.fileno(), buf, e.offset)
        return buf.view(ST_DTYPES[e.dtype]).reshape(e.shape)

    # stage 2: compute, batching consecutive jobs of equal key
    def _compute(self) -> None:
        if self.cuda:
            self.compute_stream, self.d2h_stream = torch.cuda.Stream(self.dev), torch.cuda.Stream(self.dev)
        pending: list[tuple] = []
        while True:
            item = self._get(self.inbox)
            if item is _END:
                self._flush(pending)
                self._put(self.outbox, _END)
                return
            if item[0] != "job":
                self._flush(pending)
                self._put(self.outbox, item)
                continue
            key = item[2].key
            if pending and (key is None or pending[0][2].key != key):
                self._flush(pending)
            pending.append(item)
            if key is None or len(pending) >= self.batch or self.inbox.empty():
                self._flush(pending)

    def _flush(self, pending: list[tuple]) -> None:
        if not pending:
            return
        tasks = [Task(name, job, tensors, extras) for _, name, job, tensors, extras, _ in pending]
        if self.cuda:
            with torch.cuda.stream(self.compute_stream), torch.no_grad():
                for *_, tensors, extras, ready in pending:
                    self.compute_stream.wait_event(ready)
                    for t in (*tensors.values(), *extras.values()):
                        t.record_stream(self.compute_stream)
                results = tasks[0].job.compute(tasks)
            self.d2h_stream.wait_stream(self.compute_stream)
        else:
            with torch.no_grad():
                results = tasks[0].job.compute(tasks)
        if len(results) != len(tasks):
            raise AdapterOpsError(f"compute returned {len(results)} results for {len(tasks)} jobs")
        nbytes_in = [sum(self.ck.nbytes(t) for t in job.inputs) for _, _, job, *_ in pending]
        pending.clear()
        for task, (outputs, row), n_in in zip(tasks, results, nbytes_in):
            outputs, row, done = self._to_host(dict(outputs), dict(row) if row is not None else None)
            self._put(self.outbox, ("tensors", task.name, outputs, row, done, n_in))

    def _to_host(self, outputs: dict[str, torch.Tensor], row: dict[str, Any] | None):
        """Start copying results to pinned host memory; the writer waits on the returned event."""
        if not self.cuda:
            return {k: v.contiguous() for k, v in outputs.items()}, row, None
        with torch.cuda.stream(self.d2h_stream):
            def host(t: torch.Tensor) -> torch.Tensor:
                t.record_stream(self.d2h_stream)
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t, non_blocking=True)
                return h

            outputs = {k: host(v) for k, v in outputs.items()}
            if row is not None:
                row = {k: host(v) if isinstance(v, torch.Tensor) and v.is_cuda else v for k, v in row.items()}
            done = torch.cuda.Event()
            done.record(self.d2h_stream)
        return outputs, row, done

    # stage 3: append to the output shard
    def _write(self, root: Path) -> None:
        writer: ShardWriter | None = None
        try:
            while True:
                item = self._get(self.outbox)
                if item is _END:
                    return
                kind = item[0]
                if kind == "start":
                    shard = item[1]
                    path = root / shard.dest if shard.dest else root
                    path.parent.mkdir(parents=True, exist_ok=True)
                    writer = ShardWriter(path, metadata=shard.metadata, reserve=shard.reserve)
                    names = self.written.setdefault(shard.dest or path.name, [])
                elif kind == "copy":
                    name = item[1]
                    writer.copy(name, self.ck.entry(name))
                    names.append(name)
                    self.read_by_writer += self.ck.nbytes(name)
                    self.progress.advance(1, self.ck.nbytes(name))
                elif kind == "tensors":
                    _, name, outputs, row, done, n_in = item
                    if done is not None:
                        done.synchronize()
                    for out_name, tensor in outputs.items():
                        writer.add(out_name, tensor)
                        names.append(out_name)
                    if row is not None:
                        self.rows.append({k: _plain(v) for k, v in row.items()})
                    self.progress.advance(1, n_in)
                elif kind == "end":
                    writer.close()
                    self.bytes_written += writer.bytes_written
                    writer = None
        finally:
            if writer is not None:
                writer.abort()


def _plain(value: Any) -> Any:
    """A report value as plain Python: tensors to numbers or lists, non-finite floats to None."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------
# merge / unmerge


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
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.op, "base": self.base, "out": self.out, "adapters": self.adapters, "weights": self.weights,
            "device": self.device, "dtype": self.dtype, "totals": self.totals, "rows": self.rows,
        }


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


def merge(
    base: str | Path,
    adapters: Adapter | str | Path | Sequence[Adapter | str | Path],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    force: bool = False,
) -> MergeReport:
    """Write ``base`` with ``sum_i weights[i] * adapters[i]`` merged in, to ``out``, streaming.

    ``base``: a checkpoint directory, a safetensors file or a Hub repo id. ``adapters``: one or a
    list of Adapters or paths. ``weights`` default to 1. ``device``: where to compute (default CUDA
    when present). ``dtype``: output dtype (default: each tensor's own). Everything is checked
    before anything is written; the output appears only when complete.
    """
    return _merge("merge", base, adapters, out, weights, device, dtype, progress, force)


def unmerge(
    base: str | Path,
    adapters: Adapter | str | Path | Sequence[Adapter | str | Path],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    force: bool = False,
) -> MergeReport:
    """Subtract adapters that were merged into ``base`` (``weights``: those they were merged with).

    The same engine with the weights negated. Refused for DoRA adapters.
    """
    return _merge("unmerge", base, adapters, out, weights, device, dtype, progress, force)


def _merge(op, base, adapters, out, weights, device, dtype, progress, force) -> MergeReport:
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
    check_output(out, checkpoint, force)
    values, labels = _load_adapters(items)
    if op == "unmerge":
        dora = [label for a, label in zip(values, labels) if a.is_dora]
        if dora:
            raise UnsupportedOperationError(
                f"{dora[0]} is a DoRA adapter: unmerge is not defined for DoRA, because the merge rescaled each row "
                "to a learned magnitude and the original row norms cannot be recovered; merge the adapter into the original base instead"
            )
        ws = [-w for w in ws]
    jobs, codecs = plan_merge(checkpoint, values, ws, labels=labels, dtype=out_dtype)
    result = rewrite(checkpoint, out, jobs, device=dev, progress=progress, force=force, config=_config_editor(out_dtype, codecs), label=op)
    return MergeReport(
        op=op, base=checkpoint.source, out=str(out), adapters=labels, weights=ws, device=str(dev),
        dtype=str(out_dtype).removeprefix("torch.") if out_dtype else "as base", rows=result.rows,
        tensors=result.tensors_in, bytes_read=result.bytes_read, bytes_written=result.bytes_written,
        seconds=time.perf_counter() - start,
    )


def _load_adapters(items: Sequence[Adapter | str | Path]) -> tuple[list[Adapter], list[str]]:
    from .formats import load

    values, labels = [], []
    for i, item in enumerate(items):
        if isinstance(item, Adapter):
            values.append(item)
            labels.append(str(item.metadata.get("source", f"adapter {i}")))
        elif isinstance(item, (str, os.PathLike)):
            values.append(load(item))
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
) -> tuple[dict[str, Job], set[str]]:
    """The jobs of a merge, and the names of the codecs whose weights are written dense.

    Every adapter is matched against the base; all problems are raised at once.
    """
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
        jobs[tensor] = _merge_job(codec, members, ts, shapes[tensor], dtype)
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


def _merge_job(codec: Codec, members: tuple[str, ...], terms: list[_Term], shape: tuple[int, ...], dtype: torch.dtype | None) -> Job:
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
    info = _MergeInfo(codec, out_codec, dtype, transposed, dora, A.shape[0])
    key = None if dora else ("merge", codec.name, out_codec.name, shape, A.shape[0], transposed, dtype, cdt)
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
    results = []
    for g, (task, (outputs, extra)) in enumerate(zip(tasks, _encode_batch(info.out_codec, new, tasks, info.dtype))):
        err = _storage_error(info.out_codec, outputs, task.name, new[g])
        kept = 1.0 if err is None else 1.0 + torch.dot(err.reshape(-1), D[g].reshape(-1)) / d_norm[g] ** 2
        row = {
            "name": task.name, "shape": list(new.shape[1:]), "rank": info.rank,
            "rel_change": d_norm[g] / w_norm[g], "retained": kept, "delta_norm": d_norm[g], "weight_norm": w_norm[g],
            **({"dora": True} if info.dora else {}), **extra,
        }
        results.append((outputs, row))
    return results


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
