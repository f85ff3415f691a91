"""adapterops blend / compress / info / convert through click's CliRunner, bad input included."""

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import adapterops as ao
from adapterops import Adapter, LoraLayer
from adapterops.cli import main

ROOT = Path(__file__).resolve().parent.parent
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"


def adapter(seed: int, rank: int = 4, alpha: float = 8, v_out: int = 12) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter(
        {
            Q: LoraLayer(torch.randn(rank, 24, generator=g), torch.randn(24, rank, generator=g), alpha),
            V: LoraLayer(torch.randn(rank, 24, generator=g), torch.randn(v_out, rank, generator=g), alpha),
        },
        {"base_model": "tiny"},
    )


@pytest.fixture
def files(tmp_path):
    """Two compatible adapters, one with a different v_proj shape, one with NaN, one corrupt file."""
    adapter(1).save(tmp_path / "a.st")
    adapter(2, rank=2, alpha=3).save(tmp_path / "b.st")
    adapter(3, v_out=8).save(tmp_path / "other_model.st")
    nan = adapter(4)
    B = nan[V].B.clone()
    B[0, 0] = float("nan")
    Adapter({**nan, V: LoraLayer(nan[V].A, B, nan[V].alpha)}).save(tmp_path / "nan.st", allow_nonfinite=True)
    dora = adapter(5)
    Adapter({n: LoraLayer(layer.A, layer.B, layer.alpha, magnitude=torch.rand(layer.shape[0])) for n, layer in dora.items()}).save(tmp_path / "dora.st")
    (tmp_path / "corrupt.st").write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00{garbage")
    (tmp_path / "notes.txt").write_text("not an adapter")
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, str(tmp_path / "weights.safetensors"))
    return tmp_path


