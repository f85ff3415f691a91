"""Adapter algebra and compression: properties against dense float64 references.

Every reference here is built from the definition ``delta = alpha / rank * B @ A`` in float64,
independently of adapterops' own helpers.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adapterops as ao
from adapterops import Adapter, LoraLayer
from adapterops.errors import AdapterOpsError, NonFiniteError, ShapeMismatchError, UnsupportedOperationError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj", "lm_head"]
PROPS = settings(max_examples=40, deadline=None)


# ---------------------------------------------------------------- strategies and references


@st.composite
def models(draw):
    """Module name -> delta shape (out, in), shared by every adapter of one test."""
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    return {n: (draw(st.integers(1, 10)), draw(st.integers(1, 10))) for n in names}


@st.composite
def adapters(draw, model, min_layers=0):
    """A random float64 adapter on a subset of ``model``'s modules, ranks 1..6, any positive alpha."""
    names = draw(st.lists(st.sampled_from(sorted(model)), min_size=min_layers, unique=True))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    layers = {}
    for name in names:
        out, inn = model[name]
        r = draw(st.integers(1, 6))
        alpha = draw(st.floats(0.25, 64.0))
        layers[name] = LoraLayer(
            torch.randn(r, inn, generator=g, dtype=torch.float64), torch.randn(out, r, generator=g, dtype=torch.float64), alpha
        )
    return Adapter(layers)


weights = st.floats(-3.0, 3.0, allow_nan=False)


def dense(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {n: layer.alpha / layer.A.shape[0] * (layer.B.double() @ layer.A.double()) for n, layer in adapter.items()}


def combine(terms: list[tuple[float, Adapter]]) -> dict[str, torch.Tensor]:
    """sum_i w_i * delta_i over the union of layers, in float64."""
    out: dict[str, torch.Tensor] = {}
    for w, adapter in terms:
        for name, d in dense(adapter).items():
            out[name] = out.get(name, 0) + w * d
    return out


def assert_deltas(result: Adapter, expected: dict[str, torch.Tensor], atol: float = 1e-9) -> None:
    assert list(result) == list(expected)
    for name, d in expected.items():
        torch.testing.assert_close(result.delta(name).double(), d, atol=atol, rtol=1e-9)


def assert_alpha_is_rank(result: Adapter) -> None:
    for layer in result.values():
        assert layer.alpha == layer.rank and layer.scale == 1.0


def frob(x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x))


# ---------------------------------------------------------------- the value type


def test_layer_properties():
    A, B = torch.randn(3, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    layer = LoraLayer(A, B, 6)
    assert (layer.rank, layer.shape, layer.alpha, layer.scale, layer.num_params) == (3, (7, 5), 6.0, 2.0, 36)
    torch.testing.assert_close(layer.delta(), 2.0 * B @ A)
    assert not layer.is_dora


@pytest.mark.parametrize(
    ("A", "B", "words"),
    [
        (torch.zeros(2, 5), torch.zeros(4, 3), "inner ranks differ"),
        (torch.zeros(5), torch.zeros(4, 1), "must be 2-D"),
        (torch.zeros(0, 5), torch.zeros(4, 0), "rank >= 1"),
    ],
)
def test_layer_rejects_bad_factors(A, B, words):
    with pytest.raises(ShapeMismatchError, match=words):
        LoraLayer(A, B, 1.0)


def test_adapter_mapping_and_properties():
    a = Adapter(
        {
            "x": LoraLayer(torch.randn(2, 4), torch.randn(3, 2), 4),
            "y": LoraLayer(torch.randn(5, 6), torch.randn(6, 5), 5),
        },
        {"base_model": "m"},
    )
    assert len(a) == 2 and list(a) == ["x", "y"] and "x" in a
    assert a.rank == 5 and a.ranks == {"x": 2, "y": 5}
    assert a.num_params == 2 * 4 + 3 * 2 + 5 * 6 + 6 * 5
    assert a.metadata["base_model"] == "m"
    torch.testing.assert_close(a.delta("x"), a["x"].delta())
    assert Adapter({}).rank == 0 and Adapter({}).num_params == 0
    with pytest.raises(TypeError, match="expected LoraLayer"):
        Adapter({"x": (torch.zeros(1, 1), torch.zeros(1, 1))})


def test_to_changes_dtype_and_keeps_values():
    a = Adapter({"x": LoraLayer(torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64), 4)})
    b = a.to(dtype=torch.bfloat16)
    assert b["x"].A.dtype == b["x"].B.dtype == torch.bfloat16 and b["x"].alpha == 4.0
    torch.testing.assert_close(b.delta("x").double(), a.delta("x"), atol=0.1, rtol=0.05)
    assert a["x"].A.dtype == torch.float64


