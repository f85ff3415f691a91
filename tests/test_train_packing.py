"""Packing without cross-talk: whole examples per packed row, position ids restarting at each one,
attention kept to each example. The oracle is the examples run one by one: loss and gradients of
a packed batch must equal theirs, on a tiny Llama (float64) and on SmolLM2-135M."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterops.errors import AdapterOpsError, FormatError
from adapterops.train import IGNORE, add_lora, collate, pack, train_lora
from adapterops.train.attention import VARLEN, packed_attention, varlen_attention
from adapterops.train.loss import loss_fn

from train_helpers import build_tiny_llama, one_thread  # noqa: F401 (one_thread: an autouse fixture)

transformers = pytest.importorskip("transformers")

VOCAB = 61


def examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        labels = [t if torch.rand((), generator=g) < 0.7 else IGNORE for t in ids]
        out.append({"input_ids": ids, "labels": labels})
    return out


def lora_model(seed=0, *, dtype=torch.float64, **config):
    model = build_tiny_llama(seed, vocab_size=VOCAB, **config).to(dtype)
    handle = add_lora(model, rank=4, seed=seed)
    with torch.no_grad():  # B = 0 at init would hide the LoRA gradients of A
        for layer in handle.modules.values():
            layer.lora_B.normal_(0, 0.1)
    return model, handle


def loss_and_grads(model, handle, batches, fused):
    compute = loss_fn(model, fused=fused)
    model.zero_grad(set_to_none=True)
    total = sum(compute(b, 1.0) for b in batches)
    total.backward()
    grads = {n: (m.lora_A.grad.clone(), m.lora_B.grad.clone()) for n, m in handle.modules.items()}
    return total.detach(), grads


def assert_same(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    for name in a[1]:
        torch.testing.assert_close(a[1][name][0], b[1][name][0], **tol)
        torch.testing.assert_close(a[1][name][1], b[1][name][1], **tol)


# --- data ------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(2, 20), min_size=1, max_size=25), st.integers(20, 48))
def test_pack_keeps_whole_examples_within_max_len(lengths, max_len):
    data = examples(lengths)
    packed = pack(data, max_len)
    assert all(len(p["input_ids"]) <= max_len and sum(p["lengths"]) == len(p["input_ids"]) for p in packed)
    assert sorted(n for p in packed for n in p["lengths"]) == sorted(lengths)
    pieces = []
    for p in packed:  # cut each row back into its examples
        at = 0
        for n in p["lengths"]:
            pieces.append((tuple(p["input_ids"][at:at + n]), tuple(p["labels"][at:at + n])))
            at += n
    original = sorted((tuple(e["input_ids"]), (IGNORE,) + tuple(e["labels"][1:])) for e in data)
    assert sorted(pieces) == original  # first label of each example ignored, nothing else changed
    # best fit: no two rows could be merged into one
    fills = sorted(len(p["input_ids"]) for p in packed)
    assert len(fills) < 2 or fills[0] + fills[1] > max_len


def test_pack_refuses_examples_longer_than_max_len():
    with pytest.raises(FormatError, match="example 1 has 9 tokens, more than max_len=8"):
        pack(examples([3, 9]), 8)


def test_collate_restarts_positions_and_gives_segment_offsets():
    rows = [{"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE, 2, 3, IGNORE, 5], "lengths": [3, 2]},
            {"input_ids": [6, 7], "labels": [IGNORE, 7], "lengths": [2]}]
    batch = collate(rows, pad_id=0, pad_to=6)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]]
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5, 6, 8, 12]  # the padding tails are segments too
    assert batch["cu_seq_lens"].dtype == torch.int32
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]
    assert "position_ids" not in collate([{"input_ids": [1, 2], "labels": [1, 2]}])


# --- exactness: packed == one by one ---------------------------------------------------------

LENGTHS = [7, 3, 12, 5, 9, 2, 6]


def one_by_one(data):
    return [collate([e]) for e in data]


@pytest.mark.parametrize("attn", ["sdpa", "eager", VARLEN])
@pytest.mark.parametrize("fused", [False, True])
def test_packed_batch_equals_examples_one_by_one_tiny_llama(attn, fused):
    data = examples(LENGTHS)
    model, handle = lora_model()
    if attn == "eager":
        model.config._attn_implementation = "eager"
    reference = loss_and_grads(model, handle, one_by_one(data), fused)
    batch = collate(pack(data, 16), pad_to=16)
    assert batch["input_ids"].shape[0] < len(data)  # really packed
    with packed_attention(model, enabled=attn == VARLEN) as switched:
        assert switched == (attn == VARLEN)
        packed = loss_and_grads(model, handle, [batch], fused)
    # eager attention takes its softmax in float32 even for float64 inputs: float32 tolerance there
    assert_same(packed, reference, **({"rtol": 1e-5, "atol": 1e-7} if attn == "eager" else {"rtol": 1e-9, "atol": 1e-11}))
    assert model.config._attn_implementation == ("eager" if attn == "eager" else "sdpa")  # restored


def test_without_position_ids_the_examples_would_cross_talk():
    """The check above can fail: the same rows with plain causal attention give another loss."""
    data = examples(LENGTHS)
    model, handle = lora_model()
    reference = loss_and_grads(model, handle, one_by_one(data), False)
    batch = collate(pack(data, 16), pad_to=16)
    crossed = {k: v for k, v in batch.items() if k not in ("position_ids", "cu_seq_lens")}
    assert not torch.allclose(loss_and_grads(model, handle, [crossed], False)[0], reference[0], rtol=1e-6)


def test_varlen_attention_matches_sdpa_on_a_block_diagonal_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 10, 8, dtype=torch.float64), torch.randn(2, 2, 10, 8, dtype=torch.float64), torch.randn(2, 2, 10, 8, dtype=torch.float64)
    cu = torch.tensor([0, 4, 10, 13, 20], dtype=torch.int32)
    seg = torch.repeat_interleave(torch.arange(4), torch.diff(cu)).reshape(2, 10)
    t = torch.arange(10)
    mask = (seg[:, :, None] == seg[:, None, :]) & (t[None, :, None] >= t[None, None, :])  # (B, T, T)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask[:, None], scale=0.3).transpose(1, 2)
    got, _ = varlen_attention(torch.nn.Module(), q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=10)
    torch.testing.assert_close(got, want)


def test_train_lora_packed_step_equals_unpacked_step():
    data = examples(LENGTHS)
    runs = {}
    for packing in (False, True):
        model, handle = lora_model(dtype=torch.float64)
        result = train_lora(model, data, steps=1, batch_size=len(data), packing=packing, max_len=16, max_grad_norm=None)
        runs[packing] = result
    torch.testing.assert_close(runs[True].losses[0], runs[False].losses[0], rtol=1e-9, atol=0)
    for name, layer in runs[False].adapter.items():
        torch.testing.assert_close(runs[True].adapter[name].A, layer.A, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(runs[True].adapter[name].B, layer.B, rtol=1e-7, atol=1e-9)
    assert runs[True].tokens == runs[False].tokens == sum(LENGTHS)  # real tokens only


def test_packing_needs_max_len_and_a_model_that_takes_position_ids():
    model, _ = lora_model()
    with pytest.raises(AdapterOpsError, match="packing needs max_len"):
        train_lora(model, examples([4, 5]), steps=1, packing=True)

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB)

        def forward(self, input_ids):
            return self.out(self.emb(input_ids))

    plain = Plain()
    add_lora(plain, targets=["out"], rank=2)
    with pytest.raises(AdapterOpsError, match="takes no position_ids"):
        train_lora(plain, examples([4, 5]), steps=1, packing=True, max_len=16)


@pytest.mark.slow
def test_packed_batch_equals_examples_one_by_one_smollm2(smollm2_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    handle = add_lora(model, targets=r"model\.layers\.2\d\.self_attn\.(q|v)_proj", rank=4, seed=0)
    with torch.no_grad():
        for layer in handle.modules.values():
            layer.lora_B.normal_(0, 0.01)
    data = examples([9, 4, 14, 6], seed=1)
    reference = loss_and_grads(model, handle, one_by_one(data), True)
    batch = collate(pack(data, 20), pad_to=20)
    assert batch["input_ids"].shape[0] == 2
    for varlen in (False, True):
        with packed_attention(model, enabled=varlen):
            assert_same(loss_and_grads(model, handle, [batch], True), reference, rtol=2e-4, atol=2e-6)
