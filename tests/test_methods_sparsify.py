"""The elementwise merge blocks against a float64 loop transcription and against PEFT and mergekit."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterops.errors import AdapterOpsError
from adapterops.methods import sparsify as sp
from methods_helpers import ref_breadcrumbs, ref_ties

SETTINGS = settings(max_examples=25, deadline=None)


tasks = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**31 - 1))
densities = st.floats(0.05, 1.0)


def draw(n, rows, cols, seed):
    g = np.random.default_rng(seed)
    return g.standard_normal((n, rows, cols)), g.uniform(-1, 2, n)


@SETTINGS
@given(tasks, densities, st.sampled_from(["total", "frequency"]), st.booleans())
def test_ties_matches_float64_reference(shape, density, vote, peft):
    x, w = draw(*shape)
    got = sp.ties_merge(torch.from_numpy(x), torch.from_numpy(w), density=density, majority_sign=vote,
                        convention="peft" if peft else "mergekit")
    np.testing.assert_allclose(got.numpy(), ref_ties(x, w, density, vote, peft), rtol=1e-12, atol=1e-12)


@SETTINGS
@given(tasks, st.floats(0.05, 0.95), st.floats(0.0, 0.5))
def test_breadcrumbs_matches_float64_reference(shape, density, gamma):
    x, w = draw(*shape)
    got = sp.breadcrumbs_merge(torch.from_numpy(x), torch.from_numpy(w), density=density, gamma=gamma)
    want = sum(wi * ref_breadcrumbs(t, density, gamma) for wi, t in zip(w, x))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(tasks, st.floats(0.1, 0.9))
def test_dare_matches_float64_reference(shape, density):
    x, w = draw(*shape)
    gens = [torch.Generator().manual_seed(7 + i) for i in range(len(x))]
    masks = [torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(7 + i)).numpy() < density for i in range(len(x))]
    got = sp.dare_merge(torch.from_numpy(x), torch.from_numpy(w), density=density, generator=gens, convention="peft")
    want = sum(wi * t * m / density for wi, t, m in zip(w, x, masks))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    # mergekit's rescale keeps each task's L1 norm instead
    gens = [torch.Generator().manual_seed(7 + i) for i in range(len(x))]
    got = sp.dare_merge(torch.from_numpy(x), torch.from_numpy(w), density=density, generator=gens)
    want = 0.0
    for wi, t, m in zip(w, x, masks):
        kept = np.abs(t * m).sum()
        want = want + wi * t * m * (np.abs(t).sum() / kept if kept >= 1e-7 else 1.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_della_probabilities_follow_magnitude_rank_within_rows():
    x = torch.tensor([[0.1, -3.0, 2.0, 0.5], [4.0, 0.0, -1.0, 2.0]], dtype=torch.float64)
    p = sp.della_keep_probability(x, 0.5, 0.3)
    # ranks by |x| per row: [0, 3, 2, 1] and [3, 0, 1, 2]; p = 0.2 + 0.6 * rank / 3
    want = 0.2 + 0.2 * torch.tensor([[0, 3, 2, 1], [3, 0, 1, 2]], dtype=torch.float64)
    torch.testing.assert_close(p, want)
    assert float(p.mean()) == pytest.approx(0.5)


def test_ties_on_stacked_items_equals_each_item_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)  # (tasks, layers, out, in)
    w = torch.tensor([0.5, 1.0, -0.25], dtype=torch.float64)
    batched = sp.ties_merge(x, w, density=0.3, item_dims=2)
    for layer in range(4):
        torch.testing.assert_close(batched[layer], sp.ties_merge(x[:, layer], w, density=0.3))


def test_random_masks_do_not_depend_on_batching():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    w = torch.tensor([1.0, 0.5], dtype=torch.float64)
    seeds = [[11, 12, 13], [21, 22, 23]]  # (task, layer)
    gens = lambda: [torch.Generator().manual_seed(s) for row in seeds for s in row]  # noqa: E731
    batched = sp.dare_merge(x, w, density=0.4, generator=gens(), ties=True, item_dims=2)
    for layer in range(3):
        alone = [torch.Generator().manual_seed(seeds[t][layer]) for t in range(2)]
        torch.testing.assert_close(batched[layer], sp.dare_merge(x[:, layer], w, density=0.4, generator=alone, ties=True))


def test_ties_are_broken_deterministically_and_zero_votes_positive():
    x = torch.tensor([[[1.0, -1.0, 2.0, 2.0]], [[-1.0, 1.0, -2.0, 2.0]]])
    mask = sp.magnitude_mask(x, 0.5)
    assert mask.tolist() == [[[False, False, True, True]], [[False, False, True, True]]]  # equal magnitudes kept together
    assert sp.elect_sign(x, "total").tolist() == [[1.0, 1.0, 1.0, 1.0]]
    out = sp.ties_merge(x, torch.ones(2), density=1.0)
    assert out.tolist() == [[1.0, 1.0, 2.0, 2.0]]


def test_disjoint_mean_counts_or_weighs_the_agreeing_tasks():
    x = torch.tensor([[2.0, -1.0], [4.0, 0.0], [-3.0, -5.0]])
    sign = sp.elect_sign(x)
    assert sp.disjoint_mean(x, sign).tolist() == [3.0, -3.0]
    assert sp.disjoint_mean(x, sign, weights=torch.tensor([1.0, 3.0, 1.0])).tolist() == [1.5, -3.0]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, w: sp.ties_merge(x, w, density=0.0), "density must be in (0, 1]"),
        (lambda x, w: sp.ties_merge(x, w, density=0.5, majority_sign="mass"), "majority_sign must be one of"),
        (lambda x, w: sp.ties_merge(x, w, density=0.5, convention="lit"), "convention must be one of"),
        (lambda x, w: sp.della_merge(x, w, density=0.5, epsilon=0.6, generator=torch.Generator()), "lower epsilon"),
        (lambda x, w: sp.breadcrumbs_merge(x, w, density=0.5, gamma=1.5), "gamma must be in [0, 1)"),
        (lambda x, w: sp.ties_merge(x, w[:1], density=0.5), "1 weights for 2 stacked tasks"),
        (lambda x, w: sp.dare_merge(x, w, density=0.5, generator=[torch.Generator()]), "1 generators for 2 items"),
    ],
)
def test_bad_options_raise_one_clear_error(call, message):
    x, w = torch.randn(2, 3, 3), torch.ones(2)
    with pytest.raises(AdapterOpsError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        call(x, w)


# --- oracle parity: PEFT's merge_utils and mergekit's generalized task arithmetic ---------------

def bernoulli_from(generators):
    """A torch.bernoulli stand-in drawing from our generators in call order (one call per task)."""
    it = iter(generators)
    return lambda p, *a, **k: (torch.rand(p.shape, generator=next(it)) < p).to(p.dtype)


def seeded(n, base=100):
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


@pytest.fixture
def stacked():
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 8, 9, generator=g), torch.tensor([0.6, 0.5, -0.3])


def test_peft_merge_utils_parity(stacked, monkeypatch):
    mu = pytest.importorskip("peft.utils.merge_utils")
    x, w = stacked
    for vote in ("total", "frequency"):
        torch.testing.assert_close(sp.ties_merge(x, w, density=0.4, majority_sign=vote, convention="peft"), mu.ties(list(x), w, 0.4, vote))
    torch.testing.assert_close(sp.magnitude_prune_merge(x, w, density=0.4), mu.magnitude_prune(list(x), w, 0.4))
    monkeypatch.setattr(torch, "bernoulli", bernoulli_from(seeded(3)))
    peft_dare = mu.dare_ties(list(x), w, 0.5, "total")
    monkeypatch.setattr(torch, "bernoulli", bernoulli_from(seeded(3)))
    peft_linear = mu.dare_linear(list(x), w, 0.5)
    torch.testing.assert_close(sp.dare_merge(x, w, density=0.5, generator=seeded(3), ties=True, convention="peft", normalize=True), peft_dare)
    torch.testing.assert_close(sp.dare_merge(x, w, density=0.5, generator=seeded(3), convention="peft"), peft_linear)


MERGEKIT_CASES = [
    ("ties", {"density": 0.4}, lambda x, w, g: sp.ties_merge(x, w, density=0.4)),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.1}, lambda x, w, g: sp.breadcrumbs_merge(x, w, density=0.6, gamma=0.1)),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.1}, lambda x, w, g: sp.breadcrumbs_merge(x, w, density=0.6, gamma=0.1, ties=True)),
    ("dare_linear", {"density": 0.5}, lambda x, w, g: sp.dare_merge(x, w, density=0.5, generator=g)),
    ("dare_ties", {"density": 0.5}, lambda x, w, g: sp.dare_merge(x, w, density=0.5, generator=g, ties=True)),
    ("della", {"density": 0.5, "epsilon": 0.2}, lambda x, w, g: sp.della_merge(x, w, density=0.5, epsilon=0.2, generator=g)),
    ("della_linear", {"density": 0.5, "epsilon": 0.2}, lambda x, w, g: sp.della_merge(x, w, density=0.5, epsilon=0.2, generator=g, ties=False)),
]


@pytest.mark.parametrize("method, params, ours", MERGEKIT_CASES, ids=[c[0] for c in MERGEKIT_CASES])
def test_mergekit_parity(stacked, monkeypatch, method, params, ours):
    api = pytest.importorskip("mergekit.merge_methods", reason="mergekit not installed (pip install --no-deps mergekit)")
    x, w = stacked
    monkeypatch.setattr(torch, "bernoulli", bernoulli_from(seeded(3)))
    base = torch.zeros_like(x[0])
    theirs = api.merge_tensors([base, *x], method, parameters={"weight": w.tolist(), **params}, base_index=0)
    monkeypatch.undo()
    torch.testing.assert_close(ours(x, w, seeded(3)), theirs, rtol=1e-5, atol=1e-6)
    assert not math.isclose(float(theirs.abs().sum()), 0.0)
