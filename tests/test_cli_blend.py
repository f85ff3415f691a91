"""``adapterops blend --method ...`` through click's CliRunner: results, --json report, errors."""

import json

import pytest
import torch
from click.testing import CliRunner

import adapterops as ao
from adapterops import Adapter, LoraLayer
from adapterops.cli import main

SHAPES = {"model.layers.0.self_attn.q_proj": (32, 24), "model.layers.0.mlp.up_proj": (40, 24)}


def adapter(seed: int, rank: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter(
        {n: LoraLayer(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g), 2.0 * rank) for n, (o, i) in SHAPES.items()},
        {"base_model": "tiny"},
    )


@pytest.fixture
def files(tmp_path):
    adapter(1, 4).save(tmp_path / "a.st")
    adapter(2, 6).save(tmp_path / "b.st")
    adapter(3, 4).save(tmp_path / "c.st")
    return tmp_path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    return result


def inputs(files, names="abc"):
    return [ao.load(files / f"{n}.st") for n in names]


def test_ties_with_json_report_matches_the_library(files):
    result = ok("blend", files / "a.st", files / "b.st", files / "c.st", "--weights", "0.5,0.3,0.2", "--method", "ties",
                "--density", "0.4", "--majority-sign", "frequency", "-o", files / "out.st", "--json")
    data = json.loads(result.stdout)
    want = ao.blend(inputs(files), [0.5, 0.3, 0.2], "ties", 0.4, majority_sign="frequency")
    out = ao.load(files / "out.st")
    assert data["method"] == "ties" and data["rank"] == 6
    assert data["layers"] == {n: {"rank": 6, "energy_kept": pytest.approx(row["energy_kept"], rel=1e-6)}
                              for n, row in want.metadata["blend"]["layers"].items()}
    assert all(0 < row["energy_kept"] < 1 for row in data["layers"].values())
    for name in SHAPES:
        torch.testing.assert_close(out.delta(name), want.delta(name))


def test_human_output_names_the_method_and_the_energy_kept(files):
    result = ok("blend", files / "a.st", files / "b.st", "-m", "magnitude_prune", "--density", "0.5", "--rank", "3", "-o", files / "o.st")
    assert result.stdout.startswith(f"wrote {files / 'o.st'}: 2 layers, rank 3")
    assert "(magnitude_prune); energy kept per layer: min 0." in result.stdout


@pytest.mark.parametrize("method, extra", [("dare_ties", []), ("della", ["--epsilon", "0.1"]), ("dare_linear", [])])
def test_random_methods_are_reproducible_by_seed(files, method, extra):
    common = [files / "a.st", files / "b.st", "--method", method, "--density", "0.5", *extra]
    ok("blend", *common, "--seed", "4", "-o", files / "one.st")
    ok("blend", *common, "--seed", "4", "-o", files / "two.st")
    ok("blend", *common, "--seed", "5", "-o", files / "three.st")
    one, two, three = (ao.load(files / f"{n}.st") for n in ("one", "two", "three"))
    want = ao.blend(inputs(files, "ab"), None, method, 0.5, seed=4, **({"epsilon": 0.1} if extra else {}))
    for name in SHAPES:
        assert torch.equal(one.delta(name), two.delta(name))
        assert not torch.allclose(one.delta(name), three.delta(name))
        torch.testing.assert_close(one.delta(name), want.delta(name))


@pytest.mark.parametrize("option, value, rule", [("--rank", "2", {"rank": 2}), ("--energy", "0.7", {"energy": 0.7}), ("--budget", "400", {"budget": 400})])
def test_rank_rules(files, option, value, rule):
    ok("blend", files / "a.st", files / "b.st", "--method", "breadcrumbs", "--density", "0.6", "--gamma", "0.05", option, value, "-o", files / "o.st")
    want = ao.blend(inputs(files, "ab"), None, "breadcrumbs", 0.6, gamma=0.05, **rule)
    out = ao.load(files / "o.st")
    assert out.ranks == want.ranks
    if "budget" in rule:
        assert out.num_params <= 400


BAD = {
    "density needed": (["--method", "ties"], "ties needs density"),
    "option not taken": (["--method", "ties", "--density", "0.5", "--gamma", "0.1"], "ties does not take gamma"),
    "unknown method": (["--method", "soup"], "unknown merge method 'soup'"),
    "density range": (["--method", "ties", "--density", "1.5"], "--density"),
    "epsilon range": (["--method", "della", "--density", "0.5", "--epsilon", "0.7"], "lower epsilon"),
    "two rules": (["--method", "ties", "--density", "0.5", "--rank", "2", "--energy", "0.5"], "only one of --rank, --energy, --budget"),
    "bad sign": (["--method", "ties", "--density", "0.5", "--majority-sign", "mass"], "--majority-sign"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_one_error_line_and_writes_nothing(files, case):
    args, words = BAD[case]
    before = sorted(p.name for p in files.iterdir())
    result = run("blend", files / "a.st", files / "b.st", *args, "-o", files / "out.st")
    assert result.exit_code != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and words in errors[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert sorted(p.name for p in files.iterdir()) == before


def test_blend_output_loads_in_peft(files, tmp_path):
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.model.layers[0].self_attn = torch.nn.Module()
            self.model.layers[0].self_attn.q_proj = torch.nn.Linear(24, 32, bias=False)
            self.model.layers[0].mlp = torch.nn.Module()
            self.model.layers[0].mlp.up_proj = torch.nn.Linear(24, 40, bias=False)

    ok("blend", files / "a.st", files / "b.st", "--method", "dare_ties", "--density", "0.5", "-o", tmp_path / "peft_out")
    model = peft.PeftModel.from_pretrained(Tiny(), tmp_path / "peft_out")
    want = ao.load(tmp_path / "peft_out")
    for name in SHAPES:
        module = model.base_model.model.get_submodule(name)
        torch.testing.assert_close(module.get_delta_weight("default"), want.delta(name))
