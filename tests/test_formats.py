"""Adapter files: exact round trips, sniffing, and refusal of everything unsafe or broken."""

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import adapterops as ao
from adapterops import Adapter, LoraLayer
from adapterops.errors import FormatError, NonFiniteError, OutputExistsError
from adapterops.formats import detect_format, kohya, peft

Q, V, UP = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.up_proj"
ROUND_TRIPS = [("native", "a.st"), ("native", "a.safetensors"), ("peft", "a_dir"), ("kohya", "a.safetensors"), ("kohya", "k.st")]


def mixed(dtype=torch.float32, seed=0) -> Adapter:
    """Three layers with different ranks and alphas (alphas exact in float32, as kohya stores them)."""
    g = torch.Generator().manual_seed(seed)

    def layer(out, inn, r, alpha):
        return LoraLayer(torch.randn(r, inn, generator=g).to(dtype), torch.randn(out, r, generator=g).to(dtype), alpha)

    return Adapter(
        {Q: layer(16, 16, 4, 8), V: layer(8, 16, 2, 0.75), UP: layer(24, 16, 4, 8)},
        {"base_model": "HuggingFaceTB/SmolLM2-135M", "task_type": "CAUSAL_LM"},
    )


def assert_same(a: Adapter, b: Adapter) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = a[name], b[name]
        assert x.alpha == y.alpha and x.A.dtype == y.A.dtype and x.B.dtype == y.B.dtype
        assert torch.equal(x.A, y.A) and torch.equal(x.B, y.B)
        assert (x.magnitude is None) == (y.magnitude is None)
        if x.magnitude is not None:
            assert torch.equal(x.magnitude, y.magnitude)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("fmt", "name"), ROUND_TRIPS)
def test_round_trip_is_exact(tmp_path, fmt, name, dtype):
    a = mixed(dtype)
    path = tmp_path / name
    a.save(path, format=fmt)
    assert detect_format(path) == fmt
    b = ao.load(path)
    assert_same(a, b)
    assert b.metadata["format"] == fmt and b.metadata["source"] == str(path)
    if fmt != "kohya":
        assert b.metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert leftovers(tmp_path) == []


def test_round_trip_of_algebra_results_and_awkward_alphas(tmp_path):
    a, b = mixed(seed=1), mixed(seed=2)
    odd = Adapter({Q: LoraLayer(torch.randn(3, 16), torch.randn(16, 3), 7.3), V: LoraLayer(torch.randn(1, 16), torch.randn(8, 1), 1 / 3)})
    for value in (0.6 * a - 0.4 * b, odd):
        for fmt, name in ROUND_TRIPS:
            path = tmp_path / f"{fmt}-{len(list(tmp_path.iterdir()))}-{name}"
            value.save(path, format=fmt)
            assert_same(value, ao.load(path))


@pytest.mark.parametrize(("fmt", "name"), ROUND_TRIPS)
def test_layers_sharing_tensors_are_written_as_copies(tmp_path, fmt, name):
    """One LoraLayer under two names, and factors that are views of one buffer (safetensors refuses both as they are)."""
    buffer = torch.randn(8, 16)
    shared = LoraLayer(buffer[:3], torch.randn(16, 3), 3.0)
    a = Adapter({Q: shared, V: LoraLayer(buffer[3:4], torch.randn(8, 1), 1.0), UP.replace("up", "gate"): LoraLayer(shared.A, shared.B[:8], 3.0), "model.layers.0.self_attn.k_proj": shared})
    a.save(tmp_path / name, format=fmt)
    assert_same(a, ao.load(tmp_path / name))


def test_peft_config_has_patterns_for_mixed_ranks_and_alphas(tmp_path):
    mixed().save(tmp_path / "p", format="peft")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {V.replace(".", r"\."): 2}
    assert config["alpha_pattern"] == {V.replace(".", r"\."): 0.75}
    assert config["target_modules"] == sorted([Q, V, UP]) and config["use_dora"] is False
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"
    # PEFT's own matching rule finds the pattern for that module only
    assert peft.pattern_key(config["rank_pattern"], V) is not None
    assert peft.pattern_key(config["rank_pattern"], Q) is None
    assert peft.pattern_key(config["rank_pattern"], "model.layers.11.self_attn.v_proj") is None


