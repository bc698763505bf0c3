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
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress

from .._accelerator import accelerator
from .._errors import FileError
from .._inventory._kind import Kind
from ._base import Progress, PutRequest, PutResult, PutStatus
from ._errors import file_error, os_error
from ._paths import confine, copy_mode

CHUNK = 8 << 20
# Files up to this size go through the accelerator, this many per call: a call copies
# without the GIL and cannot report progress or see a cancellation until it returns.
FAST_MAX_SIZE = 1 << 20
FAST_GROUP = 64
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# A temp name: ".~rep-<run id>-<unique>.tmp", so a later run can tell whose it is.
TEMP_RE = re.compile(rb"^\.~rep-([0-9a-zx]+)-[0-9a-f]+\.tmp$")
# Unique per process without a getrandom call per file: a random prefix and a counter.
_TEMP_PREFIX = os.urandom(4).hex()  # secrets.token_hex, without importing hashlib
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


def _one_per_device(fds: Iterable[int]) -> list[int]:
    """One folder per filesystem: a flush covers its whole filesystem."""
    by_device: dict[int, int] = {}
    for fd in fds:
        by_device.setdefault(os.fstat(fd).st_dev, fd)
    return list(by_device.values())


def flush_folders(dir_fds: set[int], what: str) -> FileError | None:
    """Make everything written below these folders durable: one syncfs per filesystem
    (an fsync per folder where syncfs is missing). Returns the error, if any."""
    if not dir_fds:
        return None
    try:
        if _syncfs is None:
            for fd in dir_fds:
                os.fsync(fd)
        else:
            for fd in _one_per_device(dir_fds):
                _syncfs(fd)
    except OSError as exc:
        return file_error(exc, f"flush after {what}", b"")
    return None


def rename_into_place(tmp: bytes, name: bytes, dir_fd: int, dest: bytes) -> FileError | None:
    """Rename a temp file to its final name in the same folder; the error, if any."""
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        return rename_error(exc, dest)
    return None


class _Staged:
    """A temp file written next to its destination, waiting for flush and rename."""

    __slots__ = ("committed", "dir_fd", "name", "request", "target", "tmp", "version")

    def __init__(self, request: PutRequest, dir_fd: int, name: bytes, tmp: bytes,
                 version: tuple[int, int, int, int], target: bytes | None = None) -> None:
        self.request = request
        self.dir_fd = dir_fd
        self.name = name
        self.tmp = tmp
        # The source as read: (st_ino, st_dev, st_size, st_mtime_ns) before the copy.
        self.version = version
        self.target = target
        self.committed = False

    def copied(self) -> PutResult:
        return PutResult(self.request, PutStatus.COPIED, self.version[2], self.version[3])

    def fail(self, error: FileError) -> PutResult:
        return PutResult(self.request, PutStatus.ERROR, error=error)

    def discard(self) -> None:
        """Remove the temp file unless it was renamed into place."""
        if not self.committed:
            self.committed = True
            with suppress(OSError):
                os.unlink(self.tmp, dir_fd=self.dir_fd)


