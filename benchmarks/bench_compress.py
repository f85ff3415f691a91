"""Blend two rank-16 adapters and re-compress the sum to rank 16: adapterops vs the dense route.

adapterops: ``blend`` (exact, rank 32 in factored form) then ``compress(rank=16)``: QR of both
factors and an SVD of the 32 x 32 core, layers of equal shape batched.

Dense route: materialize ``0.6 * delta_a + 0.4 * delta_b`` (out x in), ``torch.linalg.svd``, keep
16 singular triplets. This is what PEFT's ``add_weighted_adapter(combination_type="svd")`` does
per module (it even asks for ``full_matrices=True`` by default; the dense route here uses the
cheaper thin SVD). The script also runs PEFT's own ``add_weighted_adapter`` on a small module to
confirm that it computes the same thing.

Cases, all on ``--device``:
  - one layer at 4096 x 4096 and at 11008 x 4096 (Llama-7B attention and MLP shapes);
  - a whole model: ``--layers`` decoder layers x the 7 Llama-7B linear shapes (q, k, v, o, gate,
    up, down), adapterops compressing all at once vs a dense loop over the modules. The dense loop
    is timed on the first ``--dense-layers`` layers and scaled up (its modules are independent, so
    their times add up; at 32 layers it would take tens of minutes even on a GPU); the table marks
    such numbers with ``*``.

Every case reports the relative Frobenius difference of the two rank-16 deltas. The one-layer
cases also compare both routes with the exact answer: the dense route run in float64. adapterops
must be within 1e-4 of it (exit code 1 otherwise); a float32 dense SVD of a large matrix can itself
be off by more than that, which is why the oracle is float64 and not the float32 dense route.

    python benchmarks/bench_compress.py [--device cpu|cuda] [--shapes 4096x4096,...] [--layers N]
        [--dense-layers N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import adapterops as ao
from adapterops import Adapter, LoraLayer

from _harness import parse_with_threads

RANK, ALPHA, WEIGHTS = 16, 32.0, (0.6, 0.4)
TOLERANCE = 1e-4
LLAMA_7B = {  # module -> (out, in)
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 4096),
    "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (11008, 4096),
    "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


def random_adapter(shapes: dict[str, tuple[int, int]], seed: int, device: torch.device) -> Adapter:
    """Rank-16 float32 factors with a decaying spectrum, like a trained adapter's."""
    g = torch.Generator().manual_seed(seed)
    decay = 0.8 ** torch.arange(RANK, dtype=torch.float32)
    layers = {}
    for name, (out, inn) in shapes.items():
        A = torch.randn(RANK, inn, generator=g) / math.sqrt(inn)  # (r, in)
        B = torch.randn(out, RANK, generator=g) * 0.01 * decay  # (out, r)
        layers[name] = LoraLayer(A.to(device), B.to(device), ALPHA)
    return Adapter(layers)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int, *, warmup: bool = True) -> tuple[float, object]:
    """Median wall time in ms over ``repeat`` runs (after one warm-up run), and the last result."""
    if warmup:
        fn()
    times, result = [], None
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), result


