"""Merge an all-linear rank-16 LoRA into a Llama-2-7B-shaped bf16 checkpoint: adapterops vs the alternatives.

One run builds a synthetic checkpoint with Llama-2-7B tensor names and shapes (bf16, 3 shards, an
index, config.json; random values) and a PEFT adapter of rank 16 on every linear layer (q, k, v,
o, gate, up, down), then times, each in a fresh subprocess:

  copy        ``cp -r`` of the checkpoint: the I/O floor for writing a full model;
  adapterops  ``adapterops merge --base B --adapter A --out O --device D --quiet``, the command line
              (streaming: reader thread, compute on --device, writer thread);
  naive       shard by shard with no overlap: ``load_file(shard, device)``, ``W + s B A`` per adapted
              tensor, ``save_file`` of the shard;
  peft        ``AutoModelForCausalLM.from_pretrained`` (onto --device), ``PeftModel.from_pretrained``,
              ``merge_and_unload``, ``save_pretrained``;
  startup     the floor's first part: the interpreter, torch, adapterops' CLI and CUDA starting, no
              work (not run unless asked for in ``--routes``);
  write       the floor's second part: as many bytes as the checkpoint written to a new file with
              ``dd`` and written back by the same ``os.sync()`` (not run unless asked for). A merge
              that reads its base while it starts cannot take less than startup + write.

Reported per route: seconds of the whole process, start-up included (``copy`` and ``adapterops``
are the commands themselves; ``naive`` and ``peft`` are this script re-run with ``--child``), plus
``os.sync()`` of the output unless ``--no-sync``; with ``--cold`` the page cache is dropped before
each run (root only); the ratio to the copy, the peak resident memory of the process (``ru_maxrss``; for
``cp``, of the ``cp`` child) and its ratio to the checkpoint size, the number of output shards,
and whether the shard layout and index were kept. The adapterops output is checked against the
naive one on a few tensors (bf16: within one ulp).

    python benchmarks/bench_merge.py --device cuda --workdir /scratch/bench   # full 7B shapes (13.5 GB)
    python benchmarks/bench_merge.py                                          # CPU: --size small
    python benchmarks/bench_merge.py --layers 2 --hidden 1024 --intermediate 2816 --vocab 8000 --json out.json

``--repeat N`` runs each route N times and keeps the fastest (the largest RSS); ``--threads N``
sets torch's intra-op threads in every route (on a small machine shared with other work, OpenMP
threads spinning against each other can dominate CPU timings). ``--size 7b`` (the default with ``--device cuda``) is 32 layers, hidden 4096, intermediate 11008,
vocab 32000; ``--size small`` (the default on CPU) is 4 layers, hidden 2048, intermediate 5632,
vocab 16000 (0.54 GB). Explicit ``--layers/--hidden/--intermediate/--vocab`` override either.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _harness import (
    FLOOR_ROUTES,
    INDEX,
    ShardRotation,
    add_merge_arguments,
    all_linear_adapter,
    cli,
    describe_device,
    floor_commands,
    llama_config,
    llama_tensors,
    print_table,
    remove_outputs,
    resolve_dims,
    time_child,
    time_routes,
)

ROUTES = ("copy", "adapterops", "naive", "peft")
OPTIONAL_ROUTES = FLOOR_ROUTES
SIZES = {
    "7b": {"layers": 32, "hidden": 4096, "intermediate": 11008, "vocab": 32000},
    "small": {"layers": 4, "hidden": 2048, "intermediate": 5632, "vocab": 16000},
}
RANK, ALPHA = 16, 32


# --- building the inputs -----------------------------------------------------------------------


def build_checkpoint(path: Path, dims: dict, device: str, shards: int = 3) -> int:
    """Write the synthetic bf16 checkpoint, streaming (one tensor in memory at a time); returns its size."""
    import math

    import torch

    tensors = llama_tensors(**dims)
    sizes = [2 * math.prod(s) for _, s in tensors]
    total = sum(sizes)
    path.mkdir(parents=True)
    writer = ShardRotation(path, total, shards)
    g = torch.Generator(device=device).manual_seed(0)
    for (name, shape), size in zip(tensors, sizes):
        writer.begin(size)
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()
        writer.add(name, t)
    weight_map = writer.close()
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = llama_config(dims, torch_dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return total


def build_adapter(path: Path, dims: dict) -> None:
    """An all-linear rank-16 adapter in PEFT's directory format (fp32 factors, non-zero B)."""
    all_linear_adapter(dims, rank=RANK, alpha=ALPHA).save(str(path), format="peft")


# --- the routes (run in a child process) -------------------------------------------------------


