"""SVDs of base weights: read, hash, decompose on the device, and cache on disk.

What is cached, and why all of it: the intruder test takes, for a vector ``m``, its largest
``|<u_i, m>|`` over *every* left singular vector of ``W`` -- for a square ``W``, ``U`` is a basis of
the whole space and ``m`` may align with any column, including those of tiny singular values,
so no truncation of ``U`` gives the same answer. For a tall ``W`` (out > in) the thin ``U`` has
``in`` columns, which span ``col(W)``; those are all the paper's definition uses. So each entry
holds the full thin ``U`` (out, min(out, in)) and ``S`` in float32, which is also all that
``_intruders.merged_top`` needs (``Vh`` never is). That is about ``4 * out * min(out, in)`` bytes
per weight: 64 MiB for a 4096 x 4096 projection, ~22 GB for the 224 matrices of a 7B Llama.

Entries are safetensors files named by the SHA-256 of the weight's stored bytes (plus dtype, shape,
orientation and the decomposition's version), under ``$ADAPTEROPS_CACHE/svd`` (default
``~/.cache/adapterops/svd``), written atomically (temp file + rename) so that concurrent runs and
interrupted writes never leave a partial entry. A corrupt or mismatched entry is recomputed.
Delete the directory to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import _intruders
from ._files import atomic_output
from .checkpoint import NF4_STATE_SUFFIX, Checkpoint, Target, match_layers
from .errors import FormatError, NonFiniteError

__all__ = ["CACHE_ENV", "default_cache_dir", "SvdCache", "BaseWeights", "BaseChunk", "base_svd_chunks"]

CACHE_ENV = "ADAPTEROPS_CACHE"
VERSION = "gram64-u32-1"  # change when _intruders.base_svd changes what it returns


def default_cache_dir() -> Path:
    """``$ADAPTEROPS_CACHE/svd``, or ``~/.cache/adapterops/svd``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "adapterops") / "svd"


def content_key(parts: Sequence[tuple[str, torch.Tensor]], *, transposed: bool) -> str:
    """SHA-256 over the stored bytes of ``parts`` (with their dtypes and shapes) and the orientation."""
    h = hashlib.sha256(f"{VERSION}|transposed={transposed}".encode())
    for label, t in parts:
        h.update(json.dumps([label, str(t.dtype), list(t.shape)]).encode())
        data = t.detach().contiguous().reshape(-1)
        if data.numel():
            h.update(memoryview(data.view(torch.uint8).numpy()))  # hashlib releases the GIL here
    return h.hexdigest()


