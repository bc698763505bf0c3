"""Origins on SSH hosts (pull mode): listing a remote tree and reading its files.

Listing uses SFTP ``readdir`` (names with their lstat attributes, several folders in flight)
or, where the server lets us run a command, one remote ``find -printf`` stream for the whole
tree, which costs no round trip per folder.

One mtime precision for an origin's whole life: SFTP v3 carries whole seconds and ``find``
nanoseconds, so every mtime of an SSH origin is truncated to whole seconds, whatever the
method. The two methods then record identical rows, so an origin may switch between them
(a shell that comes and goes, a ``find`` that fails) without files looking changed, and a
copy's mtime is set and verified at that same precision.
"""

from __future__ import annotations

import os
import posixpath
import shlex
import stat
from collections.abc import AsyncGenerator
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass

import anyio
import structlog

from .._config import OriginConfig
from .._errors import FileError, OriginUnavailableError, ReplicaUnavailableError
from .._inventory import Kind
from ._asyncssh import asyncssh
from ._base import Progress
from ._ssh_conn import _acquire_pool, _Conn, _Pool, _release_pool, sftp_op
from ._ssh_options import CLEANUP_TIMEOUT, WHOLE_SECOND, SshOptions, options_for
from ._ssh_options import show as _show
from ._stats import SourceStat

log = structlog.get_logger("replicator.transports.ssh_source")

# Read requests of one file on the wire at once, and the largest request.
READ_REQUESTS = 16
READ_PIECE = 256 << 10
SAFE_READ = 16 << 10  # without the server's limits@openssh.com
# Folders listed at once over SFTP: each readdir is a round trip.
FOLDERS_IN_FLIGHT = 8
# The remote find: one record per entry, NUL-separated fields (names may hold any byte).
# %y type, %s size, %T@ mtime (seconds.fraction), %m permission bits (octal), %P path
# below the root, %l symlink target. -depth prints a folder after its content, so a folder
# is complete when its own record arrives; 'U' marks a folder that cannot be listed.
_FIELDS = r"%s\0%T@\0%m\0%P\0%l\0"
_UNLISTABLE = ["(", "-type", "d", "!", "(", "-readable", "-executable", ")",
               "-printf", "U\\0" + _FIELDS, ")", "-o", "-printf", "%y\\0" + _FIELDS]
_SFTP_TYPES = {asyncssh.FILEXFER_TYPE_REGULAR: "f", asyncssh.FILEXFER_TYPE_DIRECTORY: "d",
               asyncssh.FILEXFER_TYPE_SYMLINK: "l"}


def _find_command(root: str, *options: str) -> str:
    # A root starting with '-' would be read as an option: anchor relative roots with './'.
    if not root.startswith("/"):
        root = "./" + root
    # -H: a symlinked root is followed, as SFTP's opendir does; nothing below it is.
    args = ["env", "LC_ALL=C", "find", "-H", root, *options, "-depth", *_UNLISTABLE]
    return " ".join(shlex.quote(arg) for arg in args)


@dataclass(frozen=True, slots=True)
class RemoteEntry:
    """One entry of a remote folder; ``kind`` is ``f``, ``d``, ``l`` or another letter."""

    name: bytes
    kind: str
    size: int
    mtime_ns: int  # whole seconds
    mode: int  # permission bits
    target: bytes | None = None


@dataclass(frozen=True, slots=True)
class RemoteFolder:
    """A folder of the remote tree: its entries, or None if it could not be listed."""

    path: bytes
    entries: tuple[RemoteEntry, ...] | None


def _seconds(attrs: asyncssh.SFTPAttrs) -> int:
    return (attrs.mtime or 0) * WHOLE_SECOND


def _stat_of(attrs: asyncssh.SFTPAttrs, target: bytes | None = None) -> SourceStat:
    kind = {"f": Kind.FILE, "l": Kind.SYMLINK}.get(_SFTP_TYPES.get(attrs.type, "o"))
    return SourceStat(kind, attrs.size or 0, _seconds(attrs),
                      stat.S_IMODE(attrs.permissions or 0), target)


