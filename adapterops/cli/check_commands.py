"""``adapterops check X --target T``: would this consumer load the adapter, and apply it as meant?"""

from __future__ import annotations

import click

from ..targets import TARGETS, VLLM_DEFAULT_MAX_LORA_RANK, VLLM_MAX_LORA_RANKS, check as check_adapter
from . import main
from ._common import PATH, emit, json_option

target_option = click.option("--target", "target", type=click.Choice(list(TARGETS)), required=True, help="The consumer to check against.")
max_lora_rank_option = click.option(
    "--max-lora-rank", type=click.Choice([str(r) for r in VLLM_MAX_LORA_RANKS]), default=str(VLLM_DEFAULT_MAX_LORA_RANK),
    show_default=True, help="vLLM's --max-lora-rank the adapter must fit.",
)
base_option = click.option("--base", default=None, type=PATH, help="Base model (directory or Hub id; for llama.cpp also the model's .gguf): checks modules, shapes and architecture.")


@main.command()
@click.argument("adapter", type=PATH)
@target_option
@max_lora_rank_option
@base_option
@json_option
def check(adapter, target, max_lora_rank, base, as_json):
    """Every reason TARGET would refuse or mis-apply ADAPTER, one line each; exit 1 if any.

    ADAPTER is a path or a Hub repo id (user/repo, or user/repo@revision).
    """
    report = check_adapter(adapter, target, max_lora_rank=int(max_lora_rank), base=base)
    emit(report, as_json, _render)
    if not report.ok:
        click.get_current_context().exit(1)


def _render(report) -> str:
    if report.ok:
        lines = [f"ok: {report.target} loads {report.source} as it is"]
    else:
        lines = [f"{report.target}: {p.message}" + (f" [fix: {p.fix}]" if p.fix else "") for p in report.problems]
    return "\n".join(lines + [f"note: {n}" for n in report.notes])
