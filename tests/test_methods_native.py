"""LoRA-native merges (KnOTS, core space, TSV) against dense float64 transcriptions of the papers.

The references below build every task's dense delta and follow each paper's algorithm on it (as
the authors' code does): SVD of the concatenated deltas for KnOTS, SVD reference bases of the
stacked factors for core space, per-task SVDs and Procrustes orthogonalisation for TSV. The
library computes the same things from the factors alone; a torch function mode checks that no
(out, in) tensor ever appears.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from adapterops import Adapter, AdapterOpsError, LoraLayer
from adapterops.methods import get_method, sparsify
from adapterops.methods.dense import _generators

from train_helpers import one_thread  # noqa: F401 (one_thread: an autouse fixture)

OUT, IN = 23, 19  # distinct sizes, larger than any total rank below


def make(rank: int, seed: int, names=("q", "v"), dtype=torch.float64, out=OUT, inp=IN) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter({
        n: LoraLayer(torch.randn(rank, inp, generator=g, dtype=dtype), torch.randn(out, rank, generator=g, dtype=dtype), 1.5 * rank)
        for n in names
    })


def run(method, adapters, weights, rule=None, seed=0, **options):
    if method.endswith(("ties", "dare")):
        options.setdefault("density", 1.0)
    return get_method(method)(adapters, weights, rule=rule or {"rank": 10_000}, seed=seed, device=None, **options)


# --------------------------------------------------------------------------------------------
# Dense float64 references


def paper_ties(x: torch.Tensor, density: float) -> torch.Tensor:
    """TIES on unit weights, as the KnOTS / core-space authors' code does it: trim, elect, disjoint mean."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    m = flat.shape[1]
    k = max(1, int(density * m))
    kth = flat.abs().topk(k, dim=1).values[:, -1:]
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = 1
    agree = torch.sign(trimmed) == sign
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return merged.reshape(x.shape[1:])


def positive_peaks(U):
    """The documented sign convention: each basis column's largest-magnitude entry is positive."""
    peak = U[U.abs().argmax(dim=0), torch.arange(U.shape[1])]
    return torch.where(peak < 0, -1.0, 1.0).to(U.dtype)


def knots_reference(adapters, name, merge):
    deltas = [a.delta(name) for a in adapters]
    cat = torch.cat(deltas, dim=1)  # (out, n * in)
    U, S, Vh = torch.linalg.svd(cat, full_matrices=False)
    keep = S > S[0] * 1e-10
    U, S, Vh = U[:, keep], S[keep], Vh[keep]
    flip = positive_peaks(U)
    U, Vh = U * flip, Vh * flip[:, None]
    coords = torch.stack([S[:, None] * V for V in torch.split(Vh, deltas[0].shape[1], dim=1)])  # (n, k, in)
    return U @ merge(coords)


def core_reference(adapters, name, merge):
    Bs = [a[name].scale * a[name].B for a in adapters]
    As = [a[name].A for a in adapters]
    UB = torch.linalg.svd(torch.cat(Bs, dim=1), full_matrices=False)[0]  # (out, R)
    VhA = torch.linalg.svd(torch.cat(As, dim=0), full_matrices=False)[2]  # (R, in)
    UB, VhA = UB * positive_peaks(UB), VhA * positive_peaks(VhA.T)[:, None]
    cores = torch.stack([UB.T @ (B @ A) @ VhA.T for B, A in zip(Bs, As)])
    return UB @ merge(cores) @ VhA


def tsv_reference(adapters, name, weights):
    Us, Ss, Vs = [], [], []
    for a, w in zip(adapters, weights):
        U, S, Vh = torch.linalg.svd(a.delta(name), full_matrices=False)
        r = a[name].rank
        Us.append(U[:, :r]), Ss.append(w * S[:r]), Vs.append(Vh[:r])

    def polar(X):
        P, _, Qh = torch.linalg.svd(X, full_matrices=False)
        return P @ Qh

    return polar(torch.cat(Us, 1)) @ torch.diag(torch.cat(Ss)) @ polar(torch.cat(Vs, 0).T).T


