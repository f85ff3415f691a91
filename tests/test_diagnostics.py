"""adapterops.diagnostics against dense float64 references, planted structure, PEFT and a real model."""

import math
import os

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from adapterops import Adapter, LoraLayer, _intruders, _svd_cache
from adapterops._svd_cache import BaseWeights, CachedSvd, SvdCache, content_key, default_cache_dir, half_rows
from adapterops.checkpoint import Checkpoint
from adapterops.diagnostics import (
    Comparison,
    DiagnosisReport,
    compare,
    diagnose,
    reduce_intruders,
    spectrum_stats,
)
from adapterops.errors import AdapterOpsError, BaseMismatchError, NonFiniteError, ShapeMismatchError, UnsupportedOperationError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTEROPS_CACHE", str(tmp_path / "cache"))


def dense_paper(W: torch.Tensor, dW: torch.Tensor, k: int):
    """Shuttleworth et al. 2024 as written: two dense SVDs in float64, then max |cos| over all of U(W)."""
    U0, _, _ = torch.linalg.svd(W.double(), full_matrices=False)
    U1, S1, _ = torch.linalg.svd(W.double() + dW.double(), full_matrices=False)
    sims = (U1[:, :k].T @ U0).abs().amax(dim=1)
    return S1[:k], sims


def dense_stats(dW: torch.Tensor) -> dict:
    S = torch.linalg.svdvals(dW.double())
    S = S[S > S[0] * 1e-10] if S[0] > 0 else S[:0]
    p = S / S.sum()
    energy = torch.cumsum(S**2, 0) / (S**2).sum()
    return {
        "effective_rank": math.exp(-float((p * p.log()).sum())),
        "stable_rank": float((S**2).sum() / S[0] ** 2),
        "rank_90": int((energy < 0.9 - 1e-12).sum()) + 1,
        "rank_99": int((energy < 0.99 - 1e-12).sum()) + 1,
        "norm": float(torch.linalg.matrix_norm(dW.double())),
        "spectral_norm": float(S[0]),
    }


def random_layer(g, out, inn, r, dtype=torch.float64, alpha=None):
    return LoraLayer(torch.randn(r, inn, generator=g, dtype=dtype), torch.randn(out, r, generator=g, dtype=dtype), alpha or 2.0 * r)


# --------------------------------------------------------------------------- base-free spectra


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), out=st.integers(2, 40), inn=st.integers(2, 40), r=st.integers(1, 10))
def test_spectra_match_dense_float64(seed, out, inn, r):
    g = torch.Generator().manual_seed(seed)
    layer = random_layer(g, out, inn, r)
    row = diagnose(Adapter({"x": layer})).layers[0]
    ref = dense_stats(layer.delta())
    assert row.numerical_rank == min(out, inn, r)
    for key in ("effective_rank", "stable_rank", "norm", "spectral_norm"):
        assert getattr(row, key) == pytest.approx(ref[key], rel=1e-9), key
    assert (row.rank_90, row.rank_99) == (ref["rank_90"], ref["rank_99"])
    assert len(row.singular_values) == row.numerical_rank


def test_float32_factors_match_dense_float64():
    g = torch.Generator().manual_seed(1)
    layer = random_layer(g, 300, 200, 16, dtype=torch.float32)
    row = diagnose(Adapter({"x": layer})).layers[0]
    ref = dense_stats(layer.delta().double())
    for key in ("effective_rank", "stable_rank", "norm", "spectral_norm"):
        assert getattr(row, key) == pytest.approx(ref[key], rel=1e-5), key


def test_spectrum_stats_known_values():
    # equal singular values: effective rank and stable rank are the count; energy ranks by formula
    stats = spectrum_stats(torch.ones(5))
    assert stats["effective_rank"] == pytest.approx(5.0)
    assert stats["stable_rank"] == pytest.approx(5.0)
    assert (stats["rank_90"], stats["rank_99"]) == (5, 5)
    stats = spectrum_stats(torch.tensor([3.0, 0.0001]))
    assert stats["rank_90"] == 1 and stats["rank_99"] == 1 and 1.0 < stats["effective_rank"] < 1.01
    assert spectrum_stats(torch.zeros(0)) == {"effective_rank": 0.0, "stable_rank": 0.0, "rank_90": 0, "rank_99": 0}


def test_cancelled_layer_is_rank_zero():
    g = torch.Generator().manual_seed(2)
    a = Adapter({"x": random_layer(g, 20, 30, 4)})
    row = diagnose(a - a).layers[0]
    assert row.numerical_rank == 0 and row.effective_rank == 0.0 and row.singular_values == ()


