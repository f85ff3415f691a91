"""The GGUF container (llama.cpp's file format), read and written by hand: small, no dependency.

Layout (version 3, little-endian): ``b"GGUF"``, ``u32`` version, ``u64`` tensor count, ``u64``
key-value count; the key-value pairs (``string`` key, ``u32`` value type, value); per tensor a
``string`` name, ``u32`` n_dims, ``u64`` dims (``ne``, fastest-varying first, so the reverse of the
torch shape), ``u32`` ggml type and ``u64`` offset into the data section; padding to
``general.alignment`` (default 32); then the tensor data, each tensor aligned. A ``string`` is a
``u64`` byte length and UTF-8 bytes.

Only the tensor types a LoRA file uses are decoded (F32, F16, BF16, and Q8_0, which llama.cpp's
``convert_lora_to_gguf.py --outtype q8_0`` writes); other types are listed with their shapes, which
is all a base model's GGUF is read for.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import FormatError

__all__ = ["MAGIC", "GGUFTensor", "GGUFFile", "is_gguf", "read_gguf", "read_tensor", "write_gguf"]

MAGIC = b"GGUF"
VERSION = 3
ALIGNMENT_KEY = "general.alignment"
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_DEPTH = 16  # GGUF files nest arrays one or two deep; a deeper chain is a crafted file

# GGUF value types: id -> struct code (scalars), plus STRING = 8, ARRAY = 9.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRUCTS = {code: struct.Struct("<" + code) for code in _SCALARS.values()}
_STRING, _ARRAY, _UINT32, _INT64, _FLOAT32, _BOOL = 8, 9, 4, 11, 6, 7

# ggml tensor types adapterops decodes: id -> (name, elements per block, bytes per block).
F32, F16, Q8_0, BF16 = 0, 1, 8, 30
_DECODED = {F32: ("F32", 1, 4), F16: ("F16", 1, 2), Q8_0: ("Q8_0", 32, 34), BF16: ("BF16", 1, 2)}
# Every ggml type's block: id -> (elements, bytes) (ggml's type traits); the directory reader checks
# with it that each tensor's bytes lie inside the file, whatever the type.
_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17),
}
_WRITTEN = {torch.float32: F32, torch.float16: F16, torch.bfloat16: BF16}
_TORCH = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}


@dataclass(frozen=True)
class GGUFTensor:
    """Where a tensor lives: torch-order ``shape`` (the reverse of ggml's ``ne``), ggml type, byte offset."""

    name: str
    shape: tuple[int, ...]
    type: int
    offset: int  # absolute, from the start of the file


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


class _Reader:
    """Bounds-checked little-endian reads over a memory-mapped file; any overrun is a FormatError."""

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data, self.path, self.pos, self.size = data, path, 0, len(data)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise FormatError(f"{self.path}: truncated or corrupt GGUF file (read past the end at byte {self.pos})")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def scalar(self, code: str) -> Any:
        packer = _STRUCTS[code]
        return packer.unpack(self.take(packer.size))[0]

    def string(self) -> str:
        try:
            return str(self.take(self.scalar("Q")), "utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: a GGUF string is not valid UTF-8 (byte {self.pos})") from None

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise FormatError(f"{self.path}: GGUF arrays nested deeper than {MAX_ARRAY_DEPTH} (byte {self.pos}); the file is corrupt")
            item, count = self.scalar("I"), self.scalar("Q")
            if item in _SCALARS and item != _BOOL:  # numbers: one read, not a Python loop
                dtype = np.dtype("<" + _SCALARS[item])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            if count > self.size - self.pos:
                raise FormatError(f"{self.path}: corrupt GGUF array (claims {count} items)")
            return [self.value(item, depth + 1) for _ in range(count)]
        raise FormatError(f"{self.path}: unknown GGUF value type {kind} (byte {self.pos}); the file is corrupt or from a newer GGUF version")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """The metadata and tensor directory of a GGUF file (tensor data stays on disk)."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _read_directory(_Reader(data, path))
    except FormatError:  # a ValueError too, and already says what is wrong
        raise
    except (OSError, ValueError) as exc:  # mmap raises ValueError on an empty file
        raise FormatError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None


def _read_directory(r: _Reader) -> GGUFFile:
    path = r.path
    if r.take(4) != MAGIC:
        raise FormatError(f"{path}: not a GGUF file (no GGUF magic)")
    raw_version = r.take(4)
    version = struct.unpack("<I", raw_version)[0]
    if version not in (2, 3):
        hint = " (a big-endian GGUF?)" if struct.unpack(">I", raw_version)[0] in (2, 3) else ""
        raise FormatError(f"{path}: GGUF version {version}{hint} is not supported; adapterops reads little-endian GGUF v2 and v3")
    n_tensors, n_kv = r.scalar("Q"), r.scalar("Q")
    metadata = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.scalar("I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.scalar("I")
        if not 1 <= n_dims <= 4:
            raise FormatError(f"{path}: tensor {name} has {n_dims} dimensions; GGUF allows 1 to 4")
        ne = [r.scalar("Q") for _ in range(n_dims)]
        if 0 in ne:
            raise FormatError(f"{path}: tensor {name} has a dimension of size 0 ({ne}); llama.cpp reads no such tensor")
        infos.append((name, tuple(reversed(ne)), r.scalar("I"), r.scalar("Q")))
    alignment = metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise FormatError(f"{path}: {ALIGNMENT_KEY} is {str(alignment)[:40]}, not a power of two")
    start = _align(r.pos, alignment)
    tensors = {}
    for name, shape, kind, offset in infos:
        if name in tensors:
            raise FormatError(f"{path}: tensor {name} appears twice")
        block, block_bytes = _BLOCKS.get(kind, (1, 0))  # a type not listed: only its start is checked
        if start + offset + -(-math.prod(shape) // block) * block_bytes > r.size or start + offset > r.size:
            raise FormatError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
        tensors[name] = GGUFTensor(name, shape, kind, start + offset)
    return GGUFFile(path, version, metadata, tensors)


def read_tensor(file: GGUFFile, name: str) -> torch.Tensor:
    """Tensor ``name`` of ``file`` as a torch tensor (Q8_0 dequantized to float32)."""
    info = file.tensors[name]
    if info.type not in _DECODED:
        known = ", ".join(v[0] for v in _DECODED.values())
        raise FormatError(f"{file.path}: tensor {name} has ggml type {info.type}; adapterops reads {known} tensors")
    kind, block, block_bytes = _DECODED[info.type]
    count = math.prod(info.shape)  # Python ints: a crafted shape cannot overflow
    if info.shape[-1] % block:
        raise FormatError(f"{file.path}: tensor {name} is {kind} with rows of {info.shape[-1]}, not a multiple of {block}")
    nbytes = count // block * block_bytes
    with open(file.path, "rb") as f:
        if info.offset + nbytes > os.fstat(f.fileno()).st_size:  # checked before anything is allocated
            raise FormatError(f"{file.path}: tensor {name} runs past the end of the file (truncated download?)")
        f.seek(info.offset)
        raw = f.read(nbytes)
    if len(raw) != nbytes:
        raise FormatError(f"{file.path}: tensor {name} runs past the end of the file (truncated download?)")
    if info.type == Q8_0:  # blocks of 32: an f16 scale, then 32 int8 codes; value = scale * code
        blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("q", "i1", 32)]))
        values = blocks["d"].astype(np.float32)[:, None] * blocks["q"].astype(np.float32)
        return torch.from_numpy(values.reshape(info.shape))
    return torch.frombuffer(bytearray(raw), dtype=_TORCH[info.type]).reshape(info.shape)


def write_gguf(path: str | os.PathLike, metadata: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Write a GGUF v3 file; values are typed by their Python type (float -> F32, int -> U32, ...).

    Tensors must be float32, float16 or bfloat16; they are written in the given order.
    """
    infos, offset = [], 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _WRITTEN:
            raise FormatError(f"tensor {name}: dtype {tensor.dtype} cannot be written to GGUF (use float32, float16 or bfloat16)")
        nbytes = tensor.numel() * tensor.element_size()
        infos.append((name, tensor, offset))
        offset = _align(offset + nbytes, DEFAULT_ALIGNMENT)
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<IQQ", VERSION, len(infos), len(metadata)))
        for key, value in metadata.items():
            _write_string(f, key)
            _write_value(f, key, value)
        for name, tensor, off in infos:
            _write_string(f, name)
            ne = list(reversed(tensor.shape))
            f.write(struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, _WRITTEN[tensor.dtype], off))
        f.write(b"\0" * (_align(f.tell(), DEFAULT_ALIGNMENT) - f.tell()))
        start = f.tell()
        for _, tensor, off in infos:
            f.write(b"\0" * (start + off - f.tell()))
            f.write(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())


