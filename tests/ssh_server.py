"""SSH servers for the tests, all on 127.0.0.1: an in-process asyncssh SFTP server (chrooted,
with fault injection) and a real OpenSSH ``sshd`` started from a temp folder.

Not a test module: test files import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from replicator.transports._ssh_options import SshOptions

SSHD = "/usr/sbin/sshd"


@dataclass
class Keys:
    """A client key, a server host key and a known_hosts file trusting it."""

    folder: Path
    client_key: Path
    client_pub: Path
    host_key: asyncssh.SSHKey
    host_key_path: Path
    known_hosts: Path

    def trust(self, port: int, host: str = "127.0.0.1") -> None:
        line = f"[{host}]:{port} {self.host_key.export_public_key().decode().strip()}\n"
        self.known_hosts.write_text(line)


def make_keys(folder: Path) -> Keys:
    folder.mkdir(parents=True, exist_ok=True)
    client = asyncssh.generate_private_key("ssh-ed25519")
    host = asyncssh.generate_private_key("ssh-ed25519")
    client_key, host_key_path = folder / "id_ed25519", folder / "ssh_host_ed25519_key"
    client.write_private_key(str(client_key))
    client.write_public_key(str(client_key) + ".pub")
    host.write_private_key(str(host_key_path))
    os.chmod(client_key, 0o600)
    os.chmod(host_key_path, 0o600)
    known_hosts = folder / "known_hosts"
    known_hosts.write_text("")
    return Keys(folder, client_key, Path(str(client_key) + ".pub"), host, host_key_path,
                known_hosts)


# --- in-process asyncssh server ------------------------------------------------------------


@dataclass
class Faults:
    """What the in-process server does wrong; tests flip ``enabled`` off to recover.

    drop_after: close the connection once this many bytes were written (once).
    stall: the first write never answers (the server stops reading the session).
    deny_open: file names containing this text cannot be created (permission denied).
    full_after: writes fail with "No space left on device" after this many bytes.
    write_delay: seconds every write takes (a slow server).
    drop_read_after: close the connection once this many bytes were read (once; pull mode).
    read_error: reads past 1 MiB of files whose path contains this text fail (I/O error).
    change_during_read: the first read past 1 MiB of a file whose path contains this text
        rewrites that file in place (same size, other bytes, mtime 100 s later; once).
    """

    enabled: bool = True
    drop_after: int | None = None
    stall: bool = False
    deny_open: bytes | None = None
    full_after: int | None = None
    write_delay: float = 0.0
    drop_read_after: int | None = None
    read_error: bytes | None = None
    change_during_read: bytes | None = None
    written: int = 0
    read: int = 0
    dropped: int = 0
    stalled: int = 0
    changed: int = 0
    read_errors: int = 0
    released: asyncio.Event = field(default_factory=asyncio.Event)


class FaultySFTPServer(asyncssh.SFTPServer):
    """The asyncssh SFTP server, chrooted, with the faults of ``faults``."""

    faults: Faults

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], chroot: bytes,
                 faults: Faults) -> None:
        super().__init__(chan, chroot=chroot)
        self.faults = faults
        self._exempt: set[int] = set()
        self._paths: dict[int, bytes] = {}  # open files: their path on disk

    def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        f = self.faults
        if f.enabled and f.deny_open is not None and f.deny_open in path:
            raise asyncssh.SFTPPermissionDenied("Permission denied")
        file_obj = super().open(path, pflags, attrs)
        self._paths[id(file_obj)] = self.map_path(path)
        if b".replicator-replica" in path:
            # The replica's identity marker is bookkeeping: faults target the data files.
            self._exempt.add(id(file_obj))
        return file_obj

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        f = self.faults
        if (f.enabled and f.drop_read_after is not None and not f.dropped
                and f.read + size > f.drop_read_after):
            f.dropped += 1
            self.connection.abort()
            raise asyncssh.SFTPConnectionLost("connection dropped by the test")
        path = self._paths.get(id(file_obj), b"")
        if f.enabled and f.read_error is not None and offset >= 1 << 20 and f.read_error in path:
            f.read_errors += 1
            raise asyncssh.SFTPFailure("Input/output error")
        if (f.enabled and f.change_during_read is not None and not f.changed
                and offset >= 1 << 20 and f.change_during_read in path):
            f.changed += 1
            fd = os.open(path, os.O_WRONLY)
            try:
                before = os.fstat(fd)
                os.pwrite(fd, os.urandom(before.st_size), 0)
                os.utime(fd, (before.st_mtime + 100, before.st_mtime + 100))
            finally:
                os.close(fd)
        result = super().read(file_obj, offset, size)
        assert isinstance(result, bytes)
        f.read += len(result)
        return result

    def close(self, file_obj: object) -> None:
        self._paths.pop(id(file_obj), None)
        super().close(file_obj)

    def readlink(self, path: bytes) -> bytes:
        # asyncssh's chroot passes every target through realpath (relative ones against the
        # server's working folder); return relative targets unchanged, as OpenSSH does.
        target = os.readlink(self.map_path(path))
        if target.startswith(b"/"):
            result = super().readlink(path)
            assert isinstance(result, bytes)
            return result
        return target

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        f = self.faults
        if f.enabled and id(file_obj) not in self._exempt:
            if f.write_delay:
                await asyncio.sleep(f.write_delay)
            if f.stall and not f.stalled:
                f.stalled += 1
                await f.released.wait()  # never, unless the test sets it
            if f.full_after is not None and f.written + len(data) > f.full_after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if f.drop_after is not None and not f.dropped and f.written + len(data) > f.drop_after:
                f.dropped += 1
                self.connection.abort()
                raise asyncssh.SFTPConnectionLost("connection dropped by the test")
        f.written += len(data)
        result = super().write(file_obj, offset, data)
        assert isinstance(result, int)
        return result


@dataclass
class SftpServer:
    """A running in-process server: ``root`` on disk is ``/`` over SFTP."""

    port: int
    root: Path
    keys: Keys
    faults: Faults
    connections: list[int]  # one entry per accepted connection
    user: str = "tester"
    host: str = "127.0.0.1"

    def url(self, path: str = "/replica") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user}@{host}:{self.port}{path}"

    def options(self, **kwargs: Any) -> SshOptions:
        values: dict[str, Any] = dict(
            host="127.0.0.1", port=self.port, user=self.user,
            identity_file=str(self.keys.client_key), known_hosts=str(self.keys.known_hosts),
            connect_timeout=5.0)
        values.update(kwargs)
        return SshOptions(**values)

    def replica_keys(self) -> dict[str, Any]:
        return {"identity_file": str(self.keys.client_key),
                "known_hosts": str(self.keys.known_hosts), "connect_timeout": 5.0}


class _CountingServer(asyncssh.SSHServer):
    def __init__(self, connections: list[int]) -> None:
        self._connections = connections

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._connections.append(1)


@asynccontextmanager
async def sftp_server(folder: Path, faults: Faults | None = None, *, trust: bool = True,
                      host: str = "127.0.0.1", commands: bool = False
                      ) -> AsyncIterator[SftpServer]:
    """Serve ``folder/root`` over SFTP on a free loopback port, for the test's event loop.

    With ``commands``, exec requests run too, as real shell commands in ``folder/root`` (the
    login's home; use ``~/`` paths), their stdin passing through the faults. Without, the
    server is SFTP-only, like a chrooted ``internal-sftp``.
    """
    keys = make_keys(folder / "keys")
    root = folder / "root"
    root.mkdir(parents=True, exist_ok=True)
    faults = faults or Faults()
    connections: list[int] = []
    chroot = os.fsencode(root)

    def factory(chan: asyncssh.SSHServerChannel[bytes]) -> asyncssh.SFTPServer:
        return FaultySFTPServer(chan, chroot, faults)

    def run(process: asyncssh.SSHServerProcess[bytes]) -> Awaitable[None]:
        return run_command(process, root, faults)

    acceptor = await asyncssh.listen(
        host, 0, server_host_keys=[keys.host_key],
        authorized_client_keys=str(keys.client_pub), sftp_factory=factory, allow_scp=False,
        server_factory=lambda: _CountingServer(connections),
        process_factory=run if commands else None, encoding=None)
    port = acceptor.get_port()
    if trust:
        keys.trust(port, host)
    try:
        yield SftpServer(port, root, keys, faults, connections, host=host)
    finally:
        faults.released.set()
        acceptor.close()
        await acceptor.wait_closed()


STALL_AFTER = 256 << 10  # bytes into a command before a stalling server stops reading


async def run_command(process: asyncssh.SSHServerProcess[bytes], home: Path, faults: Faults
                      ) -> None:
    """Run an exec request as a shell command in ``home``; its stdin passes the faults.

    A dropped connection ends the command's stdin (as sshd does when its peer goes away);
    a stall stops reading it until the test releases the server.
    """
    assert process.command is not None
    proc = await asyncio.create_subprocess_shell(
        process.command, cwd=home, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None
    f = faults

    async def pump_in() -> None:
        assert proc.stdin is not None
        try:
            while data := await process.stdin.read(1 << 16):
                if f.enabled:
                    if f.write_delay:
                        await asyncio.sleep(f.write_delay)
                    if f.stall and not f.stalled and f.written + len(data) > STALL_AFTER:
                        f.stalled += 1
                        # Until released, or until the client gives up and closes the channel
                        # (asyncssh has no event for a close that waits on unread data).
                        while not (f.released.is_set()  # noqa: ASYNC110
                                   or process.channel.is_closing()):
                            await asyncio.sleep(0.02)
                        if process.channel.is_closing():
                            break  # as sshd: the client went away, the command's input ends
                    if (f.drop_after is not None and not f.dropped
                            and f.written + len(data) > f.drop_after):
                        f.dropped += 1
                        process.channel.get_connection().abort()
                        break
                f.written += len(data)
                proc.stdin.write(data)
                await proc.stdin.drain()
        except (asyncssh.Error, OSError):
            pass
        finally:
            proc.stdin.close()

    async def pump_out(source: asyncio.StreamReader, sink: asyncssh.SSHWriter[bytes]) -> None:
        while data := await source.read(1 << 16):
            try:
                sink.write(data)
            except (asyncssh.Error, OSError):
                pass

    # Like sshd, the session ends when the command does, whether or not its input was read.
    feeding = asyncio.ensure_future(pump_in())
    try:
        await asyncio.gather(pump_out(proc.stdout, process.stdout),
                             pump_out(proc.stderr, process.stderr))
        status = await proc.wait()
    finally:
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    with contextlib.suppress(asyncssh.Error, OSError):
        process.exit(status)


# --- OpenSSH sshd --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Sshd:
    port: int
    keys: Keys
    user: str
    pid: int  # the listening sshd: sessions and their commands are its descendants

    def url(self, path: Path | str) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{path}"

    def options(self, **kwargs: Any) -> SshOptions:
        values: dict[str, Any] = dict(
            host="127.0.0.1", port=self.port, user=self.user,
            identity_file=str(self.keys.client_key), known_hosts=str(self.keys.known_hosts),
            connect_timeout=5.0)
        values.update(kwargs)
        return SshOptions(**values)

    def replica_keys(self) -> dict[str, Any]:
        return {"identity_file": str(self.keys.client_key),
                "known_hosts": str(self.keys.known_hosts), "connect_timeout": 5.0}


def require_sshd() -> None:
    """Skip without sshd; under CI (CI=true) a missing sshd fails instead."""
    if os.path.exists(SSHD) and shutil.which("ssh-keygen"):
        return
    reason = f"{SSHD} not installed (apt-get install openssh-server)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must run the OpenSSH interop tests")
    pytest.skip(reason)


@contextmanager
def run_sshd(folder: Path) -> Iterator[Sshd]:
    """Start ``sshd -D -e`` with its own config, host key and authorized key."""
    require_sshd()
    keys = make_keys(folder / "keys")
    authorized = folder / "authorized_keys"
    authorized.write_text(keys.client_pub.read_text())
    port = _free_port()
    config = folder / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {keys.host_key_path}",
        f"PidFile {folder / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "Subsystem sftp internal-sftp",
        "LogLevel ERROR",
        "",
    ]))
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation folder
    log = (folder / "sshd.log").open("wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(folder / 'sshd.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("sshd did not start listening") from None
                time.sleep(0.02)
        keys.trust(port)
        yield Sshd(port, keys, getpass.getuser(), proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
