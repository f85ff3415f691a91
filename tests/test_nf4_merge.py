"""Merging adapters into NF4 bases: re-quantization parity, untouched bytes, loading, the report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from merge_helpers import raw_bytes, read_all
from nf4_helpers import bnb_reference, dense_model_from, load_4bit, logits, save_tiny_llama

import adapterops
from adapterops import Adapter, LoraLayer
from adapterops.checkpoint import INDEX_NAME, Checkpoint
from adapterops.cli import main
from adapterops.merging import plan_merge
from adapterops.quant import dequantize_nf4, from_state_dict, quantize_checkpoint, quantize_nf4, to_state_dict
from adapterops.quant.codec import NF4
from adapterops.quant.nf4 import unpack_codes
from adapterops.rewrite import rewrite

pytest.importorskip("bitsandbytes")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
STATE = ".quant_state.bitsandbytes__nf4"


def dyadic_adapter(checkpoint: Path, *, span: int, shift: int, rank: int = 4, seed: int = 0, only: str = "") -> Adapter:
    """Factors that are small integers times 2**-shift, scale 1: the delta and ``W + delta`` are
    exact in float32 whatever the order of operations, so references can demand equal bytes."""
    ck = Checkpoint(checkpoint)
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for weight in NF4.groups(ck):
        if only not in weight:
            continue
        out, inp = NF4.shape(ck, weight)
        A = torch.randint(-span, span + 1, (rank, inp), generator=g).float() * 2.0**-shift
        B = torch.randint(-span, span + 1, (out, rank), generator=g).float() * 2.0**-shift
        layers[weight[: -len(".weight")]] = LoraLayer(A, B, float(rank))
    return Adapter(layers, {"source": "dyadic"})


def dequantized(tensors: dict[str, torch.Tensor], weight: str) -> torch.Tensor:
    return dequantize_nf4(from_state_dict(tensors, weight)).float()


def requantized(tensors: dict[str, torch.Tensor], weight: str, layer: LoraLayer) -> dict[str, torch.Tensor]:
    """quantize(dequantize(W) + dW), stored as the base stores it."""
    old = from_state_dict(tensors, weight)
    new = quantize_nf4(dequantized(tensors, weight) + layer.B @ layer.A, blocksize=old.blocksize, double_quant=old.double_quant)
    return to_state_dict(dataclasses.replace(new, dtype=old.dtype), weight)


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("nf4merge")
    quantize_checkpoint(save_tiny_llama(tmp / "dense"), tmp / "nf4", progress=False)
    return tmp / "nf4"


@pytest.fixture(scope="module")
def big(base) -> Adapter:
    return dyadic_adapter(base, span=8, shift=7)  # ||dW|| / ||W|| about 14%: a third of the codes move


@pytest.fixture(scope="module")
def small(base) -> Adapter:
    return dyadic_adapter(base, span=1, shift=6, seed=1)  # ||dW|| / ||W|| about 1.6%


@pytest.mark.parametrize("device", DEVICES)
def test_adapted_weights_equal_quantize_of_dequantized_plus_delta(base, big, tmp_path, device):
    adapterops.merge(base, big, tmp_path / "out", device=device, progress=False)
    before, after = read_all(base), read_all(tmp_path / "out")
    assert set(after) == set(before)
    for name, layer in big.items():
        expected = requantized(before, f"{name}.weight", layer)
        for key, tensor in expected.items():
            assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor.reshape(after[key].shape)), key


def test_untouched_tensors_are_byte_identical(base, small, tmp_path):
    adapter = Adapter({n: layer for n, layer in small.items() if "q_proj" in n})
    adapterops.merge(base, adapter, tmp_path / "out", progress=False)
    ck = Checkpoint(base)
    touched = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    for name in ck.names():
        if not any(name == t or name.startswith(t + ".") for t in touched):
            assert raw_bytes(tmp_path / "out", name) == raw_bytes(base, name), name
    assert [f.name for f in Checkpoint(tmp_path / "out").files] == [f.name for f in ck.files]
    assert (tmp_path / "out" / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert json.loads((tmp_path / "out" / INDEX_NAME).read_text())["weight_map"].keys() == json.loads((base / INDEX_NAME).read_text())["weight_map"].keys()


def test_merged_checkpoint_loads_with_transformers(base, big, tmp_path):
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    adapterops.merge(base, big, tmp_path / "out", progress=False)
    tensors = read_all(tmp_path / "out")
    model = load_4bit(tmp_path / "out")
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert torch.equal(dequantize_4bit(module.weight.data, module.weight.quant_state), dequantize_nf4(from_state_dict(tensors, f"{name}.weight")))
    ids = torch.tensor([[1, 2, 3, 5, 8, 13]])
    torch.testing.assert_close(logits(model, ids), logits(dense_model_from(tmp_path / "out", tensors), ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(model, ids), logits(load_4bit(base), ids), atol=1e-3)  # the adapter did something


def test_report_numbers_match_a_direct_computation(base, small, tmp_path):
    """retained = <Q(W + dW) - W, dW> / ||dW||^2 with W the dequantized base; codes_changed the
    share of 4-bit codes that moved."""
    report = adapterops.merge(base, small, tmp_path / "out", progress=False)
    before, after = read_all(base), read_all(tmp_path / "out")
    rows = {r["name"]: r for r in report.rows}
    assert set(rows) == {f"{n}.weight" for n in small}
    for name, layer in small.items():
        weight, row = f"{name}.weight", rows[f"{name}.weight"]
        W, dW = dequantized(before, weight).double(), (layer.B @ layer.A).double()
        Q = dequantized(after, weight).double()
        assert row["retained"] == pytest.approx((((Q - W) * dW).sum() / (dW * dW).sum()).item(), rel=1e-4, abs=1e-6)
        assert row["rel_change"] == pytest.approx((dW.norm() / W.norm()).item(), rel=1e-5)
        old, new = from_state_dict(before, weight), from_state_dict(after, weight)
        moved = (unpack_codes(old.codes, old.numel) != unpack_codes(new.codes, new.numel)).double().mean().item()
        assert row["codes_changed"] == pytest.approx(moved, abs=1e-7)
    assert all(r["retained"] < 0.5 for r in report.rows)  # a 1% delta mostly rounds away (design notes)
    assert report.totals["retained_min"] == min(r["retained"] for r in report.rows)


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dense_output_keeps_the_whole_delta(base, small, tmp_path, dtype, torch_dtype):
    report = adapterops.merge(base, small, tmp_path / "out", dtype=dtype, progress=False)
    before, after = read_all(base), read_all(tmp_path / "out")
    weights = list(NF4.groups(Checkpoint(base)))
    assert not any(k.endswith(STATE) for k in after)
    assert set(after) == {k for k in before if not any(k.startswith(w + ".") for w in weights)}
    for weight in weights:
        W = dequantized(before, weight)
        name = weight[: -len(".weight")]
        expected = (W + small[name].B @ small[name].A) if name in small else W
        assert torch.equal(after[weight], expected.to(torch_dtype)), weight
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == str(torch_dtype).removeprefix("torch.")
    assert all(r["retained"] == pytest.approx(1.0, abs=0.02) for r in report.rows)  # only the final cast rounds
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear and model.dtype == torch_dtype


def test_cli_warns_when_the_delta_rounds_away(base, small, big, tmp_path):
    small.save(tmp_path / "small.st")
    big.save(tmp_path / "big.st")
    result = invoke("merge", "-b", base, "-a", tmp_path / "small.st", "-o", tmp_path / "a", "--json")
    assert result.exit_code == 0, result.output
    assert "warning: re-quantizing to NF4 kept less than 50% of the adapter's change in 14 of 14 merged weights" in result.stderr
    assert "--dtype bf16" in result.stderr
    data = json.loads(result.stdout)
    assert all(0 <= r["codes_changed"] <= 1 and r["retained"] < 0.5 for r in data["rows"])
    result = invoke("merge", "-b", base, "-a", tmp_path / "small.st", "-o", tmp_path / "b", "--quiet")
    assert result.exit_code == 0 and "warning" not in result.stderr
    result = invoke("merge", "-b", base, "-a", tmp_path / "big.st", "-o", tmp_path / "c")
    assert result.exit_code == 0 and "warning" not in result.stderr
    result = invoke("merge", "-b", base, "-a", tmp_path / "small.st", "-o", tmp_path / "d", "--dtype", "bf16")
    assert result.exit_code == 0 and "warning" not in result.stderr


def test_batched_codec_equals_one_weight_at_a_time(base, big, tmp_path):
    ck = Checkpoint(base)
    jobs, _ = plan_merge(ck, [big], [1.0])
    rewrite(ck, tmp_path / "one", jobs, device="cpu", progress=False, batch=1)
    rewrite(ck, tmp_path / "many", jobs, device="cpu", progress=False, batch=8)
    for f in Checkpoint(tmp_path / "one").files:
        assert f.read_bytes() == (tmp_path / "many" / f.name).read_bytes()
    tensors = read_all(base)
    names = [w for w in NF4.groups(ck) if "mlp.up_proj" in w or "mlp.gate_proj" in w]  # equal shapes
    members = [{k: v for k, v in tensors.items() if k == w or k.startswith(w + ".")} for w in names]
    stacked = NF4.decode_many(members, names)
    assert torch.equal(stacked, torch.stack([NF4.decode(m, w) for m, w in zip(members, names)]))
    W = stacked + 0.01
    outputs, extras = NF4.encode_many(W, names, members, None)
    for g, (w, m) in enumerate(zip(names, members)):
        one, extra = NF4.encode(W[g], w, m, None)
        assert all(torch.equal(outputs[g][k], one[k]) for k in one) and torch.equal(extras[g]["codes_changed"], extra["codes_changed"])


def test_merge_into_the_checkpoint_transformers_writes(smollm2_dir, tmp_path):
    """A QLoRA user's base: SmolLM2 quantized by transformers + bitsandbytes at load time."""
    reference = bnb_reference(smollm2_dir)
    adapter = dyadic_adapter(reference, span=4, shift=9, only="self_attn.v_proj")
    report = adapterops.merge(reference, adapter, tmp_path / "out", progress=False)
    assert len(report.rows) == 30
    before, after = read_all(reference), read_all(tmp_path / "out")
    for name in ["model.layers.0.self_attn.v_proj", "model.layers.29.self_attn.v_proj"]:
        expected = requantized(before, f"{name}.weight", adapter[name])
        assert all(torch.equal(after[k], v.reshape(after[k].shape)) for k, v in expected.items())
    untouched = [k for k in before if ".v_proj." not in k]
    assert all(torch.equal(after[k], before[k]) for k in untouched)
    model = load_4bit(tmp_path / "out", num_hidden_layers=2)
    ids = torch.tensor([[1, 504, 3458, 314, 253]])
    dense = dense_model_from(tmp_path / "out", after, num_hidden_layers=2)
    torch.testing.assert_close(logits(model, ids), logits(dense, ids), rtol=1e-5, atol=1e-4)
