"""What every command shares: error handling, --json output, common options, progress on stderr."""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from ..errors import AdapterOpsError, OutputExistsError

DEBUG_ENV = "ADAPTEROPS_DEBUG"


class Group(click.Group):
    """A click group that turns every failure into one ``Error: ...`` line and exit code 1.

    Set ADAPTEROPS_DEBUG=1 for the full traceback instead.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with _library_warnings_on_stderr():
                return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            raise click.ClickException(" ".join(describe_error(exc).split())) from None  # always one line


@contextmanager
def _library_warnings_on_stderr() -> Iterator[None]:
    """Warnings raised by adapterops itself become one ``Warning: ...`` line on stderr; others as usual."""
    package = str(Path(__file__).resolve().parent.parent)
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if str(Path(filename).resolve()).startswith(package):
                status(f"Warning: {' '.join(str(message).split())}")
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def describe_error(exc: Exception) -> str:
    if isinstance(exc, AdapterOpsError):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"{type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for a traceback)"


def emit(data: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    """Print ``data`` as JSON (for scripts) or through ``render`` (for people) on stdout."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=_json_default))
    else:
        click.echo(render(data))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def status(message: str) -> None:
    """Progress and notes for people go to stderr, keeping stdout clean for --json."""
    click.echo(message, err=True)


def refuse_existing(path: str | Path, force: bool) -> None:
    """Fail before any work is done when the output exists and --force was not given."""
    if Path(path).exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to overwrite it")


def parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=what) from None


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
force_option = click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress output on stderr.")
allow_nonfinite_option = click.option(
    "--allow-nonfinite", is_flag=True, help="Load adapters holding NaN or Inf instead of refusing them."
)
device_option = click.option("--device", default=None, help="torch device for the computation (default: cuda if present, else cpu).")


def output_option(help: str = "Output path.") -> Callable:
    return click.option("-o", "--output", "--out", "output", required=True, type=click.Path(), help=help)


def rank_rule_options(required: bool) -> Callable:
    """--rank / --energy / --budget, at most one (exactly one when ``required``)."""

    def decorate(fn: Callable) -> Callable:
        fn = click.option("--budget", type=click.IntRange(min=0), help="Total parameter budget for the whole adapter.")(fn)
        fn = click.option("--energy", type=click.FloatRange(0, 1, min_open=True), help="Keep this fraction of each layer's squared singular values.")(fn)
        fn = click.option("--rank", type=click.IntRange(min=1), help="At most this rank per layer.")(fn)
        return fn

    return decorate


def rank_rule(rank: int | None, energy: float | None, budget: int | None, *, required: bool) -> dict[str, Any]:
    given = {k: v for k, v in {"rank": rank, "energy": energy, "budget": budget}.items() if v is not None}
    if len(given) > 1:
        raise click.UsageError("give only one of --rank, --energy, --budget")
    if required and not given:
        raise click.UsageError("give one of --rank, --energy, --budget")
    return given


def default_device(device: str | None) -> str:
    """The --device value, or CUDA when present, else CPU; a clear error for one that is not here."""
    from ..rewrite import resolve_device

    return str(resolve_device(device))


def is_tty() -> bool:
    return sys.stderr.isatty()
