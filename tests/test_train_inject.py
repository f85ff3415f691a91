"""add_lora on any nn.Module and on a tiny Llama: targets, freezing, the Adapter it reads out,
remove (bit for bit), merge, PiSSA, rsLoRA, and PEFT reading what it saves."""

import copy
import re

import pytest
import torch
from torch import nn

from adapterops import load, lora_scale
from adapterops.errors import AdapterOpsError, UnsupportedOperationError
from adapterops.train import LoraLinear, NF4Linear, add_lora, find_targets, lora_adapter

from train_helpers import build_tiny_llama, one_thread  # noqa: F401 (one_thread: an autouse fixture)

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0, dtype=torch.float32):
    model = build_tiny_llama(seed, vocab_size=96, intermediate_size=48, tie_word_embeddings=False)
    return model.to(dtype).eval()


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.block = nn.ModuleDict({"attn": nn.Linear(8, 8), "mlp": nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))})
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 10, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.block["attn"](h)
        h = h + self.block["mlp"](h)
        return self.lm_head(self.norm(h))


def randomize(handle, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in handle.modules.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def test_all_linear_skips_the_output_head():
    model = tiny_llama()
    names = find_targets(model, "all-linear")
    assert "lm_head" not in names and len(names) == 2 * 7
    assert names[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert "lm_head" not in find_targets(Toy(), "all-linear")


def test_targets_as_names_and_as_regex():
    model = tiny_llama()
    assert find_targets(model, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v")
    ]
    assert find_targets(model, r"model\.layers\.1\.mlp\..*") == [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert find_targets(model, re.compile(r".*\.o_proj")) == [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]
    assert find_targets(model, ["lm_head"]) == ["lm_head"]  # named explicitly, the head can be trained
    assert find_targets(Toy(), ["mlp.0"]) == ["block.mlp.0"]


@pytest.mark.parametrize(
    "targets, words",
    [
        (["qq_proj"], "match no linear layer: 'qq_proj'"),
        (["norm"], "'norm' (matches LlamaRMSNorm, not linear layers)"),
        ("q_proj", "match no linear layer"),  # a string is a regex over full paths
        ("([", "not a valid regular expression"),
        ([], "targets must be"),
    ],
)
def test_bad_targets_say_what_exists(targets, words):
    with pytest.raises(AdapterOpsError, match=re.escape(words)):
        find_targets(tiny_llama(), targets)


def test_add_lora_freezes_everything_but_the_factors():
    model = tiny_llama()
    handle = add_lora(model, targets=["q_proj", "v_proj"], rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in handle.modules for x in "AB"}
    assert handle.num_params == sum(p.numel() for p in handle.parameters()) == 2 * 4 * ((32 + 32) + (32 + 16))  # q, v (2 kv heads)
    assert all(isinstance(model.get_submodule(n), LoraLinear) for n in handle.modules)


def test_a_rank_that_memory_cannot_hold_is_one_error_and_leaves_the_model_as_it_was():
    model = Toy()
    before = {n: (type(m), m.weight.requires_grad) for n, m in model.named_modules() if hasattr(m, "weight")}
    with pytest.raises(AdapterOpsError, match=r"^rank 1099511627776 on 3 layers is 70,368,744,177,664 LoRA values, more than memory holds \("):
        add_lora(model, targets="all-linear", rank=2**40)
    assert {n: (type(m), m.weight.requires_grad) for n, m in model.named_modules() if hasattr(m, "weight")} == before


def test_adapter_keys_are_the_checkpoint_module_paths_with_metadata():
    model = tiny_llama()
    weights = set(model.state_dict())
    handle = add_lora(model, rank=4, alpha=8)
    adapter = handle.adapter()
    assert all(f"{name}.weight" in weights for name in adapter)
    assert list(adapter) == find_targets(tiny_llama(), "all-linear")
    assert adapter.metadata["target_modules"] == sorted({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    assert adapter.metadata["task_type"] == "CAUSAL_LM"
    assert all(layer.alpha == 8 and layer.rank == 4 for layer in adapter.values())


@pytest.mark.parametrize("rslora", [False, True])
def test_scale_and_resolved_alpha(rslora):
    model = tiny_llama()
    handle = add_lora(model, targets=["q_proj"], rank=9, alpha=6, rslora=rslora)
    scale = lora_scale(6, 9, rslora=rslora)
    assert scale == (2.0 if rslora else 6 / 9)
    for name, layer in handle.adapter().items():
        assert handle.modules[name].scale == scale
        assert layer.scale == pytest.approx(scale, rel=1e-15)


def test_adapter_deltas_reproduce_the_wrapped_model():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    handle = add_lora(model, rank=4, alpha=8, rslora=True)
    randomize(handle)
    adapter = handle.adapter()
    with torch.no_grad():
        for name in adapter:
            reference.get_submodule(name).weight += adapter.delta(name)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_adapter_is_a_value_not_a_view():
    model = tiny_llama()
    handle = add_lora(model, targets=["q_proj"], rank=2)
    adapter = handle.adapter()
    randomize(handle)
    assert all(torch.count_nonzero(layer.B) == 0 for layer in adapter.values())


@pytest.mark.parametrize("init", ["default", "gaussian", "pissa"])
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_remove_restores_the_model_bit_for_bit(init, quantize):
    if init == "pissa" and quantize:
        pytest.skip("pissa needs dense bases")
    model = tiny_llama()
    model.model.norm.weight.requires_grad_(False)  # a flag that must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    handle = add_lora(model, rank=4, init=init, quantize=quantize, dropout=0.1)
    randomize(handle)
    model(torch.randint(0, 96, (1, 5)))
    handle.remove()
    if quantize:
        assert all(isinstance(model.get_submodule(n), NF4Linear) for n in handle.modules)
        return
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) and after[k].dtype == before[k].dtype for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(model.get_submodule(n) is modules[n] for n in handle.modules)
    with pytest.raises(AdapterOpsError, match="already removed or merged"):
        handle.remove()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_folds_the_update_into_the_base(dtype):
    model = tiny_llama(dtype=dtype)
    handle = add_lora(model, rank=4, alpha=8)
    randomize(handle)
    adapter = handle.adapter()
    expected = {n: (model.get_submodule(n).base.weight.float() + adapter.delta(n).float()).to(dtype) for n in adapter}
    handle.merge()
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    for name, w in expected.items():
        assert model.get_submodule(name).weight.dtype == dtype
        assert torch.equal(model.get_submodule(name).weight, w)


def test_merge_of_an_nf4_base_gives_dense_layers_of_the_original_dtype():
    model = tiny_llama()
    handle = add_lora(model, targets=["q_proj"], rank=2, quantize="nf4")
    randomize(handle)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        wrapped = model(ids).logits
    handle.merge()
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, wrapped, rtol=1e-5, atol=1e-5)


def test_pissa_starts_from_the_principal_subspace_and_leaves_the_model_unchanged():
    model = tiny_llama()
    original = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 9))
    handle = add_lora(model, rank=4, alpha=8, init="pissa")
    layer = handle.modules["model.layers.0.self_attn.q_proj"]
    W = original.get_submodule("model.layers.0.self_attn.q_proj").weight.detach()
    U, S, Vh = torch.linalg.svd(W.double())
    top = (U[:, :4] * S[:4]) @ Vh[:4]
    torch.testing.assert_close((layer.scale * layer.lora_B @ layer.lora_A).double(), top, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.base.weight.double(), W.double() - top, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)
    assert handle.adapter().norm() == 0.0  # no update yet, relative to the original weights
    # After some change, the adapter still merges into the original checkpoint.
    with torch.no_grad():
        for m in handle.modules.values():
            m.lora_A.add_(0.01 * torch.randn_like(m.lora_A))
    adapter = handle.adapter()
    assert adapter.rank == 8 and adapter.metadata["lora_init"] == "pissa"
    with torch.no_grad():
        wrapped = model(ids).logits
        for name in adapter:
            original.get_submodule(name).weight += adapter.delta(name)
        torch.testing.assert_close(original(ids).logits, wrapped, rtol=1e-4, atol=1e-5)


def test_seeded_init_is_reproducible_and_gaussian_has_std_one_over_rank():
    a = add_lora(tiny_llama(), rank=8, seed=3).adapter()
    b = add_lora(tiny_llama(), rank=8, seed=3).adapter()
    assert all(torch.equal(a[n].A, b[n].A) for n in a)
    handle = add_lora(nn.Sequential(nn.Linear(4096, 4)), rank=8, init="gaussian", seed=0)
    assert handle.modules["0"].lora_A.std().item() == pytest.approx(1 / 8, rel=0.02)


def test_lora_adapter_reads_any_model_and_refuses_a_plain_one():
    model = Toy()
    add_lora(model, targets=["attn"], rank=2)
    assert list(lora_adapter(model)) == ["block.attn"]
    with pytest.raises(AdapterOpsError, match="call add_lora"):
        lora_adapter(Toy())


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"alpha": -1.0}, "alpha must be a positive number"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"init": "olora"}, "unknown init 'olora'"),
        ({"quantize": "int8"}, "unknown quantize 'int8'"),
        ({"init": "pissa", "rank": 40}, "rank <= min(out, in)"),
    ],
)
def test_bad_arguments(kwargs, words):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterOpsError, match=re.escape(words)):
        add_lora(model, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing changed


def test_twice_is_refused_and_pissa_on_nf4_is_unsupported():
    model = tiny_llama()
    add_lora(model, rank=2)
    with pytest.raises(AdapterOpsError, match="already has LoRA layers"):
        add_lora(model, rank=2)
    with pytest.raises(UnsupportedOperationError, match="dense base weights"):
        add_lora(tiny_llama(), rank=2, init="pissa", quantize="nf4")


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_the_saved_adapter_to_the_same_logits(tmp_path, rslora):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    base = copy.deepcopy(model)
    handle = add_lora(model, targets=["q_proj", "v_proj", "down_proj"], rank=4, alpha=6, rslora=rslora)
    randomize(handle)
    handle.adapter().save(tmp_path / "peft", format="peft")
    assert load(tmp_path / "peft").keys() == handle.adapter().keys()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_merge_after_pissa_gives_the_wrapped_model():
    model = tiny_llama()
    handle = add_lora(model, rank=4, init="pissa")
    randomize(handle)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        wrapped = model(ids).logits
        handle.merge()
        torch.testing.assert_close(model(ids).logits, wrapped, rtol=1e-5, atol=1e-5)
