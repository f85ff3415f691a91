"""A one-line training progress report on stderr: step, loss, learning rate, tokens/s, time left.

tokens/s is the steady-state rate (the steps after the first); the first step's time (compiling,
warm-up) is shown apart.

Redrawn in place at most ten times a second on a terminal; elsewhere (logs, pipes) a plain line
every twentieth of the run and at every evaluation.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from .._progress import TerminalLine, is_terminal

__all__ = ["TrainProgress"]


class TrainProgress:
    """One line on stderr, redrawn at most ten times a second: step, loss, lr, tokens/s, eta."""

    def __init__(self, total: int, *, enabled: bool, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and is_terminal(self.stream)
        self.total, self.start, self.last = total, time.perf_counter(), 0.0
        self._line = TerminalLine(self.stream)
        self.first_step: int | None = None

    def update(self, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step = info["step"] - 1
        done = info["step"] - self.first_step
        eta = (now - self.start) / done * (self.total - info["step"])
        text = (
            f"step {info['step']}/{self.total}  loss {info['loss']:.4f}  lr {info['lr']:.2e}  "
            f"{info['tokens_per_second']:,.0f} tok/s  warm-up {info.get('warmup_seconds', 0.0):.1f}s  eta {_duration(eta)}"
        )
        if "eval_loss" in info:
            text += f"  eval {info['eval_loss']:.4f}"
        if self.tty:
            if now - self.last >= 0.1 or info["step"] == self.total or "eval_loss" in info:
                self.last = now
                self._line.draw(text)
        elif info["step"] == self.total or "eval_loss" in info or info["step"] % max(1, self.total // 20) == 0:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self._line.end()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
