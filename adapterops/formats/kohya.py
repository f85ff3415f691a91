"""kohya / sd-scripts layout: ``<prefix>.lora_down.weight`` (r, in), ``.lora_up.weight`` (out, r)
and a scalar ``.alpha`` per layer, where ``<prefix>`` is ``lora_`` plus the module path with dots
turned into underscores.

That flattening cannot be undone in general (``self_attn`` holds an underscore), so files we write
carry the module paths in the header (``adapterops_modules``); layers of other kohya files keep
their flat name, which the merge engine matches against a base's flattened names.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from .._files import read_safetensors, safetensors_header, write_safetensors
from ..adapter import Adapter, LoraLayer
from ..errors import FormatError

SUFFIXES = (".safetensors", ".st")
MODULES_KEY = "adapterops_modules"
_KEY = re.compile(r"^(?P<prefix>.+)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha|dora_scale)$")


def flat_name(module: str) -> str:
    return "lora_" + module.replace(".", "_")


def sniff(path: Path) -> bool:
    if not (path.is_file() and path.suffix.lower() in SUFFIXES):
        return False
    keys, _ = safetensors_header(path)
    return any(k.endswith(".lora_down.weight") for k in keys)


def read(path: Path) -> Adapter:
    tensors, header = read_safetensors(path)
    try:
        modules = json.loads(header.get(MODULES_KEY, "{}"))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: corrupt {MODULES_KEY} in the header ({exc})") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise FormatError(f"{path}: unexpected tensor {key} in a kohya LoRA file")
        parts.setdefault(m["prefix"], {})[m["role"]] = tensor
    layers = {}
    for prefix, roles in parts.items():
        if "dora_scale" in roles:
            raise FormatError(f"{path}: layer {prefix} is a kohya DoRA layer, which is not supported")
        if "lora_down.weight" not in roles or "lora_up.weight" not in roles:
            raise FormatError(f"{path}: layer {prefix} lacks lora_down or lora_up")
        down, up = roles["lora_down.weight"], roles["lora_up.weight"]
        if down.ndim != 2 or up.ndim != 2:
            raise FormatError(f"{path}: layer {prefix} is a convolution LoRA ({down.ndim}-D); only linear layers are supported")
        alpha = float(roles["alpha"]) if "alpha" in roles else float(down.shape[0])
        layers[modules.get(prefix, prefix)] = LoraLayer(down, up, alpha)
    return Adapter(layers)


def write(adapter: Adapter, path: Path) -> None:
    if adapter.is_dora:
        raise FormatError("kohya's LoRA format cannot hold DoRA layers; save as peft or native")
    if not adapter:
        raise FormatError("cannot save an adapter with no layers")
    tensors, modules = {}, {}
    for name, layer in adapter.items():
        prefix = flat_name(name)
        if prefix in modules:
            raise FormatError(f"modules {modules[prefix]} and {name} flatten to the same kohya name {prefix}")
        modules[prefix] = name
        tensors[f"{prefix}.lora_down.weight"] = layer.A.detach().contiguous().cpu()
        tensors[f"{prefix}.lora_up.weight"] = layer.B.detach().contiguous().cpu()
        tensors[f"{prefix}.alpha"] = _alpha_tensor(layer.alpha)
    dim = Counter(adapter.ranks.values()).most_common(1)[0][0]
    alpha = Counter(layer.alpha for layer in adapter.values()).most_common(1)[0][0]
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": f"{alpha:g}",
        MODULES_KEY: json.dumps(modules, sort_keys=True),
    }
    write_safetensors(tensors, str(path), metadata=header)


def _alpha_tensor(alpha: float) -> torch.Tensor:
    """kohya tools store alpha as a float32 scalar; float64 only where float32 would round it."""
    single = torch.tensor(alpha, dtype=torch.float32)
    return single if float(single) == alpha else torch.tensor(alpha, dtype=torch.float64)
