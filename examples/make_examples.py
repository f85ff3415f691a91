"""Write the two small example adapters that ship in examples/: code.st and math.st.

Both are synthetic LoRA adapters for SmolLM2-135M (hidden size 576, 3 key/value heads of 64):
``q_proj`` (576 x 576) and ``v_proj`` (192 x 576) of layers 0-3, bf16, so they also merge into that
model. Their singular values decay like a trained adapter's, and the two share part of their
row space, so blending and re-compressing them does something visible. Same bytes on every run.

    python examples/make_examples.py [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from adapterops import Adapter, LoraLayer

HIDDEN, KV = 576, 192
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
MODULES = {f"model.layers.{i}.self_attn.{m}": (HIDDEN if m == "q_proj" else KV, HIDDEN) for i in range(4) for m in ("q_proj", "v_proj")}


def example(seed: int, *, rank: int, alpha: float, shared: dict[str, torch.Tensor], note: str) -> Adapter:
    """A rank-``rank`` adapter whose A rows half come from ``shared`` (a common input subspace)."""
    g = torch.Generator().manual_seed(seed)
    decay = 0.6 ** torch.arange(rank, dtype=torch.float32)  # (r,) singular-value profile
    layers = {}
    for name, (out, inn) in MODULES.items():
        own = torch.randn(rank - rank // 2, inn, generator=g)
        A = torch.cat([shared[name][: rank // 2], own]) / inn**0.5  # (r, in)
        B = torch.randn(out, rank, generator=g) * 0.02 * decay  # (out, r)
        layers[name] = LoraLayer(A.to(torch.bfloat16), B.to(torch.bfloat16), alpha)
    return Adapter(layers, {"base_model": BASE, "task_type": "CAUSAL_LM", "notes": note})


def make(out: Path) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    shared = {name: torch.randn(8, inn, generator=g) for name, (_, inn) in MODULES.items()}
    adapters = {
        "code.st": example(1, rank=8, alpha=16, shared=shared, note="synthetic example adapter 'code' (examples/make_examples.py)"),
        "math.st": example(2, rank=8, alpha=8, shared=shared, note="synthetic example adapter 'math' (examples/make_examples.py)"),
    }
    paths = []
    for filename, adapter in adapters.items():
        adapter.save(out / filename, format="native", force=True)
        paths.append(out / filename)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="directory to write into (default: examples/)")
    args = parser.parse_args()
    for path in make(args.out):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
