"""Pull mode: copying files of a remote origin (a ``Source``, e.g. SFTP) into a local replica.

The same guarantees as local copies: every file is written to a temp name in its destination
folder (local writes in worker threads, never on the event loop), given the source's mode
and mtime, its source checked unchanged after the read (size, mtime at the source's
precision, kind), the batch made durable (one flush per filesystem), renamed into place,
the renames flushed, and verified. Results are reported only once durable.

An origin that cannot be reached releases the batch's remaining files uncharged
(``SOURCE_UNAVAILABLE``); a read failing mid-file is a per-file (transient) error.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass

import anyio
import structlog

from .._errors import FileError, OriginUnavailableError
from .._inventory import Kind
from ._base import Progress, PutRequest, PutResult, PutStatus, Source, SourceReader
from ._errors import file_error
from ._local_batch import _DIR_FLAGS, _Dirs, _syncfs, flush_folders, rename_into_place, temp_name
from ._paths import confine, copy_mode
from ._stats import SourceStat

log = structlog.get_logger("replicator.transports.pull")

# Files of one batch read at once: per-file round trips dominate small files.
FILES_IN_FLIGHT = 4
# Files up to this size are read whole and written in one worker-thread call.
SMALL_FILE = 1 << 20


@dataclass(slots=True)
class _Staged:
    """A temp file written next to its destination, waiting for flush and rename."""

    request: PutRequest
    dir_fd: int
    name: bytes
    tmp: bytes
    version: SourceStat
    committed: bool = False


class _Batch:
    """The local side of one batch; every method runs in a worker thread."""

    def __init__(self, root: bytes, fsync: bool) -> None:
        self.root = root
        self.fsync = fsync
        self.root_fd = -1
        self.dirs: _Dirs | None = None

    def open(self) -> None:
        self.root_fd = os.open(self.root, _DIR_FLAGS)
        self.dirs = _Dirs(self.root_fd)

    def folder(self, dest: bytes) -> tuple[int, bytes]:
        assert self.dirs is not None
        reldir, name = os.path.split(confine(dest))
        try:
            return self.dirs.open(reldir, create=True), name
        except OSError as exc:
            raise file_error(exc, "mkdir", reldir) from None

    def create(self, dest: bytes, run_id: str) -> tuple[int, bytes, int]:
        """(folder fd, temp name, temp fd) of a new temp file next to ``dest``."""
        dir_fd, _ = self.folder(dest)
        tmp = temp_name(run_id)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600, dir_fd=dir_fd)
        except OSError as exc:
            raise file_error(exc, "write", dest) from None
        return dir_fd, tmp, fd

    def write(self, fd: int, data: bytes, dest: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            raise file_error(exc, "write", dest) from None

    def finish(self, fd: int, version: SourceStat, dest: bytes) -> None:
        """Mode and mtime of the source version, then close (flushed per batch later)."""
        try:
            os.fchmod(fd, copy_mode(version.mode))
            os.utime(fd, ns=(version.mtime_ns, version.mtime_ns))
            if self.fsync and _syncfs is None:
                os.fsync(fd)
        except OSError as exc:
            raise file_error(exc, "write", dest) from None
        finally:
            os.close(fd)

    def whole(self, dest: bytes, run_id: str, data: bytes, version: SourceStat
              ) -> tuple[int, bytes]:
        """A small file in one call: create, write, mode and mtime; (folder fd, temp name)."""
        dir_fd, tmp, fd = self.create(dest, run_id)
        try:
            try:
                self.write(fd, data, dest)
            except BaseException:
                os.close(fd)
                raise
            self.finish(fd, version, dest)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        return dir_fd, tmp

    def link(self, dest: bytes, run_id: str, version: SourceStat) -> tuple[int, bytes]:
        dir_fd, _ = self.folder(dest)
        tmp = temp_name(run_id)
        assert version.target is not None
        try:
            os.symlink(version.target, tmp, dir_fd=dir_fd)
        except OSError as exc:
            raise file_error(exc, "write link", dest) from None
        try:
            os.utime(tmp, ns=(version.mtime_ns, version.mtime_ns), dir_fd=dir_fd,
                     follow_symlinks=False)
        except OSError as exc:
            with suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise file_error(exc, "write link", dest) from None
        return dir_fd, tmp

    def flush(self, dir_fds: set[int], what: str) -> FileError | None:
        return flush_folders(dir_fds, what) if self.fsync else None

    def commit(self, staged: list[_Staged]) -> list[PutResult]:
        """Flush, rename, flush the renames, verify: results of durable copies only."""
        assert self.dirs is not None
        error = self.flush({s.dir_fd for s in staged}, "write")
        results: list[PutResult] = []
        renamed: list[_Staged] = []
        for item in staged:
            req = item.request
            if error is not None:
                results.append(PutResult(req, PutStatus.ERROR, error=error))
                continue
            failure = rename_into_place(item.tmp, item.name, item.dir_fd, req.dest)
            if failure is not None:
                results.append(PutResult(req, PutStatus.ERROR, error=failure))
                continue
            item.committed = True
            renamed.append(item)
            results.append(PutResult(req, PutStatus.COPIED, item.version.size,
                                     item.version.mtime_ns))
        error = self.flush({s.dir_fd for s in renamed} | self.dirs.touched_fds(), "rename")
        by_request = {id(s.request): s for s in renamed}
        for index, result in enumerate(results):
            if result.status is PutStatus.COPIED:
                item = by_request[id(result.request)]
                results[index] = (PutResult(result.request, PutStatus.ERROR, error=error)
                                  if error is not None else self._verify(result, item))
        return results

    def _verify(self, result: PutResult, item: _Staged) -> PutResult:
        req = result.request
        try:
            st = os.stat(item.name, dir_fd=item.dir_fd, follow_symlinks=False)
        except OSError as exc:
            return PutResult(req, PutStatus.ERROR, error=file_error(exc, "verify", req.dest))
        link = req.kind is Kind.SYMLINK
        if (stat.S_ISLNK(st.st_mode) != link or (not link and st.st_size != result.size)
                or st.st_mtime_ns != result.mtime_ns):
            return PutResult(req, PutStatus.ERROR, error=FileError(
                f"verification failed for {os.fsdecode(req.dest)!r}: size/mtime"
                f" {st.st_size}/{st.st_mtime_ns}, expected {result.size}/{result.mtime_ns}"))
        return result

    def discard(self, staged: Sequence[_Staged], loose: Sequence[tuple[int, bytes]]) -> None:
        """Remove temp files not renamed into place, close folders."""
        for item in staged:
            if not item.committed:
                with suppress(OSError):
                    os.unlink(item.tmp, dir_fd=item.dir_fd)
        for dir_fd, tmp in loose:
            with suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
        if self.dirs is not None:
            self.dirs.close()
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1


class _Pull:
    """One batch of requests from one remote source into a local replica root."""

    def __init__(self, root: bytes, limiter: anyio.CapacityLimiter, fsync: bool,
                 run_id: str, progress: Progress) -> None:
        self._batch = _Batch(root, fsync)
        self._limiter = limiter
        self._run_id = run_id
        self._progress = progress
        self._staged: list[_Staged] = []
        self._loose: list[tuple[int, bytes]] = []  # temp files being written
        self._unavailable: str | None = None

    async def run(self, requests: Sequence[PutRequest]) -> list[PutResult]:
        results: list[PutResult | None] = [None] * len(requests)
        try:
            await anyio.to_thread.run_sync(self._batch.open, limiter=self._limiter)
        except OSError as exc:
            error = FileError(f"replica root: {exc.strerror}")
            return [PutResult(r, PutStatus.ERROR, error=error) for r in requests]
        try:
            queue = iter(enumerate(requests))

            async def worker() -> None:
                for index, request in queue:
                    if self._progress.cancelled:
                        return
                    results[index] = await self._one(request)
                    self._progress.add(files=1)

            async with anyio.create_task_group() as tg:
                for _ in range(min(FILES_IN_FLIGHT, len(requests))):
                    tg.start_soon(worker)
            by_request = {id(s.request): i for i, s in enumerate(self._staged)}
            committed = await anyio.to_thread.run_sync(self._batch.commit, self._staged,
                                                        limiter=self._limiter)
            for index, request in enumerate(requests):
                where = by_request.get(id(request))
                if where is not None:
                    results[index] = committed[where]
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._batch.discard, self._staged, self._loose,
                                               limiter=self._limiter)
        return [r if r is not None else PutResult(req, PutStatus.NOT_STARTED)
                for r, req in zip(results, requests, strict=True)]

    async def _one(self, req: PutRequest) -> PutResult | None:
        """Stage one file; a result now if it will not be renamed (None: staged)."""
        if self._unavailable is not None:
            return PutResult(req, PutStatus.SOURCE_UNAVAILABLE,
                             error=FileError(self._unavailable))
        assert req.remote is not None
        try:
            if req.kind is Kind.SYMLINK:
                return await self._link(req, req.remote)
            return await self._file(req, req.remote)
        except OriginUnavailableError as exc:
            self._unavailable = str(exc)
            return PutResult(req, PutStatus.SOURCE_UNAVAILABLE, error=FileError(str(exc)))
        except FileError as exc:
            return PutResult(req, PutStatus.ERROR, error=exc)

    async def _link(self, req: PutRequest, remote: Source) -> PutResult | None:
        version = await remote.lstat(req.source)
        if version is None:
            return PutResult(req, PutStatus.VANISHED)
        if not req.expects(version):
            return PutResult(req, PutStatus.CHANGED)
        dir_fd, tmp = await anyio.to_thread.run_sync(self._batch.link, req.dest, self._run_id,
                                                     version, limiter=self._limiter)
        self._staged.append(_Staged(req, dir_fd, os.path.basename(req.dest), tmp, version))
        return None

    async def _file(self, req: PutRequest, remote: Source) -> PutResult | None:
        reader = await remote.open(req.source)
        if reader is None:
            return PutResult(req, PutStatus.VANISHED)
        try:
            version = reader.stat
            if not req.expects(version):
                return PutResult(req, PutStatus.CHANGED)
            if version.size <= SMALL_FILE:
                chunks = []
                while data := await reader.read(self._progress):
                    chunks.append(data)
                if not await self._unchanged(req, remote, reader, version):
                    return PutResult(req, PutStatus.CHANGED)
                dir_fd, tmp = await anyio.to_thread.run_sync(
                    self._batch.whole, req.dest, self._run_id, b"".join(chunks), version,
                    limiter=self._limiter)
                self._staged.append(_Staged(req, dir_fd, os.path.basename(req.dest), tmp,
                                            version))
                return None
            return await self._stream(req, remote, reader, version)
        finally:
            await reader.aclose()

    async def _stream(self, req: PutRequest, remote: Source, reader: SourceReader,
                      version: SourceStat) -> PutResult | None:
        """A large file: each block is written in a worker thread while the next arrives."""
        dir_fd, tmp, fd = await anyio.to_thread.run_sync(
            self._batch.create, req.dest, self._run_id, limiter=self._limiter)
        loose = (dir_fd, tmp)
        self._loose.append(loose)
        open_fd = True
        try:
            data = await reader.read(self._progress)
            while data:
                failed: list[BaseException] = []
                following: list[bytes] = []

                async def write(data: bytes = data, failed: list[BaseException] = failed
                                ) -> None:
                    # Not abandoned on cancellation: one bounded local write, on an fd that
                    # must stay open until it returns.
                    try:
                        await anyio.to_thread.run_sync(self._batch.write, fd, data, req.dest,
                                                       limiter=self._limiter)
                    except FileError as exc:
                        failed.append(exc)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(write)
                    try:
                        following.append(await reader.read(self._progress))
                    except (FileError, OriginUnavailableError) as exc:
                        failed.append(exc)
                if failed:
                    raise failed[0]
                data = following[0]
            if not await self._unchanged(req, remote, reader, version):
                return PutResult(req, PutStatus.CHANGED)
            open_fd = False
            await anyio.to_thread.run_sync(self._batch.finish, fd, version, req.dest,
                                           limiter=self._limiter)
        finally:
            if open_fd:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(os.close, fd, limiter=self._limiter)
        self._loose.remove(loose)
        self._staged.append(_Staged(req, dir_fd, os.path.basename(req.dest), tmp, version))
        return None

    async def _unchanged(self, req: PutRequest, remote: Source, reader: SourceReader,
                         version: SourceStat) -> bool:
        """The open file and the path still show the version read (at the source's
        precision): otherwise the copy may mix two versions."""
        return version.same_version(await reader.fstat()) and version.same_version(
            await remote.lstat(req.source))


async def put_from_source(root: bytes, limiter: anyio.CapacityLimiter, fsync: bool,
                          requests: Sequence[PutRequest], run_id: str, progress: Progress
                          ) -> list[PutResult]:
    """Copy a batch whose sources are on a remote origin into the local folder ``root``.

    One result per request, in order, also appended to ``progress.results`` once durable.
    Cancellation abandons the batch: temp files are removed, nothing partial is renamed.
    """
    try:
        results = await _Pull(root, limiter, fsync, run_id, progress).run(requests)
    except BaseException:
        progress.cancelled = True
        raise
    if not progress.cancelled:
        progress.results.extend(results)
    return results


__all__ = ["put_from_source"]
