"""Small checkpoints and PEFT adapters built on the spot for the merge, extract and checkpoint tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from adapterops.checkpoint import Checkpoint

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama_model(dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def save_tiny_llama(path: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0, shard: str = "60KB") -> Path:
    """A 3-shard tiny Llama checkpoint with a few side files (tokenizer, chat template)."""
    model = tiny_llama_model(dtype, seed)
    model.save_pretrained(path, max_shard_size=shard)
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel"}}), encoding="utf-8")
    (path / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    return path


def tiny_gpt2_model(dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).to(dtype).eval()


def peft_model(model, targets, *, r: int = 4, alpha: int = 8, seed: int = 1, dora: bool = False, fan_in_fan_out: bool = False, std: float = 0.05):
    """``model`` wrapped by PEFT LoRA with random (non-zero) lora_B and, for DoRA, perturbed magnitudes."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_dora=dora, fan_in_fan_out=fan_in_fan_out, lora_dropout=0.0)
    wrapped = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return wrapped.eval()


def read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (or file)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def raw_bytes(path: Path, name: str) -> bytes:
    entry = Checkpoint(path).entry(name)
    with open(entry.file, "rb") as f:
        f.seek(entry.offset)
        return f.read(entry.nbytes)


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers at ``|x|`` (8 significant bits)."""
    _, exponent = torch.frexp(x.float().abs())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 8)


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 1.0) -> None:
    assert actual.shape == expected.shape
    a, e = actual.float(), expected.float()
    differ = a != e
    if not differ.any():
        return
    a, e = a[differ], e[differ]
    tol = ulps * bf16_ulp(torch.maximum(a.abs(), e.abs()))
    worst = ((a - e).abs() / tol).max().item()
    assert (a - e).abs().le(tol).all(), f"differs by up to {worst:.2f} bf16 ulps"


def hub_cache(cache: Path, repo_id: str, source: Path, sha: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay ``source``'s files out as huggingface_hub does: blobs, a snapshot of symlinks, refs/main."""
    import hashlib
    import os

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    (repo / "refs" / "main").write_text(sha)
    return snapshot