# ------------------------------------------------------------------------------ intruder math


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), out=st.integers(3, 48), inn=st.integers(3, 48), r=st.integers(1, 6), big=st.booleans(), dense=st.booleans())
def test_merged_top_matches_dense_paper(seed, out, inn, r, big, dense):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inn, generator=g, dtype=torch.float64)
    B = torch.randn(out, r, generator=g, dtype=torch.float64) * (3.0 if big else 0.3)
    A = torch.randn(r, inn, generator=g, dtype=torch.float64)
    k = min(10, out, inn)
    S_ref, sims_ref = dense_paper(W, B @ A, k)
    full = torch.linalg.svdvals(W + B @ A)
    gaps = (full[:-1] - full[1:])[: k + 1] / full[0]
    assume(bool((gaps > 1e-3).all()))  # singular vectors of clustered values are not unique
    U, S, UtW = _intruders.base_svd(W[None])
    top = _intruders.merged_top(UtW, U, S, B[None], A[None], k, dense_below=None if dense else 0)
    torch.testing.assert_close(top.values[0].double(), S_ref, rtol=1e-5, atol=1e-5 * float(full[0]))
    torch.testing.assert_close(top.similarity[0].double(), sims_ref, rtol=0, atol=1e-4)
    left = top.left[0].double()
    torch.testing.assert_close(left.T @ left, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("deficient", [False, True])
def test_base_svd_matches_lapack(deficient):
    g = torch.Generator().manual_seed(3)
    for shape in [(40, 40), (60, 25), (25, 60)]:
        W = torch.randn(2, *shape, generator=g, dtype=torch.float64)
        if deficient:  # rank 10: the thin U still has to be orthonormal
            W = W[..., :10] @ torch.randn(2, 10, shape[1], generator=g, dtype=torch.float64)
        U, S, UtW = _intruders.base_svd(W)
        n = min(shape)
        assert U.shape == (2, shape[0], n) and S.shape == (2, n) and U.dtype == torch.float32
        torch.testing.assert_close(UtW.double(), U.double().mT @ W, rtol=0, atol=1e-5)
        ref = torch.linalg.svdvals(W)
        torch.testing.assert_close(S.double(), ref, rtol=1e-6, atol=1e-6 * float(ref.max()))  # zeros come out ~1e-8 s_1
        k = 10 if deficient else n
        Uk, Sk = U.double()[..., :k], S.double()[..., :k]
        torch.testing.assert_close(Uk @ (Uk.mT @ W), W, rtol=0, atol=1e-5)  # U spans col(W)
        torch.testing.assert_close(torch.linalg.vector_norm(W.mT @ Uk, dim=-2), Sk, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(U.double().mT @ U.double(), torch.eye(n, dtype=torch.float64).expand(2, n, n), rtol=0, atol=1e-6)


def test_top_eigh_falls_back_to_dense_when_iteration_stalls():
    g = torch.Generator().manual_seed(4)
    N, m = 300, 6
    D = torch.linspace(10, 0, N, dtype=torch.float64)[None]  # evenly spaced: slow to converge
    L = torch.randn(1, N, m, generator=g, dtype=torch.float64)
    C = torch.eye(m, dtype=torch.float64)[None]
    ref_vals, ref_vecs = torch.linalg.eigh(torch.diag(D[0]) + L[0] @ L[0].T)
    ref_vals, ref_vecs = ref_vals.flip(0)[:5], ref_vecs.flip(1)[:, :5]
    for restarts, expect in [(1, False), (100, True)]:
        evals, vecs, converged = _intruders.top_eigh(D, L, C, 5, dense_below=0, max_restarts=restarts)
        assert bool(converged[0]) is expect
        torch.testing.assert_close(evals[0], ref_vals)
        torch.testing.assert_close((vecs[0].T @ ref_vecs).abs().diagonal(), torch.ones(5, dtype=torch.float64))


# --------------------------------------------------------------------------- planted intruders


def planted(out: int, inn: int, seed: int = 0):
    """A base with known singular vectors and an adapter with 3 planted intruders (4 when tall) and 2
    directions aligned with base singular vectors (which can never be intruders)."""
    g = torch.Generator().manual_seed(seed)
    n = min(out, inn)
    assert n >= 64
    Qo, _ = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=torch.float64))
    Qi, _ = torch.linalg.qr(torch.randn(inn, inn, generator=g, dtype=torch.float64))
    U0, V0 = Qo[:, :n], Qi[:, :n]
    s0 = torch.cat([torch.linspace(10, 4.5, 12, dtype=torch.float64), torch.linspace(1.0, 0.8, n - 12, dtype=torch.float64)])
    W = U0 @ torch.diag(s0) @ V0.T
    cols_B, rows_A = [], []
    for t, sigma in enumerate([30.0, 25.0, 20.0]):  # spread evenly over 16 tail directions: |cos| = 1/4
        block = slice(12 + 16 * t, 28 + 16 * t)
        cols_B.append(sigma * U0[:, block].sum(1) / 4)
        rows_A.append(V0[:, block].sum(1) / 4)
    for j in (0, 2):  # boost two base directions: aligned, similarity exactly 1
        cols_B.append(3.0 * U0[:, j])
        rows_A.append(V0[:, j])
    count = 3
    if out > inn:  # a direction outside col(W) altogether
        cols_B.append(15.0 * Qo[:, n])
        rows_A.append(V0[:, n - 1])
        count += 1
    B, A = torch.stack(cols_B, 1), torch.stack(rows_A, 0)
    return W, LoraLayer(A, B, float(A.shape[0])), count


