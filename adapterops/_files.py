"""File plumbing shared by every writer and reader: atomic outputs, safe safetensors reads."""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as _safetensors_bytes

from .errors import FormatError, OutputExistsError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@contextmanager
def atomic_output(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the body succeeds.

    An interrupted write leaves at most a hidden ``.name.tmp-*`` entry, never a partial ``path``.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass force=True (--force on the command line) to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if (path.is_dir() and not path.is_symlink()) or (tmp.is_dir() and path.exists()):
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise FormatError(f"{path}: pickle-based files are never loaded (they can run code); convert it to safetensors first")


def read_safetensors(path: str | os.PathLike, keys: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a safetensors file, as FormatError on any failure."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()} if keys else {}
    except FormatError:
        raise
    except Exception as exc:  # safetensors raises several unrelated types on corrupt input
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, metadata


def safetensors_header(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """Tensor names and metadata, reading only the header."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except Exception as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from None


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with a reproducible header: same tensors, same bytes.

    safetensors writes the header's metadata in hash order, which changes from run to run; here
    the header JSON is re-written with sorted keys and padded to its original length.
    """
    data = _safetensors_bytes(tensors, metadata=metadata)
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    ordered = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(ordered) <= size:
        data = data[:8] + ordered + b" " * (size - len(ordered)) + data[8 + size :]
    Path(path).write_bytes(data)
