"""Data-parallel training on ``torch.distributed``, as ``torchrun`` starts it.

``train_lora`` asks ``world()`` which process it is. Outside ``torchrun`` (no ``WORLD_SIZE`` in
the environment, or 1) that is a world of one and nothing here does anything. Under ``torchrun
--nproc-per-node N`` every process runs the same ``train_lora`` call; ``world`` joins the process
group torchrun describes (NCCL on CUDA, gloo on the CPU) and, on CUDA, moves to the GPU of
``LOCAL_RANK``. Then, per optimizer step (``strategy="ddp"``):

- every process builds the same *global* micro-batches (``batch_size`` rows per process, so
  ``batch_size * N`` rows; the data order of one process with that batch size) and keeps its own
  contiguous slice of rows (``shard``);
- the loss is scaled by the number of trained tokens of the global micro-batches, so after the
  backward pass the sum over processes of the local LoRA gradients is the gradient of the global
  batch (``all_reduce_grads``: one all-reduce of the flattened LoRA gradients, the only tensors
  that travel; the frozen base never does);
- every process then clips and steps the same optimizer on the same gradients, so the factors stay
  identical everywhere, and only process 0 logs, evaluates, calls back and saves. A checkpoint is
  the same files one process writes, with the global batch size in its settings, so a run resumes
  under any number of processes that gives the same global batch.

``strategy="fsdp"`` (FSDP2, ``torch.distributed.fsdp.fully_shard``) keeps all of that and shards
the frozen base as well (``shard_model``): every decoder block, and the root for what is left
(embeddings, final norm, output head), holds ``1/N`` of its frozen weights and gathers the whole
block just before its forward (and again for its backward, recomputation under gradient
checkpointing included), freeing it right after. A QLoRA base is sharded in its 4-bit form: the
NF4 codes and the block scales become frozen parameters FSDP shards (uint8 shards like any other
dtype). The LoRA factors are left out of the sharding (``ignored_params``): they are small (a
rank-16 adapter of a 70B model is under 1 GB in float32), and replicated factors keep everything
above unchanged: one all-reduce of their gradients, identical optimizer steps, and a checkpoint on
process 0 that is the full factors, the same files one process writes. Every forward needs every
process's shards, so every process runs the evaluation, and one that a short last batch leaves
without rows runs a row without trained tokens (loss and gradients 0); the fused head + loss
(``adapterops.train.loss``) and fused LoRA groups (``adapterops.train.fused``) read frozen
weights outside a block's forward, so they are off under FSDP. The model stays sharded after the
run (its modules are FSDP modules); ``train_lora``'s result holds the full adapter.

One process with batch ``2b`` and two with ``b`` each compute the same steps, up to the order of
floating-point sums. Multi-node runs are torchrun's own flags (``--nnodes``, ``--rdzv-endpoint``,
...); nothing here depends on the topology.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AdapterOpsError

__all__ = ["STRATEGIES", "World", "world", "check_replicas", "decoder_blocks", "env_int", "shard_model"]

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` data-parallel processes (rank 0 is the main one)."""

    rank: int = 0
    size: int = 1
    strategy: str = "ddp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether the frozen base is sharded over the processes (FSDP): every forward is collective."""
        return self.size > 1 and self.strategy == "fsdp"

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This process's rows of a global micro-batch (as even a split as the row count allows).

        Under FSDP a process left without rows (a short last batch) still has to take part in every
        forward and backward: it gets one row with no trained token, whose loss and gradients are 0.
        """
        if self.size == 1:
            return batch
        rows = next(iter(batch.values())).shape[0]
        lo, hi = rows * self.rank // self.size, rows * (self.rank + 1) // self.size
        if lo == hi and self.sharded:
            from .data import IGNORE

            return {k: torch.full_like(v[:1], IGNORE) if k == "labels" else v[:1] for k, v in batch.items()}
        return {k: v[lo:hi] for k, v in batch.items()}

    def all_reduce_grads(self, params: list[torch.Tensor]) -> None:
        """Sum the gradients of ``params`` over all processes, in place (missing ones count as zero)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over all processes (a new tensor)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        total = value.detach().clone().float()
        dist.all_reduce(total)
        return total

    def agree(self, flag: bool) -> bool:
        """Process 0's ``flag``, on every process (a stop asked for by a callback, say)."""
        if self.size == 1:
            return flag
        import torch.distributed as dist

        box = [flag]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])


def world(strategy: str | None, device: torch.device) -> World:
    """The data-parallel world of this process, from torchrun's environment; joins its process group.

    ``strategy`` None means ``"ddp"`` when there is more than one process; a single process ignores it.
    """
    if strategy is not None and strategy not in STRATEGIES:
        raise AdapterOpsError(f"unknown training strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    size = env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    rank, local = env_int("RANK", 0), env_int("LOCAL_RANK", 0)
    import torch.distributed as dist

    if device.type == "cuda" and device.index not in (None, local):
        raise AdapterOpsError(
            f"process {rank} (LOCAL_RANK {local}) holds its model on {device}; under torchrun each process "
            f"trains on its own GPU: move the model to cuda:{local}"
        )
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), strategy=strategy or "ddp")


def check_replicas(world_: World, params: list[torch.Tensor]) -> None:
    """Refuse a start from factors that differ between processes (a seed that differs, say)."""
    if world_.size == 1:
        return
    import torch.distributed as dist

    local = torch.stack([p.detach().float().sum() for p in params]).cpu() if params else torch.zeros(1)
    mine = local.to(_comm_device())
    first = mine.clone()
    dist.broadcast(first, src=0)
    if not torch.equal(mine, first):
        raise AdapterOpsError(
            f"process {world_.rank} starts from other LoRA factors than process 0; give add_lora the same seed in every process"
        )


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of the longest ``nn.ModuleList`` of same-type blocks (a decoder's layers), or []."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1]
    return list(max(lists, key=len)) if lists else []


# NF4Linear's storage that FSDP shards (1-D, the size of the weight / 2 and / blocksize); the
# scalar offset and the 256-entry nested code table stay replicated buffers.
_NF4_SHARDED = ("codes", "absmax", "nested_absmax")


def shard_model(model: nn.Module, trained: list[nn.Parameter]) -> None:
    """Shard ``model``'s frozen weights over the processes with FSDP2, in place (``strategy="fsdp"``).

    ``fully_shard`` on every decoder block, then on the root; ``trained`` (the LoRA factors) stays
    replicated. NF4 bases are sharded in their 4-bit storage, turned into frozen parameters first.
    """
    from torch.distributed.fsdp import fully_shard

    from .layers import NF4Linear

    blocks = decoder_blocks(model)
    if not blocks:
        raise AdapterOpsError(
            f"strategy='fsdp' shards a model block by block, and {type(model).__name__} has no list of repeated "
            "blocks (decoder layers); train it with strategy='ddp'"
        )
    for module in model.modules():
        if isinstance(module, NF4Linear):
            for name in _NF4_SHARDED:
                tensor = module._buffers.get(name)
                if tensor is not None:
                    del module._buffers[name]
                    module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
    ignored = set(trained)
    for block in blocks:
        fully_shard(block, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)


def _comm_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def env_int(name: str, default: int) -> int:
    """The integer torchrun put in the environment variable ``name``, or ``default`` when unset."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise AdapterOpsError(f"{name}={text!r} in the environment is not an integer (is this run started by torchrun?)") from None
