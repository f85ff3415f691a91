"""What every command shares: error handling, --json output, common options, progress on stderr.

Every failure ends as one ``Error: ...`` line on stderr: exit 1 for errors, 2 for usage errors
(the line ends with where to find help), 130 for Ctrl-C (143 for SIGTERM, 129 for SIGHUP), unless
the command's output was already published, in which case it exits 0 (the output is complete).
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from .._files import committed
from .._signals import STOPS, signum_of
from ..errors import AdapterOpsError, OutputExistsError
from ..safety import Inputs, check_output

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
        except KeyboardInterrupt as exc:
            raise _Interrupted(signum_of(exc)) from None  # past click, which would print a blank line and "Aborted!"
        except BrokenPipeError:
            raise  # the reader of stdout went away (``| head``): click exits 1 quietly, as pipes expect
        except Exception as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            raise click.ClickException(printable(" ".join(describe_error(exc).split()))) from None  # always one line

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt as exc:  # while parsing: past click, which would print a blank line first
            raise _Interrupted(signum_of(exc)) from None

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        _OUTPUTS.clear()
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (_Interrupted, KeyboardInterrupt, click.Abort) as exc:
            if any(committed(p) for p in _OUTPUTS):
                sys.exit(0)  # the output is complete: the signal came after it was published
            signum = exc.signum if isinstance(exc, _Interrupted) else signum_of(exc)
            click.echo(f"Error: {STOPS[signum]}", err=True)
            sys.exit(128 + signum)
        except click.UsageError as exc:
            if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):
                exc.show()  # no arguments at all: the help, as click prints it
                sys.exit(exc.exit_code)
            where = exc.ctx.command_path if exc.ctx is not None else "adapterops"
            click.echo(f"Error: {' '.join(exc.format_message().split())} (see '{where} -h')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"Error: {exc.format_message()}", err=True)  # not exc.show(): with stderr closed it writes to stdout
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


class _Interrupted(Exception):
    """Ctrl-C (or SIGTERM, SIGHUP: ``_signals.Stopped``), carried past click's own handling to ``Group.main``."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum


_OUTPUTS: list[str] = []  # the output paths of the running command (see ``remember_output``)


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
    """Print ``data`` as JSON (for scripts) or through ``render`` (for people) on stdout.

    Called after the output was published, so it cannot fail: a ``render`` that raises falls back
    to the JSON (set ADAPTEROPS_DEBUG=1 to see the error instead).
    """
    if as_json:
        _print(strict_json(data))
        return
    try:
        text = render(data)
    except Exception:
        if os.environ.get(DEBUG_ENV):
            raise
        text = strict_json(data)
    _print(printable(text))


def _print(text: str) -> None:
    if sys.stdout is None:  # started with stdout closed (``>&-``): the report would vanish unsaid
        raise AdapterOpsError("cannot write to standard output: it is closed")
    try:
        click.echo(text)
    except BrokenPipeError:
        raise  # the reader went away: quiet, as pipes expect (``Group.invoke``)
    except OSError as exc:  # /dev/full, a failing disk behind a redirect
        raise AdapterOpsError(f"cannot write to standard output: {exc.strerror or exc}") from None


def strict_json(data: Any) -> str:
    """``data`` as JSON that strict parsers read: a NaN or infinity (which ``json.dumps`` writes as
    the bare words NaN and Infinity, outside the JSON grammar) becomes null."""
    text = json.dumps(data, indent=2, default=_json_default)
    if "NaN" in text or "Infinity" in text:  # a cheap test first; the words may also sit in strings
        text = json.dumps(json.loads(text, parse_constant=lambda _: None), indent=2)
    return text


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def status(message: str) -> None:
    """Progress and notes for people go to stderr, keeping stdout clean for --json.

    A note that cannot be written (stderr on a full disk) is dropped: the work goes on."""
    try:
        click.echo(printable(message), err=True)
    except OSError:
        pass


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of non-UTF-8 file names shown as ``\\xe9`` (printing them fails)."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # an unpaired surrogate from a JSON escape, not a file name's byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def refuse_existing(path: str | Path, force: bool, inputs: Inputs | list[Any] | tuple[Any, ...] = ()) -> Inputs:
    """Fail before any work is done when the output overlaps an input (always) or exists (without --force).

    Returns a snapshot of ``inputs`` (``safety.Inputs``) to hand to the writer, which refuses to
    publish the output if one of them changed meanwhile.
    """
    watched = inputs if isinstance(inputs, Inputs) else Inputs(inputs)
    check_output(path, inputs=watched, force=True)  # the overlap; existence next, in the CLI's words
    if (Path(path).exists() or Path(path).is_symlink()) and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to overwrite it")
    remember_output(path)
    return watched


def remember_output(path: str | Path | None) -> None:
    """Note ``path`` as an output of the running command: once it is published, Ctrl-C exits 0."""
    if path is not None:
        _OUTPUTS.append(str(path))


def parse_floats(text: str, what: str) -> list[float]:
    """``"1,0.5"`` -> ``[1.0, 0.5]``; an empty field, or a number Python alone reads (``1_0``), is refused."""
    fields = [x.strip() for x in text.split(",")]
    if not all(_NUMBER.fullmatch(x) for x in fields):
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=what)
    return [float(x) for x in fields]


def parse_weights(text: str | None, count: int, default: float) -> list[float]:
    """``--weights`` for ``count`` adapters (``default`` each when not given); a usage error unless one per adapter."""
    weights = parse_floats(text, "--weights") if text is not None else [default] * count
    if len(weights) != count:
        raise click.UsageError(f"--weights has {len(weights)} values for {count} adapters; give one weight per adapter")
    return weights


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)


json_option = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
force_option = click.option("--force", is_flag=True, help="Overwrite the output if it exists.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress output on stderr.")
allow_nonfinite_option = click.option(
    "--allow-nonfinite", is_flag=True, help="Read and write NaN or Inf values instead of refusing them."
)
device_option = click.option("--device", default=None, help="torch device for the computation (default: cuda if present, else cpu).")


class _Path(click.ParamType):
    """A file, directory or Hub id argument: any text but the empty one, which every OS reads as
    the current directory (``-o ""`` would mean ``-o .``)."""

    name = "path"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("an empty path" if not value else "a blank path", param, ctx)
        return value


PATH = _Path()


def output_option(help: str = "Output path.") -> Callable:
    return click.option(
        "-o", "--output", "--out", "output", required=True, type=PATH, help=help,
        callback=lambda ctx, param, value: remember_output(value) or value,
    )


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