def _write_string(f: BinaryIO, text: str) -> None:
    raw = text.encode("utf-8")
    f.write(struct.pack("<Q", len(raw)) + raw)


def _kind(key: str, value: Any) -> tuple[int, str | None]:
    if isinstance(value, bool):
        return _BOOL, "?"
    if isinstance(value, int):
        return (_UINT32, "I") if 0 <= value < 2**32 else (_INT64, "q")
    if isinstance(value, float):
        return _FLOAT32, "f"
    if isinstance(value, str):
        return _STRING, None
    raise FormatError(f"GGUF metadata {key}: cannot store a {type(value).__name__}")


def _write_value(f: BinaryIO, key: str, value: Any) -> None:
    if isinstance(value, (list, tuple)):
        kinds = {_kind(key, v) for v in value}
        if len(kinds) > 1:
            raise FormatError(f"GGUF metadata {key}: an array must hold values of one type")
        item, code = kinds.pop() if kinds else (_STRING, None)
        f.write(struct.pack("<IIQ", _ARRAY, item, len(value)))
        for v in value:
            _write_string(f, v) if code is None else f.write(struct.pack("<" + code, v))
        return
    kind, code = _kind(key, value)
    f.write(struct.pack("<I", kind))
    _write_string(f, value) if code is None else f.write(struct.pack("<" + code, value))


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment
