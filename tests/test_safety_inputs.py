"""Malformed input is refused in bounded time with the library's own error, and formats mean what
their owners (PEFT, sd-scripts, safetensors) say they mean: one regression test per case.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import adapterops as ao
from adapterops import Adapter, LoraLayer
from adapterops.checkpoint import Checkpoint, match_layers
from adapterops.cli import main
from adapterops.errors import AdapterOpsError, BaseMismatchError, FormatError
from adapterops.formats import patterns, peft

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.1.self_attn.v_proj"


def factors(out: int, inp: int, r: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)


def peft_dir(path: Path, config: dict, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        (a, b), (c, d) = factors(8, 6, 4, 0), factors(8, 6, 4, 1)
        tensors = {f"base_model.model.{Q}.lora_A.weight": a, f"base_model.model.{Q}.lora_B.weight": b,
                   f"base_model.model.{V}.lora_A.weight": c, f"base_model.model.{V}.lora_B.weight": d}
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def tiny_base(path: Path) -> Path:
    """A two-shard safetensors checkpoint with an index and a llama config (no transformers needed)."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    shards = {
        "model-00001-of-00002.safetensors": {f"{Q}.weight": torch.randn(8, 6, generator=g), "model.embed.weight": torch.randn(4, 6, generator=g)},
        "model-00002-of-00002.safetensors": {f"{V}.weight": torch.randn(8, 6, generator=g), "model.norm.weight": torch.randn(6, generator=g)},
    }
    for name, tensors in shards.items():
        save_file(tensors, str(path / name), metadata={"format": "pt"})
    weight_map = {t: name for name, tensors in shards.items() for t in tensors}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8")
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    return path


def hashes(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error_line(result, *words: str) -> None:
    assert result.exit_code not in (0, None), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    for name in ("Traceback", "TypeError", "ValueError", "KeyError", "re.error", "RecursionError", "OverflowError"):
        assert name not in result.stderr


def rewrite_header(file: Path, edit) -> None:
    """Apply ``edit(header_dict)`` to a safetensors file's JSON header, keeping the data bytes."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


# ---------------------------------------------------------------- alpha_pattern / rank_pattern


def test_catastrophic_pattern_keys_do_not_hang(tmp_path):
    long_name = "model." + ".".join(["a" * 40] * 5) + ".q_proj"
    for key in ["(.|.)*z", "(a|aa)*b", "(a*)*b", "(.*.*)*z", "((a+)+)+z"]:
        start = time.perf_counter()
        assert patterns.matches(key, long_name) is False
        assert time.perf_counter() - start < 5, key  # a hang detector: backtracking would take years
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {"(.|.)*z": 99, "v_proj": 2}}
    adapter = ao.load(peft_dir(tmp_path / "p", config))
    assert adapter[Q].alpha == 8 and adapter[V].alpha == 2


def test_pattern_keys_follow_peft_first_match_and_literal_fallback():
    from peft.utils.other import get_pattern_key

    keys = {r"layers\.\d+\.self_attn\.q_proj": 1, "q_proj": 2, "self_attn.v_proj": 3, "a)|(b": 4, "xq_proj": 5}
    keys["(?i:Q)_PROJ"] = 6  # no repeat or alternation: Python's own engine evaluates it, flags and all
    for module in [Q, V, "b", "a", "model.xq_proj", "q_proj", "model.layers.0.self_attn.k_proj", "x.Q_proj"]:
        theirs = get_pattern_key(keys.keys(), module)
        ours = patterns.pattern_key(keys, module)
        assert (ours if ours is not None else module) == theirs, module


_ATOMS = st.sampled_from(["a", "b", ".", r"\.", r"\d", r"\w", "[ab]", "[^a]", "_", "0", "x"])


@st.composite
def small_regex(draw, depth: int = 0) -> str:
    kind = draw(st.sampled_from(["atom", "seq", "alt", "star", "plus", "opt", "count", "group", "anchor"] if depth < 3 else ["atom"]))
    if kind == "atom":
        return draw(_ATOMS)
    if kind == "anchor":
        return draw(st.sampled_from(["^", "$", r"\b", r"\B", r"\A", r"\Z"]))
    sub = draw(small_regex(depth + 1))
    if kind == "seq":
        return sub + draw(small_regex(depth + 1))
    if kind == "alt":
        return f"{sub}|{draw(small_regex(depth + 1))}"
    if kind == "group":
        return f"(?:{sub})" if draw(st.booleans()) else f"({sub})"
    suffix = {"star": "*", "plus": "+", "opt": "?", "count": draw(st.sampled_from(["{2}", "{1,3}", "{0,2}", "{2,}"]))}[kind]
    lazy = "?" if draw(st.booleans()) else ""
    return f"(?:{sub}){suffix}{lazy}"


@settings(max_examples=300, deadline=None)
@given(key=small_regex(), name=st.text(alphabet="ab._0x\n", max_size=10))
def test_linear_matcher_equals_python_re(key, name):
    """The NFA gives re.match's answer for PEFT's wrapped pattern (short names: re cannot blow up here)."""
    expected = re.match(rf"(.*\.)?({key})$", name) is not None
    assert patterns.matches(key, name) is expected


@pytest.mark.parametrize(("key", "words"), [
    (r"(a)\1", "backreference"), ("(?=a)a", "lookaround"), ("(?i)q_proj", "valid regular expression"),
    ("(?i:q)_proj|x", "(?i)"), ("(?>a)", "atomic"), ("a*+", "possessive"), ("a{30000}", "repeat count"),
    ("((a{100}){100}){100}", "NFA states"), ("(", "valid regular expression"), ("(" * 2000 + ")" * 2000, "q_proj"),
])
def test_unsafe_or_invalid_pattern_keys_are_refused(tmp_path, key, words):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {key: 4}}
    with pytest.raises(FormatError, match=re.escape(words) if words != "q_proj" else "rank_pattern key"):
        ao.load(peft_dir(tmp_path / "p", config))


def test_info_on_a_catastrophic_pattern_is_quick(tmp_path):
    p = peft_dir(tmp_path / "p", {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {"(.|.)*z": 1}})
    before = hashes(p)
    result = cli("info", p, "--json")
    assert result.exit_code == 0, result.output
    assert hashes(p) == before


# ---------------------------------------------------------------- config semantics = PEFT's / sd-scripts'


def test_config_defaults_are_peft_loraconfig_defaults():
    from peft import LoraConfig

    config = LoraConfig()
    for field, value in peft.CONFIG_DEFAULTS.items():
        assert getattr(config, field) == value, field
    assert str(config.peft_type.value) == "LORA"


def test_missing_lora_alpha_means_peft_default_8_not_rank(tmp_path):
    """Measured against PeftModel: a config without lora_alpha scales by 8 / r."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))
    name = "model.layers.0.self_attn.q_proj"
    a, b = factors(16, 16, 4)
    p = peft_dir(tmp_path / "p", {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"},
                 {f"base_model.model.{name}.lora_A.weight": a, f"base_model.model.{name}.lora_B.weight": b})
    ours = ao.load(p)
    assert ours[name].alpha == 8
    wrapped = PeftModel.from_pretrained(model, str(p))
    layer = wrapped.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(ours.delta(name), layer.get_delta_weight("default"))


def test_rank_that_disagrees_with_the_config_is_refused(tmp_path):
    with pytest.raises(FormatError, match=r"rank 4 but the config says r = 8"):
        ao.load(peft_dir(tmp_path / "p", {"peft_type": "LORA", "lora_alpha": 8}))  # r missing: PEFT's default 8
    with pytest.raises(FormatError, match=r"rank_pattern\['v_proj'\] = 2"):
        ao.load(peft_dir(tmp_path / "q", {"peft_type": "LORA", "r": 4, "rank_pattern": {"v_proj": 2}}))


@pytest.mark.parametrize(("field", "value"), [("r", "4"), ("r", 0), ("r", True), ("lora_alpha", "8"), ("use_rslora", "yes"),
                                              ("alpha_pattern", ["q_proj"]), ("rank_pattern", {"q_proj": 1.5}), ("peft_type", 7)])
def test_config_fields_of_the_wrong_type_are_refused(tmp_path, field, value):
    with pytest.raises(FormatError, match=field if field != "peft_type" else "peft_type"):
        ao.load(peft_dir(tmp_path / "p", {"peft_type": "LORA", "r": 4, "lora_alpha": 8, field: value}))


def test_config_that_is_not_an_object_is_refused(tmp_path):
    p = peft_dir(tmp_path / "p", {})
    (p / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(FormatError, match="expected a JSON object"):
        ao.load(p)


def kohya_file(path: Path, alpha: torch.Tensor | None, extra: dict | None = None, metadata: dict | None = None) -> Path:
    a, b = factors(8, 6, 4)
    tensors = {"lora_te_x.lora_down.weight": a, "lora_te_x.lora_up.weight": b, **(extra or {})}
    if alpha is not None:
        tensors["lora_te_x.alpha"] = alpha
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(("alpha", "expected"), [(None, 4.0), (torch.tensor(0.0), 4.0), (torch.tensor(2.0), 2.0),
                                                 (torch.tensor(3, dtype=torch.int64), 3.0), (torch.tensor(1.5, dtype=torch.bfloat16), 1.5)])
def test_kohya_alpha_follows_sd_scripts(tmp_path, alpha, expected):
    """sd-scripts' LoRAModule: ``alpha = lora_dim if alpha is None or alpha == 0 else alpha``."""
    assert ao.load(kohya_file(tmp_path / "k.safetensors", alpha))["lora_te_x"].alpha == expected


@pytest.mark.parametrize("alpha", [torch.tensor([1.0, 2.0]), torch.tensor(True)])
def test_kohya_alpha_that_is_not_one_number_is_refused(tmp_path, alpha):
    with pytest.raises(FormatError, match="must be one number"):
        ao.load(kohya_file(tmp_path / "k.safetensors", alpha))


# ---------------------------------------------------------------- silently accepted nonsense


def test_two_tensors_for_one_factor(tmp_path):
    (a, b), (a2, _) = factors(8, 6, 4), factors(8, 6, 4, 1)
    tensors = {f"base_model.model.{Q}.lora_A.weight": a, f"base_model.model.{Q}.lora_A.default.weight": a2,
               f"base_model.model.{Q}.lora_B.weight": b}
    with pytest.raises(FormatError, match="two lora_A tensors"):
        ao.load(peft_dir(tmp_path / "p", {"peft_type": "LORA", "r": 4}, tensors))
    tensors = {f"{Q}.lora_A.weight": a, f"base_model.model.{Q}.lora_A.weight": a2, f"{Q}.lora_B.weight": b}
    with pytest.raises(FormatError, match="two lora_A tensors"):
        ao.load(peft_dir(tmp_path / "q", {"peft_type": "LORA", "r": 4}, tensors))


def test_kohya_module_map_sending_two_layers_to_one_module(tmp_path):
    a, b = factors(8, 6, 4)
    tensors = {"lora_a_b.lora_down.weight": a, "lora_a_b.lora_up.weight": b, "a.b.lora_down.weight": a.clone(), "a.b.lora_up.weight": b.clone()}
    save_file(tensors, str(tmp_path / "k.safetensors"), metadata={"adapterops_modules": json.dumps({"lora_a_b": "a.b"})})
    with pytest.raises(FormatError, match="both map to module a.b; one would be dropped"):
        ao.load(tmp_path / "k.safetensors")
    tensors = {"lora_a_b.lora_down.weight": a, "lora_a_b.lora_up.weight": b, "lora_a_c.lora_down.weight": a.clone(), "lora_a_c.lora_up.weight": b.clone()}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"adapterops_modules": json.dumps({"lora_a_b": "a_c"})})
    with pytest.raises(FormatError, match="flattens to lora_a_c, not lora_a_b"):
        ao.load(tmp_path / "m.safetensors")
    save_file(tensors, str(tmp_path / "n.safetensors"), metadata={"adapterops_modules": "[1]"})
    with pytest.raises(FormatError, match="expected a JSON object"):
        ao.load(tmp_path / "n.safetensors")


def test_adapter_with_no_lora_tensors(tmp_path, ):
    with pytest.raises(FormatError, match="holds no LoRA tensors"):
        ao.load(peft_dir(tmp_path / "p", {"peft_type": "LORA"}, {}))
    save_file({}, str(tmp_path / "e.st"), metadata={"adapter_config": json.dumps({"peft_type": "LORA"})})
    with pytest.raises(FormatError, match="holds no LoRA tensors"):
        ao.load(tmp_path / "e.st")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.uint8])
