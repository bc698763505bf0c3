"""Local copies in a helper process.

Copying a small file is a dozen system calls. From a worker thread each of them gives up the
GIL and takes it back while the event loop and SQLite's thread want it too: 20,000 files of
4 KiB cost 140,000 context switches, and the kernel spent as long switching as copying. A
helper process runs the ``BatchWriter`` alone on its own GIL; the engine's process
only hands it batches. Requests go in, progress and results come back, as pickled frames
over the helper's stdin and stdout.

A helper holds two batches at a time (``DEPTH``): it writes the files of one while the one
before it is flushed to disk, which mostly waits for the disk. A local replica starts
another helper when a batch finds its helpers busy, up to one per worker and core
(``LocalTransport``). A helper that cannot start or dies leaves the work to worker threads
for the rest of the run.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Sequence

import anyio
import structlog
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from .._errors import ErrorClass, FileError
from ._base import Progress, PutRequest, PutResult, PutStatus
from ._copy_worker import HEAD, Row, frame, read_length
from ._spares import start_helper, stop_helper, take_spare_helper

log = structlog.get_logger("replicator.transports.local")


# Batches handed to one helper at a time: it writes one while the one before is flushed.
DEPTH = 2
# Exceptions that mean the helper's pipes are gone or garbled.
_LOST = (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
         anyio.ClosedResourceError, OSError, pickle.UnpicklingError)


class _Pending:
    """A batch handed to a helper and not yet done."""

    __slots__ = ("done", "flushes", "progress", "requests", "waiting")

    def __init__(self, requests: Sequence[PutRequest], progress: Progress) -> None:
        self.requests = requests
        self.progress = progress
        self.waiting = True  # in the helper's input, behind another batch
        self.flushes = 0  # flushes the helper began for it and did not end
        self.done: bool | None = None  # True once its results are in, False if never

    def settle(self, done: bool) -> None:
        """Done (results in) or not (to be copied another way); its marks removed."""
        if self.done is None:
            self.done = done
        if self.waiting:
            self.waiting = False
            self.progress.end_flush()
        for _ in range(self.flushes):
            self.progress.end_flush()
        self.flushes = 0


class _Session:
    """One helper process: its pipes and the batches it holds, by number."""

    def __init__(self, process: Process) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self.process = process
        self.stdin = process.stdin
        self.stdout = BufferedByteReceiveStream(process.stdout)
        self.send_lock = anyio.Lock()
        self.read_lock = anyio.Lock()
        self.pending: dict[int, _Pending] = {}
        self.sent = 0
        self.ended = False  # stopped or lost: nothing more comes from it

    def end(self) -> None:
        """No batch it holds will finish: each is to be copied another way."""
        self.ended = True
        for entry in self.pending.values():
            entry.settle(False)

    async def read_until(self, entry: _Pending) -> None:
        """Read the helper's messages, each to its batch, until ``entry`` is settled."""
        while entry.done is None:
            head = await self.stdout.receive_exactly(HEAD)
            message = pickle.loads(await self.stdout.receive_exactly(read_length(head)))
            other = self.pending.get(message[1])
            if other is None or other.done is not None:
                continue  # a batch abandoned meanwhile
            kind = message[0]
            if kind == "progress":
                other.progress.add(message[2], message[3])
            elif kind == "begin":
                if other.waiting:
                    other.waiting = False
                    other.progress.end_flush()
            elif kind == "flush":
                if message[2] > 0:
                    other.flushes += 1
                    other.progress.begin_flush()
                else:
                    other.flushes -= 1
                    other.progress.end_flush()
            else:
                other.progress.results.extend(_results(other.requests, message[2]))
                other.settle(True)


