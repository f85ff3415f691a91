"""Diagnostics for people: terminal tables (worst layers first, totals last) and plots.

The data lives in ``adapterops.diagnostics`` (``.to_dict()``, ``.to_json()``); this module only
renders it. Plots need matplotlib, the optional extra ``plot`` (``pip install 'adapterops[plot]'``);
it is imported only when a plot is drawn, through the object API (no pyplot, no global state).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ._files import atomic_output
from .diagnostics import Comparison, DiagnosisReport, LayerDiagnosis
from .errors import AdapterOpsError

__all__ = ["format_diagnosis", "format_comparison", "plot_diagnosis", "require_matplotlib"]


def format_diagnosis(report: DiagnosisReport, *, limit: int | None = None) -> str:
    """A table of the layers, worst first (see ``DiagnosisReport.worst_first``), then the totals."""
    s = report.summary
    with_base = s.base is not None
    head = ["layer", "shape", "rank", "eff.rank", "stable", "r90", "r99", "||dW||"]
    if with_base:
        head += ["||dW||/||W||", "intruders", "min sim"]
    rows = report.worst_first()
    shown = rows if limit is None else rows[:limit]
    body = [_diagnosis_cells(r, with_base) for r in shown]
    total = [
        f"total ({s.num_layers} layers)",
        "",
        str(max((r.rank for r in report.layers), default=0)),
        f"{s.mean_effective_rank:.2f}",
        f"{s.mean_stable_rank:.2f}",
        str(s.rank_90),
        str(s.rank_99),
        f"{s.norm:.4g}",
    ]
    if with_base:
        mins = [r.min_similarity for r in report.layers if r.min_similarity is not None]
        total += [_num(s.relative_norm), str(s.intruders), f"{min(mins):.3f}" if mins else "-"]
    lines = [f"adapter: {report.adapter or '(in memory)'}"]
    if with_base:
        lines.append(
            f"base: {s.base}  (top_k {s.top_k}, epsilon {s.epsilon:g}; base SVDs: "
            f"{s.base_svds_cached} from cache, {s.base_svds_computed} computed)"
        )
    lines += ["", *_table(head, body, total)]
    if limit is not None and len(rows) > limit:
        lines.append(f"({len(rows) - limit} more layers not shown)")
    lines.append("")
    if with_base:
        lines.append(
            f"{s.intruders} intruder dimension(s) in {s.layers_with_intruders} of {s.num_layers} layers"
            if s.intruders
            else "no intruder dimensions"
        )
    lines.append(f"compress --rank {s.rank_90} keeps 90% of every layer's energy, --rank {s.rank_99} keeps 99%")
    return "\n".join(lines)


def _diagnosis_cells(r: LayerDiagnosis, with_base: bool) -> list[str]:
    cells = [
        r.name,
        "x".join(map(str, r.shape)),
        str(r.rank),
        f"{r.effective_rank:.2f}",
        f"{r.stable_rank:.2f}",
        str(r.rank_90),
        str(r.rank_99),
        f"{r.norm:.4g}",
    ]
    if with_base:
        cells += [_num(r.relative_norm), str(r.intruders), _num(r.min_similarity, ".3f")]
    return cells


def format_comparison(comparison: Comparison, *, limit: int | None = None) -> str:
    """A table of the shared layers, most opposed first, then the totals and the one-line verdict."""
    s = comparison.summary
    head = ["layer", "shape", "cosine", "||a||", "||b||", "out overlap", "in overlap", "verdict"]
    rows = sorted(comparison.layers, key=lambda r: r.cosine)
    shown = rows if limit is None else rows[:limit]
    body = [
        [r.name, "x".join(map(str, r.shape)), f"{r.cosine:+.4f}", f"{r.norm_a:.4g}", f"{r.norm_b:.4g}",
         f"{r.output_overlap:.3f}", f"{r.input_overlap:.3f}", r.verdict]
        for r in shown
    ]
    total = [f"total ({s.shared} shared)", "", f"{s.cosine:+.4f}", f"{s.norm_a:.4g}", f"{s.norm_b:.4g}",
             f"{s.output_overlap:.3f}", f"{s.input_overlap:.3f}", s.verdict]
    lines = [f"a: {comparison.a or '(in memory)'}", f"b: {comparison.b or '(in memory)'}", "", *_table(head, body, total)]
    if limit is not None and len(rows) > limit:
        lines.append(f"({len(rows) - limit} more layers not shown)")
    return "\n".join([*lines, "", s.line])


def _num(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _table(head: list[str], body: list[list[str]], total: list[str]) -> list[str]:
    widths = [max(len(row[i]) for row in [head, *body, total]) for i in range(len(head))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return [fmt(head), rule, *(fmt(r) for r in body), rule, fmt(total)]


def require_matplotlib() -> None:
    """Raise a clear error, before any work, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise AdapterOpsError("plots need matplotlib, which is not installed: pip install 'adapterops[plot]'") from None


