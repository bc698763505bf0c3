"""The copy helper's process: batches in on stdin, progress and results out on stdout.

Started by ``_local_helper.CopyHelper``, or ahead of need by the command line (``_spares``,
whose bootstrap starts it). It imports this module, ``_local_batch`` and the package's plain
types only (the bootstrap keeps the packages' ``__init__`` modules from running): a helper is
ready in a few hundredths of a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import signal
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from .._inventory._types import Kind
from ._base import Progress, PutRequest, PutResult
from ._local_batch import BatchWriter

_LENGTH = struct.Struct(">I")  # each frame: its length, then the pickled value
HEAD = _LENGTH.size
# How often a helper reports bytes moved: often enough for the stall timeout (seconds),
# rarely enough to cost nothing.
REPORT_EVERY = 0.25
# One result on the wire: (index of the request, status, size, mtime_ns, error, error class).
Row = tuple[int, str, int, int, str | None, str | None]


_KINDS = {int(kind): kind for kind in Kind}  # a dict lookup per file, not an enum's call


def frame(value: object) -> bytes:
    """``value`` pickled, after its length."""
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def read_length(head: bytes) -> int:
    """The length of the value that follows a frame's ``HEAD`` bytes."""
    return int(_LENGTH.unpack(head)[0])


class _Reporting(Progress):
    """Progress that the helper sends to the engine's process now and then."""

    def __init__(self, send: Callable[[object], None]) -> None:
        super().__init__()
        self._send = send
        self._bytes = 0
        self._files = 0
        self._sent = time.monotonic()

    def add(self, nbytes: int = 0, files: int = 0) -> None:
        self._bytes += nbytes
        self._files += files
        if time.monotonic() - self._sent >= REPORT_EVERY:
            self.report()

    def report(self) -> None:
        if self._bytes or self._files:
            self._send(("progress", self._bytes, self._files))
            self._bytes = self._files = 0
        self._sent = time.monotonic()

    def begin_flush(self) -> None:
        self.report()
        self._send(("flush", 1))

    def end_flush(self) -> None:
        self._send(("flush", -1))


def _die_with_parent() -> None:
    """SIGTERM when the engine's process dies (Linux), so no orphan goes on writing."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _read(stream: BinaryIO, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve() -> None:
    """The helper's main loop: a batch in, its frames out, until end of input or SIGTERM."""
    # Frames go to a private copy of stdout; anything printed goes to stderr instead.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    stdin = sys.stdin.buffer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle
    current: list[_Reporting] = []

    def on_term(signum: int, frame: Any) -> None:
        if not current:
            raise SystemExit(0)
        current[0].cancelled = True  # put_batch stops at its next file and cleans up

    signal.signal(signal.SIGTERM, on_term)
    _die_with_parent()

    def send(value: object) -> None:
        out.write(frame(value))
        out.flush()

    while True:
        head = _read(stdin, HEAD)
        if head is None:
            return
        data = _read(stdin, read_length(head))
        if data is None:
            return
        root, fsync, run_id, rows = pickle.loads(data)
        requests = [PutRequest(source, dest, _KINDS[kind], size, mtime_ns, mode, target)
                    for source, dest, kind, size, mtime_ns, mode, target in rows]
        progress = _Reporting(send)
        current.append(progress)
        results: list[PutResult] = []
        try:
            BatchWriter(root, fsync).put_batch(requests, run_id, progress, results)
        finally:
            current.clear()
        if progress.cancelled:
            return  # told to stop: the engine no longer listens
        progress.report()
        index = {id(request): i for i, request in enumerate(requests)}
        send(("done", [
            (index[id(r.request)], r.status.value, r.size, r.mtime_ns,
             None if r.error is None else str(r.error),
             None if r.error is None else r.error.error_class.value)
            for r in results
        ]))


__all__ = ["HEAD", "REPORT_EVERY", "Row", "frame", "read_length", "serve"]
