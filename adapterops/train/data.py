"""Training data: JSONL rows to token ids with loss masks, packing, and batching.

One JSON object per line, one of three shapes:

- ``{"text": "..."}``: loss on every token;
- ``{"prompt": "...", "completion": "..."}``: loss on the completion (and the EOS after it) only;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
  template, loss on the assistant turns only.

An example is ``{"input_ids": [...], "labels": [...]}`` with ``labels[t] = input_ids[t]`` where
the token is trained on and ``IGNORE`` (-100) elsewhere; the model predicts token ``t`` from the
tokens before it. Bad rows raise one ``FormatError`` naming the file and the line of every problem.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._files import require_file
from .._safetensors import NOT_TEXT, is_text
from ..errors import FormatError

__all__ = ["IGNORE", "Dataset", "read_jsonl", "tokenize_row", "load_jsonl", "pack", "collate"]

IGNORE = -100
_MAX_REPORTED = 10


class Dataset(list):
    """A list of examples, with where they came from and how many rows were dropped (no trainable
    token left after truncation)."""

    def __init__(self, examples: Sequence[dict[str, list[int]]] = (), *, source: str = "", dropped: int = 0) -> None:
        super().__init__(examples)
        self.source, self.dropped = source, dropped

    @property
    def num_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self)

    @property
    def num_trained_tokens(self) -> int:
        return sum(sum(1 for y in e["labels"] if y != IGNORE) for e in self)


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` for every non-blank line, every row checked; all problems in one error."""
    path = require_file(path)
    rows, problems = [], []
    with open(path, encoding="utf-8-sig", errors="strict") as f:  # -sig: a BOM that Windows editors put first is not data
        try:
            lines = list(f)
        except UnicodeDecodeError as exc:
            raise FormatError(f"{path}: not UTF-8 text ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        except (ValueError, RecursionError):  # numbers of too many digits, nesting too deep
            problems.append(f"{path}:{number}: not usable JSON (too deeply nested, or a number too long)")
            continue
        problem = _check_row(row) or (None if is_text(row, line) else NOT_TEXT)
        if problem:
            problems.append(f"{path}:{number}: {problem}")
        else:
            rows.append((number, row))
    if problems:
        _report(problems)
    if not rows:
        raise FormatError(f"{path}: no rows (expected one JSON object per line)")
    return rows


def _report(problems: Sequence[str]) -> None:
    """Raise one FormatError naming the first few bad rows (file:line: what is wrong)."""
    more = f" (and {len(problems) - _MAX_REPORTED} more)" if len(problems) > _MAX_REPORTED else ""
    raise FormatError("bad JSONL rows: " + "; ".join(problems[:_MAX_REPORTED]) + more)


def _check_row(row: Any) -> str | None:
    """What is wrong with one row, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    kinds = [k for k in ("text", "prompt", "messages") if k in row]
    if not kinds:
        return 'expected a "text", "prompt"/"completion" or "messages" field, found ' + (", ".join(map(repr, row)) or "none")
    if len(kinds) > 1:
        return f"has both {kinds[0]!r} and {kinds[1]!r}; use one shape per row"
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            return '"text" must be a non-empty string'
    elif "prompt" in row:
        if "completion" not in row:
            return '"prompt" without "completion"'
        if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
            return '"prompt" and "completion" must be strings'
        if not row["completion"]:
            return '"completion" is empty: nothing to train on'
    else:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return '"messages" must be a non-empty list'
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f'messages[{i}] must be an object with string "role" and "content"'
        if not any(m["role"] == "assistant" for m in messages):
            return 'no "assistant" message: nothing to train on'
    return None


def tokenize_row(row: Mapping[str, Any], tokenizer: Any) -> dict[str, list[int]]:
    """Token ids and labels of one checked row (see the module docstring)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if "text" in row:
        ids = _encode(tokenizer, row["text"], special=True)
        ids = _with_eos(ids, eos)
        return {"input_ids": ids, "labels": list(ids)}
    if "prompt" in row:
        prompt = _encode(tokenizer, row["prompt"], special=True)
        completion = _with_eos(_encode(tokenizer, row["completion"], special=False), eos)
        return {"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion}
    return _tokenize_chat(row["messages"], tokenizer)


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _tokenize_chat(messages: list[dict[str, str]], tokenizer: Any) -> dict[str, list[int]]:
    """Render with the chat template; label the tokens of each assistant turn.

    A turn's span is found by rendering prefixes of the conversation: it starts where
    ``render(messages[:i], add_generation_prompt=True)`` ends and stops where
    ``render(messages[:i + 1])`` ends (trailing whitespace dropped, end-of-turn token kept).
    Templates that do not render prefix by prefix are refused rather than guessed at.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise FormatError('the tokenizer has no chat template, so "messages" rows cannot be rendered; use "prompt"/"completion" rows')
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _prefix_length(tokenizer, messages[:i], full)
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if start is None or not full.startswith(upto) or len(upto) < start:
            raise FormatError(
                "the chat template does not render this conversation prefix by prefix, so the assistant "
                "turns cannot be located; use \"prompt\"/\"completion\" rows instead"
            )
        end = start + len(full[start : len(upto)].rstrip())
        spans.append((start, end))
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        starts = [a for a, _ in enc["offset_mapping"]]
        labels = [t if any(s <= c < e for s, e in spans) else IGNORE for t, c in zip(ids, starts)]
    else:  # no offsets: count the tokens of each boundary's prefix
        ids = _encode(tokenizer, full, special=False)
        labels = [IGNORE] * len(ids)
        for s, e in spans:
            a, b = len(_encode(tokenizer, full[:s], special=False)), len(_encode(tokenizer, full[:e], special=False))
            labels[a:b] = ids[a:b]
    return {"input_ids": ids, "labels": labels}


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    if not messages and not generation_prompt:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja errors from the template itself
        if not messages:
            return ""
        raise FormatError(f"the chat template failed on this conversation ({type(exc).__name__}: {exc})") from None


def _prefix_length(tokenizer: Any, history: list[dict[str, str]], full: str) -> int | None:
    """Where the assistant turn after ``history`` starts in ``full`` (after its header when the
    template has a generation prompt), or None if no rendering of ``history`` is a prefix."""
    for generation_prompt in (True, False):
        text = _render(tokenizer, history, generation_prompt=generation_prompt)
        if full.startswith(text):
            return len(text)
    return None


def load_jsonl(
    path: str | os.PathLike,
    tokenizer: Any,
    *,
    max_len: int | None = None,
    packing: bool = False,
) -> Dataset:
    """Read, check and tokenize a JSONL file; truncate to ``max_len``; optionally pack.

    Rows left with no trained token after truncation are dropped (``Dataset.dropped`` counts them).
    """
    if max_len is not None and max_len < 2:
        raise FormatError(f"max_len must be at least 2, got {max_len}")
    if packing and max_len is None:
        raise FormatError("packing needs max_len (the length of the packed sequences)")
    examples, problems, dropped = [], [], 0
    for number, row in read_jsonl(path):
        try:
            example = tokenize_row(row, tokenizer)
        except FormatError as exc:
            problems.append(f"{path}:{number}: {exc}")
            continue
        if max_len is not None:
            example = {k: v[:max_len] for k, v in example.items()}
        if all(y == IGNORE for y in example["labels"][1:]):  # the first token is never predicted
            dropped += 1
            continue
        examples.append(example)
    if problems:
        _report(problems)
    if not examples:
        raise FormatError(f"{path}: no row has a token to train on after truncation to max_len={max_len}")
    if packing:
        examples = pack(examples, max_len)
    return Dataset(examples, source=str(path), dropped=dropped)


def pack(examples: Sequence[Mapping[str, Sequence[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Pack whole examples into sequences of at most ``max_len`` tokens without cross-talk.

    Best-fit decreasing: the longest example first, each into the fullest sequence it still fits
    in. A packed sequence is ``{"input_ids", "labels", "lengths"}``: ``lengths`` are its examples'
    lengths in order, from which ``collate`` builds position ids that restart at 0 for every
    example and the boundaries the attention is split at, so each example attends only to itself.
    The label of each example's first token is ``IGNORE``: the token before it ends another
    example, and an example run alone never predicts its first token either. Loss and gradients
    equal those of the examples run one by one.
    """
    if max_len < 1:
        raise FormatError(f"max_len must be positive, got {max_len}")
    long = [i for i, e in enumerate(examples) if len(e["input_ids"]) > max_len]
    if long:
        i = long[0]
        raise FormatError(f"example {i} has {len(examples[i]['input_ids'])} tokens, more than max_len={max_len}; truncate it first")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted: the fullest bin that fits is a bisect away
    for i in order:
        n = len(examples[i]["input_ids"])
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            bins.append([i])
            room, b = max_len - n, len(bins) - 1
        else:
            room, b = free.pop(at)
            bins[b].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, b))
    packed = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        for i in members:
            ids.extend(examples[i]["input_ids"])
            labels.append(IGNORE)
            labels.extend(examples[i]["labels"][1:])
        packed.append({"input_ids": ids, "labels": labels, "lengths": [len(examples[i]["input_ids"]) for i in members]})
    return packed