class SshSource:
    """An origin folder on an SSH host: lists its tree and reads its files (a ``Source``).

    Reaching the host is an origin-level condition (``OriginUnavailableError``: host
    unreachable, host key refused, authentication failed); anything that goes wrong with
    one file or folder is a ``FileError``. Cancellation abandons the operation in flight.
    """

    def __init__(self, options: SshOptions, root: str, op_timeout: float = 60.0) -> None:
        self.options = options
        self.root = os.fsencode(root)
        self._op_timeout = op_timeout
        self._pool: _Pool | None = None
        self._shell: bool | None = None  # can we run find there? None: not tried yet
        self._log = log.bind(host=options.where, root=root)

    @classmethod
    def from_config(cls, origin: OriginConfig) -> SshSource:
        return cls(options_for(origin), origin.root, origin.op_timeout)

    @property
    def where(self) -> str:
        return f"{self.options.where}:{os.fsdecode(self.root)}"

    @property
    def mtime_precision_ns(self) -> int:
        return WHOLE_SECOND

    async def aclose(self) -> None:
        if self._pool is not None:
            _release_pool(self._pool)
            self._pool = None

    # -- plumbing --

    async def _conn(self) -> _Conn:
        if self._pool is None:
            self._pool = _acquire_pool(self.options)
        try:
            return await self._pool.get()
        except ReplicaUnavailableError as exc:
            raise OriginUnavailableError(f"origin {self.where}: {exc}") from None

    def _discard(self, conn: _Conn) -> None:
        if self._pool is not None:
            self._pool.discard(conn)

    def _io(self, conn: _Conn, what: str, path: bytes,
            timeout: float | None = None) -> AbstractContextManager[None]:
        """One SFTP operation (see ``sftp_op``)."""
        seconds = self._op_timeout if timeout is None else timeout
        return sftp_op(conn, self._discard, f"{what} {_show(path)} on {self.options.where}",
                       seconds)

    # -- the tree --

    async def check_root(self) -> None:
        """Raise OriginUnavailableError unless the root is a folder we can reach."""
        conn = await self._conn()
        try:
            with self._io(conn, "stat", self.root):
                try:
                    attrs = await conn.sftp.stat(self.root)
                except asyncssh.SFTPNoSuchFile:
                    raise OriginUnavailableError(
                        f"origin root {self.where} does not exist") from None
        except FileError as exc:
            raise OriginUnavailableError(f"origin root {self.where}: {exc}") from None
        if attrs.type != asyncssh.FILEXFER_TYPE_DIRECTORY:
            raise OriginUnavailableError(f"origin root {self.where} is not a folder")

    async def list_folder(self, path: bytes) -> list[RemoteEntry] | None:
        """The entries of one folder over SFTP (lstat semantics); None if it vanished.

        FileError if it cannot be read; OriginUnavailableError if the host cannot be reached.
        """
        conn = await self._conn()
        with self._io(conn, "list", path):
            try:
                names = await conn.sftp.readdir(path)
            except asyncssh.SFTPNoSuchFile:
                return None
        entries: list[RemoteEntry] = []
        links: list[int] = []
        for item in names:
            name = item.filename
            assert isinstance(name, bytes)
            if name in (b".", b".."):
                continue
            attrs = item.attrs
            kind = _SFTP_TYPES.get(attrs.type, "o")
            if kind == "l":
                links.append(len(entries))
            entries.append(RemoteEntry(name, kind, attrs.size or 0, _seconds(attrs),
                                       stat.S_IMODE(attrs.permissions or 0)))
        if links:
            targets: dict[int, bytes | None] = {}

            async def readlink(index: int) -> None:
                link = path.rstrip(b"/") + b"/" + entries[index].name
                try:
                    with self._io(conn, "read link", link):
                        targets[index] = await conn.sftp.readlink(link)
                except FileError as exc:
                    self._log.warning("symlink unreadable", path=os.fsdecode(link),
                                      error=str(exc))
                    targets[index] = None

            limit = anyio.Semaphore(FOLDERS_IN_FLIGHT)
            async with anyio.create_task_group() as tg:
                for index in links:
                    async with limit:
                        tg.start_soon(readlink, index)
            for index, target in targets.items():
                entry = entries[index]
                # An unreadable link is skipped, like a file that cannot be examined.
                entries[index] = RemoteEntry(entry.name, "l" if target is not None else "?",
                                             entry.size, entry.mtime_ns, entry.mode, target)
        return entries

    async def can_run_find(self) -> bool:
        """Whether the server runs commands for us (``find`` with ``-printf``); remembered."""
        if self._shell is None:
            try:
                self.root.decode()
            except UnicodeDecodeError:
                self._shell = False  # a command line is text: list such a root over SFTP
                return False
            conn = await self._conn()
            try:
                with anyio.fail_after(self._op_timeout):
                    done = await conn.conn.run(_find_command("/", "-maxdepth", "0"),
                                               check=False, encoding=None)
                self._shell = done.exit_status == 0
            except (asyncssh.Error, OSError, TimeoutError) as exc:
                self._log.info("no remote shell: listing over SFTP", error=str(exc))
                self._shell = False
        return self._shell

    def disable_find(self) -> None:
        """List over SFTP from now on (find failed)."""
        self._shell = False

    async def find_tree(self) -> AsyncGenerator[RemoteFolder, None]:
        """Every folder of the tree, each once complete, from one remote ``find`` stream.

        Raises FileError if find fails in a way that may have hidden entries (the caller
        then must not take missing files as deleted), OriginUnavailableError if the host
        cannot be reached.
        """
        conn = await self._conn()
        command = _find_command(os.fsdecode(self.root))
        pending: dict[bytes, list[RemoteEntry]] = {}
        try:
            with anyio.fail_after(self._op_timeout):
                process = await conn.conn.create_process(command, encoding=None)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            self._discard(conn)
            raise FileError(f"remote find on {self.options.where}: {exc}") from None
        errors = b""
        async with process:
            buffer = b""
            fields: list[bytes] = []
            while True:
                with self._io(conn, "find", self.root):
                    data = await process.stdout.read(1 << 20)
                if not data:
                    break
                parts = (buffer + data).split(b"\0")
                buffer = parts.pop()
                fields += parts
                complete = len(fields) - len(fields) % 6
                for i in range(0, complete, 6):
                    folder = self._record(fields[i:i + 6], pending)
                    if folder is not None:
                        yield folder
                del fields[:complete]
            with self._io(conn, "find", self.root):
                errors = await process.stderr.read()
                status = await process.wait()
        cut = bool(buffer or fields)
        if status.exit_status != 0 or cut:
            # find exits 1 after the errors it reports. Folders that vanished during the scan
            # are fine (they are just gone, as in the local walker), and folders that cannot
            # be listed come as 'U' records; any other error, a find killed by a signal
            # (exit -1) or gone without a status, or a record cut short may hide entries.
            lines = [line for line in errors.splitlines()
                     if not line.endswith((b"No such file or directory",
                                           b"Permission denied"))]
            if lines or cut or status.exit_status != 1:
                how = (f"signal {status.exit_signal[0]}" if status.exit_signal
                       else f"exit {status.exit_status}")
                text = os.fsdecode(b"; ".join(lines[:3]))
                raise FileError(f"remote find on {self.options.where} failed ({how}): {text}")

    def _record(self, fields: list[bytes], pending: dict[bytes, list[RemoteEntry]]
                ) -> RemoteFolder | None:
        kind_b, size, mtime, mode, rel, target = fields
        kind = kind_b.decode("ascii", "replace")
        path = self.root.rstrip(b"/") + b"/" + rel if rel else self.root
        if kind in ("d", "U"):
            entries = pending.pop(path, [])
            if kind == "U":
                return RemoteFolder(path, None)
            return RemoteFolder(path, tuple(entries))
        folder, name = posixpath.split(path)
        entry = RemoteEntry(name, kind, int(size), int(mtime.split(b".")[0]) * WHOLE_SECOND,
                            int(mode, 8) & 0o7777, target if kind == "l" else None)
        pending.setdefault(folder, []).append(entry)
        return None

    # -- reading files (the Source protocol) --

    async def lstat(self, path: bytes) -> SourceStat | None:
        conn = await self._conn()
        with self._io(conn, "stat source", path):
            try:
                attrs = await conn.sftp.lstat(path)
            except asyncssh.SFTPNoSuchFile:
                return None
            target = None
            if attrs.type == asyncssh.FILEXFER_TYPE_SYMLINK:
                try:
                    target = await conn.sftp.readlink(path)
                except asyncssh.SFTPNoSuchFile:
                    return None
        return _stat_of(attrs, target)

    async def open(self, path: bytes) -> SftpReader | None:
        conn = await self._conn()
        with self._io(conn, "open source", path):
            try:
                f = await conn.sftp.open(path, asyncssh.FXF_READ, encoding=None, block_size=0)
            except asyncssh.SFTPNoSuchFile:
                return None
        try:
            with self._io(conn, "stat source", path):
                attrs = await f.stat()
        except BaseException:
            with (anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT),
                  suppress(Exception)):
                await f.close()
            raise
        return SftpReader(self, conn, f, path, _stat_of(attrs))