class SvdCache:
    """A directory of ``<key[:2]>/<key>.safetensors`` entries holding ``U`` and ``S``.

    ``enabled=False`` gives a cache that never finds nor keeps anything (it still counts misses).
    """

    def __init__(self, directory: str | os.PathLike | None = None, *, enabled: bool = True) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        self._write_failed = not enabled

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def load(self, key: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(U, S)`` for ``key`` if present and well-formed for a weight of ``shape`` (out, in), else None."""
        path = self.path(key)
        if not self.enabled or not path.is_file():
            return None
        out, inp = shape
        n = min(out, inp)
        try:
            with safe_open(str(path), framework="pt") as f:
                U, S = f.get_tensor("U"), f.get_tensor("S")
        except Exception:  # corrupt entry: recompute and overwrite
            return None
        if U.shape != (out, n) or S.shape != (n,) or U.dtype != torch.float32 or S.dtype != torch.float32:
            return None
        return U, S

    def store(self, key: str, U: torch.Tensor, S: torch.Tensor) -> None:
        """Write one entry atomically; a failure (read-only or full disk) warns once and is otherwise ignored."""
        if self._write_failed:
            return
        path = self.path(key)
        try:
            with atomic_output(path, force=True) as tmp:
                save_file({"U": U.contiguous(), "S": S.contiguous()}, str(tmp), metadata={"version": VERSION})
        except OSError as exc:
            self._write_failed = True
            warnings.warn(f"cannot write the SVD cache under {self.directory} ({exc}); continuing without it", stacklevel=2)


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

    def match(self, shapes: Mapping[str, tuple[int, int]]) -> dict[str, Target]:
        """Adapter layer -> base tensor, every problem reported at once (BaseMismatchError)."""
        if self.checkpoint is None:
            return match_layers(shapes, {n: tuple(t.shape) for n, t in self.tensors.items()})
        return match_layers(shapes, self.checkpoint, weight_shape=self._nf4_shape if self.nf4 else None)

    def _nf4_shape(self, name: str) -> tuple[int, ...]:
        state = name + NF4_STATE_SUFFIX
        if state not in self.checkpoint:
            return self.checkpoint.shape(name)
        try:
            info = json.loads(bytes(self.checkpoint.get(state).tolist()).decode("utf-8"))
            return tuple(int(s) for s in info["shape"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"{self.checkpoint.source}: unreadable NF4 quant state {state} ({exc})") from None

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
    """A batch of adapter layers whose base weights share a shape: ``W`` (b, out, in), ``U``, ``S``."""

    names: list[str]
    W: torch.Tensor
    U: torch.Tensor
    S: torch.Tensor


def base_svd_chunks(
    weights: BaseWeights,
    targets: Mapping[str, Target],
    groups: Sequence[Sequence[str]],
    *,
    device: torch.device,
    cache: SvdCache,
    workers: int | None = None,
) -> Iterator[BaseChunk]:
    """Yield every layer of ``groups`` (lists of adapter layers whose base weights share a shape) in
    chunks sized to the device's memory, with ``W``, ``U`` and ``S`` on ``device``.

    Reading, hashing and cache lookups of the next chunk run in threads while the current one is
    decomposed (cache misses, batched) and consumed; cache writes run in a background thread.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    plan = [chunk for names in groups for chunk in _chunked(list(names), _chunk_size(weights, targets[names[0]], device))]
    readers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapterops-read")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterops-cache")
    writes: list[Future] = []

    def prepare(name: str):
        W, key = weights.load(targets[name])
        return W, key, cache.load(key, tuple(W.shape))

    try:
        pending = [readers.submit(prepare, n) for n in plan[0]] if plan else []
        for i, names in enumerate(plan):
            items = [f.result() for f in pending]
            pending = [readers.submit(prepare, n) for n in plan[i + 1]] if i + 1 < len(plan) else []
            W = torch.stack([it[0] for it in items]).to(device)  # (b, out, in)
            missing = [j for j, it in enumerate(items) if it[2] is None]
            U_parts: list[torch.Tensor | None] = [None if it[2] is None else it[2][0] for it in items]
            S_parts: list[torch.Tensor | None] = [None if it[2] is None else it[2][1] for it in items]
            if missing:
                U_new, S_new = _intruders.base_svd(W[missing])
                for j, U_j, S_j in zip(missing, U_new, S_new):
                    U_parts[j], S_parts[j] = U_j, S_j
                    if cache.enabled:
                        writes.append(writer.submit(cache.store, items[j][1], U_j.cpu(), S_j.cpu()))
            cache.hits += len(items) - len(missing)
            cache.misses += len(missing)
            U = torch.stack([u.to(device) for u in U_parts])  # (b, out, n)
            S = torch.stack([s.to(device) for s in S_parts])  # (b, n)
            yield BaseChunk(list(names), W, U, S)
        for w in writes:
            w.result()
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)


def _chunk_size(weights: BaseWeights, target: Target, device: torch.device) -> int:
    """Layers per batch: about 40 bytes per weight element are live at once (float64 Gram, QR, U)."""
    if weights.checkpoint is None:
        numel = weights.tensors[target.tensor].numel()
    else:
        shape = weights._nf4_shape(target.tensor) if weights.nf4 else weights.checkpoint.shape(target.tensor)
        numel = int(torch.Size(shape).numel())
    if device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * 0.4)
    else:
        budget = 1 << 30
    return max(1, budget // max(1, 40 * numel))


def _chunked(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
