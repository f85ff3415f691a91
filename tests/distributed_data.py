"""The model and data both sides of the distributed-training tests use (no pytest imports here:
the torchrun workers import it too)."""

import torch
import transformers

from adapterops.train import IGNORE

VOCAB = 64
TAIL = [5, 17, 33, 2]


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, vocab_size=VOCAB, intermediate_size=64, initializer_range=0.2)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config)


def dataset(n: int = 22, seed: int = 0) -> list[dict]:
    """A random prefix of 3-8 tokens, then always the same four (the trained ones); 22 rows, so the
    last batch of an epoch is short and splits unevenly between processes."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prefix = torch.randint(0, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        rows.append({"input_ids": prefix + TAIL, "labels": [IGNORE] * len(prefix) + TAIL})
    return rows


EVAL = {"eval_data": dataset(6, seed=1), "eval_every": 3}  # train_lora options both sides evaluate with
NF4_ROWS = 13  # with 3 rows per process, the 3rd global batch is 1 row: process 0 has none of it