def commands(base: Path, adapter: Path, device: str) -> dict:
    """The routes that are plain commands: ``cp -r`` and ``adapterops merge`` as a user types them."""
    return {
        "copy": lambda out: ["cp", "-r", str(base), str(out)],
        "adapterops": lambda out: cli("merge", "--base", base, "--adapter", adapter, "--out", out, "--device", device, "--quiet"),
    }


def route_naive(base: Path, adapter: Path, out: Path, device: str) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import adapterops

    lora = adapterops.load(adapter)
    out.mkdir()
    index = json.loads((base / INDEX).read_text())
    for shard in dict.fromkeys(index["weight_map"].values()):
        with safe_open(str(base / shard), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(base / shard, device=device)
        for name in list(tensors):
            layer = lora.get(name.removesuffix(".weight"))
            if layer is not None:
                B, A = layer.to(device=device).folded()
                tensors[name] = (tensors[name].float() + B @ A).to(torch.bfloat16)
        save_file({k: v.cpu() for k, v in tensors.items()}, str(out / shard), metadata=metadata)
        del tensors
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            shutil.copyfile(f, out / f.name)


def route_peft(base: Path, adapter: Path, out: Path, device: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs = {"device_map": device} if device != "cpu" else {}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, **kwargs)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)


# --- the parent: run, check, print -------------------------------------------------------------


def layout(base: Path, out: Path) -> dict:
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    kept = False
    if (out / INDEX).is_file():
        kept = shards == sorted(p.name for p in base.glob("*.safetensors")) and (
            json.loads((out / INDEX).read_text())["weight_map"] == json.loads((base / INDEX).read_text())["weight_map"]
        )
    return {"shards": len(shards), "layout_kept": kept}


def agree(a: Path, b: Path, names: list[str]) -> bool:
    """adapterops and naive outputs agree within one bf16 ulp on ``names``."""
    import torch

    from adapterops.checkpoint import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    for name in names:
        x, y = ca.read(name).float(), cb.read(name).float()
        _, e = torch.frexp(torch.maximum(x.abs(), y.abs()))
        if not bool(((x - y).abs() <= torch.ldexp(torch.ones_like(x), e - 8)).all()):
            return False
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_merge_arguments(p, routes=ROUTES, sizes=SIZES)
    args = p.parse_args()
    if args.child:
        fn = globals()[f"route_{args.child}"]
        preload = ("peft", "transformers") if args.child == "peft" else ()
        time_child(fn, args.child, args.base, args.adapter, args.out, args.device, sync=args.sync, threads=args.threads, preload=preload)
        return 0

    device, dims = resolve_dims(args, SIZES)
    routes = [r for r in args.routes.split(",") if r]
    unknown = sorted(set(routes) - set(ROUTES + OPTIONAL_ROUTES))
    if unknown:
        p.error(f"unknown route {unknown[0]}; routes: {','.join(ROUTES + OPTIONAL_ROUTES)}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = work / "base", work / "adapter"
    for p_ in (base, adapter):
        shutil.rmtree(p_, ignore_errors=True)
    start = time.perf_counter()
    size = build_checkpoint(base, dims, device)
    build_adapter(adapter, dims)
    print(f"built {size / 1e9:.2f} GB checkpoint ({dims}) and a rank-{RANK} all-linear adapter in {time.perf_counter() - start:.0f} s")
    print(f"device: {describe_device(device)}; workdir {work}")

    results, outputs = time_routes(
        __file__, routes, work=work, base=base, adapter=adapter, device=device, sync=args.sync, threads=args.threads,
        repeat=args.repeat, commands={**commands(base, adapter, device), **floor_commands(size)}, cold=args.cold,
        annotate=lambda out, result: {} if result["route"] in FLOOR_ROUTES else layout(base, out),
    )
    check = None
    if {"adapterops", "naive"} <= set(outputs) and all(outputs[r].exists() for r in ("adapterops", "naive")):
        last = dims["layers"] - 1
        names = ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{last}.mlp.down_proj.weight", "model.norm.weight"]
        check = agree(outputs["adapterops"], outputs["naive"], names)
    remove_outputs(outputs, work, keep=args.keep, own_work=args.workdir is None)

    print_table(
        results, f"{'RSS/ckpt':>9} {'shards':>6}  layout kept",
        lambda r: f"{r['peak_rss'] / size:>9.2f} " + (f"{r['shards']:>6}  {'yes' if r['layout_kept'] else 'no'}" if "shards" in r else f"{'-':>6}  -"),
    )
    if check is not None:
        print(f"adapterops and naive outputs agree within one bf16 ulp: {'yes' if check else 'NO'}")
    if args.json:
        payload = {"device": describe_device(device), "dims": dims, "checkpoint_bytes": size, "rank": RANK, "sync": args.sync, "repeat": args.repeat, "threads": args.threads,
                   "routes": results, "adapterops_matches_naive": check}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0 if check in (None, True) and all("seconds" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
