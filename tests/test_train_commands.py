"""``adapterops train`` through click's CliRunner on a tiny local Llama with SmolLM2's tokenizer."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from adapterops import load
from adapterops.cli import main
from adapterops.cli.train_commands import parse_targets

from train_helpers import build_tiny_llama, one_thread  # noqa: F401 (one_thread: an autouse fixture)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def base_dir(smollm2_dir, tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary, tokenizer and chat template."""
    out = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_llama(
        vocab_size=49152, intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True,
        eos_token_id=2, pad_token_id=2,
    )
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, out / name)
    return out


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"Q{i}:", "completion": " yes"} for i in range(6)]
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def train(*args):
    return CliRunner().invoke(main, ["train", *map(str, args)])


def test_train_writes_an_adapter_and_a_json_summary(base_dir, data, tmp_path):
    out = tmp_path / "a.st"
    r = train("--base", base_dir, "--data", data, "--eval", data, "-o", out, "--rank", 4, "--alpha", 8,
              "--targets", "q_proj,v_proj", "--steps", 3, "--batch-size", 4, "--lr", 1e-2, "--json", "-q")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["steps"] == 3 and summary["format"] == "native" and summary["num_layers"] == 4
    assert summary["final_loss"] > 0 and summary["eval_loss"] > 0 and summary["tokens_per_second"] > 0
    assert summary["warmup_seconds"] > 0 and summary["seconds"] >= summary["warmup_seconds"]
    adapter = load(out)
    assert list(adapter) == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v")]
    assert adapter.metadata["base_model"] == str(base_dir)
    assert all(layer.rank == 4 and layer.alpha == 8 for layer in adapter.values())
    assert any(torch.count_nonzero(layer.B) for layer in adapter.values())


def test_train_writes_gguf_for_its_own_base(base_dir, data, tmp_path):
    out = tmp_path / "a.gguf"
    r = train("--base", base_dir, "--data", data, "-o", out, "--rank", 2, "--targets", "q_proj", "--steps", 1, "-q")
    assert r.exit_code == 0, r.output
    trained = load(out, base=base_dir)
    assert sorted(trained) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    r = CliRunner().invoke(main, ["compress", str(out), "--rank", "1", "--format", "gguf", "-o", str(tmp_path / "b.gguf")])
    assert r.exit_code == 2 and "'gguf' is not one of" in r.stderr


def test_human_output_and_progress_on_stderr(base_dir, data, tmp_path):
    r = train("--base", base_dir, "--data", data, "-o", tmp_path / "peft_dir", "--rank", 2, "--steps", 2, "--qlora")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("trained 2 steps: final loss ")
    assert f"wrote {tmp_path / 'peft_dir'}: 14 layers, rank 2" in r.stdout and "(peft)" in r.stdout
    assert "step 2/2  loss" in r.stderr and "tok/s" in r.stderr
    assert (tmp_path / "peft_dir" / "adapter_config.json").is_file()


def test_resume_continues_a_checkpointed_run(base_dir, data, tmp_path):
    common = ["--base", base_dir, "--data", data, "--rank", 2, "--steps", 4, "--batch-size", 2, "--json", "-q"]
    whole = train(*common, "-o", tmp_path / "whole.st")
    assert whole.exit_code == 0, whole.output
    part = train(*common, "-o", tmp_path / "part.st", "--checkpoint-dir", tmp_path / "ck", "--save-every", 2)
    assert part.exit_code == 0, part.output
    shutil.rmtree(tmp_path / "ck" / "step-00000004")  # as if it had stopped after step 2
    resumed = train(*common, "-o", tmp_path / "resumed.st", "--resume", tmp_path / "ck")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from"] == 2
    assert json.loads(resumed.stdout)["losses"] == json.loads(whole.stdout)["losses"]
    a, b = load(tmp_path / "whole.st"), load(tmp_path / "resumed.st")
    assert all(torch.equal(a[n].B, b[n].B) for n in a)


def test_errors_are_one_line(base_dir, data, tmp_path):
    out = tmp_path / "x.st"
    out.write_text("keep me")
    r = train("--base", base_dir, "--data", data, "-o", out, "--steps", 1)
    assert r.exit_code == 1 and r.output.strip() == f"Error: {out} already exists; pass --force to overwrite it"
    assert out.read_text() == "keep me"

    r = train("--base", base_dir, "--data", data, "-o", tmp_path / "y.st", "--steps", 1, "--epochs", 1)
    assert r.exit_code == 2 and "give --epochs or --steps, not both" in r.output

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": 3, "completion": "x"}\n')
    r = train("--base", base_dir, "--data", bad, "-o", tmp_path / "y.st", "--steps", 1)
    assert r.exit_code == 1
    assert r.output.startswith(f"Error: bad JSONL rows: {bad}:2: \"prompt\" and \"completion\" must be strings")
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "y.st").exists()

    (tmp_path / "nomodel").mkdir()
    r = train("--base", tmp_path / "nomodel", "--data", data, "-o", tmp_path / "y.st")
    assert r.exit_code == 1 and "not a Hugging Face model directory (no config.json)" in r.output

    r = train("--base", base_dir, "--data", data, "-o", tmp_path / "y.st", "--targets", "nope_proj", "--steps", 1)
    assert r.exit_code == 1 and "targets match no linear layer: 'nope_proj'" in r.output

    r = train("--base", base_dir, "--data", data, "-o", data)
    assert r.exit_code == 1 and "is also an input" in r.output


def test_targets_option_parsing():
    assert parse_targets("all-linear") == "all-linear"
    assert parse_targets("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert parse_targets(r"model\.layers\.\d+\.mlp\..*") == r"model\.layers\.\d+\.mlp\..*"
    assert parse_targets("mlp.down_proj") == ["mlp.down_proj"]  # a dot alone is a path, not a regex
