"""The merge, unmerge and extract commands, through click's CliRunner (and one real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from merge_helpers import hub_cache, peft_model, read_all, save_tiny_llama, tiny_llama_model

import adapterops
from adapterops import Adapter, LoraLayer
from adapterops.checkpoint import Checkpoint
from adapterops.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    base = save_tiny_llama(tmp / "base", dtype=torch.float32)
    ck = Checkpoint(base)
    g = torch.Generator().manual_seed(0)
    layers = {
        n[: -len(".weight")]: LoraLayer(torch.randn(2, ck.shape(n)[1], generator=g) * 0.1, torch.randn(ck.shape(n)[0], 2, generator=g) * 0.1, 4.0)
        for n in ck.names() if "q_proj" in n or "down_proj" in n
    }
    Adapter(layers).save(tmp / "a.st")
    Adapter({k: v for k, v in list(layers.items())[:2]}).save(tmp / "b.st")
    return tmp


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_merge_json_and_unmerge_round_trip(files, tmp_path):
    result = invoke("merge", "--base", files / "base", "--adapter", files / "a.st", "--out", tmp_path / "m", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["op"] == "merge" and data["totals"]["merged"] == 4 and data["weights"] == [1.0]
    assert sorted(r["name"] for r in data["rows"]) == sorted(f"{n}.weight" for n in adapterops.load(files / "a.st"))
    result = invoke("unmerge", "--base", tmp_path / "m", "--adapter", files / "a.st", "--out", tmp_path / "back", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["weights"] == [-1.0]
    original, back = read_all(files / "base"), read_all(tmp_path / "back")
    for name, t in original.items():
        torch.testing.assert_close(back[name], t, rtol=0, atol=1e-6)


def test_merge_human_output_and_weights(files, tmp_path):
    result = invoke("merge", "-b", files / "base", "-a", files / "a.st", "-a", files / "b.st", "-w", "0.5,2", "-o", tmp_path / "m", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "merged 2 adapter(s) into 4 of" in out and "dtype bfloat16" in out and "tensor (largest changes first)" in out
    assert all(t.dtype == torch.bfloat16 for t in read_all(tmp_path / "m").values())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapter", "{tmp}/missing.st"], "Error: {tmp}/missing.st: no such file or directory"),
        (["--adapter", "{files}/a.st", "--out", "{files}/base"], "Error: {files}/base is also an input: writing there would overwrite it, and inputs are never overwritten, not even with --force; choose another output path"),
        (["--adapter", "{files}/a.st", "--out", "{files}/base", "--force"], "Error: {files}/base is also an input: writing there would overwrite it, and inputs are never overwritten, not even with --force; choose another output path"),
        (["--adapter", "{files}/a.st", "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "Error: device cuda"),
    ],
)
def test_merge_errors_are_one_line(files, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, files=files) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "m")]
    result = invoke("merge", "--base", files / "base", *args)
    assert result.exit_code == 1
    line = message.format(tmp=tmp_path, files=files)
    assert result.output.startswith(line) and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "m").exists()


def test_merge_shape_mismatch_is_one_line(files, tmp_path):
    Adapter({"model.layers.0.self_attn.q_proj": LoraLayer(torch.zeros(2, 7), torch.zeros(64, 2), 2.0)}).save(tmp_path / "bad.st")
    result = invoke("merge", "-b", files / "base", "-a", tmp_path / "bad.st", "-o", tmp_path / "m")
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {tmp_path / 'bad.st'}: 1 shape mismatch(es): model.layers.0.self_attn.q_proj: adapter delta is [64, 7], "
        "base model.layers.0.self_attn.q_proj.weight is [64, 64] -- was this adapter trained on another model?\n"
    )


def test_weights_count_is_a_usage_error(files, tmp_path):
    result = invoke("merge", "-b", files / "base", "-a", files / "a.st", "-w", "1,2", "-o", tmp_path / "m")
    assert result.exit_code == 2 and "--weights has 2 values for 1 adapters" in result.output


def test_unmerge_refuses_dora(tmp_path):
    model = tiny_llama_model(torch.float32)
    model.save_pretrained(tmp_path / "base")
    peft_model(model, ["q_proj"], dora=True).save_pretrained(tmp_path / "dora")
    result = invoke("unmerge", "-b", tmp_path / "base", "-a", tmp_path / "dora", "-o", tmp_path / "out")
    assert result.exit_code == 1 and result.output.startswith(f"Error: {tmp_path / 'dora'} is a DoRA adapter: unmerge is not defined for DoRA")


def test_extract_command(files, tmp_path):
    invoke("merge", "-b", files / "base", "-a", files / "a.st", "-o", tmp_path / "tuned")
    result = invoke("extract", "--base", files / "base", "--tuned", tmp_path / "tuned", "--rank", 2, "-o", tmp_path / "x.st", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["num_layers"] == 4 and data["rank"] == 2 and data["rule"] == "rank" and data["method"] == "randomized"
    assert all(v["energy"] > 0.9999 for v in data["layers"].values())
    human = invoke("extract", "-b", files / "base", "-t", tmp_path / "tuned", "--energy", 0.9, "-o", tmp_path / "peft_dir", "--format", "peft")
    assert human.exit_code == 0 and "energy captured per layer: min" in human.stdout
    assert (tmp_path / "peft_dir" / "adapter_config.json").is_file()
    both = invoke("extract", "-b", files / "base", "-t", tmp_path / "tuned", "--rank", 2, "--energy", 0.5, "-o", tmp_path / "y.st")
    assert both.exit_code == 2 and "exactly one of --rank or --energy" in both.output
    exists = invoke("extract", "-b", files / "base", "-t", tmp_path / "tuned", "--rank", 2, "-o", tmp_path / "x.st")
    assert exists.exit_code == 1 and exists.output == f"Error: {tmp_path / 'x.st'} already exists; pass --force to overwrite it\n"


def test_hub_id_through_the_environment_in_a_subprocess(files, tmp_path):
    """A real process: HF_HUB_CACHE alone points huggingface_hub at the cache, offline."""
    hub_cache(tmp_path / "hub", "org/tiny", files / "base")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = "import sys; from adapterops.cli import main; sys.exit(main())"
    args = ["merge", "-b", "org/tiny", "-a", str(files / "a.st"), "-o", str(tmp_path / "m"), "--json"]
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["base"] == "org/tiny"
    assert done.stderr.count("merge:") == 0  # no progress bar when stderr is not a terminal
    assert sorted(Path(tmp_path / "m").iterdir()) != []
    missing = subprocess.run([sys.executable, "-c", code, "merge", "-b", "org/absent", "-a", str(files / "a.st"), "-o", str(tmp_path / "n")],
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "Error: org/absent: not a local path, and not in the Hugging Face cache (offline mode is on); download it first or pass a directory"
    ]


def test_a_device_that_is_not_here_is_named(monkeypatch):
    """cuda:N past the GPUs torch sees (and devices adapterops does not compute on) fail before any work."""
    from adapterops.errors import AdapterOpsError
    from adapterops.rewrite import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(AdapterOpsError, match=r"^device cuda:2 was asked for, but torch sees 2 CUDA GPU\(s\) here \(cuda:0 to cuda:1\)$"):
        resolve_device("cuda:2")
    with pytest.raises(AdapterOpsError, match="^device meta is not one adapterops computes on"):
        resolve_device("meta")
