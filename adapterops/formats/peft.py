"""PEFT's LoRA layout: ``adapter_config.json`` + ``adapter_model.safetensors`` in a directory.

Tensor keys are ``base_model.model.<module>.lora_A.weight`` (r, in), ``.lora_B.weight`` (out, r)
and, for DoRA, ``.lora_magnitude_vector`` (out,). Per-module ranks and alphas come from
``rank_pattern`` / ``alpha_pattern``, regexes PEFT matches as ``(.*\\.)?(key)$``, first match wins.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._files import read_json, read_safetensors, write_safetensors
from ..adapter import Adapter, LoraLayer, lora_scale
from ..errors import FormatError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<role>lora_A|lora_B|lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?$")


def sniff(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file() or (
        path.is_file() and path.name == WEIGHTS_NAME and (path.parent / CONFIG_NAME).is_file()
    )


def read(path: Path) -> Adapter:
    directory = path if path.is_dir() else path.parent
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        pickled = directory / "adapter_model.bin"
        if pickled.exists():
            raise FormatError(f"{pickled}: pickle-based adapters are never loaded; re-save it with safe_serialization=True")
        raise FormatError(f"{directory}: has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    config = read_json(directory / CONFIG_NAME)
    tensors, _ = read_safetensors(weights)
    return from_state_dict(tensors, config, source=str(directory))


def write(adapter: Adapter, path: Path) -> None:
    path.mkdir(parents=True)
    tensors, config = to_state_dict(adapter)
    write_safetensors(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first key of ``patterns`` that PEFT would match against ``module``, or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def from_state_dict(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, source: str) -> Adapter:
    """Build an Adapter from PEFT tensors and config, resolving rsLoRA and alpha_pattern to per-layer alpha."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise FormatError(f"{source}: peft_type is {config.get('peft_type')!r}; only LoRA adapters are supported")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        m = _KEY.match(key[len(PREFIX):] if key.startswith(PREFIX) else key)
        if m is None or key.endswith(".bias"):
            unknown.append(key)
            continue
        parts.setdefault(m["module"], {})[m["role"]] = tensor
    if unknown:
        raise FormatError(
            f"{source}: {len(unknown)} tensor(s) that are not LoRA factors, e.g. {unknown[0]} "
            "(modules_to_save, embedding LoRA and LoRA biases are not supported)"
        )
    rslora = bool(config.get("use_rslora", False))
    alpha_pattern = config.get("alpha_pattern") or {}
    default_alpha = float(config.get("lora_alpha", config.get("r", 8)))
    layers = {}
    for module, roles in parts.items():
        if "lora_A" not in roles or "lora_B" not in roles:
            raise FormatError(f"{source}: layer {module} lacks {'lora_A' if 'lora_A' not in roles else 'lora_B'}")
        A, B = roles["lora_A"], roles["lora_B"]
        if A.ndim != 2:
            raise FormatError(f"{source}: layer {module} has a {A.ndim}-D lora_A; only linear layers are supported")
        key = pattern_key(alpha_pattern, module)
        alpha = float(alpha_pattern[key]) if key is not None else default_alpha
        rank = A.shape[0]
        if rslora:  # the alpha that gives PEFT's scale under our alpha / rank convention
            alpha = lora_scale(alpha, rank, rslora=True) * rank
        layers[module] = LoraLayer(A, B, alpha, roles.get("lora_magnitude_vector"))
    metadata = {"base_model": config.get("base_model_name_or_path"), "task_type": config.get("task_type")}
    if config.get("fan_in_fan_out"):
        metadata["fan_in_fan_out"] = True
    return Adapter(layers, {k: v for k, v in metadata.items() if v is not None})


def to_state_dict(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT tensors and an ``adapter_config.json`` dict that loads to exactly these deltas.

    ``target_modules`` lists full module paths so PEFT wraps exactly these layers; ranks and alphas
    that differ from the most common go to ``rank_pattern`` / ``alpha_pattern``.
    """
    if not adapter:
        raise FormatError("cannot save an adapter with no layers")
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in adapter.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.A.detach().contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.B.detach().contiguous().cpu()
        if layer.is_dora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.magnitude.detach().contiguous().cpu()
    r = Counter(adapter.ranks.values()).most_common(1)[0][0]
    alpha = Counter(layer.alpha for layer in adapter.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(n): layer.rank for n, layer in adapter.items() if layer.rank != r}
    alpha_pattern = {re.escape(n): _number(layer.alpha) for n, layer in adapter.items() if layer.alpha != alpha}
    config = {
        "peft_type": "LORA",
        "task_type": adapter.metadata.get("task_type"),
        "base_model_name_or_path": adapter.metadata.get("base_model"),
        "r": r,
        "lora_alpha": _number(alpha),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted(adapter),
        "use_rslora": False,
        "use_dora": adapter.is_dora,
        "fan_in_fan_out": bool(adapter.metadata.get("fan_in_fan_out", False)),
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    return tensors, config


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)
