"""The console script (``adapterops._launch``): exit statuses and complete output although it leaves
without the interpreter's teardown."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from safety_helpers import CLI

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, **kwargs)


def test_output_is_complete_and_statuses_are_the_commands():
    done = run("info", str(EXAMPLES / "math.st"), "--json")
    assert done.returncode == 0 and done.stderr == ""
    assert json.loads(done.stdout)["format"] == "native"  # all of it was flushed before the process left
    missing = run("info", "no-such-adapter.st")
    assert missing.returncode == 1 and missing.stdout == "" and missing.stderr.count("\n") == 1
    usage = run("info", "--no-such-option")
    assert usage.returncode == 2 and usage.stderr.startswith("Error: ")
    assert run("--version").returncode == 0


def test_a_closed_pipe_ends_the_command_quietly():
    read, write = os.pipe()
    os.close(read)  # every write to stdout fails with EPIPE, as under ``| head`` once head has gone
    try:
        done = subprocess.run([*CLI, "info", str(EXAMPLES / "math.st"), "--json"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 1 and done.stderr == "", done.stderr  # quiet, as a pipe's writer should be


def test_prefetch_finds_the_base_shards_of_streaming_commands(tmp_path, monkeypatch):
    from adapterops import _prefetch

    base = tmp_path / "base"
    base.mkdir()
    for name in ("b.safetensors", "a.safetensors"):
        (base / name).write_bytes(b"x" * 100)
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w1": "b.safetensors", "w2": "a.safetensors", "w3": "b.safetensors"}}))
    assert _prefetch.base_files(["merge", "--base", str(base), "--adapter", "x"]) == [base / "b.safetensors", base / "a.safetensors"]
    assert _prefetch.base_files(["quantize", f"--base={base / 'a.safetensors'}", "--out", "o"]) == [base / "a.safetensors"]
    (base / "model.safetensors.index.json").unlink()
    assert _prefetch.base_files(["unmerge", "-b", str(base)]) == [base / "a.safetensors", base / "b.safetensors"]
    assert _prefetch.base_files(["diagnose", "x.st", "--base", str(base)]) == []  # a cached run need not read the base
    assert _prefetch.base_files(["merge", "--base", "user/repo"]) == []  # Hub ids: nothing local to read
    (base / "config.json").write_text("{}")
    assert _prefetch.base_files(["merge", "--base", str(base / "config.json")]) == []
    read = []
    real = os.preadv
    monkeypatch.setattr(_prefetch.os, "preadv", lambda fd, buffers, offset: read.append(real(fd, buffers, offset)) or read[-1])
    thread = _prefetch.start(["merge", "--base", str(base)])
    assert thread is not None
    thread.join(timeout=30)
    assert not thread.is_alive() and sum(read) == 200  # both shards, to their ends
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.safetensors", "v": "a.safetensors"}}))
    assert _prefetch.base_files(["merge", "--base", str(base)]) == [base / "a.safetensors"]
    (base / "model.safetensors.index.json").write_text("[" * 100_000)  # the command reports a broken index; the hint stays quiet
    assert _prefetch.start(["merge", "--base", str(base)]) is None
    (base / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    assert _prefetch.start(["merge", "--base", str(base)]) is None
    monkeypatch.setenv(_prefetch.ENV, "0")
    assert _prefetch.start(["merge", "--base", str(base)]) is None


def test_a_report_that_cannot_be_written_is_an_error(tmp_path):
    """stdout on a full device or closed: one line, exit 1 (GNU tools do the same); never a traceback."""
    adapter = str(EXAMPLES / "math.st")
    with open("/dev/full", "w") as full:
        done = subprocess.run([*CLI, "info", adapter, "--json"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr == "Error: cannot write to standard output: No space left on device\n"
    done = subprocess.run([*CLI, "info", adapter], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                          preexec_fn=lambda: os.close(1))
    assert done.returncode == 1 and done.stderr == "Error: cannot write to standard output: it is closed\n"