def collate(examples: Sequence[Mapping[str, Sequence[int]]], pad_id: int = 0, *, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row (at least ``pad_to``): ``input_ids`` and
    ``attention_mask`` (B, T) int64, ``labels`` (B, T) with ``IGNORE`` on padding.

    A batch holding packed rows (``lengths``, see ``pack``) also gets ``position_ids`` (B, T),
    restarting at 0 at every example and at the padding (which forms a segment of its own), and
    ``cu_seq_lens`` (S + 1,) int32, the offsets of the S segments in the flattened (B T) tokens.
    """
    length = max(pad_to or 0, max(len(e["input_ids"]) for e in examples))
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any("lengths" in e for e in examples):
        segments = []  # lengths of the segments of every row, the padding tail included
        for e in examples:
            row = list(e.get("lengths", [len(e["input_ids"])]))
            tail = length - sum(row)
            segments.append(row + ([tail] if tail else []))
        flat = torch.tensor([n for row in segments for n in row], dtype=torch.long)  # (S,)
        starts = torch.cumsum(flat, 0) - flat  # (S,) offsets in the flattened tokens
        offsets = torch.repeat_interleave(starts, flat)  # (B T,) where each token's segment starts
        batch["position_ids"] = (torch.arange(len(examples) * length) - offsets).reshape(len(examples), length)
        batch["cu_seq_lens"] = torch.cat([starts, flat.sum().reshape(1)]).to(torch.int32)
    return batch
