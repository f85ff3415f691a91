"""LoraLinear and NF4Linear: exact at init, the fused autograd path against plain autograd,
deltas against the wrapped forward, QLoRA against the dequantized base."""

import pytest
import torch
from torch import nn

from adapterops.quant import dequantize_nf4, quantize_nf4
from adapterops.train import LoraLinear, NF4Linear, add_lora
from adapterops.train.layers import lora_dtype

from train_helpers import one_thread  # noqa: F401 (one_thread: an autouse fixture)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def randomize_b(layer: LoraLinear, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype) * 0.1)


def reference(layer: LoraLinear, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    """Plain autograd: ``base(x) + scale * (h @ A.T) @ B.T`` in float64."""
    base = layer.base
    W = base.dequantize(torch.float64) if isinstance(base, NF4Linear) else base.weight.double()
    h = x if h is None else h
    out = x.double() @ W.T + (0 if base.bias is None else base.bias.double())
    return out + (h.double() @ layer.lora_A.double().T) @ layer.lora_B.double().T * layer.scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_wrapped_layer_gives_the_base_output_exactly_at_init(device, dtype, bias):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias, device=device, dtype=dtype)
    x = torch.randn(2, 5, 24, device=device, dtype=dtype)
    expected = base(x)
    model = nn.Sequential(base)
    add_lora(model, rank=4, seed=0)
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_grad", [True, False])
def test_fused_forward_and_gradients_match_plain_autograd(bias, x_grad):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 12, bias=bias, dtype=torch.float64))
    handle = add_lora(model, rank=3, alpha=6, seed=0)
    layer = handle.modules["0"]
    randomize_b(layer)
    assert layer.fused
    x = torch.randn(4, 7, 16, dtype=torch.float64, requires_grad=x_grad)
    y = model(x)
    torch.testing.assert_close(y, reference(layer, x), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    wanted = [x, layer.lora_A, layer.lora_B] if x_grad else [layer.lora_A, layer.lora_B]
    got = torch.autograd.grad(y, wanted, g)
    expected = torch.autograd.grad(reference(layer, x), wanted, g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradients_reach_a_base_weight_left_trainable():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 6, dtype=torch.float64))
    layer = add_lora(model, rank=2, seed=0).modules["0"]
    randomize_b(layer)
    layer.base.weight.requires_grad_(True)
    layer.base.bias.requires_grad_(True)
    x = torch.randn(5, 8, dtype=torch.float64)
    wanted = [layer.base.weight, layer.base.bias]
    got = torch.autograd.grad(model(x).square().sum(), wanted)
    expected = torch.autograd.grad(reference(layer, x).square().sum(), wanted)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_dropout_applies_to_the_lora_branch_only():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 16, dtype=torch.float64))
    layer = add_lora(model, rank=4, dropout=0.5, seed=0).modules["0"]
    randomize_b(layer)
    x = torch.randn(6, 32, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    y = model(x)
    torch.manual_seed(7)
    h = layer.dropout(x)  # the same mask
    assert not torch.equal(h, x)
    torch.testing.assert_close(y, reference(layer, x, h))
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], g)
    torch.manual_seed(7)
    expected = torch.autograd.grad(reference(layer, x, layer.dropout(x)), [x, layer.lora_A, layer.lora_B], g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    model.eval()  # no dropout in eval mode
    torch.testing.assert_close(model(x), reference(layer, x))


def test_unfused_path_for_a_base_with_hooks_agrees():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(10, 8, dtype=torch.float64))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    layer = add_lora(model, rank=2, seed=0).modules["0"]
    randomize_b(layer)
    assert not layer.fused
    x = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(layer, x))
    assert seen == [torch.Size([3, 8])]  # the hook still runs


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_base_computes_in_bf16_with_float32_factors(device):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 32, device=device, dtype=torch.bfloat16))
    layer = add_lora(model, rank=8, seed=0).modules["0"]
    assert layer.lora_A.dtype == torch.float32 and lora_dtype(torch.bfloat16) == torch.float32
    randomize_b(layer)
    x = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
    y = model(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference(layer, x), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0


def test_autocast_runs_the_layer_in_the_autocast_dtype():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(32, 16))
    layer = add_lora(model, rank=4, seed=0).modules["0"]
    randomize_b(layer)
    x = torch.randn(3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference(layer, x), rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_lora_layer_delta_equals_what_the_wrapped_forward_adds(device):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(20, 12, device=device, dtype=torch.float64))
    layer = add_lora(model, rank=5, alpha=3, rslora=True, seed=0).modules["0"]
    randomize_b(layer)
    x = torch.randn(9, 20, device=device, dtype=torch.float64)
    added = model(x) - layer.base(x)
    torch.testing.assert_close(added, x @ layer.lora_layer().delta().T)


