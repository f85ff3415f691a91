"""NF4 checkpoints for the quantize and NF4-merge tests: ours, and the one transformers writes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from models import CACHE

from adapterops.quant import dequantize_nf4, from_state_dict


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 3-shard tiny bf16 Llama whose linear layers all have in_features a multiple of 64.

    (bitsandbytes 0.50's CPU dequantization kernel misplaces block boundaries when in_features
    is a multiple of 16 but not of the blocksize; see test_nf4. Real models never are.)
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path, max_shard_size="60KB")
    return path


def bnb_reference(source: Path, *, compute_dtype: torch.dtype = torch.bfloat16) -> Path:
    """``source`` quantized by transformers + bitsandbytes at load time, then ``save_pretrained``.

    Slow on a CPU (about a minute for 135M parameters), so cached on disk per library version.
    """
    import bitsandbytes
    import transformers
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = CACHE / f"{source.name}-bnb-nf4-{bitsandbytes.__version__}-{transformers.__version__}"
    if (out / "config.json").is_file():
        return out
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype
    )
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, dtype=torch.bfloat16, device_map="cpu")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out


def dense_state_dict(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """An NF4 state dict with every quantized weight replaced by its dequantized value.

    ``dtype=None`` keeps each tensor's dtype (a weight dequantizes to the dtype its state records);
    ``torch.float32`` gives the float32 products ``code * absmax`` and float32 copies of the rest.
    """
    weights = [k[: -len(".quant_state.bitsandbytes__nf4")] for k in tensors if k.endswith(".quant_state.bitsandbytes__nf4")]
    out = {k: v.to(dtype or v.dtype) for k, v in tensors.items() if not any(k == w or k.startswith(w + ".") for w in weights)}
    for w in weights:
        out[w] = dequantize_nf4(from_state_dict(tensors, w), dtype=dtype)
    return out


def dense_model_from(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, **overrides):
    """The model of ``path``'s config without quantization, holding ``tensors`` dequantized.

    ``overrides`` change the config (``num_hidden_layers=4`` builds the first four layers only).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, **overrides)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    wanted = set(model.state_dict())
    needed = {k: v for k, v in tensors.items() if k in wanted or k.split(".weight.")[0] + ".weight" in wanted}
    missing, unexpected = model.load_state_dict(dense_state_dict(needed, dtype), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    if missing:
        model.tie_weights()
    return model


def load_4bit(path: Path, float32: bool = True, **overrides):
    """``from_pretrained`` of an NF4 checkpoint through transformers + bitsandbytes.

    ``float32``: compute in float32 on bitsandbytes' reference path (dequantize, then a plain
    linear), so logits can be compared tightly with ``dense_model_from``; the default bfloat16 path
    on CPUs with AVX512-BF16 uses a repacked kernel that rounds differently. ``overrides`` change
    the config, as in ``dense_model_from``.
    """
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **overrides).eval()
    if float32:
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.compute_dtype, module.compute_type_is_set = torch.float32, True
                module.support_avx512bf16_for_cpu = False
        for p in model.parameters():
            if not isinstance(p, bnb.nn.Params4bit):
                p.data = p.data.float()
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()
