"""``adapterops train``: LoRA / QLoRA on a Hugging Face causal LM, written out as an adapter file.

transformers is imported only here, when the command runs (the optional ``train`` extra).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import click

from .._files import require_file
from ..errors import AdapterOpsError, FormatError, brief
from ..formats import FORMATS, default_format
from ..safety import check_work_dir, check_writable, overlap
from . import main
from ._common import PATH, default_device, device_option, emit, force_option, json_option, output_option, quiet_option, refuse_existing, status

_REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")
_DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_targets(text: str) -> Any:
    """``all-linear``; a regex when the text has regex syntax (``.*\\.(q|v)_proj``); else a
    comma-separated list of module names (``q_proj,v_proj``)."""
    text = text.strip()
    if text == "all-linear":
        return text
    if _REGEX_CHARS.search(text):
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise click.BadParameter("give all-linear, module names (q_proj,v_proj) or a regex", param_hint="--targets")
    return names


def _render(d: dict) -> str:
    lines = [f"trained {d['steps']} step{'s' if d['steps'] != 1 else ''}" + (f" (resumed at step {d['resumed_from']})" if d["resumed_from"] else "")
             + f": final loss {d['final_loss']:.4f}"
             + (f", eval loss {d['eval_loss']:.4f}" if d["eval_loss"] is not None else "")
             + f", {d['tokens_per_second']:,.0f} tokens/s (steady state; first step {d['warmup_seconds']:.1f}s)"]
    lines.append(f"wrote {d['output']}: {d['num_layers']} layers, rank {d['rank']}, {d['num_params']:,} params ({d['format']})")
    return "\n".join(lines)


@main.command()
@click.option("--base", "-b", required=True, type=PATH, help="Base model: a Hugging Face model directory or a Hub repo id.")
@click.option("--data", "data", required=True, type=PATH, help="Training data: JSONL with text, prompt/completion or messages rows.")
@click.option("--eval", "eval_path", type=PATH, help="Evaluation data, same format.")
@output_option("Where to write the adapter (.st file, or a directory for peft).")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default=None, help="Output format (default: from the path).")
@click.option("--rank", "-r", type=click.IntRange(min=1), default=16, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=None, help="LoRA alpha (default: the rank).")
@click.option("--targets", default="all-linear", show_default=True, help="all-linear, module names (q_proj,v_proj) or a regex over module paths.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True, help="Dropout on the LoRA branch.")
@click.option("--rslora", is_flag=True, help="Scale by alpha/sqrt(rank) (rsLoRA).")
@click.option("--init", "init", type=click.Choice(["default", "gaussian", "pissa"]), default="default", show_default=True,
              help="default: A random, B zero; gaussian: A ~ N(0, 1/r^2); pissa: the base's top singular vectors.")
@click.option("--lr", type=click.FloatRange(min=0, max=math.inf, min_open=True, max_open=True), default=2e-4, show_default=True, help="Peak learning rate.")
@click.option("--lr-ratio", type=click.FloatRange(min=0, max=math.inf, min_open=True, max_open=True), default=None, help="LoRA+: B's learning rate is lr times this.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=None, help="Passes over the data (default 1).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps (instead of --epochs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Sequences per micro-batch.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--max-len", type=click.IntRange(min=2), default=1024, show_default=True, help="Truncate (or pack) sequences to this many tokens.")
@click.option("--packing", is_flag=True, help="Pack whole examples into --max-len rows; each attends only to itself.")
@click.option("--warmup", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Warmup: a fraction of the steps (< 1) or a step count.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True, help="AdamW weight decay.")
@click.option("--max-grad-norm", type=click.FloatRange(min=0), default=1.0, show_default=True, help="Gradient clipping (0: off).")
@click.option("--eval-every", type=click.IntRange(min=1), default=None, help="Evaluate every N steps (and at the end).")
@click.option("--qlora", is_flag=True, help="Store the frozen base in NF4 (QLoRA).")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward to save memory.")
@click.option(
    "--compile/--no-compile", "compile_", default=None,
    help="torch.compile the decoder layers: faster steps after a slow first one (default: on for CUDA, off for CPU).",
)
@click.option("--fuse/--no-fuse", default=False, show_default=True,
              help="Run LoRA layers that read one input (q/k/v, gate/up) as one GEMM each for base and LoRA A.")
@click.option("--dtype", type=click.Choice(list(_DTYPES)), default="auto", show_default=True, help="Base weights dtype (auto: bf16 on cuda, fp32 on cpu).")
@device_option
@click.option("--checkpoint-dir", type=PATH, default=None, help="Save resumable checkpoints here.")
@click.option("--save-every", type=click.IntRange(min=1), default=None, help="Checkpoint every N steps (and at the end).")
@click.option("--resume", type=PATH, default=None, help="Resume from a checkpoint (directory of one, or of several: the latest).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the LoRA init, the data order and dropout.")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Data-parallel processes on this machine (one per GPU): runs this command under torchrun; --batch-size is per process.")
@click.option("--strategy", type=click.Choice(["ddp", "fsdp"]), default=None,
              help="Under torchrun: ddp replicates the base (default); fsdp shards it over the processes (FSDP2, QLoRA too).")
@force_option
@quiet_option
@json_option
def train(base, data, eval_path, output, fmt, rank, alpha, targets, dropout, rslora, init, lr, lr_ratio, epochs, steps,
          batch_size, grad_accum, max_len, packing, warmup, weight_decay, max_grad_norm, eval_every, qlora,
          gradient_checkpointing, compile_, fuse, dtype, device, checkpoint_dir, save_every, resume, seed, nproc, strategy, force, quiet,
          as_json):
    """Train a LoRA adapter on the --base model with the JSONL --data; write it to -o.

    \b
    adapterops train --base ./SmolLM2-135M --data train.jsonl --eval eval.jsonl -o tuned.st --rank 16
    """
    if epochs is not None and steps is not None:
        raise click.UsageError("give --epochs or --steps, not both")
    if nproc is not None and nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_under_torchrun(nproc)
    from ..train.distributed import env_int  # here: the other commands' start-up does without the training modules

    rank_ = env_int("RANK", 0)
    quiet = quiet or rank_ != 0  # under torchrun only process 0 talks
    reading = refuse_existing(output, force, [data, eval_path, resume, base if Path(base).exists() else None])
    for source in (data, eval_path):
        if source is not None:
            require_file(source)
    if save_every is not None and checkpoint_dir is None and resume is None:
        raise click.UsageError("--save-every needs --checkpoint-dir")
    parsed_targets = parse_targets(targets)
    warmup_value: int | float = int(warmup) if warmup >= 1 else float(warmup)

    transformers, torch = _import_training()
    from ..checkpoint import Checkpoint, resolve_base
    from ..train import add_lora, load_jsonl, train_lora

    path = resolve_base(base)
    if not (Path(path) / "config.json").is_file():
        raise FormatError(f"{base}: not a Hugging Face model directory (no config.json)")
    Checkpoint(path)  # only safetensors are ever parsed: a pickle-only or malformed base stops here, before transformers
    reading.add([path])  # the base, data and checkpoint must hold still while they are read
    if checkpoint_dir is not None:
        check_work_dir(checkpoint_dir, inputs=[path, data, eval_path], what="--checkpoint-dir")
        check_writable(checkpoint_dir, inside=True)  # before the run, not at its first checkpoint
        if overlap(output, checkpoint_dir):
            raise click.UsageError(f"-o {output} and --checkpoint-dir {checkpoint_dir} overlap; give the checkpoints a directory of their own")
    device = default_device(device)
    if device == "cuda" and env_int("WORLD_SIZE", 1) > 1:
        device = f"cuda:{env_int('LOCAL_RANK', 0)}"  # one GPU per process
    torch_dtype = getattr(torch, _DTYPES[dtype]) if _DTYPES[dtype] else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # no tokenizer files, or ones transformers cannot read
        raise FormatError(f"{base}: cannot load its tokenizer ({brief(exc, 200)})") from None
    train_set = load_jsonl(data, tokenizer, max_len=max_len, packing=packing)
    eval_set = load_jsonl(eval_path, tokenizer, max_len=max_len, packing=packing) if eval_path else None
    if quiet:
        transformers.utils.logging.disable_progress_bar()
    else:
        status(f"loading {base} ({str(torch_dtype).removeprefix('torch.')}, {device})")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, use_safetensors=True).to(device)
    reading.verify()
    handle = add_lora(model, targets=parsed_targets, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora,
                      init=init, quantize="nf4" if qlora else None, seed=seed)
    if not quiet:
        dropped = f", {train_set.dropped} row(s) dropped: nothing to train on after --max-len" if train_set.dropped else ""
        status(f"training {len(handle.modules)} layers, {handle.num_params:,} parameters, on {len(train_set)} sequences{dropped}")
    result = train_lora(
        model, train_set, eval_set, lr=lr, lr_ratio=lr_ratio, epochs=epochs or 1, steps=steps, batch_size=batch_size,
        grad_accum=grad_accum, max_grad_norm=max_grad_norm, warmup=warmup_value, weight_decay=weight_decay,
        eval_every=eval_every, seed=seed, gradient_checkpointing=gradient_checkpointing, compile=compile_,
        checkpoint_dir=checkpoint_dir or resume, save_every=save_every, resume_from=resume, progress=not quiet,
        tokenizer=tokenizer, fuse=fuse, strategy=strategy,
    )
    if torch.distributed.is_initialized():  # train_lora joined torchrun's group; left up, gloo can abort the exit
        torch.distributed.destroy_process_group()
    if rank_ != 0:
        return
    adapter = result.adapter.to(device="cpu").with_metadata(base_model=str(base))
    written = fmt or default_format(output)
    adapter.save(output, format=written, force=force, inputs=[path, data, eval_path, resume], base=path if written == "gguf" else None)
    summary = {**result.to_dict(), "output": output, "format": written, "base": str(base),
               "device": device, "qlora": qlora}
    emit(summary, as_json, _render)


def _relaunch_under_torchrun(nproc: int) -> None:
    """Run this very command again as ``nproc`` torchrun processes, without ``--nproc``; exit with their status."""
    import subprocess
    import sys

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "adapterops.cli", *args]
    raise SystemExit(subprocess.call(cmd))


def _import_training():
    try:
        import torch
        import transformers
    except ImportError:
        raise AdapterOpsError("adapterops train needs transformers: pip install 'adapterops[train]'") from None
    return transformers, torch
