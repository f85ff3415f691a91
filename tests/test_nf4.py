"""adapterops.quant.nf4: byte parity with bitsandbytes' NF4, round trips, batching, serialization."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterops.checkpoint import Checkpoint
from adapterops.errors import AdapterOpsError, FormatError
from adapterops.quant import (
    NF4Tensor,
    dequantize_nf4,
    dequantize_nf4_many,
    from_state_dict,
    quantize_nf4,
    quantize_nf4_many,
    to_state_dict,
)
from adapterops.quant.nf4 import DYNAMIC_CODE, NF4_CODE, unpack_codes

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# multiples of the blocksize, partial last blocks, odd element counts, fewer values than a block, 3-D
SHAPES = [(64, 64), (96, 576), (33, 7), (5, 13), (1000, 3), (7,), (3, 4, 65)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.fixture(autouse=True)
def _no_compile():
    """bitsandbytes torch.compiles its CPU fallbacks per shape; seconds each, and beside the point here."""
    with torch._dynamo.config.patch(disable=True):
        yield


def weight(shape, dtype, seed=0, std=0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(dtype)


def bnb_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False):
    return F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def lut_rule(normed: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU 8-bit coder, as measured: the nearest code to the nearest of 65536 grid
    points ``k / 65535 * 2 - 1`` (index ``trunc((v + 1) / 2 * 65535 + 0.5)``), not to ``v`` itself."""
    grid = torch.arange(65536, dtype=torch.float32) / 65535.0 * 2.0 - 1.0
    table = (grid[:, None] - code[None]).abs().argmin(dim=1)
    return table[(((normed.clamp(-1, 1) + 1.0) * 0.5) * 65535.0 + 0.5).long()]


