"""LoRA / QLoRA training throughput and peak memory: adapterops against PEFT with a plain loop.

Same random Llama-shaped model, data, batch, sequence length, rank and targets (all-linear) for
every row; AdamW; each configuration runs in its own process so peak memory is its own.

Rows per mode (lora, lora + gradient checkpointing, qlora):
  peft             get_peft_model + a plain loop (bf16 model, PEFT's default float32 adapters)
  peft+autocast    the same inside torch.autocast(bf16)
  adapterops-loop  add_lora + the same plain loop (the layers alone)
  adapterops       add_lora + train_lora (its own loop: fused head + loss, bf16 autocast on CUDA)
  adapterops+compile  the same with train_lora(compile=True) (torch.compile of the decoder layers;
                     what train_lora does by default on CUDA; the adapterops row passes compile=False)

    python benchmarks/bench_train.py                    # the 1.1B config on cuda
    python benchmarks/bench_train.py --small            # a small config on cpu, a minute or two
    python benchmarks/bench_train.py --small --json out.json

tokens/s counts input tokens over the timed steps (after warm-up); peak memory is
torch.cuda.max_memory_allocated on CUDA (weights included), the process's max RSS on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

from _harness import describe_device

IMPLS = ["peft", "peft+autocast", "adapterops-loop", "adapterops", "adapterops+compile"]
MODES = ["lora", "lora-gc", "qlora"]
BIG = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, batch=8, seq=1024, device="cuda", dtype="bf16")
SMALL = dict(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=2, vocab=8192, batch=4, seq=128, device="cpu", dtype="fp32")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def build_model(cfg: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
        max_position_embeddings=max(2048, cfg["seq"]), tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = DTYPES[cfg["dtype"]]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(cfg["device"]):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model


def peft_qlora_model(cfg: dict, model):
    """The same weights as a bitsandbytes 4-bit model (through a save and a quantized load)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tmp = tempfile.mkdtemp(prefix="bench-train-")
    model.save_pretrained(tmp)
    del model
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=DTYPES[cfg["dtype"]])
    return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=DTYPES[cfg["dtype"]],
                                                device_map={"": cfg["device"]})


def prepare(cfg: dict, impl: str, mode: str):
    """The model of one row, LoRA attached (and gradient checkpointing on for lora-gc)."""
    model = build_model(cfg)
    if impl.startswith("peft"):
        import peft

        if mode == "qlora":
            model = peft_qlora_model(cfg, model)
        config = peft.LoraConfig(r=cfg["rank"], lora_alpha=cfg["rank"], target_modules="all-linear", lora_dropout=0.0)
        model = peft.get_peft_model(model, config)
    else:
        from adapterops.train import add_lora

        add_lora(model, targets="all-linear", rank=cfg["rank"], quantize="nf4" if mode == "qlora" else None, seed=0)
    if mode == "lora-gc":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def batch(cfg: dict) -> torch.Tensor:
    return torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=torch.Generator().manual_seed(1))


def plain_step(cfg: dict, impl: str, model, opt, ids, mask) -> None:
    """One step of the plain loop every non-train_lora row uses."""
    device = ids.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if impl == "peft+autocast" else nullcontext()
    with autocast:
        loss = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_one(cfg: dict, impl: str, mode: str) -> dict:
    device = torch.device(cfg["device"])
    cuda = device.type == "cuda"
    model = prepare(cfg, impl, mode)
    gc = mode == "lora-gc"
    params = [p for p in model.parameters() if p.requires_grad]
    ids = batch(cfg)
    tokens_per_step = ids.numel()
    total = cfg["warmup"] + cfg["steps"]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []

    if impl.startswith("adapterops") and impl != "adapterops-loop":
        from adapterops.train import train_lora

        data = [{"input_ids": row.tolist()} for row in ids]
        marks = [time.perf_counter()]

        def tick(info):
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        train_lora(model, data * total, lr=1e-4, steps=total, batch_size=cfg["batch"], max_grad_norm=None,
                   gradient_checkpointing=gc, seed=0, callback=tick, compile=impl.endswith("+compile"))
        times = [b - a for a, b in zip(marks, marks[1:])]
    else:
        ids, mask = ids.to(device), torch.ones_like(ids).to(device)
        opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if cuda else {}))
        model.train()
        for _ in range(total):
            t0 = time.perf_counter()
            plain_step(cfg, impl, model, opt, ids, mask)
            times.append(time.perf_counter() - t0)
    timed = times[cfg["warmup"]:]
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 1e9
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
    return {
        "impl": impl, "mode": mode, "tokens_per_s": tokens_per_step * len(timed) / sum(timed),
        "step_s": sum(timed) / len(timed), "peak_gb": peak, "trainable": sum(p.numel() for p in params),
    }


