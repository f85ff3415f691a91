"""NF4 (4-bit NormalFloat) quantization in the bitsandbytes layout, in plain torch.

NF4 (Dettmers et al. 2023, QLoRA, sec. 3) stores a weight as blocks of ``blocksize`` values of
the row-major flattened tensor, each block as one float scale and a 4-bit index per value into a
16-entry code table ``c`` (quantiles of N(0, 1), scaled to [-1, 1]):

    absmax_b = max_{j in b} |w_j|           q_j = nearest index of w_j / absmax_b in c
    w_j ~= c[q_j] * absmax_b

Double quantization (QLoRA sec. 3, "Double Quantization") stores the scales themselves in 8 bits:
``offset = mean(absmax)``; ``absmax - offset`` in blocks of 256, each block a float32 scale and an
8-bit index into bitsandbytes' signed dynamic map (Dettmers 2016, "8-Bit Approximations for
Parallelism in Deep Learning"); ``absmax ~= dyn[q8] * nested_absmax + offset``.

The arithmetic mirrors bitsandbytes 0.50 so that the bytes agree with ``quantize_4bit`` /
``dequantize_4bit`` (checked in tests/test_nf4.py):

- scales in float32; a full block is scaled by multiplying with ``1 / max(absmax, 1e-38)``, the
  trailing partial block by dividing by its absmax (stored clamped to 1e-38 when zero);
- the 4-bit index compares against the float32 midpoints of neighbouring codes, a value equal to
  a midpoint taking the lower code; two indices per byte, the first in the high nibble, an odd
  element count padded with the code of 0.0 (7);
- values are rebuilt as ``float32(c[q] * absmax)``, cast once to the weight's dtype.

One deliberate difference: bitsandbytes' CPU path picks the 8-bit code of a scale through a
65536-entry lookup table, which is not always the nearest code (about 0.1% of scales land one
code off). Here it is always the nearest code (exact comparison against the midpoints, ties to
the lower code). The 4-bit codes and float scales do not depend on this choice.

Everything runs on the tensors' device; ``quantize_nf4_many`` / ``dequantize_nf4_many`` treat a
list of weights as one long run of blocks, a few kernel launches for the whole list.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import AdapterOpsError, FormatError

__all__ = [
    "NF4Tensor",
    "NF4_CODE",
    "DYNAMIC_CODE",
    "BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "STATE_SUFFIXES",
    "quantize_nf4",
    "dequantize_nf4",
    "quantize_nf4_many",
    "dequantize_nf4_many",
    "to_state_dict",
    "from_state_dict",
    "parse_state",
    "unpack_codes",
]

# The NF4 table as bitsandbytes stores it (float32), index 0..15.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
_NF4_MID = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # float32 thresholds, as bitsandbytes computes them
_ZERO_CODE = 7  # index of 0.0: the padding nibble of an odd element count
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
STATE_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted float32 values in [-1, 1]).

    For exponent ``e = 0..6`` there are ``2**e`` fractions: the midpoints of ``2**e + 1``
    points spaced evenly on [0.1, 1], times ``10**(e - 6)``, with both signs; plus 0 and 1.
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (e - 6)) * mids
        values += scaled.tolist() + (-scaled).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = _dynamic_map()
_DYNAMIC_MID = (DYNAMIC_CODE[:-1].double() + DYNAMIC_CODE[1:].double()) / 2  # exact midpoints
_BYTE = torch.arange(256)
_TABLES = {
    "nf4": NF4_CODE,
    "nf4_mid": _NF4_MID,
    "dynamic": DYNAMIC_CODE,
    "dynamic_mid": _DYNAMIC_MID,
    "pairs": torch.stack([NF4_CODE[_BYTE >> 4], NF4_CODE[_BYTE & 15]], dim=1),  # (256, 2): the values of a byte
}
_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}


def _on(device: torch.device, table: str) -> torch.Tensor:
    """A constant table on ``device``, copied there once."""
    key = (table, torch.device(device))
    if key not in _CACHE:
        _CACHE[key] = _TABLES[table].to(device)
    return _CACHE[key]


@dataclass(frozen=True, eq=False)
class NF4Tensor:
    """A weight stored as NF4: what bitsandbytes' ``Params4bit`` + ``QuantState`` hold.

    ``codes``: uint8 ``((n + 1) // 2,)``, two 4-bit indices per byte, first in the high nibble.
    ``absmax``: float32 ``(blocks,)``, or with double quantization uint8 ``(blocks,)`` indices into
    ``nested_code`` with ``nested_absmax`` float32 ``(ceil(blocks / 256),)`` and ``offset`` (a
    0-dim float32 tensor). ``shape`` and ``dtype`` are the original weight's.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors a checkpoint stores for this weight (without the JSON state)."""
        parts = [self.codes, self.absmax, NF4_CODE]
        if self.double_quant:
            parts += [self.nested_absmax, DYNAMIC_CODE]
        return sum(t.numel() * t.element_size() for t in parts)

    def to(self, device: str | torch.device) -> NF4Tensor:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Tensor(
            move(self.codes), move(self.absmax), self.shape, self.dtype, self.blocksize,
            move(self.nested_absmax), move(self.offset), move(self.nested_code), self.nested_blocksize,
        )

    def scales(self) -> torch.Tensor:
        """The float32 per-block scales (``absmax``, rebuilt from its 8-bit codes when nested)."""
        if not self.double_quant:
            return self.absmax
        code = self.nested_code if self.nested_code is not None else _on(self.absmax.device, "dynamic")
        return _expand(code[self.absmax.int()], self.nested_absmax, self.nested_blocksize).add_(self.offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype=dtype)

    def __repr__(self) -> str:
        kind = "double-quantized " if self.double_quant else ""
        return f"NF4Tensor({list(self.shape)}, {str(self.dtype).removeprefix('torch.')}, {kind}blocksize {self.blocksize}, on {self.device})"


# ---------------------------------------------------------------------------------------------
# quantize


def _check(w: torch.Tensor, blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise AdapterOpsError(f"NF4 blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize}")
    if w.dtype not in FLOAT_DTYPES:
        raise AdapterOpsError(f"NF4 quantizes float32, float16 or bfloat16 weights, got {w.dtype}; cast it first")
    if w.numel() == 0:
        raise AdapterOpsError("cannot quantize an empty tensor")


def _pack(q: torch.Tensor) -> torch.Tensor:
    """Indices (n,) in 0..15 (any integer dtype) -> bytes ((n + 1) // 2,), first in the high nibble."""
    q = q.to(torch.uint8)
    if q.numel() % 2:
        q = torch.cat([q, q.new_full((1,), _ZERO_CODE)])
    pairs = q.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_codes(codes: torch.Tensor, n: int) -> torch.Tensor:
    """Packed bytes -> the first ``n`` 4-bit indices, uint8 ``(n,)``."""
    codes = codes.reshape(-1)
    return torch.stack([codes >> 4, codes & 15], dim=-1).reshape(-1)[:n]


def _nf4_index(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 code of values in [-1, 1] (ties to the lower code), as int32."""
    return torch.bucketize(scaled, _on(scaled.device, "nf4_mid"), out_int32=True)


def _quantize_runs(
    flats: Sequence[torch.Tensor], blocksize: int, joined: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """4-bit codes and float32 absmax of each flat weight; full blocks of all weights in one pass.

    ``joined``: all of ``flats`` back to back in one tensor, when they have no partial block.
    """
    sizes = [f.numel() for f in flats]
    fulls = [n - n % blocksize for n in sizes]
    parts = [f[:m] for f, m in zip(flats, fulls) if m]
    if joined is not None:
        x = joined.reshape(-1, blocksize).float()
    elif len(parts) == 1:
        x = parts[0].reshape(-1, blocksize).float()
    elif parts:
        x = torch.cat(parts).reshape(-1, blocksize).float()  # exact: cat promotes mixed dtypes to a wider float
    else:
        x = None
    if x is not None:
        absmax = torch.maximum(x.amax(dim=1), x.amin(dim=1).neg_()).abs_()  # (blocks,): max |x| without an |x| copy; +0.0, never -0.0
        scaled = torch.clamp(x * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1)  # (blocks, bs)
        q = _nf4_index(scaled.view(-1))
        del scaled
    codes, scales, pos = [], [], 0
    for f, n, m in zip(flats, sizes, fulls):
        q_w = q[pos : pos + m] if m else None
        a_w = absmax[pos // blocksize : (pos + m) // blocksize] if m else None
        pos += m
        if n == m:
            codes.append(_pack(q_w))
            scales.append(a_w)
            continue
        tail = f[m:].float()
        am = tail.abs().max().clamp(min=1e-38)  # bitsandbytes stores the clamped value here
        q_tail = _nf4_index(torch.clamp(tail / am, -1, 1))
        codes.append(_pack(q_tail if q_w is None else torch.cat([q_w, q_tail])))
        scales.append(am.reshape(1) if a_w is None else torch.cat([a_w, am.reshape(1)]))
    return codes, scales


def _expand(values: torch.Tensor, per_block: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``values[j] * per_block[j // blocksize]`` in float32, a new tensor."""
    n = values.numel()
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    if full:
        torch.mul(values[:full].view(-1, blocksize), per_block[: full // blocksize].unsqueeze(1), out=out[:full].view(-1, blocksize))
    if n > full:
        torch.mul(values[full:], per_block[full // blocksize], out=out[full:])
    return out


def _nested_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 scales -> (uint8 indices into DYNAMIC_CODE, float32 nested absmax, 0-dim offset)."""
    offset = absmax.mean()  # a 1-D mean, as bitsandbytes takes it (a batched mean rounds differently)
    centered = absmax - offset
    n = centered.numel()
    full = n - n % NESTED_BLOCKSIZE
    nested = []
    if full:
        nested.append(centered[:full].abs().view(-1, NESTED_BLOCKSIZE).amax(dim=1))
    if n > full:
        nested.append(centered[full:].abs().amax().reshape(1))
    nested_absmax = torch.cat(nested) if len(nested) > 1 else nested[0]
    per = _expand(torch.ones_like(centered), nested_absmax, NESTED_BLOCKSIZE)  # nested absmax of each value
    normed = torch.where(per > 0, centered / per, -1.0)  # an all-equal block (absmax 0) takes code 0, as bitsandbytes does
    q = torch.bucketize(normed.double(), _on(normed.device, "dynamic_mid"), out_int32=True)
    return q.to(torch.uint8), nested_absmax, offset


def quantize_nf4_many(
    weights: Sequence[torch.Tensor] | torch.Tensor, *, blocksize: int = 64, double_quant: bool = True
) -> list[NF4Tensor]:
    """Quantize several weights at once (a list, or a tensor whose first dimension indexes them).

    The full blocks of all weights are scaled and coded in one pass; each weight keeps its own
    blocks (a partial last block is never merged with the next weight's) and its own offset.
    """
    stacked = isinstance(weights, torch.Tensor)
    items = list(weights.unbind(0)) if stacked else list(weights)
    for w in items:
        _check(w, blocksize)
    joined = weights if stacked and items[0].numel() % blocksize == 0 else None
    codes, scales = _quantize_runs([w.reshape(-1) for w in items], blocksize, joined)
    out = []
    for w, c, a in zip(items, codes, scales):
        if double_quant:
            q8, nested, offset = _nested_quantize(a)
            out.append(NF4Tensor(c, q8, tuple(w.shape), w.dtype, blocksize, nested, offset, _on(a.device, "dynamic")))
        else:
            out.append(NF4Tensor(c, a, tuple(w.shape), w.dtype, blocksize))
    return out


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """NF4 of ``w`` (float32, float16 or bfloat16, any shape) on its device; see the module docstring.

    The 4-bit codes and float scales equal bitsandbytes' ``quantize_4bit(w, blocksize=blocksize,
    quant_type="nf4", compress_statistics=double_quant)`` byte for byte.
    """
    return quantize_nf4_many([w], blocksize=blocksize, double_quant=double_quant)[0]


# ---------------------------------------------------------------------------------------------
# dequantize


def _pair_table(device: torch.device) -> torch.Tensor:
    """(256, 2) float32: the two NF4 values a byte holds, high nibble first."""
    return _on(device, "pairs")


def dequantize_nf4_many(qs: Sequence[NF4Tensor], *, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Dequantize several NF4 weights; one table lookup and one scaling for the whole list.

    Returns tensors of each weight's shape in ``dtype`` (default: each weight's own dtype).
    """
    if not qs:
        return []
    if not _joinable(qs):
        return [_dequantize_one(q, dtype) for q in qs]
    flat = _dequantize_flat(qs)
    out, pos = [], 0
    for q in qs:
        n = q.numel
        out.append(flat[pos : pos + n].view(q.shape).to(dtype or q.dtype))
        pos += n
    return out


def _joinable(qs: Sequence[NF4Tensor]) -> bool:
    """Whether the weights can be dequantized as one run of whole blocks."""
    first = qs[0]
    return all(q.numel % q.blocksize == 0 and q.blocksize == first.blocksize and q.device == first.device for q in qs)


def _dequantize_flat(qs: Sequence[NF4Tensor]) -> torch.Tensor:
    """The float32 products ``c[q_j] * absmax_b`` of all weights, back to back, ``(sum n,)``."""
    if not _joinable(qs):
        return torch.cat([_dequantize_one(q, torch.float32).reshape(-1) for q in qs])
    codes = torch.cat([q.codes.reshape(-1) for q in qs]) if len(qs) > 1 else qs[0].codes.reshape(-1)
    scales = [q.scales() for q in qs]
    scale = torch.cat(scales) if len(qs) > 1 else scales[0]
    values = torch.index_select(_pair_table(qs[0].device), 0, codes.int()).view(-1, qs[0].blocksize)  # (blocks, bs) float32
    return values.mul_(scale.unsqueeze(1)).view(-1)


def _dequantize_one(q: NF4Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    n = q.numel
    values = torch.index_select(_pair_table(q.device), 0, q.codes.reshape(-1).int()).view(-1)[:n]
    return _expand(values, q.scales(), q.blocksize).view(q.shape).to(dtype or q.dtype)


def dequantize_nf4(q: NF4Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight ``q`` stands for: ``float32(c[q_j] * absmax_b)`` cast to ``dtype`` (default: the
    original dtype); equal to bitsandbytes' ``dequantize_4bit`` bit for bit. ``dtype=torch.float32``
    gives the products before that cast."""
    return dequantize_nf4_many([q], dtype=dtype)[0]


# ---------------------------------------------------------------------------------------------
# bitsandbytes state-dict entries


def _state_json(q: NF4Tensor) -> dict:
    state = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": FLOAT_DTYPES[q.dtype], "shape": list(q.shape)}
    if q.double_quant:
        state.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32", nested_offset=float(q.offset.item()))
    return state


def to_state_dict(q: NF4Tensor, name: str) -> dict[str, torch.Tensor]:
    """The entries bitsandbytes' ``Linear4bit`` saves for weight ``name`` (e.g. ``"x.proj.weight"``).

    ``name``: uint8 ``(bytes, 1)``; ``name.absmax``; ``name.quant_map`` (the NF4 table); with double
    quantization ``name.nested_absmax`` and ``name.nested_quant_map``; and
    ``name.quant_state.bitsandbytes__nf4``: the JSON of the rest (UTF-8 bytes as uint8).
    """
    device = q.device
    out = {
        name: q.codes.reshape(-1, 1),
        f"{name}.absmax": q.absmax,
        f"{name}.quant_map": _on(device, "nf4").clone(),  # own copies: safetensors refuses shared tensors
    }
    if q.double_quant:
        out[f"{name}.nested_absmax"] = q.nested_absmax
        out[f"{name}.nested_quant_map"] = (q.nested_code if q.nested_code is not None else _on(device, "dynamic")).clone()
    text = json.dumps(_state_json(q)).encode("utf-8")
    out[f"{name}.quant_state.bitsandbytes__nf4"] = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(device)
    return out


def parse_state(raw: torch.Tensor, name: str) -> Any:
    """The JSON quantization state of weight ``name``, stored as the uint8 tensor ``raw``."""
    try:
        return json.loads(bytes(raw.reshape(-1).cpu().tolist()).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise FormatError(f"{name}: unreadable quant_state ({type(exc).__name__}: {str(exc)[:200]})") from None


def from_state_dict(tensors: Mapping[str, torch.Tensor], name: str) -> NF4Tensor:
    """Read weight ``name`` back from its bitsandbytes entries (see ``to_state_dict``)."""
    key = f"{name}.quant_state.bitsandbytes__nf4"
    missing = [k for k in (name, f"{name}.absmax", key) if k not in tensors]
    if missing:
        if f"{name}.quant_state.bitsandbytes__fp4" in tensors:
            raise FormatError(f"{name}: stored as bitsandbytes FP4; only NF4 is supported")
        raise FormatError(f"{name}: not an NF4 weight (missing {', '.join(missing)})")
    state = parse_state(tensors[key], name)
    try:
        shape = tuple(int(s) for s in state["shape"])
        blocksize = int(state["blocksize"])
        dtype = {v: k for k, v in FLOAT_DTYPES.items()}[str(state["dtype"])]
        quant_type = state.get("quant_type", "nf4")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"{name}: unreadable quant_state ({type(exc).__name__}: {str(exc)[:200]})") from None
    if quant_type != "nf4":
        raise FormatError(f"{name}: quant_type {quant_type!r}; only NF4 is supported")
    if blocksize not in BLOCKSIZES:
        raise FormatError(f"{name}: unsupported blocksize {blocksize}")
    codes, absmax = tensors[name].reshape(-1), tensors[f"{name}.absmax"].reshape(-1)
    n = 1
    for s in shape:
        n *= s
    blocks = -(-n // blocksize)
    if codes.dtype != torch.uint8:
        raise FormatError(f"{name}: codes stored as {codes.dtype} (bnb_4bit_quant_storage); only uint8 storage is supported")
    if codes.numel() != (n + 1) // 2 or absmax.numel() != blocks:
        raise FormatError(f"{name}: {codes.numel()} code bytes and {absmax.numel()} scales do not fit shape {list(shape)} with blocksize {blocksize}")
    quant_map = tensors.get(f"{name}.quant_map")
    if quant_map is not None and not torch.equal(quant_map.detach().float(), _on(quant_map.device, "nf4")):
        raise FormatError(f"{name}: quant_map is not the NF4 table")
    if "nested_offset" not in state:
        if absmax.dtype != torch.float32:
            raise FormatError(f"{name}: absmax is {absmax.dtype}, expected float32 without nested statistics")
        return NF4Tensor(codes, absmax, shape, dtype, blocksize)
    nested_key, map_key = f"{name}.nested_absmax", f"{name}.nested_quant_map"
    if nested_key not in tensors or map_key not in tensors:
        raise FormatError(f"{name}: double-quantized but {nested_key} or {map_key} is missing")
    nested_bs = int(state.get("nested_blocksize", NESTED_BLOCKSIZE))
    nested, nested_code = tensors[nested_key].reshape(-1).float(), tensors[map_key].reshape(-1).float()
    if absmax.dtype != torch.uint8 or nested.numel() != -(-blocks // nested_bs) or nested_code.numel() != 256:
        raise FormatError(f"{name}: nested statistics do not fit {blocks} blocks")
    offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32, device=codes.device)
    return NF4Tensor(codes, absmax, shape, dtype, blocksize, nested, offset, nested_code, nested_bs)
