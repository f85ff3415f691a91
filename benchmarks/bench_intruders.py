"""Intruder-dimension analysis of an all-linear adapter on a Llama-2-7B-shaped base: adapterops vs
the naive per-layer dense route.

Setup: a synthetic bf16 base checkpoint on disk (``--layers`` decoder layers x the 7 linear
shapes of Llama-2-7B: 224 matrices at 32 layers; weights with a decaying spectrum, like trained
ones) and a rank-16 adapter on every linear.

- adapterops, first run: ``adapterops diagnose ADAPTER --base BASE --json`` (the whole command,
  start-up included) with an empty cache: read + hash the base, base SVDs batched on the device
  (float64 Gram eigendecomposition), cache written, then the top-k of ``W + dW`` from ``U``, ``S``,
  ``U^T W`` and the factors (no dense SVD of ``W + dW``).
- adapterops, cached run: the same command again; the base is not read (the cache knows its files'
  identities) and ``U``, ``U^T W`` come from the cache in float16 (see ``adapterops._svd_cache``);
  the table says how far that rounding moved the similarities from the first run's.
- naive: per module, read ``W``, form ``W + dW`` densely, ``torch.linalg.svd`` of both in float32
  (what PEFT's intruder code does per module), max |cos| of the top-k vectors -- no batching, no
  cache. At 7B it takes long, so ``--naive-layers`` times a subset of the decoder layers and the
  table extrapolates linearly (every decoder layer has the same 7 shapes).

Both adapterops runs must agree with the naive route: intruder decisions equal wherever the
similarity is not within 1e-3 of epsilon, similarities within 1e-3 (exit code 1 otherwise).
``--cold`` drops the page cache before each adapterops run (root only).

    python benchmarks/bench_intruders.py [--device cpu|cuda] [--layers N] [--hidden 4096 --intermediate 11008]
                                         [--naive-layers N] [--json PATH] [--workdir DIR] [--keep] [--cold]
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

import torch
from safetensors.torch import save_file

import adapterops as ao
from adapterops import Adapter, LoraLayer
from adapterops.checkpoint import Checkpoint
from adapterops.diagnostics import DiagnosisReport

from _harness import cli, parse_with_threads, time_command

RANK, ALPHA, TOP_K, EPSILON = 16, 32.0, 10, 0.5
TOLERANCE = 1e-3


def linear_shapes(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """Llama's 7 linears, module -> (out, in)."""
    return {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_base(root: Path, layers: int, shapes: dict[str, tuple[int, int]], device: torch.device) -> None:
    """One bf16 shard per decoder layer plus the index. ``W = G diag(d) / sqrt(in)`` with Gaussian
    ``G`` and ``d_j = (1 + j)^-0.4``: a decaying spectrum with distinct top values, like trained weights."""
    g = torch.Generator(device=device).manual_seed(0)
    weight_map = {}
    root.mkdir(parents=True, exist_ok=True)
    for i in range(layers):
        shard = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        tensors = {}
        for module, (out, inn) in shapes.items():
            d = (1.0 + torch.arange(inn, device=device, dtype=torch.float32)) ** -0.4
            d = d[torch.randperm(inn, generator=g, device=device)]
            W = torch.randn(out, inn, generator=g, device=device) * (d / math.sqrt(inn))
            name = f"model.layers.{i}.{module}.weight"
            tensors[name] = W.to(torch.bfloat16).cpu()
            weight_map[name] = shard
        save_file(tensors, str(root / shard))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))


def make_adapter(layers: int, shapes: dict[str, tuple[int, int]]) -> Adapter:
    """Rank-16 factors with a decaying spectrum, ||dW|| / ||W|| a few percent: some top directions turn into intruders."""
    g = torch.Generator().manual_seed(1)
    decay = 0.7 ** torch.arange(RANK, dtype=torch.float32)
    result = {}
    for i in range(layers):
        for module, (out, inn) in shapes.items():
            A = torch.randn(RANK, inn, generator=g) / math.sqrt(inn)  # (r, in)
            B = torch.randn(out, RANK, generator=g) * decay * 0.01  # (out, r)
            result[f"model.layers.{i}.{module}"] = LoraLayer(A, B, ALPHA)
    return Adapter(result)


def naive(adapter: Adapter, base: Path, names: list[str], device: torch.device) -> dict[str, list[float]]:
    """Shuttleworth et al.'s procedure as written, module by module, float32 on the device."""
    ckpt = Checkpoint(base)
    sims = {}
    for name in names:
        W = ckpt.get(name + ".weight").to(device=device, dtype=torch.float32)
        layer = adapter[name].to(device=device)
        merged = W + layer.delta()  # dense (out, in)
        U0, _, _ = torch.linalg.svd(W, full_matrices=False)
        U1, _, _ = torch.linalg.svd(merged, full_matrices=False)
        sims[name] = (U1[:, :TOP_K].mT @ U0).abs().amax(dim=1).tolist()
    sync(device)
    return sims


