"""TIES / DARE-TIES merges of three rank-16 adapters: adapterops vs PEFT's ``add_weighted_adapter``.

Inputs: three random rank-16 all-linear adapters on Llama-2-7B shapes (32 decoder layers x q, k, v,
o 4096x4096, gate, up 11008x4096, down 4096x11008 = 224 layers), weights 0.5 / 0.3 / 0.2,
density 0.5, re-compressed to rank 16, everything on ``--device``.

Routes, one table:
  - adapterops ``ties`` and ``dare_ties`` (dense deltas, one chunk of equal-shape layers at a time,
    randomized SVD) and ``knots_ties`` (LoRA-native, no dense delta) when it is registered;
    ``convention="peft"`` so that the merged delta is exactly PEFT's;
  - PEFT ``add_weighted_adapter(combination_type="ties_svd" / "dare_ties_svd")`` on the same factors
    (dense deltas, then a full ``torch.linalg.svd`` per module). PEFT is timed on one module of
    each shape (q_proj, up_proj, down_proj of decoder layer 0, one ``add_weighted_adapter`` call
    each) and scaled to the model by shape counts (4, 2 and 1 per decoder layer; its modules are
    independent, so their times add up): the table marks it with ``*``; ``--peft-all`` times it on
    every module instead. DARE's masks are the same in both routes (PEFT's ``torch.bernoulli`` is
    handed adapterops' seeded draws).

Accuracy, on the sampled modules of decoder layer 0 (one of each shape): the merged delta ``M`` in
float64 (same masks), its exact rank-16 truncation error ``e* = ||M - M_16||_F`` from float64
singular values, and per route ``||M - route||_F / e* - 1`` (0 = optimal; PEFT's float32 SVD is not
exact either). For ``knots_ties`` the reference is its own untruncated merge (rank 48, factored).

    python benchmarks/bench_methods.py [--device cuda] [--small] [--peft-all] [--json PATH]

``--small`` is the CPU mode: 2 decoder layers of hidden 256 / intermediate 688.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import adapterops as ao
from adapterops import Adapter, LoraLayer
from adapterops.methods import METHODS, dense, get_method, sparsify

from _harness import describe_device, parse_with_threads

RANK, WEIGHTS, DENSITY = 16, (0.5, 0.3, 0.2), 0.5
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SAMPLED = ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")
SIZES = {"7b": {"layers": 32, "hidden": 4096, "intermediate": 11008}, "small": {"layers": 2, "hidden": 256, "intermediate": 688}}


def shapes(dims: dict) -> dict[str, tuple[int, int]]:
    h, m = dims["hidden"], dims["intermediate"]
    per = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h), "self_attn.o_proj": (h, h),
           "mlp.gate_proj": (m, h), "mlp.up_proj": (m, h), "mlp.down_proj": (h, m)}
    return {f"model.layers.{i}.{mod}": per[mod] for i in range(dims["layers"]) for mod in MODULES}


def random_adapter(layout: dict[str, tuple[int, int]], seed: int, device: torch.device) -> Adapter:
    g = torch.Generator(device=device).manual_seed(seed)
    layers = {}
    for name, (out, inp) in layout.items():
        A = torch.randn(RANK, inp, generator=g, device=device) / inp**0.5
        B = torch.randn(out, RANK, generator=g, device=device) * 0.02
        layers[name] = LoraLayer(A, B, float(RANK))
    return Adapter(layers)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


# --- PEFT -----------------------------------------------------------------------------------------


class Decoder(torch.nn.Module):
    """The Llama linear modules ``names`` (``model.layers.i.mlp.up_proj``, ...), named as transformers names them."""

    def __init__(self, layout: dict[str, tuple[int, int]], names: list[str], device: torch.device):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList()
        for name in names:
            i, part, leaf = int(name.split(".")[2]), *name.split(".")[3:]
            while len(self.model.layers) <= i:
                block = torch.nn.Module()
                block.self_attn, block.mlp = torch.nn.Module(), torch.nn.Module()
                self.model.layers.append(block)
            out, inp = layout[name]
            setattr(getattr(self.model.layers[i], part), leaf, torch.nn.Linear(inp, out, bias=False, device=device))


def peft_route(adapters, layout, names, combination, device, seed):
    """PEFT's ``add_weighted_adapter`` on the modules ``names``: (seconds, their merged deltas)."""
    import peft

    leaves = sorted({n.split(".")[-1] for n in names})
    config = lambda: peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=leaves)  # noqa: E731
    model = peft.get_peft_model(Decoder(layout, names, device), config(), adapter_name="t0")
    for i in range(1, len(adapters)):
        model.add_adapter(f"t{i}", config())
    with torch.no_grad():
        for i, adapter in enumerate(adapters):
            for name in names:
                layer, module = adapter[name], model.base_model.model.get_submodule(name)
                module.lora_A[f"t{i}"].weight.copy_(layer.A)
                module.lora_B[f"t{i}"].weight.copy_(layer.B * layer.scale)
    # PEFT visits modules in registration order and tasks in order; hand it adapterops' draws
    visited = [n for n, m in model.base_model.model.named_modules() if n in names]
    order = iter([(name, t) for name in visited for t in range(len(adapters))])
    original = torch.bernoulli

    def bernoulli(p, *args, **kwargs):
        name, task = next(order)
        g = torch.Generator(device=p.device).manual_seed(dense._seed(seed, "mask", name, task))
        return (torch.rand(p.shape, generator=g, device=p.device) < p).to(p.dtype)

    torch.bernoulli = bernoulli
    try:
        _, seconds = timed(lambda: model.add_weighted_adapter(
            [f"t{i}" for i in range(len(adapters))], list(WEIGHTS), "merged", combination_type=combination, density=DENSITY), device)
    finally:
        torch.bernoulli = original
    return seconds, {n: model.base_model.model.get_submodule(n).get_delta_weight("merged").detach() for n in names}


