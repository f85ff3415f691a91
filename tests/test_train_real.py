"""Training on a real model (SmolLM2-135M-Instruct, float32, CPU): the loss falls, PEFT loads the
saved adapter to the trained model's logits, and greedy generation shows what was learned."""

import pytest
import torch

from adapterops import load
from adapterops.train import add_lora, evaluate, tokenize_row, train_lora

from train_helpers import one_thread  # noqa: F401 (one_thread: an autouse fixture)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.slow

PHRASE = " Pineapple pizza forever!"
QUESTIONS = [
    "capital of France?", "how are you?", "a joke?", "2+2?", "a color?", "who wrote Hamlet?",
    "what day is it?", "the sea?", "why is the sky blue?", "a number?", "your name?", "where do cats live?",
]
# Top layers only: backward stops at the lowest LoRA layer, which keeps this quick on a CPU.
TARGETS = r"model\.layers\.2\d\.(self_attn\.(q|v)_proj|mlp\.down_proj)"


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def greedy(model, tok, question: str, n: int = 8) -> str:
    ids = tok(f"Q: {question}\nA:", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_a_fixed_answer_is_learned_and_peft_reproduces_it(smollm2_dir, tok, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    rows = [{"prompt": f"Q: {q}\nA:", "completion": PHRASE} for q in QUESTIONS]
    data = [tokenize_row(r, tok) for r in rows]
    train, held_out = data[:8], data[8:]
    assert "Pineapple" not in greedy(model, tok, "tallest mountain?")

    handle = add_lora(model, targets=TARGETS, rank=8, alpha=16, seed=0)
    before = evaluate(model, held_out)
    result = train_lora(model, train, held_out, lr=2e-3, batch_size=4, steps=24, seed=0)
    assert result.steps == 24 and len(handle.modules) == 30
    assert result.eval_loss < 0.05 * before and result.final_loss < 0.05 * result.losses[0]
    assert greedy(model, tok, "tallest mountain?").startswith(PHRASE + "<|im_end|>")  # the phrase, then stop

    result.adapter.save(tmp_path / "adapter", format="peft")
    assert set(load(tmp_path / "adapter")) == set(handle.modules)
    ids = tok(["Q: what is love?\nA: Pineapple", "Q: hello\nA: Pine"], return_tensors="pt", padding=True)
    with torch.no_grad():
        trained = model(**ids).logits
    handle.remove()
    with torch.no_grad():
        assert not torch.allclose(model(**ids).logits, trained, atol=1e-2)  # the base differs
    loaded = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, trained, rtol=1e-4, atol=1e-4)
