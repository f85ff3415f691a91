"""adapterops quantize: parity with transformers + bitsandbytes on a real model, loading, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from merge_helpers import raw_bytes, read_all, tiny_gpt2_model
from nf4_helpers import bnb_reference, dense_model_from, load_4bit, logits, save_tiny_llama

from adapterops.checkpoint import INDEX_NAME, Checkpoint
from adapterops.cli import main
from adapterops.errors import AdapterOpsError
from adapterops.quant import from_state_dict, quantize_checkpoint, quantize_nf4
from adapterops.quant.nf4 import DYNAMIC_CODE

pytest.importorskip("bitsandbytes")
STATE = ".quant_state.bitsandbytes__nf4"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
PROMPT = torch.tensor([[1, 504, 3458, 314, 253, 1789, 28, 2]])


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def quantized_weights(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k[: -len(STATE)] for k in tensors if k.endswith(STATE)]


@pytest.fixture(scope="module")
def smol_nf4(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantize") / "smol-nf4"
    report = quantize_checkpoint(smollm2_dir, out, progress=False, device="cpu")
    return out, report


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


# --- the real model, against transformers + bitsandbytes --------------------------------------


def test_same_keys_codes_and_config_as_transformers(smol_nf4, smollm2_dir):
    out, report = smol_nf4
    reference = bnb_reference(smollm2_dir)
    ours, theirs = read_all(out), read_all(reference)
    assert set(ours) == set(theirs)
    weights = quantized_weights(ours)
    assert len(weights) == report.totals["quantized"] == 210
    scale_codes = differ = 0
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype and tensor.shape == theirs[name].shape, name
        if name.endswith(".absmax"):  # 8-bit scale codes: bitsandbytes' CPU coder is approximate
            scale_codes += tensor.numel()
            differ += (tensor != theirs[name]).sum().item()
        else:  # 4-bit codes, float32 nested scales, tables, quantization state (offset), untouched tensors
            assert torch.equal(tensor, theirs[name]), name
    assert differ / scale_codes < 0.005
    config, base_config = json.loads((out / "config.json").read_text()), json.loads((smollm2_dir / "config.json").read_text())
    assert config["quantization_config"] == json.loads((reference / "config.json").read_text())["quantization_config"]
    assert {k: v for k, v in config.items() if k != "quantization_config"} == base_config


def test_scale_codes_that_differ_are_the_nearest(smol_nf4, smollm2_dir):
    """Where our 8-bit scale codes differ from bitsandbytes', ours is the nearest code (see test_nf4)."""
    out, _ = smol_nf4
    ours, theirs = read_all(out), read_all(bnb_reference(smollm2_dir))
    base = Checkpoint(smollm2_dir)
    for name in ["model.layers.0.mlp.down_proj.weight", "model.layers.11.self_attn.q_proj.weight", "model.layers.29.mlp.up_proj.weight"]:
        mine = from_state_dict(ours, name)
        raw = quantize_nf4(base.read(name), double_quant=False).absmax  # float scales, equal to bitsandbytes'
        normed = (raw - mine.offset) / mine.nested_absmax.repeat_interleave(256)[: raw.numel()]
        dist = (normed.double()[:, None] - DYNAMIC_CODE.double()[None]).abs()
        best = dist.min(dim=1).values
        assert torch.equal(dist.gather(1, mine.absmax.long()[:, None])[:, 0], best)
        other = dist.gather(1, theirs[f"{name}.absmax"].long()[:, None])[:, 0]
        assert (other >= best).all()


def test_layout_report_and_untouched_bytes(smol_nf4, smollm2_dir):
    out, report = smol_nf4
    base = Checkpoint(smollm2_dir)
    result = Checkpoint(out)
    assert [f.name for f in result.files] == [f.name for f in base.files]  # the base's shards
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(result.names())
    assert index["metadata"]["total_size"] == report.bytes_written == result.total_size
    assert (out / "tokenizer.json").read_bytes() == (smollm2_dir / "tokenizer.json").read_bytes()
    for name in ["model.embed_tokens.weight", "model.norm.weight", "model.layers.4.input_layernorm.weight"]:
        assert raw_bytes(out, name) == raw_bytes(smollm2_dir, name)
    assert report.skipped == ["model.embed_tokens.weight"]
    assert all(0.05 < r["rel_error"] < 0.15 for r in report.rows)  # NF4 costs about 10% of a weight's norm
    assert report.totals["bytes_written"] < 0.45 * base.total_size


