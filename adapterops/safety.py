"""What every writer checks before it writes: where the output may go, whether the inputs held
still while they were read, and whether the tensors about to be written are finite.

- ``check_output(out, inputs=[...], force=...)``: the one rule for output paths. The output may
  not be, contain, or lie inside any input (compared both as given and with symlinks resolved;
  an existing output that is a hard link of an input counts as that input), whatever ``force``
  says; and it may not exist unless ``force``. Every command that writes calls it before doing
  any work, and ``adapterops._files.atomic_output`` calls it again before the first byte is
  written, so a writer that forgets the early call is still safe.
- ``Inputs(paths)``: the files a command reads, with the size and ``mtime_ns`` each had when the
  snapshot was taken (a directory counts as the files directly inside it). ``verify()`` fails
  with ``InputChangedError`` when one changed; ``atomic_output`` calls it right before the final
  rename, so an output read from a file that was rewritten meanwhile never appears.
- ``FiniteCheck``: counts NaN and Inf per tensor as tensors are encoded (one look at each, while
  it is in memory anyway: no second pass over an output), and refuses them all at once with their
  names and counts unless non-finite values were allowed. ``check_finite`` is the one-call form
  for tensors held in memory (an adapter about to be saved).

Commands added later (``eval`` and the like) call ``check_output(out, inputs=[every path they
read], force=force)`` first and write through ``atomic_output(out, force=force, inputs=...)``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .errors import InputChangedError, NonFiniteError, NotWritableError, OutputExistsError, OutputOverlapError

__all__ = ["check_output", "check_writable", "Inputs", "FiniteCheck", "check_finite"]

PathLike = str | os.PathLike
_SHOWN = 5  # tensors named in a non-finite error; the rest are counted
_CHUNK = 1 << 20  # elements per isfinite call: a 1 MB boolean temporary, not one the size of the tensor


class Inputs:
    """A snapshot of what a command reads: the paths it must never write to, and each file's
    ``(size, mtime_ns)`` at the time of the snapshot.

    Paths that do not exist (a Hub repo id, say) are kept as given and are not watched.
    """

    def __init__(self, paths: Iterable[PathLike | None] = ()) -> None:
        self.paths: list[Path] = []
        self._stats: dict[Path, tuple[int, int] | None] = {}
        self.add(paths)

    def add(self, paths: Iterable[PathLike | None]) -> Inputs:
        """Also watch ``paths`` (snapshotted now); returns ``self``."""
        for p in paths:
            if p is None:
                continue
            path = Path(p)
            self.paths.append(path)
            for file in _files_of(path):
                self._stats.setdefault(file, _stat(file))
        return self

    def changed(self) -> list[str]:
        """The watched files whose size or mtime is not what the snapshot recorded."""
        return [str(f) for f, before in self._stats.items() if _stat(f) != before]

    def verify(self) -> None:
        """Raise ``InputChangedError`` naming every watched file whose size or mtime changed."""
        changed = self.changed()
        if changed:
            more = f" and {len(changed) - _SHOWN} more" if len(changed) > _SHOWN else ""
            raise InputChangedError(
                f"{', '.join(changed[:_SHOWN])}{more} changed while being read (size or modification time differ); "
                "nothing was written: run again once nothing else writes to the inputs"
            )


def check_output(out: PathLike, *, inputs: Inputs | Iterable[PathLike | None] = (), force: bool = False) -> Path:
    """Refuse an output path that is, contains, or lies inside an input (always), or exists (unless ``force``).

    Returns ``out`` as a Path. Raises ``OutputOverlapError`` naming both paths, or ``OutputExistsError``.
    """
    out = Path(out)
    paths = inputs.paths if isinstance(inputs, Inputs) else [Path(p) for p in inputs if p is not None]
    for source in paths:
        if not (source.exists() or source.is_symlink()):
            continue  # a Hub repo id, or a file that is missing (its reader reports that)
        forms = overlap(out, source)
        if forms:
            raise OutputOverlapError(
                f"{out} {_relation(out, source, *forms)}: writing there would overwrite it, and inputs are never "
                "overwritten, not even with --force; choose another output path"
            )
        if _same_file(out, source):
            raise OutputOverlapError(f"{out}: the output is the same file as the input {source} (a hard link); choose another output path")
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputExistsError(f"{out} already exists; pass force=True (--force on the command line) to overwrite it")
    kind = _special_kind(out)
    if kind:
        raise OutputExistsError(f"{out} is {kind}, not a file or directory; only those are ever replaced, even with --force; choose another output path")
    check_writable(out)
    return out


def check_writable(out: PathLike, *, inside: bool = False) -> None:
    """Refuse, before any work, an output whose directory (or the nearest one that exists, which
    the writer will create it in) cannot be written: a read-only file system, no permission.
    ``inside``: ``out`` is a directory to write files into (checkpoints), itself the one to check."""
    folder = Path(os.path.abspath(out))
    folder = folder if inside else folder.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        read_only = _read_only(folder)
        error = NotWritableError(f"{out}: cannot write into {folder} "
                                 f"({'a read-only file system' if read_only else 'no permission to write there'}); choose another output path")
        error.errno = errno.EROFS if read_only else errno.EACCES
        raise error


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def overlap(a: PathLike, b: PathLike) -> tuple[Path, Path] | None:
    """Forms of ``a`` and ``b`` (as given, made absolute, and with symlinks resolved) that are the
    same path or one inside the other; None when the two paths do not overlap."""
    for t in _forms(Path(a)):
        for s in _forms(Path(b)):
            if t == s or t in s.parents or s in t.parents:
                return t, s
    return None


def check_work_dir(path: PathLike, *, inputs: Iterable[PathLike | None], what: str) -> None:
    """Refuse a directory a command writes into as it goes (a cache, checkpoints) that is, or lies
    inside, an input: inputs are never written to."""
    for source in (Path(p) for p in inputs if p is not None):
        if not source.exists():
            continue
        for t in _forms(Path(path)):
            for s in _forms(source):
                if t == s or s in t.parents:
                    raise OutputOverlapError(
                        f"{what} {path} {'is' if t == s else 'lies inside'} the input {source}: inputs are never written to; choose another directory"
                    )


def _special_kind(path: Path) -> str | None:
    """What ``path`` (or the target of the symlink it is) is when that exists as something other
    than a regular file or directory."""
    for look in (path.lstat, path.stat):
        try:
            mode = look().st_mode
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            return "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return None


def _relation(out: Path, source: Path, target: Path, resolved: Path) -> str:
    """How the output overlaps an input, in words (``target``/``resolved``: their compared forms)."""
    if target == resolved:
        return "is also an input" + ("" if os.path.abspath(out) == os.path.abspath(source) else f" ({source})")
    return f"{'holds' if target in resolved.parents else 'lies inside'} the input {source}"


def _forms(path: Path) -> set[Path]:
    """``path`` made absolute as given, and with every symlink resolved."""
    return {Path(os.path.abspath(path)), path.resolve()}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.is_file() and b.is_file() and os.path.samefile(a, b)
    except OSError:
        return False


def _files_of(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    return [path] if path.is_file() else []


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


class FiniteCheck:
    """Counts non-finite values per tensor as tensors go by; ``raise_if_any`` refuses them.

    With ``allow=True`` nothing is looked at (non-finite values were asked for).
    """

    def __init__(self, *, allow: bool = False) -> None:
        self.allow = allow
        self.bad: dict[str, tuple[int, int]] = {}  # name -> (non-finite values, all values)
        self.float16 = False  # a float16 tensor among them: most likely an overflow of the cast

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.allow or not (tensor.is_floating_point() or tensor.is_complex()) or not tensor.numel():
            return
        flat = tensor.detach().reshape(-1)
        count = 0
        for i in range(0, flat.numel(), _CHUNK):
            ok = torch.isfinite(flat[i : i + _CHUNK])
            if not bool(ok.all()):
                count += int(ok.numel() - ok.sum())
        if count:
            self.bad[name] = (count, flat.numel())
            self.float16 |= tensor.dtype == torch.float16

    def add_count(self, name: str, count: int, numel: int, dtype: torch.dtype) -> None:
        """Record a count made elsewhere (on the device that computed the tensor, say)."""
        if count and not self.allow:
            self.bad[name] = (count, numel)
            self.float16 |= dtype == torch.float16

    def add_all(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.add(name, tensor)

    def raise_if_any(self, where: PathLike, *, hint: str = "") -> None:
        """``NonFiniteError`` listing the tensors with NaN/Inf and how many, if any were seen."""
        if not self.bad:
            return
        shown = [f"{n} ({c:,} of {t:,} values)" for n, (c, t) in list(self.bad.items())[:_SHOWN]]
        more = f" and {len(self.bad) - _SHOWN} more" if len(self.bad) > _SHOWN else ""
        if self.float16:
            hint = "; ".join(filter(None, [hint, "float16 holds magnitudes up to 65504 only: bf16 keeps the float32 range"]))
        raise NonFiniteError(
            f"{where}: not written: {len(self.bad)} tensor(s) would hold NaN or Inf: {', '.join(shown)}{more}"
            f"{'; ' + hint if hint else ''}; pass allow_nonfinite=True (--allow-nonfinite) to write them anyway"
        )


def check_finite(tensors: Mapping[str, torch.Tensor], where: PathLike, *, allow: bool = False, hint: str = "") -> None:
    """Refuse ``tensors`` about to be written to ``where`` if any holds NaN or Inf (unless ``allow``)."""
    check = FiniteCheck(allow=allow)
    check.add_all(tensors)
    check.raise_if_any(where, hint=hint)
