"""A one-line progress reporter on stderr: items and bytes done, throughput and time left.

Draws only when enabled and stderr is a terminal, at most ten times a second; thread-safe, so a
writer thread can advance it while another thread computes.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

__all__ = ["Progress", "TerminalLine", "format_bytes", "is_terminal"]


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KB'`` (powers of 1000, as disk sizes are quoted)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


class Progress:
    """``with Progress("merging", total_items=..., total_bytes=...) as p: p.advance(1, nbytes)``."""

    def __init__(
        self,
        label: str,
        *,
        total_items: int,
        total_bytes: int,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = 0.1,
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and is_terminal(self.stream)
        self.label, self.total_items, self.total_bytes, self.interval = label, total_items, total_bytes, interval
        self.items = 0
        self.bytes = 0
        self._start = time.perf_counter()
        self._last_draw = 0.0
        self._lock = threading.Lock()
        self._line = TerminalLine(self.stream)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, items: int = 1, nbytes: int = 0) -> None:
        with self._lock:
            self.items += items
            self.bytes += nbytes
            now = time.perf_counter()
            if self.enabled and (now - self._last_draw >= self.interval or self.items >= self.total_items):
                self._last_draw = now
                self._draw(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self._start, 1e-9)
        rate = self.bytes / elapsed
        left = (self.total_bytes - self.bytes) / rate if rate > 0 and self.bytes < self.total_bytes else 0.0
        pct = 100.0 * self.bytes / self.total_bytes if self.total_bytes else 100.0
        return (
            f"{self.label}: {pct:5.1f}%  {self.items}/{self.total_items} tensors  "
            f"{format_bytes(self.bytes)}/{format_bytes(self.total_bytes)}  {format_bytes(rate)}/s  "
            f"{elapsed:.0f}s elapsed, ~{left:.0f}s left"
        )

    def _draw(self, now: float) -> None:
        self._line.draw(self.line(now))

    def close(self) -> None:
        with self._lock:
            if self.enabled:
                self._line.end()


class TerminalLine:
    """One status line on a terminal, redrawn in place: ``\\r`` and the new text, padded over the old."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.width = 0  # length of the text on screen; 0 when no line is open

    def draw(self, text: str) -> None:
        pad = max(self.width - len(text), 0)
        self.width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()

    def end(self) -> None:
        """Finish the line (a newline) if one was drawn."""
        if self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (False for streams without a working ``isatty``)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
