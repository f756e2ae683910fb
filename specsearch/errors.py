"""Errors that the CLI turns into one line on stderr, never a traceback.

Exit status 2 is for what the user gave (a bad file, an unknown id, a wrong option); exit status
1 for the environment (a full disk, a missing permission, a damaged or busy store). ``describe``
maps any exception to its exit status and one line.
"""

from __future__ import annotations

import errno


class SpecsearchError(Exception):
    """Bad input or an impossible request. The message is one line naming the file/row and problem."""


class InputError(SpecsearchError):
    """A file or row that cannot be read: corrupt, truncated, wrong shape or missing columns."""


class NotBuiltError(SpecsearchError):
    """A command of the CLI contract that this version does not implement yet."""


class EnvironmentFault(SpecsearchError):
    """Not the input: a damaged store file, a corrupt manifest, a store busy with another writer.
    The message names the file and the command that repairs it."""


_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error",
    errno.EMFILE: "too many open files",
}


def describe(err: BaseException) -> tuple[int, str]:
    """(exit status, one line) for an exception that reached the command line."""
    if isinstance(err, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(err, EnvironmentFault):
        return 1, _first_line(err)
    if isinstance(err, SpecsearchError):
        return 2, _first_line(err)
    if isinstance(err, FileNotFoundError):
        return 2, f"{err.filename}: no such file or directory"
    if isinstance(err, OSError):
        what = _ENVIRONMENT_ERRNOS.get(err.errno, err.strerror or type(err).__name__)
        where = f"{err.filename}: " if err.filename else ""
        return 1, f"{where}{what} (nothing was committed; the store is as it was)"
    if isinstance(err, MemoryError):
        return 1, "out of memory (try a smaller --batch-size or fewer --workers)"
    return 1, f"{type(err).__name__}: {_first_line(err)}"


def os_error_from(err: Exception, filename: str) -> OSError | None:
    """The OSError that a C++ library's RuntimeError reports in words (FAISS ends a failed
    write with ``(No space left on device)``), or None when the words name no system error."""
    import os

    text = str(err)
    for code in _ENVIRONMENT_ERRNOS:
        if f"({os.strerror(code)})" in text:
            return OSError(code, os.strerror(code), filename)
    return None


def _first_line(err: BaseException) -> str:
    text = str(err)
    return text.splitlines()[0] if text else type(err).__name__
