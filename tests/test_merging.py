"""adapterops.merging: parity with PEFT's merge_and_unload, the streaming engine, codecs, failure modes."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from merge_helpers import (
    LLAMA_TARGETS,
    assert_within_ulps,
    hub_cache,
    peft_model,
    raw_bytes,
    read_all,
    save_tiny_llama,
    tiny_gpt2_model,
    tiny_llama_model,
)
from safetensors.torch import save_file

import adapterops
from adapterops import Adapter, LoraLayer, merging
from adapterops._progress import Progress
from adapterops.checkpoint import INDEX_NAME, Checkpoint, ShardWriter
from adapterops.errors import (
    AdapterOpsError,
    BaseMismatchError,
    FormatError,
    OutputExistsError,
    UnsupportedOperationError,
)
from adapterops.merging import plan_merge
from adapterops.rewrite import Job, rewrite
from adapterops.storage import CODECS, logical_weights

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def random_adapter(shapes: dict[str, tuple[int, int]], rank: int = 4, seed: int = 0, scale: float = 0.05, **meta) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    layers = {
        n: LoraLayer(torch.randn(rank, i, generator=g) * scale, torch.randn(o, rank, generator=g) * scale, 2.0 * rank)
        for n, (o, i) in shapes.items()
    }
    return Adapter(layers, meta)


def linear_shapes(path: Path) -> dict[str, tuple[int, int]]:
    ck = Checkpoint(path)
    return {n[: -len(".weight")]: ck.shape(n) for n in ck.names() if any(t in n for t in LLAMA_TARGETS)}


def expected_merge(base: dict[str, torch.Tensor], adapter: Adapter, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Dense float64 reference: W + weight * scale * B @ A, cast to the base dtype."""
    out = dict(base)
    for name, layer in adapter.items():
        W = base[f"{name}.weight"]
        delta = weight * layer.scale * (layer.B.double() @ layer.A.double())
        out[f"{name}.weight"] = (W.double() + delta).to(W.dtype)
    return out


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or p.name.endswith(".grow")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny32") / "llama", dtype=torch.float32)


# --- the real model, against PEFT -------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_dir, tmp_path_factory):
    """SmolLM2 + a PEFT all-linear adapter: PEFT's merged tensors and adapterops' merged checkpoint."""
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("smol")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    wrapped = peft_model(model, LLAMA_TARGETS, r=8, alpha=16, std=0.02)
    wrapped.save_pretrained(tmp / "adapter")
    reference = {k: v.clone() for k, v in wrapped.merge_and_unload().state_dict().items()}
    report = adapterops.merge(smollm2_dir, tmp / "adapter", tmp / "merged", device="cpu", progress=False)
    return {"dir": tmp, "reference": reference, "report": report}


def test_peft_parity_on_real_model(smol):
    ours = read_all(smol["dir"] / "merged")
    reference = smol["reference"]
    merged = {r["name"] for r in smol["report"].rows}
    assert len(merged) == 30 * 7
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16
        if name in merged:
            assert_within_ulps(tensor, reference[name], 1.0)
        else:
            assert torch.equal(tensor, reference[name]), name
    assert set(ours) == set(reference) - {"lm_head.weight"}  # tied to the embeddings, not stored


