"""Shared pieces of the training tests: one torch thread per module, tiny random Llamas."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread beats two (no barrier waits), on a shared machine by far.

    Import it into a test module (``from train_helpers import one_thread``) to apply it there.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_tiny_llama(seed: int = 0, *, eager: bool = False, **config):
    """A random 2-layer Llama (hidden 32, 4 heads, 2 KV heads, 64 positions), seeded with ``seed``.

    ``config`` overrides or adds LlamaConfig fields (vocab_size, intermediate_size, ...);
    ``eager`` selects plain attention (deterministic on CUDA too; fused attention backward may not be).
    """
    import transformers

    torch.manual_seed(seed)
    settings = {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    config = transformers.LlamaConfig(**{**settings, **config})
    if eager:
        config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config)
