"""asyncssh, imported without cryptography's warning that DSA is deprecated.

cryptography 51 warns on each use of its DSA classes, and asyncssh 2.24 touches them when
its modules are imported: every run that lists an SSH origin or uses SFTP printed a warning
about a key type replicator never uses, which teaches operators to ignore warnings. The
warning is silenced for that import only. Attribute look-ups on this module go to asyncssh
(``LazyModule`` imports asyncssh through here).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncssh as asyncssh
else:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DSA is deprecated", category=UserWarning,
                                module="asyncssh")
        import asyncssh


def __getattr__(name: str) -> Any:
    return getattr(asyncssh, name)


__all__ = ["asyncssh"]