def run(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def ok(*args: str):
    result = run(*args)
    assert result.exit_code == 0, (result.output, result.stderr)
    assert "Traceback" not in result.output + result.stderr
    return result


def assert_deltas(a: Adapter, expected: dict[str, torch.Tensor], atol=1e-5) -> None:
    assert sorted(a) == sorted(expected)
    for name, d in expected.items():
        torch.testing.assert_close(a.delta(name), d, atol=atol, rtol=1e-5)


# ---------------------------------------------------------------- success


def test_blend_with_weights(files):
    result = ok("blend", files / "a.st", files / "b.st", "--weights", "0.6,0.4", "-o", files / "out.st", "--json")
    data = json.loads(result.stdout)
    out = ao.load(files / "out.st")
    assert data == {
        "output": str(files / "out.st"), "format": "native", "num_layers": 2, "rank": 6, "num_params": out.num_params,
        "method": "linear", "layers": {n: {"rank": 6, "energy_kept": 1.0} for n in out},
    }
    a, b = ao.load(files / "a.st"), ao.load(files / "b.st")
    assert_deltas(out, {n: 0.6 * a.delta(n) + 0.4 * b.delta(n) for n in a})
    assert result.stderr == ""


def test_blend_defaults_to_equal_weights_and_peft_for_directories(files):
    ok("blend", files / "a.st", files / "b.st", "-o", files / "mix")
    out = ao.load(files / "mix")
    assert out.metadata["format"] == "peft"
    a, b = ao.load(files / "a.st"), ao.load(files / "b.st")
    assert_deltas(out, {n: 0.5 * a.delta(n) + 0.5 * b.delta(n) for n in a})


@pytest.mark.parametrize(("option", "value"), [("--rank", "3"), ("--energy", "0.8"), ("--budget", "150")])
def test_blend_then_compress(files, option, value):
    result = ok("blend", files / "a.st", files / "b.st", "--weights", "1,-0.5", option, value, "-o", files / "out.st", "--json")
    out = ao.load(files / "out.st")
    rule = {"--rank": "rank", "--energy": "energy", "--budget": "budget"}[option]
    exact = ao.blend([ao.load(files / "a.st"), ao.load(files / "b.st")], [1, -0.5])
    expected = exact.compress(**{rule: float(value) if rule == "energy" else int(value)})
    assert_deltas(out, {n: expected.delta(n) for n in expected})
    assert json.loads(result.stdout)["rank"] == expected.rank
    if option == "--rank":
        assert out.rank == 3
    if option == "--budget":
        assert out.num_params <= 150


def test_compress(files):
    result = ok("compress", files / "a.st", "--rank", "2", "-o", files / "small.st", "--json")
    data = json.loads(result.stdout)
    source, small = ao.load(files / "a.st"), ao.load(files / "small.st")
    assert small.ranks == {Q: 2, V: 2} and data["ranks"] == {Q: 2, V: 2}
    assert data["rank_before"] == 4 and data["params_before"] == source.num_params and data["num_params"] == small.num_params
    # relative error: the discarded singular values of the dense deltas, over the total
    discarded = total = 0.0
    for name in source:
        S = torch.linalg.svdvals(source.delta(name).double())
        discarded += float((S[2:] ** 2).sum())
        total += float((S**2).sum())
    assert data["relative_error"] == pytest.approx(math.sqrt(discarded / total), rel=1e-4)
    text = ok("compress", files / "a.st", "--energy", "0.5", "-o", files / "e.st").stdout
    assert re.match(rf"wrote {re.escape(str(files / 'e.st'))}: 2 layers, rank \d, [\d,]+ params \(was rank 4", text)


def test_info(files):
    data = json.loads(ok("info", files / "b.st", "--json").stdout)
    b = ao.load(files / "b.st")
    assert data["format"] == "native" and data["num_layers"] == 2 and data["rank"] == 2 and data["dora"] is False
    assert data["num_params"] == b.num_params and data["file_size"] == (files / "b.st").stat().st_size
    assert data["base_model"] == "tiny" and data["dtypes"] == ["float32"] and data["nonfinite_layers"] == []
    layers = {row["name"]: row for row in data["layers"]}
    assert layers[V]["shape"] == [12, 24] and layers[V]["alpha"] == 3 and layers[V]["scale"] == 1.5
    assert layers[V]["norm"] == pytest.approx(float(torch.linalg.matrix_norm(1.5 * b[V].B.double() @ b[V].A.double())), rel=1e-5)
    text = ok("info", files / "b.st").stdout
    assert "layers: 2" in text and V in text and "12x24" in text


@pytest.mark.parametrize(("fmt", "name"), [("peft", "conv"), ("kohya", "conv.safetensors"), ("native", "conv.st")])
def test_convert(files, fmt, name):
    data = json.loads(ok("convert", files / "a.st", "--to", fmt, "-o", files / name, "--json").stdout)
    assert data["format"] == fmt
    a, out = ao.load(files / "a.st"), ao.load(files / name)
    assert out.metadata["format"] == fmt
    for n in a:
        assert torch.equal(out[n].A, a[n].A) and torch.equal(out[n].B, a[n].B) and out[n].alpha == a[n].alpha


def test_force_overwrites(files):
    ok("blend", files / "a.st", files / "b.st", "-o", files / "out.st")
    ok("compress", files / "a.st", "--rank", "1", "-o", files / "out.st", "--force")
    assert ao.load(files / "out.st").rank == 1
    ok("convert", files / "a.st", "--to", "peft", "-o", files / "out.st", "--force")  # a file replaced by a directory
    assert ao.load(files / "out.st").metadata["format"] == "peft"


def test_info_and_convert_on_dora(files):
    data = json.loads(ok("info", files / "dora.st", "--json").stdout)
    assert data["dora"] is True and data["norm"] is None and all(row["norm"] is None for row in data["layers"])
    assert "DoRA" in ok("info", files / "dora.st").stdout
    ok("convert", files / "dora.st", "--to", "peft", "-o", files / "dora_peft")
    assert ao.load(files / "dora_peft").is_dora


def test_allow_nonfinite(files):
    data = json.loads(ok("info", files / "nan.st", "--allow-nonfinite", "--json").stdout)
    assert data["nonfinite_layers"] == [V] and data["norm"] is None
    ok("convert", files / "nan.st", "--to", "kohya", "-o", files / "nan.safetensors", "--allow-nonfinite")
    assert ao.load(files / "nan.safetensors", allow_nonfinite=True).nonfinite_layers() == [V]
    ok("blend", files / "nan.st", files / "a.st", "-o", files / "nanmix.st", "--allow-nonfinite")


def test_json_output_is_strict_json_even_for_huge_and_infinite_values(files):
    huge = Adapter({n: LoraLayer(layer.A, layer.B * 1e18, layer.alpha) for n, layer in adapter(1).items()})
    huge.save(files / "huge.st")  # finite, but the squares of its entries overflow float32
    strict = {"parse_constant": lambda word: pytest.fail(f"{word} is not JSON")}
    summary = json.loads(ok("compare", files / "huge.st", files / "huge.st", "--json").stdout, **strict)["summary"]
    expected = 1e18 * math.sqrt(sum(float(torch.linalg.matrix_norm(layer.delta().double())) ** 2 for layer in adapter(1).values()))
    assert summary["norm_a"] == pytest.approx(expected, rel=1e-6) and summary["cosine"] == pytest.approx(1.0)
    data = json.loads(ok("info", files / "nan.st", "--allow-nonfinite", "--json").stdout, **strict)
    assert data["nonfinite_layers"] == [V]
    from adapterops.cli._common import strict_json

    assert json.loads(strict_json({"x": float("nan"), "y": [float("-inf")], "s": "NaN or Infinity"}), **strict) == {
        "x": None, "y": [None], "s": "NaN or Infinity"}


# ---------------------------------------------------------------- bad input


BAD = {
    "missing file": (["info", "{d}/missing.st"], "missing.st: no such file or directory"),
    "missing blend input": (["blend", "{d}/a.st", "{d}/missing.st", "-o", "{d}/out.st"], "missing.st: no such file or directory"),
    "missing compress input": (["compress", "{d}/missing", "--rank", "2", "-o", "{d}/out.st"], "no such file or directory"),
    "corrupt file": (["convert", "{d}/corrupt.st", "--to", "peft", "-o", "{d}/out"], "corrupt.st: not a readable safetensors file"),
    "corrupt blend input": (["blend", "{d}/a.st", "{d}/corrupt.st", "-o", "{d}/out.st"], "not a readable safetensors file"),
    "unknown format": (["info", "{d}/notes.txt"], "notes.txt: not a recognised adapter"),
    "not an adapter": (["compress", "{d}/weights.safetensors", "--rank", "2", "-o", "{d}/out.st"], "not a recognised adapter"),
    "unknown target format": (["convert", "{d}/a.st", "--to", "onnx", "-o", "{d}/out.onnx"], "'onnx' is not one of"),
    "gguf without a base": (["convert", "{d}/a.st", "--to", "gguf", "-o", "{d}/out.gguf"], "a GGUF adapter needs its base model"),
    "bad output name": (["convert", "{d}/a.st", "--to", "kohya", "-o", "{d}/out.bin"], "a kohya adapter is one file named"),
    "weights count": (["blend", "{d}/a.st", "{d}/b.st", "--weights", "0.6,0.3,0.1", "-o", "{d}/out.st"], "--weights has 3 values for 2 adapters"),
    "weights not numbers": (["blend", "{d}/a.st", "{d}/b.st", "--weights", "0.6,x", "-o", "{d}/out.st"], "expected comma-separated numbers"),
    "weights with an empty field": (["blend", "{d}/a.st", "{d}/b.st", "--weights", "0.6,,0.4", "-o", "{d}/out.st"], "expected comma-separated numbers"),
    "weights trailing comma": (["blend", "{d}/a.st", "{d}/b.st", "--weights", "0.6,0.4,", "-o", "{d}/out.st"], "expected comma-separated numbers"),
    "weights empty": (["blend", "{d}/a.st", "{d}/b.st", "--weights", "", "-o", "{d}/out.st"], "expected comma-separated numbers"),
    "weights with underscores": (["blend", "{d}/a.st", "{d}/b.st", "--weights", "1_0,1", "-o", "{d}/out.st"], "expected comma-separated numbers"),
    "shape mismatch": (["blend", "{d}/a.st", "{d}/other_model.st", "-o", "{d}/out.st"], f"layer {V}: delta shapes differ ([12, 24] vs [8, 24])"),
    "nan blend": (["blend", "{d}/a.st", "{d}/nan.st", "-o", "{d}/out.st"], f"NaN or Inf in 1 layer(s), e.g. {V}"),
    "nan ties blend": (["blend", "{d}/a.st", "{d}/nan.st", "-m", "ties", "--density", "0.5", "--allow-nonfinite", "-o", "{d}/out.st"],
                       f"layer {V} holds NaN or Inf, which method 'ties' cannot work with"),
    "nan tsv blend": (["blend", "{d}/a.st", "{d}/nan.st", "-m", "tsv", "--allow-nonfinite", "-o", "{d}/out.st"], "which method 'tsv' cannot work with"),
    "nan info": (["info", "{d}/nan.st"], "--allow-nonfinite"),
    "nan convert": (["convert", "{d}/nan.st", "--to", "peft", "-o", "{d}/out"], "NaN or Inf"),
    "nan compress allowed": (["compress", "{d}/nan.st", "--rank", "2", "-o", "{d}/out.st", "--allow-nonfinite"], "cannot compute the SVD of layers holding NaN or Inf"),
    "dora blend": (["blend", "{d}/a.st", "{d}/dora.st", "-o", "{d}/out.st"], "not defined for DoRA adapters"),
    "dora compress": (["compress", "{d}/dora.st", "--rank", "1", "-o", "{d}/out.st"], "compress is not defined for DoRA"),
    "output exists": (["blend", "{d}/a.st", "{d}/b.st", "-o", "{d}/b.st"], "is also an input"),
    "output exists compress": (["compress", "{d}/a.st", "--rank", "1", "-o", "{d}/b.st"], "b.st already exists; pass --force"),
    "output exists convert": (["convert", "{d}/a.st", "--to", "native", "-o", "{d}/b.st"], "already exists; pass --force"),
    "in place even with force": (["compress", "{d}/a.st", "--rank", "1", "-o", "{d}/a.st", "--force"], "is also an input"),
    "two rules": (["compress", "{d}/a.st", "--rank", "1", "--energy", "0.5", "-o", "{d}/out.st"], "give only one of --rank, --energy, --budget"),
    "no rule": (["compress", "{d}/a.st", "-o", "{d}/out.st"], "give one of --rank, --energy, --budget"),
    "energy out of range": (["compress", "{d}/a.st", "--energy", "1.5", "-o", "{d}/out.st"], "--energy"),
    "zero rank": (["blend", "{d}/a.st", "--rank", "0", "-o", "{d}/out.st"], "--rank"),
    "zero result": (["blend", "{d}/a.st", "{d}/a.st", "--weights", "1,-1", "--rank", "2", "-o", "{d}/out.st"], "cannot save an adapter with no layers"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_one_error_line(files, case):
    args, words = BAD[case]
    before = {p.name: p.stat().st_mtime_ns for p in files.iterdir()}
    result = run(*(a.format(d=files) for a in args))
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert words in errors[0], errors[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    after = {p.name: p.stat().st_mtime_ns for p in files.iterdir()}
    assert after == before  # nothing written, nothing touched, no temporary left behind


def test_debug_env_shows_the_traceback(files, monkeypatch):
    monkeypatch.setenv("ADAPTEROPS_DEBUG", "1")
    result = run("info", files / "corrupt.st")
    assert result.exit_code != 0 and isinstance(result.exception, ao.errors.FormatError)


def test_issue_spelling_of_commands():
    """The options the issue promises exist under these exact names."""
    runner = CliRunner()
    usage = {name: runner.invoke(main, [name, "--help"]).output for name in ("blend", "compress", "info", "convert")}
    for flag in ("--weights", "--rank", "--energy", "--budget", "-o,", "--force", "--allow-nonfinite", "--json"):
        assert flag in usage["blend"], flag
    for flag in ("--rank", "--energy", "--budget", "-o,", "--force", "--json"):
        assert flag in usage["compress"], flag
    assert "--json" in usage["info"]
    assert "--to [peft|native|kohya|gguf]" in usage["convert"] and "-o," in usage["convert"]


# ---------------------------------------------------------------- examples and the README


def test_examples_are_reproducible(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_examples.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("code.st", "math.st"):
        assert (tmp_path / name).read_bytes() == (ROOT / "examples" / name).read_bytes(), name
        assert (ROOT / "examples" / name).stat().st_size < 200_000


def test_examples_fit_smollm2(smollm2_dir):
    from safetensors import safe_open

    shapes = {}
    for shard in smollm2_dir.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            shapes.update({k.removesuffix(".weight"): tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    for name in ("code.st", "math.st"):
        example = ao.load(ROOT / "examples" / name)
        assert len(example) == 8
        for module, layer in example.items():
            assert shapes[module] == layer.shape, module


def readme_try_it_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Try it", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_readme_try_it_commands_work(tmp_path):
    commands = readme_try_it_commands()
    assert commands and all(c.startswith("adapterops ") for c in commands)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    script = shutil.which("adapterops", path=str(Path(sys.executable).parent)) or shutil.which("adapterops")
    for command in commands:
        argv = shlex.split(command)
        if script:  # the installed console script, exactly as a user types it
            done = subprocess.run([script, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "ADAPTEROPS_DEBUG": ""})
            assert done.returncode == 0, (command, done.stderr)
            assert "Error" not in done.stderr
        else:
            cwd = os.getcwd()
            os.chdir(tmp_path)
            try:
                assert run(*argv[1:]).exit_code == 0, command
            finally:
                os.chdir(cwd)
    assert (tmp_path / "blend.st").is_file()


def test_readme_algebra_snippet_runs(monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Adapters as values", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(ROOT)
    exec(compile(code, "README.md", "exec"), {})
