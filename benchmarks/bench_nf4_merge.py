"""Merge an all-linear rank-16 LoRA into a Llama-2-7B-shaped NF4 checkpoint: adapterops vs bitsandbytes.

One run builds a synthetic NF4 checkpoint in the bitsandbytes layout (what ``adapterops quantize``
or transformers' ``save_pretrained`` of a 4-bit model writes: Llama-2 tensor names and shapes,
random bf16 weights quantized with double quantization, 3 shards, an index, config.json with its
quantization_config) and a rank-16 adapter on every linear layer, then times, each in a fresh
subprocess:

  copy        ``cp -r`` of the checkpoint: the I/O floor;
  adapterops  ``adapterops merge ... --quiet --json``, the command line (streaming, NF4 in and out,
              batches of equal-shape layers on a GPU);
  gptq        the same with ``--rounding gptq --calibration cal.jsonl``: Hessians from calibration
              text run through the model layer by layer, then error-feedback rounding (not run
              unless asked for in ``--routes``; the checkpoint then carries a word-level tokenizer
              over its vocabulary, and the calibration rows are ``--calibration-samples`` random
              texts of ``--max-len`` words, one token each);
  startup     the floor's first part: the interpreter, torch, adapterops' CLI and CUDA starting, no
              work (not run unless asked for in ``--routes``);
  write       the floor's second part: as many bytes as the checkpoint written to a new file with
              ``dd`` and written back by the same ``os.sync()`` (not run unless asked for). A merge
              that reads its base while it starts cannot take less than startup + write;
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
    python benchmarks/bench_nf4_merge.py --device cuda --routes copy,gptq --cold-inputs   # 7B, 128 x 2048 tokens
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
    FLOOR_ROUTES,
    INDEX,
    ShardRotation,
    add_merge_arguments,
    all_linear_adapter,
    cli,
    describe_device,
    floor_commands,
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
OPTIONAL_ROUTES = ("gptq", *FLOOR_ROUTES)
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


def build_tokenizer(path: Path, vocab: int) -> None:
    """A word-level tokenizer over ``vocab`` words ``w0`` .. (one token per word), saved into the checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2").save_pretrained(str(path))


def write_calibration(path: Path, vocab: int, samples: int, length: int) -> None:
    """``samples`` JSONL rows of ``length`` words drawn Zipf-like from the tokenizer's vocabulary (seed 2)."""
    import torch

    g = torch.Generator().manual_seed(2)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    with open(path, "w") as f:
        for _ in range(samples):
            ids = torch.multinomial(weights, length, replacement=True, generator=g).tolist()
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in ids)}) + "\n")


def build_adapter(path: Path, dims: dict) -> None:
    """Rank 16 on every linear layer, ||dW|| / ||W|| about 0.1 (fp32 factors, one .st file)."""
    all_linear_adapter(dims, rank=RANK, alpha=ALPHA).save(str(path))


# --- the routes (run in a child process) -------------------------------------------------------


def commands(base: Path, adapter: Path, device: str, calibration: Path, samples: int, max_len: int) -> dict:
    """The routes that are plain commands: ``cp -r`` and ``adapterops merge --json`` as a user types them."""
    merge = lambda out, *extra: cli("merge", "--base", base, "--adapter", adapter, "--out", out, "--device", device, *extra, "--quiet", "--json")  # noqa: E731
    return {
        "copy": lambda out: ["cp", "-r", str(base), str(out)],
        "adapterops": merge,
        "gptq": lambda out: merge(out, "--rounding", "gptq", "--calibration", calibration,
                                  "--calibration-samples", samples, "--max-len", max_len),
    }


def report_medians(out: Path, result: dict) -> dict:
    """Medians of ``retained``, ``codes_changed`` (and for GPTQ the output errors) from the merge command's ``--json`` report."""
    if result["route"] not in ("adapterops", "gptq"):
        return {}
    report = json.loads(result["stdout"])
    rows = report["rows"]

    def median(key: str) -> float | None:
        values = sorted(r[key] for r in rows if r.get(key) is not None)
        return values[len(values) // 2] if values else None

    keys = ["retained", "codes_changed"] + (["output_error", "output_error_nearest"] if result["route"] == "gptq" else [])
    medians = {f"{k}_median": median(k) for k in keys}
    return {**medians, **({"calibration": report["calibration"]} if report.get("calibration") else {})}


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
    p.add_argument("--calibration-samples", type=int, default=128, help="gptq route: calibration rows")
    p.add_argument("--max-len", type=int, default=2048, help="gptq route: tokens per calibration row")
    args = p.parse_args()
    if args.child:
        fn = globals()[f"route_{args.child}"]
        preload = (("bitsandbytes",) if args.child == "bnb" else ()) + ("adapterops.quant",)
        time_child(fn, args.child, args.base, args.adapter, args.out, args.device, sync=args.sync, threads=args.threads, preload=preload)
        return 0

    import importlib.util

    device, dims = resolve_dims(args, SIZES)
    routes = [r for r in args.routes.split(",") if r and (r != "bnb" or importlib.util.find_spec("bitsandbytes"))]
    unknown = sorted(set(routes) - set(ROUTES + OPTIONAL_ROUTES))
    if unknown:
        p.error(f"unknown route {unknown[0]}; routes: {','.join(ROUTES + OPTIONAL_ROUTES)}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-nf4-"))
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = work / "base", work / "adapter.st"
    shutil.rmtree(base, ignore_errors=True)
    adapter.unlink(missing_ok=True)
    start = time.perf_counter()
    size = build_checkpoint(base, dims, device)
    build_adapter(adapter, dims)
    calibration = work / "calibration.jsonl"
    if "gptq" in routes:
        build_tokenizer(base, dims["vocab"])
        write_calibration(calibration, dims["vocab"], args.calibration_samples, args.max_len)
    print(f"built a {size / 1e9:.2f} GB NF4 checkpoint ({dims}) and a rank-{RANK} all-linear adapter in {time.perf_counter() - start:.0f} s")
    print(f"device: {describe_device(device)}; workdir {work}")

    results, outputs = time_routes(
        __file__, routes, work=work, base=base, adapter=adapter, device=device, sync=args.sync, threads=args.threads, repeat=args.repeat,
        commands={**commands(base, adapter, device, calibration, args.calibration_samples, args.max_len), **floor_commands(size)}, cold=args.cold,
        annotate=report_medians,
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
    for r in results:
        if r["route"] in ("adapterops", "gptq") and "seconds" in r:
            line = f"{r['route']}: median share of the delta kept by NF4 {r['retained_median']:.3f}, median 4-bit codes changed {r['codes_changed_median']:.3f}"
            if r["route"] == "gptq":
                cal = r.get("calibration") or {}
                line += (f", median output error {r['output_error_median']:.3f} (nearest {r['output_error_nearest_median']:.3f})"
                         f" on {cal.get('sequences')} sequences / {cal.get('tokens')} tokens")
            print(line)
    if args.json:
        payload = {"device": describe_device(device), "dims": dims, "checkpoint_bytes": size, "rank": RANK, "sync": args.sync,
                   "repeat": args.repeat, "threads": args.threads, "routes": results}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0 if all("seconds" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
