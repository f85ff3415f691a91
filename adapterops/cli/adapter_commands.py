"""Commands on adapter files: blend, compress, info, convert."""

from __future__ import annotations


import click

from ..adapter import blend as blend_adapters
from ..formats import FORMATS, default_format, load
from ..safety import Inputs
from ..summary import summarize
from ..targets import PEFT_TASK_TYPES, complete_metadata, prepare
from . import main
from .check_commands import max_lora_rank_option
from ._common import (
    PATH,
    allow_nonfinite_option,
    default_device,
    device_option,
    emit,
    force_option,
    json_option,
    output_option,
    parse_weights,
    rank_rule,
    rank_rule_options,
    refuse_existing,
)

format_option = click.option(  # no gguf: it needs the base model, which only convert (--base) and train are given
    "--format", "fmt", type=click.Choice([f for f in FORMATS if f != "gguf"]), default=None,
    help="Output format (default: native for a path with a suffix, peft for a directory; GGUF: convert --to gguf --base).",
)


def _result(adapter, output, fmt) -> dict:
    return {
        "output": output,
        "format": fmt or default_format(output),
        "num_layers": len(adapter),
        "rank": adapter.rank,
        "num_params": adapter.num_params,
    }


def _refuse_in_place(output: str, inputs: tuple[str, ...] | list[str]) -> Inputs:
    """Inputs are never modified, not even with --force: ``safety.check_output`` without the existence test.

    Returns the snapshot of ``inputs`` to hand to ``save(..., inputs=...)``.
    """
    return refuse_existing(output, True, list(inputs))


def _render_result(data: dict) -> str:
    return f"wrote {data['output']}: {data['num_layers']} layers, rank {data['rank']}, {data['num_params']:,} params"


@main.command()
@click.argument("adapters", nargs=-1, required=True, type=PATH)
@click.option("--weights", "-w", help="Comma-separated weights, one per adapter (default: equal weights summing to 1).")
@click.option("--method", "-m", default="linear", show_default=True,
              help="Merge method: linear (exact sum), ties, dare_ties, dare_linear, magnitude_prune, della, della_linear, "
              "breadcrumbs, breadcrumbs_ties, or a LoRA-native one (knots_ties, core_ties, tsv, ...).")
@click.option("--density", type=click.FloatRange(0, 1, min_open=True), help="Fraction of each delta kept (ties, dare, della, breadcrumbs).")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default=None,
              help="TIES sign election: by total mass (default) or by count.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random methods (DARE, DELLA).")
@click.option("--epsilon", type=float, default=None, help="DELLA: keep probabilities span density +- epsilon (default 0.15).")
@click.option("--gamma", type=float, default=None, help="Breadcrumbs: fraction of the largest entries dropped (default 0.01).")
@rank_rule_options(required=False)
@output_option("Where to write the blend (.st file, or a directory for peft).")
@format_option
@device_option
@force_option
@allow_nonfinite_option
@json_option
def blend(adapters, weights, method, density, majority_sign, seed, epsilon, gamma, rank, energy, budget, output, fmt,
          device, force, allow_nonfinite, as_json):
    """Merge ADAPTERS by --method; linear is the exact weighted sum.

    Every method but linear is re-compressed by --rank/--energy/--budget (default: the largest
    input rank); --json reports each layer's kept rank and the share of its merged delta's energy kept.
    """
    rule = rank_rule(rank, energy, budget, required=False)
    w = parse_weights(weights, len(adapters), 1.0 / len(adapters))
    options = {k: v for k, v in {"majority_sign": majority_sign, "epsilon": epsilon, "gamma": gamma}.items() if v is not None}
    inputs = refuse_existing(output, force, list(adapters))
    values = [load(p, allow_nonfinite=allow_nonfinite) for p in adapters]
    result = blend_adapters(values, w, method, density, **rule, seed=seed, device=default_device(device), **options).to(device="cpu")
    result.save(output, format=fmt, force=force, inputs=inputs, allow_nonfinite=allow_nonfinite)
    emit(_blend_result(result, output, fmt, method), as_json, _render_blend)


def _blend_result(adapter, output, fmt, method) -> dict:
    layers = adapter.metadata.get("blend", {}).get("layers") or {n: {"rank": r, "energy_kept": 1.0} for n, r in adapter.ranks.items()}
    return {**_result(adapter, output, fmt), "method": method, "layers": layers}


def _render_blend(d: dict) -> str:
    kept = [row["energy_kept"] for row in d["layers"].values()]
    line = _render_result(d) + f" ({d['method']})"
    if kept and min(kept) < 1.0:
        line += f"; energy kept per layer: min {min(kept):.4f}, mean {sum(kept) / len(kept):.4f}"
    return line


