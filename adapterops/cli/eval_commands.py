"""The ``eval`` command: adapter algebra and merge methods from the shell (see ``adapterops.expr``)."""

from __future__ import annotations

import re

import click

from .. import expr
from ..adapter import Adapter
from ..errors import AdapterOpsError
from ..formats import load
from ..safety import Inputs, check_output
from . import main
from ._common import (
    allow_nonfinite_option,
    default_device,
    device_option,
    emit,
    force_option,
    json_option,
    output_option,
    rank_rule,
    rank_rule_options,
    status,
)
from .adapter_commands import _render_result, _result, format_option

_BINDING = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.+)", re.DOTALL)


def _bindings(items: tuple[str, ...]) -> dict[str, str]:
    paths: dict[str, str] = {}
    for item in items:
        m = _BINDING.fullmatch(item)
        if m is None:
            raise AdapterOpsError(f"{item!r} is not a binding; write NAME=PATH (NAME: letters, digits, _)")
        name, path = m.groups()
        if name in paths:
            raise AdapterOpsError(f"{name} is bound twice ({paths[name]} and {path}); bind each name once")
        paths[name] = path
    return paths


class _EvalCommand(click.Command):
    """An expression that begins with '-' reads as an option: the error says where it goes instead
    (a misspelt ``--long`` option is left to click's own suggestions)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            if not exc.option_name.startswith("--"):
                exc.message += (f" An expression that begins with '-' goes after '--', the options before it: "
                                f"{ctx.command_path} -o OUT -- EXPRESSION NAME=PATH...")
            raise


@main.command(name="eval", cls=_EvalCommand)
@click.argument("expression")
@click.argument("bindings", nargs=-1, metavar="NAME=PATH...")
@rank_rule_options(required=False)
@output_option("Where to write the result (.st file, or a directory for peft).")
@format_option
@device_option
@force_option
@allow_nonfinite_option
@json_option
def eval_command(expression, bindings, rank, energy, budget, output, fmt, device, force, allow_nonfinite, as_json):
    """Evaluate EXPRESSION over adapters bound as NAME=PATH and write the result.

    \b
    adapterops eval "(code - math) * 0.5 + ties(a, b, density=0.3)" \\
        code=c.st math=m.st a=x/ b=y.st -o out.st

    Names, numbers, + - * / and parentheses, and calls of the merge methods (ties, dare_ties,
    knots_ties, core_linear, ...) with adapters as arguments and keyword options
    (weights=[0.6, 0.4], density=0.3, majority_sign='frequency', rank=16). Sums are exact; the
    result is re-compressed only with --rank, --energy or --budget.
    """
    rule = rank_rule(rank, energy, budget, required=False)
    try:
        tree = expr.parse(expression)
        paths = _bindings(bindings)
        used = expr.names(tree)
        missing = [n for n in used if n not in paths]
        if missing:
            raise AdapterOpsError(f"{', '.join(missing)} not bound; add {' '.join(f'{n}=PATH' for n in missing)}")
        for name in paths:
            if name not in used:
                status(f"note: {name} is bound but not used")
        inputs = Inputs([paths[n] for n in used])  # before reading: each must be unchanged when the output appears
        check_output(output, inputs=inputs, force=force)
        values = {n: load(paths[n], allow_nonfinite=allow_nonfinite) for n in used}
        dev = default_device(device)
        result = expr.evaluate(expression, values, device=dev)
    except expr.ExpressionError as exc:
        where = f" (in {exc.expression!r})" if exc.column else ""
        raise click.ClickException(f"{exc}{where}") from None
    if not isinstance(result, Adapter):
        raise AdapterOpsError(f"the expression is the number {result:g}, not an adapter; nothing to write")
    if rule:
        result = result.compress(**rule, device=dev)
    result = result.to(device="cpu")
    result.save(output, format=fmt, force=force, inputs=inputs, allow_nonfinite=allow_nonfinite)
    emit({**_result(result, output, fmt), "expression": expression, "ranks": result.ranks}, as_json, _render_result)