def test_integer_or_bool_factors(tmp_path, dtype):
    tensors = {f"{Q}.lora_A.weight": torch.ones(4, 6, dtype=dtype), f"{Q}.lora_B.weight": torch.ones(8, 4)}
    with pytest.raises(FormatError, match="lora_A is .*must be float16, bfloat16, float32 or float64"):
        ao.load(peft_dir(tmp_path / "p", {"peft_type": "LORA", "r": 4}, tensors))


@pytest.mark.parametrize(("a", "b"), [((4, 0), (8, 4)), ((4, 6), (0, 4))])
def test_zero_dimensions(tmp_path, a, b):
    tensors = {f"{Q}.lora_A.weight": torch.ones(a), f"{Q}.lora_B.weight": torch.ones(b)}
    with pytest.raises(FormatError, match="zero dimension"):
        ao.load(peft_dir(tmp_path / "p", {"peft_type": "LORA", "r": 4}, tensors))


def test_inner_ranks_that_disagree_name_the_layer(tmp_path):
    tensors = {f"{Q}.lora_A.weight": torch.ones(4, 6), f"{Q}.lora_B.weight": torch.ones(8, 3)}
    with pytest.raises(FormatError, match=f"layer {re.escape(Q)}: lora_A is \\[4, 6\\] but lora_B is \\[8, 3\\]"):
        ao.load(peft_dir(tmp_path / "p", {"peft_type": "LORA", "r": 4}, tensors))