def peft_timed(adapters, layout, dims, combination, device, seed, every):
    """PEFT's time for the whole model (measured, or scaled from one module per shape) and layer 0's sampled deltas."""
    if every:
        seconds, deltas = peft_route(adapters, layout, list(layout), combination, device, seed)
        return seconds, len(layout), False, deltas
    counts = {"self_attn.q_proj": 4, "mlp.up_proj": 2, "mlp.down_proj": 1}  # modules of that shape per decoder layer
    total, deltas = 0.0, {}
    for mod, count in counts.items():
        seconds, got = peft_route(adapters, layout, [f"model.layers.0.{mod}"], combination, device, seed)
        total += seconds * count * dims["layers"]
        deltas.update(got)
    return total, len(counts), True, deltas


# --- the float64 reference -----------------------------------------------------------------------


def reference(method, adapters, name, seed):
    """Merged delta of one module in float64 with the routes' masks, and its rank-16 truncation error."""
    x = torch.stack([a[name].scale * a[name].B.double() @ a[name].A.double() for a in adapters])  # (3, out, in)
    w = torch.tensor(WEIGHTS, dtype=torch.float64, device=x.device)
    if method == "ties":
        M = sparsify.ties_merge(x, w, density=DENSITY, convention="peft")
    else:
        gens = [torch.Generator(device=x.device).manual_seed(dense._seed(seed, "mask", name, t)) for t in range(len(adapters))]
        M = sparsify.dare_merge(x, w, density=DENSITY, generator=gens, ties=True, convention="peft", normalize=True)
    S = torch.linalg.svdvals(M)
    return M, float((S[RANK:] ** 2).sum().sqrt())


