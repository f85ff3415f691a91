"""Commands on quantized checkpoints: quantize (NF4); the NF4 retention warning for merge."""

from __future__ import annotations

from typing import Any

import click

from ..quant import quantize_checkpoint
from . import main
from ._common import PATH, allow_nonfinite_option, device_option, emit, force_option, is_tty, json_option, output_option, quiet_option, refuse_existing

# Below this share of the delta surviving re-quantization, merge suggests a dense output.
RETENTION_WARNING = 0.5
TABLE_ROWS = 10


def rounding_options(fn):
    """--rounding, --calibration, --calibration-samples, --max-len: how weights are rounded into NF4."""
    options = (
        click.option("--rounding", type=click.Choice(["nearest", "gptq"]), default="nearest", show_default=True,
                     help="NF4 codes: nearest (bitsandbytes') or gptq (error feedback that keeps the layer outputs)."),
        click.option("--calibration", type=PATH, default=None,
                     help="JSONL text (train's shapes) whose layer inputs gptq keeps (merge without it: the adapter's own input directions)."),
        click.option("--calibration-samples", type=click.IntRange(min=1), default=128, show_default=True, help="Calibration rows to use."),
        click.option("--max-len", "calibration_max_len", type=click.IntRange(min=2), default=2048, show_default=True,
                     help="Tokens per calibration row (longer rows are cut)."),
    )
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command()
@click.option("--base", "-b", required=True, type=PATH, help="Base checkpoint: directory, safetensors file or Hub repo id.")
@output_option("Output directory.")
@click.option("--blocksize", type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]), default="64", show_default=True, help="Values per NF4 block (one scale each).")
@click.option("--no-double-quant", is_flag=True, help="Keep the block scales in float32 instead of 8 bits.")
@click.option("--skip", multiple=True, metavar="PATTERN", help="Regex on module paths to leave unquantized (repeatable; lm_head, embeddings and norms always are).")
@device_option
@force_option
@allow_nonfinite_option
@quiet_option
@json_option
@rounding_options
def quantize(base, output, blocksize, no_double_quant, skip, device, force, allow_nonfinite, quiet, as_json,
             rounding, calibration, calibration_samples, calibration_max_len):
    """Quantize a checkpoint's linear weights to NF4 in the bitsandbytes layout, streaming.

    The output loads with transformers + bitsandbytes (quantization_config in config.json);
    lm_head, embeddings, norms and every tensor that is not a 2-D weight are copied unchanged.
    --rounding gptq --calibration data.jsonl chooses the codes that keep the layer outputs.
    """
    refuse_existing(output, force, [base, calibration])  # the library checks again, with every file of the base
    report = quantize_checkpoint(
        base, output, blocksize=int(blocksize), double_quant=not no_double_quant, skip=list(skip),
        device=device, progress=not quiet and is_tty(), force=force, allow_nonfinite=allow_nonfinite,
        rounding=rounding, calibration=calibration, calibration_samples=calibration_samples, max_len=calibration_max_len,
    )
    emit(report.to_dict(), as_json, _render)


def _render(d: dict[str, Any]) -> str:
    t = d["totals"]
    nested = "double-quantized scales" if d["double_quant"] else "float32 scales"
    lines = [
        f"quantized {t['quantized']} of {t['tensors']} tensors to NF4 (blocksize {d['blocksize']}, {nested}) -> {d['out']}",
        f"device {d['device']}, {t['bytes_read'] / 1e9:.2f} GB read, {t['bytes_written'] / 1e9:.2f} GB written in {t['seconds']:.1f} s",
    ]
    if t["rel_error"] is not None:
        lines.append(f"relative error ||Q(W) - W|| / ||W||: {t['rel_error']:.4g} overall, {t['rel_error_max']:.4g} max")
    if t.get("output_error_median") is not None:
        text = f"rounding {d['rounding']}: output error ||(Q(W) - W)X|| / ||W X|| on the calibration inputs, median over layers: {t['output_error_median']:.4g}"
        if t.get("output_error_nearest_median") is not None:
            text += f" (nearest rounding: {t['output_error_nearest_median']:.4g})"
        lines.append(text)
    if d["skipped"]:
        shown = ", ".join(d["skipped"][:3]) + (f" and {len(d['skipped']) - 3} more" if len(d["skipped"]) > 3 else "")
        lines.append(f"left unquantized: {shown}")
    return "\n".join(lines)


def retention_warning(report: dict[str, Any], threshold: float = RETENTION_WARNING) -> str | None:
    """A note for people when re-quantizing into NF4 dropped most of a merge's delta, else None.

    Rows from the ``nf4`` codec carry ``codes_changed``; ``retained`` is
    ``<Q(W + dW) - W, dW> / ||dW||^2`` with ``W`` the dequantized base.
    """
    rows = [r for r in report.get("rows", []) if "codes_changed" in r and r.get("retained") is not None]
    low = [r for r in rows if r["retained"] < threshold]
    if not low:
        return None
    kept = sorted(r["retained"] for r in rows)
    changed = sorted(r["codes_changed"] for r in rows)
    return (
        f"warning: re-quantizing to NF4 kept less than {threshold:.0%} of the adapter's change in {len(low)} of {len(rows)} "
        f"merged weights (median kept {kept[len(kept) // 2]:.1%}, median 4-bit codes changed {changed[len(changed) // 2]:.2%}); "
        "the merged model stays close to the base. For a merge that keeps the whole delta, write a dequantized model "
        "with --dtype bf16 (or fp16)" + (
            "; to stay in 4 bits, --rounding gptq [--calibration data.jsonl] keeps most of the adapter's effect."
            if report.get("rounding", "nearest") == "nearest" else "."
        )
    )
