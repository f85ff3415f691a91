"""GGUF LoRA files (llama.cpp, Ollama): the container against the `gguf` package (llama.cpp's own
Python reader/writer), exact per-layer scales under llama.cpp's one-alpha rule for any ranks and
alphas, the q/k row order against transformers' GGUF loader, name maps, bases, errors, and the CLI.

The end-to-end check with the real llama.cpp is tests/test_llama_cpp_interop.py.
"""

import json
import math
import os
import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import adapterops as ao
from adapterops import Adapter, LoraLayer
from adapterops.cli import main
from adapterops.errors import BaseMismatchError, FormatError, UnsupportedOperationError
from adapterops.formats import detect_format
from adapterops.formats import gguf as fmt
from adapterops.formats._gguf_file import read_gguf, read_tensor, write_gguf

gguf = pytest.importorskip("gguf")

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 32, 48, 4, 2, 2
KV = HIDDEN // HEADS * KV_HEADS
SHAPES = {  # HF module suffix -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (FFN, HIDDEN),
    "mlp.up_proj": (FFN, HIDDEN),
    "mlp.down_proj": (HIDDEN, FFN),
}
GGUF_KIND = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
MODULES = [f"model.layers.{i}.{m}" for i in range(LAYERS) for m in SHAPES]


def config(arch="LlamaForCausalLM", model_type="llama", **extra) -> dict:
    return {"architectures": [arch], "model_type": model_type, "hidden_size": HIDDEN, "intermediate_size": FFN,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "num_hidden_layers": LAYERS, **extra}


@pytest.fixture
def hf_base(tmp_path):
    """A config-only HF base directory (what llama.cpp's own converter asks for)."""
    d = tmp_path / "base"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config(tie_word_embeddings=True)))
    return d


