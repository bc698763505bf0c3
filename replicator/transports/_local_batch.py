"""The blocking work of copying a batch of files into a local folder.

Run in a worker thread or in the copy helper process (``_copy_worker``), which imports this
module alone: it needs nothing beyond the standard library and the package's plain types.
Every folder is opened relative to the root with O_NOFOLLOW, so a symlink planted in the
replica cannot redirect a write outside the root.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress

from .._errors import FileError
from .._inventory._types import Kind
from ._base import Progress, PutRequest, PutResult, PutStatus
from ._errors import file_error
from ._paths import confine, copy_mode

CHUNK = 8 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# A temp name: ".~rep-<run id>-<unique>.tmp", so a later run can tell whose it is.
TEMP_RE = re.compile(rb"^\.~rep-([0-9a-zx]+)-[0-9a-f]+\.tmp$")
# Unique per process without a getrandom call per file: a random prefix and a counter.
_TEMP_PREFIX = secrets.token_hex(4)
_temp_counter = itertools.count()


def temp_name(run_id: str) -> bytes:
    """A temp name carrying the run's id, so a later run can tell whose it is."""
    return b"%s%x.tmp" % (_temp_head(run_id), next(_temp_counter))


@functools.lru_cache(maxsize=8)
def _temp_head(run_id: str) -> bytes:
    return f".~rep-{run_id}-{_TEMP_PREFIX}".encode()


class _Cancelled(Exception):
    """The engine abandoned the batch: stop at the next chunk."""


class _Dirs:
    """Folder descriptors of one batch, opened component by component below the root."""

    def __init__(self, root_fd: int) -> None:
        self._root = root_fd
        self._fds: dict[bytes, int] = {b"": root_fd}
        self.touched: set[bytes] = set()

    def open(self, reldir: bytes, create: bool) -> int:
        fd = self._fds.get(reldir)
        if fd is not None:
            return fd
        parent_rel, name = os.path.split(reldir)
        parent = self.open(parent_rel, create)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            with suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=parent)
                self.touched.add(parent_rel)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise FileError(
                    f"destination path blocked: {os.fsdecode(reldir)!r} is not a folder",
                    file_error(exc, "open", reldir).error_class,
                ) from None
            raise
        self._fds[reldir] = fd
        return fd

    def touched_fds(self) -> set[int]:
        """Folders in which this batch created sub-folders."""
        return {self.open(rel, False) for rel in self.touched}

    def one_per_device(self, fds: Iterable[int]) -> list[int]:
        """One folder per filesystem: a flush covers its whole filesystem."""
        by_device: dict[int, int] = {}
        for fd in fds:
            by_device.setdefault(os.fstat(fd).st_dev, fd)
        return list(by_device.values())

    def close(self) -> None:
        for rel, fd in self._fds.items():
            if rel:
                os.close(fd)
        self._fds.clear()


def _copy_data(src: int, dst: int, progress: Progress, expected: int,
               writeback: bool = False) -> int:
    """Copy until EOF, or until ``expected`` bytes: a source that grows is caught by the
    stat check after the copy, so the extra read that would only see EOF is skipped.

    ``writeback``: start writing each chunk to disk as soon as it is copied, so the flush
    that follows waits for the last chunk only instead of the whole file.
    """
    total = 0
    use_range = True
    while expected <= 0 or total < expected:
        if progress.cancelled:
            raise _Cancelled
        if use_range:
            try:
                n = os.copy_file_range(src, dst, CHUNK)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                use_range = False
                continue
        else:
            data = os.read(src, CHUNK)
            n = len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view) :]
        if n == 0:
            return total
        if writeback and _start_writeback is not None:
            _start_writeback(dst, total, n)
        total += n
        progress.add(n)
    return total


def _load_syncfs() -> Callable[[int], None] | None:
    """``syncfs(2)``: flush one filesystem. None where the C library lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.syncfs
    except (OSError, AttributeError):
        return None

    def syncfs(fd: int) -> None:
        if function(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return syncfs


_SYNC_FILE_RANGE_WRITE = 2


def _load_start_writeback() -> Callable[[int, int, int], None] | None:
    """``sync_file_range(fd, offset, count, SYNC_FILE_RANGE_WRITE)``: start writing a range
    to disk without waiting. Only a head start for the flush that follows, which is what
    makes the data durable, so a failure here is ignored. None where it is missing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

    def start_writeback(fd: int, offset: int, count: int) -> None:
        function(fd, offset, count, _SYNC_FILE_RANGE_WRITE)

    return start_writeback


_syncfs = _load_syncfs() if sys.platform == "linux" else None
_start_writeback = _load_start_writeback() if sys.platform == "linux" else None