@main.command()
@click.argument("adapter", type=PATH)
@rank_rule_options(required=True)
@output_option()
@format_option
@device_option
@force_option
@allow_nonfinite_option
@json_option
def compress(adapter, rank, energy, budget, output, fmt, device, force, allow_nonfinite, as_json):
    """Optimal low-rank re-compression of ADAPTER (Eckart-Young, computed from the factors)."""
    rule = rank_rule(rank, energy, budget, required=True)
    inputs = refuse_existing(output, force, [adapter])
    source = load(adapter, allow_nonfinite=allow_nonfinite)
    result = source.compress(**rule, device=default_device(device)).to(device="cpu")
    result.save(output, format=fmt, force=force, inputs=inputs, allow_nonfinite=allow_nonfinite)
    before = source.norm()
    error = (source - result).norm()
    data = {
        **_result(result, output, fmt),
        "params_before": source.num_params,
        "rank_before": source.rank,
        "relative_error": error / before if before else 0.0,
        "ranks": result.ranks,
    }
    emit(data, as_json, lambda d: _render_result(d) + f" (was rank {d['rank_before']}, {d['params_before']:,} params; relative error {d['relative_error']:.3g})")


@main.command()
@click.argument("adapter", type=PATH)
@allow_nonfinite_option
@json_option
def info(adapter, allow_nonfinite, as_json):
    """Format, ranks, alphas, parameter count, file size and per-layer delta norms of ADAPTER."""
    emit(summarize(adapter, allow_nonfinite=allow_nonfinite), as_json, _render_info)


def _render_info(d: dict) -> str:
    lines = [
        f"{d['path']}  ({d['format']}{', DoRA' if d['dora'] else ''})",
        f"base model: {d['base_model'] or 'unknown'}",
        f"layers: {d['num_layers']}   max rank: {d['rank']}   params: {d['num_params']:,}   "
        f"file size: {d['file_size']:,} bytes   dtype: {', '.join(d['dtypes'])}",
    ]
    if d["norm"] is not None:
        lines.append(f"delta norm (Frobenius, all layers): {d['norm']:.6g}")
    width = max((len(r["name"]) for r in d["layers"]), default=5)
    lines.append("")
    lines.append(f"{'layer':<{width}}  {'shape':>12}  {'rank':>4}  {'alpha':>8}  {'scale':>8}  {'norm':>10}")
    for r in d["layers"]:
        shape = "x".join(map(str, r["shape"]))
        norm = "-" if r["norm"] is None else f"{r['norm']:.4g}"
        lines.append(f"{r['name']:<{width}}  {shape:>12}  {r['rank']:>4}  {r['alpha']:>8.4g}  {r['scale']:>8.4g}  {norm:>10}")
    return "\n".join(lines)


@main.command()
@click.argument("adapter", type=PATH)
@click.option("--to", "fmt", type=click.Choice(list(FORMATS)), required=True, help="Target format.")
@click.option(
    "--base", default=None, type=PATH,
    help="Base model (HF checkpoint directory, Hub repo id, or its .gguf file): required by --to gguf, "
    "and for reading GGUF files of Llama-family models that lack adapterops' metadata.",
)
@click.option("--target", type=click.Choice(["vllm", "peft", "transformers"]), default=None,
              help="Make the PEFT output load in this consumer: fix what can be fixed (and report the cost), refuse the rest.")
@max_lora_rank_option
@click.option("--task-type", type=click.Choice(list(PEFT_TASK_TYPES)), default=None,
              help="PEFT task_type to record (default: from the base's architecture).")
@output_option()
@force_option
@allow_nonfinite_option
@json_option
def convert(adapter, fmt, base, target, max_lora_rank, task_type, output, force, allow_nonfinite, as_json):
    """Rewrite ADAPTER in another format; the deltas stay exactly the same.

    With --target (and --to peft), what the consumer cannot load is fixed where it can be:
    re-compression to --max-lora-rank, DoRA to plain LoRA (needs --base), scales folded; the
    cost per layer is reported, and what cannot be fixed is refused.
    """
    inputs = refuse_existing(output, force, [adapter, base])
    if target is not None:
        if fmt != "peft":
            raise click.UsageError(f"--target {target} writes a PEFT directory; use --to peft")
        source, report = prepare(adapter, target, max_lora_rank=int(max_lora_rank), base=base, task_type=task_type)
    else:
        source, report = load(adapter, allow_nonfinite=allow_nonfinite, base=base), None
        if fmt != "gguf" and (task_type or base):
            source = complete_metadata(source, base=base, task_type=task_type)
    source.save(output, format=fmt, force=force, base=base, inputs=inputs, allow_nonfinite=allow_nonfinite)
    data = _result(source, output, fmt) if report is None else {**_result(source, output, fmt), **report}
    emit(data, as_json, _render_convert)


def _render_convert(d: dict) -> str:
    lines = [_render_result(d)] + [f"fixed {line}" for line in d.get("fixed", [])]
    changed = {n: r for n, r in d.get("layers", {}).items()}
    if changed:
        lines.append(f"changed {len(changed)} of {d['num_layers']} layers; least energy kept {d['energy_kept_min']:.4f}")
        lines += [f"  {n}: {r['change']}, rank {r['rank_before']} -> {r['rank']}, energy kept {r['energy_kept']:.4f}" for n, r in changed.items()]
    return "\n".join(lines)
