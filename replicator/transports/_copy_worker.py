"""The copy helper's process: batches in on stdin, progress and results out on stdout.

Started by ``_local_helper.CopyHelper``, or ahead of need by the command line (``_spares``,
whose bootstrap starts it). It imports this module, ``_local_batch``, ``_gc_tuning`` and the
package's plain types only (the bootstrap keeps the packages' ``__init__`` modules from
running): a helper is ready in a few hundredths of a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import queue
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from .._gc_tuning import tune_gc
from .._inventory._kind import Kind
from ._base import Progress, PutRequest, PutResult, PutStatus
from ._local_batch import BatchWriter, StagedBatch

_LENGTH = struct.Struct(">I")  # each frame: its length, then the pickled value
HEAD = _LENGTH.size
# How often a helper reports bytes moved: often enough for the stall timeout (seconds),
# rarely enough to cost nothing.
REPORT_EVERY = 0.25
# One result on the wire: (index of the request, status, size, mtime_ns, error, error class).
Row = tuple[int, str, int, int, str | None, str | None]


_KINDS = {int(kind): kind for kind in Kind}  # a dict lookup per file, not an enum's call
_STATUS_VALUES = {status: status.value for status in PutStatus}  # (Enum.value is a property)


def frame(value: object) -> bytes:
    """``value`` pickled, after its length."""
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def read_length(head: bytes) -> int:
    """The length of the value that follows a frame's ``HEAD`` bytes."""
    return int(_LENGTH.unpack(head)[0])


class _Reporting(Progress):
    """Progress of one batch, sent to the engine's process now and then."""

    def __init__(self, send: Callable[[object], None], seq: int) -> None:
        super().__init__()
        self._send = send
        self.seq = seq
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
            self._send(("progress", self.seq, self._bytes, self._files))
            self._bytes = self._files = 0
        self._sent = time.monotonic()

    def begin_flush(self) -> None:
        self.report()
        self._send(("flush", self.seq, 1))

    def end_flush(self) -> None:
        self._send(("flush", self.seq, -1))


class _Batch:
    """A batch in the helper, from its frame to its results."""

    __slots__ = ("progress", "requests", "results", "staged", "writer")

    def __init__(self, requests: list[PutRequest], progress: _Reporting,
                 writer: BatchWriter) -> None:
        self.requests = requests
        self.progress = progress
        self.writer = writer
        self.results: list[PutResult] = []
        self.staged: StagedBatch | None = None

    def rows(self) -> list[Row]:
        index = {id(request): i for i, request in enumerate(self.requests)}
        return [(index[id(r.request)], _STATUS_VALUES[r.status], r.size, r.mtime_ns,
                 None if r.error is None else str(r.error),
                 None if r.error is None else r.error.error_class.value)
                for r in self.results]


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
    """The helper's main loop, until end of input or SIGTERM.

    Two batches at a time: this thread reads a batch and writes its files to temp names
    while a second thread makes the batches before it durable (``BatchWriter.finish``),
    which mostly waits for the disk. Messages carry the batch's number (its place in the
    input, from 0): ("begin", n) when its files start, ("progress", n, bytes, files),
    ("flush", n, +1 or -1) around what is not counted in bytes, ("done", n, rows).
    """
    # Frames go to a private copy of stdout; anything printed goes to stderr instead.
    tune_gc()
    server = _Server(os.fdopen(os.dup(1), "wb"))
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle
    signal.signal(signal.SIGTERM, server.on_term)
    _die_with_parent()
    server.run(sys.stdin.buffer)
    # Every batch is finished and reported, the second thread has ended: exit without the
    # interpreter's teardown, which the engine would wait for (a hundredth of a second).
    for stream in (sys.stdout, sys.stderr):  # (stdout goes to stderr: see above)
        with contextlib.suppress(OSError):
            stream.flush()
    os._exit(0)


