"""Scanning an origin on an SSH host (pull mode) into the same folder listings as the local
walker: include/exclude, settle time, vanished and unreadable folders behave alike.

The listing comes from one remote ``find`` stream where the server runs commands, else from
SFTP ``readdir`` with several folders in flight. Both give whole-second mtimes (see
``transports._ssh_source``), so the method may change between scans without files looking
changed.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING

import anyio
import structlog

from ._config import OriginConfig
from ._errors import FileError, OriginUnavailableError
from ._globs import GlobSet
from ._inventory import DirListing, Entry, Inventory, Kind, ScanDelta
from .transports._ssh_source import FOLDERS_IN_FLIGHT, RemoteEntry, SshSource

if TYPE_CHECKING:
    from ._scanner import ScanFeed, ScanResult

log = structlog.get_logger("replicator.scanner")

BATCH_ENTRIES = 4000


class RemoteWalker:
    """Lists a remote tree in batches of folders.

    ``complete`` turns false when the listing may have missed entries (a failed ``find``):
    the caller must then not take missing folders as deleted.
    """

    def __init__(self, origin: OriginConfig, source: SshSource, now: float) -> None:
        self.source = source
        self.root = os.fsencode(origin.root).rstrip(b"/") or b"/"
        self._include = GlobSet.compile(origin.include)
        self._exclude = GlobSet.compile(origin.exclude)
        self._settle_ns = int((now - origin.settle_seconds) * 1e9)
        self.visited: set[bytes] = set()
        self.unreadable: list[bytes] = []
        self.complete = True
        self.method = "sftp"
        self._excluded: dict[bytes, bool] = {self.root: False}

    def _rel(self, path: bytes) -> str:
        return os.fsdecode(path[len(self.root) + 1:])

    def _excluded_dir(self, folder: bytes) -> bool:
        """Whether a folder, or one above it, is excluded (find lists them all)."""
        known = self._excluded.get(folder)
        if known is None:
            parent = os.path.dirname(folder)
            known = (parent != folder and self._excluded_dir(parent)) or bool(
                self._exclude and self._exclude(self._rel(folder)))
            self._excluded[folder] = known
        return known

    def _listing(self, folder: bytes, items: Sequence[RemoteEntry] | None,
                 subfolders: list[bytes] | None) -> DirListing:
        """Filter one folder's entries like the local walker; collect subfolders to visit."""
        self.visited.add(folder)
        if items is None:
            self.unreadable.append(folder)
            return DirListing(folder, (), complete=False)
        entries: list[Entry] = []
        unsettled: set[bytes] = set()
        for item in items:
            path = folder.rstrip(b"/") + b"/" + item.name
            rel = self._rel(path)
            if item.kind == "d":
                if subfolders is not None and not (self._exclude and self._exclude(rel)):
                    subfolders.append(path)
                continue
            if item.kind == "?":
                unsettled.add(item.name)  # exists but cannot be examined: keep what we know
                continue
            if self._exclude and self._exclude(rel):
                continue
            if self._include and not self._include(rel):
                continue
            if item.kind == "f":
                kind = Kind.FILE
            elif item.kind == "l" and item.target is not None:
                kind = Kind.SYMLINK
            else:
                continue  # sockets, fifos, devices are not data
            if item.mtime_ns > self._settle_ns:
                unsettled.add(item.name)
                continue
            entries.append(Entry(item.name, kind, item.size, item.mtime_ns, item.mode,
                                 item.target if kind is Kind.SYMLINK else None))
        return DirListing(folder, tuple(entries), frozenset(unsettled))

    async def batches(self) -> AsyncGenerator[list[DirListing], None]:
        """Batches of folder listings, the whole tree once."""
        await self.source.check_root()
        if await self.source.can_run_find():
            self.method = "find"
            try:
                async with aclosing(self._find_batches()) as batches:
                    async for batch in batches:
                        yield batch
                return
            except FileError as exc:
                # What was listed is recorded; a missing folder is not taken as deleted.
                log.warning("remote find failed; this scan deletes nothing, the next one"
                            " lists over SFTP", origin=self.source.where, error=str(exc))
                self.complete = False
                self.source.disable_find()
                return
        async with aclosing(self._sftp_batches()) as batches:
            async for batch in batches:
                yield batch

    async def _find_batches(self) -> AsyncGenerator[list[DirListing], None]:
        batch: list[DirListing] = []
        budget = BATCH_ENTRIES
        async with aclosing(self.source.find_tree()) as folders:
            try:
                async for folder in folders:
                    if self._excluded_dir(folder.path):
                        continue
                    if folder.entries is None:
                        log.warning("folder unreadable", folder=os.fsdecode(folder.path))
                    listing = self._listing(folder.path, folder.entries, None)
                    batch.append(listing)
                    budget -= len(listing.entries) + 1
                    if budget <= 0:
                        yield batch
                        batch, budget = [], BATCH_ENTRIES
            except FileError:
                # A folder arrives once complete: those before the failure are recorded.
                if batch:
                    yield batch
                raise
        if batch:
            yield batch

    async def _sftp_batches(self) -> AsyncGenerator[list[DirListing], None]:
        todo = [self.root]
        batch: list[DirListing] = []
        budget = BATCH_ENTRIES
        while todo:
            wave, todo = todo[:FOLDERS_IN_FLIGHT], todo[FOLDERS_IN_FLIGHT:]
            found: dict[bytes, list[RemoteEntry] | FileError | None] = {}
            lost: list[OriginUnavailableError] = []

            async def list_one(folder: bytes, found: dict[bytes, list[RemoteEntry] | FileError
                                                      | None] = found,
                               lost: list[OriginUnavailableError] = lost) -> None:
                try:
                    found[folder] = await self.source.list_folder(folder)
                except FileError as exc:
                    found[folder] = exc
                except OriginUnavailableError as exc:
                    lost.append(exc)

            async with anyio.create_task_group() as tg:
                for folder in wave:
                    tg.start_soon(list_one, folder)
            if lost:
                raise lost[0]
            subfolders: list[bytes] = []
            for folder in wave:
                result = found[folder]
                if result is None:
                    continue  # vanished mid-scan: not visited, so its files are deleted
                if isinstance(result, FileError):
                    log.warning("folder unreadable", folder=os.fsdecode(folder),
                                error=str(result))
                    result = None
                listing = self._listing(folder, result, subfolders)
                batch.append(listing)
                budget -= len(listing.entries) + 1
            todo = subfolders + todo  # depth first keeps the queue short
            if budget <= 0 or not todo:
                if batch:
                    yield batch
                batch, budget = [], BATCH_ENTRIES


