"""Adapter file formats: a registry keyed by name; ``load`` sniffs, ``save`` takes ``format=``.

Each format module provides ``sniff(path) -> bool``, ``read(path) -> Adapter`` and
``write(adapter, path)`` (``path`` is a fresh temporary location; atomicity is handled here).
A format laid out for one base model (gguf: llama.cpp's tensor names and row order) sets
``USES_BASE = True``; its ``read`` and ``write`` then also take ``base=``. Only safetensors, JSON
and GGUF are ever parsed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import torch

from .._files import atomic_output, refuse_pickle, unreadable
from ..adapter import Adapter, LoraLayer
from ..errors import FormatError, NonFiniteError
from ..safety import Inputs, check_finite
from . import gguf, kohya, native, peft

__all__ = ["FORMATS", "load", "save", "locate", "detect_format", "default_format"]

# Order matters for sniffing: the most specific first.
FORMATS: dict[str, ModuleType] = {"peft": peft, "native": native, "kohya": kohya, "gguf": gguf}


def detect_format(path: str | os.PathLike) -> str:
    """Name of the format of the adapter at ``path``; FormatError when none fits."""
    path = Path(path)
    if not path.is_file() and not path.is_dir():
        raise FormatError(f"{path}: {unreadable(path)}")
    refuse_pickle(path)
    for name, module in FORMATS.items():
        if module.sniff(path):
            return name
    model = path.is_dir() and any((path / n).is_file() for n in ("config.json", "model.safetensors", "model.safetensors.index.json"))
    raise FormatError(
        f"{path}: not a recognised adapter (expected a PEFT directory with adapter_config.json, "
        "an adapterops .st/.safetensors file, a kohya safetensors file, or a GGUF LoRA file)"
        + ("; it looks like a model checkpoint: pass it as the base (--base)" if model else "")
    )


def locate(source: str | os.PathLike, *, revision: str | None = None) -> tuple[Path, str]:
    """``(local path, format name)`` of an adapter given as a path or a Hugging Face Hub repo id.

    A path that exists is taken as it is. Otherwise ``user/repo`` (or ``user/repo@revision``, or
    ``revision=``) is looked up in the Hugging Face cache first, then downloaded unless offline,
    through the same resolver as base checkpoints (``checkpoint.resolve_base``). A repo holding
    one adapter file rather than a PEFT directory resolves to that file.
    """
    path = Path(source)
    if not path.exists() and revision is None and "@" in str(source):
        repo, _, revision = str(source).rpartition("@")
        path = Path(repo)
    if os.path.lexists(path) and revision is None:  # a dangling link too: a local path, not a repo id
        return path, detect_format(path)
    from ..checkpoint import resolve_base

    snapshot = resolve_base(path, revision=revision)
    if snapshot.is_dir() and not peft.sniff(snapshot):
        files = sorted(p for p in snapshot.iterdir() if p.suffix.lower() in (".st", ".safetensors", ".gguf"))
        if len(files) != 1:
            raise FormatError(f"{source}: the Hub repo holds no adapter_config.json and {len(files)} adapter files; expected one of them")
        snapshot = files[0]
    return snapshot, detect_format(snapshot)


def load(
    path: str | os.PathLike,
    *,
    revision: str | None = None,
    allow_nonfinite: bool = False,
    base: str | os.PathLike | None = None,
) -> Adapter:
    """Read an adapter in any supported format. NaN/Inf factors raise unless ``allow_nonfinite``.

    ``path`` is a file, a directory, or a Hub repo id (``user/repo``, ``user/repo@revision``, or
    with ``revision=``), resolved cache first (see ``locate``).

    ``base`` (a HF checkpoint directory, Hub id or GGUF file) is used by formats that need the base
    model to name or lay out layers (GGUF files without adapterops' metadata); others ignore it.

    Layers come in natural order of their names (``layers.2`` before ``layers.10``).
    """
    local, fmt = locate(path, revision=revision)
    module = FORMATS[fmt]
    adapter = module.read(local, **_base_option(module, base))
    if not allow_nonfinite:
        bad = adapter.nonfinite_layers()
        if bad:
            raise NonFiniteError(
                f"{path}: NaN or Inf in {len(bad)} layer(s), e.g. {bad[0]}; "
                "pass allow_nonfinite=True (--allow-nonfinite) to load it anyway"
            )
    ordered = {name: adapter[name] for name in sorted(adapter, key=_natural_key)}
    return Adapter(ordered, {**adapter.metadata, "format": fmt, "source": str(path)})


def _base_option(module: ModuleType, base: str | os.PathLike | None) -> dict:
    """``base=`` for the formats that declare ``USES_BASE`` (laid out for one base model), nothing for the others."""
    return {"base": base} if getattr(module, "USES_BASE", False) else {}


def _natural_key(name: str) -> list:
    """``layers.2`` before ``layers.10``: files store keys sorted as text, we list layers in model order."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def default_format(path: str | os.PathLike) -> str:
    """The format ``save`` picks when none is given: ``gguf`` for ``.gguf``, ``native`` for another suffix, else ``peft``."""
    suffix = Path(path).suffix.lower()
    return "gguf" if suffix in gguf.SUFFIXES else "native" if suffix else "peft"


def save(
    adapter: Adapter,
    path: str | os.PathLike,
    *,
    format: str | None = None,
    force: bool = False,
    base: str | os.PathLike | None = None,
    inputs: Inputs | Iterable[str | os.PathLike] = (),
    allow_nonfinite: bool = False,
) -> None:
    """Write ``adapter`` atomically; ``format`` defaults to ``gguf`` for a ``.gguf`` name, ``native``
    for another suffix, else ``peft``.

    ``inputs``: the files the adapter was computed from (a ``safety.Inputs`` snapshot, or paths;
    the file it was loaded from always counts): ``path`` may not be, hold or lie inside one, even
    with ``force``, and nothing is written if one changed since the snapshot. Factors holding NaN
    or Inf are refused, with their names and counts, unless ``allow_nonfinite``.

    Single-file formats (native, kohya, gguf) need a matching name (``.st``/``.safetensors``,
    ``.gguf``), so that ``load`` recognises the file again. ``base`` is required by formats that are
    laid out for one base model (gguf: a HF checkpoint directory, Hub id or the base's GGUF file);
    others ignore it. ``base_model`` is written as a Hub id or an absolute path, and ``task_type``
    is filled in from the base's config.json when it is at hand (``targets.complete_metadata``).
    """
    path = Path(path)
    fmt = format or default_format(path)
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    suffixes = getattr(FORMATS[fmt], "SUFFIXES", None)
    if suffixes and path.suffix.lower() not in suffixes:
        raise FormatError(f"{path}: a {fmt} adapter is one file named *{' or *'.join(suffixes)}; pick such a name")
    from ..targets import complete_metadata  # base_model as a Hub id or absolute path, task_type from the base

    adapter = complete_metadata(adapter)
    factors = {f"{n}.{role}": t for n, layer in adapter.items() for role, t in _factors(layer)}
    check_finite(factors, path, allow=allow_nonfinite)
    watched = (inputs if isinstance(inputs, Inputs) else Inputs(inputs)).add([adapter.metadata.get("source"), base])
    need = sum(t.numel() * t.element_size() for t in factors.values())
    with atomic_output(path, force=force, inputs=watched, need=need) as tmp:
        module = FORMATS[fmt]
        module.write(adapter, tmp, **_base_option(module, base))


def _factors(layer: LoraLayer) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a layer as a file stores them: ``lora_A``, ``lora_B`` and a DoRA ``magnitude``."""
    return [("lora_A", layer.A), ("lora_B", layer.B)] + ([("magnitude", layer.magnitude)] if layer.magnitude is not None else [])