def test_files_are_byte_reproducible(tmp_path):
    a = mixed()
    for fmt, name, inner in [("native", "x.st", ""), ("kohya", "x.safetensors", ""), ("peft", "x", "adapter_model.safetensors")]:
        contents = set()
        for i in range(4):
            path = tmp_path / f"{i}" / name
            a.save(path, format=fmt)
            contents.add((path / inner).read_bytes() if inner else path.read_bytes())
        assert len(contents) == 1, fmt


def test_layers_load_in_model_order(tmp_path):
    names = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1, 2, 10, 11) for m in ("q_proj", "v_proj")]
    a = Adapter({n: LoraLayer(torch.zeros(1, 2), torch.zeros(2, 1), 1) for n in reversed(names)})
    a.save(tmp_path / "a.st")
    assert list(ao.load(tmp_path / "a.st")) == names


def test_default_format_follows_the_path(tmp_path):
    a = mixed()
    a.save(tmp_path / "x.st")
    a.save(tmp_path / "x_dir")
    assert detect_format(tmp_path / "x.st") == "native" and detect_format(tmp_path / "x_dir") == "peft"
    assert detect_format(tmp_path / "x_dir" / "adapter_model.safetensors") == "peft"


def test_dora_round_trips_in_peft_and_native_but_not_kohya(tmp_path):
    g = torch.Generator().manual_seed(3)
    d = Adapter({Q: LoraLayer(torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g), 4, magnitude=torch.rand(16, generator=g))})
    for fmt, name in [("peft", "d"), ("native", "d.st")]:
        d.save(tmp_path / name, format=fmt)
        loaded = ao.load(tmp_path / name)
        assert loaded.is_dora
        assert_same(d, loaded)
    with pytest.raises(FormatError, match="DoRA"):
        d.save(tmp_path / "d.safetensors", format="kohya")
    assert not (tmp_path / "d.safetensors").exists() and leftovers(tmp_path) == []


def test_rslora_and_alpha_pattern_resolve_to_per_layer_alpha(tmp_path):
    g = torch.Generator().manual_seed(4)
    A1, B1, A2, B2 = torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g), torch.randn(9, 8, generator=g), torch.randn(6, 9, generator=g)
    tensors = {
        f"base_model.model.{Q}.lora_A.weight": A1,
        f"base_model.model.{Q}.lora_B.weight": B1,
        f"base_model.model.{V}.lora_A.weight": A2,
        f"base_model.model.{V}.lora_B.weight": B2,
    }
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "use_rslora": True, "rank_pattern": {"v_proj": 9}, "alpha_pattern": {"v_proj": 3}}
    (tmp_path / "p").mkdir()
    save_file(tensors, str(tmp_path / "p" / "adapter_model.safetensors"))
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(config))
    a = ao.load(tmp_path / "p")
    torch.testing.assert_close(a.delta(Q), 16 / math.sqrt(4) * B1 @ A1)
    torch.testing.assert_close(a.delta(V), 3 / math.sqrt(9) * B2 @ A2)


# ---------------------------------------------------------------- kohya written by other tools


def test_foreign_kohya_file_loads_with_flat_names(tmp_path):
    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g)
    down2, up2 = torch.randn(2, 12, generator=g), torch.randn(12, 2, generator=g)
    tensors = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0, dtype=torch.float16),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down2,  # no alpha: alpha = rank
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up2,
    }
    save_file(tensors, str(tmp_path / "foreign.safetensors"), metadata={"ss_network_dim": "4", "ss_network_alpha": "2"})
    a = ao.load(tmp_path / "foreign.safetensors")
    assert a.metadata["format"] == "kohya"
    assert sorted(a) == ["lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    torch.testing.assert_close(a.delta("lora_te_text_model_encoder_layers_0_self_attn_q_proj"), 2.0 / 4 * up @ down)
    torch.testing.assert_close(a.delta("lora_te_text_model_encoder_layers_0_mlp_fc1"), up2 @ down2)


def test_our_kohya_files_use_kohya_names_and_header(tmp_path):
    mixed().save(tmp_path / "k.safetensors", format="kohya")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "k.safetensors"), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_model_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_model_layers_0_self_attn_q_proj.alpha" in keys
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert json.loads(meta[kohya.MODULES_KEY])["lora_model_layers_0_self_attn_q_proj"] == Q