def flush_folders(dirs: _Dirs, dir_fds: set[int], what: str) -> FileError | None:
    """Make everything written below these folders durable: one syncfs per filesystem
    (an fsync per folder where syncfs is missing). Returns the error, if any."""
    if not dir_fds:
        return None
    try:
        if _syncfs is None:
            for fd in dir_fds:
                os.fsync(fd)
        else:
            for fd in dirs.one_per_device(dir_fds):
                _syncfs(fd)
    except OSError as exc:
        return file_error(exc, f"flush after {what}", b"")
    return None


def rename_into_place(tmp: bytes, name: bytes, dir_fd: int, dest: bytes) -> FileError | None:
    """Rename a temp file to its final name in the same folder; the error, if any."""
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        error = file_error(exc, "rename into", dest)
        if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
            error = FileError(f"destination path blocked: {os.fsdecode(dest)!r} is a folder",
                              error.error_class)
        return error
    return None


class _Staged:
    """A temp file written next to its destination, waiting for flush and rename."""

    __slots__ = ("before", "committed", "dir_fd", "name", "request", "target", "tmp")

    def __init__(self, request: PutRequest, dir_fd: int, name: bytes, tmp: bytes,
                 before: os.stat_result, target: bytes | None = None) -> None:
        self.request = request
        self.dir_fd = dir_fd
        self.name = name
        self.tmp = tmp
        self.before = before
        self.target = target
        self.committed = False

    def fail(self, error: FileError) -> PutResult:
        return PutResult(self.request, PutStatus.ERROR, error=error)

    def discard(self) -> None:
        """Remove the temp file unless it was renamed into place."""
        if not self.committed:
            self.committed = True
            with suppress(OSError):
                os.unlink(self.tmp, dir_fd=self.dir_fd)


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_dev, a.st_size, a.st_mtime_ns) == (
        b.st_ino,
        b.st_dev,
        b.st_size,
        b.st_mtime_ns,
    )


