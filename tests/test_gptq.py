"""GPTQ rounding into NF4: the algorithm against a dense float64 OBS reference, the NF4 layout, the
Hessians (calibration and data-free), and ``merge`` / ``quantize`` with ``rounding="gptq"``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from merge_helpers import read_all
from nf4_helpers import save_tiny_llama
from train_helpers import one_thread  # noqa: F401 (one_thread: an autouse fixture)

import adapterops
from adapterops import Adapter, LoraLayer
from adapterops.checkpoint import Checkpoint
from adapterops.cli import main
from adapterops.errors import AdapterOpsError
from adapterops.quant import dequantize_nf4, from_state_dict, quantize_checkpoint, quantize_nf4
from adapterops.quant.calibration import adapter_hessian, collect_hessians
from adapterops.quant.codec import NF4
from adapterops.quant.gptq import DAMP, gptq_codes, output_error_sq, quantize_gptq_many, relative_output_error
from adapterops.quant.nf4 import NF4_CODE

STATE = ".quant_state.bitsandbytes__nf4"


def random_problem(seed: int, out: int, n: int, tokens: int, dtype=torch.float64):
    """A weight, correlated inputs X (in, tokens) with a few large channels, H = X X^T."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g, dtype=dtype)
    mix = torch.randn(n, n, generator=g, dtype=dtype) / n**0.5 + torch.eye(n, dtype=dtype)
    X = mix @ (torch.randn(n, tokens, generator=g, dtype=dtype) * torch.linspace(0.2, 3.0, n, dtype=dtype)[:, None])
    return W, X, X @ X.T


def obs_reference(W, H, scales, *, blocksize, damp=DAMP, act_order=True):
    """GPTQ as the sequence of Optimal Brain Surgeon steps, without Cholesky or lazy blocks:
    round a column, move the remaining columns by -e * Hinv[j, rest] / Hinv[j, j], then remove
    column j from the inverse Hessian (Frantar et al. 2023, eq. 2-3). float64 throughout."""
    out, n = W.shape
    W = W.clone()
    S = scales.double().repeat_interleave(blocksize)[: out * n].view(out, n)
    H = H.clone()
    d = H.diagonal()
    d[d == 0] = 1.0
    H = H + damp * d.mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    order = torch.argsort(H.diagonal(), descending=True).tolist() if act_order else list(range(n))
    codes = torch.empty(out, n, dtype=torch.long)
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]).double() / 2
    rest = list(order)
    for j in order:
        scaled = torch.clamp(W[:, j] * torch.where(S[:, j] != 0, 1 / S[:, j], 0.0), -1, 1)
        q = torch.bucketize(scaled, mids)
        e = W[:, j] - NF4_CODE.double()[q] * S[:, j]
        rest.remove(j)
        W[:, rest] -= e[:, None] * (Hinv[j, rest] / Hinv[j, j])[None, :]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
        codes[:, j] = q
    return codes


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), out=st.integers(1, 5), n=st.sampled_from([8, 24, 40]), act_order=st.booleans(), block=st.sampled_from([1, 5, 128]))
def test_lazy_cholesky_gptq_equals_the_obs_reference(seed, out, n, act_order, block):
    W, _, H = random_problem(seed, out, n, 3 * n)
    scales = W.abs().reshape(-1)[: (out * n) // 8 * 8].view(-1, 8).amax(1)
    scales = torch.cat([scales, W.abs().reshape(-1)[len(scales) * 8 :].amax().reshape(1)]) if (out * n) % 8 else scales
    given_W, given_H = W.clone(), H.clone()
    got = gptq_codes(W, H, scales, blocksize=8, dtype=torch.float64, act_order=act_order, block=block)
    assert torch.equal(W, given_W) and torch.equal(H, given_H)  # inputs untouched
    torch.testing.assert_close(got.long(), obs_reference(W, H, scales, blocksize=8, act_order=act_order), rtol=0, atol=0)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 5), cols=st.sampled_from([64, 128, 192]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_a_diagonal_hessian_gives_bitsandbytes_nearest_codes(seed, rows, cols, dtype):
    """No off-diagonal Hessian, no error feedback: the nearest codes on bitsandbytes' float32 scales."""
    w = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)
    near = quantize_nf4(w, double_quant=False)
    H = torch.diag(torch.rand(cols, generator=torch.Generator().manual_seed(seed + 1)) + 0.5)
    got = quantize_gptq_many(w.unsqueeze(0), H.unsqueeze(0), double_quant=False)[0]
    assert torch.equal(got.codes, near.codes) and torch.equal(got.absmax, near.absmax) and got.dtype == dtype


