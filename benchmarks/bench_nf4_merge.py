"""Merge an all-linear rank-16 LoRA into a Llama-2-7B-shaped NF4 checkpoint: adapterops vs bitsandbytes.

One run builds a synthetic NF4 checkpoint in the bitsandbytes layout (what ``adapterops quantize``
or transformers' ``save_pretrained`` of a 4-bit model writes: Llama-2 tensor names and shapes,
random bf16 weights quantized with double quantization, 3 shards, an index, config.json with its
quantization_config) and a rank-16 adapter on every linear layer, then times, each in a fresh
subprocess:

  copy        ``cp -r`` of the checkpoint: the I/O floor;
  adapterops  ``adapterops merge ... --quiet --json``, the command line (streaming, NF4 in and out,
              batches of equal-shape layers on a GPU);
  bnb         layer by layer with bitsandbytes' own functions: ``dequantize_4bit``, ``W + s B A`` in
              float32, ``quantize_4bit(compress_statistics=True)``, shard by shard through
              ``safetensors`` (skipped when bitsandbytes is not importable).

Reported per route: seconds of the whole process, start-up included (``copy`` and ``adapterops``
are the commands themselves, ``bnb`` this script re-run with ``--child``), with ``os.sync()`` of the
output unless ``--no-sync`` and, with ``--cold``, the page cache dropped before each run (root only); the ratio to the copy, peak resident memory and the share of 4-bit codes that
equal adapterops' output on a few layers (the two routes quantize the same way; a code can only
differ where the float32 sums differ in the last bit next to a threshold). The adapterops run also
reports the median share of the delta NF4 kept (see the README).

    python benchmarks/bench_nf4_merge.py --device cuda --workdir /scratch/bench   # 7B shapes (3.9 GB NF4)
    python benchmarks/bench_nf4_merge.py                                          # CPU: --size small
    python benchmarks/bench_nf4_merge.py --layers 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _harness import (
    INDEX,
    ShardRotation,
    add_merge_arguments,
    all_linear_adapter,
    cli,
    describe_device,
    is_linear,
    llama_config,
    llama_tensors,
    print_table,
    remove_outputs,
    resolve_dims,
    time_child,
    time_routes,
)

ROUTES = ("copy", "adapterops", "bnb")
SIZES = {
    "7b": {"layers": 32, "hidden": 4096, "intermediate": 11008, "vocab": 32000},
    "small": {"layers": 2, "hidden": 1024, "intermediate": 2816, "vocab": 8000},
}
RANK, ALPHA = 16, 32
STATE = ".quant_state.bitsandbytes__nf4"


# --- building the inputs -----------------------------------------------------------------------


def build_checkpoint(path: Path, dims: dict, device: str, shards: int = 3) -> int:
    """Write the synthetic NF4 checkpoint tensor by tensor; returns its size in bytes."""
    import torch

    from adapterops.quant import quantize_nf4, to_state_dict
    from adapterops.quant.checkpoint import quantization_config

    tensors = llama_tensors(**dims)
    dense = sum(2 * math.prod(s) for _, s in tensors)
    path.mkdir(parents=True)
    writer = ShardRotation(path, dense, shards)
    g = torch.Generator(device=device).manual_seed(0)
    for name, shape in tensors:
        writer.begin(2 * math.prod(shape))
        if len(shape) == 1:
            entries = {name: torch.ones(shape, dtype=torch.bfloat16)}
        else:
            w = (torch.randn(shape, generator=g, device=device) * 0.02).to(torch.bfloat16)
            entries = {name: w.cpu()} if not is_linear(name, shape) else {k: v.cpu() for k, v in to_state_dict(quantize_nf4(w), name).items()}
        for key, t in entries.items():
            writer.add(key, t)
    weight_map = writer.close()
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = llama_config(
        dims, quantization_config=quantization_config(compute_dtype="bfloat16", double_quant=True, skip_modules=None)
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return total


def build_adapter(path: Path, dims: dict) -> None:
    """Rank 16 on every linear layer, ||dW|| / ||W|| about 0.1 (fp32 factors, one .st file)."""
    all_linear_adapter(dims, rank=RANK, alpha=ALPHA).save(str(path))


# --- the routes (run in a child process) -------------------------------------------------------


def commands(base: Path, adapter: Path, device: str) -> dict:
    """The routes that are plain commands: ``cp -r`` and ``adapterops merge --json`` as a user types them."""
    return {
        "copy": lambda out: ["cp", "-r", str(base), str(out)],
        "adapterops": lambda out: cli("merge", "--base", base, "--adapter", adapter, "--out", out, "--device", device, "--quiet", "--json"),
    }


def report_medians(out: Path, result: dict) -> dict:
    """Median ``retained`` and ``codes_changed`` from the merge command's ``--json`` report."""
    if result["route"] != "adapterops":
        return {}
    rows = json.loads(result["stdout"])["rows"]
    kept = sorted(r["retained"] for r in rows if r.get("retained") is not None)
    changed = sorted(r["codes_changed"] for r in rows)
    return {"retained_median": kept[len(kept) // 2], "codes_changed_median": changed[len(changed) // 2]}


def route_bnb(base: Path, adapter: Path, out: Path, device: str) -> dict:
    import torch
    from bitsandbytes.functional import QuantState, dequantize_4bit, quantize_4bit
    from safetensors import safe_open
    from safetensors.torch import save_file

    import adapterops

    lora = adapterops.load(adapter)
    out.mkdir()
    index = json.loads((base / INDEX).read_text())
    for shard in dict.fromkeys(index["weight_map"].values()):
        result = {}
        with safe_open(str(base / shard), framework="pt", device=device) as f:
            metadata = f.metadata()
            keys = list(f.keys())
            quantized = [k[: -len(STATE)] for k in keys if k.endswith(STATE)]
            members = {k for w in quantized for k in keys if k.startswith(w + ".")}
            for key in keys:
                if key not in members and key not in quantized:
                    result[key] = f.get_tensor(key)
            for w in quantized:
                layer = lora.get(w.removesuffix(".weight"))
                entries = {k: f.get_tensor(k) for k in keys if k.startswith(w + ".")}
                if layer is None:
                    result[w] = f.get_tensor(w)
                    result.update(entries)
                    continue
                state = QuantState.from_dict({k[len(w) + 1 :]: v for k, v in entries.items()}, device=torch.device(device))
                W = dequantize_4bit(f.get_tensor(w), state).float()
                B, A = layer.to(device=device).folded()
                packed, new = quantize_4bit(W + B @ A, quant_type="nf4", compress_statistics=True)
                new.dtype = state.dtype
                result[w] = packed
                result.update({f"{w}.{k}": v for k, v in new.as_dict(packed=True).items()})
        save_file({k: v.contiguous().cpu() for k, v in result.items()}, str(out / shard), metadata=metadata)
        del result
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            shutil.copyfile(f, out / f.name)
    return {}


# --- the parent: run, compare, print -----------------------------------------------------------


def codes_agree(a: Path, b: Path, names: list[str]) -> float:
    """Share of 4-bit codes equal between two NF4 outputs on ``names``."""
    from adapterops.checkpoint import Checkpoint
    from adapterops.quant.nf4 import unpack_codes

    ca, cb = Checkpoint(a), Checkpoint(b)
    same = total = 0
    for name in names:
        x, y = ca.read(name).reshape(-1), cb.read(name).reshape(-1)
        n = 2 * x.numel()
        same += (unpack_codes(x, n) == unpack_codes(y, n)).sum().item()
        total += n
    return same / total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_merge_arguments(p, routes=ROUTES, sizes=SIZES)
    args = p.parse_args()
    if args.child:
        fn = globals()[f"route_{args.child}"]
        preload = (("bitsandbytes",) if args.child == "bnb" else ()) + ("adapterops.quant",)
        time_child(fn, args.child, args.base, args.adapter, args.out, args.device, sync=args.sync, threads=args.threads, preload=preload)
        return 0

    import importlib.util

    device, dims = resolve_dims(args, SIZES)
    routes = [r for r in args.routes.split(",") if r and (r != "bnb" or importlib.util.find_spec("bitsandbytes"))]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-nf4-"))
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = work / "base", work / "adapter.st"
    shutil.rmtree(base, ignore_errors=True)
    adapter.unlink(missing_ok=True)
    start = time.perf_counter()
    size = build_checkpoint(base, dims, device)
    build_adapter(adapter, dims)
    print(f"built a {size / 1e9:.2f} GB NF4 checkpoint ({dims}) and a rank-{RANK} all-linear adapter in {time.perf_counter() - start:.0f} s")
    print(f"device: {describe_device(device)}; workdir {work}")

    results, outputs = time_routes(
        __file__, routes, work=work, base=base, adapter=adapter, device=device, sync=args.sync, threads=args.threads, repeat=args.repeat,
        commands=commands(base, adapter, device), cold=args.cold, annotate=report_medians,
    )
    last = dims["layers"] - 1
    names = ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{last}.mlp.down_proj.weight", f"model.layers.{last}.mlp.gate_proj.weight"]
    if any(r["route"] == "adapterops" and "seconds" in r for r in results):
        for r in results:
            if r["route"] == "bnb" and "seconds" in r:
                r["codes_equal_adapterops"] = codes_agree(outputs["adapterops"], outputs["bnb"], names)
    remove_outputs(outputs, work, keep=args.keep, own_work=args.workdir is None)

    def agreement(r: dict) -> str:
        agree = f"{r['codes_equal_adapterops']:.6f}" if "codes_equal_adapterops" in r else "-"
        return f"{agree:>19}"

    print_table(results, f"{'codes = adapterops':>19}", agreement)
    ao = next((r for r in results if r["route"] == "adapterops" and "seconds" in r), None)
    if ao:
        print(f"adapterops: median share of the delta kept by NF4 {ao['retained_median']:.3f}, median 4-bit codes changed {ao['codes_changed_median']:.3f}")
    if args.json:
        payload = {"device": describe_device(device), "dims": dims, "checkpoint_bytes": size, "rank": RANK, "sync": args.sync,
                   "repeat": args.repeat, "threads": args.threads, "routes": results}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0 if all("seconds" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
