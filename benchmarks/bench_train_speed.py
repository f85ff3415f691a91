"""LoRA training speed on real-data shapes: adapterops against PEFT and Liger-Kernel, one table.

Same random Llama-shaped model (TinyLlama-1.1B shapes: hidden 2048, 22 layers, 32 heads, 4 KV
heads, vocab 32000, bf16), the same data, rank 16 on all linear layers, AdamW, for every row.
Two data shapes:

  fixed   8 x 1024 random tokens a step
  mix     a realistic length mix: N lengths drawn once from a log-normal (median 300, sigma 1),
          capped at 4096, the same sample in the same order for every row. Padded rows take 8
          examples a step, right-padded to the longest; adapterops packs them into rows of 4096
          (2 rows a step), each example attending only to itself.

Only real tokens count (padding never does). Rows:

  peft              get_peft_model + a plain loop (bf16 model, PEFT's float32 adapters)
  peft+autocast     the same inside torch.autocast(bf16)
  peft+packed       mix only: the same, packed like adapterops, through transformers' own
                    packed-sequence masks (position ids, no attention mask)
  liger             apply_liger_kernel_to_llama() (RMSNorm, SwiGLU, RoPE, fused linear cross
                    entropy) + get_peft_model + autocast
  adapterops        add_lora + train_lora (compiled decoder layers, fused head + loss; packing
                    with flash varlen attention on the mix)
  adapterops+fuse   fixed only: the same with fuse=True (q/k/v and gate/up as one GEMM each)

Useful FLOP/s counts what the examples need, per token and layer: 4 x the frozen linear weights
(forward and input gradient) plus 6 r (in + out) for each LoRA layer, and 6 l^2 d_model per layer
for causal attention over an example of l tokens (forward 2, backward 4); the output head as a
linear weight. The bf16 peak is measured in the same run (an 8192^3 matmul).

    python benchmarks/bench_train_speed.py                      # on cuda
    python benchmarks/bench_train_speed.py --small              # a small config on the CPU
    python benchmarks/bench_train_speed.py --json out.json --impls peft,adapterops
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext

import torch

from _harness import describe_device

IMPLS = ["peft", "peft+autocast", "peft+packed", "liger", "adapterops", "adapterops+fuse"]
ONLY = {"peft+packed": {"mix"}, "adapterops+fuse": {"fixed"}}
# Rows that share a process (imports and warm caches paid once; each row its own model and peak):
# the most telling first, so a cut-short run still has them. Liger patches transformers: alone.
PROCESSES = [["adapterops"], ["peft", "peft+autocast", "peft+packed"], ["liger"], ["adapterops+fuse"]]
BIG = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, batch=8, seq=1024,
           median=300, cap=4096, examples=384, device="cuda", dtype="bf16", steps=8)
SMALL = dict(hidden=128, intermediate=344, layers=2, heads=4, kv_heads=2, vocab=1024, batch=4, seq=64,
             median=24, cap=128, examples=48, device="cpu", dtype="fp32", steps=3)
WARMUP = 2  # steps left out of every row's timing (compiling, autotuning, allocator growth)


def build_model(cfg: dict, impl: str):
    if impl == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
        max_position_embeddings=max(4096, cfg["cap"]), tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype({"bf16": torch.bfloat16, "fp32": torch.float32}[cfg["dtype"]])
    try:
        with torch.device(cfg["device"]):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if impl.startswith("adapterops"):
        from adapterops.train import add_lora

        add_lora(model, targets="all-linear", rank=cfg["rank"], seed=0)
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=cfg["rank"], lora_alpha=cfg["rank"], target_modules="all-linear"))
    return model


def examples(cfg: dict, shape: str) -> list[dict]:
    """The data of one shape, the same for every row."""
    g = torch.Generator().manual_seed(1)
    if shape == "fixed":
        n, lengths = cfg["batch"] * (WARMUP + cfg["steps"]), None
        lengths = [cfg["seq"]] * n
    else:
        normal = torch.randn(cfg["examples"], generator=g, dtype=torch.float64)
        lengths = [int(min(cfg["cap"], max(2, round(cfg["median"] * math.exp(z))))) for z in normal.tolist()]
    return [{"input_ids": torch.randint(0, cfg["vocab"], (n,), generator=g).tolist()} for n in lengths]


def useful_flops(cfg: dict, model_lengths: list[int]) -> float:
    """FLOPs the examples of these lengths need (see the module docstring)."""
    h, i, L, r, v = cfg["hidden"], cfg["intermediate"], cfg["layers"], cfg["rank"], cfg["vocab"]
    kv = h * cfg["kv_heads"] // cfg["heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down: (in, out)
    frozen = L * sum(a * b for a, b in shapes) + h * v
    lora = L * sum(6 * r * (a + b) for a, b in shapes)
    tokens = sum(model_lengths)
    return tokens * (4 * frozen + lora) + sum(6 * n * n * h * L for n in model_lengths)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_padded(cfg: dict, impl: str, data: list[dict], packed: bool) -> tuple[list[float], list[int]]:
    """The plain loop of the PEFT / Liger rows: step times and real tokens of each step."""
    from adapterops.train import collate, pack

    device = torch.device(cfg["device"])
    model = build_model(cfg, impl).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    autocast = impl != "peft" and device.type == "cuda"
    data = [{**e, "labels": e["input_ids"]} for e in data]
    if packed:
        rows = pack(data, cfg["cap"])
        batches = [collate(rows[j:j + 2], pad_to=cfg["cap"]) for j in range(0, len(rows) - 1, 2)]
    else:
        batches = [collate(data[j:j + cfg["batch"]]) for j in range(0, len(data), cfg["batch"])]
    times, tokens = [], []
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        inputs = {"input_ids": b["input_ids"], "labels": b["labels"]}
        inputs.update({"position_ids": b["position_ids"]} if packed else {"attention_mask": b["attention_mask"]})
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext():
            loss = model(**inputs, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        tokens.append(int(b["attention_mask"].sum()))
    return times, tokens


def run_adapterops(cfg: dict, impl: str, data: list[dict], shape: str) -> tuple[list[float], list[int], dict]:
    from adapterops.train import train_lora

    device = torch.device(cfg["device"])
    model = build_model(cfg, impl)
    mix = shape == "mix"
    marks, seen = [], [0]

    def tick(info):
        sync(device)
        marks.append(time.perf_counter())
        seen.append(info["tokens"])

    options = dict(lr=1e-4, max_grad_norm=None, seed=0, callback=tick, fuse=impl == "adapterops+fuse")
    if mix:
        from adapterops.train import pack

        rows = len(pack([{**e, "labels": e["input_ids"]} for e in data], cfg["cap"]))
        options.update(packing=True, max_len=cfg["cap"], batch_size=2, steps=rows // 2)  # whole batches: one shape
    else:
        options.update(batch_size=cfg["batch"], steps=len(data) // cfg["batch"])
    sync(device)
    marks.append(time.perf_counter())
    result = train_lora(model, data, **options)
    times = [b - a for a, b in zip(marks, marks[1:])]
    tokens = [b - a for a, b in zip(seen, seen[1:])]
    return times, tokens, {"reported_tokens_per_s": result.tokens_per_second, "reported_warmup_s": result.warmup_seconds}


def run_one(cfg: dict, impl: str, shape: str) -> dict:
    import gc
    import warnings

    device = torch.device(cfg["device"])
    data = examples(cfg, shape)
    gc.collect()
    torch.compiler.reset()  # a fresh compile for each row: static shapes, as a run of its own would have
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    extra: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if impl.startswith("adapterops"):
            times, tokens, extra = run_adapterops(cfg, impl, data, shape)
        else:
            times, tokens = run_padded(cfg, impl, data, packed=impl == "peft+packed")
    notes = sorted({str(w.message)[:160] for w in caught if "adapterops" in (w.filename or "") or "compile" in str(w.message)})
    if notes:
        extra["warnings"] = notes
    if len(times) <= WARMUP:
        raise RuntimeError(f"only {len(times)} steps, none timed after {WARMUP} warm-up steps; use more --examples")
    seconds, real = sum(times[WARMUP:]), sum(tokens[WARMUP:])
    # the examples of the timed steps, for the useful FLOPs: their share of the whole sample's tokens
    lengths = [len(e["input_ids"]) for e in data]
    flops = useful_flops(cfg, lengths) * real / sum(lengths)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    return {"impl": impl, "data": shape, "tokens_per_s": real / seconds, "tflops": flops / seconds / 1e12,
            "peak_gb": peak, "steps": len(times), "timed_tokens": real, **extra}


def measure_peak(device: str) -> float:
    """bf16 matmul TFLOP/s on random 8192^3 operands: mean of 10 after 3 warm-ups."""
    if not device.startswith("cuda"):
        return float("nan")
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def check_packing(device: str) -> dict:
    """Packed loss and gradients against the examples one by one, on this device's attention path."""
    from adapterops.train import add_lora, collate, pack
    from adapterops.train.attention import packed_attention, varlen_kernel_available
    from adapterops.train.loss import loss_fn
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    handle = add_lora(model, rank=8, seed=0)
    for layer in handle.modules.values():
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    g = torch.Generator().manual_seed(2)
    data = [{"input_ids": (ids := torch.randint(0, 512, (n,), generator=g).tolist()), "labels": ids} for n in (37, 200, 64, 111, 9)]
    compute = loss_fn(model)

    def run(batches):
        model.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            total = sum(compute({k: v.to(device) for k, v in b.items()}, 1.0) for b in batches)
        total.backward()
        return float(total), torch.cat([torch.cat([m.lora_A.grad.flatten(), m.lora_B.grad.flatten()]) for m in handle.modules.values()])

    ref_loss, ref_grad = run([collate([e]) for e in data])
    with packed_attention(model, enabled=varlen_kernel_available(torch.device(device), torch.bfloat16)) as varlen:
        loss, grad = run([collate(pack(data, 256), pad_to=256)])
    return {"varlen_kernel": varlen, "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss),
            "grad_rel_diff": float((grad - ref_grad).norm() / ref_grad.norm())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="A small model on the CPU (default: the 1.1B config on cuda).")
    ap.add_argument("--impls", default=None, help=f"Comma-separated subset of {','.join(IMPLS)} (default: all there can run).")
    ap.add_argument("--data", default="fixed,mix", help="Comma-separated subset of fixed,mix.")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="Timed steps of the fixed shape.")
    ap.add_argument("--examples", type=int, default=None, help="Examples in the mix.")
    ap.add_argument("--timeout", type=int, default=150, help="Seconds a row may take.")
    ap.add_argument("--json", dest="json_path", help="Also write the results here (rewritten after every row).")
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._one:  # a child: its rows in turn, a JSON line each
        cfg = json.loads(args._one)
        for impl, shape in cfg.pop("jobs"):
            try:
                row = run_one(cfg, impl, shape)
            except Exception as exc:  # report, do not crash the table
                row = {"impl": impl, "data": shape, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print("RESULT " + json.dumps(row), flush=True)
        return

    cfg = dict(SMALL if args.small else BIG)
    cfg.update(rank=args.rank)
    for key in ("steps", "examples"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here; use --small")
    on_cpu = cfg["device"] == "cpu"
    impls = args.impls.split(",") if args.impls else [i for i in IMPLS if not (on_cpu and i in ("liger", "peft+autocast"))]
    report = {"config": cfg, "device": describe_device(cfg["device"]), "peak_tflops": measure_peak(cfg["device"]),
              "packing_check": check_packing(cfg["device"]), "rows": []}
    print(f"bf16 peak {report['peak_tflops']:.0f} TFLOP/s; packing check {report['packing_check']}", file=sys.stderr, flush=True)
    for group in PROCESSES:
        jobs = [(impl, shape) for impl in group if impl in impls for shape in args.data.split(",") if shape in ONLY.get(impl, {shape})]
        if not jobs:
            continue
        child = json.dumps({**cfg, "jobs": jobs})
        proc = subprocess.Popen([sys.executable, __file__, "--_one", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=os.environ)
        try:
            stdout, stderr = proc.communicate(timeout=args.timeout * len(jobs))
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr += f"\nover {args.timeout * len(jobs)} s"
        rows = [json.loads(x[7:]) for x in stdout.splitlines() if x.startswith("RESULT ")]
        last = (stderr.strip().splitlines() or ["failed"])[-1][:300]
        rows += [{"impl": i, "data": d, "error": last} for i, d in jobs[len(rows):]]
        for row in rows:
            report["rows"].append(row)
            print(_line(row, report["peak_tflops"]), file=sys.stderr, flush=True)
        if args.json_path:
            with open(args.json_path, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
    print(_table(report))


def _line(r: dict, peak: float) -> str:
    if "error" in r:
        return f"{r['data']:<6} {r['impl']:<18} error: {r['error']}"
    return f"{r['data']:<6} {r['impl']:<18} {r['tokens_per_s']:>9,.0f} tok/s  {r['tflops']:6.1f} TFLOP/s  {r['peak_gb']:6.2f} GB"


def _table(report: dict) -> str:
    cfg, peak, rows = report["config"], report["peak_tflops"], report["rows"]
    head = (f"Llama h={cfg['hidden']} L={cfg['layers']} heads {cfg['heads']}/{cfg['kv_heads']} V={cfg['vocab']}, "
            f"all-linear r={cfg['rank']}, {cfg['dtype']}, {report['device']}; bf16 peak {peak:.0f} TFLOP/s")
    lines = [head, "", f"| data | impl | real tokens/s | x best peft | x best liger | useful TFLOP/s | of peak | peak GB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for shape in ("fixed", "mix"):
        ok = [r for r in rows if r["data"] == shape and "error" not in r]
        best = {k: max((r["tokens_per_s"] for r in ok if r["impl"].startswith(k)), default=None) for k in ("peft", "liger")}
        for r in (r for r in rows if r["data"] == shape):
            if "error" in r:
                lines.append(f"| {shape} | {r['impl']} | n/a: {r['error']} | | | | | |")
                continue
            ratio = {k: f"{r['tokens_per_s'] / b:.2f}x" if b else "-" for k, b in best.items()}
            frac = f"{r['tflops'] / peak:.0%}" if peak == peak else "-"
            mem = "-" if r["peak_gb"] != r["peak_gb"] else f"{r['peak_gb']:.1f}"
            lines.append(f"| {shape} | {r['impl']} | {r['tokens_per_s']:,.0f} | {ratio['peft']} | {ratio['liger']} | "
                         f"{r['tflops']:.1f} | {frac} | {mem} |")
    check = report["packing_check"]
    lines.append("")
    lines.append(f"packed vs one by one ({'flash varlen' if check['varlen_kernel'] else 'sdpa masks'}, bf16): "
                 f"loss rel. diff {check['loss_rel_diff']:.1e}, gradient rel. diff {check['grad_rel_diff']:.1e}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