ranks_st = st.lists(st.integers(1, 5), min_size=2, max_size=3)


# --------------------------------------------------------------------------------------------
# Exactness


@settings(max_examples=12, deadline=None)
@given(ranks=ranks_st, seed=st.integers(0, 1000), weights=st.lists(st.floats(-2, 2).filter(lambda w: abs(w) > 0.05), min_size=3, max_size=3))
def test_core_linear_is_the_exact_weighted_sum(ranks, seed, weights):
    adapters = [make(r, seed + i) for i, r in enumerate(ranks)]
    weights = weights[: len(adapters)]
    merged = run("core_linear", adapters, weights)
    for name in adapters[0]:
        exact = sum(w * a.delta(name) for a, w in zip(adapters, weights))
        torch.testing.assert_close(merged.delta(name), exact, rtol=1e-10, atol=1e-10)
    assert merged.metadata["blend"]["method"] == "core_linear"


@pytest.mark.parametrize("method, reference", [("knots_ties", knots_reference), ("core_ties", core_reference)])
@settings(max_examples=12, deadline=None)
@given(ranks=ranks_st, seed=st.integers(0, 1000), density=st.sampled_from([1.0, 0.6, 0.3]))
def test_ties_matches_the_dense_algorithm_on_mixed_ranks(method, reference, ranks, seed, density):
    adapters = [make(r, seed + i) for i, r in enumerate(ranks)]
    merged = run(method, adapters, [1.0] * len(adapters), density=density)
    for name in adapters[0]:
        ref = reference(adapters, name, lambda x: paper_ties(x, density))
        torch.testing.assert_close(merged.delta(name), ref, rtol=1e-8, atol=1e-8)


