"""The transport protocol: what the engine needs from a place that holds a replica."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from .._errors import FileError
from .._inventory import Kind


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a transport can do; the engine adapts its comparisons to it."""

    mtime_precision_ns: int = 1
    fsync: bool = True
    atomic_rename: bool = True
    symlinks: bool = True


@dataclass(frozen=True, slots=True)
class PutRequest:
    """Copy one origin file (a local path) to ``dest``, relative to the replica root.

    ``size``/``mtime_ns``/``target`` are the version the inventory expects; a source that
    no longer matches is reported as changed, not copied.
    """

    source: bytes
    dest: bytes
    kind: Kind
    size: int
    mtime_ns: int
    mode: int
    target: bytes | None = None


class PutStatus(StrEnum):
    COPIED = "copied"
    CHANGED = "changed"
    VANISHED = "vanished"
    ERROR = "error"
    NOT_STARTED = "not_started"


@dataclass(frozen=True, slots=True)
class PutResult:
    request: PutRequest
    status: PutStatus
    size: int = 0  # the source version that was copied (read before the copy)
    mtime_ns: int = 0
    error: FileError | None = None


@dataclass(frozen=True, slots=True)
class DestStat:
    size: int
    mtime_ns: int
    mode: int
    is_dir: bool
    is_symlink: bool


class Progress:
    """Progress of one transfer, updated from worker threads and read by the engine.

    The engine sets ``cancelled`` when it abandons a transfer; threads check it between
    chunks and clean up their temp files.
    """

    __slots__ = ("_lock", "bytes", "cancelled", "files", "last_change", "results")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Results in request order, appended as files finish: an abandoned batch still
        # reports the files it completed.
        self.results: list[PutResult] = []
        self.bytes = 0
        self.files = 0
        self.last_change = time.monotonic()
        self.cancelled = False

    def add(self, nbytes: int = 0, files: int = 0) -> None:
        with self._lock:
            self.bytes += nbytes
            self.files += files
            self.last_change = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self.last_change


@runtime_checkable
class Transport(Protocol):
    """One replica root. Errors leave as ``ReplicaUnavailableError`` or ``FileError``."""

    @property
    def capabilities(self) -> Capabilities: ...

    async def probe(self) -> None:
        """Raise ``ReplicaUnavailableError`` unless the root exists and can be written."""

    async def stat(self, dest: bytes) -> DestStat | None:
        """Stat ``dest`` (relative) without following a final symlink; None if absent."""

    async def listdir(self, dest: bytes) -> list[bytes]:
        """Names in folder ``dest`` (relative; ``b""`` is the root)."""

    async def remove(self, dest: bytes) -> None:
        """Remove file ``dest``; absent is fine."""

    async def put(
        self, requests: Sequence[PutRequest], run_id: str, progress: Progress
    ) -> list[PutResult]:
        """Copy a batch atomically per file: temp name, durable, source unchanged, rename.

        One result per request, in order, also appended to ``progress.results`` as files
        finish. Cancellation abandons the batch: files already renamed into place are
        complete, the rest leave no final name behind.
        """

    async def remove_stale_temps(self, dirs: Iterable[bytes], run_id: str) -> int:
        """Remove temp files of other (dead) runs in the folders ``dirs`` (relative)."""

    async def aclose(self) -> None: ...
