"""One process of a ``torchrun`` training run for tests/test_train_distributed.py.

    torchrun --nproc-per-node N tests/distributed_worker.py OUT BATCH STEPS [RESUME]

Trains the tiny Llama of the training tests with ``train_lora`` (``BATCH`` rows per process) and,
on rank 0, writes the losses and the adapter to ``OUT`` (checkpoints in ``OUT/ckpt``).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from adapterops.train import add_lora, train_lora  # noqa: E402
from distributed_data import dataset, tiny_llama  # noqa: E402


def main() -> None:
    out, batch, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    resume = sys.argv[4] if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    model = tiny_llama()
    add_lora(model, rank=4, alpha=8, seed=1)
    result = train_lora(model, dataset(), lr=5e-3, batch_size=batch, steps=steps, seed=2, warmup=2,
                        checkpoint_dir=out / "ckpt", save_every=2, resume_from=resume)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    result.adapter.save(out / "adapter.st", force=True)
    (out / "losses.json").write_text(json.dumps(result.losses))


if __name__ == "__main__":
    main()