@pytest.fixture
def gguf_base(tmp_path):
    """A tiny llama-architecture model GGUF written by llama.cpp's gguf package."""
    path = tmp_path / "base.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_tensor("token_embd.weight", np.zeros((64, HIDDEN), np.float32))
    for i in range(LAYERS):
        for module, (out, inn) in SHAPES.items():
            w.add_tensor(f"blk.{i}.{GGUF_KIND[module]}.weight", np.zeros((out, inn), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_adapter(ranks, alphas, dtype=torch.float32, seed=0, modules=MODULES) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, r, alpha in zip(modules, ranks, alphas):
        out, inn = SHAPES[name.split(".", 3)[3]]
        layers[name] = LoraLayer(torch.randn(r, inn, generator=g).to(dtype), torch.randn(out, r, generator=g).to(dtype), alpha)
    return Adapter(layers)


def llama_cpp_deltas(path) -> dict[str, torch.Tensor]:
    """The delta llama.cpp applies to each tensor (in its own row order), read with the gguf package.

    src/llama-adapter.h: scale = alpha / rank (rank = lora_b's ne[0]), or 1 when alpha is 0.
    """
    r = gguf.GGUFReader(str(path))
    alpha = float(r.fields[fmt.ALPHA_KEY].contents()) if fmt.ALPHA_KEY in r.fields else 0.0
    t = {x.name: torch.from_numpy(np.array(x.data, dtype=np.float64)) for x in r.tensors}
    deltas = {}
    for name in t:
        if name.endswith(".weight.lora_a"):
            tensor = name.removesuffix(".weight.lora_a")
            A, B = t[name], t[tensor + ".weight.lora_b"]
            deltas[tensor] = (alpha / B.shape[1] if alpha else 1.0) * B @ A  # (out, r) @ (r, in)
    return deltas


def hf_row_order(delta: torch.Tensor, tensor: str) -> torch.Tensor:
    """Undo llama.cpp's q/k row order with transformers' GGUF loader (an independent implementation)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    return torch.from_numpy(processor.process(delta.numpy(), tensor + ".weight").weights.copy())


# ---------------------------------------------------------------- the container


def test_container_is_read_by_gguf_package(tmp_path):
    tensors = {"x.lora_a": torch.randn(3, 32), "x.lora_b": torch.randn(5, 3).half(), "y": torch.randn(2, 4).bfloat16()}
    meta = {"general.architecture": "llama", "f": 0.5, "n": 7, "flag": True, "names": ["a", "bé"], "big": 2**40}
    write_gguf(tmp_path / "x.gguf", meta, tensors)
    r = gguf.GGUFReader(str(tmp_path / "x.gguf"))
    assert {k: r.fields[k].contents() for k in meta} == meta
    assert r.fields["f"].types == [gguf.GGUFValueType.FLOAT32]
    for t in r.tensors:
        ours = tensors[t.name]
        assert tuple(reversed(t.shape.tolist())) == tuple(ours.shape)
        assert bytes(t.data.tobytes()) == ours.contiguous().view(torch.uint8).numpy().tobytes()


def test_container_reads_gguf_package_files(tmp_path):
    path = tmp_path / "w.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_array("list", [1, 2, 3])
    a = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    q8 = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("a", a)
    w.add_tensor("h", a.astype(np.float16))
    w.add_tensor("q", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = read_gguf(path)
    assert f.metadata["general.architecture"] == "qwen2" and f.metadata["adapter.lora.alpha"] == 8.0 and f.metadata["list"] == [1, 2, 3]
    assert torch.equal(read_tensor(f, "a"), torch.from_numpy(a))
    assert torch.equal(read_tensor(f, "h"), torch.from_numpy(a.astype(np.float16)))
    expected = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(read_tensor(f, "q"), torch.from_numpy(expected))


def test_corrupt_containers_are_format_errors(tmp_path, gguf_base):
    data = gguf_base.read_bytes()
    cases = {"empty.gguf": b"", "magic.gguf": b"GGML" + data[4:], "short.gguf": data[:200], "version.gguf": data[:4] + b"\x09\0\0\0" + data[8:]}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(FormatError):
            read_gguf(tmp_path / name)
    file = read_gguf(gguf_base)
    first = next(iter(file.tensors.values()))  # its first dimension (ggml's ne[0]) set to 0
    at = data.index(first.name.encode()) + len(first.name) + 4
    (tmp_path / "zero.gguf").write_bytes(data[:at] + struct.pack("<Q", 0) + data[at + 8 :])
    with pytest.raises(FormatError, match=r"^\S+zero.gguf: tensor .* a dimension of size 0") as caught:
        read_gguf(tmp_path / "zero.gguf")
    assert "cannot read" not in str(caught.value)


def test_a_truncated_model_gguf_is_refused_from_its_directory(tmp_path, gguf_base):
    """A base cut short by one byte of its last tensor: convert --base and check --base read only the directory."""
    from gguf.constants import GGML_QUANT_SIZES

    from adapterops.formats._gguf_file import _BLOCKS

    assert {k: GGML_QUANT_SIZES[gguf.GGMLQuantizationType(k)] for k in _BLOCKS} == _BLOCKS  # the package's table is the oracle
    file = read_gguf(gguf_base)
    last = max(file.tensors.values(), key=lambda t: t.offset)
    end = last.offset + 4 * math.prod(last.shape)  # F32
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_base.read_bytes()[: end - 1])
    random_adapter([4] * 7, [8.0] * 7).save(tmp_path / "a.st")
    for args in (["convert", "--to", "gguf", "-o", str(tmp_path / "a.gguf")], ["check", "--target", "llama.cpp"]):
        res = CliRunner().invoke(main, [args[0], str(tmp_path / "a.st"), *args[1:], "--base", str(cut)])
        assert res.exit_code == 1 and res.stderr.splitlines() == [f"Error: {cut}: tensor {last.name} runs past the end of the file (truncated download?)"]
    assert not (tmp_path / "a.gguf").exists()


# ---------------------------------------------------------------- llama.cpp's rule, exact per layer


@settings(max_examples=8, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 6), min_size=len(MODULES), max_size=len(MODULES)),
    alphas=st.lists(st.sampled_from([1.0, 2.0, 3.0, 8.0, 16.0, 0.3, -4.0, 0.0]), min_size=len(MODULES), max_size=len(MODULES)),
    scale_one=st.booleans(),
)
def test_every_layer_keeps_its_scale_under_llama_cpp_rule(tmp_path_factory, ranks, alphas, scale_one):
    """Whatever the ranks and alphas, what llama.cpp applies (one alpha per file, alpha / rank per
    pair, q/k rows reordered) is each layer's own delta, against a float64 dense reference."""
    if scale_one:  # adapterops algebra results: alpha = rank everywhere, ranks mixed
        alphas = [float(r) for r in ranks]
    tmp = tmp_path_factory.mktemp("g")
    base = tmp / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(config()))
    a = random_adapter(ranks, alphas, dtype=torch.float64)
    a.save(tmp / "a.gguf", base=base)
    deltas, back = llama_cpp_deltas(tmp / "a.gguf"), ao.load(tmp / "a.gguf")
    for name in MODULES:
        want = a[name].scale * a[name].B @ a[name].A  # float64 reference, (out, r) @ (r, in)
        tensor = fmt.ARCHITECTURES["llama"].to_gguf(name)
        torch.testing.assert_close(hf_row_order(deltas[tensor], tensor), want, rtol=1e-6, atol=1e-6)
        got = back[name].scale * back[name].B.double() @ back[name].A.double()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_one_alpha_leaves_factors_untouched(tmp_path, hf_base):
    """Mixed ranks with one alpha (PEFT's rank_pattern) need no folding: factors are bit-exact."""
    a = random_adapter([2, 4, 8, 3, 1, 5, 6] * 2, [16.0] * 14)
    a.save(tmp_path / "a.gguf", base=hf_base)
    assert read_gguf(tmp_path / "a.gguf").metadata[fmt.ALPHA_KEY] == 16.0
    back = ao.load(tmp_path / "a.gguf")
    for name in MODULES:
        assert torch.equal(back[name].A, a[name].A) and torch.equal(back[name].B, a[name].B) and back[name].alpha == 16.0


def test_blend_of_mixed_ranks_writes_alpha_zero_and_keeps_factors(tmp_path, hf_base):
    """After algebra every scale is 1 and ranks differ: alpha 0 (llama.cpp's 'scale 1') fits all."""
    x = random_adapter([4] * 14, [8.0] * 14, seed=1)
    y = random_adapter([2] * 7, [2.0] * 7, seed=2, modules=MODULES[:7])
    mix = ao.blend([x, y], [0.7, 0.3])
    assert len(set(mix.ranks.values())) == 2
    mix.save(tmp_path / "m.gguf", base=hf_base)
    assert read_gguf(tmp_path / "m.gguf").metadata[fmt.ALPHA_KEY] == 0.0
    back = ao.load(tmp_path / "m.gguf")
    for name in MODULES:
        assert torch.equal(back[name].A, mix[name].A) and torch.equal(back[name].B, mix[name].B)


def test_the_per_file_alpha_mistake_is_what_the_rule_catches(tmp_path, hf_base):
    """Writing the factors unchanged with one alpha (what convert_lora_to_gguf.py does with a
    rank_pattern adapter of several alphas) mis-scales: the rule above would flag it."""
    a = random_adapter([4] * 14, [8.0] * 7 + [24.0] * 7)
    tensors = {}
    for name, layer in a.items():
        t = fmt.ARCHITECTURES["llama"].to_gguf(name)
        tensors[t + ".weight.lora_a"], tensors[t + ".weight.lora_b"] = layer.A, layer.B
    write_gguf(tmp_path / "naive.gguf", {"general.architecture": "qwen2", "general.type": "adapter", "adapter.type": "lora", fmt.ALPHA_KEY: 8.0}, tensors)
    back = ao.load(tmp_path / "naive.gguf")
    wrong = [n for n in MODULES if not torch.allclose(back.delta(n), a.delta(n), rtol=1e-4, atol=1e-4)]
    assert wrong == MODULES[7:]  # 3x too weak where the alpha was 24


def test_dtypes(tmp_path, hf_base):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        a = random_adapter([4] * 14, [8.0] * 14, dtype=dtype)
        a.save(tmp_path / f"{dtype}.gguf", base=hf_base)
        back = ao.load(tmp_path / f"{dtype}.gguf")
        assert all(back[n].A.dtype == dtype and torch.equal(back[n].B, a[n].B) for n in MODULES)
    folded = random_adapter([4] * 14, [8.0] * 13 + [3.0], dtype=torch.bfloat16)
    folded.save(tmp_path / "f.gguf", base=hf_base)
    back = ao.load(tmp_path / "f.gguf")
    last = MODULES[-1]
    assert back[last].B.dtype == torch.float32  # a folded B is stored in float32, not rounded again
    torch.testing.assert_close(back.delta(last), folded[last].delta(torch.float32), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- q/k row order and names


@pytest.mark.parametrize("kind,heads", [("attn_q", HEADS), ("attn_k", KV_HEADS)])
def test_rope_permutation_matches_transformers(kind, heads):
    out = HIDDEN if kind == "attn_q" else KV
    w = torch.randn(out, 5, dtype=torch.float64)
    permuted = fmt.rope_permute(w, heads)
    assert torch.equal(hf_row_order(permuted, f"blk.0.{kind}"), w)
    assert torch.equal(fmt.rope_unpermute(permuted, heads), w)
    assert not torch.equal(permuted, w)


def test_qwen2_keeps_row_order_and_names(tmp_path):
    base = tmp_path / "qwen"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(config("Qwen2ForCausalLM", "qwen2")))
    a = random_adapter([3] * 14, [6.0] * 14)
    a.save(tmp_path / "q.gguf", base=base)
    f = read_gguf(tmp_path / "q.gguf")
    assert f.metadata["general.architecture"] == "qwen2" and fmt.HEADS_KEY not in f.metadata
    assert torch.equal(read_tensor(f, "blk.1.attn_q.weight.lora_b"), a["model.layers.1.self_attn.q_proj"].B)


def test_names_map_both_ways():
    arch = fmt.ARCHITECTURES["llama"]
    assert arch.to_gguf("model.layers.12.mlp.down_proj") == "blk.12.ffn_down"
    assert arch.to_gguf("base_model.model.model.layers.3.self_attn.k_proj") == "blk.3.attn_k"
    assert arch.to_gguf("layers.3.self_attn.o_proj") == "blk.3.attn_output"
    assert arch.to_gguf("lm_head") == "output"
    assert arch.to_gguf("model.layers.3.self_attn.rotary_emb") is None
    assert arch.to_hf("blk.7.ffn_up") == "model.layers.7.mlp.up_proj"
    for arch in fmt.ARCHITECTURES.values():  # the table is a bijection
        for hf, g in arch.tensors.items():
            assert arch.to_hf(arch.to_gguf(hf.format(bid=5))) == hf.format(bid=5)


# ---------------------------------------------------------------- bases


def test_gguf_base_and_hf_base_give_the_same_file(tmp_path, hf_base, gguf_base):
    a = random_adapter([4, 2] * 7, [8.0, 3.0] * 7)
    a.save(tmp_path / "a.gguf", base=hf_base)
    a.save(tmp_path / "b.gguf", base=gguf_base)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_hub_id_base_from_the_cache(tmp_path, monkeypatch):
    """A Hub repo id is looked up in the local cache (offline), fetching only config.json."""
    snapshot = tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config()))
    (tmp_path / "hub" / "models--org--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny-llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    info = fmt.describe_base("org/tiny-llama")
    assert info.architecture.name == "llama" and info.heads == {"head_count": HEADS, "head_count_kv": KV_HEADS}
    with pytest.raises(FormatError, match="offline"):
        fmt.describe_base("org/not-cached")


def test_real_base_checks_shapes(smollm2_dir, tmp_path):
    info = fmt.describe_base(smollm2_dir)
    assert info.architecture.name == "llama" and info.heads == {"head_count": 9, "head_count_kv": 3} and info.block_count == 30
    assert info.shapes["blk.0.attn_k"] == (192, 576) and info.tied_embeddings
    bad = Adapter({"model.layers.0.self_attn.k_proj": LoraLayer(torch.randn(2, 576), torch.randn(576, 2), 2.0)})
    with pytest.raises(BaseMismatchError, match=r"\[576, 576\] but the base's blk.0.attn_k.weight is \[192, 576\]"):
        bad.save(tmp_path / "x.gguf", base=smollm2_dir)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- errors


def test_refusals(tmp_path, hf_base):
    a = random_adapter([2] * 14, [4.0] * 14)
    with pytest.raises(FormatError, match="needs its base model"):
        a.save(tmp_path / "a.gguf")
    with pytest.raises(FormatError, match=r"named \*\.gguf"):
        a.save(tmp_path / "a.st", format="gguf", base=hf_base)
    other = tmp_path / "gemma"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(config("Gemma2ForCausalLM", "gemma2")))
    with pytest.raises(FormatError, match=r"Gemma2ForCausalLM model; GGUF export supports llama \(Llama 2/3, SmolLM/SmolLM2, Mistral\); qwen2"):
        a.save(tmp_path / "a.gguf", base=other)
    odd = Adapter({**a, "model.embed_tokens": LoraLayer(torch.randn(2, 64), torch.randn(HIDDEN, 2), 2.0),
                   "model.layers.7.mlp.up_proj": a["model.layers.0.mlp.up_proj"], "lm_head": LoraLayer(torch.randn(2, HIDDEN), torch.randn(64, 2), 2.0)})
    with pytest.raises(BaseMismatchError) as err:
        odd.save(tmp_path / "a.gguf", base=hf_base)
    assert "3 problem(s)" in str(err.value) and "model.embed_tokens has no llama.cpp tensor" in str(err.value)
    assert "the base has 2 layers" in str(err.value) and "ties lm_head" in str(err.value)
    dora = Adapter({MODULES[0]: LoraLayer(torch.randn(2, HIDDEN), torch.randn(HIDDEN, 2), 2.0, torch.ones(HIDDEN))})
    with pytest.raises(UnsupportedOperationError, match="DoRA"):
        dora.save(tmp_path / "a.gguf", base=hf_base)
    assert not list(tmp_path.glob("*.gguf")) and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_reading_needs_the_base_only_for_foreign_llama_q_k(tmp_path, hf_base, gguf_base):
    """A file without adapterops' metadata (as convert_lora_to_gguf.py writes): q/k need the head counts."""
    a = random_adapter([2] * 14, [4.0] * 14)
    a.save(tmp_path / "ours.gguf", base=hf_base)
    ours = read_gguf(tmp_path / "ours.gguf")
    keep = {k: v for k, v in ours.metadata.items() if not k.startswith("adapterops.")}
    write_gguf(tmp_path / "foreign.gguf", keep, {n: read_tensor(ours, n) for n in ours.tensors})
    with pytest.raises(FormatError, match="pass the base"):
        ao.load(tmp_path / "foreign.gguf")
    for base in (hf_base, gguf_base):
        back = ao.load(tmp_path / "foreign.gguf", base=base)
        for name in MODULES:
            assert torch.equal(back[name].B, a[name].B) and back[name].alpha == 4.0
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps(config("Qwen2ForCausalLM", "qwen2")))
    with pytest.raises(BaseMismatchError, match="for llama, the base"):
        ao.load(tmp_path / "foreign.gguf", base=qwen)


