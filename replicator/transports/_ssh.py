"""Replicas on SSH hosts (asyncssh): a stream of files to a receiver, or SFTP.

Where the host runs ``python3``, batches stream through one SSH session (the OpenSSH client
or an asyncssh channel: ``_ssh_carriers``) to a small receiver (``_ssh_stream``,
``_receiver``): no round trip per file. Elsewhere (chrooted ``internal-sftp`` servers, no
python3) every file goes over SFTP, the portable path. The replica's check (its root, its
marker) goes through a receiver session where one starts, so a run that streams through the
OpenSSH client needs no SFTP login. Logins are pooled (``_ssh_conn``).
Local reads happen in worker threads (``_ssh_files``): small files of a batch are read
together in one thread call, large ones chunk by chunk while the previous chunk is on the
wire. Over SFTP, each file is written to a temp name in its
destination folder, given its mode and mtime, fsynced (``fsync@openssh.com``), checked
against the source, renamed (``posix-rename@openssh.com``) and verified with a stat. Files of
an ssh:// origin (pull mode, ``PutRequest.remote``) are read through the origin's ``Source``
while they are written, and checked unchanged there (open file and path, at the origin's
precision) before the rename; an origin that cannot be reached releases the rest of the batch.

SFTP v3 carries whole-second mtimes: the transport declares that precision and verifies at
it, while the engine records the source's exact version, so nothing is copied again forever.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._config import ReplicaConfig
from .._errors import ErrorClass, FileError, OriginUnavailableError, ReplicaUnavailableError
from .._inventory import Kind
from .._lazy import LazyModule
from .._together import together
from ._base import MARKER, Progress, PutRequest, PutResult, PutStatus
from ._errors import file_error
from ._local_batch import TEMP_RE, temp_name
from ._logins import take_spare_session
from ._paths import confine, copy_mode
from ._ssh_carriers import (
    AsyncsshCarrier,
    Carrier,
    OpensshCarrier,
    StreamLost,
)
from ._ssh_files import (
    SMALL_FILE,
    _check_unchanged,
    _groups,
    _load,
    _load_frames,
    _read,
    _Source,
)
from ._ssh_options import (
    CLEANUP_TIMEOUT,
    NO_SSH_CLIENT,
    WHOLE_SECOND,
    SshOptions,
    openssh_client_refusal,
    options_for,
    receiver_command,
    refusal,
    session_argv,
)
from ._ssh_options import show as _show
from ._ssh_stream import (
    ABORT,
    COMMIT,
    DATA_CHUNK,
    StreamSession,
    data_header,
    file_frame,
    result_error,
)
from ._stats import Capabilities, DestStat

if TYPE_CHECKING:
    import asyncssh

    from ._ssh_conn import _Conn, _Pool
else:
    # asyncssh (a tenth of a second of CPU to import) and the SFTP pool only where they are
    # used: a run whose stream goes through the OpenSSH client uses neither.
    asyncssh = LazyModule("replicator.transports._asyncssh")

log = structlog.get_logger("replicator.transports.ssh")

# One SFTP write call; asyncssh splits it into the server's max write length and sends the
# pieces in parallel.
CHUNK = 1 << 20
# Files of one batch on the wire at once: per-file round trips dominate small files.
FILES_IN_FLIGHT = 8
# A round trip to the receiver longer than this is a long link (a LAN answers in a few ms).
LONG_LINK = 0.03
# Receiver sessions at once on a short link. Each is a login (its key exchange alone about
# 0.13 s of the client's CPU, with OpenSSH 9's default), a shell and an interpreter on the
# host, and there the CPU, not the link, is what sessions share. The receiver reads the next
# batch while the disk flushes the one before, so one session streams without a pause:
# 20,000 small files took 2.06 s with one and 2.22 s with two (machine CPU 3.34 against
# 3.90 s), 12 rounds alternated (stop 19). A batch with large files may start a second:
# their bytes then go through two ssh processes at once (200 files of 5 MiB: 3.0 s with
# two, 3.5 s with one, two series of five runs).
SHORT_LINK_SESSIONS = 1
SHORT_LINK_BULK_SESSIONS = 2
# Receiver sessions starting at once, whatever the number of workers (see SshTransport).
SESSION_STARTS = 4
# OpenSSH logins dropped in a row (while the SFTP connection works) before the OpenSSH
# client is given up for the process.
OPENSSH_DROPS = 3
# Write requests of one file on the wire at once, bounded in count and bytes.
MAX_REQUESTS = 16
BYTES_IN_FLIGHT = 4 << 20
SAFE_WRITE = 16 << 10  # without the server's limits@openssh.com

# A key exchange (from the TCP connection to the start of authentication) longer than
# this says the link is long: it is three or four round trips, and on a LAN 10-20 ms of CPU.
KEX_LONG = 4 * LONG_LINK


async def _first_of(*events: anyio.Event) -> None:
    """Wait until one of ``events`` is set."""
    async with anyio.create_task_group() as tg:
        async def wait(event: anyio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)


class _Inspection:
    """A receiver's look at the root on its way (``SshTransport._inspect``)."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.ran = False  # False when it was cancelled: a waiter looks itself
        self.answer: list[Any] | None = None
        self.error: Exception | None = None


# --- the transport -------------------------------------------------------------------------


