"""One process of a ``torchrun`` training run for tests/test_train_distributed.py.

    torchrun --nproc-per-node N tests/distributed_worker.py OUT BATCH STEPS [--resume DIR]
        [--strategy ddp|fsdp] [--checkpointing] [--eval] [--nf4-steps K]

Trains the tiny Llama of the training tests with ``train_lora`` (``BATCH`` rows per process) and,
on rank 0, writes the losses and the adapter to ``OUT`` (checkpoints in ``OUT/ckpt``). With
``--nf4-steps`` the same processes then train a QLoRA (NF4) copy of the model for ``K`` steps
on ``NF4_ROWS`` rows (``OUT/nf4.st``, ``OUT/nf4_losses.json``): one launch for both. ``--eval`` evaluates every 3
steps (``OUT/eval_losses.json``).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from adapterops.train import add_lora, train_lora  # noqa: E402
from distributed_data import EVAL, NF4_ROWS, dataset, tiny_llama  # noqa: E402


def run(batch: int, steps: int, *, quantize: str | None = None, rows: int = 22, **kwargs):
    model = tiny_llama()
    add_lora(model, rank=4, alpha=8, seed=1, quantize=quantize)
    return train_lora(model, dataset(rows), lr=5e-3, batch_size=batch, steps=steps, seed=2, warmup=2, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("batch", type=int)
    parser.add_argument("steps", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--strategy")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--nf4-steps", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = run(args.batch, args.steps, checkpoint_dir=args.out / "ckpt", save_every=2, resume_from=args.resume,
                 strategy=args.strategy, gradient_checkpointing=args.checkpointing,
                 **(EVAL if args.eval else {}))
    nf4 = None
    if args.nf4_steps:
        nf4 = run(args.batch, args.nf4_steps, quantize="nf4", rows=NF4_ROWS, strategy=args.strategy, gradient_checkpointing=args.checkpointing)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    result.adapter.save(args.out / "adapter.st", force=True)
    (args.out / "losses.json").write_text(json.dumps(result.losses))
    (args.out / "eval_losses.json").write_text(json.dumps(result.eval_losses))
    if nf4 is not None:
        nf4.adapter.save(args.out / "nf4.st", force=True)
        (args.out / "nf4_losses.json").write_text(json.dumps(nf4.losses))


if __name__ == "__main__":
    main()
    # torch 2.13's teardown of a live gloo group races with its threads now and then (SIGABRT or
    # SIGSEGV after every file is written): leave without the interpreter's teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