def test_merged_checkpoint_loads_and_logits_match(smol, smollm2_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol["dir"] / "merged")  # the side files came along
    ids = tokenizer("The capital of France is a city where", return_tensors="pt")["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(smol["dir"] / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
        ours = merged(ids).logits
        merged.load_state_dict({k: v.float() for k, v in smol["reference"].items()})
        peft_merged = merged(ids).logits
        unmerged = PeftModel.from_pretrained(base, smol["dir"] / "adapter")(ids).logits  # float32, adapter on the side
    effect = (unmerged - base_logits).abs().max().item()
    assert effect > 0.5  # the adapter matters
    # Merging into bf16 rounds the weights; ours is as close to the unmerged model as PEFT's merge,
    # and the two merged models agree far more closely than either agrees with the unmerged one.
    ours_err, peft_err = (ours - unmerged).abs().max().item(), (peft_merged - unmerged).abs().max().item()
    assert ours_err < 1.25 * peft_err
    assert (ours - peft_merged).abs().max().item() < 0.5 * peft_err
    assert torch.equal(ours.argmax(-1), peft_merged.argmax(-1))


def test_layout_metadata_side_files_and_untouched_bytes(smol, smollm2_dir):
    out = smol["dir"] / "merged"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in smollm2_dir.iterdir())
    ours, theirs = json.loads((out / INDEX_NAME).read_text()), json.loads((smollm2_dir / INDEX_NAME).read_text())
    assert ours["weight_map"] == theirs["weight_map"]
    assert ours["metadata"]["total_size"] == theirs["metadata"]["total_size"]
    a, b = Checkpoint(out), Checkpoint(smollm2_dir)
    for fa, fb in zip(a.files, b.files):
        assert a.metadata(fa) == b.metadata(fb) and fa.name == fb.name
        assert fa.stat().st_size - a.header_size(fa) == fb.stat().st_size - b.header_size(fb)
    merged = {r["name"] for r in smol["report"].rows}
    for name in b.names():
        if name not in merged:
            assert raw_bytes(out, name) == raw_bytes(smollm2_dir, name), name
    for side in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / side).read_bytes() == (smollm2_dir / side).read_bytes()


def test_report(smol):
    report = smol["report"]
    d = json.loads(json.dumps(report.to_dict()))
    assert d["op"] == "merge" and d["device"] == "cpu" and d["dtype"] == "as base"
    row = d["rows"][0]
    assert {"name", "shape", "rank", "rel_change", "retained", "delta_norm", "weight_norm"} <= set(row)
    assert row["rank"] == 8 and 0 < row["rel_change"] < 1 and 0.9 < row["retained"] <= 1.1
    assert d["totals"]["merged"] == len(d["rows"]) and d["totals"]["bytes_written"] == d["totals"]["bytes_read"]


# --- algebra on tiny checkpoints ---------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_merge_matches_dense_reference(tiny, tmp_path, device):
    adapter = random_adapter(linear_shapes(tiny))
    report = adapterops.merge(tiny, adapter, tmp_path / "out", device=device, progress=False)
    expected = expected_merge(read_all(tiny), adapter)
    ours = read_all(tmp_path / "out")
    assert set(ours) == set(expected)
    for name in expected:
        assert_within_ulps(ours[name], expected[name], 1.0)
    assert len(report.rows) == len(adapter)


def test_several_adapters_with_weights(tiny32, tmp_path):
    shapes = linear_shapes(tiny32)
    a, b = random_adapter(shapes, seed=1), random_adapter(dict(list(shapes.items())[:5]), rank=2, seed=2)
    adapterops.merge(tiny32, [a, b], tmp_path / "out", weights=[0.5, -2.0], progress=False)
    expected = expected_merge(expected_merge(read_all(tiny32), a, 0.5), b, -2.0)
    ours = read_all(tmp_path / "out")
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-6, atol=1e-6)


def test_unmerge_inverts_merge_in_fp32(tiny32, tmp_path):
    adapter = random_adapter(linear_shapes(tiny32), seed=3)
    path = tmp_path / "a.st"
    adapter.save(path)
    adapterops.merge(tiny32, path, tmp_path / "merged", weights=[0.7], progress=False)
    report = adapterops.unmerge(tmp_path / "merged", path, tmp_path / "back", weights=[0.7], progress=False)
    assert report.op == "unmerge" and report.weights == [-0.7]
    original, back, merged = read_all(tiny32), read_all(tmp_path / "back"), read_all(tmp_path / "merged")
    for name, W in original.items():
        torch.testing.assert_close(back[name], W, rtol=0, atol=4 * torch.finfo(torch.float32).eps * W.abs().max().item())
    assert any(not torch.equal(merged[n], original[n]) for n in original)


