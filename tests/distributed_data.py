"""What both sides of the distributed-training tests share beyond ``train_helpers`` (whose tiny
Llama and data they use; the torchrun workers import this too)."""

from train_helpers import dataset, tiny_llama  # noqa: F401 (re-exported for both sides)

EVAL = {"eval_data": dataset(6, seed=1), "eval_every": 3}  # train_lora options both sides evaluate with
NF4_ROWS = 13  # with 3 rows per process, the 3rd global batch is 1 row: process 0 has none of it
