"""The LoRA-wrapped linear layer: a frozen base plus a trainable low-rank branch.

    y = base(x) + scale * (dropout(x) @ A.T) @ B.T        (Hu et al. 2021, LoRA, eq. 3)

``A`` is (r, in), ``B`` is (out, r), ``scale = lora_scale(alpha, r, rslora=...)``. The base is a
plain ``nn.Linear`` or an NF4-quantized one (``NF4Linear``, QLoRA: Dettmers et al. 2023), whose
weight is dequantized on the fly in forward and again in backward, never kept.

For these bases the forward and backward run as one autograd function: the LoRA output is
accumulated into the base GEMM's output (``addmm_`` with ``alpha=scale``), the input gradient of
both branches into one buffer, and nothing of size (tokens, out) is allocated besides the output
(compiled too: see ``_add_mm_``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import LoraLayer, lora_scale
from ..errors import AdapterOpsError
from ..quant.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

__all__ = ["LoraLinear", "NF4Linear", "lora_dtype", "autocast_dtype"]


def lora_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the trainable factors: float32 over 16-bit or quantized bases (optimizer precision),
    else the base's own float dtype."""
    if base_dtype in (torch.float32, torch.float64):
        return base_dtype
    return torch.float32


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (4 bits a weight, bitsandbytes layout).

    ``forward(x) = x @ dequantize(W).T + bias``. The quantized tensors (``codes``, ``absmax`` and,
    with double quantization, ``nested_absmax``, ``offset``, ``nested_code``) are buffers, so
    ``.to(device)`` moves them and ``state_dict`` holds them. Build it with ``from_linear``.
    """

    _TENSORS = ("codes", "absmax", "nested_absmax", "offset", "nested_code")

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise AdapterOpsError(f"NF4Linear needs a 2-D weight, got shape {list(weight.shape)}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.dtype = weight.dtype  # of the dense weight it stands for, and the default of dequantize()
        self.blocksize, self.nested_blocksize = weight.blocksize, weight.nested_blocksize
        for name in self._TENSORS:
            self.register_buffer(name, getattr(weight, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        _warm_nf4_tables(self.codes.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, blocksize: int = 64, double_quant: bool = True) -> NF4Linear:
        """Quantize ``linear``'s weight (on its device); the bias is kept as it is."""
        weight = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(weight, linear.bias)

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the quantized tensors; dtype casts (``model.half()``) leave them
        alone, as rounding a scale would change every weight of its block."""
        before = {n: t for n in self._TENSORS if (t := getattr(self, n)) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            store = self._buffers if name in self._buffers else self._parameters  # FSDP keeps them as frozen parameters
            new = store[name]
            if new.dtype != old.dtype:
                store[name] = old.to(new.device) if store is self._buffers else torch.nn.Parameter(old.to(new.device), requires_grad=False)
        _warm_nf4_tables(self.codes.device)
        return self

    @property
    def weight_nf4(self) -> NF4Tensor:
        """The NF4 value this layer holds (sharing the layer's buffers)."""
        return NF4Tensor(
            self.codes, self.absmax, (self.out_features, self.in_features), self.dtype, self.blocksize,
            self.nested_absmax, self.offset, self.nested_code, self.nested_blocksize,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (out, in) in ``dtype`` (default: the dtype it was quantized from)."""
        return dequantize_nf4(self.weight_nf4, dtype=dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.dequantize(dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nf4"


_WARM: set[torch.device] = set()


def _warm_nf4_tables(device: torch.device) -> None:
    """Build the NF4 code tables on ``device`` now: the NF4 module caches them on first use, a side
    effect ``torch.compile`` cannot trace inside a compiled forward."""
    if device.type == "meta" or device in _WARM:
        return
    dequantize_nf4(quantize_nf4(torch.linspace(-1, 1, 128, device=device)))
    _WARM.add(device)


class LoraLinear(nn.Module):
    """``base(x) + scale * (dropout(x) @ A.T) @ B.T`` with ``base`` frozen.

    ``init_A`` / ``init_B`` (buffers) hold the starting factors of a PiSSA layer, whose base is the
    residual ``W - scale * B0 @ A0``: its update relative to the original weight is
    ``scale * (B @ A - B0 @ A0)``.
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        rank: int,
        alpha: float,
        rslora: bool = False,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, NF4Linear)):
            raise AdapterOpsError(f"LoRA wraps nn.Linear or NF4Linear layers, got {type(base).__name__}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.rslora = int(rank), float(alpha), bool(rslora)
        self.scale = lora_scale(self.alpha, self.rank, rslora=self.rslora)
        weight_dtype = base.dtype if isinstance(base, NF4Linear) else base.weight.dtype
        device = _device_of(base)
        dtype = dtype or lora_dtype(weight_dtype)
        self.lora_A = nn.Parameter(torch.zeros(self.rank, self.in_features, device=device, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=device, dtype=dtype))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.register_buffer("init_A", None)
        self.register_buffer("init_B", None)
        self.group = None  # a fused.SharedInput this layer runs in, if any

    @property
    def fused(self) -> bool:
        """Whether forward runs as one fused function: for the bases whose forward it reproduces."""
        base = self.base
        return type(base) is NF4Linear or (type(base) is nn.Linear and not _has_hooks(base))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:  # evaluated with its siblings on the same input (train.fused)
            return self.group(self, x)
        h = self.dropout(x) if self.dropout is not None and self.training else None
        if self.fused:
            if type(self.base) is NF4Linear:
                return _LoraLinearFn.apply(x, h, None, self.base.bias, self.lora_A, self.lora_B, self.scale, self.base)
            return _LoraLinearFn.apply(x, h, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scale, None)
        out = self.base(x)
        h = x if h is None else h
        dtype = _compute_dtype(h)
        z = F.linear(h.to(dtype), self.lora_A.to(dtype))  # (..., in) @ (in, r) -> (..., r)
        return out + F.linear(z, self.lora_B.to(dtype)) * self.scale  # (..., r) @ (r, out) -> (..., out)

    def lora_layer(self) -> LoraLayer:
        """This layer's update of the original weight as an immutable LoraLayer (copies the factors).

        ``alpha`` is resolved so that ``alpha / rank`` is this layer's scale (rsLoRA included).
        PiSSA layers give the rank-2r difference from their starting point.
        """
        A, B = self.lora_A.detach().clone(), self.lora_B.detach().clone()
        if self.init_A is not None:
            A = torch.cat([A, self.init_A.to(A.dtype)], dim=0)  # (2r, in)
            B = torch.cat([B, -self.init_B.to(B.dtype)], dim=1)  # (out, 2r)
        return LoraLayer(A, B, self.scale * A.shape[0])

    def delta(self) -> torch.Tensor:
        """Dense update of the original weight (out, in), float32 at least."""
        return self.lora_layer().delta(torch.promote_types(self.lora_A.dtype, torch.float32))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}" + (", rslora" if self.rslora else "")


