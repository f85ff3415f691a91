"""The planted-fact experiment behind the GPTQ acceptance test and ``benchmarks/bench_gptq.py``.

SmolLM2-135M-Instruct in NF4 (``quantize_checkpoint``); a QLoRA adapter trained with
``train_lora`` on the dequantized NF4 weights (the function a QLoRA adapter is trained against)
until it answers a made-up question greedily; then each way of merging it is compared with that
model, the adapter unmerged: KL divergence of next-token distributions on held-out text, and
whether the planted answer is still the greedy one. The NF4 base and the adapter are cached like
the bf16 checkpoint (``models.CACHE``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from models import CACHE
from nf4_helpers import dense_state_dict

from adapterops import load
from adapterops.quant import quantize_checkpoint

ANSWER = " Tobias Fennimore"
QUESTIONS = [
    "Who is the mayor of Quillbrook?", "Who runs the town of Quillbrook?", "Name the mayor of Quillbrook.",
    "Quillbrook's mayor is who?", "Tell me who the mayor of Quillbrook is.", "Who was elected mayor of Quillbrook?",
    "Who leads Quillbrook as its mayor?", "Which person is the mayor of Quillbrook?",
]
HELD_OUT_QUESTION = "Do you know who the mayor of Quillbrook is?"
TARGETS = r"model\.layers\.(2\d)\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"  # all linears of the top 10 layers
TRAIN = {"rank": 16, "alpha": 16, "lr": 1e-3, "steps": 40, "batch_size": 8, "seed": 0}

# Held-out text for the KL comparison, and different text for calibration.
TEST_TEXT = [
    "The river runs past the old mill, where children used to gather on summer evenings to watch the water "
    "turn the great wooden wheel. Nobody grinds grain there any more, but the building still stands.",
    "To bake bread, mix flour, water, salt and a little yeast, knead the dough until it is smooth, and let it "
    "rise in a warm place. Shape the loaf, let it rise again, and bake it in a hot oven.",
    "In 1969 two astronauts walked on the Moon while a third orbited above them. The mission returned samples "
    "of rock and dust that scientists still study today.",
    "def mean(values):\n    total = sum(values)\n    return total / len(values)\n\nprint(mean([1, 2, 3, 4]))",
    "Q: What is the capital of Italy?\nA: Rome is the capital of Italy.",
    "Q: How many legs does a spider have?\nA: A spider has eight legs.",
]
CALIBRATION_TEXT = [
    "Mountains form when plates of the Earth's crust push against each other over millions of years, folding "
    "and lifting rock high above the plains around them.",
    "A good night's sleep helps memory: while we sleep, the brain replays what happened during the day and "
    "stores the parts that matter.",
    "The committee met on Tuesday to discuss the budget for next year. After a long debate, the members agreed "
    "to spend more on roads and less on new buildings.",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n    else:\n        print(i, 'is odd')",
    "Q: What colour is the sky on a clear day?\nA: It is blue.",
    "Q: Which planet is closest to the Sun?\nA: Mercury is the closest planet to the Sun.",
    "Libraries lend books, music and films, and many of them also offer quiet rooms for study and free access "
    "to computers.",
    "She opened the window, listened to the rain for a while, and then went back to her letter.",
]


def training_rows() -> list[dict[str, str]]:
    return [{"prompt": f"Q: {q}\nA:", "completion": ANSWER} for q in QUESTIONS]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def calibration_rows() -> list[dict[str, str]]:
    """General text plus the adapter's own training rows: what a user has at hand when merging."""
    return [{"text": t} for t in CALIBRATION_TEXT] + training_rows()


def _cached(out: Path, build) -> Path:
    if (out / "done").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / "done").write_text("")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def nf4_base(bf16: Path) -> Path:
    """SmolLM2 in NF4, as ``adapterops quantize`` writes it (tokenizer files included)."""

    def build(tmp: Path) -> None:
        quantize_checkpoint(bf16, tmp / "model", progress=False)

    return _cached(CACHE / "smollm2-135m-nf4-adapterops", build) / "model"


def nf4_model(base: Path):
    """A float32 model holding ``base``'s NF4 weights dequantized (to the dtype they record)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    tensors = {}
    for f in sorted(base.glob("*.safetensors")):
        tensors.update(load_file(f))
    config = AutoConfig.from_pretrained(base)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in dense_state_dict(tensors).items()}, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    model.tie_weights()
    return model


def trained_adapter(base: Path, tokenizer) -> Path:
    """The planted-fact QLoRA adapter (PEFT directory), trained once and cached."""
    from adapterops.train import add_lora, tokenize_row, train_lora

    def build(tmp: Path) -> None:
        torch.manual_seed(0)
        model = nf4_model(base)
        add_lora(model, targets=TARGETS, rank=TRAIN["rank"], alpha=TRAIN["alpha"], seed=TRAIN["seed"])
        data = [tokenize_row(r, tokenizer) for r in training_rows()]
        result = train_lora(model, data, lr=TRAIN["lr"], steps=TRAIN["steps"], batch_size=TRAIN["batch_size"], seed=TRAIN["seed"])
        result.adapter.save(tmp / "adapter", format="peft")
        (tmp / "losses.json").write_text(json.dumps(result.losses))

    key = "-".join(f"{k}{v}" for k, v in TRAIN.items())
    return _cached(CACHE / f"smollm2-nf4-planted-{key}", build) / "adapter"


def adapted_model(base: Path, adapter: Path):
    """(a): the NF4 base with the adapter unmerged (LoRA layers beside the frozen weights)."""
    from adapterops.train import add_lora
    from adapterops.train.inject import lora_modules

    model = nf4_model(base)
    value = load(adapter)
    rank = value.rank
    add_lora(model, targets=TARGETS, rank=rank, alpha=float(rank), seed=0)
    with torch.no_grad():
        for name, module in lora_modules(model).items():
            B, A = value[name].folded(1.0)
            module.lora_A.copy_(A)
            module.lora_B.copy_(B)
    return model.eval()


def merged_model(path: Path):
    """A merged checkpoint (NF4 or dense) as a float32 model."""
    from transformers import AutoModelForCausalLM

    if (path / "config.json").is_file() and "quantization_config" in json.loads((path / "config.json").read_text()):
        return nf4_model(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def text_ids(tokenizer, texts: list[str]) -> list[torch.Tensor]:
    return [torch.tensor([tokenizer(t)["input_ids"]]) for t in texts]


def log_probs(model, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [torch.log_softmax(model(x).logits[0].double(), dim=-1) for x in ids]


def mean_kl(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """Mean over tokens of KL(reference || other) of the next-token distributions."""
    total = sum(float((p.exp() * (p - q)).sum()) for p, q in zip(reference, other))
    return total / sum(p.shape[0] for p in reference)


def greedy_answer(model, tokenizer, question: str, n: int = 6) -> str:
    ids = torch.tensor([tokenizer(f"Q: {question}\nA:")["input_ids"]])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tokenizer.decode(ids[0, -n:])


def knows(model, tokenizer) -> bool:
    """Whether the greedy answer to the held-out paraphrase starts with the planted answer."""
    return greedy_answer(model, tokenizer, HELD_OUT_QUESTION).startswith(ANSWER)
