"""Commands on base checkpoints: merge, unmerge, extract."""

from __future__ import annotations

from pathlib import Path

import click

from ..checkpoint import resolve_base
from ..extraction import extract as extract_adapter
from ..merging import merge as merge_checkpoint
from ..merging import unmerge as unmerge_checkpoint
from . import main
from .quant_commands import retention_warning, rounding_options
from ._common import (
    PATH,
    allow_nonfinite_option,
    device_option,
    emit,
    force_option,
    is_tty,
    json_option,
    output_option,
    parse_weights,
    quiet_option,
    refuse_existing,
    status,
)

dtype_option = click.option(
    "--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
    help="Output dtype (default: the base's own; for an NF4 base, writes it dequantized).",
)
adapter_option = click.option(
    "--adapter", "-a", "adapters", multiple=True, required=True, type=PATH,
    help="An adapter (file or PEFT directory); repeat for several.",
)
base_option = click.option("--base", "-b", required=True, type=PATH, help="Base checkpoint: directory, safetensors file or Hub repo id.")

TABLE_ROWS = 10


def _num(value: object, spec: str) -> str:
    """``value`` formatted by ``spec``, or ``-`` when it is missing (a statistic that was not finite)."""
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _render_report(d: dict) -> str:
    t = d["totals"]
    secs = t["seconds"]
    rate = t["bytes_written"] / secs / 1e6 if secs else 0.0
    lines = [
        f"{d['op']}d {len(d['adapters'])} adapter(s) into {t['merged']} of {t['tensors']} tensors -> {d['out']}",
        f"device {d['device']}, dtype {d['dtype']}, {t['bytes_written'] / 1e9:.2f} GB written in {secs:.1f} s ({rate:.0f} MB/s)",
    ]
    if t["rel_change"] is not None:
        lines.append(f"relative change ||dW||/||W||: {_num(t['rel_change'], '.3g')} overall, {_num(t['rel_change_max'], '.3g')} max; "
                     f"delta retained after the cast: {_num(t['retained_min'], '.4g')} min")
    rows = sorted(d["rows"], key=lambda r: -(r.get("rel_change") or 0.0))[:TABLE_ROWS]
    lines += _rounding_lines(d)
    if rows:
        width = max(len(r["name"]) for r in rows)
        lines += ["", f"{'tensor (largest changes first)':<{width}}  {'shape':>12}  {'rank':>4}  {'rel change':>10}  {'retained':>8}"]
        for r in rows:
            shape = "x".join(map(str, r["shape"]))
            rel, kept = _num(r.get("rel_change"), ".3g"), _num(r.get("retained"), ".4g")
            lines.append(f"{r['name']:<{width}}  {shape:>12}  {r['rank']:>4}  {rel:>10}  {kept:>8}")
        if len(d["rows"]) > TABLE_ROWS:
            lines.append(f"... {len(d['rows']) - TABLE_ROWS} more (--json for all)")
    return "\n".join(lines)


def _rounding_lines(d: dict) -> list[str]:
    """The NF4 rounding summary: output error (medians over layers) of the chosen rounding and of nearest."""
    t = d["totals"]
    if t.get("output_error_median") is None:
        return []
    cal = d.get("calibration")
    source = f"calibration inputs ({cal['sequences']} sequences, {cal['tokens']} tokens)" if cal else "the adapter's input directions (no calibration data)"
    text = f"rounding {d.get('rounding', 'nearest')}: output error ||(Q - W')X|| / ||dW X|| on {source}, median over layers: {_num(t['output_error_median'], '.3g')}"
    if t.get("output_error_nearest_median") is not None:
        text += f" (nearest rounding: {_num(t['output_error_nearest_median'], '.3g')})"
    return [text]


def _run(fn, base, adapters, weights, output, device, dtype, force, quiet, as_json, allow_nonfinite=False, **options):
    refuse_existing(output, force, [base, *adapters])  # the library checks again, with every file of the base
    report = fn(base, list(adapters), output, weights=weights, device=device, dtype=dtype, progress=not quiet and is_tty(), force=force,
                allow_nonfinite=allow_nonfinite, **options)
    data = report.to_dict()
    note = retention_warning(data)  # NF4 bases: most of a small delta can round away
    if note and not quiet:
        status(note)
    emit(data, as_json, _render_report)


