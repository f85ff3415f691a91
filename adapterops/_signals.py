"""The signals that stop a command: Ctrl-C (SIGINT), SIGTERM (``kill``, ``timeout``) and SIGHUP (a
closed terminal), the word each is reported with, the exception that carries SIGTERM and SIGHUP
where Python raises KeyboardInterrupt for SIGINT (so the same clean-up runs), and holding them
back while an output is published. Loads nothing heavy: the console script uses it before torch.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["STOPS", "Stopped", "held", "raise_stopped", "signum_of"]

# SIGHUP is POSIX only.
STOPS = {getattr(signal, name): words for name, words in (("SIGINT", "interrupted"), ("SIGTERM", "terminated"), ("SIGHUP", "hung up"))
         if hasattr(signal, name)}


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def raise_stopped(signum: int, frame: object) -> None:
    """The handler that turns SIGTERM and SIGHUP into ``Stopped``."""
    raise Stopped(signum)


def signum_of(exc: BaseException) -> int:
    """The signal behind a KeyboardInterrupt (``Stopped``'s, else Ctrl-C's)."""
    return getattr(exc, "signum", signal.SIGINT)


@contextmanager
def held() -> Iterator[None]:
    """Hold back every signal of ``STOPS`` for the duration (main thread only), then deliver them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in STOPS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            if callable(previous[sig]):
                previous[sig](sig, None)
            elif previous[sig] == signal.SIG_DFL:
                os.kill(os.getpid(), sig)
