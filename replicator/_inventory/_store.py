"""The inventory: origin files, replicas and the copy of each file on each replica.

One SQLite file in WAL mode. All writes of one process go through one connection and one
lock, in short transactions that never span network or file I/O; a second connection reads.
``busy_timeout`` lets CLI commands write while an engine runs in another process.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self, TypeVar

import aiosqlite
import anyio

from .._errors import InventoryError
from ._schema import migrate
from ._types import (
    CopyState,
    DirListing,
    FailedCopy,
    Kind,
    ListingsDiff,
    NewFile,
    OriginStats,
    Outcome,
    OutcomeKind,
    ReplicaStats,
    ScanDelta,
    Work,
    join_path,
)

_T = TypeVar("_T")

BUSY_TIMEOUT_MS = 30_000
WAL_CHECKPOINT_PAGES = 10_000
# SQLite limits host parameters per statement; folder batches stay well below it.
_MAX_PARAMS = 900

# The condition of the partial index copies_open (see _schema), as a query must name it.
_OPEN = "(state = 'copying' OR state = 'failed' OR state = 'ignored')"

_DUE_COLUMNS = (
    "f.id, f.origin, f.host, f.dir, f.name, f.kind, f.size, f.mtime_ns, f.mode, f.target,"
    " c.attempts"
)

# With ?4 = the start of a one-shot run: copies that got a non-transient error in this run
# (their next attempt is set after it started) wait for the next run.
_NOT_RETRIED_THIS_RUN = (
    "(?4 IS NULL OR c.error_class IS NULL OR c.error_class = 'transient'"
    " OR c.next_attempt <= ?4)"
)


def _chunks(items: Sequence[_T], size: int) -> Iterable[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _transaction(db: aiosqlite.Connection, work: Callable[[sqlite3.Connection], _T]) -> _T:
    """``Inventory._write_in_thread``'s part in the connection's thread."""
    conn: sqlite3.Connection = db._conn  # (aiosqlite's own, in its own thread)
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _insert_rows(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]]) -> None:
    """``head`` (``INSERT ... VALUES ``) for each row, many rows per statement.

    ``executemany`` steps its statement once per row, and each step gives up the GIL and
    takes it back: with the event loop's thread busy, every row of a scan batch then
    waited its turn. A statement of many rows binds them in one call and runs in one step:
    17% less CPU for 20,000 new files (their copies included), and one GIL hand-off per
    81 rows instead of one per row.
    """
    if not rows:
        return
    width = len(rows[0])
    per = max(1, _MAX_PARAMS // width)
    one = "(" + ",".join("?" * width) + ")"
    full = head + ",".join([one] * per)
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        sql = full if len(chunk) == per else head + ",".join([one] * len(chunk))
        conn.execute(sql, list(itertools.chain.from_iterable(chunk)))


def _next_file_id(conn: sqlite3.Connection) -> int:
    """The id the next file inserted gets, while there are ids left above the largest
    (SQLite then picks free ones at random; this is then past the largest id)."""
    row = conn.execute("SELECT COALESCE(MAX(id), 0) FROM files").fetchone()
    return int(row[0]) + 1


def _reopen_copies(conn: sqlite3.Connection, file_ids: Sequence[int],
                   replicas: Sequence[str]) -> None:
    """Make the copies of changed files pending again, with a fresh attempt budget.

    A copy being transferred is left alone: its result is checked against the new
    version when it arrives. Ignored copies stay ignored. A replica that already holds
    this exact version (a file that came back) stays replicated.
    """
    conn.executemany(
        "UPDATE copies SET state = 'pending', attempts = 0, next_attempt = 0,"
        " error_class = NULL, error = NULL,"
        " src_mtime_ns = (SELECT mtime_ns FROM files WHERE id = copies.file_id)"
        " WHERE file_id = ? AND state NOT IN ('copying', 'ignored')"
        " AND NOT (state = 'replicated' AND (size, mtime_ns) IS"
        " (SELECT size, mtime_ns FROM files WHERE id = copies.file_id))",
        [(file_id,) for file_id in file_ids],
    )
    for replica in replicas:
        conn.executemany(
            "INSERT OR IGNORE INTO copies (replica, file_id, state, src_mtime_ns)"
            " SELECT ?, id, 'pending', mtime_ns FROM files WHERE id = ?",
            [(replica, file_id) for file_id in file_ids],
        )


def _mark_deleted(conn: sqlite3.Connection, file_ids: Sequence[int], now: float) -> None:
    for chunk in _chunks(file_ids, _MAX_PARAMS):
        marks = ",".join("?" * len(chunk))
        conn.execute(f"UPDATE files SET deleted = ? WHERE id IN ({marks})", (now, *chunk))
        # Dropped, not failed: there is nothing left to copy. Copies already made stay.
        conn.execute(
            f"DELETE FROM copies WHERE file_id IN ({marks}) AND state IN ('pending', 'failed')",
            tuple(chunk),
        )


async def _connect(path: Path) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path, isolation_level=None)
    await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    await db.execute("PRAGMA journal_mode = WAL")
    # NORMAL is durable across process crashes in WAL mode; a power cut may lose the last
    # commits, which only makes files pending again (copies are idempotent).
    await db.execute("PRAGMA synchronous = NORMAL")
    # Checkpoints every 10,000 pages (40 MiB of log), not SQLite's 1,000: a first run of
    # 20,000 files made five, each copying pages the next commits changed again (its
    # writer thread's CPU 0.27 to 0.22 s, five runs each). The log goes at the last close.
    await db.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
    return db


class Inventory:
    """Async access to one inventory file. Use ``async with await Inventory.open(path)``."""

    def __init__(self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection):
        self.path = path
        self._db = writer
        self._reader = reader
        self._lock = anyio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Self:
        if not callable(getattr(aiosqlite.Connection, "_execute", None)):
            # Writes run in aiosqlite's thread through it (``_write_in_thread``): said here,
            # before anything is written, rather than as an AttributeError mid-run.
            raise InventoryError(
                f"aiosqlite {getattr(aiosqlite, '__version__', '?')} has no"
                " Connection._execute, which this release of replicator needs; install"
                " aiosqlite 0.20 to 0.22")
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = await _connect(path)
        try:
            await migrate(writer)
            reader = await _connect(path)
        except BaseException as exc:
            # aiosqlite's connection threads are not daemons: an unclosed one hangs exit.
            with anyio.CancelScope(shield=True):
                await writer.close()
            if isinstance(exc, aiosqlite.DatabaseError):
                raise InventoryError(f"{path}: cannot open the inventory: {exc}") from exc
            raise
        return cls(path, writer, reader)

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._reader.close()
            await self._db.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One short write transaction. Cancellation rolls back, shielded."""
        async with self._lock:
            # Shielded: a BEGIN cancelled half-way would leave the connection inside a
            # transaction that holds SQLite's write lock for good.
            with anyio.CancelScope(shield=True):
                await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                with anyio.CancelScope(shield=True):
                    await self._db.execute("COMMIT")
            except BaseException:
                with anyio.CancelScope(shield=True):
                    if self._db.in_transaction:
                        await self._db.execute("ROLLBACK")
                raise

    async def _write_in_thread(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """One short write transaction whose statements ``work`` runs in the connection's
        thread: one hand-off from the event loop and back, where a statement awaited on
        its own costs a hand-off each (BEGIN and COMMIT too). While the loop is busy with a
        run's copies, a hand-off waits milliseconds for it, and a scan batch's transaction
        made eleven. Cancellation waits for the transaction's end: once handed over it
        commits, or rolls back if ``work`` raised."""
        # aiosqlite runs callables in its thread with ``_execute`` (no public name); every
        # inventory test goes through here.
        execute: Callable[..., Awaitable[_T]] = self._db._execute
        async with self._lock:
            with anyio.CancelScope(shield=True):
                result = await execute(_transaction, self._db, work)
        return result

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        # One hand-off to the reader's thread (a cursor's execute, fetch and close are three).
        return list(await self._reader.execute_fetchall(sql, params))

    # -- runs ---------------------------------------------------------------------------

    async def begin_run(self, run_id: str, host: str) -> None:
        async with self._write() as db:
            await db.execute(
                "INSERT INTO runs (id, pid, host, started) VALUES (?, ?, ?, ?)",
                (run_id, os.getpid(), host, time.time()),
            )

    async def end_run(self, run_id: str, outcome: str) -> None:
        async with self._write() as db:
            await db.execute(
                "UPDATE runs SET ended = ?, outcome = ? WHERE id = ?",
                (time.time(), outcome, run_id),
            )

    # -- replicas -----------------------------------------------------------------------

    async def sync_replicas(
        self, replicas: Sequence[tuple[str, str, Sequence[str]]]
    ) -> list[str]:
        """Register replicas (name, url, origin names); backfill new or widened ones.

        A replica seen for the first time, or whose origin set grew, gets a pending copy of
        every existing file of its origins straight from the inventory, without a rescan.
        Returns the names that were backfilled.
        """
        backfilled: list[str] = []
        for name, url, origins in replicas:
            wanted = sorted(set(origins))
            async with self._write() as db:
                rows = list(await db.execute_fetchall(
                    "SELECT origins FROM replicas WHERE name = ?", (name,)))
                known: set[str] = set(json.loads(rows[0][0])) if rows else set()
                await db.execute(
                    "INSERT INTO replicas (name, url, origins) VALUES (?, ?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET url = excluded.url,"
                    " origins = excluded.origins",
                    (name, url, json.dumps(wanted)),
                )
                added = [origin for origin in wanted if origin not in known]
                for origin in added:
                    await db.execute(
                        "INSERT OR IGNORE INTO copies (replica, file_id, state, src_mtime_ns)"
                        " SELECT ?, id, 'pending', mtime_ns FROM files"
                        " WHERE origin = ? AND deleted IS NULL",
                        (name, origin),
                    )
                if added:
                    backfilled.append(name)
        return backfilled

    async def replica_marker(self, replica: str) -> str | None:
        rows = await self._rows("SELECT marker FROM replicas WHERE name = ?", (replica,))
        return rows[0][0] if rows else None

    async def set_replica_marker(self, replica: str, marker: str) -> None:
        async with self._write() as db:
            await db.execute("UPDATE replicas SET marker = ? WHERE name = ?", (marker, replica))

    async def set_condition(self, replica: str, condition: str, error: str | None) -> None:
        async with self._write() as db:
            await db.execute(
                "UPDATE replicas SET condition = ?, last_error = ?, changed = ? WHERE name = ?",
                (condition, error, time.time(), replica),
            )

    # -- scanning -----------------------------------------------------------------------

    async def fingerprints(self, origin: str, host: str,
                           dirs: Sequence[bytes]) -> dict[bytes, bytes]:
        """The digests recorded after the last diff of these folders (those that have one)."""
        recorded: dict[bytes, bytes] = {}
        for chunk in _chunks(dirs, _MAX_PARAMS):
            marks = ",".join("?" * len(chunk))
            for d, fingerprint in await self._rows(
                "SELECT dir, fingerprint FROM dirs WHERE origin = ? AND host = ?"
                f" AND dir IN ({marks}) AND fingerprint IS NOT NULL",
                (origin, host, *chunk),
            ):
                recorded[d] = fingerprint
        return recorded

    async def touch_dirs(self, origin: str, host: str,
                         dirs: Sequence[tuple[bytes, bytes]], now: float) -> list[bytes]:
        """Record folders found unchanged: their listing's digest is the recorded one.

        Returns the folders whose recorded digest changed since it was read (another scan
        diffed them meanwhile): they must be listed and diffed in full.
        """
        if not dirs:
            return []
        async with self._write() as db:
            cursor = await db.executemany(
                "UPDATE dirs SET last_seen = ?"
                " WHERE origin = ? AND host = ? AND dir = ? AND fingerprint = ?",
                [(now, origin, host, d, fingerprint) for d, fingerprint in dirs],
            )
            if cursor.rowcount == len(dirs):
                return []
        recorded = await self.fingerprints(origin, host, [d for d, _ in dirs])
        return [d for d, fingerprint in dirs if recorded.get(d) != fingerprint]

    async def apply_listings(
        self,
        origin: str,
        host: str,
        replicas: Sequence[str],
        listings: Sequence[DirListing],
        now: float,
        claim_for: Collection[str] = (),
    ) -> tuple[ScanDelta, list[NewFile]]:
        """Diff a batch of folder listings against the inventory and record the changes.

        Only the rows of these folders are loaded, so memory follows the batch, not the
        inventory. New files get a pending copy on each replica; changed files make their
        copies pending again (an in-flight copy is settled when its result arrives).

        ``claim_for``: replicas whose copies of the new files are claimed (``copying``) as
        they are recorded, the new files returned, so that the engine need not read them
        back with ``claim``. Only for replicas whose claims record no destination. The list
        is empty when nothing was claimed.

        ``diff_listings`` then ``record_diff``: a scan diffs its next batch while this one
        is recorded.
        """
        diff = await self.diff_listings(origin, host, listings, now)
        return await self.record_diff(diff, replicas, claim_for)

    async def diff_listings(self, origin: str, host: str, listings: Sequence[DirListing],
                            now: float) -> ListingsDiff:
        """The first half of ``apply_listings``: the batch's changes, read, not written;
        ``now`` is the time they are recorded at.

        Nothing of these folders may be recorded between this diff and its ``record_diff``
        but by that call: a scan's batches hold different folders, so a scan may diff a
        batch while it records the one before."""
        diff = ListingsDiff(origin, host, now)
        if not listings:
            return diff
        recorded = await self.fingerprints(
            origin, host, [lst.dir for lst in listings if lst.fingerprint])
        for lst in listings:
            if lst.fingerprint is not None and recorded.get(lst.dir) == lst.fingerprint:
                diff.same.append(lst.dir)
                diff.skipped += len(lst.entries)
            else:
                diff.listings.append(lst)
        listings = diff.listings
        if not listings:
            return diff
        dirs = [listing.dir for listing in listings]
        known: dict[bytes, dict[bytes, tuple[int, int, int, int, int, float | None]]] = {
            d: {} for d in dirs
        }
        for chunk in _chunks(dirs, _MAX_PARAMS):
            marks = ",".join("?" * len(chunk))
            rows = await self._rows(
                "SELECT dir, name, id, kind, size, mtime_ns, mode, deleted FROM files"
                f" WHERE origin = ? AND host = ? AND dir IN ({marks})",
                (origin, host, *chunk),
            )
            for d, n, file_id, kind, size, mtime_ns, mode, deleted in rows:
                known[d][n] = (file_id, kind, size, mtime_ns, mode, deleted)

        inserts, inserted = diff.inserts, diff.inserted
        updates, seen_ids, gone_ids = diff.updates, diff.seen_ids, diff.gone_ids
        unchanged = 0
        for listing in listings:
            present: set[bytes] = set(listing.unsettled)
            in_dir = known[listing.dir]
            for entry in listing.entries:
                present.add(entry.name)
                row = in_dir.get(entry.name)
                if row is None:
                    inserts.append(
                        (origin, host, listing.dir, entry.name, int(entry.kind), entry.size,
                         entry.mtime_ns, entry.mode, entry.target, now, now)
                    )
                    inserted.append((listing.dir, entry))
                    continue
                file_id, kind, size, mtime_ns, mode, deleted = row
                if (
                    deleted is None
                    and kind == entry.kind
                    and size == entry.size
                    and mtime_ns == entry.mtime_ns
                    and mode == entry.mode
                ):
                    unchanged += 1
                    seen_ids.append(file_id)
                else:
                    updates.append(
                        (int(entry.kind), entry.size, entry.mtime_ns, entry.mode, entry.target,
                         now, file_id)
                    )
            if listing.complete:
                gone_ids += [row[0] for n, row in in_dir.items()
                             if n not in present and row[5] is None]
        diff.unchanged = unchanged
        return diff

    async def record_diff(self, diff: ListingsDiff, replicas: Sequence[str],
                          claim_for: Collection[str] = ()) -> tuple[ScanDelta, list[NewFile]]:
        """The second half of ``apply_listings``: record what ``diff_listings`` found, in
        one transaction."""
        origin, host, now = diff.origin, diff.host, diff.now
        inserts, inserted, listings = diff.inserts, diff.inserted, diff.listings
        updates, seen_ids, gone_ids = diff.updates, diff.seen_ids, diff.gone_ids
        delta = ScanDelta(len(inserts), len(updates), len(gone_ids),
                          diff.unchanged + diff.skipped)
        if not diff.same and not listings:
            return delta, []
        same = diff.same

        def record(conn: sqlite3.Connection) -> int | None:
            """The transaction; the id of the first file inserted if the inserts got the
            ids after it, in order."""
            first: int | None = None
            if same:
                conn.executemany(
                    "UPDATE dirs SET last_seen = ? WHERE origin = ? AND host = ? AND dir = ?",
                    [(now, origin, host, d) for d in same],
                )
            if inserts:
                first = _next_file_id(conn)
                _insert_rows(
                    conn, "INSERT INTO files (origin, host, dir, name, kind, size, mtime_ns,"
                    " mode, target, first_seen, last_seen) VALUES ", inserts)
                # This transaction alone writes: the rows from ``first`` on are these inserts,
                # in order, unless SQLite ran out of ids at the top and picked free ones.
                if _next_file_id(conn) == first + len(inserts):
                    for replica in replicas:
                        state = "copying" if replica in claim_for else "pending"
                        conn.execute(
                            "INSERT OR IGNORE INTO copies (replica, file_id, state,"
                            " src_mtime_ns) SELECT ?, id, ?, mtime_ns FROM files WHERE id >= ?",
                            (replica, state, first),
                        )
                else:
                    first = None
                    # The files of these folders first seen at ``now`` (one seen at ``now`` by
                    # an earlier batch of this scan has its copies already: ignored).
                    new_dirs = list(dict.fromkeys(row[2] for row in inserts))
                    for replica in replicas:
                        conn.executemany(
                            "INSERT OR IGNORE INTO copies (replica, file_id, state,"
                            " src_mtime_ns) SELECT ?, id, 'pending', mtime_ns FROM files"
                            " WHERE origin = ? AND host = ? AND dir = ? AND first_seen = ?"
                            " AND deleted IS NULL",
                            [(replica, origin, host, d, now) for d in new_dirs],
                        )
            if updates:
                conn.executemany(
                    "UPDATE files SET kind = ?, size = ?, mtime_ns = ?, mode = ?, target = ?,"
                    " last_seen = ?, deleted = NULL WHERE id = ?",
                    updates,
                )
                _reopen_copies(conn, [row[-1] for row in updates], replicas)
            for ids in _chunks(seen_ids, _MAX_PARAMS):
                marks = ",".join("?" * len(ids))
                conn.execute(f"UPDATE files SET last_seen = ? WHERE id IN ({marks})",
                             (now, *ids))
            if gone_ids:
                _mark_deleted(conn, gone_ids, now)
            # The rows of these folders now match their listings: record the digests.
            if listings:
                conn.executemany(
                    "INSERT INTO dirs (origin, host, dir, fingerprint, last_seen)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (origin, host, dir) DO UPDATE SET"
                    " fingerprint = excluded.fingerprint, last_seen = excluded.last_seen",
                    [(origin, host, lst.dir, lst.fingerprint, now) for lst in listings],
                )
            return first

        first = await self._write_in_thread(record)
        claimed: list[NewFile] = []
        if first is not None and any(replica in claim_for for replica in replicas):
            claimed = [NewFile(first + i, folder, entry)
                       for i, (folder, entry) in enumerate(inserted)]
        return delta, claimed

    async def mark_missing_dirs(
        self,
        origin: str,
        host: str,
        visited: set[bytes],
        now: float,
        unreadable: Sequence[bytes] = (),
    ) -> int:
        """Mark deleted every file of folders the scan no longer found.

        Nothing below an ``unreadable`` folder counts as gone: the scan could not look.
        """
        # Every folder ever recorded, one index seek each (a skip scan); a DISTINCT over the
        # files read all of their rows, 120 ms per 300,000 at the end of every scan.
        rows = await self._rows(
            "WITH RECURSIVE d(dir) AS ("
            " SELECT MIN(dir) FROM files WHERE origin = ?1 AND host = ?2"
            " UNION ALL SELECT (SELECT MIN(dir) FROM files"
            "  WHERE origin = ?1 AND host = ?2 AND dir > d.dir)"
            " FROM d WHERE d.dir IS NOT NULL)"
            " SELECT dir FROM d WHERE dir IS NOT NULL",
            (origin, host),
        )
        hidden = tuple(u.rstrip(b"/") + b"/" for u in unreadable)
        unseen = [row[0] for row in rows
                  if row[0] not in visited and not (hidden and row[0].startswith(hidden))]
        total = 0
        for directory in unseen:
            ids = [
                row[0]
                for row in await self._rows(
                    "SELECT id FROM files WHERE origin = ? AND host = ? AND dir = ?"
                    " AND deleted IS NULL",
                    (origin, host, directory),
                )
            ]
            if not ids:
                continue  # gone at an earlier scan
            def mark(conn: sqlite3.Connection, ids: list[int] = ids,
                     directory: bytes = directory) -> None:
                _mark_deleted(conn, ids, now)
                # Its rows changed outside a diff: the next listing of it is diffed in full.
                conn.execute("DELETE FROM dirs WHERE origin = ? AND host = ? AND dir = ?",
                             (origin, host, directory))

            await self._write_in_thread(mark)
            total += len(ids)
        return total

    # -- the engine's work ----------------------------------------------------------------

    async def claim(
        self,
        replica: str,
        now: float,
        limit: int,
        destination: Callable[[str, str, bytes], bytes],
        run_started: float | None = None,
        record_dest: bool = True,
        check_owners: bool = True,
    ) -> tuple[list[Work], list[tuple[Work, str]]]:
        """Take up to ``limit`` due copies, oldest first, and mark them ``copying``.

        The destination, ``destination(origin, host, path)``, is recorded before any side
        effect, so a restart knows where temp files of a dead run may lie, and so that no
        other file is given the same one. Returns the claimed work and the work whose
        destination could not be computed or belongs to another file (with the reason),
        which is marked failed.
        ``run_started`` (one-shot runs): skip copies given a non-transient error since then.
        ``record_dest=False``: the destination follows from the file by the replica's
        layout (see ``placement``); ``check_owners=False``: no recorded destination can
        collide with this layout's.
        """
        claimed: list[Work] = []
        refused: list[tuple[Work, str]] = []
        async with self._write() as db:
            rows = await db.execute_fetchall(  # one hand-off (a cursor's are three)
                f"SELECT {_DUE_COLUMNS} FROM copies c JOIN files f ON f.id = c.file_id"
                " WHERE c.replica = ?1 AND c.state = 'pending' AND c.next_attempt <= ?2"
                f" AND {_NOT_RETRIED_THIS_RUN}"
                " ORDER BY c.next_attempt, c.src_mtime_ns LIMIT ?3",
                (replica, now, limit, run_started),
            )
            # One Work per row, built once its destination is known.
            kinds = {int(k): k for k in Kind}
            for file_id, origin, host, folder, name, kind, size, mtime_ns, mode, target, \
                    attempts in rows:
                path = join_path(folder, name)
                try:
                    dest = destination(origin, host, path)
                except ValueError as exc:
                    refused.append((Work(replica, file_id, origin, host, path, kinds[kind],
                                         size, mtime_ns, mode, target, attempts, b""),
                                    str(exc)))
                    continue
                claimed.append(Work(replica, file_id, origin, host, path, kinds[kind], size,
                                    mtime_ns, mode, target, attempts, dest))
            if check_owners:
                claimed = await self._one_file_per_destination(db, replica, claimed, refused)
            if record_dest:
                await db.executemany(
                    "UPDATE copies SET state = 'copying', dest = ?"
                    " WHERE replica = ? AND file_id = ?",
                    [(w.dest, replica, w.file_id) for w in claimed],
                )
            else:
                # Half the cost per copy: a destination grows the row and adds an index entry.
                await db.executemany(
                    "UPDATE copies SET state = 'copying' WHERE replica = ? AND file_id = ?",
                    [(replica, w.file_id) for w in claimed],
                )
            if refused:
                await db.executemany(
                    "UPDATE copies SET state = 'failed', attempts = attempts + 1,"
                    " error_class = 'permanent', error = ? WHERE replica = ? AND file_id = ?",
                    [(reason, replica, w.file_id) for w, reason in refused],
                )
        return claimed, refused

    async def _one_file_per_destination(
        self,
        db: aiosqlite.Connection,
        replica: str,
        claimed: list[Work],
        refused: list[tuple[Work, str]],
    ) -> list[Work]:
        """Refuse work whose destination belongs to another file (a layout such as
        ``{name}`` can map two origin files to one path: the second would overwrite the
        first while both are recorded as replicated)."""
        owners: dict[bytes, int] = {}
        for chunk in _chunks(sorted({w.dest for w in claimed}), _MAX_PARAMS):
            marks = ",".join("?" * len(chunk))
            for dest, file_id in await db.execute_fetchall(
                f"SELECT dest, file_id FROM copies WHERE replica = ? AND dest IN ({marks})",
                (replica, *chunk),
            ):
                owners.setdefault(dest, file_id)
        kept: list[Work] = []
        for work in claimed:
            owner = owners.setdefault(work.dest, work.file_id)
            if owner == work.file_id:
                kept.append(work)
            else:
                refused.append((work, f"destination {os.fsdecode(work.dest)!r} already holds"
                                      " the copy of another origin file; change the layout"))
        return kept

    async def next_retry(
        self, replica: str, now: float, deadline: float, run_started: float | None = None
    ) -> float | None:
        """When the next copy a one-shot run should still wait for is due, if any.

        Due now (unless given a non-transient error since ``run_started``: those wait for
        the next run), or failed transiently and due again before ``deadline``.
        """
        rows = await self._rows(
            "SELECT MIN(c.next_attempt) FROM copies c WHERE c.replica = ?1"
            " AND c.state = 'pending' AND ((c.next_attempt <= ?2"
            f" AND {_NOT_RETRIED_THIS_RUN}) OR (c.error_class = 'transient'"
            " AND c.next_attempt <= ?3))",
            (replica, now, deadline, run_started),
        )
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    async def next_due_time(self, replica: str) -> float | None:
        rows = await self._rows(
            "SELECT MIN(next_attempt) FROM copies WHERE replica = ? AND state = 'pending'",
            (replica,),
        )
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    async def record(
        self,
        outcomes: Sequence[Outcome],
        now: float,
        copied: Sequence[tuple[str, int, int, int]] = (),
    ) -> None:
        """Apply a batch of transfer outcomes in one transaction.

        ``copied``: (replica, file_id, size, mtime_ns) of copies made, the common outcome,
        as plain rows (the same as ``OutcomeKind.REPLICATED`` outcomes).
        """
        replicated: list[tuple[Any, ...]] = [
            (size, mtime_ns, now, replica, file_id) for replica, file_id, size, mtime_ns in copied
        ]
        released: list[tuple[Any, ...]] = []
        changed: list[tuple[Any, ...]] = []
        errors: list[tuple[Any, ...]] = []
        for o in outcomes:
            if o.kind is OutcomeKind.REPLICATED:
                replicated.append((o.size, o.mtime_ns, now, o.replica, o.file_id))
            elif o.kind is OutcomeKind.CHANGED:
                changed.append((o.size, o.mtime_ns, o.next_attempt, o.replica, o.file_id))
            elif o.kind in (OutcomeKind.RELEASED, OutcomeKind.VANISHED):
                # A source missing at copy time may be back soon (a folder moved away and
                # back, an automount): only the scanner decides that a file is gone.
                released.append((o.next_attempt, o.replica, o.file_id))
            else:
                state = CopyState.FAILED if o.final else CopyState.PENDING
                errors.append(
                    (str(state), o.next_attempt, o.error_class, o.error, o.replica, o.file_id)
                )
        gone = [(o.replica, o.file_id) for o in outcomes if o.kind is not OutcomeKind.REPLICATED]

        def record(conn: sqlite3.Connection) -> None:
            # The copy holds the version read before the transfer; if the origin moved on in
            # the meantime, the copy is still recorded but stays pending for the new version.
            if replicated:
                conn.executemany(
                    "UPDATE copies SET size = ?1, mtime_ns = ?2, replicated_at = ?3,"
                    " error_class = NULL, error = NULL, attempts = 0, next_attempt = 0,"
                    " state = CASE WHEN (SELECT size = ?1 AND mtime_ns = ?2 FROM files"
                    " WHERE id = ?5) THEN 'replicated' ELSE 'pending' END"
                    " WHERE replica = ?4 AND file_id = ?5 AND state = 'copying'",
                    replicated,
                )
            if released:
                conn.executemany(
                    "UPDATE copies SET state = 'pending', next_attempt = ?"
                    " WHERE replica = ? AND file_id = ? AND state = 'copying'",
                    released,
                )
            if changed:
                # The source was not the version claimed (size, mtime). If a scan recorded
                # another version since the claim, that one is settled: due at once.
                conn.executemany(
                    "UPDATE copies SET state = 'pending', next_attempt = CASE WHEN"
                    " (SELECT size = ?1 AND mtime_ns = ?2 FROM files WHERE id = ?5)"
                    " THEN ?3 ELSE 0 END"
                    " WHERE replica = ?4 AND file_id = ?5 AND state = 'copying'",
                    changed,
                )
            if errors:
                conn.executemany(
                    "UPDATE copies SET state = ?, attempts = attempts + 1, next_attempt = ?,"
                    " error_class = ?, error = ? WHERE replica = ? AND file_id = ?"
                    " AND state = 'copying'",
                    errors,
                )
            if gone:
                # The scanner found the file gone while it was in flight: drop, do not fail.
                conn.executemany(
                    "DELETE FROM copies WHERE replica = ? AND file_id = ?"
                    " AND state IN ('pending', 'failed')"
                    " AND file_id IN (SELECT id FROM files WHERE deleted IS NOT NULL)",
                    gone,
                )

        await self._write_in_thread(record)

    async def release_all(
        self, replicas: Sequence[str], keep: Sequence[tuple[str, int]] = ()
    ) -> int:
        """Every ``copying`` copy of these replicas back to pending, at the end of a run,
        but those of ``keep`` ((replica, file id) of transfers abandoned while they ran:
        a worker thread or helper may still write their temp files). Those stay
        ``copying`` for the next run's ``recover`` to clean up after.

        Only call this while holding the engine lock.
        """
        if not replicas:
            return 0
        marks = ",".join("?" * len(replicas))
        async with self._write() as db:
            cursor = await db.execute(
                f"UPDATE copies SET state = 'pending' WHERE state = 'copying'"
                f" AND replica IN ({marks})",
                tuple(replicas),
            )
            released = cursor.rowcount
            if keep:
                cursor = await db.executemany(
                    "UPDATE copies SET state = 'copying'"
                    " WHERE replica = ? AND file_id = ? AND state = 'pending'",
                    keep,
                )
                released -= cursor.rowcount
            return released

    async def recover(
        self, replicas: Sequence[str]
    ) -> list[tuple[str, bytes | None, str, str, bytes]]:
        """After a crash: every ``copying`` copy goes back to pending.

        Returns (replica, recorded destination or None, origin, host, path) of each, so
        that temp files of dead runs next to their destinations can be removed. Only call
        this while holding the engine lock.
        """
        if not replicas:
            return []
        marks = ",".join("?" * len(replicas))
        rows = await self._rows(
            # INDEXED BY: without statistics SQLite takes the primary key and reads every
            # copy of the replica (30 ms per 300,000) to find the few in flight.
            "SELECT c.replica, c.dest, f.origin, f.host, f.dir, f.name"
            " FROM copies c INDEXED BY copies_open JOIN files f ON f.id = c.file_id"
            f" WHERE c.state = 'copying' AND c.replica IN ({marks})",
            tuple(replicas),
        )
        async with self._write() as db:
            # Only these replicas' copies: the others keep their record of where temp files
            # of a dead run may lie until a run that serves them cleans up.
            await db.execute(
                f"UPDATE copies INDEXED BY copies_open SET state = 'pending'"
                f" WHERE state = 'copying' AND replica IN ({marks})",
                tuple(replicas),
            )
        return [(r[0], r[1], r[2], r[3], join_path(r[4], r[5])) for r in rows]

    async def placement(self, replica: str) -> tuple[str | None, bool]:
        """(how the replica's copies placed without a recorded destination were placed, as
        given to ``set_unrecorded_placement``, or None; whether any copy has its destination
        recorded)."""
        rows = await self._rows(
            "SELECT unrecorded_placement, EXISTS (SELECT 1 FROM copies"
            " WHERE replica = ?1 AND dest IS NOT NULL) FROM replicas WHERE name = ?1",
            (replica,),
        )
        return (rows[0][0], bool(rows[0][1])) if rows else (None, False)

    async def set_unrecorded_placement(self, replica: str, placement: str | None) -> None:
        async with self._write() as db:
            await db.execute("UPDATE replicas SET unrecorded_placement = ? WHERE name = ?",
                             (placement, replica))

    async def record_destinations(
        self, replica: str, destination: Callable[[str, str, bytes], bytes]
    ) -> int:
        """Record the destination of every copy made whose destination was not recorded,
        as ``destination(origin, host, path)`` places it (a ValueError leaves it unrecorded).

        Done once when a replica's placement changes (its layout, its origin or the origin's
        root) after copies were placed without a recorded destination, so that files placed
        the new way cannot take their paths.
        """
        rows = await self._rows(
            "SELECT c.file_id, f.origin, f.host, f.dir, f.name FROM copies c"
            " JOIN files f ON f.id = c.file_id"
            " WHERE c.replica = ? AND c.dest IS NULL AND c.replicated_at IS NOT NULL",
            (replica,),
        )
        updates: list[tuple[bytes, str, int]] = []
        for file_id, origin, host, folder, name in rows:
            try:
                updates.append((destination(origin, host, join_path(folder, name)), replica,
                                file_id))
            except ValueError:
                continue  # its origin is gone from the configuration: nothing to place
        for chunk in _chunks(updates, 10_000):
            async with self._write() as db:
                await db.executemany(
                    "UPDATE copies SET dest = ? WHERE replica = ? AND file_id = ?", chunk)
        return len(updates)

    # -- operators ----------------------------------------------------------------------

    async def replica_stats(self, now: float) -> list[ReplicaStats]:
        # Counts come from indexes alone, in one statement (one snapshot): the pending
        # copies from copies_due, the copying, failed and ignored ones from copies_open,
        # all of them from copies_dest (which holds every copy); the others were made.
        # Only the copies still to do are joined with their files for bytes and age. One
        # join over every copy cost ten times as much at the end of each run.
        counts: dict[tuple[str, str], int] = {
            (row[0], row[1]): int(row[2])
            for row in await self._rows(
                "SELECT replica, 'pending', COUNT(*) FROM copies INDEXED BY copies_due"
                " WHERE state = 'pending' GROUP BY replica"
                " UNION ALL SELECT replica, state, COUNT(*) FROM copies INDEXED BY copies_open"
                f" WHERE {_OPEN} GROUP BY replica, state"
                " UNION ALL SELECT replica, '', COUNT(*) FROM copies INDEXED BY copies_dest"
                " GROUP BY replica"
            )
        }
        totals = {replica: counts.pop((replica, state))
                  for replica, state in list(counts) if state == ""}
        for replica, total in totals.items():
            others = sum(n for (name, _), n in counts.items() if name == replica)
            counts[(replica, str(CopyState.REPLICATED))] = total - others
        todo = {
            row[0]: (int(row[1] or 0), row[2])
            for row in await self._rows(
                "SELECT replica, SUM(size), MIN(first_seen) FROM ("
                " SELECT c.replica, f.size, f.first_seen FROM copies c INDEXED BY copies_due"
                " JOIN files f ON f.id = c.file_id WHERE c.state = 'pending'"
                " UNION ALL SELECT c.replica, f.size, f.first_seen FROM copies c"
                " INDEXED BY copies_open JOIN files f ON f.id = c.file_id"
                " WHERE c.state = 'copying') GROUP BY replica"
            )
        }
        stats = []
        for name, url, condition, last_error in await self._rows(
            "SELECT name, url, condition, last_error FROM replicas ORDER BY name"
        ):
            def count(*states: str, name: str = name) -> int:
                return sum(counts.get((name, state), 0) for state in states)

            bytes_pending, oldest = todo.get(name, (0, None))
            stats.append(ReplicaStats(
                name=name, url=url, condition=condition, last_error=last_error,
                files=sum(n for (replica, _), n in counts.items() if replica == name),
                replicated=count("replicated"), pending=count("pending", "copying"),
                failed=count("failed"), ignored=count("ignored"),
                bytes_pending=bytes_pending,
                oldest_pending_age=None if oldest is None else max(0.0, now - oldest),
            ))
        return stats

    async def unresolved_errors(self, replicas: Sequence[str]) -> int:
        """Copies that are failed, or pending after a per-file error, on these replicas."""
        marks = ",".join("?" * len(replicas))
        rows = await self._rows(
            f"SELECT (SELECT COUNT(*) FROM copies INDEXED BY copies_open"
            f" WHERE replica IN ({marks}) AND state = 'failed'),"
            f" (SELECT COUNT(*) FROM copies INDEXED BY copies_due WHERE replica IN ({marks})"
            " AND state = 'pending' AND error_class IS NOT NULL)",
            (*replicas, *replicas),
        )
        return int(rows[0][0]) + int(rows[0][1])

    async def preview(self, replica: str, now: float) -> list[Work]:
        """What a sync would copy to ``replica`` now, oldest first; claims nothing."""
        rows = await self._rows(
            f"SELECT {_DUE_COLUMNS} FROM copies c JOIN files f ON f.id = c.file_id"
            " WHERE c.replica = ? AND c.state = 'pending' AND c.next_attempt <= ?"
            " ORDER BY c.next_attempt, c.src_mtime_ns",
            (replica, now),
        )
        return [
            Work(replica, row[0], row[1], row[2], join_path(row[3], row[4]), Kind(row[5]),
                 row[6], row[7], row[8], row[9], row[10], b"")
            for row in rows
        ]

    async def origin_stats(self) -> list[OriginStats]:
        rows = await self._rows(
            "SELECT origin, COUNT(*), COALESCE(SUM(size), 0) FROM files"
            " WHERE deleted IS NULL GROUP BY origin ORDER BY origin"
        )
        return [OriginStats(row[0], int(row[1]), int(row[2])) for row in rows]

    async def failed(self, replica: str | None = None) -> list[FailedCopy]:
        rows = await self._rows(
            "SELECT f.origin, f.dir, f.name, c.replica, c.attempts, c.error_class, c.error,"
            " c.state FROM copies c JOIN files f ON f.id = c.file_id"
            " WHERE c.state = 'failed' AND (?1 IS NULL OR c.replica = ?1)"
            " ORDER BY c.replica, f.dir, f.name",
            (replica,),
        )
        return [
            FailedCopy(row[0], os.path.join(row[1], row[2]), row[3], row[4], row[5], row[6],
                       row[7])
            for row in rows
        ]

    async def count_copying(self, replica: str | None, paths: Sequence[bytes] | None) -> int:
        """Copies (of these origin paths; None: all) that an engine is transferring now."""
        if paths is None:
            rows = await self._rows(
                "SELECT COUNT(*) FROM copies INDEXED BY copies_open WHERE state = 'copying'"
                " AND (?1 IS NULL OR replica = ?1)", (replica,))
            return int(rows[0][0])
        total = 0
        for path in paths:
            directory, name = os.path.split(path)
            rows = await self._rows(
                "SELECT COUNT(*) FROM copies WHERE state = 'copying'"
                " AND (?1 IS NULL OR replica = ?1)"
                " AND file_id IN (SELECT id FROM files WHERE dir = ?2 AND name = ?3)",
                (replica, directory, name))
            total += int(rows[0][0])
        return total

    async def set_state(
        self,
        *,
        to: CopyState,
        from_states: Sequence[CopyState],
        replica: str | None,
        paths: Sequence[bytes] | None,
    ) -> int:
        """Operator state changes (retry, ignore, unignore). ``paths=None`` means all."""
        states = ",".join(f"'{s}'" for s in from_states)
        reset = ", attempts = 0, next_attempt = 0, error_class = NULL, error = NULL"
        sql = (
            f"UPDATE copies SET state = ?{reset if to is CopyState.PENDING else ''}"
            f" WHERE state IN ({states}) AND (?2 IS NULL OR replica = ?2)"
        )
        changed = 0
        async with self._write() as db:
            if paths is None:
                cursor = await db.execute(sql.replace("= ?", "= ?1", 1), (str(to), replica))
                changed += cursor.rowcount
            else:
                for path in paths:
                    directory, name = os.path.split(path)
                    cursor = await db.execute(
                        sql.replace("= ?", "= ?1", 1)
                        + " AND file_id IN (SELECT id FROM files WHERE dir = ?3 AND name = ?4)",
                        (str(to), replica, directory, name),
                    )
                    changed += cursor.rowcount
        return changed