@pytest.mark.parametrize("shape", [(16, 64), (5, 100), (3, 37)])  # blocks within rows, straddling rows, a partial last block
def test_gptq_keeps_the_given_scales_and_lowers_the_output_error(shape):
    W, X, H = random_problem(3, *shape, tokens=400, dtype=torch.float32)
    near = quantize_nf4(W)
    got = quantize_gptq_many(W.unsqueeze(0), H.unsqueeze(0), like=[near])[0]
    for field in ("absmax", "nested_absmax", "offset"):
        assert torch.equal(getattr(got, field), getattr(near, field))
    assert got.shape == near.shape and got.dtype == near.dtype and got.codes.shape == near.codes.shape
    e_near = dequantize_nf4(near) - W
    e_gptq = dequantize_nf4(got) - W
    assert output_error_sq(e_gptq, H) < 0.9 * output_error_sq(e_near, H)
    torch.testing.assert_close(output_error_sq(e_gptq, H), torch.linalg.matrix_norm(e_gptq @ X) ** 2, rtol=1e-4, atol=0)


def test_batched_weights_each_get_their_own_hessian():
    problems = [random_problem(s, 8, 64, 200, dtype=torch.float32) for s in range(3)]
    W = torch.stack([p[0] for p in problems])
    H = torch.stack([p[2] for p in problems])
    batched = quantize_gptq_many(W, H)
    for g in range(3):
        assert torch.equal(batched[g].codes, quantize_gptq_many(W[g : g + 1], H[g : g + 1])[0].codes)


def test_relative_output_error_is_the_ratio_of_output_norms():
    W, X, H = random_problem(5, 6, 32, 100)
    E, D = torch.randn_like(W), torch.randn_like(W)
    expected = torch.linalg.matrix_norm(E @ X) / torch.linalg.matrix_norm(D @ X)
    torch.testing.assert_close(relative_output_error(E, D, H), expected)


def test_bad_hessians_are_refused():
    W = torch.randn(4, 64)
    with pytest.raises(AdapterOpsError, match="does not fit"):
        gptq_codes(W, torch.eye(32), torch.ones(4))
    with pytest.raises(AdapterOpsError, match="not positive definite"):
        gptq_codes(W, torch.full((64, 64), float("nan")), torch.ones(4))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), r=st.integers(1, 4), ridge=st.sampled_from([0.1, 1.0]))
def test_the_data_free_hessian_weights_the_adapters_directions(seed, r, ridge):
    g = torch.Generator().manual_seed(seed)
    L, R = torch.randn(12, r, generator=g, dtype=torch.float64), torch.randn(r, 20, generator=g, dtype=torch.float64)
    H = adapter_hessian(L, R, ridge=ridge)
    V = torch.linalg.svd(L @ R, full_matrices=False).Vh[:r]  # (r, in)
    expected = V.T @ V + ridge * r / 20 * torch.eye(20, dtype=torch.float64)
    torch.testing.assert_close(H, expected)


# ---------------------------------------------------------------------------------------------
# merge and quantize


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gptq")
    dense = save_tiny_llama(tmp / "dense")
    quantize_checkpoint(dense, tmp / "nf4", progress=False)
    return dense, tmp / "nf4"


def adapter_for(checkpoint, *, scale: float, seed: int = 0, rank: int = 4) -> Adapter:
    ck = Checkpoint(checkpoint)
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for weight in NF4.groups(ck):
        out, inp = NF4.shape(ck, weight)
        layers[weight[: -len(".weight")]] = LoraLayer(torch.randn(rank, inp, generator=g) / inp**0.5, torch.randn(out, rank, generator=g) * scale, float(rank))
    return Adapter(layers, {"source": "random"})


CALIBRATION = [[(7 * i + 3 * j) % 128 for j in range(40)] for i in range(6)]


