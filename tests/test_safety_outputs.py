"""Regression tests of issue 9's output and runtime half, through the CLI: inputs are never
overwritten (not even with --force), nothing non-finite is written silently, an output that appears
meanwhile is never replaced, inputs that change while read are refused, stale temporaries are
removed, a full disk is said plainly, and every failure is one line with the right exit code.

Each case checks the exit code, the one line on stderr, that the inputs' bytes are unchanged and
that nothing (not even a temporary) is left at the output path.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safety_helpers import digest, make_adapter, make_base, nothing_at, one_line, weight_name

import adapterops
from adapterops import _files
from adapterops._files import atomic_output, remove_leftovers
from adapterops.checkpoint import Checkpoint
from adapterops.cli import main
from adapterops.errors import InputChangedError, NonFiniteError, OutputExistsError, OutputOverlapError
from adapterops.safety import Inputs, check_output

Q0 = weight_name(0, "q_proj")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("safety")
    make_base(d / "base")
    make_base(d / "tuned", seed=3)
    make_base(d / "nanbase", poke={Q0: float("nan")})
    make_base(d / "bigbase", dtype=torch.float32, poke={Q0: 1e5})  # fine in fp32, inf once cast to fp16
    make_adapter().save(d / "a.st")
    make_adapter(seed=2).save(d / "b.st")
    make_adapter().save(d / "peft")
    half = make_adapter(dtype=torch.float16, scale=1.0)
    adapterops.Adapter({n: adapterops.LoraLayer(l.A, l.B * 200, l.alpha) for n, l in half.items()}).save(d / "big16.st")
    (d / "data.jsonl").write_text(json.dumps({"text": "hello"}) + "\n", encoding="utf-8")
    return d


def cli(*args: object, **env: str):
    return CliRunner(env=env or None).invoke(main, [str(a) for a in args])


def refused(args: list[object], inputs: list[Path], out: Path, words: str, code: int = 1, keep_out: bool = False) -> str:
    """Run ``args``; it must fail with ``code`` and one line holding ``words``, the inputs untouched and nothing at ``out``."""
    before = digest(*inputs)
    result = cli(*args)
    line = one_line(result.stderr)
    assert result.exit_code == code, result.output
    assert line.startswith("Error: ") and words in line, line
    assert digest(*inputs) == before
    if not keep_out:
        assert nothing_at(out), sorted(os.listdir(out.parent))
    return line


# --- 1. --force never destroys an input ----------------------------------------------------------


def test_convert_into_the_directory_holding_the_input(files, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.st").write_bytes((files / "a.st").read_bytes())
    (d / "notes.txt").write_text("mine")
    line = refused(["convert", d / "a.st", "--to", "peft", "-o", d, "--force"], [d], d, "holds the input", keep_out=True)
    assert f"{d} holds the input {d / 'a.st'}" in line and "not even with --force" in line
    assert (d / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", [["compress", "--rank", "1"], ["convert", "--to", "native"]])
def test_output_inside_an_adapter_directory(files, command):
    out = files / "peft" / "adapter_model.safetensors"
    refused([command[0], files / "peft", *command[1:], "-o", out, "--force"], [files / "peft"], out, "lies inside the input", keep_out=True)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"])
def test_merge_into_a_file_of_the_base(files, name):
    out = files / "base" / name
    refused(["merge", "-b", files / "base", "-a", files / "a.st", "-o", out, "--force"], [files / "base"], out, "input", keep_out=True)


def test_merge_into_the_directory_of_the_adapter(files, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x.st").write_bytes((files / "a.st").read_bytes())
    refused(["merge", "-b", files / "base", "-a", d / "x.st", "-o", d, "--force"], [d, files / "base"], d, f"{d} holds the input {d / 'x.st'}", keep_out=True)


@pytest.mark.parametrize("target", ["base", "tuned"])
def test_extract_onto_a_checkpoint(files, target):
    out = files / target
    refused(["extract", "-b", files / "base", "-t", files / "tuned", "--rank", "1", "-o", out, "--force"],
            [files / "base", files / "tuned"], out, "is also an input", keep_out=True)


def test_quantize_and_blend_and_train_outputs_onto_inputs(files):
    refused(["quantize", "-b", files / "base", "-o", files / "base" / "q", "--force"], [files / "base"], files / "base" / "q", "lies inside the input")
    refused(["blend", files / "a.st", files / "b.st", "-o", files / "b.st", "--force"], [files / "a.st", files / "b.st"], files / "b.st",
            "is also an input", keep_out=True)
    refused(["train", "-b", files / "base", "--data", files / "data.jsonl", "-o", files / "data.jsonl", "--force"], [files / "data.jsonl"],
            files / "data.jsonl", "is also an input", keep_out=True)
    refused(["diagnose", files / "peft", "--plot", files / "peft" / "plot.png", "--force"], [files / "peft"], files / "peft" / "plot.png",
            "lies inside the input")


def test_cache_and_checkpoint_directories_never_lie_in_an_input(files, tmp_path):
    refused(["diagnose", files / "a.st", "--base", files / "base", "--cache-dir", files / "base"], [files / "base"], files / "base",
            "--cache-dir", keep_out=True)
    refused(["diagnose", files / "peft", "--cache-dir", files / "peft" / "cache"], [files / "peft"], files / "peft" / "cache", "lies inside the input")
    train = ["train", "-b", files / "base", "--data", files / "data.jsonl", "--steps", "1", "--device", "cpu"]
    refused([*train, "-o", tmp_path / "t.st", "--checkpoint-dir", files / "base" / "ck", "--save-every", "1"], [files / "base"],
            files / "base" / "ck", "--checkpoint-dir")
    refused([*train, "-o", tmp_path / "t.st", "--checkpoint-dir", tmp_path / "t.st"], [files / "base"], tmp_path / "t.st", "overlap", code=2)


@pytest.mark.parametrize("kind", ["fifo", "symlink to a fifo"])
@pytest.mark.parametrize("command", [["compress", "--rank", "1"], ["convert", "--to", "native"], ["merge"]])
def test_force_never_replaces_what_is_not_a_file_or_directory(files, tmp_path, kind, command):
    special = tmp_path / "pipe"
    os.mkfifo(special)
    out = special if kind == "fifo" else tmp_path / "link"
    if out != special:
        out.symlink_to(special)
    args = ["merge", "-b", files / "base", "-a", files / "a.st"] if command == ["merge"] else [command[0], files / "a.st", *command[1:]]
    refused([*args, "-o", out, "--force"], [files / "a.st"], out, "is a named pipe, not a file or directory", keep_out=True)
    assert stat.S_ISFIFO(special.lstat().st_mode) and (out == special or out.is_symlink())


def test_a_symlink_to_an_input_is_that_input(files, tmp_path):
    link = tmp_path / "link.st"
    link.symlink_to(files / "a.st")
    line = refused(["compress", files / "a.st", "--rank", "1", "-o", link, "--force"], [files / "a.st"], link, "is also an input", keep_out=True)
    assert f"({files / 'a.st'})" in line and link.is_symlink()


def test_library_rule_holds_without_the_cli(files, tmp_path):
    with pytest.raises(OutputOverlapError, match="is also an input"):
        adapterops.merge(files / "base", files / "a.st", files / "a.st", force=True, progress=False)
    with pytest.raises(OutputOverlapError, match="holds the input"):
        adapterops.quantize_checkpoint(files / "base", files, force=True, progress=False)
    adapter = adapterops.load(files / "a.st")
    with pytest.raises(OutputOverlapError, match="is also an input"):  # the file it was loaded from counts
        adapter.save(files / "a.st", force=True)
    hard = tmp_path / "hard.st"
    os.link(files / "a.st", hard)
    with pytest.raises(OutputOverlapError, match="hard link"):
        check_output(hard, inputs=[files / "a.st"], force=True)


# --- 2. nothing non-finite is written silently -----------------------------------------------------


@pytest.mark.parametrize("weights", ["nan,1", "inf,1", "1e400,1"])
def test_blend_weights_must_be_finite(files, tmp_path, weights):
    refused(["blend", files / "a.st", files / "b.st", "-w", weights, "-o", tmp_path / "o.st"], [files / "a.st", files / "b.st"], tmp_path / "o.st", "finite")


def test_blend_fp16_overflow_is_refused_unless_allowed(files, tmp_path):
    out = tmp_path / "o.st"
    line = refused(["blend", files / "big16.st", files / "big16.st", "-w", "1000,1000", "-o", out], [files / "big16.st"], out, "would hold NaN or Inf")
    assert "lora_B" in line and "float16" in line and "--allow-nonfinite" in line
    assert cli("blend", files / "big16.st", files / "big16.st", "-w", "1000,1000", "-o", out, "--allow-nonfinite").exit_code == 0
    assert out.is_file()


def test_merge_fp16_cast_overflow_names_the_tensor(files, tmp_path):
    out = tmp_path / "m"
    line = refused(["merge", "-b", files / "bigbase", "-a", files / "a.st", "-o", out, "--dtype", "fp16"], [files / "bigbase"], out,
                   f"1 tensor(s) would hold NaN or Inf: {Q0} (1 of 256 values)")
    assert "bf16 keeps the float32 range" in line
    result = cli("merge", "-b", files / "bigbase", "-a", files / "a.st", "-o", out, "--dtype", "fp16", "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    assert Checkpoint(out).read(Q0)[0, 0].isinf()


def test_nan_in_a_base_weight_stops_merge_and_quantize(files, tmp_path):
    refused(["merge", "-b", files / "nanbase", "-a", files / "a.st", "-o", tmp_path / "m"], [files / "nanbase"], tmp_path / "m", Q0)
    refused(["quantize", "-b", files / "nanbase", "-o", tmp_path / "q"], [files / "nanbase"], tmp_path / "q", "would hold NaN or Inf")


def test_merge_report_with_statistics_that_are_not_numbers(files, tmp_path):
    zero = make_adapter()
    zero = adapterops.Adapter({n: adapterops.LoraLayer(l.A, torch.zeros_like(l.B), l.alpha) for n, l in zero.items()})  # a fresh LoRA
    zero.save(tmp_path / "zero.st")
    result = cli("merge", "-b", files / "base", "-a", tmp_path / "zero.st", "-o", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert "merged 1 adapter(s)" in result.stdout and "retained" in result.stdout and Checkpoint(tmp_path / "m").names()


def test_train_refuses_a_learning_rate_that_is_not_finite(files, tmp_path):
    result = cli("train", "-b", files / "base", "--data", files / "data.jsonl", "-o", tmp_path / "t.st", "--lr", "inf")
    assert result.exit_code == 2 and "inf is not in the range" in one_line(result.stderr)
    assert nothing_at(tmp_path / "t.st")


def test_training_that_diverges_stops_and_writes_nothing(tmp_path):
    from train_helpers import build_tiny_llama

    from adapterops.train import add_lora, train_lora

    model = build_tiny_llama()
    add_lora(model, targets="all-linear", rank=2, init="gaussian")
    ids = torch.randint(0, 64, (4, 8))
    with pytest.raises(NonFiniteError, match="training diverged at step"):
        train_lora(model, [{"input_ids": row.tolist()} for row in ids], lr=1e30, steps=3, batch_size=2, progress=False,
                   checkpoint_dir=tmp_path / "ck", save_every=1, compile=False)
    from safetensors.torch import load_file

    for saved in (tmp_path / "ck").glob("step-*/lora.safetensors"):  # checkpoints before the divergence only
        assert all(t.isfinite().all() for t in load_file(saved).values())


# --- 4. concurrency, changed inputs, leftovers, messages --------------------------------------------


@pytest.mark.parametrize("kind", ["file", "dir"])
@pytest.mark.parametrize("renameat2", [True, False])
def test_an_output_that_appears_meanwhile_is_not_replaced(tmp_path, monkeypatch, kind, renameat2):
    if not renameat2:
        monkeypatch.setattr(_files, "_RENAMEAT2", [None])  # the fallback: link, or mkdir then rename
    out = tmp_path / ("o.st" if kind == "file" else "o")
    with pytest.raises(OutputExistsError, match="appeared while this run was writing it"):
        with atomic_output(out) as tmp:
            (tmp.write_bytes(b"mine") if kind == "file" else tmp.mkdir())
            out.mkdir() if kind == "dir" else out.write_bytes(b"theirs")  # another process, meanwhile
    assert (out.read_bytes() == b"theirs") if kind == "file" else (out.is_dir() and not any(out.iterdir()))
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_force_swaps_a_directory_atomically(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old").write_text("x")
    with atomic_output(out, force=True) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["new"] and [p.name for p in tmp_path.iterdir()] == ["o"]


def test_two_merges_to_one_output_one_wins(files, tmp_path):
    out = tmp_path / "m"
    args = [sys.executable, "-c", "import sys; from adapterops.cli import main; sys.exit(main())", "merge", "-b", str(files / "base"),
            "-a", str(files / "a.st"), "-o", str(out), "-q", "--json"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=120), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 1], results
    line = one_line(results[1][1])
    assert "already exists" in line or "appeared while this run was writing it" in line
    assert Checkpoint(out).names() and nothing_at(tmp_path / "elsewhere")


def test_a_base_shard_rewritten_during_the_merge_is_detected(files, tmp_path, monkeypatch):
    from adapterops import merging

    base = tmp_path / "base"
    make_base(base)
    shard = base / "model-00002-of-00002.safetensors"
    original = merging._merge_compute

    def overwrite_then_compute(tasks):
        if truncate:
            shard.write_bytes(shard.read_bytes())  # rewritten from scratch: empty for a moment
        else:
            with open(shard, "r+b") as f:  # the same bytes, written over in place
                data = f.read()
                f.seek(0)
                f.write(data)
        os.utime(shard, ns=(time.time_ns(), time.time_ns() + 10**9))
        return original(tasks)

    monkeypatch.setattr(merging, "_merge_compute", overwrite_then_compute)
    for truncate in (False, True):
        result = cli("merge", "-b", base, "-a", files / "a.st", "-o", tmp_path / "m")
        assert result.exit_code == 1 and "changed while being read" in one_line(result.stderr) and str(shard) in result.stderr
        assert nothing_at(tmp_path / "m")


def test_an_adapter_changed_before_the_commit_is_detected(files, tmp_path):
    (tmp_path / "a.st").write_bytes((files / "a.st").read_bytes())
    watched = Inputs([tmp_path / "a.st"])
    with pytest.raises(InputChangedError, match="a.st changed while being read"):
        with atomic_output(tmp_path / "o.st", inputs=watched) as tmp:
            tmp.write_bytes(b"x")
            (tmp_path / "a.st").write_bytes(b"other")
    assert nothing_at(tmp_path / "o.st")


def _dead_owner() -> str:
    """The owner tag of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    start = _files._start_time(proc.pid) or "0"
    proc.wait()
    return f"{_files._boot_id()}.{proc.pid}.{start}"


