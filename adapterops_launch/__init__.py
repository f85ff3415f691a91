"""The ``adapterops`` console script, kept outside the ``adapterops`` package on purpose.

Importing anything from ``adapterops`` first imports torch, which takes seconds; a Ctrl-C in that
time would otherwise end in a traceback. Here the import itself is guarded, so Ctrl-C at any point
of start-up exits 130 with one line, as it does once the command runs (``adapterops.cli``).
"""

import sys

__all__ = ["main"]


def main() -> None:
    try:
        from adapterops.cli import main as cli
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        raise SystemExit(130) from None
    cli()
