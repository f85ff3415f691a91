"""The ``adapterops`` console script.

``import adapterops`` loads nothing heavy (its names load on first use), so this module runs
before torch does; it then imports the command line under a guard, so that a Ctrl-C while torch
loads (seconds) exits 130 with one line instead of a traceback, as it does once a command runs.
"""

import sys

__all__ = ["main"]


def main() -> None:
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        raise SystemExit(130) from None
    cli()
