"""Adapter file formats: a registry keyed by name; ``load`` sniffs, ``save`` takes ``format=``.

Each format module provides ``sniff(path) -> bool``, ``read(path) -> Adapter`` and
``write(adapter, path)`` (``path`` is a fresh temporary location; atomicity is handled here).
Only safetensors and JSON are ever parsed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import torch

from .._files import atomic_output, refuse_pickle
from ..adapter import Adapter, LoraLayer
from ..errors import FormatError, NonFiniteError
from ..safety import Inputs, check_finite
from . import kohya, native, peft

__all__ = ["FORMATS", "load", "save", "detect_format", "default_format"]

# Order matters for sniffing: the most specific first.
FORMATS: dict[str, ModuleType] = {"peft": peft, "native": native, "kohya": kohya}


def detect_format(path: str | os.PathLike) -> str:
    """Name of the format of the adapter at ``path``; FormatError when none fits."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or directory")
    refuse_pickle(path)
    for name, module in FORMATS.items():
        if module.sniff(path):
            return name
    raise FormatError(
        f"{path}: not a recognised adapter (expected a PEFT directory with adapter_config.json, "
        "an adapterops .st/.safetensors file, or a kohya safetensors file)"
    )


def load(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> Adapter:
    """Read an adapter in any supported format. NaN/Inf factors raise unless ``allow_nonfinite``.

    Layers come in natural order of their names (``layers.2`` before ``layers.10``).
    """
    fmt = detect_format(path)
    adapter = FORMATS[fmt].read(Path(path))
    if not allow_nonfinite:
        bad = adapter.nonfinite_layers()
        if bad:
            raise NonFiniteError(
                f"{path}: NaN or Inf in {len(bad)} layer(s), e.g. {bad[0]}; "
                "pass allow_nonfinite=True (--allow-nonfinite) to load it anyway"
            )
    ordered = {name: adapter[name] for name in sorted(adapter, key=_natural_key)}
    return Adapter(ordered, {**adapter.metadata, "format": fmt, "source": str(path)})


def _natural_key(name: str) -> list:
    """``layers.2`` before ``layers.10``: files store keys sorted as text, we list layers in model order."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def default_format(path: str | os.PathLike) -> str:
    """The format ``save`` picks when none is given: ``native`` for a path with a suffix, else ``peft``."""
    return "native" if Path(path).suffix else "peft"


def save(
    adapter: Adapter,
    path: str | os.PathLike,
    *,
    format: str | None = None,
    force: bool = False,
    inputs: Inputs | Iterable[str | os.PathLike] = (),
    allow_nonfinite: bool = False,
) -> None:
    """Write ``adapter`` atomically; ``format`` defaults to ``native`` for a path with a suffix, else ``peft``.

    Single-file formats (native, kohya) need a ``.st`` or ``.safetensors`` name, so that ``load``
    recognises the file again.

    ``inputs``: the files the adapter was computed from (a ``safety.Inputs`` snapshot, or paths;
    the file it was loaded from always counts): ``path`` may not be, hold or lie inside one, even
    with ``force``, and nothing is written if one changed since the snapshot. Factors holding NaN
    or Inf are refused, with their names and counts, unless ``allow_nonfinite``.
    """
    path = Path(path)
    fmt = format or default_format(path)
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    suffixes = getattr(FORMATS[fmt], "SUFFIXES", None)
    if suffixes and path.suffix.lower() not in suffixes:
        raise FormatError(f"{path}: a {fmt} adapter is one file named *{' or *'.join(suffixes)}; pick such a name")
    factors = {f"{n}.{role}": t for n, layer in adapter.items() for role, t in _factors(layer)}
    check_finite(factors, path, allow=allow_nonfinite)
    watched = (inputs if isinstance(inputs, Inputs) else Inputs(inputs)).add([adapter.metadata.get("source")])
    need = sum(t.numel() * t.element_size() for t in factors.values())
    with atomic_output(path, force=force, inputs=watched, need=need) as tmp:
        FORMATS[fmt].write(adapter, tmp)


def _factors(layer: LoraLayer) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a layer as a file stores them: ``lora_A``, ``lora_B`` and a DoRA ``magnitude``."""
    return [("lora_A", layer.A), ("lora_B", layer.B)] + ([("magnitude", layer.magnitude)] if layer.magnitude is not None else [])
