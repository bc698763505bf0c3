"""Local copies in a helper process.

Copying a small file is a dozen system calls. From a worker thread each of them gives up the
GIL and takes it back while the event loop and SQLite's thread want it too: 20,000 files of
4 KiB cost 140,000 context switches, and the kernel spent as long switching as copying. A
helper process runs ``BatchWriter.put_batch`` alone on its own GIL; the engine's process
only hands it batches. Requests go in, progress and results come back, as pickled frames
over the helper's stdin and stdout.

One helper per local replica runs one batch at a time. A helper that cannot start or dies
leaves the work to worker threads, as before, for the rest of the run.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import structlog
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from .._errors import ErrorClass, FileError
from .._inventory import Kind
from ._base import Progress, PutRequest, PutResult, PutStatus

log = structlog.get_logger("replicator.transports.local")

_LENGTH = struct.Struct(">I")
# How often a helper reports bytes moved: often enough for the stall timeout (seconds),
# rarely enough to cost nothing.
REPORT_EVERY = 0.25
# A helper told to stop gets this long to remove its temp files before it is killed.
STOP_GRACE = 10.0

# Where the replicator package is imported from, for the helper to import the same one.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
# One result on the wire: (index of the request, status, size, mtime_ns, error, error class).
_Row = tuple[int, str, int, int, str | None, str | None]


def _frame(value: object) -> bytes:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


class CopyHelper:
    """The helper process of one local replica root, started on first use."""

    def __init__(self, root: bytes, fsync: bool) -> None:
        self._root = root
        self._fsync = fsync
        self._process: Process | None = None
        self._stdout: BufferedByteReceiveStream | None = None
        self._lock = anyio.Lock()
        self._stopping: list[Process] = []
        self.broken: str | None = None  # why batches now run in worker threads

    async def start(self) -> None:
        """Start the helper unless it runs (or cannot run). Never raises."""
        if self._process is not None or self.broken is not None:
            return
        code = (f"import sys; sys.path.insert(0, {_PACKAGE_PARENT!r}); "
                "from replicator.transports._local_helper import serve; serve()")
        try:
            process = await anyio.open_process([sys.executable, "-c", code], stderr=None)
        except OSError as exc:
            self._give_up(f"copy helper did not start: {exc}")
            return
        assert process.stdout is not None
        self._process = process
        self._stdout = BufferedByteReceiveStream(process.stdout)

    async def put(self, requests: Sequence[PutRequest], run_id: str,
                  progress: Progress) -> bool:
        """Copy a batch in the helper, results into ``progress.results``.

        False when the helper cannot be used; the batch is then to be run another way (files
        a dying helper renamed into place are simply copied again). Cancellation tells the
        helper to stop at its next file and remove its temp files, and returns at once.
        """
        # Waiting for the helper is not a stall: the batch ahead reports its own progress.
        progress.begin_flush()
        try:
            await self._lock.acquire()
        finally:
            progress.end_flush()
        flushes = 0
        try:
            await self.start()
            process, stdout = self._process, self._stdout
            if process is None or stdout is None:
                return False
            assert process.stdin is not None
            try:
                # Plain tuples: pickling dataclasses goes through fields() per object.
                await process.stdin.send(_frame((self._root, self._fsync, run_id, [
                    (r.source, r.dest, r.kind.value, r.size, r.mtime_ns, r.mode, r.target)
                    for r in requests])))
                while True:
                    head = await stdout.receive_exactly(_LENGTH.size)
                    message = pickle.loads(
                        await stdout.receive_exactly(_LENGTH.unpack(head)[0]))
                    kind = message[0]
                    if kind == "progress":
                        progress.add(message[1], message[2])
                    elif kind == "flush":
                        if message[1] > 0:
                            flushes += 1
                            progress.begin_flush()
                        else:
                            flushes -= 1
                            progress.end_flush()
                    else:
                        progress.results.extend(_results(requests, message[1]))
                        return True
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
                    anyio.ClosedResourceError, OSError, pickle.UnpicklingError) as exc:
                self._stop()
                self._give_up(f"copy helper lost: {exc!r}")
                return False
            except BaseException:
                progress.cancelled = True
                self._stop()
                raise
        finally:
            for _ in range(flushes):
                progress.end_flush()
            self._lock.release()

    def _give_up(self, reason: str) -> None:
        self.broken = reason
        log.warning("local copies go on in worker threads", reason=reason,
                    root=os.fsdecode(self._root))

    def _stop(self) -> None:
        """SIGTERM: the helper stops at its next file, removes its temp files and exits."""
        process, self._process, self._stdout = self._process, None, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            self._stopping.append(process)

    async def aclose(self) -> None:
        process, self._process, self._stdout = self._process, None, None
        with anyio.CancelScope(shield=True):
            if process is not None:
                assert process.stdin is not None
                with contextlib.suppress(anyio.BrokenResourceError, OSError):
                    await process.stdin.aclose()  # end of input: it exits
                self._stopping.append(process)
            for stopping in self._stopping:
                with anyio.move_on_after(STOP_GRACE):
                    await stopping.wait()
                if stopping.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        stopping.kill()
                    await stopping.wait()
                await stopping.aclose()
            self._stopping.clear()


def _results(requests: Sequence[PutRequest], rows: list[_Row]) -> list[PutResult]:
    return [
        PutResult(requests[index], PutStatus(status), size, mtime_ns,
                  None if error is None else FileError(error, ErrorClass(error_class or "")))
        for index, status, size, mtime_ns, error, error_class in rows
    ]


# --- the helper process ----------------------------------------------------------------


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
    from ._local import BatchWriter  # here, not at the top: _local imports this module

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
        out.write(_frame(value))
        out.flush()

    while True:
        head = _read(stdin, _LENGTH.size)
        if head is None:
            return
        data = _read(stdin, _LENGTH.unpack(head)[0])
        if data is None:
            return
        root, fsync, run_id, rows = pickle.loads(data)
        requests = [PutRequest(source, dest, Kind(kind), size, mtime_ns, mode, target)
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
