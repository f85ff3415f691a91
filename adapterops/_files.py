"""File plumbing shared by every writer and reader: atomic outputs (owner-tagged temporaries, a
rename that never replaces what it must not, stale leftovers removed, a full disk said plainly),
safe safetensors reads."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as _safetensors_bytes

from . import _signals
from ._safetensors import read_header, read_tensor
from ._progress import format_bytes
from .errors import FormatError, NoSpaceError, OutputExistsError
from .safety import Inputs, check_output

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@contextmanager
def atomic_output(
    path: str | os.PathLike, *, force: bool = False, inputs: Inputs | Iterable[str | os.PathLike | None] = (), need: int | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; it becomes ``path`` only if the body succeeds.

    Before anything is written, ``check_output`` refuses a ``path`` that is, holds or lies inside
    one of ``inputs`` (always) or that exists (unless ``force``), and leftovers of earlier runs to
    ``path`` whose process is gone are removed (with a warning). After the
    body, the inputs are verified unchanged (``safety.Inputs``), then one rename publishes the
    output: without ``force`` it never replaces anything, so an output that appeared meanwhile
    (another process) fails with ``OutputExistsError`` and is left as it is; with ``force`` the old
    output is swapped out atomically where the OS can (Linux ``RENAME_EXCHANGE``). Ctrl-C is held
    back during the rename. A full disk is ``NoSpaceError``, saying how much was needed (``need``
    bytes, when the caller knows) and how much is free.

    An interrupted write leaves at most a hidden ``.name.tmp-OWNER-*`` entry, never a partial
    ``path``; OWNER (boot id, pid and process start time) lets a later run tell it is stale.
    """
    path = Path(path)
    watched = inputs if isinstance(inputs, Inputs) else Inputs(inputs)
    check_output(path, inputs=watched, force=force)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = _sibling(path, "tmp")
    try:
        try:
            yield tmp
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                _blame_changed_inputs(watched, exc)
                if isinstance(exc.filename, (str, bytes, os.PathLike)) and os.fsdecode(exc.filename).startswith(str(tmp)):
                    raise OSError(exc.errno, exc.strerror, str(path)) from None  # the output's name, not the temporary's
                raise
            _remove(tmp)
            raise no_space(path, need) from None
        except Exception as exc:
            _blame_changed_inputs(watched, exc)  # a file rewritten under the reader fails in odd ways: say why
            raise
        watched.verify()
        with _signals.held():
            _commit(tmp, path, force=force)
            _COMMITTED.add(os.path.abspath(path))
    finally:
        _remove(tmp)  # after a swap, tmp holds the old output
        _remove(tmp.with_name(tmp.name + ".grow"))


def _blame_changed_inputs(watched: Inputs, exc: BaseException) -> None:
    if watched.changed():
        try:
            watched.verify()
        except Exception as changed:
            raise changed from exc


def committed(path: str | os.PathLike) -> bool:
    """Whether this process has published ``path`` through ``atomic_output`` (the CLI exits 0 then, even on Ctrl-C)."""
    return os.path.abspath(path) in _COMMITTED


def no_space(path: str | os.PathLike, need: int | None, free: int | None = None) -> NoSpaceError:
    """The one message for a full disk: what was being written, what it needs, what is free."""
    if free is None:
        free = _free_space(Path(path))
    needs = f"needs {format_bytes(need)}" if need else "needs more"
    error = NoSpaceError(f"no space left on device writing {path} ({needs}, {format_bytes(free)} free); free some space or write elsewhere")
    error.errno = errno.ENOSPC
    return error


def require_space(path: str | os.PathLike, need: int) -> None:
    """Fail before writing when the device that will hold ``path`` has less than ``need`` bytes free."""
    free = _free_space(Path(path))
    if free < need:
        raise no_space(path, need, free)


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporaries of earlier writes to ``path`` whose owning process is gone.

    Entries of live processes, and names this module did not make, are left alone. Each removal
    is said through ``warnings`` (the CLI prints it as one line); returns what was removed.
    """
    path = Path(path)
    prefix = hidden_prefix(path)
    pattern = re.compile(rf"^{re.escape(prefix)}(?:tmp|old)-([0-9a-f]+)\.(\d+)\.(\d+)-[0-9a-f]{{8}}(?:\.grow)?$")
    removed = []
    try:
        entries = [e for e in os.scandir(path.parent) if e.name.startswith(prefix)]
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or _alive(m.group(1), int(m.group(2)), m.group(3)):
            continue
        _remove(Path(entry.path))
        removed.append(Path(entry.path))
        warnings.warn(f"removed {entry.path}, left behind by an interrupted run (process {m.group(2)} is gone)")
    return removed


_COMMITTED: set[str] = set()
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_RENAMEAT2: list[Any] = []  # [the libc function or None], looked up once


def _commit(tmp: Path, path: Path, *, force: bool) -> None:
    """Rename ``tmp`` onto ``path``; without ``force`` never replacing anything, with it atomically where possible."""
    if force and (path.exists() or path.is_symlink()):
        if _renameat2(tmp, path, _RENAME_EXCHANGE):
            return  # the old output is now at tmp, removed by the caller
        old = _sibling(path, "old")
        os.rename(path, old)
        os.rename(tmp, path)
        _remove(old)
        return
    if _renameat2(tmp, path, _RENAME_NOREPLACE):
        return
    # No renameat2 here: claim the name with an operation that fails if it exists, then take it.
    try:
        if tmp.is_dir():
            os.mkdir(path)  # an empty directory of our own, which the rename then replaces
            os.rename(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except FileExistsError:
        raise _appeared(path) from None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)`` through libc; False where the OS or file system lacks it."""
    if not _RENAMEAT2:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = None
        _RENAMEAT2.append(fn)
    fn = _RENAMEAT2[0]
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    if err in (errno.EEXIST, errno.ENOTEMPTY) and flags == _RENAME_NOREPLACE:
        raise _appeared(dst)
    raise OSError(err, os.strerror(err), str(dst))


