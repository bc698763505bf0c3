"""Replicas in local folders.

Each batch runs in one call of ``BatchWriter`` (``_local_batch``): in a copy helper process
(``_local_helper``), or in a worker thread, since a thread hand-off costs more than copying
a small file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from contextlib import suppress

import anyio
import structlog

from .._errors import ReplicaUnavailableError
from ._base import MARKER, Progress, PutRequest, PutResult
from ._errors import file_error
from ._local_batch import _DIR_FLAGS, TEMP_RE, BatchWriter
from ._local_helper import CopyHelper
from ._paths import confine
from ._stats import Capabilities, DestStat

log = structlog.get_logger("replicator.transports.local")

# Batches this many files or more go to the copy helper. Its gain is the dozen system calls
# per file that a thread would make under the GIL; a few large files cost a handful of calls,
# and the helper's start (a Python start-up, about 0.05 s of CPU) would only delay them.
HELPER_MIN_FILES = 32


class LocalTransport:
    """A replica root in a local folder. The root must exist: an unmounted disk's empty
    mount point must not silently receive a copy."""

    def __init__(self, root: str, limiter: anyio.CapacityLimiter, fsync: bool = True,
                 helper: bool = True, helper_min_files: int = HELPER_MIN_FILES,
                 helpers: int = 1) -> None:
        """``helper``: copy batches of at least ``helper_min_files`` files in helper
        processes (see ``_local_helper``), up to ``helpers`` of them at once, each started
        when a batch finds the others busy; other batches, or all without it, in worker
        threads."""
        self._helper_min_files = helper_min_files
        self.root = os.fsencode(os.path.abspath(root))
        self._limiter = limiter
        self._fsync = fsync
        self._caps = Capabilities(mtime_precision_ns=1, fsync=fsync)
        self._writer = BatchWriter(self.root, fsync)
        self._helper = helper
        self._helpers: list[CopyHelper] = []
        self._max_helpers = max(1, helpers)

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def transfer(self) -> str:
        """Where batches are copied: "helper" (a helper process) or "threads"."""
        return "helper" if self._helper and self._broken() is None else "threads"

    def _broken(self) -> str | None:
        return next((h.broken for h in self._helpers if h.broken is not None), None)

    def _pick_helper(self) -> CopyHelper | None:
        """An idle copy helper, a new one while there are fewer than the most allowed, else
        the one with the fewest batches waiting; None once one of them broke."""
        if not self._helper or self._broken() is not None:
            return None
        for helper in self._helpers:
            if not helper.busy:
                return helper
        if len(self._helpers) < self._max_helpers:
            self._helpers.append(CopyHelper(self.root, self._fsync))
            return self._helpers[-1]
        return min(self._helpers, key=lambda h: h.queued)

    async def prepare(self) -> None:
        """Start the first copy helper, so that its interpreter starts up (about 0.07 s)
        while the first batch is claimed, not after. Returns once it is spawned.

        The engine prepares a replica only once a copy is due: a run with nothing to copy
        (a no-change re-run) starts no helper. Where a batch came first (its helper may
        still be starting, and busy), that one is the first: no second is started."""
        if self._helpers:
            helper: CopyHelper | None = self._helpers[0]
        else:
            helper = self._pick_helper()
        if helper is not None:
            await helper.start()

    async def probe(self) -> None:
        await anyio.to_thread.run_sync(self._probe, limiter=self._limiter, abandon_on_cancel=True)

    def _probe(self) -> None:
        root = os.fsdecode(self.root)
        try:
            fd = os.open(self.root, _DIR_FLAGS)
        except FileNotFoundError:
            raise ReplicaUnavailableError(f"replica root {root!r} does not exist") from None
        except NotADirectoryError:
            raise ReplicaUnavailableError(f"replica root {root!r} is not a folder") from None
        except OSError as exc:
            raise ReplicaUnavailableError(f"replica root {root!r}: {exc.strerror}") from None
        try:
            name = b".~rep-probe-" + os.urandom(4).hex().encode()
            wfd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                          dir_fd=fd)
            os.close(wfd)
            os.unlink(name, dir_fd=fd)
        except OSError as exc:
            raise ReplicaUnavailableError(
                f"replica root {root!r} is not writable: {exc.strerror}"
            ) from None
        finally:
            os.close(fd)

    async def read_marker(self) -> str | None:
        def run() -> str | None:
            try:
                fd = os.open(os.path.join(self.root, MARKER),
                             os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise ReplicaUnavailableError(f"replica marker: {exc.strerror}") from None
            try:
                return os.read(fd, 4096).decode(errors="replace").strip()
            finally:
                os.close(fd)

        return await anyio.to_thread.run_sync(run, limiter=self._limiter, abandon_on_cancel=True)

    async def write_marker(self, text: str) -> None:
        def run() -> None:
            tmp = os.path.join(self.root, MARKER + b".tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644)
                try:
                    os.write(fd, text.encode() + b"\n")
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, os.path.join(self.root, MARKER))
                root_fd = os.open(self.root, _DIR_FLAGS)
                try:
                    os.fsync(root_fd)
                finally:
                    os.close(root_fd)
            except OSError as exc:
                raise ReplicaUnavailableError(
                    f"cannot write the replica marker: {exc.strerror}") from None

        await anyio.to_thread.run_sync(run, limiter=self._limiter, abandon_on_cancel=True)

    async def stat(self, dest: bytes) -> DestStat | None:
        def run() -> DestStat | None:
            try:
                st = os.stat(os.path.join(self.root, confine(dest)), follow_symlinks=False)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise file_error(exc, "stat", dest) from None
            return DestStat(st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode),
                            stat.S_ISDIR(st.st_mode), stat.S_ISLNK(st.st_mode))

        return await anyio.to_thread.run_sync(run, limiter=self._limiter, abandon_on_cancel=True)

    async def listdir(self, dest: bytes) -> list[bytes]:
        def run() -> list[bytes]:
            try:
                return os.listdir(os.path.join(self.root, confine(dest)) if dest else self.root)
            except OSError as exc:
                raise file_error(exc, "list", dest) from None

        return await anyio.to_thread.run_sync(run, limiter=self._limiter, abandon_on_cancel=True)

    async def remove(self, dest: bytes) -> None:
        def run() -> None:
            try:
                os.unlink(os.path.join(self.root, confine(dest)))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise file_error(exc, "remove", dest) from None

        await anyio.to_thread.run_sync(run, limiter=self._limiter, abandon_on_cancel=True)

    async def remove_stale_temps(self, dirs: Iterable[bytes], run_id: str) -> int:
        wanted = sorted(set(dirs))

        def run() -> int:
            removed = 0
            for reldir in wanted:
                folder = os.path.join(self.root, reldir) if reldir else self.root
                try:
                    names = os.listdir(folder)
                except OSError:
                    continue
                for name in names:
                    match = TEMP_RE.match(name)
                    if match and match.group(1).decode() != run_id:
                        with suppress(FileNotFoundError):
                            os.unlink(os.path.join(folder, name))
                            removed += 1
            return removed

        return await anyio.to_thread.run_sync(run, limiter=self._limiter, abandon_on_cancel=True)

    async def put(
        self, requests: Sequence[PutRequest], run_id: str, progress: Progress
    ) -> list[PutResult]:
        # --- pull mode (issue 3): sources on a remote origin take their own path ----------
        if any(request.remote is not None for request in requests):
            return await self._put_remote(requests, run_id, progress)
        # --- end pull mode ------------------------------------------------------------------
        helper = self._pick_helper() if len(requests) >= self._helper_min_files else None
        if helper is not None and await helper.put(requests, run_id, progress):
            return progress.results
        results = progress.results
        try:
            await anyio.to_thread.run_sync(
                self._writer.put_batch, requests, run_id, progress, results,
                limiter=self._limiter, abandon_on_cancel=True,
            )
        except BaseException:
            # The thread goes on until its next chunk; tell it to stop and clean up.
            progress.cancelled = True
            raise
        return results

    # --- pull mode (issue 3) ----------------------------------------------------------------
    async def _put_remote(
        self, requests: Sequence[PutRequest], run_id: str, progress: Progress
    ) -> list[PutResult]:
        """Copy files of a remote origin (``PutRequest.remote``); see ``_pull``."""
        from ._pull import put_from_source

        return await put_from_source(self.root, self._limiter, self._fsync, requests, run_id,
                                     progress)
    # --- end pull mode ----------------------------------------------------------------------

    async def aclose(self) -> None:
        # Together: each helper takes a few hundredths of a second to exit.
        async with anyio.create_task_group() as tg:
            for helper in self._helpers:
                tg.start_soon(helper.aclose)
