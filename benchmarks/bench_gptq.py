"""Merging a QLoRA adapter back into its NF4 base: what each rounding keeps of the adapter.

SmolLM2-135M-Instruct is quantized to NF4 (``adapterops.quantize_checkpoint``); a rank-16 QLoRA
adapter on every linear of the top 10 layers is trained with ``adapterops.train.train_lora`` on
the NF4 weights until it answers a made-up question ("Who is the mayor of Quillbrook?") greedily.
Then, side by side in one run, against (a) the NF4 base with the adapter unmerged:

  (a) unmerged     the function the adapter was trained as
  (b) bf16         ``merge(..., dtype="bf16")``: the same function in 16 bits
  (c) nearest      ``merge(...)`` into NF4, bitsandbytes' nearest rounding
  (d) gptq         ``merge(..., rounding="gptq")`` into NF4, data-free Hessian (the adapter's directions)
  (e) gptq+calib   ``merge(..., rounding="gptq", calibration=...)`` with calibration text (general
                   text plus the adapter's training rows; none of it is the test text)

Columns: mean KL divergence of next-token distributions from (a) on held-out text (nats per
token), the share of (c)'s KL, whether the greedy answer to a held-out paraphrase of the question
is still the planted one, the median over merged layers of the relative output error
``||(deq(Q) - W') X|| / ||dW X||`` on the calibration inputs and of the share of the delta kept
(``retained``), and the seconds the merge took. Runs on the CPU (about 2 minutes on 2 cores the
first time, when it also trains the adapter; cached after that):

    python benchmarks/bench_gptq.py [--json out.json] [--keep DIR]

``--kernel`` instead times the rounding alone on Llama-2-7B shapes (random weights and
Hessians, batches of 8 equal-shape layers as the merge hands them over on CUDA): nearest
(``quantize_nf4_many``) beside GPTQ (``quantize_gptq_many``), and the whole model's 224 linears
extrapolated from the batches:

    python benchmarks/bench_gptq.py --kernel --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from gptq_helpers import (  # noqa: E402
    TEST_TEXT,
    adapted_model,
    calibration_rows,
    knows,
    log_probs,
    mean_kl,
    merged_model,
    nf4_base,
    text_ids,
    trained_adapter,
    write_jsonl,
)
from models import smollm2_checkpoint  # noqa: E402

import adapterops  # noqa: E402

ROUTES = {
    "(b) bf16": {"dtype": "bf16"},
    "(c) nearest": {},
    "(d) gptq": {"rounding": "gptq"},
    "(e) gptq+calib": {"rounding": "gptq", "calibration": True},
}


def _median(values):
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def run(work: Path) -> list[dict]:
    from transformers import AutoTokenizer

    base = nf4_base(smollm2_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(base)
    adapter = trained_adapter(base, tokenizer)
    calibration = write_jsonl(work / "calibration.jsonl", calibration_rows())
    ids = text_ids(tokenizer, TEST_TEXT)
    reference = adapted_model(base, adapter)
    ref_lp = log_probs(reference, ids)
    results = [{"route": "(a) unmerged", "kl": 0.0, "knows": knows(reference, tokenizer)}]
    for route, options in ROUTES.items():
        options = dict(options)
        if options.pop("calibration", False):
            options["calibration"] = calibration
        out = work / route.split()[0].strip("()")
        start = time.perf_counter()
        report = adapterops.merge(base, adapter, out, progress=False, **options).to_dict()
        seconds = time.perf_counter() - start
        model = merged_model(out)
        rows = report["rows"]
        results.append({
            "route": route, "kl": mean_kl(ref_lp, log_probs(model, ids)), "knows": knows(model, tokenizer),
            "output_error": _median(r.get("output_error") for r in rows),
            "output_error_nearest": _median(r.get("output_error_nearest") for r in rows),
            "retained": _median(r.get("retained") for r in rows), "codes_changed": _median(r.get("codes_changed") for r in rows),
            "seconds": seconds,
        })
    return results


def print_results(results: list[dict]) -> None:
    nearest = next(r["kl"] for r in results if r["route"] == "(c) nearest")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"{'route':<16} {'KL from (a)':>12} {'of (c)':>7} {'planted':>8} {'out. error':>10} {'retained':>9} {'codes chg':>9} {'merge s':>8}")
    for r in results:
        share = r["kl"] / nearest if nearest else None
        print(f"{r['route']:<16} {r['kl']:>12.3g} {fmt(share, '>7.1%')} {'yes' if r['knows'] else 'no':>8} "
              f"{fmt(r.get('output_error'), '>10.3f')} {fmt(r.get('retained'), '>9.3f')} {fmt(r.get('codes_changed'), '>9.4f')} {fmt(r.get('seconds'), '>8.1f')}")


LLAMA_7B = {"q/k/v/o_proj": ((4096, 4096), 4 * 32), "gate/up_proj": ((11008, 4096), 2 * 32), "down_proj": ((4096, 11008), 32)}


def kernel(device: str, batch: int = 8) -> list[dict]:
    """Seconds per batch of ``batch`` equal-shape layers, nearest and GPTQ, on ``device``."""
    from adapterops.quant import quantize_nf4_many
    from adapterops.quant.gptq import quantize_gptq_many

    def timed(fn):
        fn()  # warm-up (kernels, tables)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    results = []
    g = torch.Generator(device=device).manual_seed(0)
    for name, ((out, inp), count) in LLAMA_7B.items():
        W = torch.randn(batch, out, inp, device=device, generator=g) * 0.02
        X = torch.randn(batch, inp, 512, device=device, generator=g) * torch.linspace(0.1, 3, inp, device=device)[:, None]
        H = X @ X.mT  # (batch, in, in)
        near = quantize_nf4_many(W)
        t_near = timed(lambda: quantize_nf4_many(W))
        t_gptq = timed(lambda: quantize_gptq_many(W, H, like=near))
        results.append({"layers": name, "shape": f"{out}x{inp}", "count": count, "nearest_s": t_near, "gptq_s": t_gptq,
                        "gptq_model_s": t_gptq * count / batch})
        del W, X, H, near
    return results


def print_kernel(results: list[dict], device: str) -> None:
    print(f"rounding into NF4 on {device}, batches of 8 layers (Llama-2-7B shapes)")
    print(f"{'layers':<14} {'shape':>11} {'count':>6} {'nearest s':>10} {'gptq s':>8} {'ratio':>7} {'gptq, all of them s':>20}")
    for r in results:
        print(f"{r['layers']:<14} {r['shape']:>11} {r['count']:>6} {r['nearest_s']:>10.4f} {r['gptq_s']:>8.3f} "
              f"{r['gptq_s'] / r['nearest_s']:>6.0f}x {r['gptq_model_s']:>20.1f}")
    print(f"GPTQ for all {sum(r['count'] for r in results)} linears: {sum(r['gptq_model_s'] for r in results):.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--keep", type=Path, help="Write the merged checkpoints here (kept).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    parser.add_argument("--kernel", action="store_true", help="Time the rounding alone on Llama-2-7B shapes.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="For --kernel.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kernel:
        results = kernel(args.device)
        print_kernel(results, args.device)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        results = run(args.keep)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = run(Path(tmp))
    print_results(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
