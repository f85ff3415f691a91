"""adapterops.report: tables and plots of diagnostics."""

import builtins
import struct

import pytest
import torch

from adapterops import Adapter, LoraLayer
from adapterops.diagnostics import compare, diagnose
from adapterops.errors import AdapterOpsError, OutputExistsError
from adapterops.report import format_comparison, format_diagnosis, plot_diagnosis

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTEROPS_CACHE", str(tmp_path / "cache"))


def intruding_case():
    """Two blocks of a 48 x 40 model: in ``up`` the adapter plants strong directions spread over
    the base's tail (intruders); in ``down`` it only boosts the base's own top direction."""
    g = torch.Generator().manual_seed(0)
    layers, base = {}, {}
    for depth in range(2):
        for module, strong in (("up", True), ("down", False)):
            name = f"model.layers.{depth}.mlp.{module}"
            U, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
            V, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
            s = torch.linspace(5, 1, 40)
            base[name + ".weight"] = U[:, :40] @ torch.diag(s) @ V.T
            if strong:
                B = torch.stack([20 * U[:, 20:36].sum(1) / 4, 15 * U[:, 40]], 1)  # spread, and outside col(W)
                A = torch.stack([V[:, 20:36].sum(1) / 4, V[:, 39]], 0)
            else:
                B, A = 2 * U[:, :1], V[:, :1].T
            layers[name] = LoraLayer(A.contiguous(), B.contiguous(), float(A.shape[0]))
    return Adapter(layers), base


def test_table_lists_worst_layers_first_and_totals_last():
    adapter, base = intruding_case()
    report = diagnose(adapter, base, cache=False)
    text = format_diagnosis(report)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer"))
    body = lines[header + 2 : header + 2 + len(adapter)]
    assert [line.split()[0] for line in body[:2]] == [r.name for r in report.worst_first()[:2]]
    assert all(".up" in line.split()[0] for line in body[:2]) and all(".down" in line.split()[0] for line in body[2:])
    total = lines[header + 3 + len(adapter)]
    assert total.startswith("total (4 layers)") and total.split()[-2] == str(report.summary.intruders) == "4"
    assert "intruders" in lines[header] and "||dW||/||W||" in lines[header]
    assert "4 intruder dimension(s) in 2 of 4 layers" in text


def test_table_without_base_and_limit():
    adapter, _ = intruding_case()
    report = diagnose(adapter)
    text = format_diagnosis(report, limit=1)
    assert "intruders" not in text and "(3 more layers not shown)" in text
    assert "compress --rank 2 keeps 90%" in text


def test_comparison_table_ends_with_the_verdict():
    adapter, _ = intruding_case()
    text = format_comparison(compare(adapter, -adapter))
    assert text.splitlines()[-1].startswith("opposite: one undoes the other")
    assert "total (4 shared)" in text


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("with_base", [True, False])
def test_plot_writes_a_valid_png(tmp_path, with_base):
    adapter, base = intruding_case()
    report = diagnose(adapter, base if with_base else None, cache=False)
    out = plot_diagnosis(report, tmp_path / "diag.png")
    data = out.read_bytes()
    width, height = png_size(data)
    assert width > 500 and height > 400 and len(data) > 10_000
    assert data.endswith(b"IEND\xaeB`\x82")


def test_plot_refuses_to_overwrite_and_leaves_no_temporaries(tmp_path):
    adapter, _ = intruding_case()
    report = diagnose(adapter)
    target = tmp_path / "diag.png"
    target.write_bytes(b"keep")
    with pytest.raises(OutputExistsError):
        plot_diagnosis(report, target)
    assert target.read_bytes() == b"keep"
    plot_diagnosis(report, target, force=True)
    assert target.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["diag.png"]


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    adapter, _ = intruding_case()
    with pytest.raises(AdapterOpsError, match=r"pip install 'adapterops\[plot\]'"):
        plot_diagnosis(diagnose(adapter), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
