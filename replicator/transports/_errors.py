"""Mapping of foreign errors into replicator's hierarchy, at the transport boundary."""

from __future__ import annotations

import errno
import os

from .._errors import ErrorClass, FileError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}
# The destination path is blocked by something that retrying will not move.
_PERMANENT = {errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP,
              errno.ENOTEMPTY, errno.EINVAL}


def classify(exc: OSError) -> ErrorClass:
    if exc.errno in _NO_SPACE:
        return ErrorClass.NO_SPACE
    if exc.errno in _PERMISSION:
        return ErrorClass.PERMISSION
    if exc.errno in _PERMANENT:
        return ErrorClass.PERMANENT
    return ErrorClass.TRANSIENT


def file_error(exc: OSError, what: str, path: bytes) -> FileError:
    reason = exc.strerror or str(exc)
    return FileError(f"{what} {os.fsdecode(path)!r}: {reason}", classify(exc))


def os_error(code: int) -> OSError:
    """The OSError of an errno reported without one (by the C accelerator)."""
    return OSError(code, os.strerror(code))
