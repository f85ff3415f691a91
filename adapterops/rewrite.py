"""The streaming checkpoint rewrite engine: ``rewrite(checkpoint, out, jobs)``.

Streams a checkpoint into a new one, tensor by tensor, and is what ``merge`` and
``quantize_checkpoint`` share. A ``Job`` names the checkpoint tensors it reads (``inputs``, any
shards) and a ``compute(tasks) -> [(outputs, row)]`` that turns them, on the device, into output
tensors (``{name: tensor}``, one or many, any names) and an optional report row (a dict; 0-dim
device tensors in it are converted to floats once the results reach the host). The outputs of a
job go to the shard of its first input, in the position of that input; every tensor no job reads
is copied as raw bytes, never decoded. Output shards have the input names and header metadata;
the index keeps its keys, with ``weight_map`` rebuilt from what was written and ``total_size``
updated; config, tokenizer and other side files are copied (``config=`` may edit config.json).
All of it goes to a temporary sibling renamed onto ``out`` at the end.

Three threads overlap: a reader (reads byte ranges into pinned memory, copies them to the device
on its own CUDA stream), the caller's thread (computes on a compute stream, then copies results to
pinned host memory on a third stream), and a writer (appends bytes to the output shard). Bounded
queues keep a few tensors in flight, never a shard. Jobs with equal, non-None ``key`` that arrive
together are handed to ``compute`` as one list (up to ``batch``), so equal keys must mean the same
``compute``. How a weight's tensors decode to a float32 weight and back is the codec registry's
business (``adapterops.storage``).
"""

from __future__ import annotations

import json
import math
import queue
import shutil
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._files import atomic_output, require_space
from ._progress import Progress
from .checkpoint import INDEX_NAME, ST_DTYPES, Checkpoint, ShardWriter, read_exact
from .errors import AdapterOpsError, FormatError
from .safety import FiniteCheck, Inputs
from .safety import check_output as _check_output_path

