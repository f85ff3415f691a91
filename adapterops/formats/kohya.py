"""kohya / sd-scripts layout: ``<prefix>.lora_down.weight`` (r, in), ``.lora_up.weight`` (out, r)
and a scalar ``.alpha`` per layer, where ``<prefix>`` is ``lora_`` plus the module path with dots
turned into underscores.

That flattening cannot be undone in general (``self_attn`` holds an underscore), so files we write
carry the module paths in the header (``adapterops_modules``), and the adapter's metadata (base
model, task type) as JSON (``adapterops_metadata``); layers of other kohya files keep their flat
name, which the merge engine matches against a base's flattened names.

The naming is Stable Diffusion's (``lora_unet_*``, ``lora_te_*``): sd-scripts, diffusers and ComfyUI
apply none of the layers of an LLM adapter written this way, so writing one warns.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path

import torch

from .._files import header_json, read_safetensors, safetensors_header, write_safetensors
from ..adapter import Adapter
from ..errors import FormatError
from .layers import collect, make_layer, require_layers

SUFFIXES = (".safetensors", ".st")
MODULES_KEY = "adapterops_modules"
METADATA_KEY = "adapterops_metadata"
_METADATA_FIELDS = ("base_model", "task_type")
# Module paths of diffusion models, the only ones kohya-format consumers apply (UNet, text encoders, DiT).
_DIFFUSION = re.compile(r"^(lora_)?(unet|te\d?|text_encoder(_\d)?|text_model|transformer|down_blocks|up_blocks|mid_block|"
                        r"single_transformer_blocks|transformer_blocks|double_blocks|single_blocks)[._]")
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
    modules = header_json(path, header, MODULES_KEY, {})
    extra = header_json(path, header, METADATA_KEY, {})
    found = []
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise FormatError(f"{path}: unexpected tensor {key} in a kohya LoRA file")
        found.append((key, m["prefix"], m["role"], tensor))
    parts = collect(str(path), found)
    names = _module_names(path, modules, parts)
    layers = {}
    for prefix, roles in parts.items():
        if "dora_scale" in roles:
            raise FormatError(f"{path}: layer {prefix} is a kohya DoRA layer, which is not supported")
        if "lora_down.weight" not in roles or "lora_up.weight" not in roles:
            raise FormatError(f"{path}: layer {prefix} lacks lora_down or lora_up")
        down, up = roles["lora_down.weight"], roles["lora_up.weight"]
        alpha = _alpha(path, prefix, roles.get("alpha"), down)
        layers[names[prefix]] = make_layer(str(path), prefix, down, up, alpha, names=("lora_down", "lora_up"))
    require_layers(str(path), layers)
    metadata = {k: extra[k] for k in _METADATA_FIELDS if isinstance(extra, dict) and isinstance(extra.get(k), str)}
    return Adapter(layers, metadata)


def _module_names(path: Path, modules: object, parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, str]:
    """Module path of each flat layer name: ``adapterops_modules`` where it names one, else the flat name.

    The map must send each layer to a module that flattens back to it, and no two layers to one module.
    """
    if not isinstance(modules, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in modules.items()):
        raise FormatError(f"{path}: {MODULES_KEY} in the header must map flat layer names to module paths (strings)")
    names: dict[str, str] = {}
    owner: dict[str, str] = {}
    for prefix in parts:
        name = modules.get(prefix, prefix)
        if name != prefix and flat_name(name) != prefix:
            raise FormatError(f"{path}: {MODULES_KEY} sends layer {prefix} to {name}, which flattens to {flat_name(name)}, not {prefix}")
        if name in owner:
            raise FormatError(f"{path}: layers {owner[name]} and {prefix} both map to module {name}; one would be dropped")
        owner[name] = prefix
        names[prefix] = name
    return names


def _alpha(path: Path, prefix: str, alpha: torch.Tensor | None, down: torch.Tensor) -> float:
    """The layer's alpha as sd-scripts reads it: the stored scalar, or the rank when it is missing or 0."""
    rank = float(down.shape[0]) if down.ndim >= 1 else 0.0
    if alpha is None:
        return rank
    if alpha.numel() != 1 or alpha.dtype == torch.bool or alpha.is_complex():
        raise FormatError(f"{path}: layer {prefix} has alpha of shape {list(alpha.shape)} and dtype {str(alpha.dtype).removeprefix('torch.')}; it must be one number")
    value = float(alpha.reshape(()).double())
    return rank if value == 0 else value


def write(adapter: Adapter, path: Path) -> None:
    if adapter.is_dora:
        raise FormatError("kohya's LoRA format cannot hold DoRA layers; save as peft or native")
    if not adapter:
        raise FormatError("cannot save an adapter with no layers")
    llm = [n for n in adapter if not _DIFFUSION.match(n)]
    if llm:
        warnings.warn(
            f"kohya naming is the Stable Diffusion convention (lora_unet_*, lora_te_*): sd-scripts, diffusers and "
            f"ComfyUI apply none of the layers of this adapter (e.g. {llm[0]}); only adapterops reads them back. "
            "Save as peft for transformers, PEFT and vLLM",
            stacklevel=3,
        )
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
    extra = {k: adapter.metadata[k] for k in _METADATA_FIELDS if isinstance(adapter.metadata.get(k), str)}
    if extra:
        header[METADATA_KEY] = json.dumps(extra, sort_keys=True)
    write_safetensors(tensors, str(path), metadata=header)


def _alpha_tensor(alpha: float) -> torch.Tensor:
    """kohya tools store alpha as a float32 scalar; float64 only where float32 would round it."""
    single = torch.tensor(alpha, dtype=torch.float32)
    return single if float(single) == alpha else torch.tensor(alpha, dtype=torch.float64)