@pytest.mark.parametrize(
    ("tensors", "words"),
    [
        ({"lora_x.lora_down.weight": torch.zeros(2, 3, 1, 1), "lora_x.lora_up.weight": torch.zeros(4, 2, 1, 1)}, "convolution"),
        ({"lora_x.lora_down.weight": torch.zeros(2, 3)}, "lacks lora_down or lora_up"),
        ({"lora_x.lora_down.weight": torch.zeros(2, 3), "lora_x.lora_up.weight": torch.zeros(4, 2), "lora_x.dora_scale": torch.zeros(1, 3)}, "DoRA"),
        ({"lora_x.lora_down.weight": torch.zeros(2, 3), "lora_x.lora_up.weight": torch.zeros(4, 2), "lora_x.hada_w1_a": torch.zeros(2)}, "unexpected tensor"),
    ],
)
def test_unsupported_kohya_files_are_refused(tmp_path, tensors, words):
    save_file(tensors, str(tmp_path / "k.safetensors"))
    with pytest.raises(FormatError, match=words):
        ao.load(tmp_path / "k.safetensors")


# ---------------------------------------------------------------- broken, missing, unsafe


def write_peft(directory: Path, tensors: dict, config: dict | str) -> Path:
    directory.mkdir()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return directory


AB = {f"base_model.model.{Q}.lora_A.weight": torch.zeros(2, 4), f"base_model.model.{Q}.lora_B.weight": torch.zeros(4, 2)}


@pytest.mark.parametrize(
    ("tensors", "config", "words"),
    [
        (AB, "{not json", "not valid JSON"),
        (AB, {"peft_type": "IA3"}, "only LoRA adapters"),
        ({**AB, "base_model.model.lm_head.weight": torch.zeros(3, 3)}, {"peft_type": "LORA"}, "not LoRA factors"),
        ({**AB, f"base_model.model.{Q}.lora_B.bias": torch.zeros(4)}, {"peft_type": "LORA"}, "not LoRA factors"),
        ({f"base_model.model.{Q}.lora_A.weight": torch.zeros(2, 4)}, {"peft_type": "LORA"}, "lacks lora_B"),
    ],
)
def test_bad_peft_directories(tmp_path, tensors, config, words):
    write_peft(tmp_path / "p", tensors, config)
    with pytest.raises(FormatError, match=words):
        ao.load(tmp_path / "p")


def test_missing_paths(tmp_path):
    with pytest.raises(FormatError, match="no such file or directory"):
        ao.load(tmp_path / "nothing.st")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_config.json").write_text("{}")
    with pytest.raises(FormatError, match="no adapter_model.safetensors"):
        ao.load(tmp_path / "p")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match=r"not a recognised adapter \(expected [^;]*\)$"):
        ao.load(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")  # a model directory given where an adapter goes
    with pytest.raises(FormatError, match=r"not a recognised adapter .*; it looks like a model checkpoint: pass it as the base \(--base\)$"):
        ao.load(tmp_path / "empty")


def test_corrupt_files(tmp_path):
    (tmp_path / "garbage.st").write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    with pytest.raises(FormatError, match="not a readable safetensors file"):
        ao.load(tmp_path / "garbage.st")
    mixed().save(tmp_path / "good.st")
    data = (tmp_path / "good.st").read_bytes()
    (tmp_path / "truncated.st").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="not a readable safetensors file"):
        ao.load(tmp_path / "truncated.st")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FormatError, match="not a recognised adapter"):
        ao.load(tmp_path / "notes.txt")
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, str(tmp_path / "base.safetensors"))
    with pytest.raises(FormatError, match="not a recognised adapter"):
        ao.load(tmp_path / "base.safetensors")


def test_corrupt_native_header(tmp_path):
    save_file(AB, str(tmp_path / "bad.st"), metadata={"adapter_config": "{broken"})
    with pytest.raises(FormatError, match="corrupt adapter metadata"):
        ao.load(tmp_path / "bad.st")