class _Server:
    """The helper's two threads and what they share."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._write_lock = threading.Lock()
        self._staged: queue.Queue[_Batch | None] = queue.Queue(maxsize=1)
        self.inflight: list[_Batch] = []  # read and not yet done; the GIL guards it
        self.reading = False  # the main thread waits for input
        self.stopping = False
        self.failed = False  # the second thread failed: the rest is only cleaned up

    def stop(self) -> None:
        """Read nothing more; each batch in flight stops at its next file and cleans up."""
        self.stopping = True
        for batch in list(self.inflight):
            batch.progress.cancelled = True

    def on_term(self, signum: int, frame: Any) -> None:
        self.stop()
        if self.reading:
            raise SystemExit(0)  # the batches in flight are cleaned up on the way out

    def send(self, value: object) -> None:
        data = frame(value)
        with self._write_lock:
            if self._out.closed:
                return
            try:
                self._out.write(data)
                self._out.flush()
            except OSError:  # the engine's end is gone: nobody waits for these results
                self._close_out()
                self.stop()

    def _close_out(self) -> None:
        with contextlib.suppress(OSError):
            self._out.close()

    def run(self, stdin: BinaryIO) -> None:
        finisher = threading.Thread(target=self._finish_all, name="finish")
        finisher.start()
        seq = 0
        try:
            while not self.stopping:
                self.reading = True
                try:
                    if self.stopping:  # told to stop just before: wait for no input
                        return
                    head = _read(stdin, HEAD)
                    data = None if head is None else _read(stdin, read_length(head))
                finally:
                    self.reading = False
                if data is None:
                    return
                root, fsync, run_id, rows = pickle.loads(data)
                batch = _Batch(
                    [PutRequest(source, dest, _KINDS[kind], size, mtime_ns, mode, target)
                     for source, dest, kind, size, mtime_ns, mode, target in rows],
                    _Reporting(self.send, seq), BatchWriter(root, fsync))
                seq += 1
                self.inflight.append(batch)
                if self.stopping:  # told to stop while it was read
                    batch.progress.cancelled = True
                self.send(("begin", batch.progress.seq))
                batch.staged = batch.writer.stage(batch.requests, run_id, batch.progress,
                                                  batch.results)
                self._staged.put(batch)
        finally:
            self._staged.put(None)
            finisher.join()
            if self.failed:
                raise SystemExit(1)

    def _finish_all(self) -> None:
        """The second thread: the staged batches made durable and their results sent, in
        order. Batches staged meanwhile are finished together: one flush serves them all.
        If finishing fails, the helper stops: the engine sees its output end and copies
        those batches another way, and every later batch is only cleaned up."""
        end = False
        while not end:
            batch = self._staged.get()
            if batch is None:
                return
            group = [batch]
            while True:
                try:
                    more = self._staged.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    end = True
                    break
                group.append(more)
            if not self.failed:
                try:
                    _finish_group(group, self.send)
                except Exception:
                    import traceback  # only here: a tenth of the helper's imports

                    traceback.print_exc()
                    self.failed = True
                    self.stop()
                    with self._write_lock:
                        self._close_out()
            for done in group:
                if done.staged is not None:
                    done.staged.close()  # temp files not renamed (finish closed the others)
                self.inflight.remove(done)


def _finish_group(group: list[_Batch], send: Callable[[object], None]) -> None:
    # One flush for batches of the same root and flush setting (all of them, in practice).
    while group:
        writer = group[0].writer
        same = [b for b in group if (b.writer.root, b.writer.fsync) == (writer.root, writer.fsync)]
        writer.finish([b.staged for b in same if b.staged is not None])
        for batch in same:
            if not batch.progress.cancelled:
                batch.progress.report()
                send(("done", batch.progress.seq, batch.rows()))
        group = [b for b in group if b not in same]


__all__ = ["HEAD", "REPORT_EVERY", "Row", "frame", "read_length", "serve"]