def test_dora_flag_and_tensors_must_agree(tmp_path):
    a, b = factors(8, 6, 4)
    tensors = {f"{Q}.lora_A.weight": a, f"{Q}.lora_B.weight": b}
    with pytest.raises(FormatError, match="use_dora is true"):
        ao.load(peft_dir(tmp_path / "p", {"peft_type": "LORA", "r": 4, "use_dora": True}, tensors))
    with pytest.raises(FormatError, match="use_dora is false"):
        ao.load(peft_dir(tmp_path / "q", {"peft_type": "LORA", "r": 4}, {**tensors, f"{Q}.lora_magnitude_vector": torch.ones(8)}))


def test_transposed_delta_is_refused_for_a_non_conv1d_base():
    shapes = {f"{Q}.weight": (6, 8)}  # stored (in, out), but nothing says the model does that
    with pytest.raises(BaseMismatchError, match="transposed.*fan_in_fan_out"):
        match_layers({Q: (8, 6)}, shapes)
    assert match_layers({Q: (8, 6)}, shapes, fan_in_fan_out=True)[Q].transposed


def test_transposed_adapter_merge_is_refused_through_the_cli(tmp_path):
    base = tiny_base(tmp_path / "base")
    a, b = factors(6, 8, 2)  # delta [6, 8] against a [8, 6] weight
    Adapter({Q: LoraLayer(a, b, 2.0)}).save(tmp_path / "t.st")
    before = hashes(base)
    result = cli("merge", "-b", base, "-a", tmp_path / "t.st", "-o", tmp_path / "out")
    assert_one_error_line(result, "transposed")
    assert hashes(base) == before and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- base checkpoint headers


