"""Exceptions raised by adapterops.

The library raises these and never prints; the CLI turns them into one ``Error: ...`` line.
"""

__all__ = [
    "AdapterOpsError",
    "FormatError",
    "ShapeMismatchError",
    "NonFiniteError",
    "OutputExistsError",
    "OutputOverlapError",
    "InputChangedError",
    "NoSpaceError",
    "NotWritableError",
    "UnsupportedOperationError",
    "BaseMismatchError",
]


class AdapterOpsError(ValueError):
    """Base class of every error adapterops raises on purpose."""


class FormatError(AdapterOpsError):
    """A file is missing, corrupt, of an unknown format, or not what it claims to be."""


class ShapeMismatchError(AdapterOpsError):
    """Two things that must agree in shape do not (adapter vs adapter, adapter vs base)."""


class NonFiniteError(AdapterOpsError):
    """NaN or Inf where finite numbers are required."""


class OutputExistsError(AdapterOpsError):
    """The output path exists and overwriting was not asked for."""


class OutputOverlapError(AdapterOpsError):
    """The output path is, contains, or lies inside an input (refused even with force)."""


class InputChangedError(AdapterOpsError):
    """An input file changed (size or modification time) while it was being read."""


class NoSpaceError(AdapterOpsError, OSError):
    """The device holding the output ran out of space (also an ``OSError``, as the failure it reports)."""


class NotWritableError(AdapterOpsError, OSError):
    """The directory that would hold the output cannot be written (also an ``OSError``, as the failure it reports)."""


class UnsupportedOperationError(AdapterOpsError):
    """The operation is not defined for this value (e.g. linear algebra on a DoRA adapter)."""


class BaseMismatchError(AdapterOpsError):
    """An adapter does not fit the base checkpoint it is applied to."""


def brief(exc: BaseException, limit: int) -> str:
    """A foreign exception's message on one line, cut to ``limit`` characters, to quote inside ours."""
    return " ".join(str(exc).split())[:limit]


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed: CUDA's OutOfMemoryError, Python's MemoryError,
    or the CPU allocator's RuntimeError ("can't allocate memory")."""
    import torch  # here, not at the top: this module loads before torch does

    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (isinstance(exc, RuntimeError) and "allocate" in str(exc))
