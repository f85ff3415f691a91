"""Dense-delta merge methods through ``blend``: float64 references, PEFT, mergekit, re-compression bound."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adapterops as ao
from adapterops import Adapter, LoraLayer, linalg
from adapterops.errors import AdapterOpsError, UnsupportedOperationError
from adapterops.methods import dense
from methods_helpers import (
    ref_breadcrumbs,
    ref_combine,
    ref_della_keep,
    ref_l1_rescaled,
    ref_topk,
    ref_truncation_error,
)

SHAPES = {"layers.0.q_proj": (24, 20), "layers.0.v_proj": (24, 20), "layers.1.up_proj": (30, 20)}
WEIGHTS = [0.7, 0.5, -0.2]


def make_adapter(seed, rank, dtype=torch.float64, names=tuple(SHAPES), shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name in names:
        out, inp = shapes[name]
        A = torch.randn(rank, inp, generator=g, dtype=dtype)
        B = torch.randn(out, rank, generator=g, dtype=dtype)
        layers[name] = LoraLayer(A, B, 2.0 * rank)
    return Adapter(layers)


@pytest.fixture(scope="module")
def adapters():
    """Mixed ranks; the third adapter has no ``layers.1.up_proj``."""
    return [make_adapter(1, 3), make_adapter(2, 5), make_adapter(3, 3, names=("layers.0.q_proj", "layers.0.v_proj"))]


def uniform(seed, name, task, shape):
    """The draws ``dense`` documents for a (layer, task): a CPU generator seeded from (seed, name)."""
    g = torch.Generator().manual_seed(dense._seed(seed, "mask", name, task))
    return torch.rand(shape, generator=g).double().numpy()


def reference(method, adapters, weights, name, seed=0, density=0.5, peft=False, **o):
    """The merged dense delta of one layer, from the float64 helpers (absent layer: zero delta)."""
    shape = SHAPES[name]
    x = np.stack([a.delta(name).numpy() if name in a else np.zeros(shape) for a in adapters])
    w = np.asarray(weights, dtype=np.float64)
    vote = o.get("majority_sign", "total")
    if method == "ties":
        sparse = np.stack([t * ref_topk(t, density) for t in x])
        return ref_combine(sparse, w, consensus=True, vote=vote, peft=peft, normalize=o.get("normalize", True))
    if method == "magnitude_prune":
        return ref_combine(np.stack([t * ref_topk(t, density) for t in x]), w, consensus=False, normalize=False)
    if method in ("dare_linear", "dare_ties"):
        keep = [uniform(seed, name, i, shape) < density for i in range(len(x))]
        sparse = np.stack([t * k / density if peft else ref_l1_rescaled(t, k) for t, k in zip(x, keep)])
        return ref_combine(sparse, w, consensus=method == "dare_ties", vote=vote, peft=peft, normalize=o.get("normalize", False))
    if method in ("della", "della_linear"):
        eps = o.get("epsilon", 0.15)
        sparse = np.stack([ref_l1_rescaled(t, ref_della_keep(t, density, eps, uniform(seed, name, i, shape))) for i, t in enumerate(x)])
        return ref_combine(sparse, w, consensus=method == "della", normalize=o.get("normalize", method == "della"))
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        sparse = np.stack([ref_breadcrumbs(t, density, o.get("gamma", 0.01)) for t in x])
        return ref_combine(sparse, w, consensus=method == "breadcrumbs_ties", normalize=False)
    raise AssertionError(method)


CASES = [
    ("ties", {}),
    ("ties", {"majority_sign": "frequency", "convention": "peft"}),
    ("ties", {"normalize": False}),
    ("magnitude_prune", {}),
    ("dare_linear", {}),
    ("dare_linear", {"convention": "peft"}),
    ("dare_ties", {}),
    ("dare_ties", {"convention": "peft", "normalize": True}),
    ("della", {"epsilon": 0.2}),
    ("della_linear", {}),
    ("breadcrumbs", {"gamma": 0.1}),
    ("breadcrumbs_ties", {"gamma": 0.1}),
]


@pytest.mark.parametrize("method, options", CASES, ids=[f"{m}-{'-'.join(map(str, o.values())) or 'default'}" for m, o in CASES])
def test_each_method_equals_the_float64_reference(adapters, method, options):
    # full rank and the exact SVD: the result is the merged delta itself
    result = ao.blend(adapters, WEIGHTS, method=method, density=0.5, rank=20, seed=3, svd="exact", **options)
    peft = options.get("convention") == "peft"
    rest = {k: v for k, v in options.items() if k != "convention"}
    for name in SHAPES:
        want = reference(method, adapters, WEIGHTS, name, seed=3, peft=peft, **rest)
        np.testing.assert_allclose(result.delta(name).numpy(), want, rtol=1e-9, atol=1e-9)
        assert result.metadata["blend"]["layers"][name]["energy_kept"] == pytest.approx(1.0)
    assert result.metadata["blend"]["method"] == method


def test_missing_layer_is_merged_from_the_adapters_that_have_it(adapters):
    full = ao.blend(adapters, WEIGHTS, "ties", 0.4, rank=20, svd="exact")
    pair = ao.blend(adapters[:2], WEIGHTS[:2], "ties", 0.4, rank=20, svd="exact")
    torch.testing.assert_close(full.delta("layers.1.up_proj"), pair.delta("layers.1.up_proj"))


def test_default_rule_is_the_largest_input_rank_and_metadata_reports_each_layer(adapters):
    result = ao.blend(adapters, WEIGHTS, method="ties", density=0.5)
    assert result.ranks == dict.fromkeys(SHAPES, 5)
    report = result.metadata["blend"]
    assert report["options"]["density"] == 0.5 and report["options"]["majority_sign"] == "total"
    for name, row in report["layers"].items():
        M = ao.blend(adapters, WEIGHTS, method="ties", density=0.5, rank=20, svd="exact").delta(name)
        share = 1 - float(((M - result.delta(name)) ** 2).sum() / (M**2).sum())
        assert row == {"rank": 5, "energy_kept": pytest.approx(share, rel=1e-9)}


def test_linear_is_the_exact_sum_and_recompresses_only_when_asked(adapters):
    exact = ao.blend(adapters, WEIGHTS)
    assert exact.ranks == {"layers.0.q_proj": 11, "layers.0.v_proj": 11, "layers.1.up_proj": 8}
    assert "blend" not in exact.metadata
    for name in SHAPES:
        want = sum(w * a.delta(name) for a, w in zip(adapters, WEIGHTS) if name in a)
        torch.testing.assert_close(exact.delta(name), want)
    cut = ao.blend(adapters, WEIGHTS, rank=4)
    for name in SHAPES:
        torch.testing.assert_close(cut.delta(name), exact.compress(rank=4).delta(name))
        assert cut.metadata["blend"]["layers"][name]["rank"] == 4


def test_energy_and_budget_rules(adapters):
    by_energy = ao.blend(adapters, WEIGHTS, "dare_ties", 0.5, energy=0.9)
    for name, row in by_energy.metadata["blend"]["layers"].items():
        assert row["energy_kept"] >= 0.9 and row["rank"] == by_energy[name].rank
    budget = 1500
    by_budget = ao.blend(adapters, WEIGHTS, "dare_ties", 0.5, budget=budget)
    assert by_budget.num_params <= budget
    full = ao.blend(adapters, WEIGHTS, "dare_ties", 0.5, rank=20, svd="exact")
    spectra = {n: torch.linalg.svdvals(full.delta(n)) for n in SHAPES}
    assert by_budget.ranks == linalg.select_ranks(spectra, SHAPES, rule="budget", value=budget)


def test_random_methods_are_reproducible_by_seed_and_independent_of_other_layers(adapters):
    one = ao.blend(adapters, WEIGHTS, "dare_ties", 0.5, seed=7)
    again = ao.blend(adapters, WEIGHTS, "dare_ties", 0.5, seed=7)
    other = ao.blend(adapters, WEIGHTS, "dare_ties", 0.5, seed=8)
    for name in SHAPES:
        assert torch.equal(one[name].A, again[name].A) and torch.equal(one[name].B, again[name].B)
        assert not torch.allclose(one.delta(name), other.delta(name))
    name = "layers.0.v_proj"
    alone = ao.blend([Adapter({name: a[name]}) for a in adapters], WEIGHTS, "dare_ties", 0.5, seed=7)
    torch.testing.assert_close(alone.delta(name), one.delta(name))


def test_ties_is_deterministic_with_tied_magnitudes():
    A = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0], [2.0], [-2.0]], dtype=torch.float64)  # delta entries tie in magnitude
    a = Adapter({"m": LoraLayer(A, B, 1.0)})
    b = Adapter({"m": LoraLayer(-A, B, 1.0)})
    runs = [ao.blend([a, b], [1.0, 0.5], "ties", 0.5, rank=3, svd="exact").delta("m") for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs)
    # |delta| ties: every entry equal to the k-th largest magnitude is kept; the vote goes to a (weight 1 > 0.5)
    torch.testing.assert_close(runs[0], a.delta("m") * (a.delta("m").abs() == 2))


# --- re-compression: the randomized route's bound against the exact truncation --------------------

BIG = {"x": (160, 128), "y": (96, 144)}


@settings(max_examples=4, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from(["linear", "ties", "dare_ties"]), st.sampled_from([4, 8, 12]))
def test_randomized_recompression_is_within_the_stated_bound(seed, method, k):
    adapters = [make_adapter(seed + i, 8, names=tuple(BIG), shapes=BIG) for i in range(3)]
    opts = {} if method == "linear" else {"density": 0.5, "svd": "randomized"}
    # the flat spectrum of a sum of three rank-8 deltas has no gap at k: the hard case
    exact = ao.blend(adapters, [1.0, 0.8, 0.6], method, rank=200, seed=seed, **({**opts, "svd": "exact"} if opts else {}))
    fast = ao.blend(adapters, [1.0, 0.8, 0.6], method, rank=k, seed=seed, **opts)
    for name in BIG:
        M = exact.delta(name).numpy()
        optimum = ref_truncation_error(M, k)
        err = float(np.linalg.norm(M - fast.delta(name).numpy()))
        assert optimum <= err * (1 + 1e-12)  # never better than Eckart-Young
        assert err <= (1 + 1e-3) * optimum, (err / optimum - 1)
        kept = fast.metadata["blend"]["layers"][name]["energy_kept"]
        assert kept == pytest.approx(1 - err**2 / float((M**2).sum()), abs=1e-9)


def test_exact_recompression_equals_eckart_young(adapters):
    full = ao.blend(adapters, WEIGHTS, "della", 0.5, rank=20, svd="exact")
    cut = ao.blend(adapters, WEIGHTS, "della", 0.5, rank=3, svd="exact")
    for name in SHAPES:
        M = full.delta(name).numpy()
        err = float(np.linalg.norm(M - cut.delta(name).numpy()))
        assert err == pytest.approx(ref_truncation_error(M, 3), rel=1e-9)


def test_float32_and_bfloat16_inputs_keep_their_dtype():
    a, b = make_adapter(1, 4, torch.bfloat16), make_adapter(2, 4, torch.float32)
    result = ao.blend([a, a], [0.5, 0.5], "ties", 0.5)
    assert {layer.A.dtype for layer in result.values()} == {torch.bfloat16}
    assert {layer.A.dtype for layer in ao.blend([a, b], None, "ties", 0.5).values()} == {torch.float32}


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "ties"}, "ties needs density"),
        ({"method": "ties", "density": 0.5, "gamma": 0.1}, "ties does not take gamma"),
        ({"method": "linear", "density": 0.5}, "linear does not take density"),
        ({"method": "ties", "density": 0.0}, r"density must be in \(0, 1\]"),
        ({"method": "ties", "density": 0.5, "majority_sign": "most"}, "majority_sign must be one of"),
        ({"method": "ties", "density": 0.5, "svd": "fast"}, "svd must be one of"),
        ({"method": "ties", "density": 0.5, "normalize": 1}, "ties: normalize must be true or false, got 1"),
        ({"method": "della", "density": 0.5, "epsilon": "0.1"}, "della: epsilon must be a number, got '0.1'"),
        ({"method": "della", "density": 0.5, "epsilon": 0.6}, "lower epsilon"),
        ({"method": "ties", "density": 0.5, "rank": 2, "energy": 0.5}, "at most one of rank=, energy=, budget="),
        ({"method": "ties", "density": 0.5, "rank": 1.5}, "rank must be a non-negative integer"),
        ({"method": "ties", "density": 0.5, "seed": 1.5}, "seed must be an integer"),
        ({"method": "merge_all"}, "unknown merge method 'merge_all'"),
        ({"weights": [1.0]}, "2 adapters but 1 weights"),
        ({"weights": [1.0, float("inf")]}, "weight 1 is inf"),
    ],
)
def test_bad_arguments_raise_one_clear_error(adapters, kwargs, message):
    kwargs = {"weights": [0.5, 0.5], **kwargs}
    with pytest.raises(AdapterOpsError, match=message):
        ao.blend(adapters[:2], **kwargs)


def test_dora_is_refused_with_the_reason(adapters):
    layer = adapters[0]["layers.0.q_proj"]
    dora = Adapter({"layers.0.q_proj": LoraLayer(layer.A, layer.B, layer.alpha, torch.ones(24, dtype=torch.float64))})
    with pytest.raises(UnsupportedOperationError, match="not linear in the factors"):
        ao.blend([dora, adapters[1]], [0.5, 0.5], method="ties", density=0.5)


# --- oracle parity: PEFT's add_weighted_adapter and mergekit ------------------------------------


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(20, 24, bias=False)
        self.v_proj = torch.nn.Linear(20, 24, bias=False)
        self.up_proj = torch.nn.Linear(20, 30, bias=False)


PEFT_SHAPES = {"q_proj": (24, 20), "v_proj": (24, 20), "up_proj": (30, 20)}


def peft_with(adapters):
    """A PEFT LoraModel on ``Tiny`` holding ``adapters`` as "t0", "t1", ... (equal ranks)."""
    peft = pytest.importorskip("peft")
    rank = adapters[0].rank
    config = lambda: peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(PEFT_SHAPES))  # noqa: E731
    model = peft.get_peft_model(Tiny(), config(), adapter_name="t0")
    for i in range(1, len(adapters)):
        model.add_adapter(f"t{i}", config())
    with torch.no_grad():
        for i, adapter in enumerate(adapters):
            for name, layer in adapter.items():
                module = model.base_model.model.get_submodule(name)
                module.lora_A[f"t{i}"].weight.copy_(layer.A)
                module.lora_B[f"t{i}"].weight.copy_(layer.B)
    return model


PEFT_CASES = [
    ("ties_svd", "ties", {"convention": "peft"}),
    ("ties_svd", "ties", {"convention": "peft", "majority_sign": "frequency"}),
    ("magnitude_prune_svd", "magnitude_prune", {}),
    ("dare_linear_svd", "dare_linear", {"convention": "peft"}),
    ("dare_ties_svd", "dare_ties", {"convention": "peft", "normalize": True}),
]


@pytest.mark.parametrize("combination, method, options", PEFT_CASES, ids=[f"{c[0]}-{len(c[2])}" for c in PEFT_CASES])
def test_peft_add_weighted_adapter_parity(monkeypatch, combination, method, options):
    ours = [make_adapter(10 + i, 4, torch.float32, names=tuple(PEFT_SHAPES), shapes=PEFT_SHAPES) for i in range(3)]
    weights = [0.7, 0.5, 0.4]
    model = peft_with(ours)
    # PEFT draws DARE's masks with torch.bernoulli, layer by layer, task by task: hand it ours
    order = iter([(name, i) for name in PEFT_SHAPES for i in range(3)])

    def bernoulli(p, *args, **kwargs):
        name, task = next(order)
        return torch.from_numpy(uniform(0, name, task, tuple(p.shape))).float().lt(p).to(p.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    vote = options.get("majority_sign", "total")
    model.add_weighted_adapter([f"t{i}" for i in range(3)], weights, "m", combination_type=combination, density=0.5,
                               majority_sign_method=vote)
    monkeypatch.undo()
    result = ao.blend(ours, weights, method, density=0.5, svd="exact", **options)
    for name in PEFT_SHAPES:
        theirs = model.base_model.model.get_submodule(name).get_delta_weight("m").detach()
        assert result[name].rank == 4
        torch.testing.assert_close(result.delta(name), theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


MERGEKIT_CASES = [
    ("ties", {}),
    ("dare_linear", {}),
    ("dare_ties", {}),
    ("della", {"epsilon": 0.2}),
    ("della_linear", {"epsilon": 0.2}),
    ("breadcrumbs", {"gamma": 0.1}),
    ("breadcrumbs_ties", {"gamma": 0.1}),
]


@pytest.mark.parametrize("method, options", MERGEKIT_CASES, ids=[c[0] for c in MERGEKIT_CASES])
def test_mergekit_parity(adapters, monkeypatch, method, options):
    api = pytest.importorskip("mergekit.merge_methods", reason="mergekit not installed (pip install --no-deps mergekit)")
    pairs = [a.to(dtype=torch.float32) for a in adapters[:2]] + [make_adapter(4, 3, torch.float32)]
    result = ao.blend(pairs, WEIGHTS, method, 0.5, rank=20, svd="exact", seed=5, **options)
    for name in SHAPES:
        tasks = iter(range(3))
        monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: torch.from_numpy(
            uniform(5, name, next(tasks), tuple(p.shape))).float().lt(p).to(p.dtype))
        deltas = [a.delta(name) for a in pairs]
        theirs = api.merge_tensors([torch.zeros_like(deltas[0]), *deltas], method,
                                   parameters={"weight": WEIGHTS, "density": 0.5, **options}, base_index=0)
        monkeypatch.undo()
        scale = float(theirs.abs().max())
        assert scale > 0
        torch.testing.assert_close(result.delta(name), theirs, rtol=1e-4, atol=1e-5 * scale)


def test_loaded_results_round_trip_through_peft_format(adapters, tmp_path):
    result = ao.blend([a.to(dtype=torch.float32) for a in adapters], WEIGHTS, "ties", 0.5)
    result.save(tmp_path / "out", format="peft")
    back = ao.load(tmp_path / "out")
    for name in SHAPES:
        torch.testing.assert_close(back.delta(name), result.delta(name))
    assert math.isfinite(back.norm())


def test_readme_merge_methods_snippet_runs(monkeypatch):
    root = Path(__file__).resolve().parent.parent
    section = (root / "README.md").read_text().split("### Merge methods\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(root)
    scope = {"ao": ao}
    exec(compile(code, "README.md", "exec"), scope)
    row = scope["mix"].metadata["blend"]["layers"]["model.layers.0.self_attn.q_proj"]
    assert row["rank"] == 16 and f"{row['energy_kept']:.4f}" in code


def test_chunking_does_not_change_the_result(adapters, monkeypatch):
    together = ao.blend(adapters, WEIGHTS, "della", 0.5, seed=2)
    monkeypatch.setattr(dense, "CPU_CHUNK_BYTES", 1)  # one layer's dense deltas at a time
    seen = []
    original = dense._truncate
    monkeypatch.setattr(dense, "_truncate", lambda M, *a, **k: seen.append(M.shape[0]) or original(M, *a, **k))
    alone = ao.blend(adapters, WEIGHTS, "della", 0.5, seed=2)
    assert seen == [1, 1, 1]
    for name in SHAPES:
        torch.testing.assert_close(alone.delta(name), together.delta(name))