def adapterops_route(a: Adapter, b: Adapter, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    result = ao.blend([a, b], WEIGHTS).compress(rank=RANK, device=device)
    return {n: (layer.B * layer.scale, layer.A) for n, layer in result.items()}


def dense_route(a: Adapter, b: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module: materialize the blended delta, full SVD, keep the top 16 (PEFT's svd combination)."""
    out = {}
    for name in a:
        la, lb = a[name], b[name]
        delta = WEIGHTS[0] * la.scale * (la.B @ la.A) + WEIGHTS[1] * lb.scale * (lb.B @ lb.A)  # (out, in)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        out[name] = (U[:, :RANK] * S[:RANK], Vh[:RANK])  # (out, 16), (16, in)
    return out


def relative_difference(x: dict, y: dict) -> float:
    """||X - Y||_F / ||Y||_F over all modules, on the dense rank-16 deltas."""
    num = den = 0.0
    for name, (By, Ay) in y.items():
        Bx, Ax = x[name]
        dense_y = (By @ Ay).double()
        num += float(torch.linalg.matrix_norm((Bx @ Ax).double() - dense_y)) ** 2
        den += float(torch.linalg.matrix_norm(dense_y)) ** 2
    return math.sqrt(num / den)


def compare(
    label: str, shapes: dict[str, tuple[int, int]], device: torch.device, repeat: int, dense_repeat: int,
    dense_share: float = 1.0, oracle: bool = False,
) -> dict:
    """Both routes on ``shapes``; the dense one on the first ``dense_share`` of the modules only,
    its time scaled up by ``1 / dense_share`` (a loop of independent modules: time adds up)."""
    a, b = random_adapter(shapes, 1, device), random_adapter(shapes, 2, device)
    ours_ms, ours = timed(lambda: adapterops_route(a, b, device), device, repeat)
    names = list(shapes)[: max(1, round(len(shapes) * dense_share))]
    a_part, b_part = Adapter({n: a[n] for n in names}), Adapter({n: b[n] for n in names})
    torch.linalg.svd(torch.randn(64, 64, device=device))  # warm-up of the solver; a full run can take minutes
    dense_ms, dense = timed(lambda: dense_route(a_part, b_part), device, dense_repeat, warmup=False)
    dense_ms *= len(shapes) / len(names)
    errors = {}
    if oracle:
        exact = dense_route(a_part.to(dtype=torch.float64), b_part.to(dtype=torch.float64))
        errors = {
            "adapterops_vs_float64": relative_difference({n: ours[n] for n in names}, exact),
            "dense_vs_float64": relative_difference(dense, exact),
        }
    return {
        "case": label,
        "modules": len(shapes),
        "dense_modules_timed": len(names),
        "adapterops_ms": ours_ms,
        "dense_ms": dense_ms,
        "speedup": dense_ms / ours_ms,
        "rel_diff": relative_difference({n: ours[n] for n in names}, dense),
        **errors,
    }


def peft_check(device: torch.device, repeat: int) -> dict | None:
    """PEFT's own add_weighted_adapter(svd) on one 1024 x 1024 Linear, against both routes."""
    try:
        import peft
    except ImportError:
        return None
    shape = (1024, 1024)
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(shape[1], shape[0], bias=False))
    a, b = random_adapter({"proj": shape}, 1, torch.device("cpu")), random_adapter({"proj": shape}, 2, torch.device("cpu"))
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"])
    model = peft.get_peft_model(base, config, adapter_name="first")
    model.add_adapter("second", config)
    with torch.no_grad():
        for adapter_name, value in (("first", a), ("second", b)):
            model.base_model.model.proj.lora_A[adapter_name].weight.copy_(value["proj"].A)
            model.base_model.model.proj.lora_B[adapter_name].weight.copy_(value["proj"].B)
    model = model.to(device)
    counter = iter(range(10**6))

    def run_peft():
        name = f"mix{next(counter)}"
        model.add_weighted_adapter(["first", "second"], list(WEIGHTS), name, combination_type="svd", svd_rank=RANK)
        return name

    peft_ms, name = timed(run_peft, device, repeat)
    layer = model.base_model.model.proj
    peft_result = {"proj": (layer.lora_B[name].weight.detach() * layer.scaling[name], layer.lora_A[name].weight.detach())}
    a, b = a.to(device), b.to(device)
    ours_ms, ours = timed(lambda: adapterops_route(a, b, device), device, repeat)
    return {
        "case": f"PEFT add_weighted_adapter svd, {shape[0]}x{shape[1]}",
        "modules": 1,
        "adapterops_ms": ours_ms,
        "dense_ms": peft_ms,
        "speedup": peft_ms / ours_ms,
        "rel_diff": relative_difference(ours, peft_result),
        "peft_vs_dense_route": relative_difference(dense_route(a, b), peft_result),
    }


def cpu_name() -> str:
    model = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model}, {threads} thread{'s' if threads != 1 else ''}"


def table(rows: list[dict], device: str) -> str:
    head = (
        f"{'case':<44} {'adapterops ms':>14} {'dense ms':>12} {'speedup':>9} {'rel diff':>9}"
        f" {'ours vs f64':>12} {'dense vs f64':>12}"
    )
    lines = [f"device: {device}", head, "-" * len(head)]
    for r in rows:
        est = "*" if r.get("dense_modules_timed", r["modules"]) < r["modules"] else " "
        lines.append(
            f"{r['case']:<44} {r['adapterops_ms']:>14.2f} {r['dense_ms']:>11.1f}{est} {r['speedup']:>8.0f}x {r['rel_diff']:>9.1e}"
            f" {_maybe(r.get('adapterops_vs_float64')):>12} {_maybe(r.get('dense_vs_float64')):>12}"
        )
    if any(r.get("dense_modules_timed", r["modules"]) < r["modules"] for r in rows):
        lines.append("* dense loop timed on the first --dense-layers layers and scaled to all; rel diff on those modules")
    return "\n".join(lines)


def _maybe(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="4096x4096,11008x4096", help="one-layer cases, OUTxIN comma-separated")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers in the whole-model case (0 skips it)")
    parser.add_argument(
        "--dense-layers", type=int, default=None,
        help="layers the dense loop is timed on in the whole-model case, scaled to --layers (default: 4 on cuda, 1 on cpu)",
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of the adapterops route (median)")
    parser.add_argument("--dense-repeat", type=int, default=1, help="timed runs of the dense route (median)")
    parser.add_argument("--no-peft", action="store_true", help="skip the check against PEFT's add_weighted_adapter")
    args, device = parse_with_threads(parser)
    layers = args.layers
    dense_layers = min(layers, args.dense_layers or (4 if device.type == "cuda" else 1))
    dense_repeat = args.dense_repeat
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()

    rows = []
    for out, inn in (tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",") if shape):
        rows.append(compare(f"one layer {out}x{inn}", {"layer": (out, inn)}, device, args.repeat, dense_repeat, oracle=True))
        print(table(rows[-1:], name).splitlines()[-1], file=sys.stderr, flush=True)
    if layers:
        shapes = {f"model.layers.{i}.{m}": s for i in range(layers) for m, s in LLAMA_7B.items()}
        share = dense_layers / layers
        rows.append(compare(f"Llama-7B, {layers} layers x 7 linears", shapes, device, args.repeat, dense_repeat, share))
    if not args.no_peft:
        check = peft_check(device, args.repeat)
        if check:
            rows.append(check)
    print(table(rows, name))
    if rows and "peft_vs_dense_route" in rows[-1]:
        print(f"PEFT's add_weighted_adapter(svd) vs the dense route here: rel diff {rows[-1]['peft_vs_dense_route']:.1e}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "rank": RANK, "results": rows}, indent=2) + "\n")
    bad = [r["case"] for r in rows if "adapterops_vs_float64" in r and not r["adapterops_vs_float64"] < TOLERANCE]
    if bad:
        print(f"adapterops is {TOLERANCE:g} or more off the reference in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
