"""Every PEFT directory adapterops writes loads in the loaders users call, on SmolLM2-135M (float32):
``AutoPeftModelForCausalLM.from_pretrained(out)`` (which finds the base through the config alone)
and transformers' ``model.load_adapter(out)``. No layer missing or unexpected, the loaded factors
the ones written, and logits equal to the base's with each layer's dense delta added.
"""

import json
import math

import pytest
import torch
from click.testing import CliRunner

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import adapterops as ao  # noqa: E402
from adapterops import Adapter, LoraLayer  # noqa: E402
from adapterops.cli import main  # noqa: E402
from adapterops.targets import PEFT_TASK_TYPES, check  # noqa: E402

PREFIX = "base_model.model."
PLAN = [  # (module, rank, alpha): mixed ranks and scales
    ("model.layers.0.self_attn.q_proj", 8, 16.0),
    ("model.layers.0.self_attn.v_proj", 4, 3.5),
    ("model.layers.1.mlp.up_proj", 12, 12.0),
    ("model.layers.2.mlp.down_proj", 2, 8.0),
]


@pytest.fixture(scope="module")
def base(smollm2_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 49152, (1, 8), generator=torch.Generator().manual_seed(0))


def make(base, smollm2_dir, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, r, alpha in PLAN:
        out, inp = base.get_submodule(name).weight.shape
        layers[name] = LoraLayer(torch.randn(r, inp, generator=g) / math.sqrt(inp), torch.randn(out, r, generator=g) * 0.02, alpha)
    return Adapter(layers, {"base_model": str(smollm2_dir)})  # no task_type: the writer finds it in the base's config.json


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def outputs(base, smollm2_dir, tmp_path_factory):
    """One PEFT directory per writer, and the adapter each is meant to hold (None: as it loads)."""
    d = tmp_path_factory.mktemp("writers")
    a, b = make(base, smollm2_dir, 1), make(base, smollm2_dir, 2)
    a.save(d / "a.st")
    b.save(d / "b.st")
    run("convert", d / "a.st", "--to", "peft", "-o", d / "native-peft")
    run("blend", d / "a.st", d / "b.st", "--weights", "0.7,-0.4", "-o", d / "blend")
    run("compress", d / "a.st", "--energy", "0.9", "-o", d / "compress")
    run("convert", d / "a.st", "--to", "kohya", "-o", d / "a.safetensors")
    run("convert", d / "a.safetensors", "--to", "peft", "-o", d / "kohya-peft")
    run("blend", d / "a.st", d / "b.st", "--weights", "1,1", "-o", d / "wide.st")  # rank 24 on up_proj: over vLLM's 16
    run("convert", d / "wide.st", "--to", "peft", "--target", "vllm", "-o", d / "vllm")
    return {
        "native->peft": (d / "native-peft", a),
        "blend": (d / "blend", 0.7 * a - 0.4 * b),
        "compress": (d / "compress", None),
        "kohya round trip": (d / "kohya-peft", a),
        "convert --target vllm": (d / "vllm", None),
    }


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def reference_logits(base, tokens, adapter: Adapter) -> torch.Tensor:
    """Base logits with each layer's float64 ``alpha / r * B @ A`` added to its weight, restored after."""
    saved = {n: base.get_submodule(n).weight.detach().clone() for n in adapter}
    try:
        with torch.no_grad():
            for n, layer in adapter.items():
                base.get_submodule(n).weight.add_(((layer.alpha / layer.rank) * layer.B.double() @ layer.A.double()).float())
        return logits(base, tokens)
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                base.get_submodule(n).weight.copy_(w)


def loaded_factors(model, adapter_name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module: (A, B, scaling)}`` of every LoRA layer the loader created."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and adapter_name in module.lora_A:
            out[name.removeprefix(PREFIX)] = (module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight, module.scaling[adapter_name])
    return out


def assert_loaded_exactly(model, adapter_name: str, adapter: Adapter) -> None:
    got = loaded_factors(model, adapter_name)
    assert sorted(got) == sorted(adapter), "missing or unexpected layers"
    for n, (A, B, scaling) in got.items():
        torch.testing.assert_close(A, adapter[n].A.float(), rtol=0, atol=0)
        torch.testing.assert_close(B, adapter[n].B.float(), rtol=0, atol=0)
        assert scaling == pytest.approx(adapter[n].scale, rel=1e-12)


def assert_logits_close(got, want):
    torch.testing.assert_close(got, want, atol=2e-5 * float(want.abs().max()), rtol=1e-4)


WRITERS = ["native->peft", "blend", "compress", "kohya round trip", "convert --target vllm"]


@pytest.mark.parametrize("writer", ["native->peft", "convert --target vllm"])  # each loads the whole base again
def test_auto_peft_model_loads_it_from_the_config_alone(outputs, base, tokens, smollm2_dir, writer):
    out, meant = outputs[writer]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(smollm2_dir.resolve())
    written = ao.load(out)
    if meant is not None:
        for n in meant:
            torch.testing.assert_close(written.delta(n), meant.delta(n), atol=1e-6, rtol=1e-5)
    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert_loaded_exactly(model, "default", written)
    assert_logits_close(logits(model, tokens), reference_logits(base, tokens, written))


@pytest.mark.parametrize("writer", WRITERS)
def test_transformers_load_adapter_loads_it(outputs, base, tokens, writer):
    out, _ = outputs[writer]
    written = ao.load(out)
    want = reference_logits(base, tokens, written)
    name = writer.replace(" ", "_").replace(">", "").replace("-", "_")
    base.load_adapter(str(out), adapter_name=name)
    try:
        base.set_adapter(name)
        assert_loaded_exactly(base, name, written)
        got = logits(base, tokens)
    finally:
        base.delete_adapter(name)
    assert not loaded_factors(base, name)
    assert_logits_close(got, want)


def test_convert_target_vllm_output_fits_vllm(outputs):
    out, _ = outputs["convert --target vllm"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert max([config["r"], *config["rank_pattern"].values()]) <= 16
    assert config["lora_alpha"] == config["r"] and all(config["alpha_pattern"][k] == v for k, v in config["rank_pattern"].items())
    assert check(out, "vllm").ok


Q, UP = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"


def test_written_config_is_a_valid_peft_lora_config(tmp_path):
    """Every field written is one of LoraConfig's, and those left at PEFT's defaults equal them."""
    layers = {Q: LoraLayer(torch.randn(4, 12), torch.randn(16, 4), 8.0), UP: LoraLayer(torch.randn(2, 12), torch.randn(20, 2), 3.0)}
    Adapter(layers, {"task_type": "CAUSAL_LM", "base_model": "org/base"}).save(tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    fields = set(peft.LoraConfig().to_dict())
    assert set(config) <= fields, set(config) - fields
    loaded = peft.LoraConfig.from_pretrained(tmp_path / "p")
    assert loaded.task_type == "CAUSAL_LM" and loaded.base_model_name_or_path == "org/base"
    defaults = peft.LoraConfig().to_dict()
    for key in ("use_rslora", "fan_in_fan_out", "lora_dropout", "bias", "init_lora_weights", "modules_to_save"):
        assert config[key] == defaults[key], key
    assert set(PEFT_TASK_TYPES) == {t.value for t in peft.TaskType}
