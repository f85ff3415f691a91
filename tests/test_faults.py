"""Fault tests: ``merge``, ``quantize``, ``compress`` and ``convert`` in subprocesses, interrupted by
SIGINT or SIGKILL at seeded random moments (start-up included), and ``merge`` by SIGTERM and SIGHUP.

Whatever the moment: the inputs stay byte-identical; the output path holds nothing or a complete
output (byte-identical to an uninterrupted run) and the exit code says which (0, or 128 + the
signal with one line for SIGINT, SIGTERM, SIGHUP); a later run to the same output removes what a
killed run left behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safety_helpers import CLI, digest, make_adapter, make_base, nothing_at

import adapterops

REPO = Path(__file__).resolve().parent.parent
# SIGINT lands anywhere from just after the interpreter's own start (a signal before Python runs
# any code is Python's, not ours) to the end of an uninterrupted run; SIGKILL within the work, after
# the imports. Both at seeded random moments, per command.
EARLIEST = 0.4


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faults")
    make_base(d / "base", dtype=torch.float32, hidden=768, layers=4)  # ~20 MB: the work takes a noticeable part of a run
    make_adapter(hidden=768, layers=4, rank=16).save(d / "a.st")
    make_adapter(hidden=768, layers=4, rank=16).save(d / "peft")
    return d


@pytest.fixture(scope="module")
def start_up() -> float:
    """Seconds a run spends before its command starts (interpreter and imports)."""
    began = time.perf_counter()
    assert run(["--version"], None, 0)[0] == 0
    return time.perf_counter() - began


COMMANDS = {
    "merge": lambda d, out: ["merge", "-b", d / "base", "-a", d / "a.st", "-o", out, "--device", "cpu"],
    "quantize": lambda d, out: ["quantize", "-b", d / "base", "-o", out, "--device", "cpu"],
    "compress": lambda d, out: ["compress", d / "peft", "--rank", "4", "-o", out, "--device", "cpu"],
    "convert": lambda d, out: ["convert", d / "a.st", "--to", "peft", "-o", out],
}


def run(args: list[object], delay: float | None, sig: int) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if delay is not None:
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def complete(out: Path, reference: Path, command: str) -> bool:
    if command == "compress":  # an SVD: compare the values, not the bytes
        a, b = adapterops.load(out), adapterops.load(reference)
        return list(a) == list(b) and all(torch.allclose(a[n].delta(), b[n].delta(), atol=1e-5) for n in a)
    return {Path(k).relative_to(out).as_posix() if out.is_dir() else "": v for k, v in digest(out).items()} == {
        Path(k).relative_to(reference).as_posix() if reference.is_dir() else "": v for k, v in digest(reference).items()}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_interrupted_runs_leave_nothing_or_everything(inputs, start_up, tmp_path, command):
    before = digest(inputs)
    name = "out.st" if command == "compress" else "out"
    reference = tmp_path / f"reference-{name}"
    began = time.perf_counter()
    code, err = run(COMMANDS[command](inputs, reference), None, 0)
    took = time.perf_counter() - began
    assert code == 0, err
    rng = random.Random(command)
    plan = {signal.SIGINT: rng.uniform(EARLIEST, took), signal.SIGKILL: rng.uniform(min(start_up, took), took)}
    outs = {sig: tmp_path / f"{sig.name}-{name}" for sig in plan}
    with ThreadPoolExecutor(max_workers=2) as pool:  # both at once, each to its own output
        results = dict(zip(plan, pool.map(lambda sig: run(COMMANDS[command](inputs, outs[sig]), plan[sig], sig), plan)))
    killed_code = results[signal.SIGKILL][0]
    assert killed_code in (0, -signal.SIGKILL), results[signal.SIGKILL]
    if killed_code == 0 or os.path.lexists(outs[signal.SIGKILL]):  # finished, or killed after the rename
        assert complete(outs[signal.SIGKILL], reference, command)
    # The killed run's output, written again without interruption, removes what the kill left behind.
    code, err = run([*COMMANDS[command](inputs, outs[signal.SIGKILL]), "--force"], None, 0)
    assert code == 0 and all(line.startswith("Warning: removed ") for line in err.splitlines()), err
    assert complete(outs[signal.SIGKILL], reference, command)
    assert [p for p in tmp_path.iterdir() if p.name.startswith(f".{outs[signal.SIGKILL].name}.")] == []
    code, err = results[signal.SIGINT]
    target, what = outs[signal.SIGINT], f"{command}: SIGINT after {plan[signal.SIGINT]:.2f} s: exit {code}, stderr {err!r}"
    if code == 0:
        assert complete(target, reference, command), what
    else:
        assert code == 130 and err.splitlines() == ["Error: interrupted"] and nothing_at(target), what
    assert digest(inputs) == before


@pytest.mark.parametrize(("sig", "words"), [(signal.SIGTERM, "terminated"), (signal.SIGHUP, "hung up")])
def test_sigterm_and_sighup_stop_like_ctrl_c(inputs, start_up, tmp_path, sig, words):
    """``kill``, ``timeout`` or a closed terminal: the temporary output is removed, not left to the next run."""
    reference = tmp_path / "reference"
    began = time.perf_counter()
    assert run(COMMANDS["merge"](inputs, reference), None, 0)[0] == 0
    took = time.perf_counter() - began
    rng = random.Random(sig.name)
    for when in (rng.uniform(EARLIEST, start_up), rng.uniform(start_up, took)):  # during the imports, then the work
        out = tmp_path / f"out-{when:.3f}"
        code, err = run(COMMANDS["merge"](inputs, out), when, sig)
        if code == 0:
            assert complete(out, reference, "merge")
        else:
            assert code == 128 + sig and err.splitlines() == [f"Error: {words}"] and nothing_at(out), (when, code, err)
