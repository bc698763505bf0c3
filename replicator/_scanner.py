"""The scanner: walks an origin tree and records it in the inventory.

Folders are listed a batch at a time (``_walk.list_folders``): first in a worker thread,
and once the tree proves big, in helper processes, one per core (unless the scan feeds
copies of the new files it finds: the copies need the cores more). Before a folder is listed
its recorded digest is looked up, so an unchanged folder comes back as one small record and
only changed folders are diffed file by file. Listing and diffing overlap through a small
bounded stream, so memory follows the batch, not the size of the tree.
"""

from __future__ import annotations

import marshal
import os
import stat
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import structlog
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from . import _walk
from ._accelerator import accelerator
from ._config import OriginConfig
from ._errors import OriginUnavailableError as OriginUnavailableError
from ._globs import GlobSet
from ._inventory import DirListing, Entry, Inventory, Kind, ListingsDiff, NewFile, ScanDelta

if TYPE_CHECKING:
    from .transports._ssh_source import SshSource

log = structlog.get_logger("replicator.scanner")

# Entries a task aims at: big enough to amortise a hand-off, small enough to keep memory
# flat and the helpers evenly loaded. A task's folder count adapts to the entries met.
TASK_ENTRIES = 4000
TASK_FOLDERS = 512
# Helper processes start once the walk has met this many entries with folders left to list.
# On 2 cores a helper costs about 20 ms to start and saves about 1 s per 300,000 files.
HELPERS_AFTER = 8000
# ...unless the scan feeds copies being made meanwhile and more than this share of the
# entries it met were in new or changed folders: their files are being copied, and the
# copies need the cores (a first run of 20,000 small files took 4% longer with helpers).
HELPERS_MAX_CHANGED = 0.1
MAX_HELPERS = 4

