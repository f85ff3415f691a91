"""The ``adapterops`` console script.

``import adapterops`` loads nothing heavy (its names load on first use), so this module runs
before torch does. It first starts reading the base of a streaming command into the page cache
(``_prefetch``), then imports the command line with Ctrl-C deferred: a KeyboardInterrupt raised
inside torch's C++ start-up can abort the process (``terminate called after throwing ...``), so
during the import SIGINT only sets a flag, and a flagged start exits 130 with one line, as an
interrupted command does. SIGTERM and SIGHUP (``kill``, ``timeout``, a closed terminal) stop a
command the way Ctrl-C does, its temporary output removed, with exit 128 + the signal's number.
Once the command has finished, no signal changes its exit status, and the process leaves without
the interpreter's teardown (``_leave``).
"""

import os
import signal
import sys

from . import _prefetch, _signals
from ._signals import STOPS

__all__ = ["main"]


def main() -> None:
    _prefetch.start(sys.argv[1:])
    caught: list[int] = []
    try:
        previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in STOPS}
    except ValueError:  # not the main thread: nothing to defer
        previous = {}
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        caught.append(signal.SIGINT)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if sig == signal.SIGINT else _signals.raise_stopped)
    if caught:
        sys.stderr.write(f"Error: {STOPS[caught[0]]}\n")
        raise SystemExit(128 + caught[0])
    try:
        cli()
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        # The command is over (its exit status is decided): a late signal must not change it.
        for sig in STOPS:
            signal.signal(sig, signal.SIG_IGN)
    _leave(code)


def _leave(code: object) -> None:
    """Exit with ``code`` as ``sys.exit`` would, skipping the interpreter's teardown.

    Every output is written and closed by now; what is left is freeing memory that the process is
    about to lose anyway, which after CUDA work (pinned buffers, the context) costs most of a second.
    """
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        sys.stderr.write(f"{code}\n")
        status = 1
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with that descriptor closed (``>&-``)
            continue
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (``| head``): nothing more can be said there
            pass
    os._exit(status)
