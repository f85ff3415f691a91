"""SVDs of base weights: read, hash, decompose on the device, and cache on disk.

What the intruder test needs of a base weight ``W = U S Vh`` (thin, ``n = min(out, in)``), and so
what an entry holds: ``S``, the whole thin ``U`` and ``U^T W = S Vh`` -- never ``W`` itself (see
``_intruders.merged_top``). ``U`` has to be whole: for a vector ``m`` the test takes the largest
``|<u_i, m>|`` over *every* column of ``U``, including those of tiny singular values, so no
truncation gives the same answer.

Precision: ``U`` and ``U^T W`` are stored in float16 (each row of ``U^T W = S Vh`` divided by its
norm, kept in float32 with ``S``): 2 bytes per element instead of 4, and the base itself is never
read again, so a cached run reads about 20 GB for the 224 matrices of a 7B Llama where it read 22 GB
of ``U`` plus the 13.5 GB base. The top-k vectors of ``W + dW`` are eigenvectors of a matrix built
from these, so their rounding is amplified by small eigenvalue gaps: measured on random
decaying-spectrum weights of 512 to 2048 rows, similarities moved by at most 3e-4 (float16; 1.7e-3
on the 224 matrices of a 7B Llama), where int8 codes in blocks of 64 moved them by up to 1.5e-2 and
bfloat16 by up to 3.5e-3; hence float16
(``benchmarks/bench_intruders.py`` checks the cached run against the dense float32 route). A
weight's first run uses the unrounded values. On a GPU, entries are read by up to 16 threads
through a few reused pinned buffers straight into the batch on the device (fresh pageable memory
per entry, then a copy and a stack, took four times as long on an H200).

Entries are safetensors files named by the SHA-256 of the weight's stored bytes (plus dtype, shape,
orientation and the decomposition's version), under the cache directory (``default_cache_dir``),
written atomically (temp file + rename) so that concurrent runs and interrupted writes never leave
a partial entry. A corrupt or mismatched entry is recomputed. So that a later run need not read
and hash the base again, ``index/`` maps a stored weight's file identity (path, device, inode,
size, mtime and ctime in ns, byte range) to its content key: an edited file gets a new identity
and is hashed afresh. The cache is kept under a size limit (``max_bytes``, default
``$ADAPTEROPS_CACHE_MAX_GB`` or 32 GB): after each run the least recently used entries go first.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import _intruders
from ._files import atomic_output
from ._safetensors import TORCH_DTYPES, TensorEntry, read_exact, read_header
from .checkpoint import NF4_STATE_SUFFIX, Checkpoint, Target, match_layers
from .errors import FormatError, NonFiniteError

__all__ = ["CACHE_ENV", "CACHE_MAX_ENV", "default_cache_dir", "SvdCache", "BaseWeights", "BaseChunk", "base_svd_chunks"]

CACHE_ENV = "ADAPTEROPS_CACHE"
CACHE_MAX_ENV = "ADAPTEROPS_CACHE_MAX_GB"
DEFAULT_MAX_BYTES = 32 * 10**9
VERSION = "gram64-f16-2"  # change when _intruders.base_svd or the stored layout changes


def default_cache_dir() -> Path:
    """``$ADAPTEROPS_CACHE/svd``, else ``$XDG_CACHE_HOME/adapterops/svd``, else ``~/.cache/adapterops/svd``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "svd"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "adapterops" / "svd"


NO_LIMIT = 1 << 62  # bytes: more than any disk holds


def default_max_bytes() -> int:
    text = os.environ.get(CACHE_MAX_ENV)
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        value = float(text)
    except ValueError:
        raise FormatError(f"{CACHE_MAX_ENV}={text!r}: expected a number of gigabytes") from None
    if not value >= 0:
        raise FormatError(f"{CACHE_MAX_ENV}={text!r}: expected a non-negative number of gigabytes")
    return int(min(value * 1e9, NO_LIMIT))  # inf (or 1e400): no limit