Task = list[tuple[bytes, bytes | None]]
Results = list[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class ScanResult:
    origin: str
    delta: ScanDelta
    seconds: float
    unreadable: tuple[bytes, ...] = ()


class ScanFeed(Protocol):
    """The engine's side of a scan that feeds copies."""

    def copying(self) -> bool:
        """Whether copies of what the scan records are being made meanwhile."""
        ...

    def takers(self, files: int) -> Collection[str]:
        """Replicas that claim the ``files`` new files of the next batch as it is
        recorded."""
        ...

    def recorded(self, delta: ScanDelta, takers: Collection[str],
                 claimed: Sequence[NewFile]) -> None:
        """A batch with new or changed files was recorded; ``claimed``: its new files, claimed
        for ``takers`` (empty when nothing was claimed)."""
        ...


async def record_batch(inventory: Inventory, origin: OriginConfig, replicas: Sequence[str],
                       listings: Sequence[DirListing], now: float,
                       feed: ScanFeed | None) -> ScanDelta:
    """Record a batch of listings, tell ``feed``; the batch's delta."""
    diff = await inventory.diff_listings(origin.name, origin.host, listings, now)
    return await record_diff(inventory, replicas, diff, feed)


async def record_diff(inventory: Inventory, replicas: Sequence[str], diff: ListingsDiff,
                      feed: ScanFeed | None) -> ScanDelta:
    """``record_batch`` once the batch was diffed."""
    takers = feed.takers(len(diff.inserts)) if feed is not None else ()
    delta, claimed = await inventory.record_diff(diff, replicas, takers)
    if feed is not None and (delta.new or delta.changed):
        feed.recorded(delta, takers, claimed)
    return delta


def helper_count() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(MAX_HELPERS, cores or 1) if (cores or 1) > 1 else 0


class _Helper:
    """A helper process running ``_walk.serve``: one task in flight, a frame each way."""

    def __init__(self, process: Process) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self._process = process
        self._stdin = process.stdin
        self._stdout = BufferedByteReceiveStream(process.stdout)

    @classmethod
    async def start(cls, config: tuple[Any, ...]) -> _Helper:
        # Read beside this module: importlib.resources would cost every start its imports.
        source = await anyio.Path(__file__).with_name("_walk.py").read_text("utf-8")
        # -I -S: nothing from the environment or site-packages; the script needs only the
        # standard library. The file system encoding must be the parent's, for the globs.
        argv = [sys.executable, "-I", "-S", "-X", f"utf8={sys.flags.utf8_mode}", "-c", source]
        process = await anyio.open_process(argv, stderr=None)
        helper = cls(process)
        try:
            await helper._stdin.send(_walk.frame(config))
        except BaseException:
            await helper.aclose()
            raise
        return helper

    async def run(self, task: Task) -> Results:
        await self._stdin.send(_walk.frame(task))
        head = await self._stdout.receive_exactly(4)
        data = await self._stdout.receive_exactly(int.from_bytes(head, "big"))
        results: Results = marshal.loads(data)
        return results

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._process.returncode is None:
                self._process.kill()
            with anyio.move_on_after(5):
                await self._process.wait()
            await self._process.aclose()


def _check_root(root: bytes) -> None:
    try:
        st = os.stat(root)
    except OSError as exc:
        raise OriginUnavailableError(
            f"origin root {os.fsdecode(root)!r}: {exc.strerror}"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise OriginUnavailableError(f"origin root {os.fsdecode(root)!r} is not a folder")


class _Walk:
    """The folders still to list, shared by the thread and the helpers."""

    def __init__(self, root: bytes) -> None:
        self.todo: deque[tuple[bytes, bytes | None]] = deque([(root, None)])
        self.busy = 0
        self.helpers = 0  # helpers running; while any is, the thread leaves them the work
        self.entries = 0
        self.changed = 0  # of those, in folders new or changed since the last scan
        self.task_folders = 1
        self.visited: set[bytes] = set()
        self.unreadable: list[bytes] = []
        self._wake = anyio.Event()

    def notify(self) -> None:
        self._wake.set()
        self._wake = anyio.Event()

    async def take(self, helper: bool) -> Task | None:
        """The next task, or None when the walk is over. While helpers run, the thread
        (``helper`` false) waits here and leaves the work to them."""
        while True:
            if self.todo and (helper or not self.helpers):
                break
            if not self.busy and not self.todo:
                return None
            await self._wake.wait()
        size = min(self.task_folders, len(self.todo))
        task = [self.todo.popleft() for _ in range(size)]
        self.busy += 1
        return task

    def done(self, task_size: int, entries: int) -> None:
        """A task of ``task_size`` folders met ``entries`` entries (files and folders)."""
        self.busy -= 1
        self.entries += entries
        # Tasks grow while they are small and shrink when they were big: levels of folders
        # of folders come before folders of many files.
        if entries < TASK_ENTRIES // 2 and task_size >= self.task_folders:
            self.task_folders = min(TASK_FOLDERS, self.task_folders * 2)
        elif entries > TASK_ENTRIES * 2:
            self.task_folders = max(1, self.task_folders * TASK_ENTRIES // entries)
        self.notify()

    def give_back(self, task: Task) -> None:
        self.todo.extendleft(reversed(task))
        self.busy -= 1
        self.notify()


def _listing(result: tuple[Any, ...]) -> DirListing:
    folder, _, _, _, names, modes, sizes, mtimes, targets, unsettled, digest = result
    entries = tuple(
        Entry(name, Kind.FILE if stat.S_ISREG(mode) else Kind.SYMLINK, size, mtime_ns,
              stat.S_IMODE(mode), target)
        for name, mode, size, mtime_ns, target in zip(names, modes, sizes, mtimes, targets,
                                                      strict=True)
    )
    return DirListing(folder, entries, frozenset(unsettled), fingerprint=digest)


class Scanner:
    """Scans one origin into the inventory.

    Cancellation stops between batches; what was recorded stays recorded, and a file is
    only marked deleted after a complete scan.
    """

    def __init__(
        self,
        origin: OriginConfig,
        inventory: Inventory,
        replicas: Sequence[str],
        limiter: anyio.CapacityLimiter,
        feed: ScanFeed | None = None,
        source: SshSource | None = None,
    ) -> None:
        # ``source``: an ssh:// origin's open reader to list through (pull mode); without
        # one, each scan opens its own.
        self._source = source
        self.origin = origin
        self._inventory = inventory
        self._replicas = tuple(replicas)
        self._limiter = limiter
        self._feed = feed

    async def scan(self) -> ScanResult:
        if self.origin.remote:
            from ._remote_scanner import scan_remote  # asyncssh only when an origin needs it

            return await scan_remote(self.origin, self._inventory, self._replicas,
                                     self._feed, self._source)
        started = time.monotonic()
        now = time.time()
        root = os.fsencode(self.origin.path)
        await anyio.to_thread.run_sync(_check_root, root, limiter=self._limiter,
                                       abandon_on_cancel=True)
        fast = accelerator()
        config = (root, int((now - self.origin.settle_seconds) * 1e9),
                  GlobSet.compile(self.origin.include).regex,
                  GlobSet.compile(self.origin.exclude).regex,
                  None if fast is None else fast.__file__)
        rules = _walk.Rules(*config)
        origin, host, inventory = self.origin.name, self.origin.host, self._inventory
        walk = _Walk(root)
        delta = ScanDelta()
        send, receive = anyio.create_memory_object_stream[tuple[list[DirListing], int]](4)
        # Each batch is diffed while the one before is recorded (they hold other folders):
        # reading its rows overlaps the other's write transaction.
        send_diff, receive_diff = anyio.create_memory_object_stream[
            tuple[ListingsDiff | None, int]](1)

        async def handle(results: Results) -> int:
            """Record what a task found; returns the entries it saw."""
            listings: list[DirListing] = []
            same: list[tuple[bytes, bytes]] = []
            counts: dict[bytes, int] = {}
            subfolders: list[bytes] = []
            for result in results:
                folder, status = result[0], result[1]
                if status == _walk.VANISHED:
                    continue  # not visited, so its files are marked deleted
                walk.visited.add(folder)
                if status == _walk.UNREADABLE:
                    log.warning("folder unreadable", folder=os.fsdecode(folder), error=result[2])
                    walk.unreadable.append(folder)
                    listings.append(DirListing(folder, (), complete=False))
                    continue
                subfolders.extend(result[2])
                for path, error in result[3]:
                    log.warning("entry unreadable", path=os.fsdecode(path), error=error)
                if status == _walk.SAME:
                    same.append((folder, result[4]))
                    counts[folder] = result[5]
                else:
                    listings.append(_listing(result))
                    walk.changed += len(result[2]) + len(listings[-1].entries)
            stale = set(await inventory.touch_dirs(origin, host, same, now))
            if subfolders:
                recorded = await inventory.fingerprints(origin, host, subfolders)
                walk.todo.extend((d, recorded.get(d)) for d in subfolders)
            # Diffed by another scan since its digest was read: list it again, in full.
            walk.todo.extend((d, None) for d in stale)
            unchanged = sum(n for d, n in counts.items() if d not in stale)
            await send.send((listings, unchanged))
            return unchanged + sum(len(lst.entries) for lst in listings) + len(subfolders)

        async def work(run: Callable[[Task], Awaitable[Results]], helper: bool) -> None:
            while (task := await walk.take(helper)) is not None:
                try:
                    results = await run(task)
                except BaseException:
                    walk.give_back(task)
                    raise
                walk.done(len(task), await handle(results))
                if not helper and not started_helpers and walk.todo \
                        and walk.entries >= HELPERS_AFTER and not copies_busy():
                    started_helpers.append(True)
                    for _ in range(helper_count()):
                        walkers.start_soon(helper_work)

        async def in_thread(task: Task) -> Results:
            return await anyio.to_thread.run_sync(_walk.list_folders, task, rules,
                                                  limiter=self._limiter,
                                                  abandon_on_cancel=True)

        async def helper_work() -> None:
            try:
                helper = await _Helper.start(config)
            except (OSError, anyio.BrokenResourceError) as exc:
                log.warning("scan helper did not start", error=repr(exc))
                return
            walk.helpers += 1
            try:
                await work(helper.run, True)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
                    OSError, EOFError, ValueError) as exc:
                # Its task went back on the list; the others (or the thread) carry on.
                log.warning("scan helper lost", error=repr(exc))
            finally:
                walk.helpers -= 1
                walk.notify()
                await helper.aclose()

        def copies_busy() -> bool:
            return self._feed is not None and self._feed.copying() \
                and walk.changed > HELPERS_MAX_CHANGED * walk.entries

        started_helpers: list[bool] = []

        async def walk_all() -> None:
            async with send:
                await work(in_thread, False)

        async def diff_all() -> None:
            async with receive, send_diff:
                async for listings, unchanged in receive:
                    diff = await inventory.diff_listings(origin, host, listings, now) \
                        if listings else None
                    await send_diff.send((diff, unchanged))

        async with anyio.create_task_group() as walkers:
            walkers.start_soon(walk_all)
            walkers.start_soon(diff_all)
            async with receive_diff:
                async for diff, unchanged in receive_diff:
                    delta += ScanDelta(unchanged=unchanged)
                    if diff is not None:
                        delta += await record_diff(inventory, self._replicas, diff,
                                                   self._feed)
        deleted = await self._inventory.mark_missing_dirs(
            self.origin.name, self.origin.host, walk.visited, now, walk.unreadable
        )
        delta += ScanDelta(deleted=deleted)
        result = ScanResult(self.origin.name, delta, time.monotonic() - started,
                            tuple(walk.unreadable))
        log.info("scan finished", origin=self.origin.name, new=delta.new, changed=delta.changed,
                 deleted=delta.deleted, unchanged=delta.unchanged,
                 seconds=round(result.seconds, 3))
        return result