def _negative(h):
    h[f"{Q}.weight"]["data_offsets"] = [-8, 184]


def _overlap(h):
    begin, end = h["model.embed.weight"]["data_offsets"]
    h["model.embed.weight"]["data_offsets"] = [begin - 8, end - 8]


def _beyond(h):
    for info in h.values():
        if isinstance(info, dict) and "data_offsets" in info:
            info["data_offsets"] = [x + 96 for x in info["data_offsets"]]


def _shape(h):
    h[f"{Q}.weight"]["shape"] = [6, 8, 1, 2]


def _same_bytes_other_shape(h):
    h[f"{Q}.weight"]["shape"] = [6, 8]  # same byte count: valid, and must read as [6, 8]


def _dtype(h):
    h[f"{Q}.weight"]["dtype"] = "F33"


def _dtype_size(h):
    h[f"{Q}.weight"]["dtype"] = "F64"


def _metadata(h):
    h["__metadata__"] = {"format": 1}


def _bool_shape(h):
    h[f"{Q}.weight"]["shape"] = [True, 48]


HEADER_EDITS = {"negative offset": _negative, "overlapping offsets": _overlap, "out of bounds": _beyond,
                "shape vs bytes": _shape, "unknown dtype": _dtype, "dtype size vs bytes": _dtype_size,
                "metadata not strings": _metadata, "bool in shape": _bool_shape}


