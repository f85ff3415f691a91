"""Small bases and adapters written by hand for the output-safety and fault tests, and the checks
those tests share: a digest of every input file, and "nothing at the output path"."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapterops import Adapter, LoraLayer

HIDDEN = 16
LAYERS = 2
MODULES = ("q_proj", "v_proj")
CLI = [sys.executable, "-c", "from adapterops._launch import main; main()"]  # what the console script runs


def weight_name(layer: int, module: str) -> str:
    return f"model.layers.{layer}.self_attn.{module}.weight"


def make_base(path: Path, *, dtype: torch.dtype = torch.bfloat16, hidden: int = HIDDEN, layers: int = LAYERS, seed: int = 0,
              poke: dict[str, float] | None = None) -> Path:
    """A two-shard Llama-named checkpoint with an index, config.json and tokenizer.json.

    ``poke``: ``{tensor name: value}`` written into element [0, 0] (a NaN, or a value fp16 cannot hold).
    """
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    tensors = {"model.embed_tokens.weight": torch.randn(32, hidden, generator=g)}
    for i in range(layers):
        for m in MODULES:
            tensors[weight_name(i, m)] = torch.randn(hidden, hidden, generator=g) / hidden**0.5
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden)
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    for name, value in (poke or {}).items():
        tensors[name][0, 0] = value
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:]), start=1):
        shard = f"model-0000{k}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden, "torch_dtype": str(dtype).removeprefix("torch.")}), encoding="utf-8")
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel"}}), encoding="utf-8")
    return path


def make_adapter(*, hidden: int = HIDDEN, layers: int = LAYERS, rank: int = 2, seed: int = 1, scale: float = 0.05,
                 dtype: torch.dtype = torch.float32) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter({
        weight_name(i, m).removesuffix(".weight"): LoraLayer(
            (torch.randn(rank, hidden, generator=g) * scale).to(dtype), (torch.randn(hidden, rank, generator=g) * scale).to(dtype), float(rank)
        )
        for i in range(layers) for m in MODULES
    })


def digest(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file under ``paths`` (files or directories), keyed by path."""
    found = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            found[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return found


def nothing_at(out: Path) -> bool:
    """No output and no temporary of it (``.NAME.tmp-*``, ``.NAME.old-*``) in its directory."""
    from adapterops._files import hidden_prefix

    hidden = [p for p in out.parent.iterdir() if p.name.startswith(hidden_prefix(out))] if out.parent.exists() else []
    return not os.path.lexists(out) and not hidden


def one_line(stderr: str) -> str:
    """The single line a failing command prints on stderr (fails the test when there are more)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]