def test_code_tables_are_bitsandbytes():
    assert torch.equal(NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_CODE, F.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_codes_and_scales_equal_bitsandbytes(shape, dtype):
    w = weight(shape, dtype)
    packed, state = bnb_quantize(w)
    q = quantize_nf4(w, double_quant=False)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == ((w.numel() + 1) // 2,)
    assert torch.equal(q.codes, packed.reshape(-1))
    assert torch.equal(q.absmax, state.absmax)
    assert q.shape == tuple(shape) and q.dtype == dtype


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_other_blocksizes_equal_bitsandbytes(blocksize):
    w = weight((96, 100), torch.bfloat16, seed=blocksize)
    packed, state = bnb_quantize(w, blocksize)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=False)
    assert torch.equal(q.codes, packed.reshape(-1)) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(q), F.dequantize_4bit(packed, state, quant_type="nf4"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantize_equals_bitsandbytes_bit_for_bit(shape, dtype):
    w = weight(shape, dtype, seed=1)
    packed, state = bnb_quantize(w)
    expected = F.dequantize_4bit(packed, state, quant_type="nf4")
    got = dequantize_nf4(quantize_nf4(w, double_quant=False))
    assert got.dtype == dtype and got.shape == w.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shape", [(64, 96), (8, 48), (2, 160)], ids=str)
def test_blocks_straddle_rows_as_in_bitsandbytes_reference(shape):
    """Blocks run over the flattened weight and may straddle rows: bitsandbytes quantizes that way
    and its reference dequantization (the device-independent one) reads it that way; we equal both
    bit for bit. Its 0.50 CPU kernel does not, for in_features a multiple of 16 but not of the
    blocksize, so such layers (rare in real models) load wrongly on a CPU, whoever wrote them."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    w = weight(shape, torch.bfloat16, seed=4)
    packed, state = bnb_quantize(w)
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(q.codes, packed.reshape(-1)) and torch.equal(q.absmax, state.absmax)
    reference = _dequantize_4bit_compute(packed.reshape(-1), state.absmax, NF4_CODE, 64, shape, torch.bfloat16)
    assert torch.equal(dequantize_nf4(q), reference)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(96, 576), (576, 1536), (33, 7), (64, 8)], ids=str)
def test_double_quant_equals_bitsandbytes_where_its_cpu_coder_is_exact(shape, dtype):
    """The 4-bit codes, the float32 nested absmax and the offset agree byte for byte. The 8-bit
    codes of the scales agree wherever bitsandbytes' CPU coder picks the nearest code; it uses a
    65536-point lookup table (``lut_rule``, which reproduces it exactly), so a few scales within
    one grid step of a midpoint get the farther neighbour. Here every code is the nearest one."""
    w = weight(shape, dtype, seed=2)
    packed, state = bnb_quantize(w, double_quant=True)
    q = quantize_nf4(w, double_quant=True)
    assert torch.equal(q.codes, packed.reshape(-1))
    assert torch.equal(q.nested_absmax, state.state2.absmax)
    assert q.offset.item() == state.offset.item()
    assert q.absmax.dtype == torch.uint8 and q.absmax.shape == state.absmax.shape

    raw = bnb_quantize(w)[1].absmax  # the float32 scales before double quantization
    centered = raw - state.offset
    per_block = q.nested_absmax.repeat_interleave(256)[: raw.numel()]
    normed = torch.where(per_block > 0, centered / per_block, -1.0)
    assert torch.equal(lut_rule(normed, DYNAMIC_CODE), state.absmax.long())  # bitsandbytes, explained

    dist = (normed.double()[:, None] - DYNAMIC_CODE.double()[None]).abs()  # exact distances
    ours = q.absmax.long()
    best = dist.min(dim=1).values
    assert torch.equal(dist.gather(1, ours[:, None])[:, 0], best)  # ours is always a nearest code
    differ = ours != state.absmax.long()
    assert (dist.gather(1, state.absmax.long()[:, None])[differ, 0] > best[differ]).all()  # theirs is farther there
    worse = dist.gather(1, state.absmax.long()[:, None])[:, 0] - best
    assert (worse <= 2 / 65535 + 1e-9).all()  # a grid point is within half a step (1/65535) of the value
    assert differ.float().mean() < 0.01


def test_double_quant_dequantize_equals_bitsandbytes_with_the_same_codes():
    """With our 8-bit codes handed to bitsandbytes, its dequantization equals ours bit for bit."""
    w = weight((576, 1536), torch.bfloat16, seed=3)
    q = quantize_nf4(w)
    state = F.QuantState.from_dict({k.removeprefix("w."): v for k, v in to_state_dict(q, "w").items() if k != "w"}, device="cpu")
    expected = F.dequantize_4bit(q.codes.reshape(-1, 1), state, quant_type="nf4")
    assert torch.equal(dequantize_nf4(q), expected)
    assert torch.equal(q.scales(), F.dequantize_blockwise(state.absmax, state.state2) + state.offset)


def test_ties_go_to_the_lower_code():
    """A value exactly on the float32 midpoint of two codes takes the lower one, as in bitsandbytes."""
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # 15 midpoints, both signs
    block = torch.cat([torch.tensor([1.0]), mids, torch.zeros(64 - 16)])  # absmax 1, so scaled == value
    packed, _ = bnb_quantize(block)
    q = quantize_nf4(block, double_quant=False)
    assert torch.equal(q.codes, packed.reshape(-1))
    assert torch.equal(unpack_codes(q.codes, 64)[1:16].long(), torch.arange(15))  # midpoint i: codes i and i + 1


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 700),
    scale=st.sampled_from([1e-3, 0.02, 1.0, 300.0]),
    dtype=st.sampled_from(DTYPES),
    zero_block=st.sampled_from([None, 0.0, -0.0]),
    seed=st.integers(0, 2**16),
)
def test_random_sizes_and_scales_equal_bitsandbytes(n, scale, dtype, zero_block, seed):
    w = weight((n,), torch.float32, seed=seed, std=scale)
    if zero_block is not None:
        w[: min(n, 64)] = zero_block  # an all-zero block: absmax +0.0, every code that of 0.0
    w = w.to(dtype)
    packed, state = bnb_quantize(w)
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(q.codes, packed.reshape(-1)) and torch.equal(q.absmax, state.absmax)
    restored = dequantize_nf4(q, dtype=torch.float32)
    assert torch.isfinite(restored).all()


@pytest.mark.parametrize("name", ["model.layers.3.self_attn.q_proj.weight", "model.layers.7.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight"])
def test_real_weights_equal_bitsandbytes(smollm2_dir, name):
    w = Checkpoint(smollm2_dir).read(name)  # bfloat16
    for double_quant in (False, True):
        packed, state = bnb_quantize(w, double_quant=double_quant)
        q = quantize_nf4(w, double_quant=double_quant)
        assert torch.equal(q.codes, packed.reshape(-1))
        if not double_quant:
            assert torch.equal(q.absmax, state.absmax)
            assert torch.equal(dequantize_nf4(q), F.dequantize_4bit(packed, state, quant_type="nf4"))
        else:
            assert torch.equal(q.nested_absmax, state.state2.absmax) and q.offset.item() == state.offset.item()


def test_many_equals_one_at_a_time():
    ws = [weight((64, 64), torch.bfloat16, 1), weight((33, 7), torch.float32, 2), weight((96, 576), torch.float16, 3), weight((7,), torch.bfloat16, 4)]
    for double_quant in (False, True):
        many = quantize_nf4_many(ws, double_quant=double_quant)
        for w, q in zip(ws, many):
            one = quantize_nf4(w, double_quant=double_quant)
            assert torch.equal(q.codes, one.codes) and torch.equal(q.absmax, one.absmax)
            if double_quant:
                assert torch.equal(q.nested_absmax, one.nested_absmax) and torch.equal(q.offset, one.offset)
        for q, d in zip(many, dequantize_nf4_many(many)):
            assert torch.equal(d, dequantize_nf4(q))
    stacked = torch.stack([weight((96, 64), torch.bfloat16, s) for s in range(5)])  # (G, out, in), no copy per weight
    for q, w in zip(quantize_nf4_many(stacked), stacked):
        assert torch.equal(q.codes, quantize_nf4(w).codes)


def test_round_trip_error_is_bounded_by_half_a_code_gap():
    w = weight((128, 256), torch.float32, seed=5)
    q = quantize_nf4(w, double_quant=False)
    err = (dequantize_nf4(q) - w).view(-1, 64).abs()
    gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max()
    assert (err <= q.absmax[:, None] * gap / 2 + 1e-7).all()
    assert torch.equal(quantize_nf4(dequantize_nf4(q), double_quant=False).codes, q.codes)  # codes are a fixed point


def test_state_dict_equals_what_linear4bit_saves():
    w = weight((96, 64), torch.bfloat16, seed=6)
    layer = bnb.nn.Linear4bit(64, 96, bias=False, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    theirs = layer.to("cpu").state_dict()
    ours = to_state_dict(quantize_nf4(w), "weight")
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        if key != "weight.absmax":  # 8-bit codes: see the double-quantization test
            assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key
    state = json.loads(bytes(ours["weight.quant_state.bitsandbytes__nf4"].tolist()).decode())
    assert state == {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [96, 64],
                     "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": state["nested_offset"]}
    plain = to_state_dict(quantize_nf4(w, double_quant=False), "weight")
    assert set(plain) == {"weight", "weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"}


def test_state_dicts_of_many_weights_save_with_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    qs = quantize_nf4_many([weight((64, 64), torch.bfloat16, s) for s in range(3)])
    entries = {k: v for i, q in enumerate(qs) for k, v in to_state_dict(q, f"l{i}.weight").items()}
    save_file(entries, tmp_path / "w.safetensors")  # no tensor shares memory with another
    loaded = load_file(tmp_path / "w.safetensors")
    for i, q in enumerate(qs):
        assert torch.equal(dequantize_nf4(from_state_dict(loaded, f"l{i}.weight")), dequantize_nf4(q))


@pytest.mark.parametrize("double_quant", [False, True])
def test_from_state_dict_round_trip(double_quant):
    w = weight((33, 70), torch.float16, seed=7)
    q = quantize_nf4(w, double_quant=double_quant)
    back = from_state_dict(to_state_dict(q, "x.weight"), "x.weight")
    assert isinstance(back, NF4Tensor) and back.shape == q.shape and back.dtype == q.dtype and back.blocksize == 64
    assert torch.equal(dequantize_nf4(back), dequantize_nf4(q))
    assert all(torch.equal(a, b) for a, b in zip(to_state_dict(back, "x.weight").values(), to_state_dict(q, "x.weight").values()))


def test_from_state_dict_refuses_what_is_not_nf4():
    entries = to_state_dict(quantize_nf4(weight((64, 64), torch.float32)), "w")
    with pytest.raises(FormatError, match="missing w.absmax"):
        from_state_dict({k: v for k, v in entries.items() if k != "w.absmax"}, "w")
    fp4 = {k.replace("bitsandbytes__nf4", "bitsandbytes__fp4"): v for k, v in entries.items()}
    with pytest.raises(FormatError, match="FP4"):
        from_state_dict(fp4, "w")
    with pytest.raises(FormatError, match="unreadable quant_state"):
        from_state_dict({**entries, "w.quant_state.bitsandbytes__nf4": torch.tensor([123, 34], dtype=torch.uint8)}, "w")
    for crafted in (b"[" * 100_000, b'["shape"]', b'{"shape": 3}'):  # nested past Python's recursion limit; not an object; no sequence
        with pytest.raises(FormatError, match="unreadable quant_state"):
            from_state_dict({**entries, "w.quant_state.bitsandbytes__nf4": torch.frombuffer(bytearray(crafted), dtype=torch.uint8)}, "w")
    with pytest.raises(FormatError, match="do not fit"):
        from_state_dict({**entries, "w": entries["w"][:-1]}, "w")
    with pytest.raises(FormatError, match="only uint8 storage"):
        from_state_dict({**entries, "w": entries["w"].reshape(-1).view(torch.bfloat16)}, "w")
    with pytest.raises(FormatError, match="not the NF4 table"):
        from_state_dict({**entries, "w.quant_map": F.get_4bit_type("fp4", device="cpu")}, "w")


def test_bad_inputs_are_refused():
    with pytest.raises(AdapterOpsError, match="blocksize must be one of"):
        quantize_nf4(torch.randn(64), blocksize=48)
    with pytest.raises(AdapterOpsError, match="float32, float16 or bfloat16"):
        quantize_nf4(torch.arange(64))
    with pytest.raises(AdapterOpsError, match="empty"):
        quantize_nf4(torch.empty(0))


@pytest.mark.parametrize("device", DEVICES)
def test_device_results_equal_cpu(device):
    ws = [weight((576, 1536), torch.bfloat16, 8), weight((33, 7), torch.float16, 9)]
    on_device = quantize_nf4_many([w.to(device) for w in ws])
    for w, q in zip(ws, on_device):
        cpu = quantize_nf4(w)
        assert q.device.type == torch.device(device).type
        assert torch.equal(q.codes.cpu(), cpu.codes) and torch.equal(q.absmax.cpu(), cpu.absmax)
        assert torch.equal(q.nested_absmax.cpu(), cpu.nested_absmax) and q.offset.item() == cpu.offset.item()
        assert torch.equal(dequantize_nf4(q).cpu(), dequantize_nf4(cpu))
