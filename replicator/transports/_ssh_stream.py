"""The client end of the SSH stream data path (see ``_receiver`` for the remote end).

Per-file SFTP round trips cap small files far below rsync; one exec channel carrying many
files does not. The receiver is sent over the channel itself (``python3 -c`` with a one-line
loader that reads the source from stdin), so nothing is installed on the host and the login
shell only sees one quoted line. Hosts without ``python3``, or that refuse commands (chrooted
``internal-sftp``), are told apart by the missing greeting; the transport then keeps SFTP.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import struct
from contextlib import suppress
from pathlib import Path

import anyio
import asyncssh

from .._errors import ErrorClass, FileError
from ._errors import file_error

_FILE = struct.Struct("!cIIqHH")
_LINK = struct.Struct("!cIqHHH")
_DATA = struct.Struct("!cI")
GREETING = b"replicator-receiver 1\n"
# Channel window and packet size: the 2 MiB default window caps one channel at 2 MiB per
# round trip (20 MB/s at 100 ms), and large packets cut per-packet work on both ends.
WINDOW = 16 << 20
PACKET = 256 << 10
DATA_CHUNK = 1 << 20

_SOURCE = (Path(__file__).with_name("_receiver.py")).read_bytes()


def receiver_command(root: bytes) -> str:
    """One shell line: python3 reads the receiver's source from stdin, then serves."""
    loader = (f'import sys;exec(compile(sys.stdin.buffer.read({len(_SOURCE)}),'
              f'"replicator-receiver","exec"))')
    return f"exec python3 -c {shlex.quote(loader)} {shlex.quote(os.fsdecode(root))}"


def file_frame(seq: int, mode: int, mtime_ns: int, dest: bytes, tmp: bytes) -> bytes:
    return _FILE.pack(b"F", seq, mode, mtime_ns, len(dest), len(tmp)) + dest + tmp


def data_frame(data: bytes) -> bytes:
    return _DATA.pack(b"D", len(data)) + data


def link_frame(seq: int, mtime_ns: int, dest: bytes, tmp: bytes, target: bytes) -> bytes:
    return (_LINK.pack(b"L", seq, mtime_ns, len(dest), len(tmp), len(target))
            + dest + tmp + target)


COMMIT = b"C"
ABORT = b"A"


class NoReceiver(Exception):
    """The host did not start the receiver (no python3, commands refused)."""


class StreamLost(Exception):
    """The channel broke: the files of the batch not yet reported are in an unknown state
    (either in place and complete, or absent: never partial)."""


class StreamSession:
    """One exec channel running the receiver for one replica root."""

    def __init__(self, process: asyncssh.SSHClientProcess[bytes], timeout: float) -> None:
        self._process = process
        self._timeout = timeout
        self.broken = False

    @classmethod
    async def start(cls, conn: asyncssh.SSHClientConnection, root: bytes,
                    op_timeout: float) -> StreamSession:
        """Start the receiver; NoReceiver if the host cannot run it, StreamLost if the
        connection failed."""
        try:
            with anyio.fail_after(op_timeout):
                process = await conn.create_process(
                    receiver_command(root), encoding=None, window=WINDOW, max_pktsize=PACKET)
        except asyncssh.ChannelOpenError as exc:
            raise NoReceiver(f"commands refused: {exc.reason}") from None
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise StreamLost(f"cannot open a channel: {_reason(exc)}") from None
        session = cls(process, op_timeout)
        why = ""
        try:
            with anyio.fail_after(op_timeout):
                process.stdin.write(_SOURCE)
                await process.stdin.drain()
                greeting = await process.stdout.readline()
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            greeting, why = b"", _reason(exc)
        except BaseException:
            session.close()
            raise
        if greeting == GREETING:
            return session
        stderr = b""
        if not conn.is_closed():
            with anyio.move_on_after(1):
                with suppress(asyncssh.Error, OSError):
                    stderr = await process.stderr.read(4096)
        session.close()
        if conn.is_closed():
            raise StreamLost(f"connection lost: {why or 'closed'}")
        lines = os.fsdecode(stderr).strip().splitlines()
        raise NoReceiver(lines[-1] if lines else why or f"unexpected reply {greeting[:40]!r}")

    async def send(self, data: bytes) -> None:
        """Write to the receiver; waits while the channel window is full."""
        try:
            with anyio.fail_after(self._timeout):
                self._process.stdin.write(data)
                await self._process.stdin.drain()
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            self.broken = True
            raise StreamLost(f"connection lost: {_reason(exc)}") from None

    async def sync(self) -> list[list[object]]:
        """Ask the receiver to flush, rename and report the files sent since the last sync."""
        await self.send(b"S")
        try:
            with anyio.fail_after(self._timeout):
                line = await self._process.stdout.readline()
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            self.broken = True
            raise StreamLost(f"connection lost: {_reason(exc)}") from None
        if not line.endswith(b"\n"):
            self.broken = True
            raise StreamLost("the receiver stopped")
        reply: list[list[object]] = json.loads(line)
        return reply

    def close(self) -> None:
        """Close the channel: a receiver that did not sync removes its temp files."""
        self.broken = True
        self._process.close()

    async def quit(self) -> None:
        if not self.broken:
            with anyio.move_on_after(1), suppress(asyncssh.Error, OSError):
                self._process.stdin.write(b"Q")
                self._process.stdin.write_eof()
                await self._process.wait_closed()
        self.close()


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


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.Error):
        return exc.reason
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__