@settings(max_examples=8, deadline=None)
@given(ranks=ranks_st, seed=st.integers(0, 1000), sign=st.sampled_from(["total", "frequency"]))
def test_weights_and_sign_rule_enter_as_in_the_shared_ties(ranks, seed, sign):
    """With weights, the merge step is sparsify.ties_merge (mergekit's weighting) in both bases."""
    adapters = [make(r, seed + i) for i, r in enumerate(ranks)]
    weights = [0.7, -0.4, 1.3][: len(adapters)]
    w = torch.tensor(weights, dtype=torch.float64)

    def merge(x):
        return sparsify.ties_merge(x, w, density=0.5, majority_sign=sign)

    knots = run("knots_ties", adapters, weights, density=0.5, majority_sign=sign)
    core = run("core_ties", adapters, weights, density=0.5, majority_sign=sign)
    for name in adapters[0]:
        torch.testing.assert_close(knots.delta(name), knots_reference(adapters, name, merge), rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(core.delta(name), core_reference(adapters, name, merge), rtol=1e-8, atol=1e-8)


@settings(max_examples=12, deadline=None)
@given(ranks=ranks_st, seed=st.integers(0, 1000))
def test_tsv_matches_the_dense_transcription(ranks, seed):
    adapters = [make(r, seed + i) for i, r in enumerate(ranks)]
    weights = [1.0, 0.5, -0.8][: len(adapters)]
    merged = run("tsv", adapters, weights)
    for name in adapters[0]:
        torch.testing.assert_close(merged.delta(name), tsv_reference(adapters, name, weights), rtol=1e-8, atol=1e-8)


def test_tsv_of_orthogonal_tasks_is_their_sum():
    """Tasks in orthogonal subspaces are already decorrelated: TSV leaves them alone."""
    eye = torch.eye(OUT, IN, dtype=torch.float64)
    a = Adapter({"q": LoraLayer(eye[:2] * 3, torch.eye(OUT, 2, dtype=torch.float64), 2.0)})
    b = Adapter({"q": LoraLayer(eye[2:5] * 2, torch.eye(OUT, dtype=torch.float64)[:, 2:5], 3.0)})
    torch.testing.assert_close(run("tsv", [a, b], [1.0, 1.0]).delta("q"), a.delta("q") + b.delta("q"))


def test_dare_without_dropping_or_ties_is_the_exact_sum():
    adapters = [make(2, 1), make(4, 2), make(3, 3)]
    weights = [0.5, 1.0, -0.25]
    for method in ("knots_dare", "core_dare"):
        merged = run(method, adapters, weights, density=1.0, ties=False)
        for name in adapters[0]:
            exact = sum(w * a.delta(name) for a, w in zip(adapters, weights))
            torch.testing.assert_close(merged.delta(name), exact, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["knots_dare", "core_dare"])
def test_dare_is_seeded_and_matches_the_dense_algorithm(method):
    adapters = [make(2, 1, names=("q",)), make(4, 2, names=("q",))]
    w = torch.tensor([1.0, 0.5], dtype=torch.float64)
    one, again, other = (run(method, adapters, [1.0, 0.5], seed=s, density=0.4) for s in (3, 3, 4))
    torch.testing.assert_close(one.delta("q"), again.delta("q"), rtol=0, atol=0)
    assert not torch.allclose(one.delta("q"), other.delta("q"))
    # the same draws on the dense algorithm's coordinates: one generator per layer, seeded as documented
    def merge(x):
        gens = _generators(3, ["q"], 2, torch.device("cpu"), "mask")
        return sparsify.dare_merge(x, w, density=0.4, generator=gens, ties=True, item_dims=2)

    if method == "knots_dare":
        ref = knots_reference(adapters, "q", merge)
    else:
        ref = core_reference(adapters, "q", merge)
    torch.testing.assert_close(one.delta("q"), ref, rtol=1e-8, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Factored all the way, layers in some adapters only, re-compression, errors


class _Shapes(TorchFunctionMode):
    """Records the trailing two dims of every tensor any torch function or tensor method returns."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.ndim >= 2:
                self.seen.add(tuple(t.shape[-2:]))
        return out


@pytest.mark.parametrize("method", ["knots_ties", "knots_dare", "core_linear", "core_ties", "core_dare", "tsv"])
def test_no_dense_delta_is_ever_formed(method):
    adapters = [make(3, 1, dtype=torch.float32), make(5, 2, dtype=torch.float32)]
    with _Shapes() as shapes:
        merged = run(method, adapters, [1.0, 1.0], rule={"rank": 4})
    assert (OUT, IN) not in shapes.seen and (IN, OUT) not in shapes.seen
    assert merged.ranks == {"q": 4, "v": 4} and merged["q"].A.dtype == torch.float32


@pytest.mark.parametrize("method", ["knots_ties", "core_ties", "core_linear", "tsv"])
def test_a_layer_in_some_adapters_merges_from_those_that_have_it(method):
    a, b = make(2, 1, names=("q", "v")), make(3, 2, names=("q",))
    c = make(4, 3, names=("v", "o"))
    options = {"density": 0.5} if "ties" in method else {}
    merged = run(method, [a, b, c], [1.0, 0.5, 2.0], **options)
    torch.testing.assert_close(merged.delta("v"), run(method, [a, c], [1.0, 2.0], **options).delta("v"))
    torch.testing.assert_close(merged.delta("o"), run(method, [c], [2.0], **options).delta("o"))
    assert list(merged) == ["q", "v", "o"]
    if method in ("core_linear", "tsv"):  # one task alone: the weighted task itself
        torch.testing.assert_close(merged.delta("o"), 2.0 * c.delta("o"))


def test_rule_re_compresses_optimally_and_reports():
    adapters = [make(3, 1), make(4, 2)]
    exact = run("core_linear", adapters, [1.0, 1.0])
    kept = run("core_linear", adapters, [1.0, 1.0], rule={"rank": 2})
    assert kept.ranks == {"q": 2, "v": 2}
    for name in adapters[0]:
        S = torch.linalg.svdvals(exact.delta(name))
        optimal = float(S[2:].square().sum().sqrt())
        assert math.isclose(float((exact.delta(name) - kept.delta(name)).norm()), optimal, rel_tol=1e-9)
        report = kept.metadata["blend"]["layers"][name]
        assert report["rank"] == 2
        assert math.isclose(report["energy_kept"], float(S[:2].square().sum() / S.square().sum()), rel_tol=1e-9)
    energy = run("knots_ties", adapters, [1.0, 1.0], rule={"energy": 0.9})
    assert all(0.9 <= v["energy_kept"] <= 1 for v in energy.metadata["blend"]["layers"].values())


def test_options_are_checked():
    adapters = [make(2, 1), make(2, 2)]
    with pytest.raises(AdapterOpsError, match="knots_ties does not take gamma; its options: density, majority_sign"):
        run("knots_ties", adapters, [1, 1], gamma=0.1)
    with pytest.raises(AdapterOpsError, match="core_dare needs density"):
        get_method("core_dare")(adapters, [1, 1], rule={"rank": 2}, seed=0, device=None)
    with pytest.raises(AdapterOpsError, match="ties must be true or false"):
        run("knots_dare", adapters, [1, 1], ties="yes")
    with pytest.raises(AdapterOpsError, match="density must be in"):
        run("core_dare", adapters, [1, 1], density=0.0)
    with pytest.raises(AdapterOpsError, match="majority_sign must be one of total, frequency"):
        run("core_ties", adapters, [1, 1], majority_sign="most")
    with pytest.raises(AdapterOpsError, match="core_linear does not take density"):
        run("core_linear", adapters, [1, 1], density=0.5)
    with pytest.raises(AdapterOpsError, match="delta shapes differ"):
        run("tsv", [adapters[0], make(2, 3, out=OUT + 1)], [1, 1])


# --------------------------------------------------------------------------------------------
# Every method's output loads in PEFT on SmolLM2 to the logits of base + merged delta

NEEDS_DENSITY = {"linear", "core_linear", "tsv"}


@pytest.mark.slow
def test_every_method_loads_in_peft_on_smollm2(smollm2_dir, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from adapterops import blend
    from adapterops.methods import METHODS

    base = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    modules = {f"model.layers.{i}.{m}": base.get_submodule(f"model.layers.{i}.{m}").weight.shape
               for m in ("self_attn.q_proj", "self_attn.v_proj") for i in (3,)}
    g = torch.Generator().manual_seed(0)

    def adapter(rank):
        return Adapter({n: LoraLayer(torch.randn(rank, s[1], generator=g) / s[1] ** 0.5,
                                     torch.randn(s[0], rank, generator=g) * 0.05, 2.0 * rank) for n, s in modules.items()},
                       {"base_model": str(smollm2_dir)})

    inputs = [adapter(4), adapter(6)]
    tokens = torch.randint(0, base.config.vocab_size, (1, 6), generator=g)
    with torch.no_grad():
        plain = base(input_ids=tokens).logits
    for method in sorted(METHODS):
        options = {} if method in NEEDS_DENSITY else {"density": 0.5}
        merged = blend(inputs, [0.7, 0.5], method=method, energy=0.95 if method == "knots_ties" else None, **options)
        merged.save(tmp_path / method, format="peft")
        with merged.applied(base), torch.no_grad():
            expected = base(input_ids=tokens).logits
        model = peft.PeftModel.from_pretrained(base, tmp_path / method).eval()
        with torch.no_grad():
            got = model(input_ids=tokens).logits
        base = model.unload()
        assert (expected - plain).abs().max() > 0.05, method  # the merge changes the model
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=2e-3, msg=lambda m: f"{method}: {m}")