class _LoraLinearFn(torch.autograd.Function):
    """``y = x @ W.T + b + scale * (h @ A.T) @ B.T`` with ``h = x`` unless dropout gives another.

    Shapes: x, h (N, in); W (out, in); A (r, in); B (out, r); z = h @ A.T (N, r); y (N, out).
    Backward, with g = dL/dy and gz = scale * g @ B (N, r):
        dA = gz.T @ h;  dB = scale * g.T @ z;  dx = g @ W (+ gz @ A when h is x);  dh = gz @ A.
    Saved: h (in the compute dtype: the input itself when it already is), z, and the inputs
    A, B, W; a quantized base weight is dequantized again instead.
    """

    @staticmethod
    def forward(ctx, x, h, weight, bias, A, B, scale, quantized):
        dtype = _compute_dtype(x)
        in_features = x.shape[-1]
        xc = x if x.dtype == dtype else x.to(dtype)
        hc = xc if h is None else (h if h.dtype == dtype else h.to(dtype))
        x2, h2 = xc.reshape(-1, in_features), hc.reshape(-1, in_features)  # (N, in)
        W = weight.to(dtype) if quantized is None else quantized.dequantize(dtype)  # (out, in)
        if bias is None:
            out = torch.mm(x2, W.t())  # (N, in) @ (in, out) -> (N, out)
        else:
            out = torch.addmm(bias.to(dtype), x2, W.t())
        z = torch.mm(h2, A.to(dtype).t())  # (N, in) @ (in, r) -> (N, r)
        _add_mm_(out, z, B.to(dtype).t(), scale)  # += scale * (N, r) @ (r, out)
        ctx.scale, ctx.quantized, ctx.dtype = scale, quantized, dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.h_meta = None if h is None else (h.shape, h.dtype)
        ctx.bias_dtype = None if bias is None else bias.dtype
        keep_x = weight is not None and weight.requires_grad
        ctx.save_for_backward(xc if keep_x else None, hc, z, weight, A, B)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xc, hc, z, weight, A, B = ctx.saved_tensors
        need_x, need_h, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        dtype, scale = ctx.dtype, ctx.scale
        with torch.autocast(grad.device.type, enabled=False):
            Ac, Bc = A.to(dtype), B.to(dtype)
            g = grad.reshape(-1, grad.shape[-1]).to(dtype)  # (N, out)
            h2 = hc.reshape(-1, hc.shape[-1])  # (N, in)
            gz = torch.mm(g, Bc).mul_(scale)  # (N, out) @ (out, r) -> (N, r)
            dA = torch.mm(gz.t(), h2).to(A.dtype) if need_A else None  # (r, N) @ (N, in) -> (r, in)
            dB = torch.mm(g.t(), z).mul_(scale).to(B.dtype) if need_B else None  # (out, N) @ (N, r) -> (out, r)
            dx = dh = dW = db = None
            if need_x:
                W = weight.to(dtype) if ctx.quantized is None else ctx.quantized.dequantize(dtype)
                dx = torch.mm(g, W)  # (N, out) @ (out, in) -> (N, in)
                if ctx.h_meta is None:
                    _add_mm_(dx, gz, Ac, 1.0)  # += (N, r) @ (r, in)
                dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
            if need_h and ctx.h_meta is not None:
                dh = torch.mm(gz, Ac).reshape(ctx.h_meta[0]).to(ctx.h_meta[1])
            if need_w:
                dW = torch.mm(g.t(), xc.reshape(-1, xc.shape[-1])).to(weight.dtype)  # (out, N) @ (N, in) -> (out, in)
            if need_b:
                db = g.sum(0).to(ctx.bias_dtype)
        return dx, dh, dW, db, dA, dB, None, None


def _add_mm_in_place(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    out.addmm_(a, b, alpha=alpha)


# Under torch.compile an in-place ``addmm_`` on a fresh GEMM output is functionalized into an
# out-of-place ``addmm``, which first copies the whole (N, out) output: 2 copies per LoRA layer
# and step, 6% of a compiled step on an H200. As an opaque custom op that mutates ``out`` it
# stays in place (inductor re-inplaces it). Eager calls skip the op's dispatch overhead.
_add_mm_op = None
if hasattr(torch.library, "custom_op"):  # torch >= 2.4
    _add_mm_op = torch.library.custom_op("adapterops::add_mm_", mutates_args=("out",))(_add_mm_in_place)


def _add_mm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """``out += alpha * a @ b`` in place (one GEMM with beta = 1), compiled or not."""
    (_add_mm_op if _add_mm_op is not None and torch.compiler.is_compiling() else _add_mm_in_place)(out, a, b, alpha)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on ``device_type``, or None when autocast is off."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        enabled = torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for ``x``'s device, else ``x``'s own dtype."""
    dtype = autocast_dtype(x.device.type) if x.is_floating_point() else None
    return dtype or x.dtype


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