class _Trap:
    """Unpickling this creates a marker file: proof that something unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["adapter.bin", "adapter.pt", "adapter.pth", "adapter.ckpt", "adapter.safetensors"])
def test_pickle_is_never_loaded(tmp_path, name):
    marker = tmp_path / "unpickled"
    (tmp_path / name).write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(FormatError):
        ao.load(tmp_path / name)
    assert not marker.exists()


def test_peft_directory_with_only_a_pickle_is_refused(tmp_path):
    marker = tmp_path / "unpickled"
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (tmp_path / "p" / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(FormatError, match="pickle"):
        ao.load(tmp_path / "p")
    assert not marker.exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(("fmt", "name"), [("native", "n.st"), ("peft", "p"), ("kohya", "k.safetensors")])
def test_nonfinite_factors_refused_unless_allowed(tmp_path, fmt, name, bad):
    a = mixed()
    B = a[V].B.clone()
    B[1, 1] = bad
    broken = Adapter({**a, V: LoraLayer(a[V].A, B, a[V].alpha)})
    with pytest.raises(NonFiniteError, match="lora_B .1 of"):
        broken.save(tmp_path / name, format=fmt)
    assert not (tmp_path / name).exists()
    broken.save(tmp_path / name, format=fmt, allow_nonfinite=True)
    with pytest.raises(NonFiniteError) as info:
        ao.load(tmp_path / name)
    assert V in str(info.value) and "allow_nonfinite" in str(info.value)
    loaded = ao.load(tmp_path / name, allow_nonfinite=True)
    assert loaded.nonfinite_layers() == [V]


def test_nonfinite_kohya_alpha_is_refused(tmp_path):
    save_file(
        {"lora_x.lora_down.weight": torch.ones(2, 3), "lora_x.lora_up.weight": torch.ones(4, 2), "lora_x.alpha": torch.tensor(float("nan"))},
        str(tmp_path / "k.safetensors"),
    )
    with pytest.raises(NonFiniteError, match="lora_x"):
        ao.load(tmp_path / "k.safetensors")


# ---------------------------------------------------------------- writing


def test_existing_output_is_refused_then_forced(tmp_path):
    a, b = mixed(seed=1), mixed(seed=2)
    for fmt, name in [("native", "o.st"), ("peft", "o_dir"), ("kohya", "o.safetensors")]:
        a.save(tmp_path / name, format=fmt)
        with pytest.raises(OutputExistsError, match="already exists"):
            b.save(tmp_path / name, format=fmt)
        assert_same(a, ao.load(tmp_path / name))  # untouched
        b.save(tmp_path / name, format=fmt, force=True)
        assert_same(b, ao.load(tmp_path / name))
    assert leftovers(tmp_path) == []


def test_force_replaces_a_file_with_a_directory_and_back(tmp_path):
    a = mixed()
    (tmp_path / "out").write_text("old")
    a.save(tmp_path / "out", format="peft", force=True)
    assert detect_format(tmp_path / "out") == "peft"
    (tmp_path / "out.st").mkdir()
    a.save(tmp_path / "out.st", format="native", force=True)
    assert detect_format(tmp_path / "out.st") == "native"
    assert leftovers(tmp_path) == []


def test_failed_writes_leave_nothing(tmp_path):
    for fmt, name in [("native", "e.st"), ("peft", "e_dir"), ("kohya", "e.safetensors")]:
        with pytest.raises(FormatError, match="no layers"):
            Adapter({}).save(tmp_path / name, format=fmt)
    clash = Adapter({"a.b_c": LoraLayer(torch.zeros(1, 2), torch.zeros(2, 1), 1), "a_b.c": LoraLayer(torch.zeros(1, 2), torch.zeros(2, 1), 1)})
    with pytest.raises(FormatError, match="flatten to the same kohya name"):
        clash.save(tmp_path / "clash.safetensors", format="kohya")
    assert list(tmp_path.iterdir()) == []


def test_bad_format_names_and_suffixes(tmp_path):
    with pytest.raises(FormatError, match="unknown format 'onnx'"):
        mixed().save(tmp_path / "x.onnx", format="onnx")
    with pytest.raises(FormatError, match=r"\.st or \*\.safetensors"):
        mixed().save(tmp_path / "x.bin", format="native")
    with pytest.raises(FormatError, match=r"\.safetensors or \*\.st"):
        mixed().save(tmp_path / "plain", format="kohya")
    assert list(tmp_path.iterdir()) == []


def test_inputs_are_never_modified(tmp_path):
    a = mixed()
    a.save(tmp_path / "in.st")
    before = (tmp_path / "in.st").read_bytes()
    loaded = ao.load(tmp_path / "in.st")
    (loaded * 2).compress(rank=2).save(tmp_path / "out.st")
    loaded.save(tmp_path / "copy", format="peft")
    assert (tmp_path / "in.st").read_bytes() == before
