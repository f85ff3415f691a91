"""adapterops.extract: planted low-rank differences come back exactly; energy and rank rules."""

from __future__ import annotations

import pytest
import torch
from merge_helpers import read_all, save_tiny_llama, tiny_gpt2_model
from safetensors.torch import save_file

import adapterops
from adapterops import Adapter, LoraLayer
from adapterops.errors import AdapterOpsError, BaseMismatchError, NonFiniteError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def planted(seed: int, out: int, inn: int, rank: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out, rank, generator=g, dtype=dtype) @ torch.randn(rank, inn, generator=g, dtype=dtype)) * 0.01


def write(path, tensors, config=None):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    if config:
        import json

        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def pair(tmp_path):
    """float64 base and tuned: three layers get planted rank-3/rank-2 differences, one is untouched,
    a norm and the embeddings change too (a LoRA cannot hold those)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"m.a.q.weight": (64, 96), "m.b.q.weight": (64, 96), "m.a.up.weight": (80, 64), "m.a.k.weight": (32, 64)}
    base = {n: torch.randn(*s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    base["m.norm.weight"] = torch.ones(64, dtype=torch.float64)
    base["m.embed_tokens.weight"] = torch.randn(50, 64, generator=g, dtype=torch.float64)
    diffs = {"m.a.q.weight": planted(1, 64, 96, 3), "m.b.q.weight": planted(2, 64, 96, 3), "m.a.up.weight": planted(3, 80, 64, 2)}
    tuned = {n: t + diffs.get(n, 0) for n, t in base.items()}
    tuned["m.norm.weight"] = tuned["m.norm.weight"] * 1.1
    tuned["m.embed_tokens.weight"] = tuned["m.embed_tokens.weight"] + 1
    return write(tmp_path / "base", base), write(tmp_path / "tuned", tuned), diffs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [3, 8, 40])
def test_planted_low_rank_difference_is_recovered(pair, rank, device):
    base, tuned, diffs = pair
    adapter = extract = adapterops.extract(base, tuned, rank=rank, device=device, progress=False)
    assert sorted(adapter) == sorted(n.removesuffix(".weight") for n in diffs)
    info = extract.metadata["extraction"]
    for name, diff in diffs.items():
        layer = adapter[name.removesuffix(".weight")]
        true_rank = torch.linalg.matrix_rank(diff).item()
        assert layer.rank == true_rank  # never above the numerical rank, whatever was asked
        torch.testing.assert_close(layer.delta().double(), diff, rtol=0, atol=1e-12)
        assert info["layers"][name.removesuffix(".weight")]["energy"] == pytest.approx(1.0, abs=1e-12)
    expected_method = "randomized" if 4 * (rank + 10) <= 64 else "full"
    assert info["method"] == expected_method
    assert info["unchanged"] == 1 and sorted(info["skipped"]) == ["m.embed_tokens.weight", "m.norm.weight"]
    assert adapter.metadata["base_model"] == str(base)


def test_rank_below_the_true_rank_is_the_best_approximation(pair):
    base, tuned, diffs = pair
    adapter = adapterops.extract(base, tuned, rank=1, progress=False)
    for name, diff in diffs.items():
        U, S, Vh = torch.linalg.svd(diff)
        best = S[0] * torch.outer(U[:, 0], Vh[0])  # Eckart-Young, rank 1
        torch.testing.assert_close(adapter[name.removesuffix(".weight")].delta().double(), best, rtol=0, atol=1e-10)
        energy = adapter.metadata["extraction"]["layers"][name.removesuffix(".weight")]["energy"]
        assert energy == pytest.approx((S[0] ** 2 / (S**2).sum()).item(), rel=1e-9)


def test_energy_rule_picks_the_smallest_rank(tmp_path):
    g = torch.Generator().manual_seed(4)
    U, _ = torch.linalg.qr(torch.randn(40, 4, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(30, 4, generator=g, dtype=torch.float64))
    S = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    W = torch.randn(40, 30, generator=g, dtype=torch.float64)
    base = write(tmp_path / "b", {"x.weight": W})
    tuned = write(tmp_path / "t", {"x.weight": W + U @ torch.diag(S) @ V.T})
    fractions = torch.cumsum(S**2, 0) / (S**2).sum()  # 0.753, 0.941, 0.988, 1
    for energy in (0.7, 0.9, 0.95, 1.0):
        k = int((fractions < energy - 1e-12).sum()) + 1
        adapter = adapterops.extract(base, tuned, energy=energy, progress=False)
        assert adapter["x"].rank == k
        assert adapter.metadata["extraction"]["layers"]["x"]["energy"] == pytest.approx(fractions[k - 1].item(), rel=1e-9)
        assert adapter.metadata["extraction"]["method"] == "full"


def test_extract_then_merge_gives_back_the_tuned_model(tmp_path):
    base = save_tiny_llama(tmp_path / "base", dtype=torch.float32)
    weights = read_all(base)
    g = torch.Generator().manual_seed(5)
    adapter = Adapter({
        "model.layers.0.self_attn.q_proj": LoraLayer(torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g) * 0.01, 2.0),
        "model.layers.1.mlp.down_proj": LoraLayer(torch.randn(2, 96, generator=g), torch.randn(64, 2, generator=g) * 0.01, 2.0),
    })
    adapterops.merge(base, adapter, tmp_path / "tuned", progress=False)
    extracted = adapterops.extract(base, tmp_path / "tuned", rank=4, progress=False)
    assert sorted(extracted) == sorted(adapter)
    for name, layer in adapter.items():
        rel = (extracted[name].delta() - layer.delta()).norm() / layer.delta().norm()
        assert rel < 1e-4  # float32 rounding of W + delta, nothing more
    adapterops.merge(base, extracted, tmp_path / "again", progress=False)
    again, tuned = read_all(tmp_path / "again"), read_all(tmp_path / "tuned")
    for name, t in tuned.items():
        torch.testing.assert_close(again[name], t, rtol=0, atol=1e-5 * weights[name].abs().max().item())


def test_conv1d_checkpoint_gives_a_fan_in_fan_out_adapter(tmp_path):
    model = tiny_gpt2_model()
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.add_(planted(6, 32, 96, 2, torch.float32))  # stored (in, out)
    model.save_pretrained(tmp_path / "tuned")
    adapter = adapterops.extract(tmp_path / "base", tmp_path / "tuned", rank=4, progress=False)
    assert list(adapter) == ["transformer.h.0.attn.c_attn"] and adapter.metadata["fan_in_fan_out"] is True
    assert adapter["transformer.h.0.attn.c_attn"].shape == (96, 32)
    adapterops.merge(tmp_path / "base", adapter, tmp_path / "again", progress=False)
    again, tuned = read_all(tmp_path / "again"), read_all(tmp_path / "tuned")
    for name, t in tuned.items():
        torch.testing.assert_close(again[name], t, rtol=0, atol=1e-5)


def test_bad_requests(pair, tmp_path):
    base, tuned, _ = pair
    with pytest.raises(AdapterOpsError, match="exactly one of rank= or energy="):
        adapterops.extract(base, tuned, progress=False)
    with pytest.raises(AdapterOpsError, match="exactly one"):
        adapterops.extract(base, tuned, rank=2, energy=0.9, progress=False)
    with pytest.raises(AdapterOpsError, match="energy must be in"):
        adapterops.extract(base, tuned, energy=1.5, progress=False)
    other = write(tmp_path / "other", {"m.a.q.weight": torch.zeros(64, 95, dtype=torch.float64)})
    with pytest.raises(BaseMismatchError, match=r"not in the tuned checkpoint.*shape mismatch.*m\.a\.q\.weight: base \[64, 96\], tuned \[64, 95\]"):
        adapterops.extract(base, other, rank=2, progress=False)


def test_a_weight_holding_nan_is_named_instead_of_failing_in_the_svd(pair, tmp_path):
    base, tuned, _ = pair
    from safetensors.torch import load_file

    tensors = load_file(str(tuned / "model.safetensors"))
    tensors["m.a.k.weight"][3, 4] = float("nan")
    poisoned = write(tmp_path / "poisoned", tensors)
    with pytest.raises(NonFiniteError, match=r"^m\.a\.k\.weight: NaN or Inf"):
        adapterops.extract(base, poisoned, rank=2, progress=False)
