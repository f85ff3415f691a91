"""Base model checkpoints: a local directory (one ``model.safetensors`` or shards with
``model.safetensors.index.json``), a single safetensors file, or a Hugging Face Hub repo id
resolved through ``huggingface_hub`` (its local cache first, so offline use works).

The safetensors layout is simple enough to stream by hand: an 8-byte little-endian header length
``N``, ``N`` bytes of JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}`` plus an
optional ``"__metadata__"`` of strings), then the raw tensor bytes; offsets are relative to the end
of the header and must tile the data region. Every shard header is checked before anything is read
(``_safetensors.read_header``: at least the checks safetensors makes), and the index must agree
with the shards (each tensor in exactly the shard its ``weight_map`` names). ``Checkpoint`` reads headers and byte ranges directly
(no mmap, no decode of untouched tensors); ``ShardWriter`` writes a file tensor by tensor, reserving
header space up front and filling it in at the end.

Also owns the mapping from adapter layer names to base tensor names (``match_layers``).
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._files import read_json, refuse_pickle
from ._safetensors import TORCH_DTYPES, TensorEntry, read_header, read_tensor
from ._safetensors import read_exact  # noqa: F401  (re-exported for the merge engine)
from .errors import BaseMismatchError, FormatError

__all__ = [
    "Checkpoint",
    "ShardWriter",
    "Target",
    "match_layers",
    "resolve_base",
    "INDEX_NAME",
    "SINGLE_NAME",
    "NF4_STATE_SUFFIX",
    "ST_DTYPES",
    "st_dtype_name",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
NF4_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# Models whose linear weights are stored (in, out) (GPT-2 style Conv1D).
CONV1D_MODEL_TYPES = {"gpt2", "gpt_bigcode", "openai-gpt", "decision_transformer"}

ST_DTYPES: dict[str, torch.dtype] = TORCH_DTYPES  # safetensors dtype name -> torch dtype
_NAMES = {v: k for k, v in ST_DTYPES.items()}


def st_dtype_name(dtype: torch.dtype) -> str:
    """The safetensors dtype string (``BF16``, ``F32``, ...) of a torch dtype."""
    if dtype not in _NAMES:
        raise FormatError(f"dtype {dtype} cannot be stored in safetensors by adapterops")
    return _NAMES[dtype]


def resolve_base(base: str | os.PathLike, *, revision: str | None = None) -> Path:
    """Local path of ``base``: the path itself if it exists, else a Hub snapshot (cache first).

    ``revision`` (a branch, tag or commit) picks the snapshot of a Hub id; it has no meaning for a path.
    """
    path = Path(base)
    if path.exists():
        if revision is not None:
            raise FormatError(f"{base}: is a local path; a revision ({revision}) applies only to Hub repo ids")
        refuse_pickle(path)
        return path
    text = str(base)
    if not _REPO_ID.match(text) or text.startswith((".", "/")):
        raise FormatError(f"{base}: no such file or directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision, local_files_only=True, allow_patterns=_HUB_PATTERNS))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise FormatError(f"{base}: not a local path, and not in the Hugging Face cache (offline mode is on); download it first or pass a directory")
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(
            f"{base}: not a local path, not in the Hugging Face cache, and the Hub could not provide it ({reason}); "
            "check the name, or download it first and pass its directory"
        ) from None


class Checkpoint:
    """Read-only view of a safetensors checkpoint: tensor names, shapes, dtypes, shards, side files."""

    def __init__(self, base: str | os.PathLike) -> None:
        path = resolve_base(base)
        self.source = str(base)
        self.path = path
        if path.is_file():
            self.root = path.parent
            self.files = [path]
            self.index: dict[str, Any] | None = None
        elif (path / INDEX_NAME).is_file():
            self.root = path
            self.index = read_json(path / INDEX_NAME)
            self.files = _index_shards(path, self.index)
        elif (path / SINGLE_NAME).is_file():
            self.root, self.files, self.index = path, [path / SINGLE_NAME], None
        else:
            found = sorted(path.glob("*.safetensors"))
            if len(found) != 1:
                pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
                hint = f" (found {pickled[0]}: pickle-based checkpoints are never loaded; convert to safetensors)" if pickled else ""
                raise FormatError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
            self.root, self.files, self.index = path, found, None
        self._entries: dict[str, TensorEntry] = {}
        self._metadata: dict[Path, dict[str, str]] = {}
        self._data_start: dict[Path, int] = {}
        for file in self.files:
            header = read_header(file)
            self._data_start[file], self._metadata[file] = header.start, header.metadata
            for name, entry in header.entries.items():
                if name in self._entries:
                    raise FormatError(f"{path}: tensor {name} is stored twice, in {self._entries[name].file.name} and {file.name}")
                self._entries[name] = entry
        if self.index is not None:
            _check_weight_map(path, self.index["weight_map"], self._entries)

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self._entries)} tensors in {len(self.files)} file(s))"

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> TensorEntry:
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        """The torch dtype (``uint8`` for dtypes torch cannot hold; see ``entry(name).dtype``)."""
        return ST_DTYPES.get(self._entries[name].dtype, torch.uint8)

    def nbytes(self, name: str) -> int:
        return self._entries[name].nbytes

    @property
    def total_size(self) -> int:
        """Bytes of tensor data in all shards."""
        return sum(e.nbytes for e in self._entries.values())

    def file_of(self, name: str) -> Path:
        return self._entries[name].file

    def names_in(self, file: Path) -> list[str]:
        """Tensor names stored in ``file``, in the order of their bytes."""
        return [n for n, e in self._entries.items() if e.file == file]

    def metadata(self, file: Path) -> dict[str, str]:
        return self._metadata[file]

    def header_size(self, file: Path) -> int:
        """Bytes of the JSON header of ``file``."""
        return self._data_start[file] - 8

    def read(self, name: str, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name`` on the CPU, read straight from its byte range.

        ``out``: a uint8 buffer of at least ``nbytes(name)`` bytes (pinned memory, say) to read into.
        """
        return read_tensor(self._entries[name], name, out=out)

    def get(self, name: str) -> torch.Tensor:
        return self.read(name)

    def config(self) -> dict[str, Any] | None:
        path = self.root / "config.json"
        if not path.is_file():
            return None
        config = read_json(path)
        if not isinstance(config, dict):
            raise FormatError(f"{path}: not a model config (expected a JSON object, found {type(config).__name__})")
        return config

    def is_nf4(self) -> bool:
        return any(n.endswith(NF4_STATE_SUFFIX) for n in self._entries)

    def side_files(self) -> list[Path]:
        """Files other than the weights (config, tokenizer, ...) that belong with the model."""
        if len(self.files) == 1 and self.index is None and self.files[0].name != SINGLE_NAME and self.root == self.files[0].parent:
            if not (self.root / "config.json").is_file():
                return []
        skip = set(self.files) | {self.root / INDEX_NAME}
        return sorted(p for p in self.root.iterdir() if p.is_file() and p not in skip and p.suffix != ".safetensors" and not p.name.startswith("."))

    def is_conv1d(self) -> bool:
        config = self.config() or {}
        return config.get("model_type") in CONV1D_MODEL_TYPES


