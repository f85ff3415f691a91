"""Training LoRA and QLoRA adapters on any PyTorch model; what comes out is an ``Adapter``.

``add_lora`` wraps linear layers (``inject``), ``train_lora`` runs the loop (``loop``), ``data``
turns JSONL files into token sequences with loss masks and packs them, ``attention`` keeps packed
examples apart, ``fused`` runs LoRA layers that share an input as one, ``checkpoint`` saves and
resumes runs.
"""

from .data import IGNORE, Dataset, collate, load_jsonl, pack, read_jsonl, tokenize_row
from .inject import LoraConfig, LoraHandle, add_lora, find_targets, lora_adapter, lora_modules
from .layers import LoraLinear, NF4Linear
from .loop import TrainResult, evaluate, lr_at, train_lora

__all__ = [
    "IGNORE",
    "Dataset",
    "LoraConfig",
    "LoraHandle",
    "LoraLinear",
    "NF4Linear",
    "TrainResult",
    "add_lora",
    "collate",
    "evaluate",
    "find_targets",
    "load_jsonl",
    "lora_adapter",
    "lora_modules",
    "lr_at",
    "pack",
    "read_jsonl",
    "tokenize_row",
    "train_lora",
]