def test_batched_compute_equals_one_at_a_time(tiny, tmp_path):
    ck = Checkpoint(tiny)
    adapter = random_adapter(linear_shapes(tiny), seed=4)
    jobs, _ = plan_merge(ck, [adapter], [1.0])
    rewrite(ck, tmp_path / "one", jobs, device="cpu", progress=False, batch=1)
    rewrite(ck, tmp_path / "many", jobs, device="cpu", progress=False, batch=8)
    one, many = read_all(tmp_path / "one"), read_all(tmp_path / "many")
    for name in one:
        assert_within_ulps(many[name], one[name], 1.0)


def test_output_dtype_rewrites_every_float_and_the_config(tiny, tmp_path):
    adapter = random_adapter(linear_shapes(tiny))
    report = adapterops.merge(tiny, adapter, tmp_path / "out", dtype="fp32", progress=False)
    ours = read_all(tmp_path / "out")
    assert all(t.dtype == torch.float32 for t in ours.values())
    expected = expected_merge({k: v.float() for k, v in read_all(tiny).items()}, adapter)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-6, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    assert report.dtype == "float32"
    assert json.loads((tmp_path / "out" / INDEX_NAME).read_text())["metadata"]["total_size"] == report.bytes_written


def test_prefix_mismatch_is_matched(tiny, tmp_path):
    shapes = linear_shapes(tiny)
    stripped = random_adapter({n.removeprefix("model."): s for n, s in shapes.items()}, seed=5)
    extra = random_adapter({f"base_model.model.{n}": s for n, s in shapes.items()}, seed=5)
    adapterops.merge(tiny, stripped, tmp_path / "a", progress=False)
    adapterops.merge(tiny, extra, tmp_path / "b", progress=False)
    expected = expected_merge(read_all(tiny), random_adapter(shapes, seed=5))
    for out in ("a", "b"):
        ours = read_all(tmp_path / out)
        for name in expected:
            assert_within_ulps(ours[name], expected[name], 1.0)


def test_single_file_base_to_file_and_to_directory(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"layer.weight": torch.randn(8, 6, generator=g), "layer.bias": torch.randn(8, generator=g)}
    save_file(base, str(tmp_path / "m.safetensors"), metadata={"format": "pt", "note": "kept"})
    adapter = random_adapter({"layer": (8, 6)})
    adapterops.merge(tmp_path / "m.safetensors", adapter, tmp_path / "out.safetensors", progress=False)
    adapterops.merge(tmp_path / "m.safetensors", adapter, tmp_path / "outdir", progress=False)
    expected = expected_merge(base, adapter)
    for path in (tmp_path / "out.safetensors", tmp_path / "outdir" / "m.safetensors"):
        ours = read_all(path)
        torch.testing.assert_close(ours["layer.weight"], expected["layer.weight"])
        assert torch.equal(ours["layer.bias"], base["layer.bias"])
        assert Checkpoint(path).metadata(path) == {"format": "pt", "note": "kept"}


