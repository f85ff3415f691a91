"""adapterops.checkpoint: safetensors headers and byte ranges, the streaming shard writer, Hub
resolution from a huggingface_hub cache, and adapter-to-base layer matching."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from merge_helpers import hub_cache, save_tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterops.checkpoint import Checkpoint, ShardWriter, Target, match_layers, resolve_base
from adapterops.errors import BaseMismatchError, FormatError

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int8, torch.uint8, torch.bool]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(0, 100, shape, generator=g).to(dtype)


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None)
@given(specs=st.lists(st.tuples(st.sampled_from(DTYPES), shapes), min_size=1, max_size=6), reserve=st.sampled_from([64, 100_000]), seed=st.integers(0, 1000))
def test_writer_round_trips_through_safetensors(tmp_path_factory, specs, reserve, seed):
    tmp = tmp_path_factory.mktemp("w")
    tensors = {f"t{i}": sample(d, s, seed + i) for i, (d, s) in enumerate(specs)}
    save_file(tensors, str(tmp / "src.safetensors"), metadata={"format": "pt", "k": "v"})
    ck = Checkpoint(tmp / "src.safetensors")
    for name, t in tensors.items():
        assert ck.shape(name) == tuple(t.shape) and ck.dtype(name) == t.dtype
        assert torch.equal(ck.read(name), t)
    writer = ShardWriter(tmp / "out.safetensors", metadata={"format": "pt", "k": "v"}, reserve=reserve)
    for i, name in enumerate(reversed(list(tensors))):  # any order; half copied raw, half added
        if i % 2:
            writer.copy(name, ck.entry(name))
        else:
            writer.add(name, tensors[name])
    writer.close()
    back = load_file(tmp / "out.safetensors")
    assert set(back) == set(tensors) and all(torch.equal(back[n], t) for n, t in tensors.items())
    with safe_open(str(tmp / "out.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
    assert (tmp / "out.safetensors").stat().st_size % 8 == sum(t.numel() * t.element_size() for t in tensors.values()) % 8


def test_writer_refuses_a_name_twice(tmp_path):
    writer = ShardWriter(tmp_path / "x.safetensors")
    writer.add("a", torch.zeros(2))
    with pytest.raises(FormatError, match="written twice"):
        writer.add("a", torch.zeros(2))
    writer.abort()


def test_corrupt_files_are_format_errors(tmp_path):
    save_file({"a": torch.zeros(100)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[:-10])
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    (tmp_path / "notjson.safetensors").write_bytes(struct.pack("<Q", 5) + b"nope!")
    for name, message in [("truncated", "truncated"), ("short", "shorter"), ("huge", "implausible"), ("notjson", "not a readable")]:
        with pytest.raises(FormatError, match=message):
            Checkpoint(tmp_path / f"{name}.safetensors")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FormatError, match="pickle"):
        Checkpoint(tmp_path / "pickled")


def test_sharded_directory(tmp_path):
    path = save_tiny_llama(tmp_path / "tiny")
    ck = Checkpoint(path)
    assert len(ck.files) == 3 and ck.index is not None
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert {n: ck.file_of(n).name for n in ck.names()} == index["weight_map"]
    assert ck.total_size == index["metadata"]["total_size"]
    assert [p.name for p in ck.side_files()] == ["chat_template.jinja", "config.json", "generation_config.json", "tokenizer.json"]
    for f in ck.files:
        offsets = [ck.entry(n).offset for n in ck.names_in(f)]
        assert offsets == sorted(offsets)


def test_hub_id_resolves_from_the_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    source = save_tiny_llama(tmp_path / "tiny")
    snapshot = hub_cache(tmp_path / "hub", "someone/tiny", source)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_base("someone/tiny") == snapshot
    ck = Checkpoint("someone/tiny")
    assert ck.source == "someone/tiny" and sorted(ck.names()) == sorted(Checkpoint(source).names())
    assert torch.equal(ck.read("model.norm.weight"), Checkpoint(source).read("model.norm.weight"))
    with pytest.raises(FormatError, match="not in the Hugging Face cache"):
        resolve_base("someone/missing")
    with pytest.raises(FormatError, match="no such file"):
        resolve_base("./not/here")


# --- matching ----------------------------------------------------------------------------------


BASE = {
    "model.layers.0.self_attn.q_proj.weight": (8, 6),
    "model.layers.0.self_attn.k_proj.weight": (4, 6),
    "model.layers.0.mlp.up_proj.weight": (12, 6),
    "model.norm.weight": (6,),
}


def test_match_exact_and_prefixes():
    names = ["model.layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "base_model.model.model.layers.0.mlp.up_proj"]
    shapes = dict(zip(names, [(8, 6), (4, 6), (12, 6)]))
    targets = match_layers(shapes, BASE)
    assert targets == {
        names[0]: Target("model.layers.0.self_attn.q_proj.weight"),
        names[1]: Target("model.layers.0.self_attn.k_proj.weight"),
        names[2]: Target("model.layers.0.mlp.up_proj.weight"),
    }


def test_match_kohya_flattened_names():
    targets = match_layers({"lora_unet_layers_0_self_attn_q_proj": (8, 6)}, BASE)
    assert targets["lora_unet_layers_0_self_attn_q_proj"].tensor == "model.layers.0.self_attn.q_proj.weight"


def test_match_transposed_conv1d_weights():
    base = {"h.0.attn.c_attn.weight": (6, 18), "h.0.attn.c_proj.weight": (6, 6)}
    targets = match_layers({"h.0.attn.c_attn": (18, 6), "h.0.attn.c_proj": (6, 6)}, base, fan_in_fan_out=True)
    assert targets["h.0.attn.c_attn"] == Target("h.0.attn.c_attn.weight", transposed=True)
    assert targets["h.0.attn.c_proj"].transposed  # square: transposed only because the model says so
    assert not match_layers({"h.0.attn.c_proj": (6, 6)}, base)["h.0.attn.c_proj"].transposed


def test_match_reports_every_problem_at_once():
    layers = {"model.layers.0.self_attn.q_proj": (6, 9), "model.layers.7.x": (2, 2), "model.layers.8.y": (2, 2)}
    with pytest.raises(BaseMismatchError) as info:
        match_layers(layers, BASE)
    text = str(info.value)
    assert "2 adapter layer(s) have no weight in the base, e.g. model.layers.7.x, model.layers.8.y" in text
    assert "1 shape mismatch(es): model.layers.0.self_attn.q_proj: adapter delta is [6, 9], base model.layers.0.self_attn.q_proj.weight is [8, 6]" in text
