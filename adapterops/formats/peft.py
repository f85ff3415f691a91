"""PEFT's LoRA layout: ``adapter_config.json`` + ``adapter_model.safetensors`` in a directory.

Tensor keys are ``base_model.model.<module>.lora_A.weight`` (r, in), ``.lora_B.weight`` (out, r)
and, for DoRA, ``.lora_magnitude_vector`` (out,). Per-module ranks and alphas come from
``rank_pattern`` / ``alpha_pattern``, regexes PEFT matches as ``(.*\\.)?(key)$``, first match wins.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._files import read_json, read_safetensors, write_safetensors
from .._safetensors import is_json_int, is_json_number
from ..adapter import Adapter, lora_scale
from ..errors import FormatError
from . import patterns as _patterns
from .layers import collect, make_layer, require_layers

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


def is_factor_key(key: str) -> bool:
    """Whether a tensor key of a PEFT state dict is a LoRA factor or DoRA magnitude (not a bias, head or embedding)."""
    return _KEY.match(key.removeprefix(PREFIX)) is not None and not key.endswith(".bias")


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The key of ``patterns`` PEFT applies to ``module`` (first match of ``(.*\\.)?(key)$``), or None.

    Evaluated in linear time (``patterns``); a key that cannot be raises FormatError.
    """
    return _patterns.pattern_key(patterns, module)


# What PEFT's LoraConfig assumes for a field the file leaves out (checked against LoraConfig() in the tests).
CONFIG_DEFAULTS: dict[str, Any] = {
    "r": 8, "lora_alpha": 8, "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
    "rank_pattern": {}, "alpha_pattern": {},
}


def _config_field(config: Mapping[str, Any], field: str, source: str) -> Any:
    """``config[field]`` (PEFT's default when absent or null), type-checked."""
    value = config.get(field)
    if value is None:
        return CONFIG_DEFAULTS[field]
    default = CONFIG_DEFAULTS[field]
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, dict):
        ok = isinstance(value, dict) and all(is_json_number(v) and (field != "rank_pattern" or _is_rank(v)) for v in value.values())
    elif field == "r":
        ok = _is_rank(value)
    else:
        ok = is_json_number(value)
    if not ok:
        want = {"r": "a positive integer", "rank_pattern": "an object of positive integers", "alpha_pattern": "an object of numbers"}
        kind = "true or false" if isinstance(default, bool) else want.get(field, "a number")
        raise FormatError(f"{source}: adapter config field {field} is {value!r}; it must be {kind}")
    return value


def _is_rank(x: Any) -> bool:
    return is_json_int(x) and x >= 1


def from_state_dict(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, source: str) -> Adapter:
    """Build an Adapter from PEFT tensors and config, resolving rsLoRA and alpha_pattern to per-layer alpha.

    Fields the config leaves out mean what they mean to PEFT (``CONFIG_DEFAULTS``: ``lora_alpha``
    8, not the rank). Each layer's rank must be the one the config gives it (``rank_pattern``, else
    ``r``), as PEFT refuses to load the tensors otherwise.
    """
    if not isinstance(config, Mapping):
        raise FormatError(f"{source}: the adapter config is {type(config).__name__}, expected a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise FormatError(f"{source}: peft_type is {peft_type!r}; only LoRA adapters are supported")
    found = []
    unknown = []
    for key, tensor in tensors.items():
        m = _KEY.match(key.removeprefix(PREFIX))
        if m is None or key.endswith(".bias"):
            unknown.append(key)
            continue
        found.append((key, m["module"], m["role"], tensor))
    if unknown:
        raise FormatError(
            f"{source}: {len(unknown)} tensor(s) that are not LoRA factors, e.g. {unknown[0]} "
            "(modules_to_save, embedding LoRA and LoRA biases are not supported)"
        )
    parts = collect(source, found)
    r, rslora, dora = (_config_field(config, f, source) for f in ("r", "use_rslora", "use_dora"))
    rank_pattern, alpha_pattern = _config_field(config, "rank_pattern", source), _config_field(config, "alpha_pattern", source)
    default_alpha = float(_config_field(config, "lora_alpha", source))
    layers = {}
    for module, roles in parts.items():
        if "lora_A" not in roles or "lora_B" not in roles:
            raise FormatError(f"{source}: layer {module} lacks {'lora_A' if 'lora_A' not in roles else 'lora_B'}")
        A, B, magnitude = roles["lora_A"], roles["lora_B"], roles.get("lora_magnitude_vector")
        if (magnitude is not None) != dora:
            raise FormatError(
                f"{source}: layer {module} " + ("has a DoRA magnitude but use_dora is false" if magnitude is not None else "has no lora_magnitude_vector but use_dora is true")
                + "; PEFT would not load it as stored"
            )
        rank_key = _patterns.pattern_key(rank_pattern, module, field="rank_pattern", source=source)
        alpha_key = _patterns.pattern_key(alpha_pattern, module, field="alpha_pattern", source=source)
        want = rank_pattern[rank_key] if rank_key is not None else r
        alpha = float(alpha_pattern[alpha_key]) if alpha_key is not None else default_alpha
        layer = make_layer(source, module, A, B, alpha, magnitude)
        if layer.rank != want:
            said = f"rank_pattern[{rank_key!r}] = {want}" if rank_key is not None else f"r = {want}"
            raise FormatError(f"{source}: layer {module} has rank {layer.rank} but the config says {said}; PEFT refuses such a file (size mismatch)")
        if rslora:  # the alpha that gives PEFT's scale under our alpha / rank convention
            layer = dataclasses.replace(layer, alpha=lora_scale(alpha, want, rslora=True) * want)
        layers[module] = layer
    named = {"base_model": config.get("base_model_name_or_path"), "task_type": config.get("task_type")}
    metadata: dict[str, Any] = {k: v for k, v in named.items() if isinstance(v, str)}  # a name that is not text names nothing
    if _config_field(config, "fan_in_fan_out", source):
        metadata["fan_in_fan_out"] = True
    return Adapter(require_layers(source, layers), metadata)


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