def _index_shards(root: Path, index: Any) -> list[Path]:
    """The shard files an index names, in order of first mention, each a safetensors file inside ``root``."""
    where = root / INDEX_NAME
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{where}: no weight_map (expected an object mapping tensor names to shard files)")
    if not isinstance(index.get("metadata") or {}, dict):
        raise FormatError(f"{where}: metadata is {type(index['metadata']).__name__}, expected a JSON object")
    shards = []
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "\0" in shard:
            raise FormatError(f"{where}: weight_map sends {name} to {shard!r}, which is not a file name")
        parts = Path(shard).parts
        if Path(shard).is_absolute() or ".." in parts or "\\" in shard:
            raise FormatError(f"{where}: shard {shard!r} (for {name}) lies outside the checkpoint directory")
        if not shard.endswith(".safetensors"):
            raise FormatError(f"{where}: shard {shard!r} is not a safetensors file (only safetensors and JSON are ever parsed)")
        shards.append(shard)
    files = list(dict.fromkeys(root / f for f in shards))
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FormatError(f"{root}: shard {missing[0].name} named in {INDEX_NAME} is missing")
    return files


def _check_weight_map(root: Path, weight_map: Mapping[str, str], entries: Mapping[str, TensorEntry]) -> None:
    """Every tensor the index names is in the shard it names, and every stored tensor is named."""
    where = root / INDEX_NAME
    for name, shard in weight_map.items():
        entry = entries.get(name)
        if entry is None:
            raise FormatError(f"{where}: tensor {name} is listed in {shard} but no shard holds it")
        if entry.file != root / shard:
            raise FormatError(f"{where}: tensor {name} is listed in {shard} but stored in {entry.file.name}")
    unlisted = [n for n in entries if n not in weight_map]
    if unlisted:
        raise FormatError(
            f"{where}: {len(unlisted)} stored tensor(s) missing from weight_map, e.g. {unlisted[0]} in {entries[unlisted[0]].file.name}"
        )


