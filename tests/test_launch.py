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


def test_a_closed_pipe_is_not_a_traceback():
    read, write = os.pipe()
    os.close(read)  # every write to stdout fails with EPIPE, as under ``| head`` once head has gone
    try:
        done = subprocess.run([*CLI, "info", str(EXAMPLES / "math.st"), "--json"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