def test_reading_refuses_what_is_not_a_lora(tmp_path, gguf_base):
    with pytest.raises(FormatError, match="a model GGUF, not an adapter.*pass it as the base"):
        ao.load(gguf_base)
    base = {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora", fmt.ALPHA_KEY: 2.0}
    cases = {
        "cvec.gguf": ({**base, "adapter.type": "control_vector"}, {"direction.1": torch.zeros(4)}, "only LoRA"),
        "arch.gguf": ({**base, "general.architecture": "gemma2"}, {"x.lora_a": torch.zeros(2, 4)}, "architecture is 'gemma2'"),
        "half.gguf": (base, {"blk.0.attn_v.weight.lora_a": torch.zeros(2, HIDDEN)}, "no lora_b"),
        "odd.gguf": (base, {"blk.0.attn_v.weight": torch.zeros(2, HIDDEN)}, "not a LoRA factor"),
        "emb.gguf": (base, {"token_embd.weight.lora_a": torch.zeros(HIDDEN, 2), "token_embd.weight.lora_b": torch.zeros(2, 64)}, "token embeddings"),
        "tr.gguf": (base, {"blk.0.attn_v.weight.lora_a": torch.zeros(HIDDEN, 2), "blk.0.attn_v.weight.lora_b": torch.zeros(KV, 3)}, r"expected \[r, in\]"),
    }
    for name, (meta, tensors, message) in cases.items():
        write_gguf(tmp_path / name, meta, tensors)
        with pytest.raises((FormatError, UnsupportedOperationError), match=message):
            ao.load(tmp_path / name)
    norm = {"blk.0.attn_v.weight.lora_a": torch.ones(2, HIDDEN), "blk.0.attn_v.weight.lora_b": torch.ones(KV, 2), "blk.0.attn_norm.weight": torch.ones(HIDDEN)}
    write_gguf(tmp_path / "norm.gguf", base, norm)  # llama.cpp ignores norm vectors; so do we, and say so
    back = ao.load(tmp_path / "norm.gguf")
    assert list(back) == ["model.layers.0.self_attn.v_proj"] and back.metadata["gguf_ignored_tensors"] == ["blk.0.attn_norm.weight"]
    assert detect_format(tmp_path / "norm.gguf") == "gguf"


# ---------------------------------------------------------------- command line


def test_cli_convert_to_gguf_and_back(tmp_path, hf_base, gguf_base):
    a = random_adapter([4, 2] * 7, [8.0, 3.0] * 7)
    a.save(tmp_path / "a.st")
    runner = CliRunner()
    res = runner.invoke(main, ["convert", str(tmp_path / "a.st"), "--to", "gguf", "--base", str(gguf_base), "-o", str(tmp_path / "a.gguf"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["format"] == "gguf"
    res = runner.invoke(main, ["convert", str(tmp_path / "a.gguf"), "--to", "peft", "-o", str(tmp_path / "back")])
    assert res.exit_code == 0, res.output
    back = ao.load(tmp_path / "back")
    for name in MODULES:
        torch.testing.assert_close(back.delta(name), a.delta(name), rtol=1e-6, atol=1e-6)
    res = runner.invoke(main, ["convert", str(tmp_path / "a.st"), "--to", "gguf", "-o", str(tmp_path / "c.gguf")])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and res.output.startswith("Error: a GGUF adapter needs its base model")
    assert not (tmp_path / "c.gguf").exists()


def test_a_gguf_model_given_as_a_safetensors_base_is_named_as_gguf(gguf_base):
    from adapterops.checkpoint import Checkpoint

    with pytest.raises(FormatError, match="a GGUF file, not safetensors"):
        Checkpoint(gguf_base)


def test_check_llama_cpp_takes_the_models_gguf_as_base(tmp_path, gguf_base):
    good = random_adapter([4] * 7, [8.0] * 7)
    good.save(tmp_path / "good.st")
    good.save(tmp_path / "good.gguf", base=gguf_base)
    runner = CliRunner()
    for source in ("good.st", "good.gguf"):
        res = runner.invoke(main, ["check", str(tmp_path / source), "--target", "llama.cpp", "--base", str(gguf_base)])
        assert res.exit_code == 0 and res.stdout == f"ok: llama.cpp loads {tmp_path / source} as it is\n", res.output
    g = torch.Generator().manual_seed(1)
    q = good[MODULES[0]]
    bad = Adapter({**good,
        MODULES[0]: LoraLayer(q.A, torch.randn(q.B.shape[0] + 1, q.rank, generator=g), q.alpha),  # one row too many
        f"model.layers.{LAYERS}.self_attn.q_proj": q,  # past the base's last block
        "model.layers.0.mlp.weird": q,  # no llama.cpp name
    }, good.metadata)
    bad.save(tmp_path / "bad.st")
    res = runner.invoke(main, ["check", str(tmp_path / "bad.st"), "--target", "llama.cpp", "--base", str(gguf_base), "--json"])
    assert res.exit_code == 1
    problems = {p["rule"]: p["message"] for p in json.loads(res.stdout)["problems"]}
    assert set(problems) == {"modules", "base"}
    assert "model.layers.0.mlp.weird" in problems["modules"] and "weird" not in problems["base"]
    assert problems["base"].startswith(f"2 problem(s) against the base {gguf_base}: ")
    assert f"{MODULES[0]} is [{q.B.shape[0] + 1}, {q.A.shape[1]}] but the base's blk.0.attn_q.weight is [{q.B.shape[0]}, {q.A.shape[1]}]" in problems["base"]
    assert f"model.layers.{LAYERS}.self_attn.q_proj: the base has {LAYERS} layers" in problems["base"]


def test_check_for_other_consumers_refuses_a_gguf_base_in_one_line(tmp_path, gguf_base):
    random_adapter([4] * 7, [8.0] * 7).save(tmp_path / "a.st")
    res = CliRunner().invoke(main, ["check", str(tmp_path / "a.st"), "--target", "peft", "--base", str(gguf_base)])
    assert res.exit_code == 1 and res.stderr.splitlines() == [
        f"Error: {gguf_base}: a GGUF model is a base for --target llama.cpp; peft runs on the safetensors checkpoint: pass that"]