def _merge_options(*, weights_help: str):
    """The options ``merge`` and ``unmerge`` share, in this order; only the ``--weights`` help differs."""
    options = (
        base_option,
        adapter_option,
        click.option("--weights", "-w", help=weights_help),
        output_option("Output directory (or .safetensors file for a single-file base)."),
        device_option,
        dtype_option,
        force_option,
        allow_nonfinite_option,
        quiet_option,
        json_option,
    )

    def decorate(fn):
        for option in reversed(options):  # as if stacked: the first option is applied last
            fn = option(fn)
        return fn

    return decorate


@main.command()
@_merge_options(weights_help="Comma-separated weights, one per adapter (default: 1 each).")
@rounding_options
def merge(base, adapters, weights, output, device, dtype, force, allow_nonfinite, quiet, as_json,
          rounding, calibration, calibration_samples, calibration_max_len):
    """Merge adapters into a base checkpoint: W + sum_i w_i * scale_i * B_i A_i, streaming.

    The output keeps the base's shards, index, metadata and side files; tensors without an
    adapter are copied byte for byte. Into an NF4 base, --rounding gptq chooses the 4-bit codes
    that keep the adapter's effect on the layer outputs (with --calibration text, or without).
    """
    _run(merge_checkpoint, base, adapters, parse_weights(weights, len(adapters), 1.0), output, device, dtype, force, quiet, as_json, allow_nonfinite,
         rounding=rounding, calibration=calibration, calibration_samples=calibration_samples, max_len=calibration_max_len)


@main.command()
@_merge_options(weights_help="The weights the adapters were merged with (default: 1 each).")
def unmerge(base, adapters, weights, output, device, dtype, force, allow_nonfinite, quiet, as_json):
    """Subtract adapters from a merged checkpoint (merge with the weights negated; not for DoRA)."""
    _run(unmerge_checkpoint, base, adapters, parse_weights(weights, len(adapters), 1.0), output, device, dtype, force, quiet, as_json, allow_nonfinite)


@main.command()
@base_option
@click.option("--tuned", "-t", required=True, type=PATH, help="Fine-tuned checkpoint of the same architecture.")
@click.option("--rank", type=click.IntRange(min=1), help="Rank per layer.")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), help="Keep this fraction of each layer's squared singular values.")
@output_option("Where to write the adapter (.st file, or a directory for peft).")
@click.option("--format", "fmt", type=click.Choice(["native", "peft", "kohya"]), default=None, help="Adapter format (default: from the output path).")
@device_option
@force_option
@quiet_option
@json_option
def extract(base, tuned, rank, energy, output, fmt, device, force, quiet, as_json):
    """LoRA adapter approximating TUNED - BASE: truncated SVD per changed linear weight."""
    if (rank is None) == (energy is None):
        raise click.UsageError("give exactly one of --rank or --energy")
    inputs = refuse_existing(output, force, [_local(base), _local(tuned)])  # snapshot before reading
    adapter = extract_adapter(base, tuned, rank=rank, energy=energy, device=device, progress=not quiet and is_tty())
    adapter.save(output, format=fmt, force=force, inputs=inputs.add([resolve_base(base), resolve_base(tuned)]))
    info = dict(adapter.metadata["extraction"])
    data = {"output": output, "num_layers": len(adapter), "rank": adapter.rank, "num_params": adapter.num_params, **info}
    if not quiet and not as_json and info.get("skipped"):
        status(f"note: {len(info['skipped'])} weight(s) left out, e.g. {info['skipped'][0]}")
    emit(data, as_json, _render_extract)


def _render_extract(d: dict) -> str:
    layers = d["layers"]
    energies = [r["energy"] for r in layers.values()]
    lines = [
        f"wrote {d['output']}: {d['num_layers']} layers, rank {d['rank']}, {d['num_params']:,} params "
        f"({d['method']} SVD on {d['device']}, {d['seconds']:.1f} s)",
    ]
    if energies:
        lines.append(f"energy captured per layer: min {min(energies):.4g}, mean {sum(energies) / len(energies):.4g}")
    return "\n".join(lines)


def _local(base: str) -> Path | None:
    """``base`` as a local path when it is one (a Hub repo id is resolved by the reader)."""
    return Path(base) if Path(base).exists() else None