def _appeared(path: Path) -> OutputExistsError:
    return OutputExistsError(
        f"{path} appeared while this run was writing it (another process?); it was left as it is and nothing was written: "
        "pass --force to replace it, or choose another output path"
    )


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f"{hidden_prefix(path)}{kind}-{_owner_tag()}-{uuid.uuid4().hex[:8]}"


_LONGEST_KEPT_NAME = 255 - 64  # NAME_MAX less room for "tmp-OWNER-xxxxxxxx.grow"


def hidden_prefix(path: Path) -> str:
    """``.NAME.``, how the hidden temporaries of ``path`` begin. A name too long to leave room for
    the rest within the 255 bytes a file name may have is cut, and a digest of the whole appended,
    so that every name the file system takes can be an output."""
    raw = os.fsencode(path.name)
    if len(raw) > _LONGEST_KEPT_NAME:
        raw = raw[: _LONGEST_KEPT_NAME - 9] + b"~" + hashlib.sha256(raw).hexdigest()[:8].encode()
    return f".{os.fsdecode(raw)}."


def _owner_tag() -> str:
    pid = os.getpid()
    return f"{_boot_id()}.{pid}.{_start_time(pid) or 0}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12] or "0"
    except OSError:
        return "0"


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, Linux), None when unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(boot: str, pid: int, start: str) -> bool:
    """Whether the process that made a temporary still runs (same boot, same pid and start time)."""
    if boot != "0" and boot != _boot_id():
        return False
    if start != "0" and Path("/proc").is_dir():
        return _start_time(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


def _free_space(path: Path) -> int:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return shutil.disk_usage(parent).free


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise FormatError(f"{path}: pickle-based files are never loaded (they can run code); convert it to safetensors first")


def read_safetensors(path: str | os.PathLike, keys: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a safetensors file, as FormatError on any failure.

    The header is checked as strictly as the safetensors library checks it (``_safetensors``), and
    the bytes are read through one file descriptor, so a file whose name is not UTF-8 reads too.
    """
    path = _existing_file(path)
    header = read_header(path)
    if not keys:
        return {}, dict(header.metadata)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        tensors = {name: read_tensor(entry, name, fd=fd) for name, entry in header.entries.items()}
    finally:
        os.close(fd)
    return tensors, dict(header.metadata)


def safetensors_header(path: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """Tensor names and metadata, reading only the (checked) header."""
    header = read_header(_existing_file(path))
    return list(header.entries), dict(header.metadata)


def _existing_file(path: str | os.PathLike) -> Path:
    path = require_file(path)
    refuse_pickle(path)
    return path


def require_file(path: str | os.PathLike) -> Path:
    """``path`` when it is a regular file (symbolic links followed); else FormatError saying what it is."""
    path = Path(path)
    if path.is_file():
        return path
    raise FormatError(f"{path}: {'is a directory, expected a file' if path.is_dir() else unreadable(path)}")


def unreadable(path: Path) -> str:
    """Why ``path``, neither a regular file nor a directory, cannot be read: for error messages."""
    if path.exists():
        return "not a regular file (a pipe, socket or device)"  # reading one could block or never end
    if os.path.lexists(path):
        return "a symbolic link that leads nowhere (its target is missing, or the links loop)"
    return "no such file or directory"


MAX_JSON_BYTES = 100_000_000  # as for safetensors headers: configs and indexes are kilobytes to megabytes


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; FormatError when it is missing, unreadable or not strict JSON."""
    path = Path(path)
    size = path.stat().st_size if path.is_file() else 0
    if size > MAX_JSON_BYTES:
        raise FormatError(f"{path}: {size:,} bytes, too large for a config or index (the limit is {MAX_JSON_BYTES:,})")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, expected a JSON file") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise FormatError(f"{path}: not valid JSON ({exc if not isinstance(exc, RecursionError) else 'nested too deeply'})") from None


def header_json(path: str | os.PathLike, metadata: dict[str, str], key: str, default: Any = None) -> Any:
    """The JSON object stored as text under ``key`` of a safetensors header (``default`` if absent)."""
    if key not in metadata:
        return default
    try:
        value = json.loads(metadata[key])
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise FormatError(f"{path}: corrupt adapter metadata in the safetensors header ({key}: {reason})") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path}: {key} in the safetensors header is {type(value).__name__}, expected a JSON object")
    return value


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with a reproducible header: same tensors, same bytes.

    safetensors writes the header's metadata in hash order, which changes from run to run; here
    the header JSON is re-written with sorted keys and padded to its original length. Tensors that
    share memory (one layer's factors under two names, views of one buffer), which safetensors
    refuses, are written as copies.
    """
    storages: set[int] = set()
    own = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        own[name] = t.contiguous().clone() if ptr in storages else t.contiguous()
        storages.add(ptr)
    data = _safetensors_bytes(own, metadata=metadata)
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    ordered = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(ordered) <= size:
        data = data[:8] + ordered + b" " * (size - len(ordered)) + data[8 + size :]
    Path(path).write_bytes(data)
