"""Local copies in a helper process.

Copying a small file is a dozen system calls. From a worker thread each of them gives up the
GIL and takes it back while the event loop and SQLite's thread want it too: 20,000 files of
4 KiB cost 140,000 context switches, and the kernel spent as long switching as copying. A
helper process runs ``BatchWriter.put_batch`` alone on its own GIL; the engine's process
only hands it batches. Requests go in, progress and results come back, as pickled frames
over the helper's stdin and stdout.

Each helper runs one batch at a time; a local replica starts another when a batch finds its
helpers busy, up to one per worker and core (``LocalTransport``). A helper that cannot start
or dies leaves the work to worker threads for the rest of the run.
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


class CopyHelper:
    """One helper process for a local replica root, started on first use."""

    def __init__(self, root: bytes, fsync: bool) -> None:
        self._root = root
        self._fsync = fsync
        self._process: Process | None = None
        self._stdout: BufferedByteReceiveStream | None = None
        self._lock = anyio.Lock()
        self._stopping: list[Process] = []
        self.broken: str | None = None  # why batches now run in worker threads
        self.queued = 0  # batches handed to this helper and not yet done

    @property
    def busy(self) -> bool:
        return self.queued > 0

    async def start(self) -> None:
        """Start the helper unless it runs (or cannot run). Never raises."""
        if self._process is not None or self.broken is not None:
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
        self.queued += 1
        progress.begin_flush()
        try:
            await self._lock.acquire()
        except BaseException:
            self.queued -= 1
            raise
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
                await process.stdin.send(frame((self._root, self._fsync, run_id, [
                    (r.source, r.dest, r.kind.value, r.size, r.mtime_ns, r.mode, r.target)
                    for r in requests])))
                while True:
                    head = await stdout.receive_exactly(HEAD)
                    message = pickle.loads(await stdout.receive_exactly(read_length(head)))
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
            self.queued -= 1
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
