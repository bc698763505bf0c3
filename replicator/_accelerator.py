"""The optional C accelerator (``_fastcopy.c``), shared by the scan and the transports.

It makes the system calls of many small files in one call without the GIL: the local
copies' stage, commit and verification, the SSH sender's reads and frames, and the scan's
``lstat`` of a folder's entries. Each use has a Python path, the reference and the
fallback where the module was not built (no C compiler at install).
"""

from __future__ import annotations

import os
from types import ModuleType

# Set (to anything but "" or "0") to take the Python path even where the accelerator exists.
PURE_PYTHON_ENV = "REPLICATOR_PURE_PYTHON"

_fastcopy: ModuleType | None
try:  # absent where it was not built
    from . import _fastcopy
except ImportError:
    _fastcopy = None


def accelerator() -> ModuleType | None:
    """The C accelerator, unless it was not built or ``REPLICATOR_PURE_PYTHON`` is set."""
    if os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
        return None
    return _fastcopy