def _version(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns


def rename_error(exc: OSError, dest: bytes) -> FileError:
    """What a failed rename of a temp file to ``dest`` means to the operator."""
    error = file_error(exc, "rename into", dest)
    if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
        error = FileError(f"destination path blocked: {os.fsdecode(dest)!r} is a folder",
                          error.error_class)
    return error


# Codes of the accelerator's stage() and commit() (see _fastcopy.c).
_STAGED, _VANISHED, _CHANGED, _SOURCE_ERROR = 0, 1, 2, 3
_RENAMED, _GONE, _MOVED = 0, 1, 2


def _folder(request: PutRequest, dirs: _Dirs) -> tuple[int, bytes] | PutResult:
    """The open folder of the request's destination and its name there, or the error."""
    try:
        reldir, _, name = confine(request.dest).rpartition(b"/")
        return dirs.open(reldir, create=True), name
    except FileError as exc:
        return PutResult(request, PutStatus.ERROR, error=exc)
    except OSError as exc:
        return PutResult(request, PutStatus.ERROR, error=file_error(exc, "mkdir", reldir))


def _committed(item: _Staged, code: int, err: int) -> PutResult:
    """``_commit``'s result from the accelerator's code for the item."""
    if code == _RENAMED:
        item.committed = True
        return item.copied()
    if code == _GONE:
        return PutResult(item.request, PutStatus.VANISHED)
    if code == _MOVED:
        return PutResult(item.request, PutStatus.CHANGED)
    return PutResult(item.request, PutStatus.ERROR,
                     error=rename_error(os_error(err), item.request.dest))


def _verified(result: PutResult, err: int, size: int, mtime_ns: int) -> PutResult:
    """A copied file's result once its final file was looked at (``err``: lstat's errno)."""
    dest = result.request.dest
    if err:
        return PutResult(result.request, PutStatus.ERROR,
                         error=file_error(os_error(err), "verify", dest))
    if size != result.size or mtime_ns != result.mtime_ns:
        return PutResult(result.request, PutStatus.ERROR, error=FileError(
            f"verification failed for {os.fsdecode(dest)!r}: size/mtime"
            f" {size}/{mtime_ns}, expected {result.size}/{result.mtime_ns}"))
    return result


class StagedBatch:
    """A batch whose files ``BatchWriter.stage`` wrote to temp names: what ``finish``
    needs, and where its results go."""

    def __init__(self, root_fd: int, progress: Progress, results: list[PutResult]) -> None:
        self.dirs = _Dirs(root_fd)
        self.progress = progress
        self.results = results
        self.done: list[PutResult | _Staged] = []
        self._root_fd = root_fd

    def close(self) -> None:
        """Remove the temp files not renamed into place; close the folders. Idempotent."""
        for entry in self.done:
            if isinstance(entry, _Staged):
                entry.discard()
        self.done = []
        self.dirs.close()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1


class BatchWriter:
    """The blocking work of a batch, in one worker thread or in the copy helper process."""

    def __init__(self, root: bytes, fsync: bool) -> None:
        self.root = root
        self.fsync = fsync
        self._fast = accelerator()

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
        batch = self.stage(requests, run_id, progress, results)
        if batch is not None:
            self.finish([batch])

    def stage(self, requests: Sequence[PutRequest], run_id: str, progress: Progress,
              results: list[PutResult]) -> StagedBatch | None:
        """The first half of ``put_batch``: every file written to its temp name. Its
        results go to ``results`` once ``finish`` made them durable (or at once, and None
        is returned, when the root cannot be opened). Until then the batch counts as
        flushing: it waits for its flush, which another batch's may be."""
        try:
            root_fd = os.open(self.root, _DIR_FLAGS)
        except OSError as exc:
            error = FileError(f"replica root: {exc.strerror}")
            results.extend(PutResult(r, PutStatus.ERROR, error=error) for r in requests)
            return None
        batch = StagedBatch(root_fd, progress, results)
        try:
            self._stage_all(requests, run_id, progress, batch.dirs, batch.done)
            progress.begin_flush()
        except BaseException:
            batch.close()
            raise
        return batch

    def finish(self, batches: Sequence[StagedBatch]) -> None:
        """The second half of ``put_batch``, for several staged batches at once (a helper
        stages the next batch while the last ones are flushed): one flush for their data,
        sources checked and renames, one flush for the renames, the final files verified;
        then each batch's results, unless it was abandoned. Cleans up every batch."""
        # Results are handed over only once durable and verified: an abandoned batch reports
        # nothing, and its renamed files are simply copied again later.
        try:
            live = [batch for batch in batches if not batch.progress.cancelled]
            flush_error = self._flush({item.dir_fd for batch in live for item in batch.done
                                       if isinstance(item, _Staged)}, "write")
            for batch in batches:
                batch.progress.end_flush()
            commits = [(batch, self._commit_all(batch.done, flush_error, batch.progress))
                       for batch in live]
            renamed = {batch: [(index, item) for index, item in enumerate(batch.done)
                               if isinstance(item, _Staged)
                               and final[index].status is PutStatus.COPIED]
                       for batch, final in commits if final is not None}
            folders = {item.dir_fd for items in renamed.values() for _, item in items}
            for batch in renamed:
                folders |= batch.dirs.touched_fds()
                batch.progress.begin_flush()
            try:
                flush_error = self._flush(folders, "rename")
            finally:
                for batch in renamed:
                    batch.progress.end_flush()
            for batch, final in commits:
                if final is None:
                    continue  # abandoned: the engine released these files
                if flush_error is not None:
                    for index, item in renamed[batch]:
                        final[index] = item.fail(flush_error)
                else:
                    self._verify_all(final, renamed[batch])
                if not batch.progress.cancelled:
                    batch.results.extend(final)
        finally:
            for batch in batches:
                batch.close()

    def _flush(self, dir_fds: set[int], what: str) -> FileError | None:
        return flush_folders(dir_fds, what) if self.fsync else None

    # -- stage: every file to a temp name next to its destination ------------------------

    def _stage_all(self, requests: Sequence[PutRequest], run_id: str, progress: Progress,
                   dirs: _Dirs, done: list[PutResult | _Staged]) -> None:
        """Stage each request into ``done``, in order, until done or cancelled."""
        fast = self._fast
        group: list[tuple[PutRequest, int, bytes, bytes]] = []
        for request in requests:
            if progress.cancelled:
                return
            if fast is None or request.kind is not Kind.FILE or request.size > FAST_MAX_SIZE:
                if group:
                    self._stage_group(group, progress, done)
                    group = []
                done.append(self._stage(request, run_id, progress, dirs))
                progress.add(files=1)
                continue
            folder = _folder(request, dirs)
            if isinstance(folder, PutResult):
                if group:
                    self._stage_group(group, progress, done)
                    group = []
                done.append(folder)
                progress.add(files=1)
                continue
            group.append((request, folder[0], folder[1], temp_name(run_id)))
            if len(group) >= FAST_GROUP:
                self._stage_group(group, progress, done)
                group = []
        if group and not progress.cancelled:
            self._stage_group(group, progress, done)

    def _stage_group(self, group: list[tuple[PutRequest, int, bytes, bytes]],
                     progress: Progress, done: list[PutResult | _Staged]) -> None:
        """``_stage`` of small regular files whose folders are open, in one C call."""
        assert self._fast is not None
        rows = self._fast.stage(
            [(dir_fd, request.source, tmp, request.size, request.mtime_ns)
             for request, dir_fd, _name, tmp in group],
            self.fsync and _syncfs is None)
        copied = 0
        for (request, dir_fd, name, tmp), (code, err, ino, dev, size, mtime_ns) in zip(
                group, rows, strict=True):
            if code == _STAGED:
                done.append(_Staged(request, dir_fd, name, tmp, (ino, dev, size, mtime_ns)))
                copied += size
            elif code == _VANISHED:
                done.append(PutResult(request, PutStatus.VANISHED))
            elif code == _CHANGED:
                done.append(PutResult(request, PutStatus.CHANGED))
            elif code == _SOURCE_ERROR:
                done.append(PutResult(request, PutStatus.ERROR, error=file_error(
                    os_error(err), "read source", request.source)))
            else:
                done.append(PutResult(request, PutStatus.ERROR, error=file_error(
                    os_error(err), "write", request.dest)))
        progress.add(copied, len(group))

    def _stage(
        self, request: PutRequest, run_id: str, progress: Progress, dirs: _Dirs
    ) -> PutResult | _Staged:
        """Write ``request`` to a temp name next to its destination, mode and times set."""
        folder = _folder(request, dirs)
        if isinstance(folder, PutResult):
            return folder
        dir_fd, name = folder
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
                staged = _Staged(request, dir_fd, name, tmp, _version(before))
                try:
                    _copy_data(src, dst, progress, before.st_size,
                               writeback=self.fsync and before.st_size > CHUNK)
                    os.fchmod(dst, copy_mode(before.st_mode))
                    os.utime(dst, ns=(before.st_atime_ns, before.st_mtime_ns))
                    if self.fsync and _syncfs is None:
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

    # -- commit: rename each durable temp file whose source did not change ---------------

    def _commit_all(self, done: list[PutResult | _Staged], flush_error: FileError | None,
                    progress: Progress) -> list[PutResult] | None:
        """One result per item of ``done``, in order; None when cancelled."""
        fast = self._fast
        outcome: dict[int, PutResult] = {}
        if fast is not None and flush_error is None:
            regular = [item for item in done if isinstance(item, _Staged) and item.target is None]
            for start in range(0, len(regular), FAST_GROUP):
                if progress.cancelled:
                    return None
                chunk = regular[start:start + FAST_GROUP]
                rows = fast.commit([(staged.request.source, staged.dir_fd, staged.tmp,
                                     staged.name, *staged.version) for staged in chunk])
                for staged, (code, err) in zip(chunk, rows, strict=True):
                    outcome[id(staged)] = _committed(staged, code, err)
        final: list[PutResult] = []
        for item in done:
            if progress.cancelled:
                return None
            if not isinstance(item, _Staged):
                final.append(item)
                continue
            result = outcome.get(id(item))
            if result is None:
                result = item.fail(flush_error) if flush_error else self._commit(item)
            final.append(result)
        return final

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
        if _version(current) != item.version:
            return PutResult(request, PutStatus.CHANGED)
        error = rename_into_place(item.tmp, item.name, item.dir_fd, request.dest)
        if error is not None:
            return PutResult(request, PutStatus.ERROR, error=error)
        item.committed = True
        return item.copied()

    # -- verify: each final file against the source version read ------------------------

    def _verify_all(self, final: list[PutResult], renamed: list[tuple[int, _Staged]]) -> None:
        """Replace each renamed file's result by its verification's."""
        if self._fast is not None:
            rows = self._fast.lstat_at([(item.dir_fd, item.name) for _, item in renamed])
            for (index, _item), (err, size, mtime_ns) in zip(renamed, rows, strict=True):
                final[index] = _verified(final[index], err, size, mtime_ns)
            return
        for index, item in renamed:
            try:
                st = os.stat(item.name, dir_fd=item.dir_fd, follow_symlinks=False)
            except OSError as exc:
                final[index] = _verified(final[index], exc.errno or errno.EIO, 0, 0)
            else:
                final[index] = _verified(final[index], 0, st.st_size, st.st_mtime_ns)

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
        staged = _Staged(request, dir_fd, name, tmp, _version(before), target)
        try:
            os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns), dir_fd=dir_fd,
                     follow_symlinks=False)
        except OSError as exc:
            staged.discard()
            return PutResult(request, PutStatus.ERROR,
                             error=file_error(exc, "write link", request.dest))
        return staged


__all__ = ["TEMP_RE", "BatchWriter", "flush_folders", "rename_into_place",
           "temp_name"]
