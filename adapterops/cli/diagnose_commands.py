"""Commands that look inside adapters: diagnose, compare."""

from __future__ import annotations

import click

from ..diagnostics import compare as compare_adapters
from ..diagnostics import diagnose as diagnose_adapter
from ..formats import load
from ..report import format_comparison, format_diagnosis, plot_diagnosis, require_matplotlib
from ..safety import check_work_dir
from . import main
from ._common import (
    PATH,
    allow_nonfinite_option,
    default_device,
    device_option,
    emit,
    force_option,
    is_tty,
    json_option,
    quiet_option,
    refuse_existing,
    status,
)

limit_option = click.option("--limit", type=click.IntRange(min=1), default=None, help="Show only the N worst layers in the table.")


@main.command()
@click.argument("adapter", type=PATH)
@click.option("--base", default=None, type=PATH, help="Base model (directory, safetensors file, Hub id, or NF4 checkpoint) for ||dW||/||W|| and intruder dimensions.")
@click.option("--top-k", type=click.IntRange(min=1), default=10, show_default=True, help="Top singular vectors of W + dW to test.")
@click.option("--epsilon", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True, help="A vector whose best |cosine| with the base's singular vectors is below this is an intruder.")
@click.option("--plot", type=PATH, default=None, help="Also draw the diagnosis into this PNG (needs matplotlib: pip install 'adapterops[plot]').")
@click.option("--cache-dir", type=PATH, default=None, help="Where base SVDs are cached (default: $ADAPTEROPS_CACHE/svd, else $XDG_CACHE_HOME/adapterops/svd or ~/.cache/adapterops/svd; at most $ADAPTEROPS_CACHE_MAX_GB, default 32, least recently used entries go first).")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the base SVD cache.")
@limit_option
@device_option
@force_option
@allow_nonfinite_option
@quiet_option
@json_option
def diagnose(adapter, base, top_k, epsilon, plot, cache_dir, no_cache, limit, device, force, allow_nonfinite, quiet, as_json):
    """Spectra, effective rank and (with --base) intruder dimensions of every layer of ADAPTER."""
    if plot:
        inputs = refuse_existing(plot, force, [adapter, base])
        require_matplotlib()
    source = load(adapter, allow_nonfinite=allow_nonfinite)
    cache = False if no_cache else cache_dir
    if cache:
        check_work_dir(cache, inputs=[adapter, base], what="--cache-dir")  # a Hub id as base is no path: skipped
    report = diagnose_adapter(
        source, base, top_k=top_k, epsilon=epsilon, device=default_device(device), cache=cache, progress=not quiet and is_tty()
    )
    if plot:
        plot_diagnosis(report, plot, force=force, inputs=inputs.paths)
        if not quiet:
            status(f"wrote {plot}")
    emit(report, as_json, lambda r: format_diagnosis(r, limit=limit))


@main.command()
@click.argument("a", type=PATH)
@click.argument("b", type=PATH)
@limit_option
@device_option
@allow_nonfinite_option
@json_option
def compare(a, b, limit, device, allow_nonfinite, as_json):
    """Cosine, subspace overlap and a verdict on interference between adapters A and B, per layer."""
    first, second = load(a, allow_nonfinite=allow_nonfinite), load(b, allow_nonfinite=allow_nonfinite)
    result = compare_adapters(first, second, device=default_device(device))
    emit(result, as_json, lambda c: format_comparison(c, limit=limit))