def test_collected_hessians_are_the_merged_models_linear_inputs(tiny):
    """Layer by layer with the deltas added equals hooks on the whole merged model."""
    from gptq_helpers import nf4_model

    _, nf4 = tiny
    adapter = adapter_for(nf4, scale=0.05)
    weights = [f"{n}.weight" for n in adapter]
    deltas = {f"{n}.weight": adapter[n].folded(1.0) for n in adapter}
    got = collect_hessians(nf4, CALIBRATION, weights, deltas=deltas)
    model = nf4_model(nf4)  # the weights as the NF4 codec decodes them
    adapterops.merging.merge_into(adapter, model)
    expected, hooks = {}, []
    for w in weights:
        def hook(module, args, w=w):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            expected[w] = expected.get(w, 0) + x.T @ x
        hooks.append(model.get_submodule(w[: -len(".weight")]).register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in CALIBRATION:
            model(torch.tensor([ids]))
    for w in weights:
        torch.testing.assert_close(got[w].double(), expected[w], rtol=1e-4, atol=1e-4)
    attn = "model.layers.1.self_attn"
    assert got[f"{attn}.q_proj.weight"] is got[f"{attn}.v_proj.weight"] is not got[f"{attn}.o_proj.weight"]  # one sum per input
    assert got.sequences == len(CALIBRATION) and got.tokens == 40 * len(CALIBRATION)


@pytest.mark.parametrize("calibration", [None, CALIBRATION], ids=["data-free", "calibrated"])
def test_gptq_merge_keeps_the_base_scales_and_reports_both_roundings(tiny, tmp_path, calibration):
    _, nf4 = tiny
    adapter = adapter_for(nf4, scale=0.02)
    near = adapterops.merge(nf4, adapter, tmp_path / "near", progress=False).to_dict()
    got = adapterops.merge(nf4, adapter, tmp_path / "gptq", rounding="gptq", calibration=calibration, progress=False).to_dict()
    assert got["rounding"] == "gptq" and (got["calibration"] is None) == (calibration is None)
    before, after = read_all(nf4), read_all(tmp_path / "gptq")
    assert set(after) == set(before)
    by_name = {r["name"]: r for r in near["rows"]}
    for row in got["rows"]:
        name = row["name"]
        for suffix in (".absmax", ".nested_absmax", STATE):
            assert torch.equal(after[name + suffix], before[name + suffix]), name + suffix
        assert row["codes_changed_nearest"] == pytest.approx(by_name[name]["codes_changed"])
        assert row["retained_nearest"] == pytest.approx(by_name[name]["retained"], abs=1e-6)
        assert 0 <= row["output_error"] and 0 <= row["output_error_nearest"]
    errors = sorted(r["output_error"] / r["output_error_nearest"] for r in got["rows"])
    assert errors[len(errors) // 2] < 0.9  # the median layer loses less of the adapter
    assert got["totals"]["output_error_median"] < got["totals"]["output_error_nearest_median"]


def test_report_output_error_matches_a_direct_computation(tiny, tmp_path):
    _, nf4 = tiny
    adapter = adapter_for(nf4, scale=0.02)
    name = "model.layers.1.mlp.down_proj"
    report = adapterops.merge(nf4, adapter, tmp_path / "out", rounding="gptq", calibration=CALIBRATION, progress=False)
    row = next(r for r in report.rows if r["name"] == f"{name}.weight")
    weights = [f"{n}.weight" for n in adapter]
    H = collect_hessians(nf4, CALIBRATION, weights, deltas={f"{n}.weight": adapter[n].folded(1.0) for n in adapter})[f"{name}.weight"]
    B, A = adapter[name].folded(1.0)
    D = B @ A
    W = dequantize_nf4(from_state_dict(read_all(nf4), f"{name}.weight")).float()
    merged = dequantize_nf4(from_state_dict(read_all(tmp_path / "out"), f"{name}.weight")).float()
    assert row["output_error"] == pytest.approx(float(relative_output_error(merged - (W + D), D, H)), rel=1e-3)


def test_nearest_rounding_is_todays_merge_byte_for_byte(tiny, tmp_path):
    _, nf4 = tiny
    adapter = adapter_for(nf4, scale=0.02)
    adapterops.merge(nf4, adapter, tmp_path / "default", progress=False)
    report = adapterops.merge(nf4, adapter, tmp_path / "nearest", rounding="nearest", calibration=CALIBRATION, progress=False)
    a, b = read_all(tmp_path / "default"), read_all(tmp_path / "nearest")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all("output_error" in r and "output_error_nearest" not in r for r in report.rows)  # measured, not changed


def test_quantize_with_gptq_lowers_the_output_error(tiny, tmp_path):
    dense, _ = tiny
    near = quantize_checkpoint(dense, tmp_path / "near", progress=False)
    got = quantize_checkpoint(dense, tmp_path / "gptq", rounding="gptq", calibration=CALIBRATION, progress=False)
    assert got.to_dict()["rounding"] == "gptq" and near.to_dict()["rounding"] == "nearest"
    rows = {r["name"]: r for r in near.rows}
    a, b = read_all(tmp_path / "near"), read_all(tmp_path / "gptq")
    for row in got.rows:
        assert torch.equal(a[row["name"] + ".absmax"], b[row["name"] + ".absmax"])  # bitsandbytes' scales
        assert row["rel_error_nearest"] == pytest.approx(rows[row["name"]]["rel_error"])
    ratios = sorted(r["output_error"] / r["output_error_nearest"] for r in got.rows)
    assert ratios[len(ratios) // 2] < 0.95
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rounding": "stochastic"}, "unknown rounding 'stochastic'"),
        ({"rounding": "gptq", "dtype": "bf16"}, "needs an NF4 base written as NF4"),
        ({"calibration": CALIBRATION, "dtype": "bf16"}, "calibration only changes merges into a quantized"),
        ({"rounding": "gptq", "calibration": CALIBRATION, "calibration_samples": 0}, "calibration_samples must be at least 1"),
    ],
)
def test_bad_rounding_options_fail_before_writing(tiny, tmp_path, options, message):
    _, nf4 = tiny
    with pytest.raises(AdapterOpsError, match=message):
        adapterops.merge(nf4, adapter_for(nf4, scale=0.02), tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"intermediate_size": 40}, r"gate_proj.weight is \[\d+, \d+\] in the checkpoint, but the model its config.json describes has it \[40,"),
        ({"vocab_size": 16}, "embed_tokens.weight is .* has it \\[16,"),
        ({"num_attention_heads": 3}, "cannot read the model config for calibration"),
    ],
)
def test_calibration_refuses_a_config_that_does_not_describe_the_weights(tiny, tmp_path, change, message):
    """A config.json that builds a different model (or none) fails before anything is written."""
    _, nf4 = tiny
    base = tmp_path / "base"
    shutil.copytree(nf4, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(AdapterOpsError, match=message):
        adapterops.merge(base, adapter_for(nf4, scale=0.02), tmp_path / "out", rounding="gptq", calibration=CALIBRATION, progress=False)
    assert not (tmp_path / "out").exists()


def test_gptq_into_a_dense_base_and_quantize_without_data_are_refused(tiny, tmp_path):
    dense, _ = tiny
    with pytest.raises(AdapterOpsError, match="needs an NF4 base"):
        adapterops.merge(dense, adapter_for(dense, scale=0.02), tmp_path / "out", rounding="gptq", progress=False)
    with pytest.raises(AdapterOpsError, match="needs calibration"):
        quantize_checkpoint(dense, tmp_path / "q", rounding="gptq", progress=False)


def test_cli_merge_with_gptq(tiny, tmp_path):
    _, nf4 = tiny
    adapter = adapter_for(nf4, scale=0.02)
    adapter.save(tmp_path / "a.st")
    result = CliRunner().invoke(main, ["merge", "--base", str(nf4), "--adapter", str(tmp_path / "a.st"), "--out", str(tmp_path / "out"),
                                       "--rounding", "gptq", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["rounding"] == "gptq" and all("output_error_nearest" in r for r in data["rows"])
    text = CliRunner().invoke(main, ["merge", "--base", str(nf4), "--adapter", str(tmp_path / "a.st"), "--out", str(tmp_path / "out2"),
                                     "--rounding", "gptq", "--quiet"])
    assert text.exit_code == 0 and "gptq" in text.output and "nearest" in text.output
    adapter_for(nf4, scale=0.001).save(tmp_path / "small.st")
    nearest = CliRunner().invoke(main, ["merge", "--base", str(nf4), "--adapter", str(tmp_path / "small.st"), "--out", str(tmp_path / "near")])
    assert nearest.exit_code == 0 and "--rounding gptq" in nearest.stderr  # the retention warning points to it
    rows = [json.dumps({"text": "hello"})]
    (tmp_path / "cal.jsonl").write_text("\n".join(rows) + "\n")
    bad = CliRunner().invoke(main, ["merge", "--base", str(nf4), "--adapter", str(tmp_path / "a.st"), "--out", str(tmp_path / "out3"),
                                    "--rounding", "gptq", "--calibration", str(tmp_path / "cal.jsonl")])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and "tokenizer" in bad.output
    assert not (tmp_path / "out3").exists()



@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_batched_gptq_merge_keeps_the_scales_and_matches_the_cpu_errors(tiny, tmp_path):
    """On CUDA equal-shape layers go through GPTQ together; the codes may differ from the CPU's where
    float32 sums land next to a threshold, so the output errors are compared instead."""
    _, nf4 = tiny
    adapter = adapter_for(nf4, scale=0.02)
    cpu = adapterops.merge(nf4, adapter, tmp_path / "cpu", rounding="gptq", calibration=CALIBRATION, device="cpu", progress=False)
    gpu = adapterops.merge(nf4, adapter, tmp_path / "gpu", rounding="gptq", calibration=CALIBRATION, device="cuda", progress=False)
    a, b = read_all(tmp_path / "cpu"), read_all(tmp_path / "gpu")
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith(".weight"))  # scales, states, other tensors
    by_name = {r["name"]: r for r in cpu.rows}
    for row in gpu.rows:
        assert row["output_error"] == pytest.approx(by_name[row["name"]]["output_error"], rel=0.05, abs=0.02)
        assert row["output_error_nearest"] == pytest.approx(by_name[row["name"]]["output_error_nearest"], rel=1e-3)