class BatchWriter:
    """The blocking work of a batch, in one worker thread or in the copy helper process."""

    def __init__(self, root: bytes, fsync: bool) -> None:
        self.root = root
        self._fsync = fsync

    def put_batch(
        self,
        requests: Sequence[PutRequest],
        run_id: str,
        progress: Progress,
        results: list[PutResult],
    ) -> None:
        """Stage every file, make the batch durable, then check sources and rename.

        One flush per filesystem and batch replaces a flush per file (which caps a disk at a
        few thousand files per second): temp files are written, flushed, renamed only if
        their source did not change, and the renames flushed before anything is reported.
        """
        try:
            root_fd = os.open(self.root, _DIR_FLAGS)
        except OSError as exc:
            error = FileError(f"replica root: {exc.strerror}")
            results.extend(PutResult(r, PutStatus.ERROR, error=error) for r in requests)
            return
        dirs = _Dirs(root_fd)
        # Results are handed over only once durable and verified: an abandoned batch reports
        # nothing, and its renamed files are simply copied again later.
        done: list[PutResult | _Staged] = []
        try:
            for request in requests:
                if progress.cancelled:
                    return
                done.append(self._stage(request, run_id, progress, dirs))
                progress.add(files=1)
            staged = [item for item in done if isinstance(item, _Staged)]
            with progress.flushing():
                flush_error = self._flush(dirs, {item.dir_fd for item in staged}, "write")
            final: list[PutResult] = []
            renamed: list[_Staged] = []
            for item in done:
                if progress.cancelled:
                    return  # abandoned: the engine released these files; rename nothing more
                if not isinstance(item, _Staged):
                    final.append(item)
                    continue
                result = item.fail(flush_error) if flush_error else self._commit(item)
                if result.status is PutStatus.COPIED:
                    renamed.append(item)
                final.append(result)
            with progress.flushing():
                flush_error = self._flush(
                    dirs, {item.dir_fd for item in renamed} | dirs.touched_fds(), "rename")
            by_request = {id(item.request): item for item in renamed}
            for index, result in enumerate(final):
                if result.status is PutStatus.COPIED:
                    item = by_request[id(result.request)]
                    final[index] = (item.fail(flush_error) if flush_error
                                    else self._verify(result, item.dir_fd, item.name))
            if not progress.cancelled:
                results.extend(final)
        finally:
            for item in done:
                if isinstance(item, _Staged):
                    item.discard()
            dirs.close()
            os.close(root_fd)

    def _flush(self, dirs: _Dirs, dir_fds: set[int], what: str) -> FileError | None:
        return flush_folders(dirs, dir_fds, what) if self._fsync else None

    def _verify(self, result: PutResult, dir_fd: int, name: bytes) -> PutResult:
        """Compare the final file with the source version read before the copy."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            return PutResult(result.request, PutStatus.ERROR,
                             error=file_error(exc, "verify", result.request.dest))
        if st.st_size != result.size or st.st_mtime_ns != result.mtime_ns:
            return PutResult(result.request, PutStatus.ERROR, error=FileError(
                f"verification failed for {os.fsdecode(result.request.dest)!r}: size/mtime"
                f" {st.st_size}/{st.st_mtime_ns}, expected {result.size}/{result.mtime_ns}"))
        return result

    def _stage(
        self, request: PutRequest, run_id: str, progress: Progress, dirs: _Dirs
    ) -> PutResult | _Staged:
        """Write ``request`` to a temp name next to its destination, mode and times set."""
        try:
            reldir, _, name = confine(request.dest).rpartition(b"/")
            dir_fd = dirs.open(reldir, create=True)
        except FileError as exc:
            return PutResult(request, PutStatus.ERROR, error=exc)
        except OSError as exc:
            return PutResult(request, PutStatus.ERROR, error=file_error(exc, "mkdir", reldir))
        if request.kind is Kind.SYMLINK:
            return self._stage_symlink(request, run_id, dir_fd, name)
        try:
            # O_NONBLOCK: a fifo put in its place since the scan must not block the open.
            src = os.open(request.source,
                          os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return PutResult(request, PutStatus.VANISHED)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # became a symlink since the scan
                return PutResult(request, PutStatus.CHANGED)
            return PutResult(request, PutStatus.ERROR,
                             error=file_error(exc, "read source", request.source))
        tmp = temp_name(run_id)
        staged: _Staged | None = None
        try:
            before = os.fstat(src)
            if (before.st_size, before.st_mtime_ns) != (request.size, request.mtime_ns):
                return PutResult(request, PutStatus.CHANGED)
            try:
                dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                              | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
                staged = _Staged(request, dir_fd, name, tmp, before)
                try:
                    _copy_data(src, dst, progress, before.st_size,
                               writeback=self._fsync and before.st_size > CHUNK)
                    os.fchmod(dst, copy_mode(before.st_mode))
                    os.utime(dst, ns=(before.st_atime_ns, before.st_mtime_ns))
                    if self._fsync and _syncfs is None:
                        os.fsync(dst)
                finally:
                    os.close(dst)
            except OSError as exc:
                return PutResult(request, PutStatus.ERROR,
                                 error=file_error(exc, "write", request.dest))
            # Whether the source changed during the read is checked once, in _commit, by
            # path: that also catches a file replaced since, and costs one stat per file.
            result, staged = staged, None
            return result
        except _Cancelled:
            return PutResult(request, PutStatus.NOT_STARTED)
        except OSError as exc:
            return PutResult(request, PutStatus.ERROR,
                             error=file_error(exc, "read source", request.source))
        finally:
            os.close(src)
            if staged is not None:
                staged.discard()

    def _commit(self, item: _Staged) -> PutResult:
        """Rename a durable temp file into place if its source is still the one we read."""
        request = item.request
        try:
            current = os.stat(request.source, follow_symlinks=False)
            if item.target is not None and os.readlink(request.source) != item.target:
                return PutResult(request, PutStatus.CHANGED)
        except FileNotFoundError:
            return PutResult(request, PutStatus.VANISHED)
        except OSError:
            return PutResult(request, PutStatus.CHANGED)
        if not _same(item.before, current):
            return PutResult(request, PutStatus.CHANGED)
        error = rename_into_place(item.tmp, item.name, item.dir_fd, request.dest)
        if error is not None:
            return PutResult(request, PutStatus.ERROR, error=error)
        item.committed = True
        return PutResult(request, PutStatus.COPIED, item.before.st_size, item.before.st_mtime_ns)

    def _stage_symlink(
        self, request: PutRequest, run_id: str, dir_fd: int, name: bytes
    ) -> PutResult | _Staged:
        try:
            before = os.stat(request.source, follow_symlinks=False)
            target = os.readlink(request.source)
        except FileNotFoundError:
            return PutResult(request, PutStatus.VANISHED)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # no longer a symlink
                return PutResult(request, PutStatus.CHANGED)
            return PutResult(request, PutStatus.ERROR,
                             error=file_error(exc, "read link", request.source))
        if target != request.target or before.st_mtime_ns != request.mtime_ns:
            return PutResult(request, PutStatus.CHANGED)
        tmp = temp_name(run_id)
        try:
            os.symlink(target, tmp, dir_fd=dir_fd)
        except OSError as exc:
            return PutResult(request, PutStatus.ERROR,
                             error=file_error(exc, "write link", request.dest))
        staged = _Staged(request, dir_fd, name, tmp, before, target)
        try:
            os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns), dir_fd=dir_fd,
                     follow_symlinks=False)
        except OSError as exc:
            staged.discard()
            return PutResult(request, PutStatus.ERROR,
                             error=file_error(exc, "write link", request.dest))
        return staged


__all__ = ["TEMP_RE", "BatchWriter", "flush_folders", "rename_into_place", "temp_name"]
