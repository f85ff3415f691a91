"""adapterops' single-file format: one safetensors file with PEFT tensor keys, and in its header
the PEFT config (``adapter_config``) and the adapter's metadata (``adapterops_metadata``), so one
``.st`` file is a whole adapter that PEFT-aware tools can also read.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import __name__ as _package
from .._files import header_json, read_safetensors, safetensors_header, write_safetensors
from ..adapter import Adapter
from . import peft

SUFFIXES = (".st", ".safetensors")
CONFIG_KEY = "adapter_config"
METADATA_KEY = "adapterops_metadata"


def sniff(path: Path) -> bool:
    if not (path.is_file() and path.suffix.lower() in SUFFIXES):
        return False
    _, metadata = safetensors_header(path)
    return CONFIG_KEY in metadata


def read(path: Path) -> Adapter:
    tensors, header = read_safetensors(path)
    config = header_json(path, header, CONFIG_KEY)
    extra = header_json(path, header, METADATA_KEY, {})
    adapter = peft.from_state_dict(tensors, config, source=str(path))
    return adapter.with_metadata(**{k: v for k, v in extra.items() if k not in ("format", "source")})


def write(adapter: Adapter, path: Path) -> None:
    tensors, config = peft.to_state_dict(adapter)
    extra = {k: v for k, v in adapter.metadata.items() if k not in ("format", "source") and _jsonable(v)}
    header = {"format": "pt", CONFIG_KEY: json.dumps(config, sort_keys=True), METADATA_KEY: json.dumps(extra, sort_keys=True)}
    header["creator"] = _package
    write_safetensors(tensors, str(path), metadata=header)


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