class SftpReader:
    """One remote file open for reading, several read requests in flight."""

    def __init__(self, source: SshSource, conn: _Conn, f: asyncssh.SFTPClientFile,
                 path: bytes, opened: SourceStat) -> None:
        self._source = source
        self._conn = conn
        self._file = f
        self._path = path
        self._offset = 0
        self._eof = False
        self.stat = opened
        limit = conn.sftp.limits.max_read_len or SAFE_READ
        self._piece = max(4096, min(limit, READ_PIECE))

    async def read(self, progress: Progress) -> bytes:
        """The next block of the file (several requests' worth); b"" at the end."""
        if self._eof:
            return b""
        piece = self._piece
        blocks: list[bytes | None] = [None] * READ_REQUESTS
        failed: list[FileError] = []

        async def read_one(index: int) -> None:
            try:
                with self._source._io(self._conn, "read source", self._path):
                    data: bytes = await self._file.read(piece, self._offset + index * piece)
                blocks[index] = data
                progress.add(len(data))
            except FileError as exc:
                # Siblings are not cancelled (that would drop the shared connection).
                failed.append(exc)

        async with anyio.create_task_group() as tg:
            for index in range(READ_REQUESTS):
                tg.start_soon(read_one, index)
        if failed:
            raise failed[0]
        # Keep the blocks up to the first short one: a short read is the end of the file,
        # or a server returning less than asked; the next call asks again from there.
        out: list[bytes] = []
        for block in blocks:
            assert block is not None
            out.append(block)
            if len(block) < piece:
                break
        data = b"".join(out)
        if not data:
            self._eof = True
        self._offset += len(data)
        return data

    async def fstat(self) -> SourceStat:
        with self._source._io(self._conn, "stat source", self._path):
            return _stat_of(await self._file.stat())

    async def aclose(self) -> None:
        if self._conn.closed:
            return
        with (anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT),
              suppress(FileError),
              self._source._io(self._conn, "close source", self._path, CLEANUP_TIMEOUT)):
            await self._file.close()


def open_source(origin: OriginConfig) -> SshSource:
    """The reader of an ssh:// origin."""
    if not origin.remote:
        raise ValueError(f"origin {origin.name!r} is a local folder")
    return SshSource.from_config(origin)


__all__ = ["RemoteEntry", "RemoteFolder", "SftpReader", "SshSource", "open_source"]

