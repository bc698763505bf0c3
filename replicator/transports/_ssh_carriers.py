"""What carries the stream to the receiver: the OpenSSH client, or an asyncssh exec channel.

The OpenSSH client encrypts in C in its own process, so on a small machine the bytes cost
this process only a pipe write; asyncssh does the same work in this process, packet by
packet. Both obey the same rules: host keys checked against the same known_hosts file (or
not at all only with ``insecure_skip_host_key_check``), the same identity, user and port,
and no prompts. Each write and read is bounded by the operation timeout.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Protocol, TypeVar

import anyio

from .._lazy import LazyModule
from ._logins import spawn_ssh

if TYPE_CHECKING:
    import asyncssh

    from ._base import Progress
else:
    asyncssh = LazyModule("replicator.transports._asyncssh")  # for the asyncssh carrier only

# Channel window and packet size for asyncssh: the 2 MiB default window caps one channel at
# 2 MiB per round trip (20 MB/s at 100 ms), and large packets cut per-packet work.
WINDOW = 16 << 20
PACKET = 256 << 10
T = TypeVar("T")
# Bytes of a large file per thread call into ssh's pipe: each call is bounded by the
# operation timeout, so it must fit in it at the slowest link's speed.
FILE_CALL = 8 << 20
# What ssh says when the connection went away before or during the login.
_DROPPED = re.compile(r"Connection (closed|reset|timed out)|kex_exchange_identification"
                      r"|Broken pipe|banner exchange")


class StreamLost(Exception):
    """The carrier broke: files not yet reported are either complete in place or absent.

    ``definitive`` when trying again cannot help (the host refuses commands).
    """

    def __init__(self, message: str, definitive: bool = False) -> None:
        super().__init__(message)
        self.definitive = definitive


class Carrier(Protocol):
    @property
    def lost(self) -> bool:
        """Whether the carrier can no longer be used."""

    async def write(self, data: bytes) -> None:
        """Send bytes; waits while the peer is not reading. StreamLost on failure."""

    async def readline(self) -> bytes:
        """One reply line; b"" when the receiver ended. StreamLost on failure."""

    async def write_file(self, fd: int, count: int, head: Callable[[int], bytes], chunk: int,
                         progress: Progress) -> tuple[int, OSError | None]:
        """Send ``count`` bytes of ``fd`` from its offset, as frames of at most ``chunk``
        bytes, each after its header ``head(n)``. Returns the bytes the file had, and the
        error reading it if any: fewer bytes when it shrank meanwhile or could not be read,
        and the last frame is then padded with zeros (the file is to be aborted).
        StreamLost when the carrier fails."""

    async def failure(self) -> tuple[str, bool]:
        """Why the receiver did not start: what the far side said on stderr (best effort,
        bounded), and whether that is definitive (not a dropped connection)."""

    def close(self) -> None:
        """Stop at once: a receiver that did not sync removes its temp files."""

    async def quit(self) -> None:
        """End politely (the receiver is told to exit), bounded in time."""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _splice_frames(src: int, pipe: int, count: int, head: Callable[[int], bytes], chunk: int,
                   progress: Progress) -> tuple[int, OSError | None]:
    """Frames of ``src`` into ``pipe``, spliced: the file's pages go to the pipe without a
    copy through this process (read and write where splice cannot). See write_file."""
    real = 0
    while count:
        n = min(chunk, count)
        _write_all(pipe, head(n))
        moved = 0
        error: OSError | None = None
        while moved < n:
            try:
                k = os.splice(src, pipe, n - moved)
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    raise  # the carrier's side
                try:  # splice cannot (or failed): read, which tells the source's error
                    data = os.read(src, n - moved)
                except OSError as read_error:
                    error = read_error
                    break
                _write_all(pipe, data)
                k = len(data)
            if k == 0:
                break
            moved += k
        real += moved
        if moved < n:  # shrank or unreadable: the frame still needs its n bytes
            _write_all(pipe, bytes(n - moved))
            return real, error
        count -= n
        progress.add(n)
    return real, None


class OpensshCarrier:
    """An ``ssh`` client process; its pipes are served by worker threads (they block)."""

    def __init__(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        self._proc = proc
        self._timeout = timeout
        self._lost = False
        self._said = b""  # stderr read when the carrier was closed

    @classmethod
    async def open(cls, argv: list[str], op_timeout: float) -> OpensshCarrier:
        try:
            # Shielded: a cancellation delivered once the thread returned would lose the
            # process (the caller closes the carrier it gets).
            with anyio.CancelScope(shield=True):
                proc = await anyio.to_thread.run_sync(spawn_ssh, argv)
        except OSError as exc:
            raise StreamLost(f"cannot run ssh: {exc}") from None
        return cls(proc, op_timeout)

    @property
    def lost(self) -> bool:
        return self._lost or self._proc.poll() is not None

    async def write(self, data: bytes) -> None:
        assert self._proc.stdin is not None
        await self._blocking(_write_all, self._proc.stdin.fileno(), data)

    async def readline(self) -> bytes:
        assert self._proc.stdout is not None
        line: bytes = await self._blocking(self._proc.stdout.readline)
        return line

    async def write_file(self, fd: int, count: int, head: Callable[[int], bytes], chunk: int,
                         progress: Progress) -> tuple[int, OSError | None]:
        assert self._proc.stdin is not None
        pipe = self._proc.stdin.fileno()
        real = 0
        while count:
            n = min(FILE_CALL, count)
            got, error = await self._blocking(_splice_frames, fd, pipe, n, head, chunk,
                                              progress)
            real += got
            if got < n:
                return real, error
            count -= n
        return real, None

    async def _blocking(self, fn: Callable[..., T], *args: object) -> T:
        # A thread stuck on a pipe cannot be interrupted: it is abandoned, and killing the
        # process (close) ends its call.
        try:
            with anyio.fail_after(self._timeout):
                return await anyio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
        except TimeoutError:
            self.close()
            raise StreamLost(f"no answer within {self._timeout} s") from None
        except (OSError, ValueError) as exc:
            self.close()
            raise StreamLost(f"ssh ended: {exc}") from None
        except BaseException:
            self.close()
            raise

    async def failure(self) -> tuple[str, bool]:
        # The transport's own connection to the host works: whatever stops the OpenSSH
        # client (its host key check, its ciphers, commands refused, no python3) stays.
        proc = self._proc
        with anyio.move_on_after(2):
            await anyio.to_thread.run_sync(_reap, proc, 2.0, abandon_on_cancel=True)
        if proc.poll() is None:
            self.close()
        text = self._said + self._read_stderr()
        lines = os.fsdecode(text).strip().splitlines()
        tail = lines[-1] if lines else ""
        # ssh's own failures exit 255; a connection dropped before or during the login
        # (sshd's MaxStartups, a network blip) may well work the next time.
        dropped = proc.returncode == 255 and _DROPPED.search(tail) is not None
        return (f"ssh exit {proc.returncode}: {tail}" if tail else f"ssh exit {proc.returncode}",
                not dropped)

    def _read_stderr(self) -> bytes:
        """What ssh wrote on stderr and nobody read yet, without waiting for more."""
        stderr = self._proc.stderr
        with suppress(OSError, ValueError):  # closed, or nothing there
            if stderr is not None and not stderr.closed:
                os.set_blocking(stderr.fileno(), False)
                return stderr.read(8192) or b""
        return b""

    def close(self) -> None:
        self._lost = True
        proc = self._proc
        if proc.poll() is None:
            with suppress(OSError):
                proc.kill()
            try:
                proc.wait(0.5)  # reaps a killed child: milliseconds
            except subprocess.TimeoutExpired:
                # A machine too busy to let it die yet (or another thread waiting for it):
                # reaped in the background, never left a zombie.
                threading.Thread(target=proc.wait, name="reap ssh", daemon=True).start()
        # Kept for failure(): a write that met a dead ssh closes the carrier first.
        self._said += self._read_stderr()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with suppress(OSError):
                    pipe.close()

    async def quit(self) -> None:
        if not self.lost and self._proc.stdin is not None:
            with suppress(StreamLost, OSError):
                await self.write(b"Q")
                self._proc.stdin.close()
                with anyio.move_on_after(2):
                    await anyio.to_thread.run_sync(_reap, self._proc, 2.0,
                                                   abandon_on_cancel=True)
        self.close()


def _reap(proc: subprocess.Popen[bytes], seconds: float) -> None:
    with suppress(subprocess.TimeoutExpired):
        proc.wait(seconds)


class AsyncsshCarrier:
    """An exec channel on the transport's own asyncssh connection."""

    def __init__(self, process: asyncssh.SSHClientProcess[bytes], timeout: float) -> None:
        self._process = process
        self._timeout = timeout
        self._lost = False

    @classmethod
    async def open(cls, conn: asyncssh.SSHClientConnection, command: str, op_timeout: float
                   ) -> AsyncsshCarrier:
        try:
            with anyio.fail_after(op_timeout):
                process = await conn.create_process(command, encoding=None, window=WINDOW,
                                                    max_pktsize=PACKET)
        except asyncssh.ChannelOpenError as exc:
            raise StreamLost(f"commands refused: {exc.reason}", definitive=True) from None
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise StreamLost(f"cannot open a channel: {_reason(exc)}") from None
        return cls(process, op_timeout)

    @property
    def lost(self) -> bool:
        return self._lost or self._process.channel.is_closing()

    async def write(self, data: bytes) -> None:
        try:
            with anyio.fail_after(self._timeout):
                self._process.stdin.write(data)
                await self._process.stdin.drain()
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            self.close()
            raise StreamLost(f"connection lost: {_reason(exc)}") from None

    async def readline(self) -> bytes:
        try:
            with anyio.fail_after(self._timeout):
                return await self._process.stdout.readline()
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            self.close()
            raise StreamLost(f"connection lost: {_reason(exc)}") from None

    async def write_file(self, fd: int, count: int, head: Callable[[int], bytes], chunk: int,
                         progress: Progress) -> tuple[int, OSError | None]:
        real = 0
        while count:
            n = min(chunk, count)
            try:
                data = await anyio.to_thread.run_sync(os.read, fd, n)
            except OSError as exc:
                await self.write(head(n) + bytes(n))
                return real, exc
            real += len(data)
            await self.write(head(n) + data + bytes(n - len(data)))
            if len(data) < n:
                return real, None
            count -= n
            progress.add(n)
        return real, None

    async def failure(self) -> tuple[str, bool]:
        text = b""
        with anyio.move_on_after(1), suppress(asyncssh.Error, OSError):
            text = await self._process.stderr.read(8192)
            await self._process.wait_closed()
        # A command that exited (no python3: 127) will not start next time either; a
        # channel closed without an exit status is a dropped connection.
        status = self._process.exit_status
        lines = os.fsdecode(text).strip().splitlines()
        reason = lines[-1] if lines else f"exit status {status}"
        return reason, status is not None

    def close(self) -> None:
        self._lost = True
        # Abort, not close: a clean close waits for unsent data, which a peer that stopped
        # reading never takes; the receiver sees its input end and removes its temp files.
        self._process.channel.abort()

    async def quit(self) -> None:
        if not self.lost:
            with anyio.move_on_after(1), suppress(asyncssh.Error, OSError):
                self._process.stdin.write(b"Q")
                self._process.stdin.write_eof()
                await self._process.wait_closed()
        self.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.Error):
        return exc.reason
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__
