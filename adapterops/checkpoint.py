"""Base model checkpoints: a local directory (one ``model.safetensors`` or shards with
``model.safetensors.index.json``), a single safetensors file, or a Hugging Face Hub repo id
resolved through ``huggingface_hub`` (its local cache first, so offline use works).

Also owns the mapping from adapter layer names to base tensor names (``match_layers``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ._files import read_json, refuse_pickle
from .errors import BaseMismatchError, FormatError

__all__ = ["Checkpoint", "Target", "match_layers", "resolve_base", "NF4_STATE_SUFFIX"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
NF4_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# Models whose linear weights are stored (in, out) (GPT-2 style Conv1D).
CONV1D_MODEL_TYPES = {"gpt2", "gpt_bigcode", "openai-gpt", "decision_transformer"}


def resolve_base(base: str | os.PathLike) -> Path:
    """Local path of ``base``: the path itself if it exists, else a Hub snapshot (cache first)."""
    path = Path(base)
    if path.exists():
        refuse_pickle(path)
        return path
    text = str(base)
    if not _REPO_ID.match(text) or text.startswith((".", "/")):
        raise FormatError(f"{base}: no such file or directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, local_files_only=True, allow_patterns=_HUB_PATTERNS))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise FormatError(f"{base}: not a local path, and not in the Hugging Face cache (offline mode is on); download it first or pass a directory")
    try:
        return Path(snapshot_download(text, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        raise FormatError(f"{base}: not a local path, and the Hub could not provide it ({type(exc).__name__}: {exc})") from None


class Checkpoint:
    """Read-only view of a safetensors checkpoint: tensor names, shapes, dtypes, shards, side files."""

    def __init__(self, base: str | os.PathLike) -> None:
        path = resolve_base(base)
        self.source = str(base)
        if path.is_file():
            self.root = path.parent
            self.files = [path]
            self.index: dict[str, Any] | None = None
        elif (path / INDEX_NAME).is_file():
            self.root = path
            self.index = read_json(path / INDEX_NAME)
            weight_map = self.index.get("weight_map") if isinstance(self.index, dict) else None
            if not isinstance(weight_map, dict):
                raise FormatError(f"{path / INDEX_NAME}: no weight_map")
            self.files = [path / f for f in dict.fromkeys(weight_map.values())]
            missing = [f for f in self.files if not f.is_file()]
            if missing:
                raise FormatError(f"{path}: shard {missing[0].name} named in {INDEX_NAME} is missing")
        elif (path / SINGLE_NAME).is_file():
            self.root, self.files, self.index = path, [path / SINGLE_NAME], None
        else:
            found = sorted(path.glob("*.safetensors"))
            if len(found) != 1:
                pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
                hint = f" (found {pickled[0]}: pickle-based checkpoints are never loaded; convert to safetensors)" if pickled else ""
                raise FormatError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
            self.root, self.files, self.index = path, found, None
        self._file_of: dict[str, Path] = {}
        self._info: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._metadata: dict[Path, dict[str, str]] = {}
        for file in self.files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    self._metadata[file] = dict(f.metadata() or {})
                    for name in f.keys():
                        sl = f.get_slice(name)
                        self._file_of[name] = file
                        self._info[name] = (tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype(), torch.uint8))
            except Exception as exc:
                raise FormatError(f"{file}: not a readable safetensors file ({exc})") from None

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self._info)} tensors in {len(self.files)} file(s))"

    def names(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._info[name][1]

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    def names_in(self, file: Path) -> list[str]:
        return [n for n, f in self._file_of.items() if f == file]

    def metadata(self, file: Path) -> dict[str, str]:
        return self._metadata[file]

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self._file_of[name]), framework="pt") as f:
            return f.get_tensor(name)

    def config(self) -> dict[str, Any] | None:
        path = self.root / "config.json"
        return read_json(path) if path.is_file() else None

    def is_nf4(self) -> bool:
        return any(n.endswith(NF4_STATE_SUFFIX) for n in self._info)

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


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class Target:
    """Where an adapter layer lands: the base tensor, and whether it is stored (in, out)."""

    tensor: str
    transposed: bool = False


def match_layers(
    layers: Mapping[str, tuple[int, int]],
    checkpoint: Checkpoint,
    *,
    fan_in_fan_out: bool = False,
    weight_shape: Any = None,
) -> dict[str, Target]:
    """Map adapter layer names (with their delta shapes (out, in)) to base weight tensors.

    ``X`` matches ``X.weight``; failing that, a unique name that differs only by a leading prefix
    (``model.`` on one side only, say), or a unique base name that flattens (dots to underscores)
    to a kohya layer name. Shapes must fit, directly or transposed for Conv1D-style (in, out)
    weights. ``weight_shape(name)`` overrides the stored shape (NF4 bases store packed bytes).
    Every problem is collected and raised at once as BaseMismatchError, before any work is done.
    """
    weights = [n for n in checkpoint.names() if n.endswith(".weight")]
    weight_set = set(weights)
    flat = {}
    for n in weights:
        flat.setdefault(n[: -len(".weight")].replace(".", "_"), []).append(n)
    conv1d = fan_in_fan_out or checkpoint.is_conv1d()
    targets, missing, misfits = {}, [], []
    for name, (out, inp) in layers.items():
        tensor = _find(name, weight_set, weights, flat)
        if tensor is None:
            missing.append(name)
            continue
        shape = tuple(weight_shape(tensor)) if weight_shape else checkpoint.shape(tensor)
        if shape == (inp, out) and (conv1d or shape != (out, inp)):
            targets[name] = Target(tensor, transposed=True)
        elif shape == (out, inp):
            targets[name] = Target(tensor, transposed=False)
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
