"""Merge an all-linear rank-16 LoRA into a Llama-2-7B-shaped bf16 checkpoint: adapterops vs the alternatives.

One run builds a synthetic checkpoint with Llama-2-7B tensor names and shapes (bf16, 3 shards, an
index, config.json; random values) and a PEFT adapter of rank 16 on every linear layer (q, k, v,
o, gate, up, down), then times, each in a fresh subprocess:

  copy        ``cp -r`` of the checkpoint: the I/O floor for writing a full model;
  adapterops  ``adapterops.merge`` (streaming: reader thread, compute on --device, writer thread);
  naive       shard by shard with no overlap: ``load_file(shard, device)``, ``W + s B A`` per adapted
              tensor, ``save_file`` of the shard;
  peft        ``AutoModelForCausalLM.from_pretrained`` (onto --device), ``PeftModel.from_pretrained``,
              ``merge_and_unload``, ``save_pretrained``.

Reported per route: seconds of work (after imports; including ``os.sync()`` of the output unless
``--no-sync``), the ratio to the copy, the peak resident memory of the process (``ru_maxrss``; for
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
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUTES = ("copy", "adapterops", "naive", "peft")
SIZES = {
    "7b": {"layers": 32, "hidden": 4096, "intermediate": 11008, "vocab": 32000},
    "small": {"layers": 4, "hidden": 2048, "intermediate": 5632, "vocab": 16000},
}
RANK, ALPHA = 16, 32
INDEX = "model.safetensors.index.json"


# --- building the inputs -----------------------------------------------------------------------


def llama_tensors(layers: int, hidden: int, intermediate: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama-2 checkpoint, in the order transformers saves them."""
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