def interleaved(cfg: dict, impls: list[str], mode: str, rounds: int) -> list[dict]:
    """All plain-loop rows in one process, one step each in turn, ``rounds`` times: the median
    step time of each. On a busy shared CPU this cancels most of the drift between rows."""
    device = torch.device(cfg["device"])
    ids = batch(cfg).to(device)
    mask = torch.ones_like(ids)
    runs = {}
    for impl in impls:
        model = prepare(cfg, impl, mode).train()
        params = [p for p in model.parameters() if p.requires_grad]
        runs[impl] = (model, torch.optim.AdamW(params, lr=1e-4))
    times = {impl: [] for impl in impls}
    for r in range(cfg["warmup"] + rounds):
        for impl, (model, opt) in runs.items():
            t0 = time.perf_counter()
            plain_step(cfg, impl, model, opt, ids, mask)
            if r >= cfg["warmup"]:
                times[impl].append(time.perf_counter() - t0)
    rows = []
    for impl, ts in times.items():
        median = sorted(ts)[len(ts) // 2]
        rows.append({"impl": impl, "mode": mode, "tokens_per_s": ids.numel() / median, "step_s": median, "peak_gb": float("nan")})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="A small model on the CPU (default: the 1.1B config on cuda).")
    ap.add_argument("--device", help="torch device (default: cuda for the big config, cpu for --small).")
    ap.add_argument("--dtype", choices=list(DTYPES), help="Base weights dtype (default: bf16 big, fp32 small).")
    for key in ("hidden", "intermediate", "layers", "vocab", "batch", "seq"):
        ap.add_argument(f"--{key}", type=int)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="Timed steps (default: 10 big, 5 small).")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES), help=f"Comma-separated subset of {','.join(MODES)}.")
    ap.add_argument("--impls", default=None, help=f"Comma-separated subset of {','.join(IMPLS)} (default: all; on the CPU without peft+autocast and adapterops+compile).")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU.")
    ap.add_argument("--interleave", type=int, metavar="ROUNDS", default=None,
                    help="Plain-loop rows only, in one process, a step of each in turn, ROUNDS times; median step "
                         "times, no memory column. Steadier on a busy CPU.")
    ap.add_argument("--json", dest="json_path", help="Also write the results here.")
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._one:  # a child process: one configuration, one JSON line
        cfg = json.loads(args._one)
        if cfg.get("threads"):
            torch.set_num_threads(cfg["threads"])
        try:
            row = run_one(cfg, cfg["impl"], cfg["mode"])
        except Exception as exc:  # report, do not crash the table (e.g. no bitsandbytes kernels here)
            row = {"impl": cfg["impl"], "mode": cfg["mode"], "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        print("RESULT " + json.dumps(row))
        return

    cfg = dict(SMALL if args.small else BIG)
    for key in ("hidden", "intermediate", "layers", "vocab", "batch", "seq", "device", "dtype"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg.update(rank=args.rank, warmup=args.warmup, steps=args.steps or (5 if args.small else 10), threads=args.threads)
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here; use --small (or --device cpu)")
    on_cpu = cfg["device"] == "cpu"
    impls = args.impls.split(",") if args.impls else [i for i in IMPLS if not (on_cpu and i in ("peft+autocast", "adapterops+compile"))]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    rows = []
    if args.interleave:
        for mode in args.modes.split(","):
            rows += interleaved(cfg, [i for i in impls if i == "adapterops-loop" or i.startswith("peft")], mode, args.interleave)
        impls = []
    for mode in args.modes.split(","):
        for impl in impls:
            child = json.dumps({**cfg, "impl": impl, "mode": mode})
            out = subprocess.run([sys.executable, __file__, "--_one", child], capture_output=True, text=True, env=os.environ)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            row = json.loads(line[7:]) if line else {"impl": impl, "mode": mode, "error": (out.stderr.strip().splitlines() or ["failed"])[-1][:200]}
            rows.append(row)
            print(_format(row), file=sys.stderr, flush=True)
    _ratios(rows)
    print(_table(cfg, rows))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump({"config": cfg, "device_name": describe_device(cfg["device"]), "rows": rows}, f, indent=2)


def _ratios(rows: list[dict]) -> None:
    """Each row's tokens/s and memory relative to the better PEFT row of its mode."""
    for mode in {r["mode"] for r in rows}:
        peft = [r for r in rows if r["mode"] == mode and r["impl"].startswith("peft") and "error" not in r]
        if not peft:
            continue
        best = max(peft, key=lambda r: r["tokens_per_s"])
        for r in rows:
            if r["mode"] == mode and "error" not in r:
                r["speed_vs_peft"] = r["tokens_per_s"] / best["tokens_per_s"]
                if r["peak_gb"] == r["peak_gb"]:  # not NaN
                    r["memory_vs_peft"] = r["peak_gb"] / best["peak_gb"]


def _format(r: dict) -> str:
    if "error" in r:
        return f"{r['mode']:<8} {r['impl']:<19} error: {r['error']}"
    return f"{r['mode']:<8} {r['impl']:<19} {r['tokens_per_s']:>10,.0f} tok/s  {r['peak_gb']:6.2f} GB"


def _table(cfg: dict, rows: list[dict]) -> str:
    memory = "peak GB (cuda allocated)" if cfg["device"].startswith("cuda") else "peak GB (max RSS)"
    head = (f"Llama-shaped h={cfg['hidden']} i={cfg['intermediate']} L={cfg['layers']} V={cfg['vocab']}, "
            f"batch {cfg['batch']} x {cfg['seq']}, all-linear r={cfg['rank']}, {cfg['dtype']}, {describe_device(cfg['device'])}")
    lines = [head, "", f"{'mode':<8} {'impl':<19} {'tokens/s':>10} {'x best peft':>11} {memory:>26} {'x best peft':>11}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['mode']:<8} {r['impl']:<19} n/a ({r['error']})")
            continue
        speed = f"{r['speed_vs_peft']:.2f}x" if "speed_vs_peft" in r else "-"
        mem = f"{r['memory_vs_peft']:.2f}x" if "memory_vs_peft" in r else "-"
        peak = "-" if r["peak_gb"] != r["peak_gb"] else f"{r['peak_gb']:.2f}"
        lines.append(f"{r['mode']:<8} {r['impl']:<19} {r['tokens_per_s']:>10,.0f} {speed:>11} {peak:>26} {mem:>11}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