def test_leftovers_of_dead_runs_are_removed_and_said(files, tmp_path):
    out = tmp_path / "c.st"
    stale = tmp_path / f".c.st.tmp-{_dead_owner()}-deadbeef"
    stale.write_bytes(b"partial")
    live = tmp_path / f".c.st.tmp-{_files._owner_tag()}-cafef00d"  # this very process: kept
    live.write_bytes(b"in progress")
    foreign = tmp_path / ".c.st.tmp-notours"
    foreign.write_bytes(b"?")
    result = cli("compress", files / "a.st", "--rank", "1", "-o", out)
    assert result.exit_code == 0, result.output
    assert one_line(result.stderr) == f"Warning: removed {stale}, left behind by an interrupted run (process {stale.name.split('.')[4]} is gone)"
    assert not stale.exists() and live.exists() and foreign.exists() and out.is_file()
    assert remove_leftovers(out) == []


def test_disk_full_says_how_much_is_needed(files, tmp_path, monkeypatch):
    from adapterops import rewrite
    from adapterops.checkpoint import ShardWriter

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "tokenizer.json")

    monkeypatch.setattr(rewrite.shutil, "copyfile", full)  # a side file does not fit
    result = cli("merge", "-b", files / "base", "-a", files / "a.st", "-o", tmp_path / "m")
    line = one_line(result.stderr)
    assert result.exit_code == 1 and line.startswith(f"Error: no space left on device writing {tmp_path / 'm'} (needs ") and " free)" in line
    assert "tokenizer.json" not in line and nothing_at(tmp_path / "m")
    monkeypatch.undo()
    monkeypatch.setattr(ShardWriter, "add", full)
    result = cli("merge", "-b", files / "base", "-a", files / "a.st", "-o", tmp_path / "m")
    assert result.exit_code == 1 and "no space left on device writing" in one_line(result.stderr) and nothing_at(tmp_path / "m")


