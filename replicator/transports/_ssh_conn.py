"""Connections to one SSH host, shared by replicas and origins on it: the pool of
logins (reused, reopened when dropped, a refused host key remembered), and the mapping of
SFTP status codes into replicator's error classes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio
import structlog

from .._errors import ErrorClass, FileError, ReplicaUnavailableError
from ._asyncssh import asyncssh
from ._ssh_options import GCM_FIRST, SshOptions, refusal, refuse

log = structlog.get_logger("replicator.transports.ssh")

_PERMISSION = {asyncssh.FX_PERMISSION_DENIED, asyncssh.FX_WRITE_PROTECT}
_NO_SPACE = {asyncssh.FX_NO_SPACE_ON_FILESYSTEM, asyncssh.FX_QUOTA_EXCEEDED}
_PERMANENT = {asyncssh.FX_NOT_A_DIRECTORY, asyncssh.FX_FILE_IS_A_DIRECTORY,
              asyncssh.FX_INVALID_FILENAME, asyncssh.FX_LINK_LOOP,
              asyncssh.FX_FILE_ALREADY_EXISTS, asyncssh.FX_DIR_NOT_EMPTY,
              asyncssh.FX_INVALID_PARAMETER, asyncssh.FX_OP_UNSUPPORTED}
_CONNECTION = {asyncssh.FX_CONNECTION_LOST, asyncssh.FX_NO_CONNECTION}
_NO_SPACE_TEXT = ("no space", "quota", "disk full")


def classify_sftp(exc: asyncssh.SFTPError) -> ErrorClass:
    """The error class of an SFTP status; v3 servers send most failures as FX_FAILURE."""
    reason = str(exc.reason).lower()
    if exc.code in _NO_SPACE or any(text in reason for text in _NO_SPACE_TEXT):
        return ErrorClass.NO_SPACE
    if exc.code in _PERMISSION or "permission denied" in reason:
        return ErrorClass.PERMISSION
    if exc.code in _PERMANENT:
        return ErrorClass.PERMANENT
    return ErrorClass.TRANSIENT



@contextmanager
def sftp_op(conn: _Conn, discard: Callable[[_Conn], None], label: str, seconds: float, *,
            unsupported_passes: bool = False) -> Iterator[None]:
    """One SFTP operation: time-bounded, its errors mapped to FileError named by ``label``.

    A session that may have a request outstanding (cancelled, timed out) or lost its
    connection is ``discard``-ed: the server answers in order, so a stalled peer must not
    be reused for the cleanup or the probe. With ``unsupported_passes``,
    ``SFTPOpUnsupported`` passes through: callers fall back, and say so.
    """
    try:
        with anyio.fail_after(seconds):
            yield
    except anyio.get_cancelled_exc_class():
        discard(conn)
        raise
    except TimeoutError:
        # A peer that does not answer in time is treated as gone: reconnect next time.
        discard(conn)
        raise FileError(f"{label}: no answer within {seconds} s") from None
    except asyncssh.SFTPError as exc:
        if unsupported_passes and isinstance(exc, asyncssh.SFTPOpUnsupported):
            raise
        if exc.code in _CONNECTION:
            discard(conn)
        raise FileError(f"{label}: {exc.reason}", classify_sftp(exc)) from None
    except (asyncssh.Error, OSError, EOFError) as exc:
        discard(conn)
        reason = exc.reason if isinstance(exc, asyncssh.Error) else str(exc)
        raise FileError(f"{label}: connection lost: {reason}") from None


# --- connections ---------------------------------------------------------------------------


class _Conn:
    """One SSH connection and its SFTP session, with what the server was found to offer."""

    def __init__(self, conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient) -> None:
        self.conn = conn
        self.sftp = sftp
        self.fsync = True
        self.posix_rename = True
        self.lsetstat = True
        self.statvfs = True

    @property
    def closed(self) -> bool:
        return self.conn.is_closed()

    def close(self) -> None:
        self.sftp.exit()
        self.conn.close()


class _Client(asyncssh.SSHClient):
    """Tells its pool when a login got past the host key check (``_Pool.verified``)."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._made = time.monotonic()

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self._made = time.monotonic()

    def begin_auth(self, username: str) -> None:
        # Called once the key exchange is done, so once the host key was accepted.
        self._pool.kex_seconds = time.monotonic() - self._made
        self._pool.verified.set()


