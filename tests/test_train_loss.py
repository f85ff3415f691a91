"""The fused output head + cross entropy against the plain logits path: same loss, same gradients."""

import pytest
import torch
from torch import nn

from adapterops.train import IGNORE, add_lora, train_lora
from adapterops.train import loss as loss_module
from adapterops.train.loss import fused_head_supported, loss_fn

from train_helpers import build_tiny_llama, one_thread  # noqa: F401 (one_thread: an autouse fixture)

transformers = pytest.importorskip("transformers")


def tiny_llama(tied: bool, dtype=torch.float64):
    model = build_tiny_llama(vocab_size=80, intermediate_size=48, tie_word_embeddings=tied, initializer_range=0.2)
    return model.to(dtype)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 80, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels = ids.clone()
    labels[:, :3] = IGNORE
    labels[2, 7:] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk_bytes", [None, 4 * 80 * 4])  # one chunk, or chunks of 4 tokens
def test_fused_loss_and_gradients_equal_the_plain_path(tied, chunk_bytes, monkeypatch):
    if chunk_bytes:
        monkeypatch.setattr(loss_module, "_CHUNK_BYTES", chunk_bytes)
    model = tiny_llama(tied)
    handle = add_lora(model, rank=4, seed=0)
    with torch.no_grad():
        for layer in handle.modules.values():
            layer.lora_B.normal_(std=0.1)
    assert fused_head_supported(model)
    params = list(handle.parameters())
    b = batch()
    plain = loss_fn(model, fused=False)(b, 0.25)
    fused = loss_fn(model, fused=True)(b, 0.25)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    # the reference, computed independently of both
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    ce = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 80), b["labels"][:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(fused, 0.25 * ce, rtol=1e-12, atol=1e-12)
    for g_fused, g_plain in zip(torch.autograd.grad(fused, params), torch.autograd.grad(plain, params)):
        torch.testing.assert_close(g_fused, g_plain, rtol=1e-9, atol=1e-12)


def test_fused_loss_under_bf16_autocast_is_close():
    model = tiny_llama(False, torch.float32)
    add_lora(model, rank=4, seed=0)
    b = batch(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = loss_fn(model, fused=False)(b, 1.0)
        fused = loss_fn(model, fused=True)(b, 1.0)
    torch.testing.assert_close(fused, plain, rtol=1e-2, atol=1e-2)


def test_training_with_and_without_the_fused_head_agrees():
    data = [{"input_ids": batch(s)["input_ids"][0].tolist()} for s in range(8)]

    def go(fused):
        model = tiny_llama(True, torch.float32)
        add_lora(model, rank=4, seed=0)
        return train_lora(model, data, lr=1e-2, steps=4, batch_size=4, fused_loss=fused).losses

    torch.testing.assert_close(go(True), go(False), rtol=1e-4, atol=1e-5)


def test_fused_head_is_used_only_where_it_is_exact():
    model = tiny_llama(False)
    add_lora(model, targets=["lm_head", "q_proj"], rank=2)
    assert not fused_head_supported(model)  # the head is trained
    assert not fused_head_supported(nn.Sequential(nn.Linear(2, 2)))
    gemma_like = tiny_llama(False)
    gemma_like.config.model_type = "gemma2"  # soft-capped logits: not lm_head(hidden) alone
    assert not fused_head_supported(gemma_like)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_loss_and_gradient_compiled_and_eager_equal_the_dense_reference(dtype):
    """The per-chunk softmax and gradient, eager and through torch.compile (what a compiled run
    uses), against float64 autograd on the same logits."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(9, 50, generator=g) * 4).to(dtype)
    labels = torch.randint(0, 50, (9,), generator=g)
    labels[[1, 6]] = IGNORE
    scale = torch.tensor(0.37)
    x = logits.double().requires_grad_()
    keep = labels != IGNORE
    ref = torch.nn.functional.cross_entropy(x[keep], labels[keep], reduction="sum")
    ref.backward()
    for fn in (loss_module.chunk_loss_grad, loss_module.compiled_chunk_loss_grad()):
        loss, grad = fn(logits.clone(), labels, scale)
        assert grad.dtype == dtype
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-6)
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-3}
        torch.testing.assert_close(grad.double(), (x.grad * 0.37).to(dtype).double(), **tol)
        assert not grad[~keep].any()
        loss_only, none = fn(logits.clone(), labels, scale, False)  # evaluation: the loss, no gradient pass
        assert none is None and torch.equal(loss_only, loss)


def test_a_compiled_run_uses_the_compiled_chunk(monkeypatch):
    calls = []
    monkeypatch.setattr(loss_module, "compiled_chunk_loss_grad", lambda: lambda *a: calls.append(1) or loss_module.chunk_loss_grad(*a))
    model = tiny_llama(False, torch.float32)
    add_lora(model, rank=2, seed=0)
    b = batch()
    loss_fn(model, compile=True)(b, 1.0)
    assert calls
    calls.clear()
    loss_fn(model)(b, 1.0)
    assert not calls