def test_usage_errors_are_one_line_with_exit_2(files, tmp_path):
    for args in (["merge", "-b", files / "base"], ["convert", files / "a.st", "--to", "nope", "-o", tmp_path / "x"], ["nocommand"]):
        result = cli(*args)
        assert result.exit_code == 2 and one_line(result.stderr).startswith("Error: ") and "-h')" in result.stderr, result.stderr
    bare = cli()  # no arguments at all: click's help, not an error line
    assert bare.exit_code == 2 and bare.output.startswith("Usage: ") and "Error" not in bare.output


def test_ctrl_c_after_the_output_is_published_exits_0(files, tmp_path, monkeypatch):
    from adapterops.cli import merge_commands

    def interrupted(data):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_commands, "_render_report", interrupted)
    result = cli("merge", "-b", files / "base", "-a", files / "a.st", "-o", tmp_path / "m")
    assert result.exit_code == 0 and Checkpoint(tmp_path / "m").names()
    monkeypatch.setattr(merge_commands, "_render_report", lambda d: f"{d['nope']}")  # a broken renderer: the JSON instead
    result = cli("merge", "-b", files / "base", "-a", files / "a.st", "-o", tmp_path / "m2")
    assert result.exit_code == 0 and json.loads(result.stdout)["op"] == "merge"