__all__ = ["Job", "Task", "RewriteResult", "rewrite", "check_output", "checkpoint_inputs", "resolve_device"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to compute on: CUDA when present, else CPU; a clear error for one that is not here."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise AdapterOpsError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise AdapterOpsError(f"device {device} is not one adapterops computes on; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AdapterOpsError(f"device {device} was asked for, but torch sees no CUDA GPU here; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise AdapterOpsError(f"device {device} was asked for, but torch sees {count} CUDA GPU(s) here (cuda:0 to cuda:{count - 1})")
    return dev


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


def checkpoint_inputs(checkpoint: Checkpoint) -> list[Path]:
    """The paths a rewrite of ``checkpoint`` reads: its directory (or file) and every shard."""
    return [checkpoint.path, *checkpoint.files]


def check_output(out: str | Path, checkpoint: Checkpoint, force: bool, inputs: Inputs | Sequence[str | Path] = ()) -> None:
    """``safety.check_output`` with the base checkpoint (and ``inputs``) as the inputs: ``out`` may not
    be, hold or lie inside any of them, and may exist only with ``force``."""
    paths = inputs.paths if isinstance(inputs, Inputs) else list(inputs)
    _check_output_path(out, inputs=[*checkpoint_inputs(checkpoint), *paths], force=force)


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
    inputs: Inputs | Sequence[str | Path] = (),
    allow_nonfinite: bool = False,
) -> RewriteResult:
    """Stream ``checkpoint`` into ``out``, replacing the inputs of each job by its outputs.

    ``out`` is a directory, or a ``.safetensors`` file when the base is a single file.
    ``batch``: most jobs per ``compute`` call (default 8 on CUDA, 1 elsewhere). ``inputs``: other
    files the output was computed from (adapters, say; a ``safety.Inputs`` snapshot taken before
    they were read, or paths): like the base, never overwritten, and verified unchanged before the
    output appears. Every tensor a job outputs is checked for NaN/Inf as it is written (tensors
    copied byte for byte are not decoded); any makes the rewrite fail, with nothing at ``out``,
    unless ``allow_nonfinite``.
    """
    start = time.perf_counter()
    dev = resolve_device(device)
    out = Path(out)
    watched = (inputs if isinstance(inputs, Inputs) else Inputs(inputs)).add(checkpoint_inputs(checkpoint))
    check_output(out, checkpoint, force, watched)
    single_file = checkpoint.index is None and checkpoint.path.is_file() and out.suffix == ".safetensors"
    shards = _plan(checkpoint, jobs, single_file)
    need = sum(s.nbytes for s in shards) + (0 if single_file else _side_bytes(checkpoint))
    require_space(out, need)
    batch = batch or (8 if dev.type == "cuda" else 1)
    total_items = sum(len(s.items) for s in shards)
    finite = FiniteCheck(allow=allow_nonfinite)
    with atomic_output(out, force=force, inputs=watched, need=need) as tmp:
        if not single_file:
            tmp.mkdir()
        with Progress(label, total_items=total_items, total_bytes=checkpoint.total_size, enabled=progress) as prog:
            rows, written, read, nbytes = _Pipeline(checkpoint, jobs, dev, batch, prog, finite).run(shards, tmp)
        finite.raise_if_any(out)
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


def _side_bytes(checkpoint: Checkpoint) -> int:
    """What the index and side files (config, tokenizer, ...) add to the output."""
    index = checkpoint.root / INDEX_NAME if checkpoint.index is not None else None
    return sum(p.stat().st_size for p in [*checkpoint.side_files(), *([index] if index else [])])


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

    def __init__(self, checkpoint: Checkpoint, jobs: Mapping[str, Job], device: torch.device, batch: int, progress: Progress, finite: FiniteCheck):
        self.ck, self.jobs, self.dev, self.batch, self.progress = checkpoint, jobs, device, max(1, batch), progress
        self.finite = finite  # sees every computed tensor once, as it is written
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
                counts = self._nonfinite(results)
            self.d2h_stream.wait_stream(self.compute_stream)
        else:
            with torch.no_grad():
                results = tasks[0].job.compute(tasks)
                counts = self._nonfinite(results)
        if len(results) != len(tasks):
            raise AdapterOpsError(f"compute returned {len(results)} results for {len(tasks)} jobs")
        nbytes_in = [sum(self.ck.nbytes(t) for t in job.inputs) for _, _, job, *_ in pending]
        pending.clear()
        for task, (outputs, row), n_in, count in zip(tasks, results, nbytes_in, counts):
            outputs, row, count, done = self._to_host(dict(outputs), dict(row) if row is not None else None, count)
            self._put(self.outbox, ("tensors", task.name, outputs, row, done, n_in, count))

    def _nonfinite(self, results: Sequence[tuple[Mapping[str, torch.Tensor], Any]]) -> list[dict[str, torch.Tensor]]:
        """Per output tensor, its count of NaN/Inf as a 0-dim tensor on the compute device.

        Counted where the tensor was made (one fused reduction on a GPU), not in the writer thread,
        which would have to scan every byte of the output on the CPU and bound the whole rewrite.
        """
        if self.finite.allow:
            return [{} for _ in results]
        return [
            {k: (~torch.isfinite(v)).sum() for k, v in outputs.items() if (v.is_floating_point() or v.is_complex()) and v.numel()}
            for outputs, _ in results
        ]

    def _to_host(self, outputs: dict[str, torch.Tensor], row: dict[str, Any] | None, counts: dict[str, torch.Tensor]):
        """Start copying results (and their non-finite counts) to pinned host memory; the writer waits on the returned event."""
        if not self.cuda:
            return {k: v.contiguous() for k, v in outputs.items()}, row, counts, None
        with torch.cuda.stream(self.d2h_stream):
            def host(t: torch.Tensor) -> torch.Tensor:
                t.record_stream(self.d2h_stream)
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t, non_blocking=True)
                return h

            outputs = {k: host(v) for k, v in outputs.items()}
            counts = {k: host(v) for k, v in counts.items()}
            if row is not None:
                row = {k: host(v) if isinstance(v, torch.Tensor) and v.is_cuda else v for k, v in row.items()}
            done = torch.cuda.Event()
            done.record(self.d2h_stream)
        return outputs, row, counts, done

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
                    _, name, outputs, row, done, n_in, count = item
                    if done is not None:
                        done.synchronize()
                    for out_name, tensor in outputs.items():
                        if out_name in count:
                            self.finite.add_count(out_name, int(count[out_name]), tensor.numel(), tensor.dtype)
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
