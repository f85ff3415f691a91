"""JSONL data: the three row shapes and their loss masks (with SmolLM2's real tokenizer and chat
template), truncation, packing, batching, and bad rows reported with file and line."""

import json
import re

import pytest
import torch

from adapterops.errors import FormatError
from adapterops.train import IGNORE, collate, load_jsonl, pack, read_jsonl, tokenize_row

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


class SlowView:
    """The same tokenizer seen as one without offset mappings (the prefix-counting path)."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kwargs):
        kwargs.pop("return_offsets_mapping", None)
        return self._tok(text, **kwargs)


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def trained_text(tok, example):
    """The decoded runs of trained tokens."""
    runs, run = [], []
    for t, y in zip(example["input_ids"], example["labels"]):
        if y != IGNORE:
            assert y == t
            run.append(t)
        elif run:
            runs.append(tok.decode(run))
            run = []
    if run:
        runs.append(tok.decode(run))
    return runs


def test_text_rows_train_on_every_token_and_end_with_eos(tok):
    e = tokenize_row({"text": "The cat sat."}, tok)
    assert e["input_ids"] == tok("The cat sat.")["input_ids"] + [tok.eos_token_id]
    assert e["labels"] == e["input_ids"]


def test_prompt_completion_rows_train_on_the_completion_only(tok):
    e = tokenize_row({"prompt": "Q: 2+2?\nA:", "completion": " 4"}, tok)
    n_prompt = len(tok("Q: 2+2?\nA:")["input_ids"])
    assert e["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert trained_text(tok, e) == [" 4" + tok.eos_token]


@pytest.mark.parametrize("fast", [True, False])
def test_chat_rows_train_on_assistant_turns_only(tok, fast):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "It is 4."},
    ]
    e = tokenize_row({"messages": messages}, tok if fast else SlowView(tok))
    assert e["input_ids"] == tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert trained_text(tok, e) == ["Hello!<|im_end|>", "It is 4.<|im_end|>"]


def test_chat_template_default_system_prompt_is_not_trained(tok):
    e = tokenize_row({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, tok)
    assert "SmolLM" in tok.decode(e["input_ids"])  # the template adds a system turn
    assert trained_text(tok, e) == ["Yo<|im_end|>"]


def test_a_template_that_is_not_prefix_stable_is_refused(tok, tmp_path):
    class Shuffled(SlowView):
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            # renders the turns last-first: no prefix of the conversation is a prefix of the whole
            return "".join(f"<{m['role']}>{m['content']}" for m in reversed(messages))

    path = write(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(FormatError, match=re.escape(f"{path}:1: the chat template does not render this conversation prefix by prefix")):
        load_jsonl(path, Shuffled(tok))


def test_no_chat_template(tok, tmp_path):
    class Plain(SlowView):
        chat_template = None

    path = write(tmp_path / "d.jsonl", [{"text": "ok"}, {"messages": [{"role": "assistant", "content": "b"}]}])
    with pytest.raises(FormatError, match=re.escape(f"{path}:2: the tokenizer has no chat template")):
        load_jsonl(path, Plain(tok))


def test_bad_rows_are_all_reported_with_file_and_line(tok, tmp_path):
    path = write(tmp_path / "bad.jsonl", [
        {"text": "fine"},
        "",
        "{not json",
        "[1, 2]",
        {"prompt": "only a prompt"},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"text": "a", "prompt": "b", "completion": "c"},
        {"id": 3},
        {"messages": [{"role": "user"}]},
        {"text": ""},
    ])
    with pytest.raises(FormatError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith("bad JSONL rows: ")
    lines = ["bad JSONL rows:"] + re.split(f"; (?={re.escape(str(path))}:)", message.removeprefix("bad JSONL rows: "))
    assert [line.split(": ", 1)[0] for line in lines[1:]] == [f"{path}:{n}" for n in (3, 4, 5, 6, 7, 8, 9, 10)]
    assert "not valid JSON" in lines[1] and "expected a JSON object, got list" in lines[2]
    assert '"prompt" without "completion"' in lines[3] and 'no "assistant" message' in lines[4]
    assert "use one shape per row" in lines[5] and "found 'id'" in lines[6]
    assert 'string "role" and "content"' in lines[7] and '"text" must be a non-empty string' in lines[8]


def test_missing_and_empty_files(tok, tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl", tok)
    with pytest.raises(FormatError, match="no rows"):
        load_jsonl(write(tmp_path / "empty.jsonl", ["", "  "]), tok)


def test_truncation_and_rows_left_with_nothing_to_train(tok, tmp_path):
    path = write(tmp_path / "d.jsonl", [
        {"text": "one two three four five six seven eight"},
        {"prompt": "a long prompt that fills the whole window and more", "completion": " x"},
    ])
    data = load_jsonl(path, tok, max_len=4)
    assert len(data) == 1 and data.dropped == 1
    assert len(data[0]["input_ids"]) == 4 and data.num_trained_tokens == 4
    with pytest.raises(FormatError, match="no row has a token to train on"):
        load_jsonl(write(tmp_path / "e.jsonl", [{"prompt": "long long long prompt", "completion": "y"}]), tok, max_len=2)


def test_packing_keeps_examples_whole(tok, tmp_path):
    rows = [{"text": f"row number {i}"} for i in range(5)]
    plain = load_jsonl(write(tmp_path / "d.jsonl", rows), tok)
    packed = load_jsonl(tmp_path / "d.jsonl", tok, max_len=12, packing=True)
    assert sorted(n for e in packed for n in e["lengths"]) == sorted(len(e["input_ids"]) for e in plain)
    assert all(len(e["input_ids"]) <= 12 for e in packed) and len(packed) < len(plain)
    assert packed.num_trained_tokens == plain.num_trained_tokens - len(plain)  # each first token: never predicted
    assert pack([{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}], 5) == [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE, 2, 3, IGNORE, 5], "lengths": [3, 2]}]
    with pytest.raises(FormatError, match="packing needs max_len"):
        load_jsonl(tmp_path / "d.jsonl", tok, packing=True)


def test_collate_pads_right_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["input_ids"].dtype == torch.long


def test_rows_nested_too_deep_or_with_huge_numbers_are_reported(tmp_path):
    path = tmp_path / "crafted.jsonl"
    path.write_text('{"text": "fine"}\n' + "[" * 100_000 + "\n" + '{"text": 1' + "0" * 5000 + "}\n")
    with pytest.raises(FormatError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert f"{path}:2: not usable JSON" in message and f"{path}:3: not usable JSON" in message


def test_a_row_escaping_an_unpaired_surrogate_is_a_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "\\ud800"}\n', encoding="utf-8")
    with pytest.raises(FormatError, match=r"d\.jsonl:2: escapes an unpaired UTF-16 surrogate"):
        read_jsonl(path)


def test_a_byte_order_mark_before_the_first_row_is_not_data(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "hello"}\r\n{"text": "again"}\n')  # as Windows editors save it
    assert [row for _, row in read_jsonl(path)] == [{"text": "hello"}, {"text": "again"}]
    path.write_bytes(b'{"text": "hello"}\n\xef\xbb\xbf{"text": "again"}\n')  # elsewhere it is a character, not JSON
    with pytest.raises(FormatError, match=r"bom.jsonl:2: not valid JSON"):
        read_jsonl(path)
