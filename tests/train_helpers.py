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


VOCAB = 64
TAIL = [5, 17, 33, 2]


def tiny_llama(seed: int = 0, device: str = "cpu"):
    """The training tests' tiny Llama: vocabulary ``VOCAB``, eager attention (deterministic on CUDA too:
    fused attention backward may not be)."""
    return build_tiny_llama(seed, vocab_size=VOCAB, intermediate_size=64, initializer_range=0.2, eager=True).to(device)


def dataset(n: int = 24, seed: int = 0) -> list[dict]:
    """A random prefix of 3-8 tokens, then always the same four (``TAIL``); the loss is on those four."""
    from adapterops.train import IGNORE

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prefix = torch.randint(0, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        rows.append({"input_ids": prefix + TAIL, "labels": [IGNORE] * len(prefix) + TAIL})
    return rows
