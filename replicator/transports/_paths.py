"""Confinement of destination paths to the replica root, shared by every transport."""

from __future__ import annotations

import os
import stat

from .._errors import ErrorClass, FileError


def _show(path: bytes) -> str:
    return repr(os.fsdecode(path))


def confine(dest: bytes) -> bytes:
    """``dest`` normalised and relative; FileError (permanent) if it could leave the root."""
    # Once per file copied: a path that is plainly normal (no NUL, no empty, "." or ".."
    # component, not the marker) is returned as it is without being taken apart.
    if (b"\0" not in dest and b"//" not in dest and b"/." not in dest
            and not dest.startswith((b"/", b".")) and not dest.endswith(b"/") and dest):
        return dest
    if b"\0" in dest:
        raise FileError(f"refused path with a NUL byte: {_show(dest)}", ErrorClass.PERMANENT)
    if dest.startswith(b"/"):
        raise FileError(f"refused absolute path {_show(dest)}", ErrorClass.PERMANENT)
    parts = [p for p in dest.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise FileError(f"refused path escaping the replica: {_show(dest)}",
                        ErrorClass.PERMANENT)
    if parts == [b".replicator-replica"]:
        raise FileError("refused path: the replica's identity marker", ErrorClass.PERMANENT)
    return b"/".join(parts)


def copy_mode(mode: int) -> int:
    """The permission bits a copy gets: never set-user-ID or set-group-ID.

    A copy written by a privileged replicator must not turn a user's file into a setuid
    executable owned by that account.
    """
    return stat.S_IMODE(mode) & 0o1777
