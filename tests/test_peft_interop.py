"""Oracle tests against PEFT itself on a real transformers model (SmolLM2-135M, float32).

PEFT writes adapters that adapterops reads to PEFT's own delta weights; adapterops writes adapters
that ``PeftModel.from_pretrained`` reads to the logits of base + delta.
"""

import copy
import math

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import adapterops as ao  # noqa: E402
from adapterops import Adapter, LoraLayer  # noqa: E402
from adapterops.errors import UnsupportedOperationError  # noqa: E402

PREFIX = "base_model.model."
TARGETS = ["q_proj", "v_proj", "up_proj", "o_proj"]


@pytest.fixture(scope="module")
def base(smollm2_dir):
    model = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 49152, (1, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base_logits(base, tokens):
    return logits(base, tokens)


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def logits_with_deltas(base, tokens, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference: logits of ``base`` with each module's dense delta added to its weight.

    The touched weights are restored bit for bit afterwards, so ``base`` can be shared.
    """
    saved = {name: base.get_submodule(name).weight.detach().clone() for name in deltas}
    try:
        with torch.no_grad():
            for name, d in deltas.items():
                base.get_submodule(name).weight += d
        return logits(base, tokens)
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                base.get_submodule(name).weight.copy_(w)


def peft_model(base, config, seed):
    """get_peft_model with lora_B randomized, so that every delta is non-zero."""
    model = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g))
    return model.eval()


def peft_deltas(model) -> dict[str, torch.Tensor]:
    """PEFT's own get_delta_weight per LoRA module, keyed by the base's module path."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
            out[name.removeprefix(PREFIX)] = module.get_delta_weight("default").detach()
    return out


def assert_deltas_match(adapter: Adapter, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(adapter) == sorted(expected)
    for name, d in expected.items():
        torch.testing.assert_close(adapter.delta(name), d, atol=1e-6, rtol=1e-5)


def assert_logits_match(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, atol=2e-5 * scale, rtol=1e-4)


CONFIGS = {
    "patterns": dict(
        r=8,
        lora_alpha=16,
        rank_pattern={"model.layers.1.self_attn.q_proj": 4, "v_proj": 2},
        alpha_pattern={"up_proj": 5, "model.layers.0.self_attn.o_proj": 3},
    ),
    "rslora": dict(r=8, lora_alpha=12, use_rslora=True, rank_pattern={"v_proj": 4}, alpha_pattern={"up_proj": 7}),
}


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_peft_saved_adapters_load_to_peft_deltas(base, tokens, tmp_path, variant):
    config = peft.LoraConfig(target_modules=TARGETS, layers_to_transform=[0, 1], **CONFIGS[variant])
    model = peft_model(base, config, seed=1)
    model.save_pretrained(tmp_path / "peft")
    expected = peft_deltas(model)
    want = logits(model, tokens)
    del model
    assert len(expected) == 8

    loaded = ao.load(tmp_path / "peft")
    assert loaded.metadata["format"] == "peft"
    assert_deltas_match(loaded, expected)
    # the patterns really made ranks and scales differ per layer
    assert loaded.ranks["model.layers.1.self_attn.q_proj" if variant == "patterns" else "model.layers.0.self_attn.v_proj"] == 4
    assert len({layer.scale for layer in loaded.values()}) > 1
    # PEFT's own forward equals the base with adapterops' deltas added
    assert_logits_match(logits_with_deltas(base, tokens, {n: loaded.delta(n) for n in loaded}), want)
    # and the same deltas survive conversion to every other format
    for fmt, name in [("native", "x.st"), ("kohya", "x.safetensors"), ("peft", "again")]:
        loaded.save(tmp_path / name, format=fmt)
        assert_deltas_match(ao.load(tmp_path / name), expected)


def random_adapter(base, seed: int) -> Adapter:
    """Mixed ranks and alphas on SmolLM2 modules, built by adapterops."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    plan = [("model.layers.0.self_attn.q_proj", 8, 16), ("model.layers.0.self_attn.v_proj", 4, 3.5),
            ("model.layers.2.mlp.up_proj", 8, 16), ("model.layers.2.mlp.down_proj", 2, 8)]  # fmt: skip
    for name, r, alpha in plan:
        out, inn = base.get_submodule(name).weight.shape
        layers[name] = LoraLayer(torch.randn(r, inn, generator=g) / math.sqrt(inn), torch.randn(out, r, generator=g) * 0.05, alpha)
    return Adapter(layers, {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "task_type": "CAUSAL_LM"})


def independent_deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {n: (layer.alpha / layer.A.shape[0]) * (layer.B.double() @ layer.A.double()).float() for n, layer in adapter.items()}


@pytest.mark.parametrize("route", ["peft", "native->peft", "kohya->peft", "algebra->peft"])
def test_adapterops_files_load_in_peft(base, tokens, base_logits, tmp_path, route):
    adapter = random_adapter(base, seed=2)
    if route == "algebra->peft":  # a blend re-compressed: alpha == rank, ranks from the rule
        adapter = (0.7 * adapter - 0.2 * random_adapter(base, seed=3)).compress(energy=0.99)
    source = adapter
    if route in ("native->peft", "kohya->peft"):
        fmt = route.split("-")[0]
        adapter.save(tmp_path / "first.safetensors", format=fmt)
        source = ao.load(tmp_path / "first.safetensors")
        assert source.metadata["format"] == fmt
    source.save(tmp_path / "peft", format="peft")

    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    assert_deltas_match(adapter, peft_deltas(model))
    got = logits(model, tokens)
    assert_logits_match(got, logits_with_deltas(base, tokens, independent_deltas(adapter)))
    assert_logits_match(got, logits_with_deltas(base, tokens, {n: adapter.delta(n) for n in adapter}))
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter does change the output


def test_peft_dora_adapter_loads_and_refuses_algebra(base, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[0], use_dora=True)
    model = peft_model(base, config, seed=4)
    model.save_pretrained(tmp_path / "dora")
    loaded = ao.load(tmp_path / "dora")
    assert loaded.is_dora and all(layer.is_dora for layer in loaded.values())
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            layer = loaded[name.removeprefix(PREFIX)]
            assert torch.equal(layer.A, module.lora_A["default"].weight.detach())
            assert torch.equal(layer.B, module.lora_B["default"].weight.detach())
            torch.testing.assert_close(layer.magnitude, module.lora_magnitude_vector["default"].weight.detach())
    with pytest.raises(UnsupportedOperationError, match="DoRA"):
        loaded + loaded
    with pytest.raises(UnsupportedOperationError, match="DoRA"):
        loaded.compress(rank=2)
    # it round-trips through adapterops' PEFT writer and PEFT reads it back as DoRA
    loaded.save(tmp_path / "again", format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again")
    assert again.peft_config["default"].use_dora