@pytest.mark.parametrize("shape", [(64, 64), (96, 64), (64, 96)])
@pytest.mark.parametrize("iterative", [False, True])
def test_planted_intruders_counted_exactly(shape, iterative, monkeypatch):
    if iterative:
        monkeypatch.setattr(_intruders, "DENSE_BELOW", 0)
    W, layer, count = planted(*shape)
    _, sims = dense_paper(W, layer.delta(), 10)
    assert int((sims < 0.5).sum()) == count  # the construction is what it claims
    report = diagnose(Adapter({"model.layers.0.mlp.up_proj": layer}), {"model.layers.0.mlp.up_proj.weight": W.float()}, cache=False)
    row = report.layers[0]
    assert row.intruders == count
    assert report.summary.intruders == count and report.summary.layers_with_intruders == 1
    torch.testing.assert_close(torch.tensor(row.similarities, dtype=torch.float64), sims, rtol=0, atol=1e-4)
    outside = [0.8 / math.hypot(0.8, 15.0)] if count == 4 else []  # |cos| of (0.8 u + 15 x) with u
    assert sorted(row.similarities)[:count] == pytest.approx(sorted([0.25] * 3 + outside), abs=0.01)
    assert row.relative_norm == pytest.approx(float(layer.delta().norm() / W.norm()), rel=1e-5)
    assert row.base_singular_values[0] == pytest.approx(10.0, rel=1e-5)


def test_epsilon_and_top_k_move_the_count():
    W, layer, _ = planted(64, 64)
    adapter, base = Adapter({"w": layer}), {"w.weight": W.float()}
    assert diagnose(adapter, base, top_k=2, cache=False).layers[0].intruders == 2
    assert diagnose(adapter, base, epsilon=0.2, cache=False).layers[0].intruders == 0
    assert diagnose(adapter, base, epsilon=0.99, cache=False).layers[0].intruders == 3
    assert len(diagnose(adapter, base, top_k=200, cache=False).layers[0].similarities) == 64  # capped at min(out, in)