def plot_diagnosis(report: DiagnosisReport, path: str | os.PathLike, *, force: bool = False, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Draw the report into ``path`` (PNG, or any format matplotlib knows by the suffix).

    ``inputs`` (the adapter and base diagnosed, say) are never overwritten (``safety.check_output``).

    Panels: effective rank across depth (one line per module kind, the stored rank dashed);
    intruder counts across depth (with a base) or ``||dW||`` across depth (without); the singular
    values of every layer's delta, normalised by the largest and coloured by depth; and, with a
    base, the similarity of each top-k direction of ``W + dW`` to the base (intruders below epsilon).
    """
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    with_base = report.summary.base is not None
    rows = list(report.layers)
    depth = _depths(rows)
    fig = Figure(figsize=(13, 9), layout="constrained")
    axes = fig.subplots(2, 2)
    ax_rank, ax_mid, ax_spec, ax_sim = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]
    modules = list(dict.fromkeys(r.module for r in rows))
    for module in modules:
        idx = [i for i, r in enumerate(rows) if r.module == module]
        xs = [depth[i] for i in idx]
        ax_rank.plot(xs, [rows[i].effective_rank for i in idx], marker="o", ms=3, label=module)
        if with_base:
            ax_mid.plot(xs, [rows[i].intruders for i in idx], marker="o", ms=3, label=module)
        else:
            ax_mid.plot(xs, [rows[i].norm for i in idx], marker="o", ms=3, label=module)
    ranks = sorted({r.rank for r in rows})
    for rank in ranks:
        ax_rank.axhline(rank, color="grey", ls="--", lw=0.8)
    ax_rank.set(title="effective rank of dW (Roy & Vetterli); dashed: stored rank", xlabel="depth", ylabel="effective rank")
    ax_rank.set_ylim(0, 1.1 * max([*ranks, *(r.effective_rank for r in rows), 1]))
    for ax in (ax_rank, ax_mid):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if with_base:
        s = report.summary
        ax_mid.set(title=f"intruder dimensions (top {s.top_k}, epsilon {s.epsilon:g}): {s.intruders} in all", xlabel="depth", ylabel="intruders")
        ax_mid.set_ylim(-0.5, max([r.intruders or 0 for r in rows] + [1]) + 0.5)
        ax_mid.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        ax_mid.set(title="||dW||_F (no base given: no intruder analysis)", xlabel="depth", ylabel="Frobenius norm")
    if len(modules) <= 12:
        ax_rank.legend(fontsize=7, ncols=2)
        ax_mid.legend(fontsize=7, ncols=2)
    _spectra(fig, ax_spec, rows, depth)
    if with_base:
        _similarities(fig, ax_sim, rows, report.summary.epsilon)
    else:
        ax_sim.set_axis_off()
        ax_sim.text(0.5, 0.5, "pass a base (--base) for intruder dimensions", ha="center", va="center", color="grey")
    fig.suptitle(f"{report.adapter or 'adapter'}: {report.summary.num_layers} layers")
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_output(path, force=force, inputs=inputs) as tmp:
        fig.savefig(tmp, format=fmt, dpi=110)
    return path


def _depths(rows: list[LayerDiagnosis]) -> list[float]:
    depths = [r.depth for r in rows]
    if any(d is None for d in depths):
        return [float(i) for i in range(len(rows))]
    return [float(d) for d in depths]


def _spectra(fig, ax, rows: list[LayerDiagnosis], depth: list[float]) -> None:
    from matplotlib import cm
    from matplotlib.colors import Normalize

    norm = Normalize(min(depth, default=0), max(max(depth, default=1), min(depth, default=0) + 1))
    cmap = cm.viridis
    for r, d in zip(rows, depth):
        s = r.singular_values
        if s and s[0] > 0:
            ax.plot(range(1, len(s) + 1), [v / s[0] for v in s], color=cmap(norm(d)), lw=0.8, alpha=0.7)
    ax.set_yscale("log")
    ax.set(title="singular values of dW / largest, per layer", xlabel="index", ylabel="s_i / s_1")
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="depth")


def _similarities(fig, ax, rows: list[LayerDiagnosis], epsilon: float) -> None:
    width = max((len(r.similarities or ()) for r in rows), default=0)
    grid = [[(r.similarities[j] if r.similarities and j < len(r.similarities) else float("nan")) for j in range(width)] for r in rows]
    extent = (0.5, width + 0.5, len(rows) - 0.5, -0.5)  # columns 1..k, rows top to bottom
    image = ax.imshow(grid, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest", extent=extent)
    marks = [(j + 1, i) for i, r in enumerate(rows) for j, v in enumerate(r.similarities or ()) if v < epsilon]
    if marks:
        ax.scatter([m[0] for m in marks], [m[1] for m in marks], marker="x", color="black", s=12, lw=0.8)
    ax.set(title=f"similarity of the top directions of W + dW to W (x: intruder, below {epsilon:g})", xlabel="singular vector of W + dW (1 = largest)", ylabel="layer")
    if len(rows) <= 40:
        ax.set_yticks(range(len(rows)), [r.name for r in rows], fontsize=5)
    fig.colorbar(image, ax=ax, label="max |cos| with any u_i(W)")
