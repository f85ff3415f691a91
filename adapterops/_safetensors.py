"""The safetensors container, parsed and checked by hand so that every reader sees one set of rules.

Layout: an 8-byte little-endian header length ``N``, ``N`` bytes of UTF-8 JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}``,
then the tensor bytes. Offsets are relative to the end of the header.

``read_header`` refuses, as ``FormatError`` naming the file (and the tensor where there is one),
everything the safetensors library itself refuses (its ``Metadata::validate`` and
``read_metadata``), and a little more:

- the file is shorter than 8 bytes, ``N`` exceeds 100,000,000, or ``8 + N`` exceeds the file;
- the header is not UTF-8, does not start with ``{``, is not a JSON object, or repeats a key;
- ``__metadata__`` is not an object of strings;
- an entry lacks ``dtype``/``shape``/``data_offsets`` (other fields are ignored), names an unknown
  dtype, has a shape that is not a list of non-negative integers, or offsets that are not two
  non-negative integers ``begin <= end``;
- sorted by offset, the entries do not tile the data section: each must begin where the previous
  ended, starting at 0 (no gaps, no overlaps), and the last must end at the end of the file;
- an entry's byte count differs from ``prod(shape) * bits(dtype) / 8``.

Reads go through file descriptors (``os.open``), so any file name the OS accepts works, UTF-8 or not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterOpsError, FormatError, is_out_of_memory

__all__ = ["MAX_HEADER", "DTYPE_BITS", "TORCH_DTYPES", "TensorEntry", "Header", "read_header", "read_tensor", "read_exact"]

MAX_HEADER = 100_000_000  # the limit the safetensors library enforces
# Bits per element of every dtype safetensors defines.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}
# The dtypes this torch can hold, by safetensors name.
TORCH_DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _TORCH_NAMES.items() if hasattr(torch, v)}
_FIELDS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, safetensors dtype string, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute, from the start of the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    """A checked header: where the data starts, the entries in data order, and ``__metadata__``."""

    start: int
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _Bad(f"key {twice!r} appears twice in the header")
    return out


class _Bad(Exception):
    """A header problem, turned into FormatError with the file name by ``read_header``."""


def is_json_int(x: object) -> bool:
    """A JSON integer as ``json.loads`` gives it: an int, not a bool (which Python counts as one)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_json_number(x: object) -> bool:
    """A JSON number as ``json.loads`` gives it: an int or a float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_count(x: object) -> bool:
    return is_json_int(x) and 0 <= x < 2**64


def read_header(file: str | os.PathLike) -> Header:
    """Parse and check the header of the safetensors file ``file`` (rules in the module docstring)."""
    file = Path(file)
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError as exc:
        raise FormatError(f"{file}: cannot read ({exc.strerror or exc})") from None
    try:
        size = os.fstat(fd).st_size
        raw = os.pread(fd, 8, 0)
        if len(raw) < 8:
            raise FormatError(f"{file}: not a readable safetensors file ({len(raw)} bytes, shorter than the 8-byte header length)")
        if raw[:4] == b"GGUF":
            raise FormatError(f"{file}: a GGUF file, not safetensors; this command reads safetensors checkpoints (llama.cpp's "
                              "GGUF is read as an adapter, and as the base of convert --to gguf and check --target llama.cpp)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise FormatError(f"{file}: not a readable safetensors file (header length {n} is implausible: the limit is {MAX_HEADER:,} bytes)")
        if 8 + n > size:
            raise FormatError(f"{file}: not a readable safetensors file (truncated: the header needs {8 + n} bytes, the file has {size})")
        text = os.pread(fd, n, 8)
        if len(text) < n:
            raise FormatError(f"{file}: not a readable safetensors file (truncated while reading its header)")
    except OSError as exc:
        raise FormatError(f"{file}: cannot read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    try:
        return _parse_once(file, size, hashlib.blake2b(text, digest_size=16).digest(), text)
    except _Bad as exc:
        raise FormatError(f"{file}: not a readable safetensors file ({exc})") from None


def _parse_once(file: Path, size: int, digest: bytes, text: bytes) -> Header:
    """``_parse``, remembered for the last few headers: detecting a format, then loading, reads one
    header up to three times, and a crafted header near the size limit takes seconds to check."""
    key = (file, size, digest)
    if key not in _PARSED:
        if len(_PARSED) >= 8:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[key] = _parse(file, text, size)
    return _PARSED[key]


_PARSED: dict[tuple[Path, int, bytes], Header] = {}  # headers are never changed after parsing


NOT_TEXT = "escapes an unpaired UTF-16 surrogate (\\uD800-\\uDFFF), which is not text"


def is_text(value: Any, source: str) -> bool:
    """Whether the strings of ``value``, parsed from the JSON text ``source``, are Unicode text:
    ``json.loads`` turns an escaped lone surrogate (``"\\ud800"``) into a str that no UTF-8 file or
    terminal can hold. Only such an escape can bring one in, so a ``source`` without one is text
    (the walk over ``value`` is skipped)."""
    if not _SURROGATE_ESCAPE.search(source):
        return True
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _parse(file: Path, text: bytes, size: int) -> Header:
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad("the header is not UTF-8") from None
    if not decoded.startswith("{"):
        raise _Bad("the header does not start with '{'")
    try:
        header = json.loads(decoded, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except ValueError as exc:  # JSONDecodeError, or an integer of too many digits
        raise _Bad(f"the header is not valid JSON: {exc}") from None
    except RecursionError:
        raise _Bad("the header nests too deeply") from None
    if not isinstance(header, dict):
        raise _Bad("the header is not a JSON object")
    if not is_text(header, decoded):  # as the safetensors library, refuse what no UTF-8 file can hold
        raise _Bad(f"the header {NOT_TEXT}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Bad("__metadata__ must map strings to strings")
    start = 8 + len(text)
    spans = []
    for name, info in header.items():
        spans.append((_entry_span(name, info), name))
    spans.sort()
    entries: dict[str, TensorEntry] = {}
    pos = 0
    for (begin, end, dtype, shape), name in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes before it"
            raise _Bad(f"tensor {name}: data_offsets [{begin}, {end}] {what}")
        bits = _elements(shape) * DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            raise _Bad(f"tensor {name}: {dtype} {list(shape)} takes {bits / 8:g} bytes but data_offsets [{begin}, {end}] give {end - begin}")
        entries[name] = TensorEntry(file, dtype, shape, start + begin, end - begin)
        pos = end
    if start + pos != size:
        if start + pos > size:
            raise _Bad(f"truncated: the tensors need {start + pos} bytes, the file has {size}")
        raise _Bad(f"{size - start - pos} bytes after the last tensor that no tensor covers")
    return Header(start, entries, metadata)


def _no_constant(name: str) -> None:
    raise _Bad(f"{name} is not valid JSON")


def _entry_span(name: str, info: object) -> tuple[int, int, str, tuple[int, ...]]:
    if not isinstance(info, dict):
        raise _Bad(f"tensor {name}: entry is not an object")
    missing = sorted(_FIELDS - set(info))
    if missing:  # other fields are ignored, as safetensors ignores them
        raise _Bad(f"tensor {name}: lacks {', '.join(missing)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _Bad(f"tensor {name}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise _Bad(f"tensor {name}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets):
        raise _Bad(f"tensor {name}: data_offsets {offsets!r} are not two non-negative integers")
    begin, end = offsets
    if end < begin:
        raise _Bad(f"tensor {name}: data_offsets [{begin}, {end}] end before they begin")
    if _elements(shape) is None:
        raise _Bad(f"tensor {name}: shape {shape} has more than 2**64 elements")
    return begin, end, dtype, tuple(shape)


def _elements(shape: list[int] | tuple[int, ...]) -> int | None:
    """``prod(shape)``, or None once a partial product passes 2**64 (safetensors' overflow check)."""
    count = 1
    for s in shape:
        count *= s
        if count >= 2**64:
            return None
    return count


def read_tensor(entry: TensorEntry, name: str, *, fd: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor at ``entry`` on the CPU, read straight from its byte range.

    ``fd``: an open descriptor of ``entry.file`` to reuse; ``out``: a uint8 buffer of at least
    ``entry.nbytes`` bytes (pinned memory, say) to read into.
    """
    if entry.dtype not in TORCH_DTYPES:
        raise FormatError(f"{entry.file}: tensor {name} has dtype {entry.dtype}, which torch cannot hold")
    try:
        buf = torch.empty(entry.nbytes, dtype=torch.uint8) if out is None else out[: entry.nbytes]
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise AdapterOpsError(f"{entry.file}: tensor {name} ({list(entry.shape)} {entry.dtype}) is {entry.nbytes / 1e9:.1f} GB, "
                              "more than memory holds") from None
    own = fd is None
    try:
        if own:
            fd = os.open(entry.file, os.O_RDONLY)
        read_exact(fd, buf, entry.offset, file=entry.file)
    except OSError as exc:
        raise FormatError(f"{entry.file}: cannot read tensor {name} ({exc.strerror or exc})") from None
    finally:
        if own and fd is not None:
            os.close(fd)
    return buf.view(TORCH_DTYPES[entry.dtype]).reshape(entry.shape)


def read_exact(fd: int, buf: torch.Tensor, offset: int, *, file: str | os.PathLike | None = None) -> None:
    """Fill the uint8 CPU tensor ``buf`` with the bytes of file ``fd`` starting at ``offset``.

    A file that ends early (truncated since its header was read) raises FormatError naming ``file``
    (or, when not given, the path the descriptor was opened with).
    """
    if not buf.numel():
        return
    view = memoryview(buf.numpy())
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, len(view) - done, offset + done)
            view[done : done + len(data)] = data
            n = len(data)
        if not n:
            raise FormatError(f"{file or _name_of(fd)}: truncated: {len(view)} bytes expected at offset {offset}, the file ends after {done}")
        done += n


def _name_of(fd: int) -> str:
    """The path behind an open descriptor, for messages (Linux and macOS; else the number)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        pass
    try:
        import fcntl

        return os.fsdecode(fcntl.fcntl(fd, getattr(fcntl, "F_GETPATH"), bytes(1024)).rstrip(b"\0"))
    except (ImportError, AttributeError, OSError):
        return f"file descriptor {fd}"