def test_ctrl_c_before_the_output_is_published_exits_130(files, tmp_path, monkeypatch):
    from adapterops import merging

    def interrupted(tasks):
        raise KeyboardInterrupt

    monkeypatch.setattr(merging, "_merge_compute", interrupted)
    result = cli("merge", "-b", files / "base", "-a", files / "a.st", "-o", tmp_path / "m")
    assert result.exit_code == 130 and one_line(result.stderr) == "Error: interrupted" and nothing_at(tmp_path / "m")


def test_ctrl_c_during_the_rename_is_delivered_after_it(tmp_path, monkeypatch):
    commit = _files._commit

    def interrupted_commit(tmp, path, *, force):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the rename is under way
        commit(tmp, path, force=force)

    monkeypatch.setattr(_files, "_commit", interrupted_commit)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(tmp_path / "o.st") as tmp:
            tmp.write_bytes(b"complete")
    assert (tmp_path / "o.st").read_bytes() == b"complete" and _files.committed(tmp_path / "o.st")


def test_empty_paths_are_usage_errors(files, tmp_path):
    """An empty argument is the current directory to the OS: ``-o ""`` would mean ``-o .``."""
    for args in (["info", ""], ["merge", "-b", "", "-a", files / "a.st", "-o", tmp_path / "m"],
                 ["merge", "-b", files / "base", "-a", files / "a.st", "-o", " "], ["train", "-b", files / "base", "--data", "", "-o", tmp_path / "t"]):
        result = cli(*args)
        assert result.exit_code == 2 and ("an empty path" in one_line(result.stderr) or "a blank path" in result.stderr), result.stderr
    assert os.listdir(tmp_path) == []