def content_key(parts: Sequence[tuple[str, torch.Tensor]], *, transposed: bool) -> str:
    """SHA-256 over the stored bytes of ``parts`` (with their dtypes and shapes) and the orientation."""
    h = hashlib.sha256(f"{VERSION}|transposed={transposed}".encode())
    for label, t in parts:
        h.update(json.dumps([label, str(t.dtype), list(t.shape)]).encode())
        data = t.detach().contiguous().reshape(-1)
        if data.numel():
            h.update(memoryview(data.view(torch.uint8).numpy()))  # hashlib releases the GIL here
    return h.hexdigest()


def entry_layout(shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What an entry for a weight of ``shape`` (out, in) holds: key -> (shape, dtype)."""
    out, inp = shape
    n = min(out, inp)
    return {"Ut": ((n, out), torch.float16), "UtW_rows": ((n, inp), torch.float16), "UtW_norms": ((n,), torch.float32), "S": ((n,), torch.float32)}


def half_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (m, d) as float16 rows of unit norm and the float32 row norms (no overflow, whatever the scale)."""
    x = x.float()
    norms = torch.linalg.vector_norm(x, dim=-1)  # (m,)
    return (x / norms.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).to(torch.float16), norms


STAGING_PIECE = 32 * 1024 * 1024  # bytes per pinned staging buffer


@dataclass
class CachedSvd:
    """One entry found on disk (its header checked, its data not read yet): ``Ut`` (n, out) float16,
    ``UtW_rows`` (n, in) float16 unit rows of ``U^T W``, ``UtW_norms`` (n,) and ``S`` (n,) float32."""

    path: Path
    entries: dict[str, TensorEntry]

    def read_into(self, dest: Mapping[str, torch.Tensor], staging: _Staging | None) -> None:
        """Fill ``dest`` (tensors of the entries' shapes and dtypes, contiguous) with the stored values.

        On the CPU the bytes are read straight into ``dest``; on a GPU they go through ``staging``'s
        pinned buffers in ``STAGING_PIECE`` pieces (read, copy on this thread's stream, wait).
        """
        fd = os.open(self.path, os.O_RDONLY)
        try:  # preadv releases the GIL, so several readers overlap
            for key, entry in self.entries.items():
                flat = dest[key].view(-1).view(torch.uint8)
                if flat.device.type == "cpu":
                    read_exact(fd, flat, entry.offset, file=self.path)
                    continue
                stream = staging.stream(flat.device)
                for start in range(0, entry.nbytes, STAGING_PIECE):
                    n = min(STAGING_PIECE, entry.nbytes - start)
                    buf = staging.take()
                    try:
                        read_exact(fd, buf[:n], entry.offset + start, file=self.path)
                        with torch.cuda.stream(stream):
                            flat[start : start + n].copy_(buf[:n], non_blocking=True)
                        stream.synchronize()  # before the buffer is reused
                    finally:
                        staging.give(buf)
        finally:
            os.close(fd)


class _Staging:
    """Pinned host buffers shared by the reader threads, made on first use (pinning memory is slow,
    reusing it is not), and one CUDA stream per thread for the copies."""

    def __init__(self, count: int) -> None:
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._left = count
        self._lock = threading.Lock()
        self._local = threading.local()

    def take(self) -> torch.Tensor:
        with self._lock:
            make = self._left > 0 and self._free.empty()
            self._left -= make
        return torch.empty(STAGING_PIECE, dtype=torch.uint8, pin_memory=True) if make else self._free.get()

    def give(self, buf: torch.Tensor) -> None:
        self._free.put(buf)

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        if getattr(self._local, "stream", None) is None:
            self._local.stream = torch.cuda.Stream(device)
        return self._local.stream


class SvdCache:
    """A directory of ``<key[:2]>/<key>.safetensors`` entries, plus ``index/`` of file identities.

    ``enabled=False`` gives a cache that never finds nor keeps anything (it still counts misses).
    ``max_bytes`` bounds the entries' total size (``prune``; default ``default_max_bytes()``).
    """

    def __init__(self, directory: str | os.PathLike | None = None, *, enabled: bool = True, max_bytes: int | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.enabled = enabled
        self.max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
        self.hits = 0
        self.misses = 0
        self._write_failed = not enabled

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def load(self, key: str, shape: tuple[int, int]) -> CachedSvd | None:
        """The entry for ``key`` if present and well-formed for a weight of ``shape`` (out, in), else None."""
        path = self.path(key)
        if not self.enabled or not path.is_file():
            return None
        expect = entry_layout(shape)
        try:
            header = read_header(path)
            entries = {k: header.entries[k] for k in expect}
        except (FormatError, KeyError, OSError):  # corrupt or of another version: recompute and overwrite
            return None
        if any(e.shape != shape_ or TORCH_DTYPES.get(e.dtype) != dtype for e, (shape_, dtype) in zip(entries.values(), expect.values())):
            return None
        try:
            os.utime(path)  # least recently used goes first when pruning
        except OSError:
            pass
        return CachedSvd(path, entries)

    def store(self, key: str, U: torch.Tensor, S: torch.Tensor, UtW: torch.Tensor) -> None:
        """Write one entry atomically; a failure (read-only or full disk) warns once and is otherwise ignored."""
        if self._write_failed:
            return
        rows, norms = half_rows(UtW)
        tensors = {"Ut": U.mT.to(torch.float16).contiguous(), "UtW_rows": rows.contiguous(), "UtW_norms": norms, "S": S.float().contiguous()}
        self._write(self.path(key), lambda tmp: save_file(tensors, str(tmp), metadata={"version": VERSION}))

    def key_for(self, identity: str | None) -> str | None:
        """The content key last recorded for a file identity (see ``BaseWeights.identity``), if any."""
        if not self.enabled or identity is None:
            return None
        try:
            text = (self.directory / "index" / identity[:2] / identity).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None

    def remember(self, identity: str | None, key: str) -> None:
        if identity is not None:
            self._write(self.directory / "index" / identity[:2] / identity, lambda tmp: tmp.write_text(key, encoding="ascii"))

    def _write(self, path: Path, write) -> None:
        if self._write_failed:
            return
        try:
            with atomic_output(path, force=True) as tmp:
                write(tmp)
        except OSError as exc:  # NotWritableError too: check_output found the directory unwritable
            self._write_failed = True
            warnings.warn(f"cannot write the SVD cache under {self.directory} ({exc}); continuing without it", stacklevel=3)

    def prune(self) -> int:
        """Delete least recently used entries until their total size is within ``max_bytes``; returns bytes freed."""
        if not self.enabled or not self.directory.is_dir():
            return 0
        entries = []
        for path in self.directory.glob("??/*.safetensors"):
            try:
                st = path.stat()
            except OSError:
                continue
            entries.append((st.st_mtime_ns, st.st_size, path))
        total = sum(size for _, size, _ in entries)
        freed = 0
        for _, size, path in sorted(entries):
            if total - freed <= self.max_bytes:
                break
            try:
                path.unlink()
                freed += size
            except OSError:
                pass
        return freed


class BaseWeights:
    """Base weights as float32 ``(out, in)`` matrices with content keys.

    ``base`` is a Checkpoint (fp32/fp16/bf16, or NF4 which is dequantized), anything Checkpoint
    accepts (directory, file, Hub id), or a mapping of tensor names to tensors (a state dict).
    """

    def __init__(self, base: Checkpoint | Mapping[str, torch.Tensor] | str | os.PathLike) -> None:
        if isinstance(base, Mapping):
            self.checkpoint, self.tensors = None, base
        else:
            self.checkpoint = base if isinstance(base, Checkpoint) else Checkpoint(base)
            self.tensors = None
        self.nf4 = self.checkpoint is not None and self.checkpoint.is_nf4()
        self.source = self.checkpoint.source if self.checkpoint is not None else "<state dict>"

    def match(self, shapes: Mapping[str, tuple[int, int]], *, fan_in_fan_out: bool = False) -> dict[str, Target]:
        """Adapter layer -> base tensor, every problem reported at once (BaseMismatchError); with
        ``fan_in_fan_out`` (the adapter's flag, as for ``merge``) weights stored (in, out) fit too."""
        if self.checkpoint is None:
            return match_layers(shapes, {n: tuple(t.shape) for n, t in self.tensors.items()}, fan_in_fan_out=fan_in_fan_out)
        return match_layers(shapes, self.checkpoint, fan_in_fan_out=fan_in_fan_out, weight_shape=self._nf4_shape if self.nf4 else None)

    def shape(self, target: Target) -> tuple[int, int]:
        """The weight's (out, in), as ``load`` returns it (NF4: the shape it stands for; Conv1D: transposed)."""
        if self.checkpoint is None:
            shape = tuple(self.tensors[target.tensor].shape)
        elif self.nf4:
            shape = self._nf4_shape(target.tensor)
        else:
            shape = tuple(self.checkpoint.shape(target.tensor))
        return (shape[1], shape[0]) if target.transposed else (shape[0], shape[1])

    def _nf4_shape(self, name: str) -> tuple[int, ...]:
        if name + NF4_STATE_SUFFIX not in self.checkpoint:
            return self.checkpoint.shape(name)
        from .quant.codec import NF4

        return NF4.shape(self.checkpoint, name)  # its quantization state, read once per checkpoint

    def nbytes(self, target: Target) -> int:
        if self.checkpoint is None:
            t = self.tensors[target.tensor]
            return t.numel() * t.element_size()
        return sum(self.checkpoint.entry(n).nbytes for n in self._entry_names(target.tensor))

    def _entry_names(self, tensor: str) -> list[str]:
        """The stored tensors that make up one weight: itself, plus its bitsandbytes entries for NF4."""
        if self.nf4 and tensor + NF4_STATE_SUFFIX in self.checkpoint:
            from .quant.nf4 import STATE_SUFFIXES

            return [tensor, *(tensor + s for s in STATE_SUFFIXES if tensor + s in self.checkpoint)]
        return [tensor]

    def identity(self, target: Target) -> str | None:
        """A name for where and how the weight is stored (file identity, byte ranges, orientation),
        or None for a state dict: a cache may map it to the content key without reading the bytes."""
        if self.checkpoint is None:
            return None
        parts = [VERSION, target.transposed]
        for name in self._entry_names(target.tensor):
            e = self.checkpoint.entry(name)
            try:
                st = os.stat(e.file)
            except OSError:
                return None
            parts.append([os.path.realpath(e.file), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, name, e.offset, e.nbytes])
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def load(self, target: Target) -> tuple[torch.Tensor, str]:
        """The weight as float32 (out, in) on the CPU, and its content key."""
        if self.checkpoint is None:
            stored = self.tensors[target.tensor].detach().cpu()
            parts = [("weight", stored)]
            weight = stored
        else:
            names = self._entry_names(target.tensor)
            parts = [(n[len(target.tensor):] or "weight", self.checkpoint.get(n)) for n in names]
            weight = parts[0][1] if len(parts) == 1 else _dequantize_nf4(target.tensor, dict(zip(names, (p[1] for p in parts))))
        key = content_key(parts, transposed=target.transposed)
        weight = weight.to(torch.float32)
        if not bool(torch.isfinite(weight).all()):
            raise NonFiniteError(f"{self.source}: base weight {target.tensor} holds NaN or Inf; its SVD is undefined")
        return (weight.T if target.transposed else weight).contiguous(), key


def _dequantize_nf4(tensor: str, entries: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The weight an NF4 base stands for (bitsandbytes' ``dequantize_4bit``, in its recorded dtype)."""
    from .quant.nf4 import dequantize_nf4, from_state_dict

    return dequantize_nf4(from_state_dict(entries, tensor))


@dataclass
class BaseChunk:
    """A batch of adapter layers whose base weights share a shape, on the device: ``U`` (b, out, n),
    ``S`` (b, n), ``UtW = U^T W`` (b, n, in), and ``W`` (b, out, in) only when it was asked for."""

    names: list[str]
    U: torch.Tensor
    S: torch.Tensor
    UtW: torch.Tensor
    W: torch.Tensor | None = None


def base_svd_chunks(
    weights: BaseWeights,
    targets: Mapping[str, Target],
    groups: Sequence[Sequence[str]],
    *,
    device: torch.device,
    cache: SvdCache,
    need_weight: bool = False,
    workers: int | None = None,
) -> Iterator[BaseChunk]:
    """Yield every layer of ``groups`` (lists of adapter layers whose base weights share a shape) in
    chunks sized to the device's memory, with their SVDs (and ``W`` with ``need_weight``) on ``device``.

    A weight whose file identity the cache knows, and whose entry is there, is not read at all
    (unless ``need_weight``); others are read and hashed. Cached entries are read straight into the
    chunk's stacked tensors on ``device`` (``CachedSvd.read_into``). Reading, hashing and cache
    lookups of the next chunk run in ``workers`` threads while the current one is decomposed (cache
    misses, batched) and consumed; cache writes run in a background thread; the cache is pruned to
    its limit at the end.
    """
    workers = workers or min(16, os.cpu_count() or 1)
    plan = [chunk for names in groups for chunk in _chunked(list(names), _chunk_size(weights, targets[names[0]], device))]
    readers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapterops-read")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterops-cache")
    staging = _Staging(workers) if device.type == "cuda" else None
    writes: list[Future] = []

    def prepare(name: str, dest: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, str, bool, str | None]:
        """Fill ``dest`` from the cache if the entry is there; returns (W or None, key, whether it was, identity)."""
        target = targets[name]
        identity = weights.identity(target)
        key = cache.key_for(identity)
        hit = key is not None and _read_entry(cache, key, weights.shape(target), dest, staging)
        if hit and not need_weight:
            return None, key, True, identity
        W, key = weights.load(target)
        return W, key, hit or _read_entry(cache, key, tuple(W.shape), dest, staging), identity

    def submit(names: list[str]) -> tuple[dict[str, torch.Tensor], list[Future]]:
        layout = entry_layout(weights.shape(targets[names[0]]))
        stacked = {k: torch.empty((len(names), *shape), dtype=dtype, device=device) for k, (shape, dtype) in layout.items()}
        return stacked, [readers.submit(prepare, n, {k: v[j] for k, v in stacked.items()}) for j, n in enumerate(names)]

    try:
        pending = submit(plan[0]) if plan else None
        for i, names in enumerate(plan):
            stacked, futures = pending
            items = [f.result() for f in futures]
            pending = submit(plan[i + 1]) if i + 1 < len(plan) else None
            U = stacked["Ut"].float().mT  # (b, out, n)
            UtW = stacked["UtW_rows"].float().mul_(stacked["UtW_norms"][..., None])  # (b, n, in)
            S = stacked["S"]
            del stacked
            missing = [j for j, it in enumerate(items) if not it[2]]
            if missing:  # the rows read nothing: decompose them, in full precision
                W_missing = torch.stack([items[j][0] for j in missing]).to(device)  # (m, out, in)
                for j, U_j, S_j, UtW_j in zip(missing, *_intruders.base_svd(W_missing)):
                    U[j], S[j], UtW[j] = U_j, S_j, UtW_j
                    if cache.enabled:
                        key, identity = items[j][1], items[j][3]
                        writes.append(writer.submit(_store, cache, key, identity, U_j.cpu(), S_j.cpu(), UtW_j.cpu()))
                del W_missing
            for it in items:
                if it[2] and it[0] is not None:
                    writes.append(writer.submit(cache.remember, it[3], it[1]))
            cache.hits += len(items) - len(missing)
            cache.misses += len(missing)
            W = torch.stack([it[0] for it in items]).to(device) if need_weight else None
            yield BaseChunk(list(names), U, S, UtW, W)
        for w in writes:
            w.result()
        cache.prune()
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)


def _read_entry(cache: SvdCache, key: str, shape: tuple[int, int], dest: dict[str, torch.Tensor], staging: _Staging | None) -> bool:
    """Fill ``dest`` with the cache's entry for ``key``; False where there is none or it cannot be read."""
    entry = cache.load(key, shape)
    if entry is None:
        return False
    try:
        entry.read_into(dest, staging)
    except (FormatError, OSError):  # removed or cut short since its header was read: recompute it
        return False
    return True


def _store(cache: SvdCache, key: str, identity: str | None, U: torch.Tensor, S: torch.Tensor, UtW: torch.Tensor) -> None:
    cache.store(key, U, S, UtW)
    cache.remember(identity, key)


def _chunk_size(weights: BaseWeights, target: Target, device: torch.device) -> int:
    """Layers per batch: about 40 bytes per weight element are live at once (float64 Gram, QR, U)."""
    numel = int(torch.Size(weights.shape(target)).numel())
    if device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * 0.4)
    else:
        budget = 1 << 30
    return max(1, budget // max(1, 40 * numel))


def _chunked(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
