"""The transport protocol: what the engine needs from a place that holds a replica."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

from .._errors import FileError
from .._inventory._kind import Kind

if TYPE_CHECKING:
    # The copy helpers import this module: its value types live in ``_stats``, so that a
    # helper does not import ``dataclasses`` (with ``inspect``: a third of its start-up).
    from ._stats import Capabilities, DestStat, SourceStat

# A file in each replica root naming the replica: an empty mount point (an unmounted disk)
# or another disk mounted in its place lacks it, and is then refused instead of filled.
MARKER = b".replicator-replica"


class SourceReader(Protocol):
    """One origin file opened for reading on a remote source."""

    @property
    def stat(self) -> SourceStat:
        """The file as it was when opened (fstat)."""

    async def read(self, progress: Progress) -> bytes:
        """The next block of the content, in order; b"" at the end of the file.
        ``progress.add`` is called as bytes arrive.

        Raises ``FileError`` (per file) or ``OriginUnavailableError``.
        """

    async def fstat(self) -> SourceStat:
        """The open file now: compared with ``stat`` after the read."""

    async def aclose(self) -> None: ...


@runtime_checkable
class Source(Protocol):
    """An origin that is not a local folder (pull mode): its files are read through it.

    Errors leave as ``FileError`` (this file) or ``OriginUnavailableError`` (the whole
    origin cannot be reached: copies are released, not charged).
    """

    @property
    def where(self) -> str: ...

    @property
    def mtime_precision_ns(self) -> int: ...

    async def lstat(self, path: bytes) -> SourceStat | None:
        """Stat ``path`` without following a final symlink; None if it does not exist."""

    async def open(self, path: bytes) -> SourceReader | None:
        """Open a regular file for reading; None if it does not exist."""


class PutRequest(NamedTuple):
    """Copy one origin file to ``dest``, relative to the replica root.

    ``source`` is a local path, or a path on ``remote`` when that is set (pull mode).
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
    remote: Source | None = None

    def expects(self, version: SourceStat) -> bool:
        """Whether a remote source is still the version the inventory asked for."""
        return (version.kind is self.kind and version.size == self.size
                and version.mtime_ns == self.mtime_ns
                and (self.kind is not Kind.SYMLINK or version.target == self.target))


class PutStatus(StrEnum):
    COPIED = "copied"
    CHANGED = "changed"
    VANISHED = "vanished"
    ERROR = "error"
    NOT_STARTED = "not_started"
    # The origin could not be reached (pull mode): released, not charged; ``error`` says why.
    SOURCE_UNAVAILABLE = "source_unavailable"


class PutResult(NamedTuple):
    request: PutRequest
    status: PutStatus
    size: int = 0  # the source version that was copied (read before the copy)
    mtime_ns: int = 0
    error: FileError | None = None


class Progress:
    """Progress of one transfer, updated from worker threads and read by the engine.

    The engine sets ``cancelled`` when it abandons a transfer; threads check it between
    chunks and clean up their temp files.
    """

    __slots__ = ("_flushing", "_lock", "bytes", "cancelled", "files", "last_change", "results")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flushing = 0
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
        """Seconds without progress; a flush in progress counts as progress."""
        if self._flushing:
            return 0.0
        return time.monotonic() - self.last_change

    @contextmanager
    def flushing(self) -> Iterator[None]:
        """Mark a flush to disk: it moves bytes the counters cannot see, so a long flush of
        a large batch to a slow disk is not taken for a stall."""
        self.begin_flush()
        try:
            yield
        finally:
            self.end_flush()

    def begin_flush(self) -> None:
        with self._lock:
            self._flushing += 1

    def end_flush(self) -> None:
        with self._lock:
            self._flushing -= 1
            self.last_change = time.monotonic()


@runtime_checkable
class Transport(Protocol):
    """One replica root. Errors leave as ``ReplicaUnavailableError`` or ``FileError``."""

    @property
    def capabilities(self) -> Capabilities: ...

    async def probe(self) -> None:
        """Raise ``ReplicaUnavailableError`` unless the root exists and can be written."""

    async def prepare(self) -> None:
        """Get ready for transfers while the engine probes (e.g. log in a session). Never
        raises: whatever fails here fails again, and is reported, in ``put``."""

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

    async def read_marker(self) -> str | None:
        """The replica's identity marker (``MARKER`` in the root), or None if absent."""

    async def write_marker(self, text: str) -> None:
        """Write the identity marker durably (temp name, flush, rename)."""

    async def aclose(self) -> None: ...