class SshTransport:
    """A replica root on an SSH host, reached through a receiver session, else over SFTP.

    Cancelling ``put`` abandons the batch: temp files are removed (shielded, time-bounded;
    a later run removes what a dead server kept) and no partial file gets a final name.
    """

    def __init__(self, options: SshOptions, root: str, limiter: anyio.CapacityLimiter,
                 op_timeout: float = 60.0, carriers: Sequence[str] = ("openssh", "asyncssh"),
                 lanes: int = 1) -> None:
        """``lanes``: batches sent at once (the replica's workers); on a long link
        ``prepare`` starts a receiver session for each."""
        self.options = options
        # How the stream of files reaches the receiver, in order of preference; a carrier
        # that cannot start the receiver is dropped, and with none left files go over SFTP.
        # The OpenSSH client only where it reads what asyncssh reads (openssh_client_refusal).
        why_not = openssh_client_refusal() if "openssh" in carriers else None
        self._carriers = [c for c in carriers if c != "openssh" or why_not is None]
        if list(carriers) == ["openssh"] and not self._carriers:
            log.warning(f"transfer = \"openssh\" but {why_not}: using SFTP",
                        host=options.where)
        elif why_not is not None and why_not != NO_SSH_CLIENT:
            # An ssh client is there but not used: say why, as streams through asyncssh are
            # slower for large files.
            log.info(f"not using the ssh client: {why_not}", host=options.where)
        self._sessions: list[StreamSession] = []  # idle ones
        self._opened: set[StreamSession] = set()  # every one started and not dropped
        self._lanes = lanes
        self._spares_starting = 0  # sessions prepare starts for batches yet to come
        self._spare_waiters = 0  # batches waiting for one of those
        self._live = 0  # sessions started (or starting) and not closed
        # Known once prepare timed an SFTP round trip, or a session timed its own.
        self._short_link: bool | None = None
        self._session_back = anyio.Event()  # set when a session is returned or closed
        # Logins at once: sshd drops unauthenticated connections beyond its MaxStartups
        # (10 by default), and a dropped start would cost the OpenSSH carrier.
        self._starting = anyio.Semaphore(SESSION_STARTS)
        self._openssh_dropped = 0  # OpenSSH logins dropped in a row
        self._inspecting: _Inspection | None = None  # a receiver's look at the root
        self._streamed = False  # whether batches went (or tried to go) through sessions
        self.root = os.fsencode(root)
        self._limiter = limiter
        self._op_timeout = op_timeout
        self._pool: _Pool | None = None
        self._caps = Capabilities(mtime_precision_ns=WHOLE_SECOND)
        self._warned: set[str] = set()
        self._log = log.bind(host=options.where, root=root)

    @classmethod
    def from_config(cls, replica: ReplicaConfig, limiter: anyio.CapacityLimiter
                    ) -> SshTransport:
        carriers = {"auto": ("openssh", "asyncssh"), "sftp": ()}.get(
            replica.transfer, (replica.transfer,))
        return cls(options_for(replica), replica.remote_path, limiter, replica.op_timeout,
                   carriers, lanes=replica.workers)

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def transfer(self) -> str:
        """How files go now: "openssh" or "asyncssh" (a stream to the receiver), or "sftp"."""
        return self._carriers[0] if self._carriers else "sftp"

    # -- plumbing --

    def _path(self, rel: bytes) -> bytes:
        if not rel:
            return self.root
        return self.root.rstrip(b"/") + b"/" + rel if self.root != b"/" else b"/" + rel

    def _the_pool(self) -> _Pool:
        if self._pool is None:
            from ._ssh_conn import _acquire_pool

            self._pool = _acquire_pool(self.options)
        return self._pool

    async def _conn(self, spread: bool = False) -> _Conn:
        return await self._the_pool().get(spread)

    def _discard(self, conn: _Conn) -> None:
        if self._pool is not None:
            self._pool.discard(conn)

    def _io(self, conn: _Conn, what: str, path: bytes,
            timeout: float | None = None) -> AbstractContextManager[None]:
        """One SFTP operation (see ``sftp_op``); ``SFTPOpUnsupported`` passes through."""
        seconds = self._op_timeout if timeout is None else timeout
        from ._ssh_conn import sftp_op

        return sftp_op(conn, self._discard, f"{what} {_show(path)}", seconds,
                       unsupported_passes=True)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self._log.warning(message)

    async def _lstat_or_none(self, conn: _Conn, rel: bytes) -> asyncssh.SFTPAttrs | None:
        path = self._path(rel)
        with self._io(conn, "stat", path):
            try:
                return await conn.sftp.lstat(path)
            except asyncssh.SFTPNoSuchFile:
                return None

    async def _folders(self, conn: _Conn, reldir: bytes, create: bool,
                       seen: set[bytes] | None = None) -> bool:
        """Check (and create) each folder of ``reldir`` below the root, refusing symlinks.

        Returns False if a folder is missing and ``create`` is false.
        """
        prefix = b""
        for part in reldir.split(b"/") if reldir else ():
            prefix = prefix + b"/" + part if prefix else part
            if seen is not None and prefix in seen:
                continue
            attrs = await self._lstat_or_none(conn, prefix)
            if attrs is None:
                if not create:
                    return False
                path = self._path(prefix)
                try:
                    with self._io(conn, "mkdir", path):
                        await conn.sftp.mkdir(path, asyncssh.SFTPAttrs(permissions=0o755))
                except FileError:
                    # Lost a race with another task creating it? Then it is there now.
                    attrs = await self._lstat_or_none(conn, prefix)
                    if attrs is None:
                        raise
                else:
                    attrs = await self._lstat_or_none(conn, prefix)
                    if attrs is None:
                        raise FileError(f"mkdir {_show(path)}: folder vanished")
            mode = attrs.permissions or 0
            if stat.S_ISLNK(mode):
                raise FileError(f"destination path blocked: {_show(prefix)} is a symlink;"
                                " symlinked folders inside the replica are not followed",
                                ErrorClass.PERMANENT)
            if not stat.S_ISDIR(mode):
                raise FileError(f"destination path blocked: {_show(prefix)} is not a folder",
                                ErrorClass.PERMANENT)
            if seen is not None:
                seen.add(prefix)
        return True

    # -- the protocol --

    async def prepare(self) -> None:
        """Start receiver sessions ahead of the first batch, while the engine probes and
        checks the marker: one on a short link, one per lane on a long one, where each
        login is many round trips and each session's channel window caps its own rate.

        Through the OpenSSH client, see ``_prepare_openssh``. Through asyncssh, they start
        as soon as the SFTP login has passed the host key check, while it authenticates
        and starts SFTP: a host that must not be trusted is refused (and remembered) by
        that login before any other session is used.
        """
        if self._carriers[:1] == ["openssh"]:
            await self._prepare_openssh()
            return
        if not self._carriers or self._sessions or self._live:
            return
        pool = self._the_pool()
        logged_in: list[_Conn] = []
        login_over = anyio.Event()

        async def login() -> None:
            with suppress(FileError, ReplicaUnavailableError):
                logged_in.append(await self._conn())
            login_over.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(login)
            await _first_of(pool.verified, login_over)
            if not pool.verified.is_set():
                return  # refused, unreachable: the engine's probe says why
            # A key exchange is a few round trips: a long one says the link is long.
            started = self._lanes if pool.kex_seconds > KEX_LONG else 1
            self._start_spares(tg, started)
            await login_over.wait()
            if not logged_in:
                return
            if self._short_link is None:
                began = time.monotonic()
                with suppress(FileError), self._io(logged_in[0], "stat", self.root):
                    await logged_in[0].sftp.stat(self.root)
                    self._short_link = time.monotonic() - began <= LONG_LINK
            if self._short_link is False and started < self._lanes:
                self._start_spares(tg, self._lanes - started)

    async def _prepare_openssh(self) -> None:
        """``prepare`` where the OpenSSH client carries the stream: no SFTP login, whose
        only use here would be to vouch for the host key (OpenSSH checks it by the same
        rules, see ``openssh_argv``) and to time the link. Called once there is work: the
        sessions a short link takes start now, beside the one the replica's check may be
        starting (a login is a few tenths of a second of CPU on a busy host), and the first
        one up times the link; on a long link, one per lane."""
        wanted = min(self._lanes, SHORT_LINK_SESSIONS)
        if self._live < wanted:
            async with anyio.create_task_group() as tg:
                self._start_spares(tg, wanted - self._live)
        while self._short_link is None and self._live:
            await self._session_back.wait()
        if self._short_link is False and self._live < self._lanes:
            async with anyio.create_task_group() as tg:
                self._start_spares(tg, self._lanes - self._live)

    def _start_spares(self, tg: TaskGroup, count: int) -> None:
        self._spares_starting += count  # counted now: a batch may come before they start
        for _ in range(count):
            tg.start_soon(self._spare_session)

    async def _spare_session(self) -> None:
        """Start a session for a batch yet to come (counted in ``_spares_starting``)."""
        session = None
        try:
            with suppress(FileError, ReplicaUnavailableError):
                session = await self._new_session()
        finally:
            self._spares_starting -= 1
            if session is not None:
                self._keep(session)
            else:  # a batch waiting for this one starts its own
                self._wake_waiters()

    # -- the replica's check: through the receiver, else SFTP --

    async def _inspect(self) -> list[Any] | None:
        """The receiver's look at the root (``StreamSession.inspect``), or None where no
        receiver starts (SFTP answers then). The engine probes the root and reads its
        marker together: the second of the two waits for the first one's look.

        The session stays for the first batch. A run that streams needs no other login:
        no SFTP connection (its login, a second shell and an sftp-server on the host), a
        few tenths of a second of CPU on both ends before the first file.
        """
        shared = self._inspecting
        if shared is not None:
            await shared.done.wait()
            if shared.ran:
                if shared.error is not None:
                    raise shared.error
                return shared.answer
        shared = self._inspecting = _Inspection()
        try:
            shared.answer = await self._inspect_once()
            shared.ran = True
        except Exception as exc:
            shared.error, shared.ran = exc, True
            raise
        finally:
            if self._inspecting is shared:
                self._inspecting = None
            shared.done.set()
        return shared.answer

    async def _inspect_once(self) -> list[Any] | None:
        session = await self._check_session("")
        if session is None:
            return None
        # A session idle for long may have died without a word: half the check's time for
        # its answer, the rest for SFTP.
        asked, answer = await self._ask(session, lambda s: s.inspect(MARKER),
                                        self._op_timeout / 2)
        return answer if asked else None

    async def _check_session(self, failure: str) -> StreamSession | None:
        """A session for the replica's check: an idle one, else a new one unless batches
        have streamed (they hold the sessions, one may take minutes: a check after a failed
        file, or after the replica came back, never waits for a lane). None: SFTP answers.
        A host that cannot be reached or refuses us: ReplicaUnavailableError, ``failure``
        before the reason."""
        if not self._carriers:
            return None
        session = self._idle_session(quiet=True)
        if session is None and not self._streamed:
            try:
                session = await self._session()
            except FileError as exc:
                raise ReplicaUnavailableError(f"{failure}{exc}") from None
        return session

    async def _ask(self, session: StreamSession, call: Callable[[StreamSession], Any],
                   seconds: float | None) -> tuple[bool, Any]:
        """``call(session)``'s answer, within ``seconds``: (True, answer), the session kept
        for the next batch; (False, None) when the stream was lost, the session dropped."""
        try:
            with anyio.fail_after(seconds):
                answer = await call(session)
        except (StreamLost, TimeoutError):
            self._drop(session)
            return False, None
        except BaseException:
            self._drop(session)
            raise
        self._keep(session)
        return True, answer

    async def probe(self) -> None:
        """The root is a folder we can create files in."""
        answer = await self._inspect()
        if answer is None:
            return await self._probe_sftp()
        where = f"{self.options.where}:{os.fsdecode(self.root)}"
        root, created, _marker = answer
        if root is not None:
            code, reason = root
            if code == errno.ENOENT:
                raise ReplicaUnavailableError(f"replica root {where} does not exist")
            if code == errno.ENOTDIR:
                raise ReplicaUnavailableError(f"replica root {where} is not a folder")
            raise ReplicaUnavailableError(f"replica root {where} is not usable: {reason}")
        if created is not None:
            raise ReplicaUnavailableError(
                f"replica root {where} is not usable: cannot create a file there:"
                f" {created[1]}")
        return None

    async def read_marker(self) -> str | None:
        answer = await self._inspect()
        if answer is None:
            return await self._read_marker_sftp()
        marker = answer[2]
        if isinstance(marker, list):
            raise ReplicaUnavailableError(f"replica marker: {marker[1]}")
        return None if marker is None else str(marker).strip()

    async def write_marker(self, text: str) -> None:
        failure = "cannot write the replica marker: "
        session = await self._check_session(failure)
        if session is not None:
            asked, error = await self._ask(
                session, lambda s: s.write_whole(MARKER, text.encode() + b"\n"), None)
            if asked:
                if error is not None:
                    raise ReplicaUnavailableError(f"{failure}{error[1]}")
                return None
        return await self._write_marker_sftp(text)

    async def _probe_sftp(self) -> None:
        """The root is a folder we can create files in. The stat and the create go
        together (one round trip for two), then the close and the remove."""
        where = f"{self.options.where}:{os.fsdecode(self.root)}"
        conn = await self._conn()
        name = self._path(b".~rep-probe-" + os.urandom(4).hex().encode())

        async def stat_root() -> asyncssh.SFTPAttrs | None:
            with self._io(conn, "stat", self.root):
                try:
                    return await conn.sftp.stat(self.root)
                except asyncssh.SFTPNoSuchFile:
                    return None

        async def create() -> asyncssh.SFTPClientFile:
            with self._io(conn, "create", name):
                return await conn.sftp.open(name, asyncssh.FXF_WRITE | asyncssh.FXF_CREAT
                                            | asyncssh.FXF_EXCL,
                                            asyncssh.SFTPAttrs(permissions=0o600),
                                            encoding=None)

        # Independent, so sent together; requests on one file (close, then remove) are not:
        # some servers (asyncssh's) handle a connection's requests concurrently.
        attrs, created = await together(stat_root, create, catch=(FileError,))
        cleanup: FileError | None = None
        if isinstance(created, asyncssh.SFTPClientFile):
            # Closed before it is removed: not every server removes an open file.
            try:
                with self._io(conn, "close", name):
                    await created.close()
                with self._io(conn, "remove", name):
                    await conn.sftp.remove(name)
            except FileError as exc:
                cleanup = exc
        if attrs is None:
            raise ReplicaUnavailableError(f"replica root {where} does not exist")
        if isinstance(attrs, asyncssh.SFTPAttrs) and not stat.S_ISDIR(attrs.permissions or 0):
            raise ReplicaUnavailableError(f"replica root {where} is not a folder")
        for outcome in (attrs, created, cleanup):
            if isinstance(outcome, FileError):
                raise ReplicaUnavailableError(
                    f"replica root {where} is not usable: {outcome}") from None

    async def _read_marker_sftp(self) -> str | None:
        conn = await self._conn()
        path = self._path(MARKER)
        try:
            with self._io(conn, "read marker", path):
                try:
                    f = await conn.sftp.open(path, "rb", encoding=None)
                except asyncssh.SFTPNoSuchFile:
                    return None
                try:
                    data = await f.read(4096)
                finally:
                    await f.close()
        except FileError as exc:
            raise ReplicaUnavailableError(f"replica marker: {exc}") from None
        text = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
        return text.strip()

    async def _write_marker_sftp(self, text: str) -> None:
        conn = await self._conn()
        path, tmp = self._path(MARKER), self._path(MARKER + b".tmp")
        created = False
        try:
            with self._io(conn, "write marker", tmp):
                f = await conn.sftp.open(tmp, "wb", encoding=None)
                created = True
                try:
                    await f.write(text.encode() + b"\n")
                    if conn.fsync:
                        try:
                            await f.fsync()
                        except asyncssh.SFTPOpUnsupported:
                            conn.fsync = False
                finally:
                    await f.close()
            with self._io(conn, "rename marker", path):
                try:
                    await conn.sftp.posix_rename(tmp, path)
                except asyncssh.SFTPOpUnsupported:
                    # Written once, where no marker exists: a plain rename does.
                    conn.posix_rename = False
                    await conn.sftp.rename(tmp, path)
        except FileError as exc:
            if created:  # not left behind (a marker path that is a folder, say)
                with (anyio.CancelScope(shield=True), suppress(FileError),
                      self._io(conn, "remove temp", tmp, CLEANUP_TIMEOUT)):
                    await conn.sftp.remove(tmp)
            raise ReplicaUnavailableError(f"cannot write the replica marker: {exc}") from None

    async def stat(self, dest: bytes) -> DestStat | None:
        rel = confine(dest)
        conn = await self._connected()
        if not await self._folders(conn, posixpath.dirname(rel), create=False):
            return None
        attrs = await self._lstat_or_none(conn, rel)
        if attrs is None:
            return None
        mode = attrs.permissions or 0
        mtime_ns = (attrs.mtime or 0) * WHOLE_SECOND + (attrs.mtime_ns or 0)
        return DestStat(attrs.size or 0, mtime_ns, stat.S_IMODE(mode), stat.S_ISDIR(mode),
                        stat.S_ISLNK(mode))

    async def listdir(self, dest: bytes) -> list[bytes]:
        rel = confine(dest)
        conn = await self._connected()
        if not await self._folders(conn, rel, create=False):
            raise FileError(f"list {_show(dest)}: no such folder")
        path = self._path(rel)
        with self._io(conn, "list", path):
            names = await conn.sftp.listdir(path)
        return [n for n in names if n not in (b".", b"..")]

    async def remove(self, dest: bytes) -> None:
        rel = confine(dest)
        conn = await self._connected()
        if not await self._folders(conn, posixpath.dirname(rel), create=False):
            return
        path = self._path(rel)
        with self._io(conn, "remove", path), suppress(asyncssh.SFTPNoSuchFile):
            await conn.sftp.remove(path)

    async def remove_stale_temps(self, dirs: Iterable[bytes], run_id: str) -> int:
        removed = 0
        conn = await self._connected()
        for dest in sorted(set(dirs)):
            try:
                rel = confine(dest)
                if not await self._folders(conn, rel, create=False):
                    continue
                path = self._path(rel)
                with self._io(conn, "list", path):
                    names = await conn.sftp.listdir(path)
            except FileError:
                continue
            for name in names:
                match = TEMP_RE.match(name)
                if match and match.group(1).decode() != run_id:
                    temp = self._path(rel + b"/" + name if rel else name)
                    with self._io(conn, "remove", temp), suppress(asyncssh.SFTPNoSuchFile):
                        await conn.sftp.remove(temp)
                        removed += 1
        return removed

    async def _connected(self, spread: bool = False) -> _Conn:
        try:
            return await self._conn(spread)
        except ReplicaUnavailableError as exc:
            raise FileError(str(exc)) from None

    async def aclose(self) -> None:
        sessions, self._sessions = self._sessions, []
        self._live -= len(sessions)
        # Together: each waits for its receiver to exit, a round trip on a long link.
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for session in sessions:
                    tg.start_soon(session.quit)
        # Any other session is abandoned (a batch cancelled before its lane took it): no
        # ssh process outlives the transport.
        for session in self._opened - set(sessions):
            session.close()
        self._opened.clear()
        if self._pool is not None:
            from ._ssh_conn import _release_pool

            _release_pool(self._pool)
            self._pool = None

    # -- put --

    async def put(
        self, requests: Sequence[PutRequest], run_id: str, progress: Progress
    ) -> list[PutResult]:
        if self._carriers and all(r.remote is None for r in requests):
            self._streamed = True
            streamed = await self._put_stream(requests, run_id, progress)
            if streamed is not None:
                return streamed
        sources = [_Source(i, r) for i, r in enumerate(requests)]
        results: list[PutResult | None] = [None] * len(requests)
        seen: set[bytes] = set()
        lost: list[str] = []  # pull mode: why the origin cannot be reached
        try:
            send, receive = anyio.create_memory_object_stream[_Source](FILES_IN_FLIGHT)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._feed, sources, send)
                async with receive:
                    for _ in range(min(FILES_IN_FLIGHT, len(sources))):
                        tg.start_soon(self._upload_all, receive.clone(), run_id, progress,
                                      seen, lost, results)
        finally:
            for src in sources:
                src.close()
        done = [r for r in results if r is not None]
        assert len(done) == len(requests)
        # Handed over only once every file is durable and verified (see LocalTransport).
        if not progress.cancelled:
            progress.results.extend(done)
        return done

    # -- the stream data path --

    def _keep(self, session: StreamSession) -> None:
        """An idle session, for the next batch."""
        self._sessions.append(session)
        self._wake_waiters()

    def _drop(self, session: StreamSession) -> None:
        session.close()
        self._opened.discard(session)
        self._live -= 1
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        """Batches waiting in ``_session`` look again."""
        self._session_back.set()
        self._session_back = anyio.Event()

    def _idle_session(self, quiet: bool = False) -> StreamSession | None:
        """A kept session: the one with the fewest reports still to come (it sends at once),
        the last kept of those. ``quiet``: only one with none (a question's answer must be
        the next line it reads)."""
        while self._sessions:
            session = min(reversed(self._sessions), key=lambda s: s.pending)
            if quiet and session.pending:
                return None
            self._sessions.remove(session)
            if not session.broken:
                return session
            self._drop(session)
        return None

    async def _session(self, progress: Progress | None = None,
                       bulky: bool = False) -> StreamSession | None:
        """An idle receiver session, or a new one; None if no carrier can start one.

        On a short link, or while the link is not yet known, no more than
        ``SHORT_LINK_SESSIONS`` run (``SHORT_LINK_BULK_SESSIONS`` for a ``bulky`` batch,
        one with large files), and a spare session that prepare is starting is waited
        for rather than started twice: a batch waits (and the wait is not a stall: the
        batch ahead reports progress of its own).
        """
        most = SHORT_LINK_BULK_SESSIONS if bulky else SHORT_LINK_SESSIONS
        while True:
            idle = self._idle_session()
            if idle is not None:
                return idle
            # A spare session on its way (see prepare) that no other batch waits for yet
            # is this batch's: starting one more would only compete with it.
            spare = self._spares_starting > self._spare_waiters
            if not spare and (self._short_link is False or self._live < most):
                break
            if progress is not None:
                progress.begin_flush()
            self._spare_waiters += spare
            try:
                await self._session_back.wait()
            finally:
                self._spare_waiters -= spare
                if progress is not None:
                    progress.end_flush()
        return await self._new_session()

    async def _new_session(self) -> StreamSession | None:
        """Start a receiver session; None if no carrier can start one."""
        self._live += 1
        began = time.monotonic()
        try:
            async with self._starting:
                started = await self._start_session()
        except BaseException:
            self._live -= 1
            self._wake_waiters()  # one of them may start a session, or learn there is none
            raise
        if started is None:
            self._live -= 1
            self._wake_waiters()
            return None
        if self._short_link is None:
            self._short_link = started.rtt <= LONG_LINK
            # On a long link, batches waiting for a session may start their own; prepare
            # waits for the verdict.
            self._wake_waiters()
        self._opened.add(started)
        self._log.debug("receiver session started", live=self._live,
                        seconds=round(time.monotonic() - began, 3), rtt=round(started.rtt, 4))
        return started

    async def _start_session(self) -> StreamSession | None:
        for kind in list(self._carriers):
            if kind not in self._carriers:
                continue  # given up meanwhile by a concurrent batch
            conn: _Conn | None = None
            try:
                if kind == "openssh":
                    # No knock on a host whose key was refused (or that has no known_hosts
                    # to check it with): the SFTP login that found out says why.
                    refused = refusal(self.options)
                    if refused is not None:
                        raise FileError(refused)
                    if self.options.insecure:  # a connection of its own: warned as any other
                        self._log.warning("host key NOT verified"
                                          " (insecure_skip_host_key_check = true)")
                    # In a thread: the first call asks the local ssh for its version.
                    argv = await anyio.to_thread.run_sync(session_argv, self.options,
                                                          self.root)
                    # Started by the command line before the engine was imported: the same
                    # command, its login well under way (see _spares).
                    spare = take_spare_session(argv)
                    if spare is not None:
                        self._log.debug("receiver session from a spare", pid=spare.pid)
                    carrier: Carrier = (OpensshCarrier(spare, self._op_timeout) if spare
                                        else await OpensshCarrier.open(argv, self._op_timeout))
                else:
                    conn = await self._connected()
                    carrier = await AsyncsshCarrier.open(conn.conn, receiver_command(self.root),
                                                         self._op_timeout)
                session = await StreamSession.start(carrier)
                if kind == "openssh":
                    self._openssh_dropped = 0
                return session
            except StreamLost as exc:
                if conn is None:
                    # The OpenSSH client failed: if the host cannot be reached or refuses
                    # us (host key, login), this raises as it would for SFTP; if it can,
                    # the failure is the client's own (its ciphers, its view of the keys)...
                    conn = await self._connected()
                    if not exc.definitive and self._openssh_dropped < OPENSSH_DROPS:
                        # ...unless its login was dropped (sshd's MaxStartups, a blip): this
                        # session starts another way, the next one tries OpenSSH again.
                        self._openssh_dropped += 1
                        self._log.warning("the receiver did not start through openssh this"
                                          " time: its login was dropped", reason=str(exc))
                        continue
                elif not exc.definitive or conn.closed:  # a dropped connection: try again
                    raise FileError(f"stream to {self.options.where}: {exc}") from None
                if kind in self._carriers:
                    self._carriers.remove(kind)
                    then = (f"{self._carriers[0]}" if self._carriers
                            else "SFTP, one round trip per file")
                    self._log.warning(f"the receiver did not start through {kind}: using"
                                      f" {then}", reason=str(exc))
        return None

    async def _put_stream(self, requests: Sequence[PutRequest], run_id: str,
                          progress: Progress) -> list[PutResult] | None:
        """One batch through the receiver: small files framed many per thread call and
        written while the next group is read; then one sync, which renames and reports.
        None if no receiver session starts (the batch then goes over SFTP).

        The first group is framed while the batch waits for a session (the one before it
        is sending): it goes out as soon as the batch has one, and the receiver does not
        wait for its reading between batches.

        Over a long link a batch of several large files is spread over two sessions: one
        SSH channel moves at most its window (2 MiB with OpenSSH) per round trip. Not on a
        short one, where the processes of a second session only compete for the CPU.
        """
        sources = [_Source(i, r) for i, r in enumerate(requests)]
        results: list[PutResult | None] = [None] * len(requests)
        failed: FileError | None = None
        sending = anyio.Event()
        try:
            send, receive = anyio.create_memory_object_stream[tuple[list[_Source], bytes]](2)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._frame_groups, sources, run_id, send, sending)
                async with receive:
                    try:
                        session = await self._session(
                            progress, bulky=any(r.size > SMALL_FILE for r in requests))
                    except FileError as exc:
                        session, failed = None, exc
                    if session is None:
                        tg.cancel_scope.cancel()  # nothing is sent: the framing stops
                        return (None if failed is None else
                                [PutResult(r, PutStatus.ERROR, error=failed) for r in requests])
                    sending.set()
                    tg.start_soon(self._stream_lane, session, receive.clone(), run_id,
                                  progress, results)
                    if (session.rtt > LONG_LINK
                            and sum(1 for r in requests if r.size > SMALL_FILE) >= 2):
                        tg.start_soon(self._second_lane, receive.clone(), run_id, progress,
                                      results)
        finally:
            for src in sources:
                src.close()
        done = [r or PutResult(s.request, PutStatus.ERROR, error=FileError(
                    f"the receiver on {self.options.where} did not report"
                    f" {_show(s.request.dest)}")) for s, r in zip(sources, results, strict=True)]
        if not progress.cancelled:
            progress.results.extend(done)
        return done

    async def _second_lane(self,
                           receive: MemoryObjectReceiveStream[tuple[list[_Source], bytes]],
                           run_id: str, progress: Progress, results: list[PutResult | None]
                           ) -> None:
        """A second session for the same batch (started while the first one sends)."""
        async with receive:
            try:
                session = await self._session()
            except FileError:
                return  # the first lane carries the batch alone
            if session is not None:
                await self._stream_lane(session, receive.clone(), run_id, progress, results)

    async def _stream_lane(self, session: StreamSession,
                           receive: MemoryObjectReceiveStream[tuple[list[_Source], bytes]],
                           run_id: str, progress: Progress, results: list[PutResult | None]
                           ) -> None:
        """Send groups of files through one session, then sync it and take its report."""
        sent: list[_Source] = []
        reusable = False
        try:
            async with receive:
                async for group, frames in receive:
                    sent += group
                    if frames:
                        await session.send(frames)
                    for src in group:
                        if src.result is not None:
                            results[src.index] = src.result
                        elif src.fd >= 0:
                            results[src.index] = await self._stream_large(
                                session, src, run_id, progress)
                    progress.add(len(frames), files=len(group))
            synced = time.monotonic()
            ticket = await session.request_sync()
            # The next batch may send its files while this one's flush and report come: the
            # receiver reads them once it reported this one, and no time is lost between.
            reusable = True
            self._keep(session)
            reply = await session.report(ticket, progress)
            self._log.debug("batch lane done", files=len(sent),
                            sync_seconds=round(time.monotonic() - synced, 3))
        except StreamLost as exc:
            # This lane's files are in an unknown state (complete in place, or absent);
            # the batch's other lane goes on with the groups still to send.
            error = FileError(f"stream to {self.options.where}: {exc}")
            for src in sent:
                results[src.index] = results[src.index] or PutResult(
                    src.request, PutStatus.ERROR, error=error)
            return
        finally:
            if not reusable:
                self._drop(session)
        by_index = {src.index: src for src in sent}
        for entry in reply:
            src = by_index[int(str(entry[0]))]
            results[src.index] = self._stream_result(src, entry)

    async def _frame_groups(self, sources: list[_Source], run_id: str,
                            send: MemoryObjectSendStream[tuple[list[_Source], bytes]],
                            sending: anyio.Event) -> None:
        """Read and frame the groups, two ahead of the lane; one only until it is
        ``sending``: a batch waiting for its session holds one group's bytes (8 MiB at
        most), whatever the number of batches waiting."""
        async with send:
            for index, group in enumerate(_groups(sources)):
                if index == 1:
                    await sending.wait()
                frames = await anyio.to_thread.run_sync(_load_frames, group, run_id,
                                                        limiter=self._limiter)
                try:
                    await send.send((group, frames))
                except anyio.BrokenResourceError:
                    return  # every lane broke: the rest is reported as not done

    async def _stream_large(self, session: StreamSession, src: _Source, run_id: str,
                            progress: Progress) -> PutResult | None:
        """Stream one large file chunk by chunk; CHANGED (and discarded) if it changed."""
        req, before = src.request, src.before
        assert before is not None
        try:
            dest = confine(req.dest)
        except FileError as exc:
            return PutResult(req, PutStatus.ERROR, error=exc)
        await session.send(file_frame(src.index, copy_mode(before.st_mode),
                                      before.st_mtime_ns, dest, temp_name(run_id)))
        real, error = await session.carrier.write_file(src.fd, before.st_size, data_header,
                                                        DATA_CHUNK, progress)
        result: PutResult | None = None
        if error is not None:
            result = PutResult(req, PutStatus.ERROR,
                               error=file_error(error, "read source", req.source))
        elif real < before.st_size:
            result = PutResult(req, PutStatus.CHANGED)
        else:
            try:
                result = await anyio.to_thread.run_sync(_check_unchanged, src,
                                                        limiter=self._limiter)
            except OSError as exc:
                result = PutResult(req, PutStatus.ERROR,
                                   error=file_error(exc, "read source", req.source))
        await session.send(COMMIT if result is None else ABORT)
        return result

    def _stream_result(self, src: _Source, entry: list[object]) -> PutResult:
        """A receiver's report on one file, checked against the version that was read."""
        req, before = src.request, src.before
        assert before is not None
        if entry[1] != 0:
            return PutResult(req, PutStatus.ERROR, error=result_error(entry, req.dest))
        size, mtime_ns, kind_ok = entry[2], entry[3], entry[4]
        if not (isinstance(size, int) and isinstance(mtime_ns, int)
                and isinstance(kind_ok, int)):  # numbers, as the receiver sends them
            size, mtime_ns, kind_ok = int(str(size)), int(str(mtime_ns)), int(str(kind_ok))
        if req.kind is Kind.SYMLINK:
            ok = bool(kind_ok) and size == len(src.target)
        else:
            ok = (bool(kind_ok) and size == before.st_size
                  and mtime_ns // WHOLE_SECOND == before.st_mtime_ns // WHOLE_SECOND)
        if not ok:
            return PutResult(req, PutStatus.ERROR, error=FileError(
                f"verification failed for {_show(req.dest)}: size/mtime {size}/{mtime_ns},"
                f" expected {before.st_size}/{before.st_mtime_ns}"))
        return PutResult(req, PutStatus.COPIED, before.st_size, before.st_mtime_ns)

    # -- the SFTP data path --

    async def _feed(self, sources: list[_Source], send: MemoryObjectSendStream[_Source]
                    ) -> None:
        """Open and read local sources in worker threads, small files many per thread call."""
        async with send:
            local: list[_Source] = []
            for src in sources:
                if src.request.remote is not None:
                    await send.send(src)  # pull mode: the uploaders open the remote file
                else:
                    local.append(src)
            for group in _groups(local):
                await self._load_and_send(group, send)

    async def _load_and_send(self, group: list[_Source], send: MemoryObjectSendStream[_Source]
                             ) -> None:
        await anyio.to_thread.run_sync(_load, group, limiter=self._limiter)
        for src in group:
            await send.send(src)

    async def _upload_all(self, receive: MemoryObjectReceiveStream[_Source], run_id: str,
                          progress: Progress, seen: set[bytes], lost: list[str],
                          results: list[PutResult | None]) -> None:
        async with receive:
            async for src in receive:
                try:
                    if src.request.remote is not None:
                        src.result = await self._open_remote(src, lost)
                    result = src.result or await self._upload(src, run_id, progress, seen)
                except OriginUnavailableError as exc:
                    # Released, not charged; the rest of the batch is not tried.
                    lost.append(str(exc))
                    result = PutResult(src.request, PutStatus.SOURCE_UNAVAILABLE,
                                       error=FileError(str(exc)))
                except FileError as exc:
                    result = PutResult(src.request, PutStatus.ERROR, error=exc)
                finally:
                    src.close()
                    if src.reader is not None:
                        await src.reader.aclose()
                results[src.index] = result
                progress.add(files=1)

    async def _open_remote(self, src: _Source, lost: list[str]) -> PutResult | None:
        """Pull mode: open (a symlink: lstat) the origin file; a result if it is not copied."""
        req = src.request
        assert req.remote is not None
        if lost:
            return PutResult(req, PutStatus.SOURCE_UNAVAILABLE, error=FileError(lost[0]))
        if req.kind is Kind.SYMLINK:
            version = await req.remote.lstat(req.source)
        else:
            src.reader = await req.remote.open(req.source)
            version = src.reader.stat if src.reader is not None else None
        if version is None:
            return PutResult(req, PutStatus.VANISHED)
        if not req.expects(version):
            return PutResult(req, PutStatus.CHANGED)
        src.version, src.target = version, version.target or b""
        return None

    async def _remote_unchanged(self, src: _Source) -> PutResult | None:
        """Pull mode: CHANGED/VANISHED unless the open file and its path still show the
        version read (at the origin's precision); None if they do."""
        req, version, reader = src.request, src.version, src.reader
        assert req.remote is not None
        assert version is not None
        assert reader is not None
        if not version.same_version(await reader.fstat()):
            return PutResult(req, PutStatus.CHANGED)
        current = await req.remote.lstat(req.source)
        if current is None:
            return PutResult(req, PutStatus.VANISHED)
        return None if version.same_version(current) else PutResult(req, PutStatus.CHANGED)

    async def _upload(self, src: _Source, run_id: str, progress: Progress, seen: set[bytes]
                      ) -> PutResult:
        req = src.request
        rel = confine(req.dest)
        if not rel:
            raise FileError("refused empty destination path", ErrorClass.PERMANENT)
        reldir = posixpath.dirname(rel)
        conn = await self._connected(spread=True)
        await self._folders(conn, reldir, create=True, seen=seen)
        tmp_rel = reldir + b"/" + temp_name(run_id) if reldir else temp_name(run_id)
        tmp, final = self._path(tmp_rel), self._path(rel)
        async with self._temp(conn, tmp) as committed:
            if req.kind is Kind.SYMLINK:
                with self._io(conn, "create symlink", final):
                    try:
                        await conn.sftp.symlink(src.target, tmp)
                    except asyncssh.SFTPOpUnsupported:
                        raise FileError(f"the server at {self.options.where} cannot create"
                                        " symlinks", ErrorClass.PERMANENT) from None
                await self._set_link_times(conn, tmp, src)
            else:
                changed = await self._write_file(conn, src, tmp, progress)
                if changed is not None:
                    return changed
            await self._rename(conn, tmp, final, req.dest)
            committed()
        return await self._verify(conn, src, final)

    @asynccontextmanager
    async def _temp(self, conn: _Conn, tmp: bytes) -> AsyncIterator[Callable[[], None]]:
        """Remove the temp file unless it was committed (renamed), also on cancellation."""
        state = {"committed": False}

        def committed() -> None:
            state["committed"] = True

        try:
            yield committed
        finally:
            if not state["committed"]:
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT):
                    await self._remove_temp(conn, tmp)

    async def _remove_temp(self, conn: _Conn, tmp: bytes) -> None:
        """Best effort: what stays behind is removed by a later run's remove_stale_temps.

        A second try on a fresh connection: the one at hand may just have been dropped by
        a sibling transfer that stalled.
        """
        for attempt in (1, 2):
            try:
                if conn.closed:
                    conn = await self._conn()
                with (self._io(conn, "remove temp", tmp, CLEANUP_TIMEOUT),
                      suppress(asyncssh.SFTPNoSuchFile)):
                    await conn.sftp.remove(tmp)
                return
            except (FileError, ReplicaUnavailableError) as exc:
                if attempt == 1 and conn.closed:
                    continue
                self._log.info("temp file left for a later run", path=os.fsdecode(tmp),
                               error=str(exc))
                return

    async def _write_file(self, conn: _Conn, src: _Source, tmp: bytes, progress: Progress
                          ) -> PutResult | None:
        """Write the temp file, durable, with mode and mtime; CHANGED if the source moved."""
        _, mode, atime_ns, mtime_ns = src.copied()
        small = src.data is not None  # read whole and checked unchanged by _load
        with self._io(conn, "create", tmp):
            # block_size=0: one request per write call. Requests are split and pipelined
            # here, in our task group: asyncssh's own parallel writer leaves orphan tasks
            # behind when cancelled.
            f = await conn.sftp.open(tmp, asyncssh.FXF_WRITE | asyncssh.FXF_CREAT
                                     | asyncssh.FXF_EXCL, asyncssh.SFTPAttrs(permissions=0o600),
                                     encoding=None, block_size=0)
        closed = False
        try:
            await self._send(conn, f, src, tmp, progress)
            attrs = asyncssh.SFTPAttrs(permissions=copy_mode(mode), atime=atime_ns // WHOLE_SECOND,
                                       mtime=mtime_ns // WHOLE_SECOND)
            with self._io(conn, "set mode and mtime", tmp):
                await f.setstat(attrs)
            if conn.fsync:
                try:
                    with self._io(conn, "fsync", tmp):
                        await f.fsync()
                except asyncssh.SFTPOpUnsupported:
                    conn.fsync = False
            if not conn.fsync:
                self._caps = Capabilities(WHOLE_SECOND, False, self._caps.atomic_rename)
                self._warn_once("fsync", "server lacks fsync@openssh.com: copies are renamed"
                                " without being flushed to disk first")
            with self._io(conn, "close", tmp):
                await f.close()
            closed = True
        finally:
            if not closed and not conn.closed:
                with (anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT),
                      suppress(FileError), self._io(conn, "close", tmp, CLEANUP_TIMEOUT)):
                    await f.close()
        if small:
            return None
        if src.reader is not None:
            return await self._remote_unchanged(src)
        return await anyio.to_thread.run_sync(_check_unchanged, src, limiter=self._limiter)

    async def _send(self, conn: _Conn, f: asyncssh.SFTPClientFile, src: _Source, tmp: bytes,
                    progress: Progress) -> None:
        """Write the source with several requests in flight; large files are read chunk by
        chunk in worker threads (pull mode: from the origin) while earlier requests are on
        the wire."""
        piece = max(4096, min(conn.sftp.limits.max_write_len or SAFE_WRITE, CHUNK))
        window = anyio.Semaphore(max(1, min(MAX_REQUESTS, BYTES_IN_FLIGHT // piece)))
        failed: list[FileError] = []
        unread: list[FileError | OriginUnavailableError] = []  # the origin failed (pull mode)

        async def write(data: bytes, offset: int) -> None:
            try:
                with self._io(conn, "write", tmp):
                    await f.write(data, offset)
                progress.add(len(data))
            except FileError as exc:
                # Siblings are not cancelled (that would drop the shared connection): they
                # finish or time out, and no new request is sent.
                failed.append(exc)
            finally:
                window.release()

        pending = src.data  # a small file, read already
        async with anyio.create_task_group() as tg:
            offset = 0
            while not failed:
                if pending is not None:
                    data, pending = pending, b""
                elif src.reader is not None:
                    try:
                        data = await src.reader.read(progress)
                    except (FileError, OriginUnavailableError) as exc:
                        unread.append(exc)
                        break
                else:
                    try:
                        data = await anyio.to_thread.run_sync(_read, src.fd, CHUNK,
                                                              limiter=self._limiter)
                    except OSError as exc:
                        failed.append(file_error(exc, "read source", src.request.source))
                        break
                if not data:
                    break
                for start in range(0, len(data), piece):
                    await window.acquire()
                    if failed:
                        window.release()
                        break
                    tg.start_soon(write, data[start:start + piece], offset + start)
                offset += len(data)
        if unread:
            raise unread[0]
        if failed:
            error = failed[0]
            if error.error_class is ErrorClass.TRANSIENT and await self._full(
                    conn, tmp, src.request.size):
                raise FileError(f"{error}: no space left on the replica",
                                ErrorClass.NO_SPACE) from None
            raise error

    async def _full(self, conn: _Conn, tmp: bytes, size: int) -> bool:
        """Whether a failed write was the disk filling up: v3 servers just say "Failure"."""
        if not conn.statvfs or conn.closed:
            return False
        folder = posixpath.dirname(tmp) or b"."
        try:
            with anyio.fail_after(self._op_timeout):
                vfs = await conn.sftp.statvfs(folder)
        except asyncssh.SFTPOpUnsupported:
            conn.statvfs = False
            return False
        except (asyncssh.Error, OSError, TimeoutError):
            return False
        return bool(vfs.bavail * vfs.frsize < size)

    async def _set_link_times(self, conn: _Conn, tmp: bytes, src: _Source) -> None:
        if not conn.lsetstat:
            return
        _, _, atime_ns, mtime_ns = src.copied()
        attrs = asyncssh.SFTPAttrs(atime=atime_ns // WHOLE_SECOND, mtime=mtime_ns // WHOLE_SECOND)
        try:
            with self._io(conn, "set symlink mtime", tmp):
                await conn.sftp.setstat(tmp, attrs, follow_symlinks=False)
        except asyncssh.SFTPOpUnsupported:
            conn.lsetstat = False

    async def _rename(self, conn: _Conn, tmp: bytes, final: bytes, dest: bytes) -> None:
        try:
            if conn.posix_rename:
                try:
                    with self._io(conn, "rename into", final):
                        await conn.sftp.posix_rename(tmp, final)
                    return
                except asyncssh.SFTPOpUnsupported:
                    conn.posix_rename = False
            # Without posix-rename, SFTP v3 rename refuses to replace: remove first. The
            # final name is briefly absent (never partial); say so instead of hiding it.
            self._caps = Capabilities(WHOLE_SECOND, self._caps.fsync, False)
            self._warn_once("rename", "server lacks posix-rename@openssh.com: replacing"
                            " files by remove + rename (not atomic)")
            with self._io(conn, "remove old", final), suppress(asyncssh.SFTPNoSuchFile):
                await conn.sftp.remove(final)
            with self._io(conn, "rename into", final):
                await conn.sftp.rename(tmp, final)
        except FileError as exc:
            attrs = None
            with suppress(FileError):
                attrs = await self._lstat_or_none(conn, confine(dest))
            if attrs is not None and stat.S_ISDIR(attrs.permissions or 0):
                raise FileError(f"destination path blocked: {_show(dest)} is a folder",
                                ErrorClass.PERMANENT) from None
            raise exc from None

    async def _verify(self, conn: _Conn, src: _Source, final: bytes) -> PutResult:
        """Compare the final file with the source version read before the copy."""
        req = src.request
        size, _, _, mtime_ns = src.copied()
        try:
            with self._io(conn, "verify", final):
                attrs = await conn.sftp.lstat(final)
        except FileError as exc:
            return PutResult(req, PutStatus.ERROR, error=exc)
        mode = attrs.permissions or 0
        if req.kind is Kind.SYMLINK:
            # A symlink's size is its target's length; readlink is not used because chrooted
            # servers rewrite targets.
            ok = stat.S_ISLNK(mode) and attrs.size == len(src.target)
            what = f"symlink of size {attrs.size}"
        else:
            ok = (stat.S_ISREG(mode) and attrs.size == size
                  and attrs.mtime == mtime_ns // WHOLE_SECOND)
            what = f"size/mtime {attrs.size}/{attrs.mtime}"
        if not ok:
            return PutResult(req, PutStatus.ERROR, error=FileError(
                f"verification failed for {_show(req.dest)}: {what}, expected"
                f" {size}/{mtime_ns // WHOLE_SECOND}"))
        return PutResult(req, PutStatus.COPIED, size, mtime_ns)