def test_loads_with_transformers_and_matches_dequantized_weights(smol_nf4):
    """Every layer transformers + bitsandbytes load dequantizes to our values bit for bit; the
    logits (float32, first 6 of 30 layers to keep it quick) equal a dense model of those values."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    out, _ = smol_nf4
    tensors = read_all(out)
    model = load_4bit(out, float32=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 210
    for name, module in layers.items():
        loaded = dequantize_4bit(module.weight.data, module.weight.quant_state)
        assert torch.equal(loaded, from_state_dict(tensors, f"{name}.weight").dequantize()), name
    del model, layers
    short = load_4bit(out, num_hidden_layers=6)
    dense = dense_model_from(out, tensors, num_hidden_layers=6)
    torch.testing.assert_close(logits(short, PROMPT), logits(dense, PROMPT), rtol=1e-5, atol=1e-4)


# --- the command on a tiny model ----------------------------------------------------------------


def test_cli_json_and_text(tiny, tmp_path):
    result = invoke("quantize", "--base", tiny, "--out", tmp_path / "q", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["op"] == "quantize" and data["quant_type"] == "nf4" and data["blocksize"] == 64 and data["double_quant"]
    assert data["totals"]["quantized"] == 14 and data["skipped"] == ["lm_head.weight", "model.embed_tokens.weight"]
    assert {r["name"] for r in data["rows"]} == set(quantized_weights(read_all(tmp_path / "q")))
    result = invoke("quantize", "-b", tiny, "-o", tmp_path / "q2")
    assert result.exit_code == 0, result.output
    assert "quantized 14 of 21 tensors to NF4 (blocksize 64, double-quantized scales)" in result.stdout
    assert "left unquantized: lm_head.weight, model.embed_tokens.weight" in result.stdout
    for f in Checkpoint(tmp_path / "q").files:  # deterministic: the same bytes twice
        assert f.read_bytes() == (tmp_path / "q2" / f.name).read_bytes()


def test_tiny_loads_and_matches_dequantized(tiny, tmp_path):
    quantize_checkpoint(tiny, tmp_path / "q", progress=False)
    model = load_4bit(tmp_path / "q")
    dense = dense_model_from(tmp_path / "q", read_all(tmp_path / "q"))
    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    torch.testing.assert_close(logits(model, ids), logits(dense, ids), rtol=1e-5, atol=1e-5)


def test_skip_pattern_keeps_weights_dense_and_tells_transformers(tiny, tmp_path):
    import bitsandbytes as bnb

    result = invoke("quantize", "-b", tiny, "-o", tmp_path / "q", "--skip", r"mlp\.down_proj", "--json")
    assert result.exit_code == 0, result.output
    tensors = read_all(tmp_path / "q")
    for i in range(2):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        assert tensors[name].dtype == torch.bfloat16 and raw_bytes(tmp_path / "q", name) == raw_bytes(tiny, name)
    qconfig = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qconfig["llm_int8_skip_modules"] == [
        "lm_head", "model.embed_tokens", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
    ]
    model = load_4bit(tmp_path / "q")
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    torch.testing.assert_close(logits(model, ids), logits(dense_model_from(tmp_path / "q", tensors), ids), rtol=1e-5, atol=1e-5)


def test_no_double_quant_and_other_blocksize(tiny, tmp_path):
    result = invoke("quantize", "-b", tiny, "-o", tmp_path / "q", "--no-double-quant", "--blocksize", "32", "-q")
    assert result.exit_code == 0, result.output
    tensors = read_all(tmp_path / "q")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert tensors[f"{name}.absmax"].dtype == torch.float32 and f"{name}.nested_absmax" not in tensors
    state = json.loads(bytes(tensors[name + STATE].tolist()).decode())
    assert state == {"quant_type": "nf4", "blocksize": 32, "dtype": "bfloat16", "shape": [64, 64]}
    assert tensors[f"{name}.absmax"].shape == (64 * 64 // 32,)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["bnb_4bit_use_double_quant"] is False
    ids = torch.tensor([[7, 8, 9, 10]])
    torch.testing.assert_close(logits(load_4bit(tmp_path / "q"), ids), logits(dense_model_from(tmp_path / "q", tensors), ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_device_output_equals_cpu(tiny, tmp_path, device):
    quantize_checkpoint(tiny, tmp_path / "cpu", progress=False, device="cpu")
    quantize_checkpoint(tiny, tmp_path / "dev", progress=False, device=device)
    for f in Checkpoint(tmp_path / "cpu").files:
        assert f.read_bytes() == (tmp_path / "dev" / f.name).read_bytes()


def test_errors_before_writing(tiny, tmp_path):
    (tmp_path / "exists").mkdir()
    result = invoke("quantize", "-b", tiny, "-o", tmp_path / "exists")
    assert result.exit_code == 1 and "already exists; pass --force" in result.output
    quantize_checkpoint(tiny, tmp_path / "q", progress=False)
    result = invoke("quantize", "-b", tmp_path / "q", "-o", tmp_path / "qq")
    assert result.exit_code == 1 and "is already quantized" in result.output
    result = invoke("quantize", "-b", tiny, "-o", tmp_path / "x", "--skip", "(")
    assert result.exit_code == 1 and "skip pattern '(' is not a valid regular expression" in result.output
    result = invoke("quantize", "-b", tiny, "-o", tmp_path / "x", "--skip", ".")
    assert result.exit_code == 1 and "no 2-D float16/bfloat16/float32 weight to quantize" in result.output
    tiny_gpt2_model().save_pretrained(tmp_path / "gpt2")
    result = invoke("quantize", "-b", tmp_path / "gpt2", "-o", tmp_path / "x")
    assert result.exit_code == 1 and "Conv1D" in result.output
    result = invoke("quantize", "-b", tiny, "-o", tmp_path / "x", "--blocksize", "48")
    assert result.exit_code == 2
    with pytest.raises(AdapterOpsError, match="blocksize must be one of"):
        quantize_checkpoint(tiny, tmp_path / "x", blocksize=48)
    with pytest.raises(AdapterOpsError, match="is also an input"):
        quantize_checkpoint(tiny, tiny, force=True)
    assert not (tmp_path / "x").exists()


def test_force_overwrites(tiny, tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "stale.txt").write_text("old")
    result = invoke("quantize", "-b", tiny, "-o", tmp_path / "q", "--force", "-q")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "q" / "stale.txt").exists() and Checkpoint(tmp_path / "q").is_nf4()
