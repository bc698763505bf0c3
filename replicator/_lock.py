"""One engine per inventory, enforced with an advisory lock the kernel drops on death."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ._errors import EngineLockedError


class EngineLock:
    """``flock`` on ``<inventory>.lock``: a crashed engine never leaves a stale lock."""

    def __init__(self, inventory: Path) -> None:
        self.path = inventory.with_name(inventory.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise EngineLockedError(
                f"another replicator engine (pid {holder}) is running on this inventory"
                f" ({self.path.with_suffix('')}); wait for it or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