def test_pipes_and_dangling_links_are_named_for_what_they_are(files, tmp_path):
    fifo = tmp_path / "fifo.st"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    out = tmp_path / "out.st"
    assert refused(["info", fifo], [], out, "fifo.st: not a regular file (a pipe, socket or device)")
    assert refused(["train", "-b", files / "base", "--data", fifo, "-o", out], [files / "base"], out, "not a regular file")
    assert refused(["info", tmp_path / "loop1"], [], out, "loop1: a symbolic link that leads nowhere")


def test_a_name_as_long_as_the_file_system_allows_is_an_output(files, tmp_path):
    """The hidden temporary ``.NAME.tmp-OWNER-*`` cannot be longer than 255 bytes: a long NAME is cut in it."""
    from adapterops._files import hidden_prefix

    out = tmp_path / ("x" * 251 + ".st")
    for force in ([], ["--force"]):
        result = cli("compress", files / "a.st", "--rank", "1", "-o", out, *force)
        assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path)) == [out.name]
    assert len(hidden_prefix(out).encode()) < 200 and hidden_prefix(out) != hidden_prefix(out.with_name("x" * 251 + ".sx"))
    stale = tmp_path / f"{hidden_prefix(out)}tmp-{_dead_owner()}-deadbeef"
    stale.write_bytes(b"partial")
    with pytest.warns(UserWarning, match="left behind by an interrupted run"):
        assert remove_leftovers(out) == [stale]
    assert not stale.exists()