def build_checkpoint(path: Path, dims: dict, device: str, shards: int = 3) -> int:
    """Write the synthetic bf16 checkpoint, streaming (one tensor in memory at a time); returns its size."""
    import math

    import torch

    from adapterops.checkpoint import ShardWriter

    tensors = llama_tensors(**dims)
    sizes = [2 * math.prod(s) for _, s in tensors]
    total, target = sum(sizes), sum(sizes) / shards
    path.mkdir(parents=True)
    weight_map, writer, index, acc = {}, None, 0, 0.0
    g = torch.Generator(device=device).manual_seed(0)
    for (name, shape), size in zip(tensors, sizes):
        if writer is None or (acc >= target * index and index < shards):
            if writer is not None:
                writer.close()
            index += 1
            writer = ShardWriter(path / f"model-{index:05d}-of-{shards:05d}.safetensors", metadata={"format": "pt"})
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()
        writer.add(name, t)
        weight_map[name] = writer.path.name
        acc += size
    writer.close()
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dims["hidden"],
        "intermediate_size": dims["intermediate"], "num_hidden_layers": dims["layers"],
        "num_attention_heads": max(1, dims["hidden"] // 128), "num_key_value_heads": max(1, dims["hidden"] // 128),
        "vocab_size": dims["vocab"], "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return total


def build_adapter(path: Path, dims: dict) -> None:
    """An all-linear rank-16 adapter in PEFT's directory format (fp32 factors, non-zero B)."""
    import torch

    from adapterops import Adapter, LoraLayer

    g = torch.Generator().manual_seed(1)
    layers = {}
    for name, shape in llama_tensors(**dims):
        if len(shape) == 2 and (".mlp." in name or ".self_attn." in name):
            out, inp = shape
            A = torch.randn(RANK, inp, generator=g) / inp**0.5
            B = torch.randn(out, RANK, generator=g) * 0.01
            layers[name.removesuffix(".weight")] = LoraLayer(A, B, float(ALPHA))
    Adapter(layers).save(str(path), format="peft")


# --- the routes (run in a child process) -------------------------------------------------------


def route_copy(base: Path, adapter: Path, out: Path, device: str) -> None:
    subprocess.run(["cp", "-r", str(base), str(out)], check=True)


def route_adapterops(base: Path, adapter: Path, out: Path, device: str) -> None:
    import adapterops

    adapterops.merge(base, adapter, out, device=device, progress=False)


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


def child(route: str, base: Path, adapter: Path, out: Path, device: str, sync: bool, threads: int | None) -> None:
    fn = globals()[f"route_{route}"]
    if route != "copy":
        import torch  # imports are not part of the timed work

        if threads:
            torch.set_num_threads(threads)

        if route == "peft":
            import peft  # noqa: F401
            import transformers  # noqa: F401
    start = time.perf_counter()
    fn(base, adapter, out, device)
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    if sync:
        os.sync()
    seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": kids if route == "copy" else own}))


# --- the parent: run, check, print -------------------------------------------------------------


def run_route(route: str, base: Path, adapter: Path, out: Path, device: str, sync: bool, threads: int | None) -> dict:
    os.sync()
    cmd = [sys.executable, __file__, "--child", route, "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--device", device]
    cmd += ([] if sync else ["--no-sync"]) + ([f"--threads={threads}"] if threads else [])
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"route": route, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(route=route, process_seconds=wall, **layout(base, out))
    return result


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
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads in every route (default: torch's choice)")
    p.add_argument("--repeat", type=int, default=1, help="run each route this many times; report the fastest (and the largest RSS)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.base, args.adapter, args.out, args.device, args.sync, args.threads)
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dims = dict(SIZES[args.size or ("7b" if device.startswith("cuda") else "small")])
    dims.update({k: getattr(args, k) for k in dims if getattr(args, k) is not None})
    routes = [r for r in args.routes.split(",") if r]
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

    results, outputs = [], {}
    for route in routes:
        out = work / f"out-{route}"
        shutil.rmtree(out, ignore_errors=True)
        runs = []
        for _ in range(max(1, args.repeat)):
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run_route(route, base, adapter, out, device, args.sync, args.threads))
        ok = [x for x in runs if "seconds" in x]
        r = min(ok, key=lambda x: x["seconds"]) if len(ok) == len(runs) else next(x for x in runs if "seconds" not in x)
        if "seconds" in r:
            r = {**r, "peak_rss": max(x["peak_rss"] for x in ok), "runs": [x["seconds"] for x in ok]}
        results.append(r)
        outputs[route] = out
        print(f"  {route}: " + (f"{r['seconds']:.1f} s" if "seconds" in r else f"failed: {r['error']}"), flush=True)
    check = None
    if {"adapterops", "naive"} <= set(outputs) and all(outputs[r].exists() for r in ("adapterops", "naive")):
        last = dims["layers"] - 1
        names = ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{last}.mlp.down_proj.weight", "model.norm.weight"]
        check = agree(outputs["adapterops"], outputs["naive"], names)
    if not args.keep:
        for out in outputs.values():
            shutil.rmtree(out, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    copy = next((r["seconds"] for r in results if r["route"] == "copy" and "seconds" in r), None)
    print()
    print(f"{'route':<11} {'seconds':>8} {'x copy':>7} {'peak RSS':>9} {'RSS/ckpt':>9} {'shards':>6}  layout kept")
    for r in results:
        if "seconds" not in r:
            print(f"{r['route']:<11} failed: {r['error']}")
            continue
        ratio = f"{r['seconds'] / copy:.2f}" if copy else "-"
        print(f"{r['route']:<11} {r['seconds']:>8.1f} {ratio:>7} {r['peak_rss'] / 1e9:>7.2f}GB {r['peak_rss'] / size:>9.2f} {r['shards']:>6}  {'yes' if r['layout_kept'] else 'no'}")
    if check is not None:
        print(f"adapterops and naive outputs agree within one bf16 ulp: {'yes' if check else 'NO'}")
    if args.json:
        payload = {"device": describe_device(device), "dims": dims, "checkpoint_bytes": size, "rank": RANK, "sync": args.sync, "repeat": args.repeat, "threads": args.threads,
                   "routes": results, "adapterops_matches_naive": check}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0 if check in (None, True) and all("seconds" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