class ShardWriter:
    """Writes one safetensors file tensor by tensor, in any order, with O(1) memory.

    The header is written last into ``reserve`` bytes kept free after the length prefix (padded
    with spaces, as safetensors pads); if it outgrows them, the file is rebuilt once with a larger
    header. ``add`` takes a CPU tensor; ``copy`` moves a byte range of another file without decoding.
    """

    def __init__(self, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None, reserve: int = 64 * 1024) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self.reserve = _round8(max(reserve, 64))
        self._header: dict[str, dict[str, Any]] = {}
        self._pos = 0  # bytes of tensor data written so far
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _write_all(self._fd, memoryview(b"\0" * (8 + self.reserve)), 0)

    @property
    def bytes_written(self) -> int:
        return self._pos

    def _record(self, name: str, dtype: str, shape: Iterable[int], nbytes: int) -> None:
        if name in self._header:
            raise FormatError(f"{self.path}: tensor {name} written twice")
        self._header[name] = {"dtype": dtype, "shape": [int(s) for s in shape], "data_offsets": [self._pos, self._pos + nbytes]}
        self._pos += nbytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (on the CPU) under ``name``."""
        t = tensor.detach().contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        _write_all(self._fd, memoryview(raw.numpy()), 8 + self.reserve + self._pos)
        self._record(name, st_dtype_name(t.dtype), t.shape, raw.numel())

    def copy(self, name: str, entry: TensorEntry) -> None:
        """Append the bytes of ``entry`` (a tensor of another file) under ``name``, unchanged."""
        src = os.open(entry.file, os.O_RDONLY)
        try:
            _copy_range(src, self._fd, entry.offset, 8 + self.reserve + self._pos, entry.nbytes)
        finally:
            os.close(src)
        self._record(name, entry.dtype, entry.shape, entry.nbytes)

    def close(self) -> None:
        """Write the header; the file is complete after this."""
        header: dict[str, Any] = {}
        if self.metadata:
            header["__metadata__"] = self.metadata
        header.update(self._header)
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        if len(text) <= self.reserve:
            _write_all(self._fd, memoryview(struct.pack("<Q", self.reserve) + text + b" " * (self.reserve - len(text))), 0)
            os.close(self._fd)
            return
        os.close(self._fd)  # rare: rebuild once with room for the header
        size = _round8(len(text))
        tmp = self.path.with_name(self.path.name + ".grow")
        src, dst = os.open(self.path, os.O_RDONLY), os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(dst, memoryview(struct.pack("<Q", size) + text + b" " * (size - len(text))), 0)
            _copy_range(src, dst, 8 + self.reserve, 8 + size, self._pos)
        finally:
            os.close(src)
            os.close(dst)
        os.replace(tmp, self.path)

    def abort(self) -> None:
        """Close without finishing (the caller discards the file)."""
        try:
            os.close(self._fd)
        except OSError:
            pass


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _copy_range(src: int, dst: int, src_offset: int, dst_offset: int, nbytes: int) -> None:
    """Copy ``nbytes`` between two file descriptors at the given offsets (in the kernel when possible)."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < nbytes:
                n = os.copy_file_range(src, dst, nbytes - done, src_offset + done, dst_offset + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # unsupported here: fall back to a user-space copy below
    chunk = 16 * 1024 * 1024
    while done < nbytes:
        data = os.pread(src, min(chunk, nbytes - done), src_offset + done)
        if not data:
            raise FormatError("a source file was truncated while copying")
        _write_all(dst, memoryview(data), dst_offset + done)
        done += len(data)


@dataclass(frozen=True)
class Target:
    """Where an adapter layer lands: the base tensor, and whether it is stored (in, out)."""

    tensor: str
    transposed: bool = False


def match_layers(
    layers: Mapping[str, tuple[int, int]],
    checkpoint: Checkpoint | Mapping[str, tuple[int, ...]],
    *,
    fan_in_fan_out: bool = False,
    weight_shape: Any = None,
) -> dict[str, Target]:
    """Map adapter layer names (with their delta shapes (out, in)) to base weight tensors.

    ``checkpoint`` is a Checkpoint or a plain ``{tensor name: shape}`` mapping (a live module's
    weights, say). ``X`` matches ``X.weight``; failing that, a unique name that differs only by a
    leading prefix (``model.`` on one side only, say), or a unique base name that flattens (dots to
    underscores) to a kohya layer name. Shapes must fit: directly, or transposed only where the
    weights are stored (in, out) (``fan_in_fan_out``, or a GPT-2-style Conv1D model type). ``weight_shape(name)`` overrides the stored shape (NF4 bases store packed
    bytes). Every problem is collected and raised at once as BaseMismatchError, before any work.
    """
    if isinstance(checkpoint, Checkpoint):
        names, shape_of, conv1d = checkpoint.names(), checkpoint.shape, _stores_in_out(checkpoint, fan_in_fan_out)
    else:
        names, shape_of, conv1d = list(checkpoint), lambda n: tuple(checkpoint[n]), fan_in_fan_out
    weights = [n for n in names if n.endswith(".weight")]
    weight_set = set(weights)
    flat: dict[str, list[str]] = {}
    for n in weights:
        flat.setdefault(n[: -len(".weight")].replace(".", "_"), []).append(n)
    targets, missing, misfits = {}, [], []
    for name, (out, inp) in layers.items():
        tensor = _find(name, weight_set, weights, flat)
        if tensor is None:
            missing.append(name)
            continue
        shape = tuple(weight_shape(tensor)) if weight_shape else tuple(shape_of(tensor))
        if shape == (inp, out) and conv1d:
            targets[name] = Target(tensor, transposed=True)
        elif shape == (out, inp):
            targets[name] = Target(tensor, transposed=False)
        elif shape == (inp, out):  # a transposed delta only fits a weight stored (in, out)
            misfits.append(
                f"{name}: adapter delta is [{out}, {inp}], base {tensor} is {list(shape)} (transposed), and the base does not "
                "store (in, out) Conv1D weights; if it does, the adapter needs fan_in_fan_out"
            )
        else:
            misfits.append(f"{name}: adapter delta is [{out}, {inp}], base {tensor} is {list(shape)}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} adapter layer(s) have no weight in the base, e.g. {', '.join(missing[:3])}")
    if misfits:
        problems.append(f"{len(misfits)} shape mismatch(es): {'; '.join(misfits[:3])}")
    if problems:
        raise BaseMismatchError("; ".join(problems) + " -- was this adapter trained on another model?")
    used: dict[str, str] = {}
    for name, target in targets.items():
        if target.tensor in used:
            raise BaseMismatchError(f"adapter layers {used[target.tensor]} and {name} both map to {target.tensor}")
        used[target.tensor] = name
    return targets


def _stores_in_out(checkpoint: Checkpoint, fan_in_fan_out: bool) -> bool:
    """Whether the checkpoint's linear weights are stored (in, out). A config that names the model
    type decides, as in PEFT, which honours ``fan_in_fan_out`` only on Conv1D layers and turns it
    off (with a warning) on ``nn.Linear`` ones; without one, the adapter's flag is all there is."""
    config = checkpoint.config() or {}
    if "model_type" not in config:
        return fan_in_fan_out
    conv1d = checkpoint.is_conv1d()
    if fan_in_fan_out and not conv1d:
        warnings.warn(
            f"the adapter sets fan_in_fan_out, but {checkpoint.root} is a {config['model_type']!r} model of nn.Linear "
            "layers; ignoring it, as PEFT does", stacklevel=3,
        )
    return conv1d


def _find(name: str, weight_set: set[str], weights: Iterable[str], flat: Mapping[str, list[str]]) -> str | None:
    if f"{name}.weight" in weight_set:
        return f"{name}.weight"
    parts = name.split(".")
    for i in range(1, len(parts)):  # the adapter carries an extra prefix
        candidate = ".".join(parts[i:]) + ".weight"
        if candidate in weight_set:
            return candidate
    suffix = f".{name}.weight"  # the base carries an extra prefix
    found = [w for w in weights if w.endswith(suffix)]
    if len(found) == 1:
        return found[0]
    key = name.removeprefix("lora_")  # kohya flattened names
    for prefix in ("", "unet_", "te_", "te1_", "te2_"):
        stripped = key.removeprefix(prefix)
        candidates = [n for f, ns in flat.items() for n in ns if f == stripped or f.endswith("_" + stripped)] if stripped else []
        if len(candidates) == 1:
            return candidates[0]
    return None