def test_notes_that_cannot_be_written_do_not_stop_the_work_or_move_to_stdout(files, tmp_path):
    from safety_helpers import CLI

    out = tmp_path / "c.st"
    stale = tmp_path / f".c.st.tmp-{_dead_owner()}-deadbeef"  # its removal is said on stderr
    stale.write_bytes(b"partial")
    with open("/dev/full", "w") as full:
        done = subprocess.run([*CLI, "compress", files / "a.st", "--rank", "1", "-o", out], stdout=subprocess.DEVNULL, stderr=full, timeout=120)
    assert done.returncode == 0 and out.is_file() and not stale.exists()
    close_stderr = {"capture_output": True, "text": True, "timeout": 120, "preexec_fn": lambda: os.close(2)}
    missing = subprocess.run([*CLI, "info", tmp_path / "none.st"], **close_stderr)
    usage = subprocess.run([*CLI, "info", "--bogus"], **close_stderr)
    assert (missing.returncode, missing.stdout, usage.returncode, usage.stdout) == (1, "", 2, "")


def test_an_output_that_cannot_be_written_is_refused_before_the_work(files, tmp_path, monkeypatch):
    """A directory without write permission (a read-only file system alike) fails up front, naming
    the directory, also where the output would go into folders not made yet; a write that fails
    later names the output, not its hidden temporary."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real(p, mode, **kw))
    for out in (locked / "c.st", locked / "new" / "dir" / "c.st"):
        line = refused(["compress", files / "a.st", "--rank", "1", "-o", out], [files / "a.st"], out,
                       f"{out}: cannot write into {locked} (no permission to write there); choose another output path")
        assert line.count("Error:") == 1
    monkeypatch.undo()
    from adapterops.checkpoint import ShardWriter

    def fails(self, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(self.path))  # the shard inside the temporary

    monkeypatch.setattr(ShardWriter, "add", fails)
    out = tmp_path / "m"
    refused(["merge", "-b", files / "base", "-a", files / "a.st", "-o", out], [files / "base"], out, f"Error: {out}: Input/output error")


def test_a_checkpoint_directory_that_cannot_be_written_is_refused_before_training(files, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real(p, mode, **kw))
    result = cli("train", "-b", files / "base", "--data", files / "data.jsonl", "-o", tmp_path / "a.st", "--checkpoint-dir", locked / "ck")
    assert result.exit_code == 1
    assert one_line(result.stderr) == f"Error: {locked / 'ck'}: cannot write into {locked} (no permission to write there); choose another output path"
    assert os.listdir(tmp_path) == ["locked"]


def test_a_torchrun_variable_that_is_not_a_number_is_one_line(files, tmp_path):
    """train reads RANK first (only process 0 talks); the others are read through the same helper."""
    result = cli("train", "-b", files / "base", "--data", files / "data.jsonl", "-o", tmp_path / "a.st", "--device", "cpu", RANK="abc")
    assert result.exit_code == 1 and one_line(result.stderr) == "Error: RANK='abc' in the environment is not an integer (is this run started by torchrun?)"
