"""train_lora on tiny models: reproducible, resumes exactly, the schedule, LoRA+, accumulation,
evaluation, gradient checkpointing, checkpoints that are safetensors + JSON only."""

import json
import math
import re

import pytest
import torch
from torch import nn

from adapterops.errors import AdapterOpsError, FormatError
from adapterops.train import IGNORE, add_lora, evaluate, lr_at, train_lora

from train_helpers import VOCAB, dataset, one_thread, tiny_llama  # noqa: F401 (one_thread: an autouse fixture)

transformers = pytest.importorskip("transformers")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
def run(device="cpu", steps=8, **kwargs):
    model = tiny_llama(device=device)
    add_lora(model, rank=4, alpha=8, dropout=0.1, seed=1)
    options = dict(lr=5e-3, batch_size=4, steps=steps, seed=2, warmup=2)
    options.update(kwargs)
    return model, train_lora(model, dataset(), **options)


def test_lr_schedule_is_linear_warmup_then_cosine():
    assert [lr_at(s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 10, 4) == 1.0
    assert lr_at(7, 10, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert lr_at(0, 1, 0) == 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_runs_give_the_same_losses(device):
    _, a = run(device)
    _, b = run(device)
    assert len(a.losses) == 8
    if device == "cpu":
        assert a.losses == b.losses
        assert all(torch.equal(a.adapter[n].A, b.adapter[n].A) for n in a.adapter)
    else:  # compiled CUDA kernels may sum in another order from one compilation to the next (seen: 1e-7 relative)
        torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=0)
        for n in a.adapter:
            torch.testing.assert_close(a.adapter[n].A, b.adapter[n].A, rtol=1e-4, atol=1e-6)
    _, c = run(device, seed=3)
    assert c.losses != a.losses


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_continues_exactly(tmp_path, device, grad_accum):
    _, whole = run(device, steps=9, grad_accum=grad_accum)
    _, first = run(device, steps=9, grad_accum=grad_accum, checkpoint_dir=tmp_path, save_every=2,
                   callback=lambda info: info["step"] < 5)
    assert first.losses == whole.losses[:5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step-{s:08d}" for s in (2, 4, 5)]
    for saved in tmp_path.iterdir():  # only safetensors and JSON
        assert sorted(f.name for f in saved.iterdir()) == ["lora.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    model = tiny_llama(device=device)
    add_lora(model, rank=4, alpha=8, dropout=0.1, seed=99)  # a different init: the checkpoint replaces it
    resumed = train_lora(model, dataset(), lr=5e-3, batch_size=4, steps=9, seed=2, warmup=2, grad_accum=grad_accum,
                         resume_from=tmp_path / "step-00000004")
    assert resumed.resumed_from == 4 and resumed.steps == 9
    assert resumed.losses == whole.losses
    assert all(torch.equal(resumed.adapter[n].B, whole.adapter[n].B) for n in whole.adapter)


def test_resume_from_the_parent_directory_takes_the_latest(tmp_path):
    run(steps=4, checkpoint_dir=tmp_path, save_every=1, callback=lambda info: info["step"] < 3)
    model = tiny_llama()
    add_lora(model, rank=4, alpha=8, dropout=0.1)
    result = train_lora(model, dataset(), lr=5e-3, batch_size=4, steps=4, seed=2, warmup=2, resume_from=tmp_path)
    assert result.resumed_from == 3


def test_resume_with_other_settings_or_layers_is_refused(tmp_path):
    run(steps=3, checkpoint_dir=tmp_path)
    model = tiny_llama()
    add_lora(model, rank=4, alpha=8, dropout=0.1)
    with pytest.raises(AdapterOpsError, match=re.escape("changed settings (lr 0.005 -> 0.001)")):
        train_lora(model, dataset(), lr=1e-3, batch_size=4, steps=3, seed=2, warmup=2, resume_from=tmp_path)
    other = tiny_llama()
    add_lora(other, targets=["q_proj"], rank=4, alpha=8)
    with pytest.raises(FormatError, match="LoRA layers differ from the model's"):
        train_lora(other, dataset(), lr=5e-3, batch_size=4, steps=3, seed=2, warmup=2, resume_from=tmp_path)
    with pytest.raises(FormatError, match="no checkpoint in it"):
        train_lora(other, dataset(), resume_from=tmp_path / "step-00000003" / ".." / "..")



def _edited(saved, to, *, state=None, **files):
    """A copy of checkpoint ``saved`` at ``to`` with ``state(dict)`` applied to state.json and
    ``files[name](tensors)`` to NAME.safetensors."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(saved, to)
    if state is not None:
        meta = json.loads((to / "state.json").read_text())
        state(meta)
        (to / "state.json").write_text(json.dumps(meta))
    for name, edit in files.items():
        save_file(edit(load_file(to / f"{name}.safetensors")), to / f"{name}.safetensors")
    return to


EDITS = {
    "step 'x' is not a whole number": {"state": lambda m: m.update(step="x")},
    "step 9 is not a whole number of steps between 0 and the run's 3": {"state": lambda m: m.update(step=9)},
    "losses is not a list of numbers": {"state": lambda m: m.update(losses=["x"])},
    "eval_losses is not a list of [step, loss] pairs": {"state": lambda m: m.update(eval_losses=[[1]])},
    "optimizer is not an object with param_groups": {"state": lambda m: m["optimizer"].pop("param_groups")},
    "betas are not two numbers": {"state": lambda m: m["optimizer"]["param_groups"][0].update(betas=5)},
    "lr, weight_decay or eps is not a number": {"state": lambda m: m["optimizer"]["param_groups"][0].update(lr="fast")},
    "settings is not an object": {"state": lambda m: m.update(settings=[])},
    "holds 'nodot', not keyed <parameter index>.<name>": {"optimizer": lambda t: {**t, "nodot": torch.zeros(1)}},
    "0.exp_avg_sq holds NaN or Inf": {"optimizer": lambda t: {**t, "0.exp_avg_sq": t["0.exp_avg_sq"] * float("nan")}},
    "lora_A holds NaN or Inf": {"lora": lambda t: {k: v * float("nan") if k.endswith("lora_A") else v for k, v in t.items()}},
    "rng.safetensors does not hold generator states": {"rng": lambda t: {"cpu": t["cpu"].float()}},
    "rng.safetensors does not fit this torch's generators": {"rng": lambda t: {"cpu": t["cpu"][:3]}},
    "0.exp_avg is [3, 3] torch.float32 for a parameter of": {"optimizer": lambda t: {**t, "0.exp_avg": torch.zeros(3, 3)}},
    "0.step is [5] torch.float32": {"optimizer": lambda t: {**t, "0.step": torch.zeros(5)}},
    "its parameters hold different entries": {"optimizer": lambda t: {k: v for k, v in t.items() if k != "1.exp_avg"}},
    "torch.int64, the model's is": {"lora": lambda t: {k: v.long() if k.endswith("lora_A") else v for k, v in t.items()}},
}


def test_an_edited_checkpoint_is_one_error_naming_what_is_wrong(tmp_path):
    """Resuming reads a state.json and three safetensors files: each field a run could not have
    written is refused by name before any of it is used (not a KeyError, not a torch error mid-step)."""
    run(steps=3, checkpoint_dir=tmp_path / "ck", save_every=3)
    saved = tmp_path / "ck" / "step-00000003"
    for i, (words, edit) in enumerate(EDITS.items()):
        edited = _edited(saved, tmp_path / f"edit{i}", **edit)
        model = tiny_llama()
        add_lora(model, rank=4, alpha=8, dropout=0.1)
        with pytest.raises(FormatError, match=re.escape(words)):
            train_lora(model, dataset(), lr=5e-3, batch_size=4, steps=3, seed=2, warmup=2, resume_from=edited)

def test_loss_falls_and_eval_is_reported():
    model = tiny_llama().eval()
    add_lora(model, rank=8, seed=0)
    data = dataset(32)
    before = evaluate(model, data[24:])
    result = train_lora(model, data[:24], data[24:], lr=2e-2, batch_size=8, steps=30, eval_every=10, seed=0)
    assert [s for s, _ in result.eval_losses] == [10, 20, 30]
    assert result.eval_loss < 0.3 * before and result.final_loss < 0.3 * result.losses[0]
    assert result.eval_loss == pytest.approx(evaluate(model, data[24:]), rel=1e-6)
    assert result.tokens == sum(len(e["input_ids"]) for e in data[:24]) * 10  # 3 batches an epoch, 10 epochs
    assert result.tokens_per_second > 0
    assert not model.training  # trained in train mode, handed back in eval mode as it came


def test_throughput_is_steady_state_with_the_first_step_timed_apart():
    model = tiny_llama()
    add_lora(model, rank=2, seed=0)
    data = dataset(8)
    seen = []
    result = train_lora(model, data, lr=1e-3, batch_size=4, steps=4, seed=0, callback=seen.append)
    one = train_lora(model, data, lr=1e-3, batch_size=4, steps=1, seed=0)  # the same first batch (the seed picks it)
    assert result.steady_tokens == result.tokens - one.tokens > 0
    assert result.warmup_seconds > 0 and result.steady_seconds > 0
    assert result.seconds == pytest.approx(result.warmup_seconds + result.steady_seconds)
    assert result.tokens_per_second == pytest.approx(result.steady_tokens / result.steady_seconds)
    assert seen[-1]["tokens_per_second"] == pytest.approx(result.tokens_per_second)
    assert seen[0]["warmup_seconds"] == result.warmup_seconds
    summary = result.to_dict()
    assert summary["warmup_seconds"] == round(result.warmup_seconds, 3)
    assert one.tokens_per_second  # nothing after warm-up: its own rate == pytest.approx(one.tokens / one.seconds)


def test_progress_line_shows_the_steady_rate_and_the_warm_up_apart():
    import io

    from adapterops.train.progress import TrainProgress

    stream = io.StringIO()
    bar = TrainProgress(2, enabled=True, stream=stream)
    bar.update({"step": 1, "loss": 2.5, "lr": 1e-4, "tokens_per_second": 900.0, "warmup_seconds": 12.3})
    bar.update({"step": 2, "loss": 2.0, "lr": 1e-4, "tokens_per_second": 75_000.0, "warmup_seconds": 12.3})
    bar.close()
    last = stream.getvalue().strip().splitlines()[-1]
    assert "step 2/2  loss 2.0000" in last and "75,000 tok/s  warm-up 12.3s" in last


def test_evaluate_is_the_token_weighted_mean():
    model = tiny_llama().eval()
    add_lora(model, rank=2)
    data = dataset(5)
    total, count = 0.0, 0
    for e in data:
        with torch.no_grad():
            logits = model(torch.tensor([e["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(e["labels"][1:])
        total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum"))
        count += int((labels != IGNORE).sum())
    assert evaluate(model, data, batch_size=2) == pytest.approx(total / count, rel=1e-5)


def test_gradient_accumulation_matches_one_big_batch():
    def nodrop(**kw):  # (dropout masks would differ between the two layouts)
        model = tiny_llama()
        add_lora(model, rank=4, alpha=8, seed=1)
        return train_lora(model, dataset(), lr=5e-3, steps=4, seed=2, **kw)
    a, b = nodrop(batch_size=4, grad_accum=1), nodrop(batch_size=2, grad_accum=2)
    assert b.losses == pytest.approx(a.losses, rel=1e-4)
    for n in a.adapter:
        torch.testing.assert_close(b.adapter[n].B, a.adapter[n].B, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("ratio", [None, 16.0])
def test_lora_plus_trains_b_at_lr_times_ratio(ratio):
    model = tiny_llama()
    add_lora(model, rank=4, seed=0)
    result = train_lora(model, dataset(), lr=1e-3, lr_ratio=ratio, steps=1, batch_size=4, max_grad_norm=None)
    # Adam's first step moves every parameter with a non-zero gradient by lr; A's gradient is 0 (B = 0).
    for layer in result.adapter.values():
        assert layer.B.abs().max().item() == pytest.approx(1e-3 * (ratio or 1.0), rel=1e-3)


def test_gradient_checkpointing_gives_the_same_losses_and_is_turned_off_after():
    def go(gc):
        model = tiny_llama()
        add_lora(model, rank=4, seed=1)
        return model, train_lora(model, dataset(), lr=5e-3, steps=3, batch_size=4, gradient_checkpointing=gc)
    model, with_gc = go(True)
    _, without = go(False)
    assert with_gc.losses == pytest.approx(without.losses, rel=1e-5)
    assert not model.is_gradient_checkpointing


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, VOCAB)

    def forward(self, ids):  # a bigram model: no attention mask, returns logits
        return self.head(self.mlp(self.embed(ids)))


def test_any_module_that_maps_ids_to_logits_trains():
    model = Toy()
    add_lora(model, targets=["mlp.0", "mlp.2", "head"], rank=8, seed=0)
    result = train_lora(model, dataset(), lr=2e-2, steps=20, batch_size=8)
    assert result.final_loss < 0.7 * result.losses[0]
    with pytest.raises(AdapterOpsError, match="has no gradient_checkpointing_enable"):
        train_lora(model, dataset(), steps=1, gradient_checkpointing=True)


def test_jsonl_paths_need_a_tokenizer(tmp_path, smollm2_dir):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Q{i}:", "completion": f" A{i}"}) for i in range(4)), encoding="utf-8")
    model = tiny_llama()
    model.resize_token_embeddings(49152)
    add_lora(model, targets=["q_proj"], rank=2)
    with pytest.raises(AdapterOpsError, match="pass tokenizer="):
        train_lora(model, path, steps=1)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    result = train_lora(model, path, path, tokenizer=tok, steps=2, batch_size=2, max_len=16)
    assert result.steps == 2 and result.eval_loss is not None


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"lr": 0}, "lr must be a positive finite number"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"batch_size": 0, "grad_accum": 0}, "batch_size must be a positive integer, got 0; grad_accum must be"),
        ({"warmup": 1.5}, "warmup must be a step count"),
        ({"save_every": 2}, "save_every needs checkpoint_dir"),
        ({"lr_ratio": -1.0}, "lr_ratio must be positive"),
        ({"epochs": math.inf}, "epochs must be a positive finite number"),
        ({"lr_ratio": 1e308}, "lr * lr_ratio = 2e+304 does not fit float32"),
    ],
)
def test_bad_settings_are_reported_together(kwargs, words):
    model = tiny_llama()
    add_lora(model, rank=2)
    with pytest.raises(AdapterOpsError, match=re.escape(words)):
        train_lora(model, dataset(), **kwargs)


def test_a_model_without_lora_or_data_is_refused():
    with pytest.raises(AdapterOpsError, match="call adapterops.train.add_lora"):
        train_lora(tiny_llama(), dataset())
    model = tiny_llama()
    add_lora(model, rank=2)
    with pytest.raises(AdapterOpsError, match="train_data is empty"):
        train_lora(model, [])
    with pytest.raises(AdapterOpsError, match=re.escape("train_data[0] must be a dict")):
        train_lora(model, [{"input_ids": [1]}])
    with pytest.raises(AdapterOpsError, match=f"train_data holds token id {VOCAB}, outside the model's {VOCAB} embedding rows"):
        train_lora(model, [{"input_ids": [1, VOCAB]}], steps=1)
    with pytest.raises(AdapterOpsError, match="eval_data holds token id -1"):
        train_lora(model, dataset(), [{"input_ids": [1, -1]}], steps=1)
    with pytest.raises(AdapterOpsError, match="alpha/rank fits float32"):
        add_lora(tiny_llama(), rank=2, alpha=1e308)


def test_compiled_blocks_train_to_the_same_losses():
    torch._dynamo.reset()
    data = [{"input_ids": [(i * 7 + j) % VOCAB for j in range(12)]} for i in range(8)]  # one length: one graph

    def go(compiled):
        model = tiny_llama()
        add_lora(model, rank=4, seed=1)
        return model, train_lora(model, data, lr=5e-3, steps=2, batch_size=4, compile=compiled)

    model, compiled = go(True)
    _, eager = go(False)
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-5, atol=1e-6)


def _broken_compile(self, *args, **kwargs):
    """Stands in for nn.Module.compile when the compiler fails at the first call."""

    def fail(*a, **k):
        raise RuntimeError("backend exploded")

    self._compiled_call_impl = fail


def test_automatic_compile_falls_back_to_eager_when_it_fails(monkeypatch):
    from adapterops.train import loop

    _, eager = run(compile=False)
    monkeypatch.setattr(loop, "_compile_by_default", lambda device: True)
    monkeypatch.setattr(nn.Module, "compile", _broken_compile)
    with pytest.warns(UserWarning, match="torch.compile failed .*backend exploded"):
        model, result = run()
    assert result.losses == eager.losses
    assert all(block._compiled_call_impl is None for block in model.model.layers)


def test_explicit_compile_failure_is_raised(monkeypatch):
    monkeypatch.setattr(nn.Module, "compile", _broken_compile)
    with pytest.raises(RuntimeError, match="backend exploded"):
        run(compile=True)
