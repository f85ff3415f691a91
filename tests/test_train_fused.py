"""Fused shared-input LoRA groups (q/k/v, gate/up) against the plain per-layer path: outputs and
gradients of the factors and the input, whole models included (float64, and bf16 autocast)."""

import pytest
import torch
from torch import nn

from adapterops.train import LoraLinear, add_lora, train_lora
from adapterops.train.fused import SharedInput, fuse_shared_inputs
from adapterops.train.loss import loss_fn
from adapterops.train.data import collate

from train_helpers import build_tiny_llama, one_thread  # noqa: F401 (one_thread: an autouse fixture)

transformers = pytest.importorskip("transformers")


def layers(outs=(12, 4, 4), ranks=(3, 2, 5), bias=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    made = []
    for out, rank in zip(outs, ranks):
        base = nn.Linear(10, out, bias=bias, dtype=dtype)
        base.requires_grad_(False)
        layer = LoraLinear(base, rank=rank, alpha=2.0 * rank + 1)
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g, dtype=dtype))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=dtype))
        made.append(layer)
    return made


def grads_of(members, x, use=None, weights=None):
    """Outputs and gradients of sum_i <w_i, member_i(x)> over the members in ``use`` (default all)."""
    for m in members:
        m.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    use = range(len(members)) if use is None else use
    outs = {i: members[i](x) for i in use}
    sum((weights[i] * outs[i]).sum() for i in use).backward()
    factor_grads = [(m.lora_A.grad, m.lora_B.grad) for m in members]
    return {i: o.detach() for i, o in outs.items()}, x.grad, factor_grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("use", [None, (0, 2), (1,)])
def test_group_equals_its_members_run_alone(bias, use):
    members = layers(bias=bias)
    x = torch.randn(2, 7, 10, dtype=torch.float64)
    weights = [torch.randn(2, 7, m.out_features, dtype=torch.float64) for m in members]
    plain = grads_of(members, x, use, weights)
    group = SharedInput(members)
    assert group.eligible()
    for m in members:
        m.group = group
    fused = grads_of(members, x, use, weights)
    for i in plain[0]:
        torch.testing.assert_close(fused[0][i], plain[0][i])
    torch.testing.assert_close(fused[1], plain[1])
    for (a, b), (a0, b0) in zip(fused[2], plain[2]):
        if a0 is None:  # a member not used: no gradient either way
            assert a is None or not a.abs().any()
            continue
        torch.testing.assert_close(a, a0)
        torch.testing.assert_close(b, b0)


def test_a_member_called_on_another_input_computes_afresh():
    members = layers()
    expected = [m(torch.ones(3, 10, dtype=torch.float64)) for m in members]
    group = SharedInput(members)
    for m in members:
        m.group = group
    members[0](torch.zeros(3, 10, dtype=torch.float64))  # leaves k and v of a zero input waiting
    for m, want in zip(members, expected):
        torch.testing.assert_close(m(torch.ones(3, 10, dtype=torch.float64)), want)


def test_fuse_groups_q_k_v_and_gate_up_and_undo():
    model = build_tiny_llama(0, vocab_size=61)
    handle = add_lora(model, rank=4)
    undo = fuse_shared_inputs(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.group is attn.k_proj.group is attn.v_proj.group is not None
    assert mlp.gate_proj.group is mlp.up_proj.group is not None and mlp.gate_proj.group is not attn.q_proj.group
    assert attn.o_proj.group is None and mlp.down_proj.group is None
    undo()
    assert all(m.group is None for m in handle.modules.values())


def test_layers_with_dropout_or_a_partial_group_stay_alone():
    model = build_tiny_llama(0, vocab_size=61)
    add_lora(model, rank=4, dropout=0.1)
    fuse_shared_inputs(model)
    assert all(m.group is None for m in model.modules() if isinstance(m, LoraLinear))
    model = build_tiny_llama(0, vocab_size=61)
    add_lora(model, targets=["q_proj", "v_proj"], rank=4)  # k_proj untouched: no complete group
    fuse_shared_inputs(model)
    assert all(m.group is None for m in model.modules() if isinstance(m, LoraLinear))


def model_loss_and_grads(fuse, *, dtype=torch.float64, autocast=False):
    model = build_tiny_llama(0, vocab_size=61, attention_bias=True)
    handle = add_lora(model, rank=4, seed=0)
    with torch.no_grad():
        for layer in handle.modules.values():
            layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    model.to(dtype)  # after the init: the same values in every dtype
    undo = fuse_shared_inputs(model) if fuse else None
    batch = collate([{"input_ids": list(range(1, 20)), "labels": list(range(1, 20))},
                     {"input_ids": list(range(5, 17)), "labels": list(range(5, 17))}])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(model)(batch, 1.0)
    loss.backward()
    if undo is not None:
        assert sum(m.group is not None for m in handle.modules.values()) == 10  # 2 layers x (q, k, v, gate, up)
        undo()
    return loss.detach(), {n: (m.lora_A.grad, m.lora_B.grad) for n, m in handle.modules.items()}


def test_fused_model_equals_plain_model():
    plain, fused = model_loss_and_grads(False), model_loss_and_grads(True)
    torch.testing.assert_close(fused[0], plain[0])
    for name, (a, b) in plain[1].items():
        torch.testing.assert_close(fused[1][name][0], a)
        torch.testing.assert_close(fused[1][name][1], b)


def test_fused_under_bf16_autocast_is_as_close_to_float64_as_plain():
    """bf16 rounds the two layouts differently (the fused GEMMs sum in float32 what the plain path
    adds up in bf16), so both are held against the float64 result: the fused error is no larger."""
    exact = model_loss_and_grads(False)
    errors = {}
    for fuse in (False, True):
        loss, grads = model_loss_and_grads(fuse, dtype=torch.float32, autocast=True)
        flat = torch.cat([torch.cat([g.flatten() for g in pair]) for pair in grads.values()]).double()
        want = torch.cat([torch.cat([g.flatten() for g in pair]) for pair in exact[1].values()])
        errors[fuse] = (float(abs(loss.double() - exact[0]) / abs(exact[0])), float((flat - want).norm() / want.norm()))
    assert errors[True][0] < 1e-2 and errors[True][1] < 5e-2
    assert errors[True][1] <= 1.25 * errors[False][1]


def test_train_lora_fused_and_plain_runs_agree():
    data = [{"input_ids": list(range(i, i + 9))} for i in range(1, 9)]
    results = []
    for fuse in (False, True):
        model = build_tiny_llama(0, vocab_size=61).double()
        add_lora(model, rank=4, seed=0)
        results.append(train_lora(model, data, steps=3, batch_size=4, lr=1e-2, fuse=fuse))
        assert all(m.group is None for m in model.modules() if isinstance(m, LoraLinear))  # undone after the run
    assert results[0].losses == pytest.approx(results[1].losses, rel=1e-10)
    for name, layer in results[0].adapter.items():
        torch.testing.assert_close(results[1].adapter[name].B, layer.B)
