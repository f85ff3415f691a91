"""Data-parallel train_lora under torchrun (two processes, gloo on the CPU) against one process
with the same global batch: the same losses and adapter, and checkpoints that resume in either;
DDP and FSDP2 (the base sharded, dense and NF4, with gradient checkpointing)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapterops import load
from adapterops.train import add_lora, train_lora

from distributed_data import EVAL, NF4_ROWS, dataset, tiny_llama

WORKER = Path(__file__).parent / "distributed_worker.py"


def torchrun(out: Path, nproc: int, batch: int, steps: int, resume: Path | None = None, *extra: str) -> list[float]:
    with socket.socket() as s:  # a free port on loopback for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={port}", str(WORKER), str(out), str(batch), str(steps), *extra] + (["--resume", str(resume)] if resume else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "losses.json").read_text())


def single(batch: int, steps: int, quantize: str | None = None, rows: int = 22, **kwargs):
    torch.set_num_threads(1)
    model = tiny_llama()
    add_lora(model, rank=4, alpha=8, seed=1, quantize=quantize)
    return train_lora(model, dataset(rows), lr=5e-3, batch_size=batch, steps=steps, seed=2, warmup=2, **kwargs)


def assert_same_adapter(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name].delta(), b[name].delta(), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    losses = torchrun(out, nproc=2, batch=3, steps=9)  # 6 rows a step: the 4th step is the short one
    return out, losses


def test_two_processes_equal_one_with_the_global_batch(two_process_run):
    out, losses = two_process_run
    reference = single(batch=6, steps=9)
    assert len(losses) == 9
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference.losses), rtol=1e-5, atol=1e-6)
    assert_same_adapter(load(out / "adapter.st"), reference.adapter)
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == [f"step-{s:08d}" for s in (2, 4, 6, 8, 9)]


def test_two_process_checkpoint_resumes_in_one_process(two_process_run):
    out, losses = two_process_run
    resumed = single(batch=6, steps=9, resume_from=out / "ckpt" / "step-00000004")
    assert resumed.resumed_from == 4
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    assert_same_adapter(resumed.adapter, load(out / "adapter.st"))


def test_one_process_checkpoint_resumes_in_two(tmp_path):
    first = single(batch=6, steps=9, checkpoint_dir=tmp_path / "one", save_every=2, callback=lambda info: info["step"] < 4)
    resumed = torchrun(tmp_path / "two", nproc=2, batch=3, steps=9, resume=tmp_path / "one" / "step-00000004")
    whole = single(batch=6, steps=9)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(whole.losses), rtol=1e-5, atol=1e-6)
    assert first.losses == whole.losses[:4]


def test_a_different_batch_per_process_cannot_resume(two_process_run):
    out, _ = two_process_run
    with pytest.raises(Exception, match="changed settings"):
        single(batch=4, steps=9, resume_from=out / "ckpt" / "step-00000004")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    losses = torchrun(out, 2, 3, 9, None, "--strategy", "fsdp", "--checkpointing", "--eval", "--nf4-steps", "3")
    return out, losses


def test_fsdp_two_processes_equal_one_with_the_global_batch(fsdp_run):
    out, losses = fsdp_run
    reference = single(batch=6, steps=9, **EVAL)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference.losses), rtol=1e-5, atol=1e-6)
    evals = json.loads((out / "eval_losses.json").read_text())  # every process ran the (collective) evaluation
    assert [s for s, _ in evals] == [s for s, _ in reference.eval_losses] == [3, 6, 9]
    torch.testing.assert_close(torch.tensor([v for _, v in evals]), torch.tensor([v for _, v in reference.eval_losses]), rtol=1e-5, atol=1e-6)
    assert_same_adapter(load(out / "adapter.st"), reference.adapter)
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == [f"step-{s:08d}" for s in (2, 4, 6, 8, 9)]
    resumed = single(batch=6, steps=9, resume_from=out / "ckpt" / "step-00000006", **EVAL)
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    assert_same_adapter(resumed.adapter, reference.adapter)


def test_fsdp_shards_the_nf4_base_and_trains_as_one_process(fsdp_run):
    out, _ = fsdp_run  # its 3rd step has one row: process 1 runs a row without trained tokens alongside
    reference = single(batch=6, steps=3, quantize="nf4", rows=NF4_ROWS)
    losses = json.loads((out / "nf4_losses.json").read_text())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference.losses), rtol=1e-5, atol=1e-6)
    assert_same_adapter(load(out / "nf4.st"), reference.adapter)


def test_fsdp_shards_every_block_and_the_nf4_storage():
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from adapterops.train.distributed import shard_model
    from adapterops.train.inject import lora_modules

    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        model = tiny_llama()
        add_lora(model, rank=4, alpha=8, seed=1, quantize="nf4")
        lora = [p for p in model.parameters() if p.requires_grad]
        shard_model(model, lora)
        assert isinstance(model, FSDPModule) and all(isinstance(b, FSDPModule) for b in model.model.layers)
        base = next(iter(lora_modules(model).values())).base
        assert isinstance(base.codes, DTensor) and base.codes.dtype == torch.uint8 and not base.codes.requires_grad
        assert isinstance(model.lm_head.weight, DTensor)
        assert not any(isinstance(p, DTensor) for p in lora)  # the factors stay replicated
    finally:
        torch.distributed.destroy_process_group()


def test_an_fsdp_process_without_rows_gets_one_without_trained_tokens():
    from adapterops.train import IGNORE
    from adapterops.train.distributed import World

    batch = {"input_ids": torch.tensor([[4, 5, 6]]), "labels": torch.tensor([[4, 5, 6]]), "attention_mask": torch.ones(1, 3)}
    assert World(rank=0, size=2, strategy="ddp").shard(batch)["input_ids"].shape[0] == 0
    stand_in = World(rank=0, size=2, strategy="fsdp").shard(batch)
    assert torch.equal(stand_in["input_ids"], batch["input_ids"]) and bool((stand_in["labels"] == IGNORE).all())
    assert torch.equal(World(rank=1, size=2, strategy="fsdp").shard(batch)["labels"], batch["labels"])


def test_fsdp_refuses_the_fused_paths():
    from adapterops.errors import AdapterOpsError
    from adapterops.train.loop import _fsdp_options

    assert _fsdp_options(None, False) is False
    for fused_loss, fuse in ((True, False), (None, True)):
        with pytest.raises(AdapterOpsError, match="strategy='fsdp' shards"):
            _fsdp_options(fused_loss, fuse)


def test_unknown_strategy_is_refused():
    from adapterops.errors import AdapterOpsError

    with pytest.raises(AdapterOpsError, match="choose one of ddp, fsdp"):
        single(batch=2, steps=1, strategy="zero3")


def test_train_command_launches_torchrun_itself(smollm2_dir, tmp_path):
    import shutil

    from train_helpers import build_tiny_llama

    base = tmp_path / "base"
    build_tiny_llama(vocab_size=49152, intermediate_size=64, max_position_embeddings=128, eos_token_id=2, pad_token_id=2).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, base / name)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": " yes" * (1 + i % 3)}) + "\n" for i in range(10)))
    exe = Path(sys.executable).with_name("adapterops")
    common = ["train", "--base", base, "--data", data, "--rank", 4, "--steps", 3, "--lr", 5e-3, "--seed", 1, "--qlora", "--json", "-q"]
    runs = {}
    # --strategy travels through the relaunch: two processes sharding a QLoRA base, against one
    for label, extra in (("two", ["--nproc", 2, "--batch-size", 3, "--strategy", "fsdp"]), ("one", ["--batch-size", 6])):
        out = tmp_path / f"{label}.st"
        done = subprocess.run([str(exe), *map(str, common), "-o", out, *map(str, extra)], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        runs[label] = (json.loads(done.stdout), load(out))
    assert runs["two"][0]["steps"] == runs["one"][0]["steps"] == 3
    assert runs["two"][0]["final_loss"] == pytest.approx(runs["one"][0]["final_loss"], rel=1e-5)
    assert_same_adapter(runs["two"][1], runs["one"][1])