@pytest.mark.parametrize("case", sorted(HEADER_EDITS))
def test_bad_shard_headers_are_refused_before_anything_is_written(tmp_path, case):
    base = tiny_base(tmp_path / "base")
    shard = base / "model-00001-of-00002.safetensors"
    rewrite_header(shard, HEADER_EDITS[case])
    with pytest.raises(Exception):  # noqa: B017 - the oracle: safetensors itself refuses it too
        with safe_open(str(shard), framework="pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(FormatError, match=re.escape(shard.name)):
        Checkpoint(base)
    a, b = factors(8, 6, 2)
    Adapter({Q: LoraLayer(a, b, 2.0)}).save(tmp_path / "a.st")
    before = hashes(base)
    result = cli("merge", "-b", base, "-a", tmp_path / "a.st", "-o", tmp_path / "out")
    assert_one_error_line(result, shard.name)
    assert hashes(base) == before and not (tmp_path / "out").exists()


def test_a_header_safetensors_accepts_reads_the_same(tmp_path):
    base = tiny_base(tmp_path / "base")
    shard = base / "model-00001-of-00002.safetensors"
    rewrite_header(shard, _same_bytes_other_shape)
    with safe_open(str(shard), framework="pt") as f:
        expected = f.get_tensor(f"{Q}.weight")
    assert torch.equal(Checkpoint(base).read(f"{Q}.weight"), expected) and expected.shape == (6, 8)


def _raw(header: bytes, data: bytes = b"\0\0\0\0") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize(("raw", "words"), [
    (struct.pack("<Q", 200_000_000) + b"{}", "implausible"),
    (struct.pack("<Q", 2) + b"[]", "start with '{'"),
    (struct.pack("<Q", 8) + b'{"a":1, ', "not valid JSON"),
    (struct.pack("<Q", 2) + b"\xff}", "UTF-8"),
    (struct.pack("<Q", 2) + b"{}" + b"\0" * 8, "no tensor covers"),
    (_raw(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{}}'), "twice"),
    (_raw(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}'), "two non-negative"),
    (_raw(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}'), "end before they begin"),
    (_raw(b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}'), "non-negative integers"),
    (_raw(b'{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}'), "2**64 elements"),
    (_raw(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', data=b"\0" * 3), "truncated"),
    (_raw(b'{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}', data=b"\0"), "takes 1.5 bytes"),
    (_raw(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}, "__metadata__": [1]}'), "__metadata__"),
    (_raw(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}, "b": 3}'), "not an object"),
    (_raw(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}, "b": {"dtype":"F32","shape":[1]}}'), "lacks data_offsets"),
    (_raw(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}, "b": {"dtype":"F32","shape":[1],"data_offsets":[8,12]}}', data=b"\0" * 12), "gap of 4 bytes"),
])
def test_raw_header_defects(tmp_path, raw, words):
    (tmp_path / "x.safetensors").write_bytes(raw)
    with pytest.raises(FormatError, match=re.escape(words)):
        Checkpoint(tmp_path / "x.safetensors")


def _drop(m):
    m.pop("model.norm.weight")


def _wrong_shard(m):
    m["model.norm.weight"] = "model-00001-of-00002.safetensors"


def _phantom(m):
    m["model.ghost.weight"] = "model-00001-of-00002.safetensors"


def _outside(m):
    m["model.norm.weight"] = "../model-00002-of-00002.safetensors"


def _absolute(m):
    m["model.norm.weight"] = "/etc/passwd"


def _pickle(m):
    m["model.norm.weight"] = "pytorch_model.bin"


INDEX_EDITS = {"unlisted tensor": (_drop, "missing from weight_map"), "wrong shard": (_wrong_shard, "but stored in"),
               "phantom tensor": (_phantom, "no shard holds it"), "outside the directory": (_outside, "outside the checkpoint"),
               "absolute path": (_absolute, "outside the checkpoint"), "pickle shard": (_pickle, "not a safetensors file")}


@pytest.mark.parametrize("case", sorted(INDEX_EDITS))
def test_index_must_agree_with_the_shards(tmp_path, case):
    base = tiny_base(tmp_path / "base")
    index = base / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit, words = INDEX_EDITS[case]
    edit(data["weight_map"])
    index.write_text(json.dumps(data))
    with pytest.raises(FormatError, match=re.escape(words)):
        Checkpoint(base)


@pytest.mark.parametrize("metadata", [[1], "x", 3])
def test_index_metadata_must_be_an_object_and_is_checked_before_any_work(tmp_path, metadata):
    base = tiny_base(tmp_path / "base")
    index = base / "model.safetensors.index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "metadata": metadata}))
    with pytest.raises(FormatError, match="metadata is .*, expected a JSON object"):
        Checkpoint(base)
    a, b = factors(8, 6, 2)
    Adapter({Q: LoraLayer(a, b, 2.0)}).save(tmp_path / "a.st")
    result = cli("merge", "-b", base, "-a", tmp_path / "a.st", "-o", tmp_path / "out")
    assert_one_error_line(result, "metadata is", "expected a JSON object")
    assert not (tmp_path / "out").exists()


def test_truncated_base_shard_names_the_file(tmp_path):
    base = tiny_base(tmp_path / "base")
    shard = base / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-5])
    a, b = factors(8, 6, 2)
    Adapter({Q: LoraLayer(a, b, 2.0)}).save(tmp_path / "a.st")
    result = cli("merge", "-b", base, "-a", tmp_path / "a.st", "-o", tmp_path / "out")
    assert_one_error_line(result, shard.name, "truncated")
    assert not (tmp_path / "out").exists()


def test_read_exact_names_a_file_truncated_after_its_header_was_read(tmp_path):
    base = tiny_base(tmp_path / "base")
    ck = Checkpoint(base)
    shard = base / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(FormatError, match=re.escape(str(shard)) + ".*truncated"):
        ck.read("model.norm.weight" if ck.entry("model.norm.weight").offset > ck.entry(f"{V}.weight").offset else f"{V}.weight")


def test_read_exact_without_a_name_still_names_the_file(tmp_path):
    from adapterops._safetensors import read_exact

    (tmp_path / "short.bin").write_bytes(b"abc")
    fd = os.open(tmp_path / "short.bin", os.O_RDONLY)
    try:
        with pytest.raises(FormatError, match=re.escape(str(tmp_path / "short.bin")) + ": truncated"):
            read_exact(fd, torch.empty(8, dtype=torch.uint8), 0)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- names and pickles


def test_non_utf8_file_names_load(tmp_path):
    a, b = factors(8, 6, 2)
    adapter = Adapter({Q: LoraLayer(a, b, 2.0)})
    adapter.save(tmp_path / "plain.st")
    name = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9-\xff.st")  # Latin-1 bytes: not UTF-8
    os.rename(tmp_path / "plain.st", name)
    loaded = ao.load(name)
    assert torch.equal(loaded[Q].A, a) and torch.equal(loaded[Q].B, b)
    result = cli("info", name)  # printed with the odd byte escaped, not a UnicodeEncodeError
    assert result.exit_code == 0 and "caf\\xe9-\\xff.st" in result.stdout, result.output
    assert_one_error_line(cli("info", name + ".missing"), "caf\\xe9-\\xff.st.missing", "no such file")
    base = tiny_base(Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/base-\xff")))
    assert torch.equal(Checkpoint(base).read(f"{Q}.weight"), Checkpoint(base).read(f"{Q}.weight"))
    assert len(Checkpoint(base).names()) == 4


def test_train_refuses_a_pickle_only_base_before_transformers(tmp_path):
    import pickle

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (base / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    result = cli("train", "--base", base, "--data", tmp_path / "d.jsonl", "-o", tmp_path / "out.st")
    assert_one_error_line(result, "pytorch_model.bin", "pickle")
    assert not marker.exists() and not (tmp_path / "out.st").exists()


def test_library_errors_are_adapterops_errors(tmp_path):
    """Loaders raise only AdapterOpsError subclasses for bad input (the fuzz test covers many more)."""
    for raw in [b"", b"\0" * 7, struct.pack("<Q", 2**64 - 1), struct.pack("<Q", 4) + b"{\"a\"", struct.pack("<Q", 2) + b"{}"]:
        (tmp_path / "x.st").write_bytes(raw)
        with pytest.raises(AdapterOpsError):
            ao.load(tmp_path / "x.st")


def test_an_oversized_config_is_refused_without_reading_it(tmp_path):
    d = tmp_path / "peft"
    a, b = factors(8, 6, 2)
    Adapter({Q: LoraLayer(a, b, 2.0)}).save(d, format="peft")
    with open(d / "adapter_config.json", "r+b") as f:
        f.truncate(200_000_000)  # sparse: no disk used, but reading it whole would take 200 MB
    with pytest.raises(FormatError, match="200,000,000 bytes, too large for a config"):
        ao.load(d)


def test_a_tensor_larger_than_memory_is_one_error_with_its_size(tmp_path, monkeypatch):
    """A sparse file whose header declares a 17 GB factor: the allocation fails, and the error says which tensor and how big."""
    import struct

    from adapterops.errors import AdapterOpsError

    n = 2**31
    header = {"lora_A": {"dtype": "F32", "shape": [2, n], "data_offsets": [0, 8 * n]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + 8 * n)
    real = torch.empty

    def empty(*size, **kwargs):
        if size and isinstance(size[0], int) and size[0] > 1 << 30:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 17179869184 bytes")
        return real(*size, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    from adapterops._files import read_safetensors

    with pytest.raises(AdapterOpsError, match=r"huge.safetensors: tensor lora_A \(\[2, 2147483648\] F32\) is 17.2 GB, more than memory holds$"):
        read_safetensors(path)


def test_a_header_is_checked_once_and_again_when_it_changes(tmp_path, monkeypatch):
    """Detecting a format and loading read one header up to three times: it is parsed once; a file
    whose header changed (same name and size) is parsed anew."""
    from safetensors.torch import save_file

    from adapterops import _safetensors

    path = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    parsed = []
    real = _safetensors._parse
    monkeypatch.setattr(_safetensors, "_parse", lambda *args: parsed.append(1) or real(*args))
    first = _safetensors.read_header(path)
    assert _safetensors.read_header(path) is first and len(parsed) == 1
    save_file({"y": torch.zeros(2)}, str(path))  # another name, the same size
    assert list(_safetensors.read_header(path).entries) == ["y"] and len(parsed) == 2
