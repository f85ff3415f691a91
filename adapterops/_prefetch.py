"""Read the base checkpoint of a streaming command into the page cache while the process starts.

``adapterops merge`` spends seconds importing torch and starting CUDA before it reads the first
byte of the base; where torch's libraries are already in memory that start-up is CPU work and the
disk sits idle. So the console script (``_launch``) calls ``start`` before any heavy import: for
``merge``, ``unmerge`` and ``quantize`` with a local ``--base``, one thread reads the base's shards
in the order the rewrite reads them, in large blocks into one reused buffer, and the rewrite then
finds them in the page cache. It reads at most half the memory the kernel reports available, never
changes what the command does (every failure is ignored), and ``ADAPTEROPS_PREFETCH=0`` turns it off.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ENV", "base_files", "start"]

ENV = "ADAPTEROPS_PREFETCH"
COMMANDS = frozenset({"merge", "unmerge", "quantize"})
BLOCK = 64 * 1024 * 1024  # few reads, so the thread seldom asks the importing thread for the GIL
INDEX = "model.safetensors.index.json"  # checkpoint.INDEX_NAME, spelled here: that module imports torch


def start(argv: Sequence[str]) -> threading.Thread | None:
    """Start reading the base named by the command line ``argv`` (without the program name); the thread, or None."""
    if os.environ.get(ENV, "1").strip() == "0" or not hasattr(os, "preadv"):
        return None
    try:
        files = base_files(argv)
        budget = _available_bytes() // 2
    except Exception:  # a hint only: whatever is wrong with the base, the command itself will say
        return None
    if not files or budget <= 0:
        return None
    thread = threading.Thread(target=_read, args=(files, budget), name="adapterops-prefetch", daemon=True)
    thread.start()
    return thread


def base_files(argv: Sequence[str]) -> list[Path]:
    """The shard files of the local ``--base``/``-b`` of a merge, unmerge or quantize command line, in read order."""
    args = list(argv)
    command = next((a for a in args if not a.startswith("-")), None)
    if command not in COMMANDS:
        return []
    base = None
    for i, arg in enumerate(args):
        if arg in ("--base", "-b") and i + 1 < len(args):
            base = args[i + 1]
        elif arg.startswith("--base="):
            base = arg.split("=", 1)[1]
    if not base:
        return []
    path = Path(base)
    if path.is_file():
        return [path] if path.suffix == ".safetensors" else []
    if not path.is_dir():
        return []
    index = path / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        names = dict.fromkeys(str(v) for v in weight_map.values())
        return [path / n for n in names if Path(n).name == n and (path / n).is_file()]  # shards beside the index only
    return sorted(path.glob("*.safetensors"))


def _available_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _read(files: list[Path], budget: int) -> None:
    buffer = memoryview(bytearray(BLOCK))
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            offset = 0
            while budget > 0:
                n = os.preadv(fd, [buffer[: min(BLOCK, budget)]], offset)
                if n <= 0:
                    break
                offset += n
                budget -= n
        except OSError:
            pass
        finally:
            os.close(fd)
        if budget <= 0:
            return