class _Pool:
    """Up to ``connections`` SSH connections to one host, reused and reopened when dropped.

    A refused host key is remembered (``_ssh_options.refuse``) and not retried until the
    known_hosts file changes, so a daemon does not knock on a host it must not trust every
    few seconds.
    """

    def __init__(self, options: SshOptions, loop: asyncio.AbstractEventLoop) -> None:
        self.options = options
        self.loop = loop
        self.users = 0
        self._slots: list[_Conn | None] = [None] * options.connections
        self._locks = [anyio.Lock() for _ in range(options.connections)]
        self._next = 0
        # Set once a login of this pool got past the host key check: other clients (the
        # OpenSSH one) may knock from then on. With how long its key exchange took, from
        # the TCP connection: a few round trips.
        self.verified = anyio.Event()
        self.kex_seconds = 0.0
        self._log = log.bind(host=options.where)

    async def get(self, spread: bool = False) -> _Conn:
        """A live connection; with ``spread``, the next one round-robin (opened if needed),
        for transfers. Others take any live one: a second login (many round trips on a
        long link) is only worth it to move data in parallel."""
        if spread:
            index = self._next
            self._next = (index + 1) % len(self._slots)
        else:
            index = 0
            for i, live in enumerate(self._slots):
                if live is not None and not live.closed:
                    index = i
                    break
        conn = self._slots[index]
        if conn is not None and not conn.closed:
            return conn
        async with self._locks[index]:
            conn = self._slots[index]
            if conn is None or conn.closed:
                conn = await self._connect()
                self._slots[index] = conn
            return conn

    def discard(self, conn: _Conn) -> None:
        """Drop a connection that failed or timed out; the next ``get`` reopens it."""
        for i, slot in enumerate(self._slots):
            if slot is conn:
                self._slots[i] = None
        conn.close()
        self._unverified()

    def close(self) -> None:
        for conn in self._slots:
            if conn is not None:
                conn.close()
        self._slots = [None] * len(self._slots)
        self._unverified()

    def _unverified(self) -> None:
        """No live login vouches for the host key any more: the next one must (it may find
        known_hosts changed)."""
        if not any(c is not None and not c.closed for c in self._slots):
            self.verified = anyio.Event()

    async def _connect(self) -> _Conn:
        o = self.options
        refused = refusal(o)
        if refused is not None:
            raise ReplicaUnavailableError(refused)
        known_hosts: str | None = o.known_hosts_path
        if o.insecure:
            known_hosts = None
            self._log.warning("host key NOT verified (insecure_skip_host_key_check = true)")
        try:
            with anyio.fail_after(o.connect_timeout):
                conn = await asyncssh.connect(
                    o.host, port=o.port or (), username=o.user or (),
                    client_factory=lambda: _Client(self),
                    client_keys=[o.identity_file] if o.identity_file else (),
                    known_hosts=known_hosts, encryption_algs=GCM_FIRST,
                    keepalive_interval=o.keepalive_interval,
                    keepalive_count_max=o.keepalive_count_max,
                    connect_timeout=o.connect_timeout,
                )
                try:
                    sftp = await conn.start_sftp_client()
                except BaseException:
                    conn.close()
                    raise
        except asyncssh.HostKeyNotVerifiable as exc:
            raise ReplicaUnavailableError(
                refuse(o, f"host key not trusted ({exc.reason})")) from None
        except asyncssh.PermissionDenied as exc:
            raise ReplicaUnavailableError(
                f"ssh {o.where}: authentication failed ({exc.reason}); check identity_file"
                " and the server's authorized_keys") from None
        except TimeoutError:
            raise ReplicaUnavailableError(
                f"ssh {o.where}: no connection within {o.connect_timeout} s") from None
        except (asyncssh.Error, OSError) as exc:
            reason = exc.reason if isinstance(exc, asyncssh.Error) else (exc.strerror or exc)
            raise ReplicaUnavailableError(f"ssh {o.where}: unreachable: {reason}") from None
        self._log.debug("connected", sftp_version=sftp.version)
        return _Conn(conn, sftp)


_POOLS: dict[SshOptions, _Pool] = {}


def _acquire_pool(options: SshOptions) -> _Pool:
    loop = asyncio.get_running_loop()
    pool = _POOLS.get(options)
    if pool is None or pool.loop is not loop:
        pool = _POOLS[options] = _Pool(options, loop)
    pool.users += 1
    return pool


def _release_pool(pool: _Pool) -> None:
    pool.users -= 1
    if pool.users <= 0:
        pool.close()
        if _POOLS.get(pool.options) is pool:
            del _POOLS[pool.options]