class CopyHelper:
    """One helper process for a local replica root, started on first use."""

    def __init__(self, root: bytes, fsync: bool) -> None:
        self._root = root
        self._fsync = fsync
        self._session: _Session | None = None
        self._slots = anyio.Semaphore(DEPTH)
        self._start_lock = anyio.Lock()
        self._stopping: list[Process] = []
        self.broken: str | None = None  # why batches now run in worker threads
        self.queued = 0  # batches handed to this helper and not yet done

    @property
    def busy(self) -> bool:
        return self.queued > 0

    @property
    def process(self) -> Process | None:
        """The helper's process while it runs."""
        return None if self._session is None else self._session.process

    async def start(self) -> None:
        """Start the helper unless it runs (or cannot run). Never raises."""
        async with self._start_lock:
            if self._session is not None or self.broken is not None:
                return
            process = take_spare_helper()
            spare = process is not None
            if process is None:
                try:
                    process = await start_helper()
                except OSError as exc:
                    self._give_up(f"copy helper did not start: {exc}")
                    return
            log.debug("copy helper", pid=process.pid, spare=spare, root=os.fsdecode(self._root))
            self._session = _Session(process)

    async def put(self, requests: Sequence[PutRequest], run_id: str,
                  progress: Progress) -> bool:
        """Copy a batch in the helper, results into ``progress.results``.

        False when the helper cannot be used; the batch is then to be run another way (files
        a dying helper renamed into place are simply copied again). Cancellation tells the
        helper to stop at its next file and remove its temp files, and returns at once; the
        other batch it held is then copied another way too.
        """
        self.queued += 1
        entry = _Pending(requests, progress)
        # Waiting for the helper is not a stall: the batch ahead reports its own progress.
        progress.begin_flush()
        session: _Session | None = None
        try:
            async with self._slots:
                await self.start()
                session = self._session
                if session is None:
                    return False
                async with session.send_lock:
                    if session.ended:
                        return False
                    seq, session.sent = session.sent, session.sent + 1
                    session.pending[seq] = entry
                    # Plain tuples: pickling dataclasses goes through fields() per object.
                    await session.stdin.send(frame((self._root, self._fsync, run_id, [
                        (r.source, r.dest, int(r.kind), r.size, r.mtime_ns, r.mode, r.target)
                        for r in requests])))
                while entry.done is None:
                    async with session.read_lock:
                        if session.ended:
                            break
                        await session.read_until(entry)
                return bool(entry.done)
        except _LOST as exc:
            if session is not None and not session.ended:
                self._stop(session)
                self._give_up(f"copy helper lost: {exc!r}")
            return False
        except BaseException:
            progress.cancelled = True
            if session is not None and entry.done is None and entry in session.pending.values():
                self._stop(session)  # it has the batch: it stops and removes its temp files
            raise
        finally:
            entry.settle(False)
            if session is not None:
                session.pending = {k: v for k, v in session.pending.items() if v is not entry}
            self.queued -= 1

    def _give_up(self, reason: str) -> None:
        self.broken = reason
        log.warning("local copies go on in worker threads", reason=reason,
                    root=os.fsdecode(self._root))

    def _stop(self, session: _Session) -> None:
        """SIGTERM: the helper stops at its next file, removes its temp files and exits."""
        if session.ended:
            return
        session.end()
        if self._session is session:
            self._session = None
        with contextlib.suppress(ProcessLookupError):
            session.process.terminate()
        self._stopping.append(session.process)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        with anyio.CancelScope(shield=True):
            if session is not None:
                session.end()
                with contextlib.suppress(anyio.BrokenResourceError, OSError):
                    await session.stdin.aclose()  # end of input: it exits
                self._stopping.append(session.process)
            for stopping in self._stopping:
                await stop_helper(stopping)
            self._stopping.clear()


_STATUS = {status.value: status for status in PutStatus}


def _results(requests: Sequence[PutRequest], rows: list[Row]) -> list[PutResult]:
    # Once per file: the status by a dict lookup (an enum's call is ten times slower).
    return [
        PutResult(requests[index], _STATUS[status], size, mtime_ns,
                  None if error is None else FileError(error, ErrorClass(error_class or "")))
        for index, status, size, mtime_ns, error, error_class in rows
    ]