def test_hub_id_from_cache(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub_cache(tmp_path / "hub", "org/tiny-llama", tiny)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter = random_adapter(linear_shapes(tiny))
    report = adapterops.merge("org/tiny-llama", adapter, tmp_path / "out", progress=False)
    assert report.base == "org/tiny-llama"
    ours = read_all(tmp_path / "out")
    for name, t in expected_merge(read_all(tiny), adapter).items():
        assert_within_ulps(ours[name], t, 1.0)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    assert not (tmp_path / "out" / "tokenizer.json").is_symlink()
    with pytest.raises(FormatError, match="not in the Hugging Face cache"):
        adapterops.merge("org/absent", adapter, tmp_path / "x", progress=False)


# --- GPT-2 Conv1D and DoRA against PEFT --------------------------------------------------------


def test_gpt2_conv1d_matches_peft(tmp_path):
    model = tiny_gpt2_model()
    model.save_pretrained(tmp_path / "base")
    wrapped = peft_model(model, ["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    wrapped.save_pretrained(tmp_path / "adapter")
    reference = wrapped.merge_and_unload().state_dict()
    report = adapterops.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    ours = read_all(tmp_path / "out")
    assert len(report.rows) == 2 * 4
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6)


def test_fan_in_fan_out_on_a_linear_model_is_ignored_as_peft_does(tmp_path):
    model = tiny_llama_model(torch.float32)
    model.save_pretrained(tmp_path / "base")
    peft_model(model, ["q_proj", "v_proj"]).save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "fan_in_fan_out": True}))  # as some tools write it
    from peft import PeftModel

    with pytest.warns(UserWarning, match="fan_in_fan_out"):  # PEFT's own warning
        reference = PeftModel.from_pretrained(tiny_llama_model(torch.float32), tmp_path / "adapter").merge_and_unload().state_dict()
    with pytest.warns(UserWarning, match="ignoring it, as PEFT does"):
        adapterops.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    ours = read_all(tmp_path / "out")
    assert any("q_proj" in n for n in ours)  # square: the flag would have transposed it
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6)


def test_dora_matches_peft_and_refuses_unmerge(tmp_path):
    model = tiny_llama_model(torch.float32)
    model.save_pretrained(tmp_path / "base")
    wrapped = peft_model(model, ["q_proj", "v_proj", "down_proj"], dora=True)
    wrapped.save_pretrained(tmp_path / "adapter")
    reference = wrapped.merge_and_unload().state_dict()
    report = adapterops.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    assert all(r["dora"] for r in report.rows) and len(report.rows) == 6
    ours = read_all(tmp_path / "out")
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(UnsupportedOperationError, match="DoRA"):
        adapterops.unmerge(tmp_path / "out", tmp_path / "adapter", tmp_path / "back", progress=False)
    with pytest.raises(BaseMismatchError, match="DoRA"):
        adapterops.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "half", weights=[0.5], progress=False)
    assert not (tmp_path / "back").exists() and not (tmp_path / "half").exists()


# --- merge_into / applied ----------------------------------------------------------------------


def test_merge_into_and_applied_restore_exactly(tiny):
    model = tiny_llama_model(torch.bfloat16)
    adapter = random_adapter({n: tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith(("q_proj", "up_proj"))})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.arange(10)[None]
    with torch.no_grad():
        plain = model(ids).logits
        with adapter.applied(model) as m:
            inside = {k: v.clone() for k, v in m.state_dict().items()}
            changed = model(ids).logits
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    expected = expected_merge(before, adapter)
    for k in before:
        assert_within_ulps(inside[k], expected[k], 1.0)
    assert not torch.equal(plain, changed)
    assert sorted(adapter.merge_into(model, weight=2.0)) == sorted(adapter)
    twice = expected_merge(before, adapter, 2.0)
    for k, v in model.state_dict().items():
        assert_within_ulps(v, twice[k], 1.0)


def test_merge_into_conv1d_matches_peft(tmp_path):
    model = tiny_gpt2_model()
    wrapped = peft_model(tiny_gpt2_model(), ["c_attn", "c_fc"], fan_in_fan_out=True, seed=7)
    wrapped.save_pretrained(tmp_path / "adapter")
    adapter = adapterops.load(tmp_path / "adapter")
    reference = wrapped.merge_and_unload().state_dict()
    adapter.merge_into(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-6)


# --- failures leave nothing behind -------------------------------------------------------------


