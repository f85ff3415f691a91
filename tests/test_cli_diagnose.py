"""adapterops diagnose / compare through click's CliRunner, bad input included."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from adapterops import Adapter, LoraLayer
from adapterops.cli import main
from adapterops.diagnostics import Comparison, DiagnosisReport

Q, V = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTEROPS_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def files(tmp_path):
    """A bf16 base, an adapter for it, a second adapter, an adapter for another model."""
    g = torch.Generator().manual_seed(0)
    base = {Q + ".weight": torch.randn(32, 24, generator=g), V + ".weight": torch.randn(16, 24, generator=g)}
    (tmp_path / "base").mkdir()
    save_file({k: v.to(torch.bfloat16) for k, v in base.items()}, str(tmp_path / "base" / "model.safetensors"))

    def adapter(seed, scale=1.0, v_out=16):
        g = torch.Generator().manual_seed(seed)
        return Adapter({
            Q: LoraLayer(torch.randn(4, 24, generator=g), scale * torch.randn(32, 4, generator=g), 4.0),
            V: LoraLayer(torch.randn(4, 24, generator=g), scale * torch.randn(v_out, 4, generator=g), 4.0),
        })

    adapter(1, scale=3.0).save(tmp_path / "a.st")
    adapter(2).save(tmp_path / "b.st")
    (-1 * adapter(1, scale=3.0)).save(tmp_path / "neg_a.st")
    nan = adapter(4)
    Adapter({**nan, Q: LoraLayer(nan[Q].A, nan[Q].B * float("nan"), 4.0)}).save(tmp_path / "nan.st", allow_nonfinite=True)
    adapter(3, v_out=8).save(tmp_path / "other_model.st")
    return tmp_path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, (result.output, result.stderr)
    return result


def fails(*args, match: str):
    result = run(*args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and match in lines[0], result.stderr
    return lines[0]


def test_diagnose_json_without_base(files):
    data = json.loads(ok("diagnose", files / "a.st", "--json").stdout)
    report = DiagnosisReport.from_dict(data)
    assert [r.name for r in report.layers] == [Q, V]
    assert report.summary.base is None and report.layers[0].intruders is None
    assert report.layers[0].rank == 4 and 1.0 <= report.layers[0].effective_rank <= 4.0


def test_diagnose_with_base_table_and_json(files):
    result = ok("diagnose", files / "a.st", "--base", files / "base", "--top-k", "5", "--epsilon", "0.4")
    lines = result.stdout.splitlines()
    assert "intruders" in result.stdout and lines[-4].startswith("total (2 layers)") and lines[-5].startswith("---")
    data = json.loads(ok("diagnose", files / "a.st", "--base", files / "base", "--top-k", "5", "--epsilon", "0.4", "--json").stdout)
    assert data["summary"]["top_k"] == 5 and data["summary"]["epsilon"] == 0.4
    assert all(len(row["similarities"]) == 5 for row in data["layers"])
    assert data["summary"]["base_svds_cached"] == 2  # the first call filled the cache
    assert sum(row["intruders"] for row in data["layers"]) == data["summary"]["intruders"]


def test_diagnose_cache_options(files):
    ok("diagnose", files / "a.st", "--base", files / "base", "--cache-dir", files / "mine")
    assert len(list((files / "mine").rglob("*.safetensors"))) == 2
    data = json.loads(ok("diagnose", files / "a.st", "--base", files / "base", "--no-cache", "--json").stdout)
    assert data["summary"]["base_svds_computed"] == 2
    assert not (files / "cache").exists()


def test_diagnose_plot(files):
    out = files / "plot.png"
    result = ok("diagnose", files / "a.st", "--base", files / "base", "--plot", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert f"wrote {out}" in result.stderr
    fails("diagnose", files / "a.st", "--plot", out, match="already exists; pass --force")
    ok("diagnose", files / "a.st", "--plot", out, "--force", "--quiet")


def test_diagnose_errors(files):
    fails("diagnose", files / "missing.st", match="missing.st: no such file or directory")
    fails("diagnose", files / "other_model.st", "--base", files / "base", match="shape mismatch")
    fails("diagnose", files / "a.st", "--base", files / "nowhere", match="nowhere")
    fails("diagnose", files / "nan.st", match="NaN or Inf")
    fails("diagnose", files / "nan.st", "--allow-nonfinite", match="cannot diagnose layers holding NaN or Inf")
    result = run("diagnose", files / "a.st", "--top-k", "0")
    assert result.exit_code == 2 and "--top-k" in result.stderr


def test_compare(files):
    same = Comparison.from_dict(json.loads(ok("compare", files / "a.st", files / "a.st", "--json").stdout))
    assert same.summary.verdict == "identical" and same.summary.shared == 2
    opposite = ok("compare", files / "a.st", files / "neg_a.st")
    assert opposite.stdout.splitlines()[-1].startswith("opposite:")
    other = json.loads(ok("compare", files / "a.st", files / "b.st", "--json").stdout)
    assert -1 < other["summary"]["cosine"] < 1 and other["summary"]["verdict"] not in ("identical", "opposite")
    fails("compare", files / "a.st", files / "other_model.st", match="delta shapes differ")
    fails("compare", files / "a.st", files / "missing.st", match="no such file")
