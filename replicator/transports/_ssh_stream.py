"""The client end of the SSH stream data path (see ``_receiver`` for the remote end).

Per-file SFTP round trips cap small files far below rsync; one stream carrying many files
does not. The stream runs over a carrier (``_ssh_carriers``: the OpenSSH client, else an
asyncssh exec channel). The receiver is sent over the stream itself (``python3 -c`` with a one-line
loader that reads the source from stdin), so nothing is installed on the host and the login
shell only sees one quoted line. Hosts without ``python3``, or that refuse commands (chrooted
``internal-sftp``), are told apart by the missing greeting; the transport then keeps SFTP.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import time
from typing import Any

import anyio

from .._errors import ErrorClass, FileError
from ._base import Progress
from ._errors import file_error
from ._ssh_carriers import Carrier, StreamLost
from ._ssh_options import RECEIVER_SOURCE

_FILE = struct.Struct("!cIIqHH")
_WHOLE = struct.Struct("!cIIqHHI")
_LINK = struct.Struct("!cIqHHH")
_DATA = struct.Struct("!cI")
_NAMED = struct.Struct("!cH")
_LENGTH = struct.Struct("!I")
GREETING = b"replicator-receiver 3\n"
FLUSHING = b"flushing\n"
PONG = b"pong\n"
DATA_CHUNK = 1 << 20


def file_frame(seq: int, mode: int, mtime_ns: int, dest: bytes, tmp: bytes) -> bytes:
    return _FILE.pack(b"F", seq, mode, mtime_ns, len(dest), len(tmp)) + dest + tmp


def whole_header(seq: int, mode: int, mtime_ns: int, dest: bytes, tmp: bytes,
                 length: int) -> bytes:
    """The header of a small file sent whole (its ``length`` content bytes follow it)."""
    return _WHOLE.pack(b"W", seq, mode, mtime_ns, len(dest), len(tmp), length) + dest + tmp


def data_header(length: int) -> bytes:
    """The header of a data frame of ``length`` bytes (which follow it)."""
    return _DATA.pack(b"D", length)


def link_frame(seq: int, mtime_ns: int, dest: bytes, tmp: bytes, target: bytes) -> bytes:
    return (_LINK.pack(b"L", seq, mtime_ns, len(dest), len(tmp), len(target))
            + dest + tmp + target)


COMMIT = b"C"
ABORT = b"A"


class NoReceiver(StreamLost):
    """The host did not start the receiver (no python3, commands refused, ssh failed)."""


class StreamSession:
    """The receiver for one replica root, at the far end of a carrier."""

    def __init__(self, carrier: Carrier) -> None:
        self.carrier = carrier
        self.rtt = 0.0  # seconds for a frame to the receiver and its answer back
        # Syncs asked for and reports read: a batch's files and sync may be sent while the
        # report of the batch before is still to come (see ``request_sync``).
        self._asked = 0
        self._answered = 0
        self._reported = anyio.Event()
        self._waiting: dict[int, Progress] = {}  # by ticket: whose report it is

    @property
    def pending(self) -> int:
        """Syncs asked for whose reports were not read yet."""
        return self._asked - self._answered

    @property
    def broken(self) -> bool:
        return self.carrier.lost

    @classmethod
    async def start(cls, carrier: Carrier) -> StreamSession:
        """Send the receiver's source and wait for its greeting: NoReceiver without one.
        The carrier is closed unless the session starts (also when cancelled: an ssh
        process left behind would outlive the run)."""
        try:
            return await cls._start(carrier)
        except BaseException:
            carrier.close()
            raise

    @classmethod
    async def _start(cls, carrier: Carrier) -> StreamSession:
        session = cls(carrier)
        why = ""
        try:
            await carrier.write(RECEIVER_SOURCE)
            greeting = await carrier.readline()
        except StreamLost as exc:
            greeting, why = b"", str(exc)
        if greeting == GREETING:
            started = time.monotonic()
            await carrier.write(b"P")
            if await carrier.readline() != PONG:
                raise StreamLost("the receiver did not answer")
            session.rtt = time.monotonic() - started
            return session
        text, definitive = await carrier.failure()
        raise NoReceiver(text or why or f"unexpected reply {greeting[:40]!r}", definitive)

    async def send(self, data: bytes) -> None:
        """Write to the receiver; waits while it is not reading. StreamLost on failure."""
        await self.carrier.write(data)

    async def sync(self, progress: Progress) -> list[list[object]]:
        """Ask the receiver to flush, rename and report the files sent since the last sync."""
        return await self.report(await self.request_sync(), progress)

    async def request_sync(self) -> int:
        """Ask the receiver to flush, rename and report the files sent since the last sync;
        the ticket for ``report``. Once asked, the session may carry the next batch's files
        (the receiver reads them after this flush) while this report is awaited."""
        await self.carrier.write(b"S")
        self._asked += 1
        return self._asked - 1

    async def report(self, ticket: int, progress: Progress) -> list[list[object]]:
        """The receiver's report for the sync ``ticket``, read after the reports before it.

        Once the receiver says it read everything, the wait is the far disk flushing
        (bounded by the operation timeout); until then, a silent peer is a stall.
        """
        self._waiting[ticket] = progress
        try:
            while self._answered != ticket:
                if self.carrier.lost:
                    raise StreamLost("the receiver stopped")
                if self._waiting.get(self._answered) is progress:
                    # The lane ahead is this batch's other lane (they share the progress):
                    # its silence is this batch's stall.
                    await self._reported.wait()
                else:
                    # Another batch's report comes first: waiting for the session, which
                    # is not a stall (as waiting for a free session is not).
                    with progress.flushing():
                        await self._reported.wait()
            try:
                line = await self.carrier.readline()
                if line == FLUSHING:
                    with progress.flushing():
                        line = await self.carrier.readline()
                if not line.endswith(b"\n") or line == FLUSHING:
                    raise StreamLost("the receiver stopped")
                reply: list[list[object]] = json.loads(line)
            finally:
                self._answered += 1  # the next report's turn
        except BaseException:
            # A report left unread (cancelled, failed) would be taken for the next one's:
            # the session is given up, and the reports waiting for their turn with it.
            self.carrier.close()
            raise
        finally:
            del self._waiting[ticket]
            self._reported.set()
            self._reported = anyio.Event()
        return reply

    async def inspect(self, marker: bytes) -> list[Any]:
        """The receiver's ``[root, probe, marker]`` for the marker file ``marker`` (see
        ``_receiver``): whether the root is a folder, whether a file can be created in it,
        and the marker's text, in one round trip."""
        await self.carrier.write(_NAMED.pack(b"I", len(marker)) + marker)
        answer = self._decoded(await self._answer())
        if not isinstance(answer, list) or len(answer) != 3:
            self.carrier.close()
            raise StreamLost(f"the receiver answered {answer!r}")
        return answer

    async def write_whole(self, name: bytes, content: bytes) -> list[Any] | None:
        """Have the receiver replace the root's file ``name`` by ``content`` (temp file,
        fsync, rename): None, or ``[errno, strerror]``."""
        await self.carrier.write(_NAMED.pack(b"K", len(name)) + _LENGTH.pack(len(content))
                                 + name + content)
        answer = self._decoded(await self._answer())
        if answer is not None and not isinstance(answer, list):
            self.carrier.close()
            raise StreamLost(f"the receiver answered {answer!r}")
        return answer

    def _decoded(self, line: bytes) -> Any:
        try:
            return json.loads(line)
        except ValueError:
            self.carrier.close()
            raise StreamLost(f"the receiver answered {line[:80]!r}") from None

    async def _answer(self) -> bytes:
        line = await self.carrier.readline()
        if not line.endswith(b"\n"):
            self.carrier.close()
            raise StreamLost("the receiver stopped")
        return line

    def close(self) -> None:
        """Stop at once: a receiver that did not sync removes its temp files."""
        self.carrier.close()

    async def quit(self) -> None:
        await self.carrier.quit()


def result_error(entry: list[object], dest: bytes) -> FileError:
    """The FileError of a receiver's ``[seq, errno, what, strerror]``."""
    _, code, what, reason = entry
    code, what = int(str(code)), str(what)
    exc = OSError(code, str(reason))
    if what == "mkdir" and code in (errno.ENOTDIR, errno.ELOOP, errno.EEXIST):
        return FileError(f"destination path blocked: a folder of {os.fsdecode(dest)!r} is"
                         " not a folder (or is a symlink, which is not followed)",
                         ErrorClass.PERMANENT)
    if what == "rename into" and code in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
        return FileError(f"destination path blocked: {os.fsdecode(dest)!r} is a folder",
                         ErrorClass.PERMANENT)
    return file_error(exc, what, dest)