def test_conv1d_base_stored_transposed_gives_the_same():
    W, layer, count = planted(96, 64)
    adapter = Adapter({"h.0.mlp.c_fc": layer}, {"fan_in_fan_out": True})  # a state dict cannot say it is Conv1D
    plain = diagnose(adapter, {"h.0.mlp.c_fc.weight": W.float()}, cache=False).layers[0]
    flipped = diagnose(adapter, {"h.0.mlp.c_fc.weight": W.float().T.contiguous()}, cache=False).layers[0]
    assert flipped.intruders == plain.intruders == count
    assert flipped.similarities == pytest.approx(plain.similarities, abs=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_devices_agree(device):
    W, layer, count = planted(64, 96)
    row = diagnose(Adapter({"w": layer}), {"w.weight": W.float()}, device=device, cache=False).layers[0]
    assert row.intruders == count


# -------------------------------------------------------------------------- real model (SmolLM2)


def test_agrees_with_dense_paper_on_smollm2(smollm2_dir, monkeypatch):
    monkeypatch.setattr(_intruders, "DENSE_BELOW", 0)  # the iterative solver, as on 4096-wide layers
    ckpt = Checkpoint(smollm2_dir)
    g = torch.Generator().manual_seed(5)
    layers = {}
    for name in ["model.layers.5.self_attn.q_proj", "model.layers.5.self_attn.k_proj", "model.layers.5.mlp.up_proj"]:  # square, wide, tall
        out, inn = ckpt.shape(name + ".weight")
        W = ckpt.get(name + ".weight").float()
        A = torch.randn(8, inn, generator=g) / inn**0.5
        B = torch.randn(out, 8, generator=g)
        B = B * (0.3 * float(W.norm()) / float((B @ A).norm()))  # ||dW|| / ||W|| = 0.3: a mix of intruders and not
        layers[name] = LoraLayer(A, B, 8.0)
    report = diagnose(Adapter(layers), smollm2_dir, top_k=10, cache=False)
    total = 0
    for row in report.layers:
        W = ckpt.get(row.name + ".weight").float()
        S_ref, sims = dense_paper(W, layers[row.name].delta(), 10)
        torch.testing.assert_close(torch.tensor(row.similarities, dtype=torch.float64), sims, rtol=0, atol=2e-4)
        torch.testing.assert_close(torch.tensor(row.merged_singular_values, dtype=torch.float64), S_ref, rtol=1e-5, atol=0)
        clear = (sims - 0.5).abs() > 2e-4
        assert [s < 0.5 for s, c in zip(row.similarities, clear) if c] == (sims < 0.5)[clear].tolist()
        total += int((sims < 0.5).sum())
    assert 0 < report.summary.intruders == total < 40


# ------------------------------------------------------------------------------------- cache


def write_base(path, tensors):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def two_layer_case(tmp_path):
    W1, l1, _ = planted(64, 64, seed=1)
    W2, l2, _ = planted(96, 64, seed=2)
    base = write_base(tmp_path / "base", {"a.weight": W1.to(torch.bfloat16), "b.weight": W2.to(torch.bfloat16)})
    return Adapter({"a": l1, "b": l2}), base


def test_second_run_reads_the_cache(tmp_path, monkeypatch):
    adapter, base = two_layer_case(tmp_path)
    calls = []
    real = _intruders.base_svd
    monkeypatch.setattr(_intruders, "base_svd", lambda W: calls.append(W.shape[0]) or real(W))
    first = diagnose(adapter, base, cache=tmp_path / "svd")
    assert sum(calls) == 2 and (first.summary.base_svds_cached, first.summary.base_svds_computed) == (0, 2)
    assert len(list((tmp_path / "svd").rglob("*.safetensors"))) == 2
    calls.clear()
    second = diagnose(adapter, base, cache=tmp_path / "svd")
    assert calls == [] and (second.summary.base_svds_cached, second.summary.base_svds_computed) == (2, 0)
    # the cache holds U and U^T W in float16: the decisions agree, the numbers within round-off
    for a, b in zip(first.layers, second.layers):
        assert (a.name, a.intruders, a.base_norm, a.singular_values) == (b.name, b.intruders, b.base_norm, b.singular_values)
        bound = 1e-3  # see adapterops._svd_cache (measured: 3e-4)
        torch.testing.assert_close(torch.tensor(b.similarities), torch.tensor(a.similarities), rtol=0, atol=bound)
        torch.testing.assert_close(torch.tensor(b.merged_singular_values), torch.tensor(a.merged_singular_values), rtol=bound, atol=0)


def test_cached_run_reads_no_base_weight(tmp_path, monkeypatch):
    adapter, base = two_layer_case(tmp_path)
    first = diagnose(adapter, base, cache=tmp_path / "svd")
    monkeypatch.setattr(BaseWeights, "load", lambda *a: pytest.fail("the base was read although the cache knew it"))
    again = diagnose(adapter, base, cache=tmp_path / "svd")
    assert again.summary.base_svds_cached == 2 and again.summary.intruders == first.summary.intruders


def test_an_entry_that_cannot_be_read_is_recomputed(tmp_path, monkeypatch):
    adapter, base = two_layer_case(tmp_path)
    first = diagnose(adapter, base, cache=tmp_path / "svd")
    monkeypatch.setattr(CachedSvd, "read_into", lambda *a: (_ for _ in ()).throw(FileNotFoundError("pruned meanwhile")))
    again = diagnose(adapter, base, cache=tmp_path / "svd")
    assert (again.summary.base_svds_cached, again.summary.base_svds_computed) == (0, 2)
    assert [r.similarities for r in again.layers] == [r.similarities for r in first.layers]  # computed afresh, unrounded


@pytest.mark.parametrize("device", DEVICES)
def test_cached_runs_agree_across_devices(tmp_path, monkeypatch, device):
    """A GPU reads entries through pinned staging buffers in pieces; the CPU straight into place."""
    monkeypatch.setattr(_svd_cache, "STAGING_PIECE", 4096)  # several pieces per tensor
    adapter, base = two_layer_case(tmp_path)
    diagnose(adapter, base, cache=tmp_path / "svd", device="cpu")
    cpu = diagnose(adapter, base, cache=tmp_path / "svd", device="cpu")
    other = diagnose(adapter, base, cache=tmp_path / "svd", device=device)
    assert other.summary.base_svds_cached == 2
    for a, b in zip(cpu.layers, other.layers):
        assert a.intruders == b.intruders
        assert b.similarities == pytest.approx(a.similarities, abs=1e-5)


def test_half_rows_keep_any_scale():
    x = torch.tensor([[3e5, -4e5], [1e-9, 2e-9], [0.0, 0.0]])
    rows, norms = half_rows(x)
    assert rows.dtype == torch.float16 and bool(torch.isfinite(rows).all())
    torch.testing.assert_close(rows.float() * norms[:, None], x, rtol=1e-3, atol=0)


def test_cache_size_limit_drops_least_recently_used(tmp_path):
    cache = SvdCache(tmp_path, max_bytes=0)
    for key in ("aa" * 32, "bb" * 32):
        cache.store(key, torch.zeros(8, 8), torch.zeros(8), torch.zeros(8, 8))
    size = cache.path("aa" * 32).stat().st_size
    os.utime(cache.path("aa" * 32), ns=(1, 1))  # the older one
    cache.max_bytes = size
    assert cache.prune() == size and not cache.path("aa" * 32).exists() and cache.path("bb" * 32).exists()


def test_cache_honours_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("ADAPTEROPS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "adapterops" / "svd"
    monkeypatch.setenv("ADAPTEROPS_CACHE", str(tmp_path / "own"))
    assert default_cache_dir() == tmp_path / "own" / "svd"


def test_cache_default_dir_from_environment(tmp_path, monkeypatch):
    adapter, base = two_layer_case(tmp_path)
    monkeypatch.setenv("ADAPTEROPS_CACHE", str(tmp_path / "env"))
    diagnose(adapter, base)
    assert len(list((tmp_path / "env" / "svd").rglob("*.safetensors"))) == 2
    diagnose(adapter, base, cache=False)
    assert diagnose(adapter, base, cache=False).summary.base_svds_cached == 0


def test_cache_is_keyed_by_content_and_survives_corruption(tmp_path):
    adapter, base = two_layer_case(tmp_path)
    cache = tmp_path / "svd"
    diagnose(adapter, base, cache=cache)
    entry = sorted(cache.rglob("*.safetensors"))[0]
    entry.write_bytes(b"not a safetensors file")
    again = diagnose(adapter, base, cache=cache)
    assert (again.summary.base_svds_cached, again.summary.base_svds_computed) == (1, 1)
    assert len(entry.read_bytes()) > 100  # rewritten
    # a changed weight is a different key
    tensors = {"a.weight": Checkpoint(base).get("a.weight"), "b.weight": Checkpoint(base).get("b.weight") * 2}
    changed = diagnose(adapter, write_base(tmp_path / "base2", tensors), cache=cache)
    assert (changed.summary.base_svds_cached, changed.summary.base_svds_computed) == (1, 1)
    # no temporary files are left behind
    assert not [p for p in cache.rglob("*") if p.name.startswith(".")]


def test_content_key_depends_on_bytes_dtype_shape_and_orientation():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    key = content_key([("weight", t)], transposed=False)
    assert key == content_key([("weight", t.clone())], transposed=False)
    assert key != content_key([("weight", t.reshape(4, 3))], transposed=False)
    assert key != content_key([("weight", t.to(torch.float64))], transposed=False)
    assert key != content_key([("weight", t)], transposed=True)
    t2 = t.clone()
    t2[0, 0] = 0.5
    assert key != content_key([("weight", t2)], transposed=False)


def test_unwritable_cache_warns_and_continues(tmp_path):
    adapter, base = two_layer_case(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="cannot write the SVD cache"):
        report = diagnose(adapter, base, cache=blocker / "svd")
    assert report.summary.intruders == 7


def test_cache_rejects_entries_of_the_wrong_shape(tmp_path):
    cache = SvdCache(tmp_path)
    cache.store("ab" * 32, torch.zeros(5, 3), torch.zeros(3), torch.zeros(3, 3))
    assert cache.load("ab" * 32, (5, 3)) is not None
    assert cache.load("ab" * 32, (6, 3)) is None


# ------------------------------------------------------------------------------- reduce_intruders


def test_reduce_intruders_removes_planted_ones_and_keeps_rank():
    W, layer, count = planted(96, 64)
    g = torch.Generator().manual_seed(7)
    clean = LoraLayer(torch.randn(2, 64, generator=g, dtype=torch.float64) * 1e-3, torch.randn(64, 2, generator=g, dtype=torch.float64), 2.0)
    Wc = planted(64, 64, seed=3)[0]
    adapter = Adapter({"x": layer, "y": clean})
    base = {"x.weight": W.float(), "y.weight": Wc.float()}
    before = diagnose(adapter, base, cache=False)
    assert before["x"].intruders == count and before["y"].intruders == 0
    removed = reduce_intruders(adapter, base, scale=0.0, cache=False)
    assert removed.ranks == adapter.ranks
    assert removed["y"] is adapter["y"]  # no intruders: untouched
    after = diagnose(removed, base, cache=False)
    assert after["x"].intruders == 0
    assert after["x"].relative_norm < before["x"].relative_norm


def test_reduce_intruders_scales_intruder_singular_values():
    W, layer, count = planted(64, 64)
    adapter, base = Adapter({"x": layer}), {"x.weight": W.float()}
    before = diagnose(adapter, base, cache=False)["x"]
    after = diagnose(reduce_intruders(adapter, base, scale=0.75, cache=False), base, cache=False)["x"]
    shrunk = sorted(v for v, s in zip(before.merged_singular_values, before.similarities) if s < 0.5)
    assert after.intruders == count  # still there at 3/4 strength ...
    now = sorted(v for v, s in zip(after.merged_singular_values, after.similarities) if s < 0.5)
    assert now == pytest.approx([0.75 * v for v in shrunk], rel=2e-3)  # ... each at 0.75 of its singular value


def test_reduce_intruders_matches_peft():
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(48, 64, bias=False)
            self.fc2 = torch.nn.Linear(64, 40, bias=False)

    model = peft.get_peft_model(Net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False))
    layers, base = {}, {}
    for name in ("fc1", "fc2"):
        module = model.base_model.model.get_submodule(name)
        module.lora_B["default"].weight.data = torch.randn_like(module.lora_B["default"].weight) * 0.5
        layers[name] = LoraLayer(module.lora_A["default"].weight.detach().clone(), module.lora_B["default"].weight.detach().clone(), 8.0)
        base[name + ".weight"] = module.get_base_layer().weight.detach().clone()
    reduce_intruder_dimension(model, top_k=10, threshold_epsilon=0.5, mitigation_lambda=0.75, logging_sink=None)
    ours = reduce_intruders(Adapter(layers), base, scale=0.75, top_k=10, epsilon=0.5, cache=False)
    for name in ("fc1", "fc2"):
        expected = model.base_model.model.get_submodule(name).get_delta_weight("intruder_reduced").detach()
        assert not torch.allclose(expected, layers[name].delta(), atol=1e-3)  # PEFT did change it
        torch.testing.assert_close(ours[name].delta(), expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
        assert ours[name].rank == 4


# --------------------------------------------------------------------------------------- compare


def test_compare_identical_opposite_scaled():
    g = torch.Generator().manual_seed(8)
    a = Adapter({"x": random_layer(g, 30, 20, 4, torch.float32), "y": random_layer(g, 20, 20, 3, torch.float32)})
    assert compare(a, a).summary.verdict == "identical"
    assert {r.verdict for r in compare(a, a).layers} == {"identical"}
    result = compare(a, -a)
    assert result.summary.verdict == "opposite" and result.summary.cosine == pytest.approx(-1.0)
    assert compare(a, 2 * a).summary.verdict == "scaled"
    assert compare(a, a).layers[0].output_overlap == pytest.approx(1.0)


def test_compare_orthogonal_planted_is_disjoint():
    g = torch.Generator().manual_seed(9)
    eye_out, eye_in = torch.eye(40), torch.eye(30)
    a = Adapter({"x": LoraLayer(eye_in[:4] * 2, eye_out[:, :4] @ torch.randn(4, 4, generator=g), 4.0)})
    b = Adapter({"x": LoraLayer(eye_in[10:14], eye_out[:, 10:14] @ torch.randn(4, 4, generator=g), 4.0)})
    result = compare(a, b)
    assert result.summary.verdict == "disjoint"
    row = result.layers[0]
    assert row.cosine == pytest.approx(0.0, abs=1e-7) and row.output_overlap == pytest.approx(0.0, abs=1e-10)
    assert row.principal_cosines == pytest.approx((0.0,) * 4, abs=1e-5)  # float32 factors


def test_compare_principal_angles_match_dense():
    g = torch.Generator().manual_seed(10)
    a = Adapter({"x": random_layer(g, 25, 18, 3)})
    b = Adapter({"x": random_layer(g, 25, 18, 5)})
    row = compare(a, b).layers[0]
    Qa = torch.linalg.svd(a.delta("x"), full_matrices=False)[0][:, :3]
    Qb = torch.linalg.svd(b.delta("x"), full_matrices=False)[0][:, :5]
    assert row.principal_cosines == pytest.approx(torch.linalg.svdvals(Qa.T @ Qb).tolist(), abs=1e-10)
    dense_cos = float((a.delta("x") * b.delta("x")).sum() / (a.delta("x").norm() * b.delta("x").norm()))
    assert row.cosine == pytest.approx(dense_cos, abs=1e-12)


def test_compare_verdicts_for_shared_subspaces():
    g = torch.Generator().manual_seed(11)
    B = torch.linalg.qr(torch.randn(50, 6, generator=g))[0]
    A = torch.linalg.qr(torch.randn(40, 6, generator=g))[0].T
    base = Adapter({"x": LoraLayer(A, B, 6.0)})
    cycle = torch.roll(torch.eye(6), 1, dims=0)  # trace 0: <B A, B P A> = tr(P) = 0
    other = Adapter({"x": LoraLayer(A, B @ cycle, 6.0)})  # same subspaces, a different map
    row = compare(base, other).layers[0]
    assert row.cosine == pytest.approx(0.0, abs=1e-6) and row.output_overlap == pytest.approx(1.0) and row.input_overlap == pytest.approx(1.0)
    assert row.verdict == "interfering"
    near = Adapter({"x": LoraLayer(A, B + 0.05 * torch.randn(50, 6, generator=g), 6.0)})
    assert compare(base, near).summary.verdict == "aligned"
    assert compare(base, -1 * near).summary.verdict == "conflicting"


def test_compare_reports_layers_on_one_side_and_shape_mismatch():
    g = torch.Generator().manual_seed(12)
    a = Adapter({"x": random_layer(g, 10, 8, 2), "y": random_layer(g, 10, 8, 2)})
    b = Adapter({"x": random_layer(g, 10, 8, 2), "z": random_layer(g, 10, 8, 2)})
    s = compare(a, b).summary
    assert (s.shared, s.only_a, s.only_b) == (1, ("y",), ("z",))
    assert "1 only in the first, 1 only in the second" in s.line
    with pytest.raises(ShapeMismatchError, match="layer x"):
        compare(a, Adapter({"x": random_layer(g, 11, 8, 2)}))


# --------------------------------------------------------------------------- records and errors


def test_reports_round_trip_through_json():
    W, layer, _ = planted(64, 64)
    adapter = Adapter({"x": layer, "y": layer})
    report = diagnose(adapter, {"x.weight": W.float(), "y.weight": W.float()}, cache=False)
    assert DiagnosisReport.from_json(report.to_json()) == report
    assert DiagnosisReport.from_dict(report.to_dict()) == report
    plain = diagnose(adapter)
    assert DiagnosisReport.from_json(plain.to_json()) == plain and plain.summary.intruders is None
    result = compare(adapter, -adapter)
    assert Comparison.from_json(result.to_json()) == result


def test_to_pandas_needs_pandas():
    report = diagnose(Adapter({"x": random_layer(torch.Generator().manual_seed(0), 5, 5, 2)}))
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(AdapterOpsError, match="pip install pandas"):
            report.to_pandas()
    else:
        frame = report.to_pandas()
        assert list(frame["name"]) == ["x"]


def test_worst_first_orders_by_intruders_then_norm():
    W, layer, _ = planted(64, 64)
    quiet = LoraLayer(layer.A[3:], layer.B[:, 3:], 2.0)  # only the aligned directions
    report = diagnose(Adapter({"calm": quiet, "loud": layer}), {"calm.weight": W.float(), "loud.weight": W.float()}, cache=False)
    assert [r.name for r in report.worst_first()] == ["loud", "calm"]
    assert [r.name for r in diagnose(Adapter({"calm": quiet, "loud": layer})).worst_first()] == ["loud", "calm"]


def test_depth_and_module_from_names():
    report = diagnose(Adapter({"model.layers.12.mlp.up_proj": random_layer(torch.Generator().manual_seed(0), 5, 5, 2)}))
    assert report.layers[0].depth == 12 and report.layers[0].module == "up_proj"


def test_errors_are_clear():
    g = torch.Generator().manual_seed(13)
    adapter = Adapter({"x": random_layer(g, 10, 8, 2)})
    with pytest.raises(AdapterOpsError, match="top_k"):
        diagnose(adapter, top_k=0)
    with pytest.raises(AdapterOpsError, match="epsilon"):
        diagnose(adapter, epsilon=1.5)
    with pytest.raises(BaseMismatchError, match="shape mismatch"):
        diagnose(adapter, {"x.weight": torch.zeros(9, 8)}, cache=False)
    with pytest.raises(BaseMismatchError, match="no weight in the base"):
        diagnose(adapter, {"other.weight": torch.zeros(10, 8)}, cache=False)
    with pytest.raises(NonFiniteError, match="base weight x.weight"):
        diagnose(adapter, {"x.weight": torch.full((10, 8), float("inf"))}, cache=False)
    with pytest.raises(AdapterOpsError, match="scale"):
        reduce_intruders(adapter, {"x.weight": torch.zeros(10, 8)}, scale=1.5)
    bad = Adapter({"x": LoraLayer(torch.full((2, 8), float("nan")), torch.ones(10, 2), 2.0)})
    with pytest.raises(NonFiniteError):
        diagnose(bad)
    dora = Adapter({"x": LoraLayer(torch.ones(2, 8), torch.ones(10, 2), 2.0, torch.ones(10))})
    with pytest.raises(UnsupportedOperationError, match="DoRA"):
        diagnose(dora)
    with pytest.raises(AdapterOpsError, match="no such file"):
        diagnose("does/not/exist.st")


def test_nf4_base_is_diagnosed_in_its_dequantized_form(tmp_path):
    from adapterops.quant.nf4 import dequantize_nf4, quantize_nf4, to_state_dict

    W, layer, count = planted(96, 64)
    q = quantize_nf4(W.to(torch.bfloat16), blocksize=64, double_quant=True)
    base = write_base(tmp_path / "nf4", to_state_dict(q, "model.layers.0.mlp.up_proj.weight"))
    assert Checkpoint(base).is_nf4()
    adapter = Adapter({"model.layers.0.mlp.up_proj": layer})
    quantized = diagnose(adapter, base, cache=tmp_path / "svd")
    dense = diagnose(adapter, {"model.layers.0.mlp.up_proj.weight": dequantize_nf4(q).float()}, cache=False)
    assert quantized.layers[0].intruders == dense.layers[0].intruders == count  # NF4 noise does not hide planted ones
    assert quantized.layers[0].similarities == pytest.approx(dense.layers[0].similarities, abs=1e-6)
    assert quantized.layers[0].base_norm == pytest.approx(dense.layers[0].base_norm, rel=1e-6)
    assert diagnose(adapter, base, cache=tmp_path / "svd").summary.base_svds_cached == 1


# ------------------------------------------------------------------ the GPU's batched small linear algebra


def test_cholesky_qr_is_orthonormal_and_falls_back_on_rank_deficient_blocks():
    g = torch.Generator().manual_seed(0)
    good = torch.randn(3, 200, 12, generator=g, dtype=torch.float64)
    deficient = good.clone()
    deficient[1, :, 5] = deficient[1, :, 4]  # exactly dependent columns: Cholesky fails on this one
    deficient[2, :, 7] *= 1e-9  # badly scaled: the second Cholesky pass restores orthogonality
    for Y in (good, deficient):
        Q = _intruders._orthonormal(Y, cholesky=True)
        torch.testing.assert_close(Q.mT @ Q, torch.eye(12, dtype=torch.float64).expand(3, 12, 12), rtol=0, atol=1e-12)
        reference = torch.linalg.qr(Y)[0]
        for i in (0, 2):  # full-rank blocks span what Householder's Q spans
            torch.testing.assert_close(Q[i] @ (Q[i].mT @ reference[i]), reference[i], rtol=0, atol=1e-10)


def test_the_cache_limit_is_read_from_the_environment(monkeypatch):
    from adapterops._svd_cache import CACHE_MAX_ENV, DEFAULT_MAX_BYTES, NO_LIMIT, default_max_bytes
    from adapterops.errors import FormatError

    for text, expected in (("", DEFAULT_MAX_BYTES), ("2", 2_000_000_000), (" 0.5 ", 500_000_000), ("0", 0), ("inf", NO_LIMIT), ("1e400", NO_LIMIT)):
        monkeypatch.setenv(CACHE_MAX_ENV, text)
        assert default_max_bytes() == expected, text
    for text in ("abc", "-1", "nan"):
        monkeypatch.setenv(CACHE_MAX_ENV, text)
        with pytest.raises(FormatError, match=f"^{CACHE_MAX_ENV}="):
            default_max_bytes()