@pytest.mark.parametrize("where", ["compute", "writer", "interrupt"])
def test_interrupted_merge_leaves_no_output(tiny, tmp_path, monkeypatch, where):
    calls = {"n": 0}
    original_compute, original_add = merging._merge_compute, ShardWriter.add

    def failing_compute(tasks):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt if where == "interrupt" else RuntimeError("boom")
        return original_compute(tasks)

    def failing_add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return original_add(self, name, tensor)

    if where == "writer":
        monkeypatch.setattr(ShardWriter, "add", failing_add)
    else:
        monkeypatch.setattr(merging, "_merge_compute", failing_compute)
    expected = {"compute": RuntimeError, "writer": OSError, "interrupt": KeyboardInterrupt}[where]
    with pytest.raises(expected):
        adapterops.merge(tiny, random_adapter(linear_shapes(tiny)), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_bad_inputs_fail_before_writing(tiny, tmp_path):
    before = {p.name: p.read_bytes() for p in tiny.iterdir()}
    good = random_adapter(linear_shapes(tiny))
    wrong = random_adapter({"model.layers.0.self_attn.q_proj": (64, 32), "model.layers.9.mlp.up_proj": (96, 64)})
    (tmp_path / "exists").mkdir()
    cases = [
        (dict(adapters=wrong), BaseMismatchError, r"1 adapter layer\(s\) have no weight in the base.*layers\.9.*1 shape mismatch.*\[64, 32\]"),
        (dict(adapters=tmp_path / "missing.st"), FormatError, "no such file"),
        (dict(out=tmp_path / "exists"), OutputExistsError, "already exists"),
        (dict(out=tiny), AdapterOpsError, "is also an input"),
        (dict(out=tiny.parent), AdapterOpsError, "holds the input"),
        (dict(dtype="int8"), AdapterOpsError, "unsupported output dtype"),
        (dict(weights=[1.0, 2.0]), AdapterOpsError, "1 adapters but 2 weights"),
        (dict(weights=[math.nan]), AdapterOpsError, "finite"),
        (dict(base=tmp_path / "nothing"), FormatError, "no such file"),
    ]
    for change, error, pattern in cases:
        args = {"base": tiny, "adapters": good, "out": tmp_path / "out", **change}
        force = change.get("out") is not None and change["out"] != tmp_path / "exists"
        with pytest.raises(error, match=pattern):
            adapterops.merge(args["base"], args["adapters"], args["out"], weights=change.get("weights"), dtype=change.get("dtype"), progress=False, force=force)
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == [] and leftovers(tiny.parent) == []
    assert {p.name: p.read_bytes() for p in tiny.iterdir()} == before
    assert list((tmp_path / "exists").iterdir()) == []


def test_two_adapters_with_problems_are_reported_together(tiny, tmp_path):
    a = random_adapter({"model.layers.0.self_attn.q_proj": (64, 32)})
    b = random_adapter({"nowhere.proj": (4, 4)})
    with pytest.raises(BaseMismatchError) as info:
        adapterops.merge(tiny, [a, b], tmp_path / "out", progress=False)
    assert "adapter 0" in str(info.value) and "adapter 1" in str(info.value) and "nowhere.proj" in str(info.value)


def test_force_replaces_an_existing_output(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    adapterops.merge(tiny, random_adapter(linear_shapes(tiny)), tmp_path / "out", progress=False, force=True)
    assert not (tmp_path / "out" / "stale.txt").exists() and (tmp_path / "out" / INDEX_NAME).is_file()


# --- the codec interface and the rewrite primitive (as NF4 will use them) ----------------------


class RowInt8:
    """A toy quantized storage: ``X.weight`` int8 codes and ``X.weight.scale`` (out,) float32."""

    name = "rowint8"

    def groups(self, checkpoint):
        return {n[: -len(".scale")]: (n[: -len(".scale")], n) for n in checkpoint.names() if n.endswith(".weight.scale")}

    def shape(self, checkpoint, weight):
        return checkpoint.shape(weight)

    def decode(self, tensors, weight):
        return tensors[weight].float() * tensors[f"{weight}.scale"][:, None]

    def encode(self, W, weight, like, dtype):
        outputs = self.quantize(W, weight)
        return outputs, {"codes_changed": (outputs[weight] != like[weight]).float().mean()}

    @staticmethod
    def quantize(W, weight):
        scale = W.abs().amax(dim=1).clamp(min=1e-12) / 127
        return {weight: torch.round(W / scale[:, None]).to(torch.int8), f"{weight}.scale": scale}

    def dense_config(self, config):
        return {k: v for k, v in config.items() if k != "quantization_config"}


def quantize_job(weight: str) -> Job:
    def compute(tasks):
        return [(RowInt8.quantize(t.tensors[t.name].float(), t.name), None) for t in tasks]

    return Job((weight,), compute)


@pytest.fixture
def rowint8(tiny, tmp_path, monkeypatch):
    """The tiny model's linear weights rewritten as RowInt8 groups with the rewrite primitive."""
    monkeypatch.setitem(CODECS, "rowint8", RowInt8())
    ck = Checkpoint(tiny)
    weights = [f"{n}.weight" for n in linear_shapes(tiny)]
    result = rewrite(ck, tmp_path / "q", {w: quantize_job(w) for w in weights}, progress=False,
                       config=lambda c: {**c, "quantization_config": {"quant_method": "rowint8"}})
    return tmp_path / "q", weights, result


def test_rewrite_one_tensor_into_several(rowint8, tiny):
    q, weights, result = rowint8
    index = json.loads((q / INDEX_NAME).read_text())
    original = json.loads((tiny / INDEX_NAME).read_text())["weight_map"]
    for w in weights:
        assert index["weight_map"][w] == index["weight_map"][f"{w}.scale"] == original[w]
    assert result.tensors_out == result.tensors_in + len(weights)
    assert index["metadata"]["total_size"] == result.bytes_written == Checkpoint(q).total_size
    for name in original:
        if name not in weights:
            assert raw_bytes(q, name) == raw_bytes(tiny, name)
    assert json.loads((q / "config.json").read_text())["quantization_config"] == {"quant_method": "rowint8"}


def test_merge_through_a_registered_codec(rowint8, tmp_path):
    q, weights, _ = rowint8
    ck = Checkpoint(q)
    assert {w: c.name for w, (c, _) in logical_weights(ck).items() if w in weights} == dict.fromkeys(weights, "rowint8")
    adapter = random_adapter({w[: -len(".weight")]: ck.shape(w) for w in weights}, seed=8)
    report = adapterops.merge(q, adapter, tmp_path / "merged", progress=False)
    codec, merged = RowInt8(), read_all(tmp_path / "merged")
    source = read_all(q)
    for row in report.rows:
        w = row["name"]
        assert merged[w].dtype == torch.int8 and "codes_changed" in row and 0 <= row["retained"] <= 1.5
        target = codec.decode(source, w) + adapter[w[: -len(".weight")]].delta()
        assert (codec.decode(merged, w) - target).abs().le(merged[f"{w}.scale"][:, None] * 0.5 + 1e-6).all()
    dense = adapterops.merge(q, adapter, tmp_path / "dense", dtype="bf16", progress=False)
    out = read_all(tmp_path / "dense")
    assert not any(n.endswith(".scale") for n in out) and all(t.dtype == torch.bfloat16 for t in out.values())
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    index = json.loads((tmp_path / "dense" / INDEX_NAME).read_text())["weight_map"]
    assert set(index) == set(out)
    for row in dense.rows:
        w = row["name"]
        assert_within_ulps(out[w], codec.decode(source, w) + adapter[w[: -len(".weight")]].delta(), 1.0)


# --- progress --------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_draws_only_on_a_terminal():
    tty, pipe = Terminal(), io.StringIO()
    for stream in (tty, pipe):
        with Progress("merging", total_items=3, total_bytes=3_000_000, stream=stream, interval=0) as p:
            for _ in range(3):
                p.advance(1, 1_000_000)
    assert pipe.getvalue() == ""
    text = tty.getvalue()
    assert "3/3 tensors" in text and "3.0 MB/3.0 MB" in text and "/s" in text and text.endswith("\n")
    quiet = Terminal()
    with Progress("merging", total_items=1, total_bytes=1, stream=quiet, enabled=False) as p:
        p.advance(1, 1)
    assert quiet.getvalue() == ""