def timed(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def agreement(report, reference: dict[str, list[float]]) -> tuple[float, int, int, int]:
    """Max |similarity difference|, mismatched clear-cut decisions, and the intruder totals of both, on the shared modules."""
    worst, mismatched, ours_total, ref_total = 0.0, 0, 0, 0
    for name, ref in reference.items():
        ours = report[name].similarities
        worst = max(worst, max(abs(a - b) for a, b in zip(ours, ref)))
        for a, b in zip(ours, ref):
            if abs(b - EPSILON) > TOLERANCE and (a < EPSILON) != (b < EPSILON):
                mismatched += 1
        ours_total += sum(a < EPSILON for a in ours)
        ref_total += sum(b < EPSILON for b in ref)
    return worst, mismatched, ours_total, ref_total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32 on cuda = 224 matrices, 1 on cpu)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default: 4096 on cuda, 1024 on cpu)")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP size (default: 11008 on cuda, 2752 on cpu)")
    parser.add_argument("--naive-layers", type=int, default=None, help="decoder layers timed with the naive route (default: 2 on cuda, all on cpu; 0: no naive route, no agreement check)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the synthetic base and the cache go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each adapterops run (needs root)")
    args, device = parse_with_threads(parser)
    on_gpu = device.type == "cuda"
    layers = args.layers if args.layers is not None else (32 if on_gpu else 1)
    hidden = args.hidden or (4096 if on_gpu else 1024)
    intermediate = args.intermediate or (11008 if on_gpu else 2752)
    naive_layers = min(layers, args.naive_layers if args.naive_layers is not None else (2 if on_gpu else layers))
    shapes = linear_shapes(hidden, intermediate)
    name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)"

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-intruders-"))
    base, cache = work / "base", work / "svd-cache"
    shutil.rmtree(cache, ignore_errors=True)
    try:
        print(f"writing a {layers}-layer base ({layers * len(shapes)} matrices) to {base} ...", file=sys.stderr, flush=True)
        write_base(base, layers, shapes, device)
        adapter = make_adapter(layers, shapes)
        adapter.save(work / "adapter.st", force=True)
        command = cli("diagnose", work / "adapter.st", "--base", base, "--top-k", TOP_K, "--epsilon", EPSILON,
                      "--cache-dir", cache, "--device", args.device, "--json", "--quiet")
        runs = []
        for label in ("first", "cached"):
            run = time_command(command, sync=False, cold=args.cold, threads=args.threads)
            if run["returncode"]:
                raise SystemExit(f"adapterops diagnose failed: {run['stderr'].strip().splitlines()[-1:]}")
            runs.append((run["seconds"], DiagnosisReport.from_json(run["stdout"])))
            print(f"{label} run: {run['seconds']:.1f} s", file=sys.stderr, flush=True)
        (first_s, first), (cached_s, cached) = runs
        subset = [n for n in adapter if int(n.split(".")[2]) < naive_layers]
        naive_s, reference = timed(lambda: naive(adapter, base, subset, device), device) if subset else (0.0, {})
        naive_total = naive_s * len(adapter) / len(subset) if subset else float("nan")
        print(f"naive: {naive_s:.1f} s for {len(subset)} matrices", file=sys.stderr, flush=True)
        cache_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    worst, mismatched, ours_count, ref_count = agreement(first, reference)
    worst_cached, mismatched_cached, _, _ = agreement(cached, reference)
    cache_cost, _, _, _ = agreement(cached, {n: list(first[n].similarities) for n in adapter})  # what the cache's rounding costs
    extrapolated = "" if len(subset) == len(adapter) else f", extrapolated from {len(subset)}"
    rows = [
        {"case": "adapterops diagnose, first run (empty cache)", "seconds": first_s, "speedup": naive_total / first_s},
        {"case": "adapterops diagnose, cached run", "seconds": cached_s, "speedup": naive_total / cached_s},
        {"case": f"naive per-layer dense{extrapolated}", "seconds": naive_total, "speedup": 1.0},
    ]
    head = f"{'case':<46} {'seconds':>9} {'vs naive':>9}"
    lines = [
        f"device: {name}; {len(adapter)} matrices ({layers} layers, hidden {hidden}, intermediate {intermediate}), rank {RANK}, top_k {TOP_K}",
        head,
        "-" * len(head),
        *(f"{r['case']:<46} {r['seconds']:>9.2f} " + (f"{r['speedup']:>8.1f}x" if math.isfinite(r["speedup"]) else f"{'-':>9}")
          for r in rows if math.isfinite(r["seconds"])),
        f"||dW||/||W|| {first.summary.relative_norm:.3f}; intruders: {first.summary.intruders} in {first.summary.layers_with_intruders} of {len(adapter)} matrices; "
        f"on the {len(subset)} compared: adapterops {ours_count}, naive {ref_count}; max |similarity difference| "
        f"{worst:.1e} (first run), {worst_cached:.1e} (cached run)",
        f"base SVD cache: {cache_bytes / 1e9:.2f} GB; cached run vs first run: max |similarity difference| {cache_cost:.1e}; "
        "adapterops times are whole commands, start-up included",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({
            "device": name, "torch": torch.__version__, "matrices": len(adapter), "layers": layers, "hidden": hidden,
            "intermediate": intermediate, "rank": RANK, "top_k": TOP_K, "naive_matrices": len(subset),
            "relative_norm": first.summary.relative_norm,
            "results": rows, "intruders": first.summary.intruders, "max_similarity_difference": worst,
            "mismatched_decisions": mismatched + mismatched_cached, "max_similarity_difference_cached": worst_cached,
            "max_similarity_difference_cache_vs_first": cache_cost,
            "cache_bytes": cache_bytes,
        }, indent=2) + "\n")
    if mismatched or mismatched_cached or max(worst, worst_cached) > TOLERANCE:
        print(f"routes disagree: {mismatched + mismatched_cached} decisions differ, max similarity difference "
              f"{max(worst, worst_cached):.1e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
