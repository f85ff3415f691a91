"""Merge an all-linear rank-16 LoRA into a Llama-2-7B-shaped NF4 checkpoint: adapterops vs bitsandbytes.

One run builds a synthetic NF4 checkpoint in the bitsandbytes layout (what ``adapterops quantize``
or transformers' ``save_pretrained`` of a 4-bit model writes: Llama-2 tensor names and shapes,
random bf16 weights quantized with double quantization, 3 shards, an index, config.json with its
quantization_config) and a rank-16 adapter on every linear layer, then times, each in a fresh
subprocess:

  copy        ``cp -r`` of the checkpoint: the I/O floor;
  adapterops  ``adapterops.merge`` (streaming, NF4 in and out, batches of equal-shape layers on a GPU);
  bnb         layer by layer with bitsandbytes' own functions: ``dequantize_4bit``, ``W + s B A`` in
              float32, ``quantize_4bit(compress_statistics=True)``, shard by shard through
              ``safetensors`` (skipped when bitsandbytes is not importable).

Reported per route: seconds of work after imports (with ``os.sync()`` of the output unless
``--no-sync``), the ratio to the copy, peak resident memory and the share of 4-bit codes that
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
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUTES = ("copy", "adapterops", "bnb")
SIZES = {
    "7b": {"layers": 32, "hidden": 4096, "intermediate": 11008, "vocab": 32000},
    "small": {"layers": 2, "hidden": 1024, "intermediate": 2816, "vocab": 8000},
}
RANK, ALPHA = 16, 32
INDEX = "model.safetensors.index.json"
STATE = ".quant_state.bitsandbytes__nf4"


# --- building the inputs -----------------------------------------------------------------------


def llama_tensors(layers: int, hidden: int, intermediate: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    names = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        names += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.mlp.down_proj.weight", (hidden, intermediate)),
            (f"{p}.mlp.gate_proj.weight", (intermediate, hidden)),
            (f"{p}.mlp.up_proj.weight", (intermediate, hidden)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.k_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.v_proj.weight", (hidden, hidden)),
        ]
    return names + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def is_linear(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and (".mlp." in name or ".self_attn." in name)


def build_checkpoint(path: Path, dims: dict, device: str, shards: int = 3) -> int:
    """Write the synthetic NF4 checkpoint tensor by tensor; returns its size in bytes."""
    import torch

    from adapterops.checkpoint import ShardWriter
    from adapterops.quant import quantize_nf4, to_state_dict
    from adapterops.quant.checkpoint import quantization_config

    tensors = llama_tensors(**dims)
    dense = sum(2 * math.prod(s) for _, s in tensors)
    path.mkdir(parents=True)
    weight_map, writer, index, done = {}, None, 0, 0
    g = torch.Generator(device=device).manual_seed(0)
    for name, shape in tensors:
        if writer is None or (done >= dense / shards * index and index < shards):
            if writer is not None:
                writer.close()
            index += 1
            writer = ShardWriter(path / f"model-{index:05d}-of-{shards:05d}.safetensors", metadata={"format": "pt"})
        if len(shape) == 1:
            entries = {name: torch.ones(shape, dtype=torch.bfloat16)}
        else:
            w = (torch.randn(shape, generator=g, device=device) * 0.02).to(torch.bfloat16)
            entries = {name: w.cpu()} if not is_linear(name, shape) else {k: v.cpu() for k, v in to_state_dict(quantize_nf4(w), name).items()}
        for key, t in entries.items():
            writer.add(key, t)
            weight_map[key] = writer.path.name
        done += 2 * math.prod(shape)
    writer.close()
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dims["hidden"],
        "intermediate_size": dims["intermediate"], "num_hidden_layers": dims["layers"],
        "num_attention_heads": max(1, dims["hidden"] // 128), "num_key_value_heads": max(1, dims["hidden"] // 128),
        "vocab_size": dims["vocab"], "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
        "quantization_config": quantization_config(compute_dtype="bfloat16", double_quant=True, skip_modules=None),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return total


def build_adapter(path: Path, dims: dict) -> None:
    """Rank 16 on every linear layer, ||dW|| / ||W|| about 0.1 (fp32 factors, one .st file)."""
    import torch

    from adapterops import Adapter, LoraLayer

    g = torch.Generator().manual_seed(1)
    layers = {}
    for name, shape in llama_tensors(**dims):
        if is_linear(name, shape):
            out, inp = shape
            A = torch.randn(RANK, inp, generator=g) / inp**0.5
            B = torch.randn(out, RANK, generator=g) * 0.01
            layers[name.removesuffix(".weight")] = LoraLayer(A, B, float(ALPHA))
    Adapter(layers).save(str(path))


# --- the routes (run in a child process) -------------------------------------------------------


def route_copy(base: Path, adapter: Path, out: Path, device: str) -> dict:
    subprocess.run(["cp", "-r", str(base), str(out)], check=True)
    return {}


def route_adapterops(base: Path, adapter: Path, out: Path, device: str) -> dict:
    import adapterops

    report = adapterops.merge(base, adapter, out, device=device, progress=False)
    kept = sorted(r["retained"] for r in report.rows)
    changed = sorted(r["codes_changed"] for r in report.rows)
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


def child(route: str, base: Path, adapter: Path, out: Path, device: str, sync: bool, threads: int | None) -> None:
    fn = globals()[f"route_{route}"]
    if route != "copy":
        import torch

        if threads:
            torch.set_num_threads(threads)
        if route == "bnb":
            import bitsandbytes  # noqa: F401
        import adapterops.quant  # noqa: F401
    start = time.perf_counter()
    extra = fn(base, adapter, out, device)
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    if sync:
        os.sync()
    seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": kids if route == "copy" else own, **extra}))


# --- the parent: run, compare, print -----------------------------------------------------------


def run_route(route: str, base: Path, adapter: Path, out: Path, device: str, sync: bool, threads: int | None) -> dict:
    os.sync()
    cmd = [sys.executable, __file__, "--child", route, "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--device", device]
    cmd += ([] if sync else ["--no-sync"]) + ([f"--threads={threads}"] if threads else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"route": route, "error": lines[-1] if lines else f"exit {done.returncode}"}
    return {"route": route, **json.loads(done.stdout.strip().splitlines()[-1])}


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


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA)"
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="7b (default on cuda) or small (default on cpu)")
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--routes", default=",".join(ROUTES), help=f"comma-separated subset of {','.join(ROUTES)}")
    p.add_argument("--workdir", type=Path, default=None, help="where the checkpoint and outputs go (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the workdir contents afterwards")
    p.add_argument("--no-sync", dest="sync", action="store_false", help="do not include os.sync() of the output in the times")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads in every route")
    p.add_argument("--repeat", type=int, default=1, help="run each route this many times; report the fastest")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.base, args.adapter, args.out, args.device, args.sync, args.threads)
        return 0

    import importlib.util

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dims = dict(SIZES[args.size or ("7b" if device.startswith("cuda") else "small")])
    dims.update({k: getattr(args, k) for k in dims if getattr(args, k) is not None})
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

    results, outputs = [], {}
    for route in routes:
        out = work / f"out-{route}"
        runs = []
        for _ in range(max(1, args.repeat)):
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run_route(route, base, adapter, out, device, args.sync, args.threads))
        ok = [r for r in runs if "seconds" in r]
        best = min(ok, key=lambda r: r["seconds"]) if len(ok) == len(runs) else next(r for r in runs if "seconds" not in r)
        if "seconds" in best:
            best = {**best, "peak_rss": max(r["peak_rss"] for r in ok), "runs": [r["seconds"] for r in ok]}
        results.append(best)
        outputs[route] = out
        print(f"  {route}: " + (f"{best['seconds']:.1f} s" if "seconds" in best else f"failed: {best['error']}"), flush=True)
    last = dims["layers"] - 1
    names = ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{last}.mlp.down_proj.weight", f"model.layers.{last}.mlp.gate_proj.weight"]
    if any(r["route"] == "adapterops" and "seconds" in r for r in results):
        for r in results:
            if r["route"] == "bnb" and "seconds" in r:
                r["codes_equal_adapterops"] = codes_agree(outputs["adapterops"], outputs["bnb"], names)
    if not args.keep:
        for out in outputs.values():
            shutil.rmtree(out, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    copy = next((r["seconds"] for r in results if r["route"] == "copy" and "seconds" in r), None)
    print()
    print(f"{'route':<11} {'seconds':>8} {'x copy':>7} {'peak RSS':>9} {'codes = adapterops':>19}")
    for r in results:
        if "seconds" not in r:
            print(f"{r['route']:<11} failed: {r['error']}")
            continue
        ratio = f"{r['seconds'] / copy:.2f}" if copy else "-"
        agree = f"{r['codes_equal_adapterops']:.6f}" if "codes_equal_adapterops" in r else "-"
        print(f"{r['route']:<11} {r['seconds']:>8.1f} {ratio:>7} {r['peak_rss'] / 1e9:>7.2f}GB {agree:>19}")
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