def excess(M, optimum, delta):
    return float(torch.linalg.norm(M - delta.double())) / optimum - 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="CPU-sized model (4 layers, hidden 512)")
    parser.add_argument("--peft-all", action="store_true", help="time PEFT on every module instead of one per shape")
    parser.add_argument("--seed", type=int, default=0)
    args, device = parse_with_threads(parser)
    dims = SIZES["small" if args.small else "7b"]
    layout = shapes(dims)
    adapters = [random_adapter(layout, 100 + i, device) for i in range(3)]
    print(f"{len(layout)} layers, 3 adapters of rank {RANK}, density {DENSITY}, weights {WEIGHTS}, on {describe_device(str(device))}",
          file=sys.stderr)

    warm = [random_adapter({n: (64, 48) for n in list(layout)[:3]}, i, device) for i in range(3)]
    for method in ("ties", "dare_ties"):
        ao.blend(warm, list(WEIGHTS), method, DENSITY, device=device)  # CUDA and cuSOLVER start-up
    get_method("knots_ties")  # loads the registry
    routes = [("ties", "ties_svd", {"convention": "peft"}),
              ("dare_ties", "dare_ties_svd", {"convention": "peft", "normalize": True})]
    refs = {m: {n: reference(m, adapters, f"model.layers.0.{n}", args.seed) for n in SAMPLED} for m, _, _ in routes}
    rows = []

    def add(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)  # partial results survive a timeout

    for method, combination, options in routes:
        result, seconds = timed(lambda: ao.blend(adapters, list(WEIGHTS), method, DENSITY, rank=RANK, seed=args.seed, device=device, **options), device)
        errors = [excess(*refs[method][n], result.delta(f"model.layers.0.{n}")) for n in SAMPLED]
        add({"route": f"adapterops {method}", "seconds": seconds, "layers_timed": len(layout), "excess": max(errors), "method": method})
        seconds, timed_layers, scaled, peft_deltas = peft_timed(adapters, layout, dims, combination, device, args.seed, args.peft_all)
        errors = [excess(*refs[method][n], peft_deltas[f"model.layers.0.{n}"]) for n in SAMPLED]
        agree = max(float(torch.linalg.norm(result.delta(n) - peft_deltas[n]) / torch.linalg.norm(peft_deltas[n]))
                    for n in (f"model.layers.0.{m}" for m in SAMPLED))
        add({"route": f"PEFT {combination}", "seconds": seconds, "layers_timed": timed_layers, "excess": max(errors),
                     "method": method, "scaled": scaled, "vs_adapterops": agree})
    if "knots_ties" in METHODS:
        result, seconds = timed(lambda: ao.blend(adapters, list(WEIGHTS), "knots_ties", DENSITY, rank=RANK, device=device), device)
        full = ao.blend(adapters, list(WEIGHTS), "knots_ties", DENSITY, rank=3 * RANK, device=device)
        errors = []
        for n in SAMPLED:
            M = full.delta(f"model.layers.0.{n}").double()
            S = torch.linalg.svdvals(M)
            errors.append(excess(M, float((S[RANK:] ** 2).sum().sqrt()), result.delta(f"model.layers.0.{n}")))
        add({"route": "adapterops knots_ties", "seconds": seconds, "layers_timed": len(layout), "excess": max(errors), "method": "knots_ties"})

    peft_time = {r["method"]: r["seconds"] for r in rows if r["route"].startswith("PEFT")}
    print(f"\n{'route':<26} {'seconds':>9} {'x faster than PEFT':>19} {'layers timed':>13} {'error vs exact rank-16 truncation':>34}")
    for r in rows:
        base = peft_time.get(r["method"], peft_time.get("ties"))
        speed = f"{base / r['seconds']:.1f}" if base else "-"
        star = "*" if r.get("scaled") else " "
        print(f"{r['route']:<26} {r['seconds']:>8.2f}{star} {speed:>19} {r['layers_timed']:>13} {r['excess']:>+34.2e}")
    if any(r.get("scaled") for r in rows):
        print(f"* PEFT timed on one module of each shape and scaled to all {len(layout)} by shape counts")
    for r in rows:
        if "vs_adapterops" in r:
            print(f"{r['route']} vs adapterops {r['method']}: relative difference {r['vs_adapterops']:.2e} (sampled modules)")
    if args.json:
        args.json.write_text(json.dumps({"device": describe_device(str(device)), "dims": dims, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
