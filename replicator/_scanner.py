"""The scanner: walks an origin tree in worker threads and records it in the inventory.

Each thread hand-off lists a batch of folders (os.scandir + lstat), so the event loop sees a
few large results instead of one call per file. The inventory is diffed one batch at a time,
so memory follows the batch, not the size of the tree.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import structlog

from ._config import OriginConfig
from ._errors import OriginUnavailableError as OriginUnavailableError
from ._globs import GlobSet
from ._inventory import DirListing, Entry, Inventory, Kind, ScanDelta

if TYPE_CHECKING:
    from .transports._ssh_source import SshSource

log = structlog.get_logger("replicator.scanner")

# Entries per thread hand-off: big enough to amortise the hand-off, small enough to keep the
# loop responsive and memory flat.
BATCH_ENTRIES = 4000


@dataclass(frozen=True, slots=True)
class ScanResult:
    origin: str
    delta: ScanDelta
    seconds: float
    unreadable: tuple[bytes, ...] = ()


def _fingerprint(entries: list[Entry]) -> bytes:
    """A digest of a folder's settled entries, independent of the listing order."""
    digest = hashlib.blake2b(digest_size=16)
    for e in sorted(entries, key=lambda e: e.name):
        digest.update(b"%b\0%d %d %d %d\0%b\0" % (e.name, e.kind, e.size, e.mtime_ns, e.mode,
                                                   e.target or b""))
    return digest.digest()


class _Walker:
    """Blocking tree walk, one batch of folders per call, from worker threads."""

    def __init__(self, origin: OriginConfig, now: float) -> None:
        self.root = os.fsencode(origin.path)
        self._skip = len(self.root.rstrip(b"/")) + 1
        self._include = GlobSet.compile(origin.include)
        self._exclude = GlobSet.compile(origin.exclude)
        self._filtered = bool(self._include or self._exclude)
        self._settle_ns = int((now - origin.settle_seconds) * 1e9)
        self.todo: deque[bytes] = deque([self.root])
        self.visited: set[bytes] = set()
        self.unreadable: list[bytes] = []

    def _rel(self, path: bytes) -> str:
        return os.fsdecode(path[self._skip :])

    def check_root(self) -> None:
        try:
            st = os.stat(self.root)
        except OSError as exc:
            raise OriginUnavailableError(
                f"origin root {os.fsdecode(self.root)!r}: {exc.strerror}"
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise OriginUnavailableError(f"origin root {os.fsdecode(self.root)!r} is not a folder")

    def next_batch(self) -> list[DirListing]:
        listings: list[DirListing] = []
        budget = BATCH_ENTRIES
        while self.todo and budget > 0:
            folder = self.todo.popleft()
            listing = self._list(folder)
            if listing is not None:
                listings.append(listing)
                budget -= len(listing.entries) + 1
        return listings

    def _list(self, folder: bytes) -> DirListing | None:
        entries: list[Entry] = []
        unsettled: set[bytes] = set()
        try:
            with os.scandir(folder) as it:
                items = list(it)
        except FileNotFoundError:
            return None  # vanished mid-scan: not visited, so its files are marked deleted
        except OSError as exc:
            log.warning("folder unreadable", folder=os.fsdecode(folder), error=exc.strerror)
            self.visited.add(folder)
            self.unreadable.append(folder)
            return DirListing(folder, (), complete=False)
        self.visited.add(folder)
        for item in items:
            try:
                st = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                # Exists but cannot be examined: keep what the inventory knows of it.
                log.warning("entry unreadable", path=os.fsdecode(item.path), error=exc.strerror)
                unsettled.add(item.name)
                continue
            if stat.S_ISDIR(st.st_mode):
                if not (self._exclude and self._exclude(self._rel(item.path))):
                    self.todo.append(item.path)
                continue
            if self._filtered:
                rel = self._rel(item.path)
                if self._exclude and self._exclude(rel):
                    continue
                if self._include and not self._include(rel):
                    continue
            if stat.S_ISREG(st.st_mode):
                kind, target = Kind.FILE, None
            elif stat.S_ISLNK(st.st_mode):
                kind = Kind.SYMLINK
                try:
                    target = os.readlink(item.path)
                except OSError:
                    continue
            else:
                continue  # sockets, fifos, devices are not data
            if st.st_mtime_ns > self._settle_ns:
                unsettled.add(item.name)  # still being written
                continue
            entries.append(
                Entry(item.name, kind, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode),
                      target)
            )
        return DirListing(folder, tuple(entries), frozenset(unsettled),
                          fingerprint=None if unsettled else _fingerprint(entries))


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
        on_batch: Callable[[ScanDelta], None] | None = None,
        source: SshSource | None = None,
    ) -> None:
        # ``source``: an ssh:// origin's open reader to list through (pull mode); without
        # one, each scan opens its own.
        self._source = source
        self.origin = origin
        self._inventory = inventory
        self._replicas = tuple(replicas)
        self._limiter = limiter
        self._on_batch = on_batch

    async def scan(self) -> ScanResult:
        if self.origin.remote:
            from ._remote_scanner import scan_remote  # asyncssh only when an origin needs it

            return await scan_remote(self.origin, self._inventory, self._replicas,
                                     self._on_batch, self._source)
        started = time.monotonic()
        now = time.time()
        walker = _Walker(self.origin, now)
        await anyio.to_thread.run_sync(walker.check_root, limiter=self._limiter,
                                       abandon_on_cancel=True)
        delta = ScanDelta()
        # Walking (a worker thread) and diffing (SQLite's thread) overlap: the walker runs one
        # batch ahead, through a small bounded stream.
        send, receive = anyio.create_memory_object_stream[list[DirListing]](1)

        async def walk() -> None:
            async with send:
                while walker.todo:
                    listings = await anyio.to_thread.run_sync(
                        walker.next_batch, limiter=self._limiter, abandon_on_cancel=True
                    )
                    await send.send(listings)

        async with anyio.create_task_group() as tg:
            tg.start_soon(walk)
            async with receive:
                async for listings in receive:
                    batch = await self._inventory.apply_listings(
                        self.origin.name, self.origin.host, self._replicas, listings, now
                    )
                    delta += batch
                    if self._on_batch is not None and (batch.new or batch.changed):
                        self._on_batch(batch)
        deleted = await self._inventory.mark_missing_dirs(
            self.origin.name, self.origin.host, walker.visited, now, walker.unreadable
        )
        delta += ScanDelta(deleted=deleted)
        result = ScanResult(self.origin.name, delta, time.monotonic() - started,
                            tuple(walker.unreadable))
        log.info("scan finished", origin=self.origin.name, new=delta.new, changed=delta.changed,
                 deleted=delta.deleted, unchanged=delta.unchanged,
                 seconds=round(result.seconds, 3))
        return result
