"""The ``adapterops`` console script.

``import adapterops`` loads nothing heavy (its names load on first use), so this module runs
before torch does. It imports the command line with Ctrl-C deferred: a KeyboardInterrupt raised
inside torch's C++ start-up can abort the process (``terminate called after throwing ...``), so
during the import SIGINT only sets a flag, and a flagged start exits 130 with one line, as an
interrupted command does. Once the command has finished, a Ctrl-C no longer changes its exit status.
"""

import signal
import sys

__all__ = ["main"]


def main() -> None:
    interrupted: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    except ValueError:  # not the main thread: nothing to defer
        previous = None
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        interrupted.append(signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        sys.stderr.write("Error: interrupted\n")
        raise SystemExit(130)
    try:
        cli()
    finally:
        # The command is over (its exit status is decided). The interpreter's shutdown would put
        # SIGINT back to the default action, so a late Ctrl-C would kill the process instead of
        # letting it exit with that status; an ignored SIGINT stays ignored through shutdown.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
