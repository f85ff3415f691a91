"""adapterops.linalg against dense float64 references."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from adapterops import linalg
from adapterops.errors import AdapterOpsError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def factors(seed: int, out: int, inn: int, r: int, batch: tuple[int, ...] = (), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(*batch, out, r, generator=g, dtype=dtype)
    A = torch.randn(*batch, r, inn, generator=g, dtype=dtype)
    return B, A


dims = st.integers(1, 12)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), out=dims, inn=dims, r=st.integers(1, 8), batch=st.integers(1, 3))
def test_factored_svd_matches_dense(seed, out, inn, r, batch):
    B, A = factors(seed, out, inn, r, (batch,))
    dense = B @ A  # (batch, out, in)
    U, S, Vh = linalg.factored_svd(B, A)
    k = min(out, inn, r)
    assert U.shape == (batch, out, k) and S.shape == (batch, k) and Vh.shape == (batch, k, inn)
    torch.testing.assert_close(S, torch.linalg.svdvals(dense)[:, :k], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close((U * S[:, None, :]) @ Vh, dense, atol=1e-10, rtol=1e-10)
    eye = torch.eye(k, dtype=torch.float64).expand(batch, k, k)
    torch.testing.assert_close(U.mT @ U, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(Vh @ Vh.mT, eye, atol=1e-10, rtol=0)
    assert bool((S[:, :-1] >= S[:, 1:]).all())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), out=dims, inn=dims, r1=st.integers(1, 6), r2=st.integers(1, 6))
def test_factored_inner_matches_dense(seed, out, inn, r1, r2):
    B1, A1 = factors(seed, out, inn, r1)
    B2, A2 = factors(seed + 1, out, inn, r2)
    expected = ((B1 @ A1) * (B2 @ A2)).sum()
    torch.testing.assert_close(linalg.factored_inner(B1, A1, B2, A2), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_cancellation_has_numerical_rank_zero(dtype, device):
    # B A - B A is exactly zero; its factored singular values are pure round-off.
    B, A = factors(0, 300, 200, 8, dtype=dtype)
    B, A = B.to(device), A.to(device)
    Bc, Ac = torch.cat([B, -B], dim=1), torch.cat([A, A], dim=0)  # (out, 16), (16, in)
    _, S, _ = linalg.factored_svd(Bc, Ac)
    assert float(S.max()) > 0  # round-off is there ...
    assert linalg.numerical_rank(S, (300, 200), floor=float(linalg.noise_floor(Bc, Ac))) == 0  # ... and recognised
    # a genuine rank-8 product keeps all 8
    _, S, _ = linalg.factored_svd(B, A)
    assert linalg.numerical_rank(S, (300, 200), floor=float(linalg.noise_floor(B, A))) == 8


def test_numerical_rank_of_exactly_low_rank_core():
    B, A = factors(3, 10, 9, 6)
    B = torch.cat([B[:, :2], B[:, :2] @ torch.randn(2, 4, dtype=torch.float64)], dim=1)  # rank 2 of 6 columns
    _, S, _ = linalg.factored_svd(B, A)
    assert linalg.numerical_rank(S, (10, 9)) == 2
    assert linalg.numerical_rank(torch.zeros(0, dtype=torch.float64), (3, 3)) == 0


def _energy_reference(S: list[float], fraction: float) -> int:
    total = sum(s * s for s in S)
    kept = 0.0
    for k, s in enumerate(S, start=1):
        kept += s * s
        if kept >= fraction * total * (1 - 1e-12):
            return k
    return len(S)


def _budget_reference(spectra: dict[str, list[float]], costs: dict[str, int], budget: float) -> dict[str, int]:
    """The lowest global threshold t whose kept set {s >= t} fits the budget."""
    best = {n: 0 for n in spectra}
    for t in sorted({s for S in spectra.values() for s in S}, reverse=True):
        counts = {n: sum(1 for s in S if s >= t) for n, S in spectra.items()}
        if sum(counts[n] * costs[n] for n in spectra) > budget:
            break
        best = counts
    return best


spectrum = st.lists(st.floats(0.01, 100.0), min_size=1, max_size=6, unique=True).map(lambda v: sorted(v, reverse=True))


@settings(max_examples=100, deadline=None)
@given(
    spectra=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), spectrum, min_size=1),
    fraction=st.floats(0.01, 1.0),
    budget=st.integers(0, 400),
    rank=st.integers(0, 8),
)
def test_select_ranks_rules_match_references(spectra, fraction, budget, rank):
    values = [s for S in spectra.values() for s in S]
    assume(len(set(values)) == len(values))  # a threshold between tied values of two layers is ambiguous
    shapes = {n: (7 + i, 5 + 2 * i) for i, n in enumerate(spectra)}
    costs = {n: sum(shapes[n]) for n in spectra}
    tensors = {n: torch.tensor(S, dtype=torch.float64) for n, S in spectra.items()}

    by_rank = linalg.select_ranks(tensors, shapes, rule="rank", value=rank)
    assert by_rank == {n: min(rank, len(S)) for n, S in spectra.items()}

    by_energy = linalg.select_ranks(tensors, shapes, rule="energy", value=fraction)
    assert by_energy == {n: _energy_reference(S, fraction) for n, S in spectra.items()}

    by_budget = linalg.select_ranks(tensors, shapes, rule="budget", value=budget)
    assert sum(by_budget[n] * costs[n] for n in spectra) <= budget
    assert by_budget == _budget_reference(spectra, costs, budget)


def test_select_ranks_ignores_values_below_the_floor():
    S = torch.tensor([5.0, 1e-3, 1e-9], dtype=torch.float64)
    assert linalg.select_ranks({"x": S}, {"x": (4, 4)}, rule="rank", value=3) == {"x": 3}
    assert linalg.select_ranks({"x": S}, {"x": (4, 4)}, rule="rank", value=3, floors={"x": 1e-6}) == {"x": 2}
    assert linalg.select_ranks({"x": S}, {"x": (4, 4)}, rule="rank", value=3, floors={"x": 10.0}) == {"x": 0}


@pytest.mark.parametrize(
    ("rule", "value", "words"),
    [
        ("rank", -1, "rank must be"),
        ("rank", 1.5, "rank must be"),
        ("energy", 0.0, "energy must be in (0, 1]"),
        ("energy", 1.5, "energy must be in (0, 1]"),
        ("budget", -3, "budget must be"),
        ("tolerance", 0.1, "unknown rank rule 'tolerance'"),
    ],
)
def test_select_ranks_rejects_bad_values(rule, value, words):
    with pytest.raises(AdapterOpsError) as info:
        linalg.select_ranks({"x": torch.ones(2)}, {"x": (2, 2)}, rule=rule, value=value)
    assert words in str(info.value)


def test_compute_dtype_never_half():
    half = torch.zeros(1, dtype=torch.bfloat16)
    assert linalg.compute_dtype(half, half.half()) == torch.float32
    assert linalg.compute_dtype(half, torch.zeros(1, dtype=torch.float64)) == torch.float64