async def scan_remote(
    origin: OriginConfig,
    inventory: Inventory,
    replicas: Sequence[str],
    feed: ScanFeed | None,
    source: SshSource | None,
) -> ScanResult:
    """Scan an ssh:// origin into the inventory (``Scanner.scan`` for remote origins).

    OriginUnavailableError when the host or the root cannot be reached: nothing is marked
    deleted. Cancellation stops between batches.
    """
    from ._scanner import ScanResult, record_batch

    started = time.monotonic()
    now = time.time()
    own = source is None
    source = source or SshSource.from_config(origin)
    walker = RemoteWalker(origin, source, now)
    delta = ScanDelta()
    try:
        async with aclosing(walker.batches()) as batches:
            async for listings in batches:
                delta += await record_batch(inventory, origin, replicas, listings, now, feed)
    finally:
        if own:
            await source.aclose()
    if walker.complete:
        delta += ScanDelta(deleted=await inventory.mark_missing_dirs(
            origin.name, origin.host, walker.visited, now, walker.unreadable))
    result = ScanResult(origin.name, delta, time.monotonic() - started,
                        tuple(walker.unreadable))
    log.info("scan finished", origin=origin.name, method=walker.method, new=delta.new,
             changed=delta.changed, deleted=delta.deleted, unchanged=delta.unchanged,
             seconds=round(result.seconds, 3))
    return result