def test_lora_layer_is_a_copy():
    model = nn.Sequential(nn.Linear(6, 4))
    layer = add_lora(model, rank=2, seed=0).modules["0"]
    value = layer.lora_layer()
    before = value.A.clone()
    with torch.no_grad():
        layer.lora_A.add_(1.0)
    assert torch.equal(value.A, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_forward_equals_the_dequantized_base_forward(device, dtype):
    torch.manual_seed(8)
    dense = nn.Linear(128, 64, device=device, dtype=dtype)
    model = nn.Sequential(dense)
    q = quantize_nf4(dense.weight.detach())
    layer = add_lora(model, rank=4, quantize="nf4", seed=0).modules["0"]
    assert isinstance(layer.base, NF4Linear) and layer.fused
    assert torch.equal(layer.base.dequantize(), dequantize_nf4(q))
    randomize_b(layer)
    x = torch.randn(3, 128, device=device, dtype=dtype)
    y = model(x)
    W = dequantize_nf4(q)  # the base the forward must use: dequantized, in the weight's dtype
    expected = torch.nn.functional.linear(x, W, dense.bias) + (x.float() @ layer.lora_A.T @ layer.lora_B.T * layer.scale).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)
    y.float().sum().backward()
    assert layer.lora_A.grad is not None and all(b.grad is None for b in layer.base.buffers())


def test_qlora_gradients_match_plain_autograd_on_the_dequantized_weight():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(64, 32))
    layer = add_lora(model, rank=4, quantize="nf4", seed=0).modules["0"]
    randomize_b(layer)
    x = torch.randn(5, 64, requires_grad=True)
    g = torch.randn(5, 32)
    got = torch.autograd.grad(model(x), [x, layer.lora_A, layer.lora_B], g)
    expected = torch.autograd.grad(reference(layer, x).float(), [x, layer.lora_A, layer.lora_B], g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_nf4_linear_stores_four_bits_and_moves_with_the_module():
    dense = nn.Linear(256, 64)
    layer = NF4Linear.from_linear(dense)
    assert layer.codes.dtype == torch.uint8 and layer.codes.numel() == 256 * 64 // 2
    assert set(dict(layer.named_buffers())) >= {"codes", "absmax"}
    before = layer.dequantize()
    layer.to(torch.bfloat16)  # a dtype cast of the model leaves the quantized tensors alone
    assert layer.codes.dtype == torch.uint8 and layer.nested_absmax.dtype == torch.float32
    assert torch.equal(layer.dequantize(), before)
    layer.bias.data = dense.bias.detach().clone()
    torch.testing.assert_close(layer(torch.ones(1, 256)), torch.ones(1, 256) @ layer.dequantize().T + dense.bias)


def test_nf4_linear_casts_leave_its_storage_alone_when_it_is_held_as_parameters():
    layer = NF4Linear.from_linear(nn.Linear(256, 64))
    before = layer.dequantize()
    for name in ("codes", "absmax"):  # as FSDP2 holds them: frozen parameters instead of buffers
        tensor = layer._buffers.pop(name)
        layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
    layer.to(torch.bfloat16)
    assert layer.codes.dtype == torch.uint8 and isinstance(layer.codes, nn.Parameter) and not layer.codes.requires_grad
    assert torch.equal(layer.dequantize(), before)


def test_compiled_layer_adds_the_lora_branch_in_place():
    """Compiled forward and backward agree with eager and never copy a whole (tokens, out) or
    (tokens, in) GEMM output to add the LoRA branch to it (what functionalizing ``addmm_`` does)."""
    from torch.profiler import profile

    layer = LoraLinear(nn.Linear(24, 40, bias=False), rank=4, alpha=8)
    randomize_b(layer)
    x = torch.randn(2, 16, 24, requires_grad=True)

    def run(fn):
        layer.zero_grad()
        x.grad = None
        (fn(x) ** 2).sum().backward()
        return x.grad, layer.lora_A.grad, layer.lora_B.grad

    expected = [t.clone() for t in run(layer)]
    compiled = torch.compile(layer)
    run(compiled)
    with profile(record_shapes=True) as prof:
        got = run(compiled)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    copied = [e.input_shapes[0] for e in prof.events() if e.name in ("aten::copy_", "aten::addmm") and e.input_shapes]
    assert [32, 40] not in copied and [32, 24] not in copied, copied