def test_values_are_immutable():
    layer = LoraLayer(torch.randn(2, 4), torch.randn(3, 2), 4)
    a = Adapter({"x": layer}, {"base_model": "m"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.alpha = 1.0
    with pytest.raises(AttributeError, match="immutable"):
        a.metadata = {}
    with pytest.raises(TypeError):
        a["y"] = layer
    with pytest.raises(TypeError):
        a.metadata["base_model"] = "other"
    a.ranks["x"] = 99
    assert a.ranks == {"x": 2}
    source = {"x": layer}
    b = Adapter(source)
    source["z"] = layer
    assert list(b) == ["x"]


@PROPS
@given(data=st.data())
def test_operations_never_modify_operands(data):
    model = data.draw(models())
    a, b = data.draw(adapters(model, 1)), data.draw(adapters(model, 1))
    before = [(n, layer.A.clone(), layer.B.clone(), layer.alpha) for x in (a, b) for n, layer in x.items()]
    for result in (a + b, a - b, -a, a * 2, 3 * a, a / 4, ao.blend([a, b], [0.3, 0.7]), ao.interpolate(a, b, 0.2)):
        assert isinstance(result, Adapter)
    a.compress(rank=1), a.dot(b), a.norm(), ao.cosine(a, b)
    after = [(n, layer.A, layer.B, layer.alpha) for x in (a, b) for n, layer in x.items()]
    for (n1, A1, B1, al1), (n2, A2, B2, al2) in zip(before, after):
        assert n1 == n2 and al1 == al2 and torch.equal(A1, A2) and torch.equal(B1, B2)


# ---------------------------------------------------------------- exact algebra


@PROPS
@given(data=st.data(), s=weights.filter(lambda x: abs(x) > 1e-3))
def test_operators_are_exact(data, s):
    model = data.draw(models())
    a, b = data.draw(adapters(model)), data.draw(adapters(model))
    cases = {
        "a + b": (a + b, [(1, a), (1, b)]),
        "a - b": (a - b, [(1, a), (-1, b)]),
        "-a": (-a, [(-1, a)]),
        "a * s": (a * s, [(s, a)]),
        "s * a": (s * a, [(s, a)]),
        "a / s": (a / s, [(1 / s, a)]),
    }
    for label, (result, terms) in cases.items():
        assert_deltas(result, combine(terms))
        assert_alpha_is_rank(result)
    # ranks concatenate: exact sums need r1 + r2
    for name, layer in (a + b).items():
        assert layer.rank == a.ranks.get(name, 0) + b.ranks.get(name, 0)


@PROPS
@given(data=st.data(), s=weights.filter(lambda x: abs(x) > 1e-3))
def test_numpy_and_tensor_scalars_work_like_floats(data, s):
    a = data.draw(adapters(data.draw(models())))
    for scalar in (np.float64(s), np.float32(s), torch.tensor(s, dtype=torch.float64)):
        for result, factor in ((a * scalar, float(scalar)), (scalar * a, float(scalar)), (a / scalar, 1 / float(scalar))):
            assert isinstance(result, Adapter)
            assert_deltas(result, combine([(factor, a)]))


@PROPS
@given(data=st.data(), n=st.integers(1, 4))
def test_blend_is_the_weighted_sum(data, n):
    model = data.draw(models())
    values = [data.draw(adapters(model)) for _ in range(n)]
    w = [data.draw(weights) for _ in range(n)]
    result = ao.blend(values, w)
    assert_deltas(result, combine(list(zip(w, values))))
    assert_alpha_is_rank(result)


@PROPS
@given(data=st.data(), t=st.floats(-1.0, 2.0))
def test_interpolate(data, t):
    model = data.draw(models())
    a, b = data.draw(adapters(model)), data.draw(adapters(model))
    assert_deltas(ao.interpolate(a, b, t), combine([(1 - t, a), (t, b)]))


def test_layers_in_one_operand_carry_over():
    g = torch.Generator().manual_seed(1)
    only_a = LoraLayer(torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g), 8)
    only_b = LoraLayer(torch.randn(1, 5, generator=g), torch.randn(2, 1, generator=g), 1)
    shared = [LoraLayer(torch.randn(2, 3, generator=g), torch.randn(3, 2, generator=g), 2) for _ in range(2)]
    a, b = Adapter({"x": only_a, "s": shared[0]}), Adapter({"s": shared[1], "y": only_b})
    total = a + 2 * b
    assert list(total) == ["x", "s", "y"]
    torch.testing.assert_close(total.delta("x"), only_a.delta())
    torch.testing.assert_close(total.delta("y"), 2 * only_b.delta())
    torch.testing.assert_close(total.delta("s"), shared[0].delta() + 2 * shared[1].delta())


@pytest.mark.parametrize(
    "op",
    [lambda a, b: a + b, lambda a, b: a - b, lambda a, b: ao.blend([a, b], [1, 1]), lambda a, b: a.dot(b), ao.cosine],
    ids=["add", "sub", "blend", "dot", "cosine"],
)
def test_shape_mismatch_names_the_module(op):
    name = "model.layers.3.self_attn.q_proj"
    a = Adapter({name: LoraLayer(torch.zeros(2, 576), torch.zeros(576, 2), 2)})
    b = Adapter({name: LoraLayer(torch.zeros(2, 576), torch.zeros(192, 2), 2)})
    with pytest.raises(ShapeMismatchError) as info:
        op(a, b)
    assert name in str(info.value) and "[576, 576]" in str(info.value) and "[192, 576]" in str(info.value)


def test_bad_operands():
    a = Adapter({"x": LoraLayer(torch.randn(2, 3), torch.randn(3, 2), 2)})
    with pytest.raises(TypeError):
        a + 1
    with pytest.raises(TypeError):
        a * "2"
    with pytest.raises(TypeError):
        a * True
    with pytest.raises(TypeError):
        a * a
    with pytest.raises(ZeroDivisionError):
        a / 0
    with pytest.raises(AdapterOpsError, match="2 adapters but 1 weights"):
        ao.blend([a, a], [1.0])
    with pytest.raises(AdapterOpsError, match="at least one"):
        ao.blend([], [])
    torch.testing.assert_close((a * torch.tensor(2.0)).delta("x"), 2 * a.delta("x"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_half_precision_operands_compute_in_float32(dtype):
    g = torch.Generator().manual_seed(0)
    a = Adapter({"x": LoraLayer(torch.randn(4, 32, generator=g).to(dtype), torch.randn(24, 4, generator=g).to(dtype), 8)})
    b = Adapter({"x": LoraLayer(torch.randn(2, 32, generator=g).to(dtype), torch.randn(24, 2, generator=g).to(dtype), 2)})
    result = ao.blend([a, b], [0.6, 0.4])
    assert result["x"].A.dtype == dtype and result["x"].B.dtype == dtype
    expected = 0.6 * a["x"].delta(torch.float64) + 0.4 * b["x"].delta(torch.float64)
    tol = {torch.bfloat16: 5e-2, torch.float16: 5e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(result.delta("x").double(), expected, atol=tol * float(expected.abs().max()), rtol=tol)


# ---------------------------------------------------------------- inner products


@PROPS
@given(data=st.data())
def test_dot_norm_cosine(data):
    model = data.draw(models())
    a, b = data.draw(adapters(model)), data.draw(adapters(model))
    da, db = dense(a), dense(b)
    shared = [n for n in a if n in b]
    dots = {n: float((da[n] * db[n]).sum()) for n in shared}
    norm_a = math.sqrt(sum(frob(d) ** 2 for d in da.values()))
    norm_b = math.sqrt(sum(frob(d) ** 2 for d in db.values()))

    assert a.dot(b) == pytest.approx(sum(dots.values()), rel=1e-9, abs=1e-9)
    assert a.dot(b, per_layer=True) == pytest.approx(dots, rel=1e-9, abs=1e-9)
    assert list(a.dot(b, per_layer=True)) == shared
    assert a.norm() == pytest.approx(norm_a, rel=1e-9, abs=1e-12)
    assert a.norm(per_layer=True) == pytest.approx({n: frob(d) for n, d in da.items()}, rel=1e-9, abs=1e-12)

    expected = sum(dots.values()) / (norm_a * norm_b) if norm_a and norm_b else 0.0
    assert ao.cosine(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    per_layer = ao.cosine(a, b, per_layer=True)
    assert per_layer == pytest.approx({n: dots[n] / (frob(da[n]) * frob(db[n])) for n in shared}, rel=1e-9, abs=1e-9)
    assert all(-1.0 <= v <= 1.0 for v in per_layer.values())
    if a:
        assert ao.cosine(a, a) == pytest.approx(1.0)
        assert ao.cosine(a, -a) == pytest.approx(-1.0)
        assert ao.cosine(a, 2.5 * a) == pytest.approx(1.0)


def test_cosine_of_zero_adapter_is_zero():
    a = Adapter({"x": LoraLayer(torch.randn(2, 3), torch.zeros(4, 2), 2)})
    b = Adapter({"x": LoraLayer(torch.randn(2, 3), torch.randn(4, 2), 2)})
    assert ao.cosine(a, b) == 0.0 and ao.cosine(a, b, per_layer=True) == {"x": 0.0}


# ---------------------------------------------------------------- compression


def dense_svdvals(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {n: torch.linalg.svdvals(d) for n, d in dense(adapter).items()}


def dense_spectra(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Singular values of each dense delta, without those at round-off level.

    Round-off is judged against ``||scale * B|| * ||A||``, the size of the terms that were summed.
    """
    out = {}
    for name, S in dense_svdvals(adapter).items():
        layer = adapter[name]
        size = frob(layer.alpha / layer.rank * layer.B.double()) * frob(layer.A.double())
        out[name] = S[S > 1e-10 * size]
    return out


def check_optimal(source: Adapter, result: Adapter) -> None:
    """Each layer's error is the optimal truncated-SVD error for the rank it kept (Eckart-Young)."""
    assert_alpha_is_rank(result)
    assert set(result) <= set(source)
    for name, d in dense(source).items():
        S = torch.linalg.svdvals(d)
        k = result.ranks.get(name, 0)
        got = d - result.delta(name).double() if name in result else d
        optimal = math.sqrt(float((S[k:] ** 2).sum()))
        assert frob(got) == pytest.approx(optimal, abs=1e-8 * (1 + float(S.max())))


@PROPS
@given(data=st.data(), k=st.integers(1, 8))
def test_compress_rank_is_optimal(data, k):
    model = data.draw(models())
    a = data.draw(adapters(model, 1)) + data.draw(adapters(model))
    result = a.compress(rank=k)
    check_optimal(a, result)
    for name, S in dense_spectra(a).items():
        kept = min(k, len(S))
        assert result.ranks.get(name, 0) == kept


@PROPS
@given(data=st.data(), fraction=st.floats(0.05, 1.0))
def test_compress_energy_keeps_the_fraction(data, fraction):
    model = data.draw(models())
    a = data.draw(adapters(model, 1)) - data.draw(adapters(model))
    result = a.compress(energy=fraction)
    check_optimal(a, result)
    for name, S in dense_spectra(a).items():
        energy = S**2
        k = result.ranks.get(name, 0)
        total = float(energy.sum())
        assert float(energy[:k].sum()) >= fraction * total * (1 - 1e-9)
        if k > 0:  # and the smallest rank that does
            assert float(energy[: k - 1].sum()) < fraction * total * (1 + 1e-9)


@PROPS
@given(data=st.data(), budget=st.integers(0, 300))
def test_compress_budget_uses_one_global_threshold(data, budget):
    model = data.draw(models())
    a = data.draw(adapters(model, 1)) + data.draw(adapters(model))
    result = a.compress(budget=budget)
    check_optimal(a, result)
    assert result.num_params <= budget
    # reference: all singular values of all layers, largest first, each costing out + in params
    pool = sorted(
        ((float(s), sum(a[n].shape)) for n, S in dense_spectra(a).items() for s in S),
        reverse=True,
    )
    spent, kept = 0, 0
    for _, cost in pool:
        if spent + cost > budget:
            break
        spent, kept = spent + cost, kept + 1
    assert result.num_params == spent
    assert sum(result.ranks.values()) == kept
    if kept < len(pool):  # every value kept is at least as large as the first one left out
        smallest_kept = min((float(S.min()) for _, S, _ in result.svd().values()), default=math.inf)
        assert smallest_kept >= pool[kept][0] * (1 - 1e-9)


@PROPS
@given(data=st.data())
def test_compress_at_full_rank_is_exact(data):
    model = data.draw(models())
    a = data.draw(adapters(model, 1)) + data.draw(adapters(model))
    for result in (a.compress(rank=1000), a.compress(energy=1.0), a.compress(budget=10**9)):
        assert_deltas(result, dense(a), atol=1e-9)
        assert_alpha_is_rank(result)
        for name, layer in result.items():  # and never above the true rank
            assert layer.rank <= min(a[name].rank, *a[name].shape)


@PROPS
@given(data=st.data(), s=weights)
def test_difference_of_equals_compresses_to_nothing(data, s):
    model = data.draw(models())
    a = data.draw(adapters(model, 1))
    assert len((a + (-a)).compress(rank=4)) == 0
    assert len((a * s - s * a).compress(energy=0.5)) == 0
    assert len((a - a).compress(budget=10**6)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_compress_blend_at_model_shapes(dtype, device):
    """Two rank-8 adapters at SmolLM2 shapes, blended and re-compressed to rank 8, against a dense SVD."""
    g = torch.Generator().manual_seed(0)

    def adapter(alpha):
        return Adapter(
            {
                f"model.layers.{i}.{m}": LoraLayer(
                    torch.randn(8, inn, generator=g).to(dtype) / 10, torch.randn(out, 8, generator=g).to(dtype) / 10, alpha
                )
                for i in range(3)
                for m, (out, inn) in {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "mlp.up_proj": (1536, 576)}.items()
            }
        )

    mix = ao.blend([adapter(16), adapter(8)], [0.6, 0.4]).to(device=device)
    result = mix.compress(rank=8, device=device)
    assert {layer.A.device.type for layer in result.values()} == {torch.device(device).type}
    assert all(layer.A.dtype == dtype and layer.rank == 8 for layer in result.values())
    for name, layer in mix.items():
        d = layer.delta(torch.float64).cpu()
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        best = (U[:, :8] * S[:8]) @ Vh[:8]
        got = result.delta(name).double().cpu()
        rel = frob(got - best) / frob(best)
        assert rel < (1e-5 if dtype == torch.float32 else 2e-2)


def test_compress_needs_exactly_one_rule():
    a = Adapter({"x": LoraLayer(torch.randn(2, 3), torch.randn(3, 2), 2)})
    for kwargs in ({}, {"rank": 1, "energy": 0.5}, {"rank": 1, "budget": 10}):
        with pytest.raises(AdapterOpsError, match="exactly one of"):
            a.compress(**kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_compress_refuses_nonfinite_factors(bad):
    g = torch.Generator().manual_seed(0)
    layers = {n: LoraLayer(torch.randn(2, 3, generator=g), torch.randn(3, 2, generator=g), 2) for n in ("x", "y", "z")}
    A = layers["y"].A.clone()
    A[0, 0] = bad
    a = Adapter({**layers, "y": LoraLayer(A, layers["y"].B, 2)})
    assert a.nonfinite_layers() == ["y"]
    for op in (lambda: a.compress(rank=1), a.svd):
        with pytest.raises(NonFiniteError, match="NaN or Inf .*e.g. y"):
            op()
    nan_alpha = Adapter({"w": LoraLayer(torch.ones(1, 2), torch.ones(2, 1), float("nan"))})
    with pytest.raises(NonFiniteError, match="w"):
        nan_alpha.compress(rank=1)


def test_huge_and_tiny_factors_compress_fine():
    g = torch.Generator().manual_seed(0)
    for magnitude in (1e-20, 1e20):  # squares under- and overflow float32
        a = Adapter({"x": LoraLayer(torch.randn(3, 8, generator=g) * magnitude, torch.randn(6, 3, generator=g), 3)})
        result = a.compress(rank=2)
        assert result.ranks == {"x": 2}
        S = torch.linalg.svdvals(a["x"].delta(torch.float64))
        err = torch.linalg.matrix_norm(a["x"].delta(torch.float64) - result["x"].delta(torch.float64))
        assert float(err) == pytest.approx(float(S[2]), rel=1e-3)


def test_compress_keeps_base_model_and_notes_the_rule():
    a = Adapter({"x": LoraLayer(torch.randn(2, 3), torch.randn(3, 2), 2)}, {"base_model": "HuggingFaceTB/SmolLM2-135M"})
    result = a.compress(rank=1)
    assert result.metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M" and "rank=1" in result.metadata["notes"]


# ---------------------------------------------------------------- DoRA


def test_dora_refuses_algebra():
    layer = LoraLayer(torch.randn(2, 3), torch.randn(4, 2), 2, magnitude=torch.rand(4))
    d = Adapter({"x": layer})
    plain = Adapter({"x": LoraLayer(torch.randn(2, 3), torch.randn(4, 2), 2)})
    assert d.is_dora and layer.is_dora and d.num_params == 6 + 8 + 4
    operations = {
        "add": lambda: d + plain,
        "radd": lambda: plain + d,
        "sub": lambda: d - plain,
        "neg": lambda: -d,
        "mul": lambda: d * 2,
        "div": lambda: d / 2,
        "blend": lambda: ao.blend([plain, d], [1, 1]),
        "interpolate": lambda: ao.interpolate(plain, d, 0.5),
        "dot": lambda: plain.dot(d),
        "norm": lambda: d.norm(),
        "cosine": lambda: ao.cosine(d, plain),
        "compress": lambda: d.compress(rank=1),
        "svd": lambda: d.svd(),
    }
    for label, op in operations.items():
        with pytest.raises(UnsupportedOperationError) as info:
            op()
        message = str(info.value)
        assert "DoRA" in message and "not linear" in message and "x" in message, label
    with pytest.raises(ShapeMismatchError, match="magnitude"):
        LoraLayer(torch.randn(2, 3), torch.randn(4, 2), 2, magnitude=torch.rand(3))
