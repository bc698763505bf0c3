"""The inventory on a real SQLite file: a migration keeps every copy and its state,
and what the engine and the operators read of them."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from replicator._inventory import Inventory
from replicator._inventory._peek import replicas_with_work
from replicator._inventory._schema import MIGRATIONS, SCHEMA_VERSION
from replicator._inventory._store import WAL_CHECKPOINT_PAGES

pytestmark = pytest.mark.anyio

# One file per copy state on replica "r" (size = 10 * id); replica "done" holds all of them.
STATES = [
    ("pending", None),
    ("pending", "transient"),  # pending after a per-file error
    ("copying", None),
    ("replicated", None),
    ("replicated", None),
    ("failed", "permanent"),
    ("ignored", None),
]


def _v5_inventory(path: Path) -> None:
    """An inventory as release v5 wrote it: the copies_due index over every copy."""
    now = time.time()
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        for script in MIGRATIONS[:5]:
            db.executescript(script)
        db.execute("PRAGMA user_version = 5")
        db.execute("BEGIN")
        for name in ("r", "done"):
            db.execute("INSERT INTO replicas (name, url, origins) VALUES (?, ?, '[]')",
                       (name, f"/backup/{name}"))
        for file_id, (state, error_class) in enumerate(STATES, start=1):
            db.execute(
                "INSERT INTO files (id, origin, host, dir, name, kind, size, mtime_ns, mode,"
                " first_seen, last_seen) VALUES (?, 'o', '', ?, ?, 0, ?, ?, 33188, ?, ?)",
                (file_id, b"/data", b"f%d" % file_id, 10 * file_id, file_id, now - file_id, now))
            db.execute(
                "INSERT INTO copies (replica, file_id, state, error_class, src_mtime_ns,"
                " dest) VALUES ('r', ?, ?, ?, ?, ?)",
                (file_id, state, error_class, file_id,
                 b"f%d" % file_id if state == "copying" else None))
            db.execute(
                "INSERT INTO copies (replica, file_id, state, size, mtime_ns, src_mtime_ns)"
                " VALUES ('done', ?, 'replicated', ?, ?, ?)",
                (file_id, 10 * file_id, file_id, file_id))
        db.execute("COMMIT")


async def test_a_v5_inventory_migrates_with_every_copy_state(tmp_path: Path) -> None:
    path = tmp_path / "inventory.db"
    _v5_inventory(path)
    # What the command line reads before the engine runs, on the old schema and the new.
    assert replicas_with_work(path, ["r", "done"]) == {"r"}

    inventory = await Inventory.open(path)  # migrates
    async with inventory:
        stats = {s.name: s for s in await inventory.replica_stats(time.time())}
        r, done = stats["r"], stats["done"]
        assert (r.files, r.replicated, r.pending, r.failed, r.ignored) == (7, 2, 3, 1, 1)
        assert r.bytes_pending == 10 + 20 + 30  # the pending and copying ones
        assert r.oldest_pending_age is not None
        assert r.oldest_pending_age >= 3  # file 3, first seen 3 s ago, is copying
        assert (done.files, done.replicated, done.pending, done.failed) == (7, 7, 0, 0)
        assert (done.bytes_pending, done.oldest_pending_age) == (0, None)
        assert await inventory.unresolved_errors(["r"]) == 2
        assert await inventory.unresolved_errors(["done"]) == 0
        assert await inventory.count_copying("r", None) == 1
        assert await inventory.count_copying(None, [b"/data/f3"]) == 1
        assert [f.path for f in await inventory.failed("r")] == [b"/data/f6"]
        assert [w.file_id for w in await inventory.preview("r", time.time())] == [1, 2]
        # A dead run's copy in flight is found (where its temp file may lie) and released.
        assert await inventory.recover(["r"]) == [("r", b"f3", "o", "", b"/data/f3")]
        assert await inventory.count_copying("r", None) == 0
        assert (await inventory.replica_stats(time.time()))[1].pending == 3

    assert replicas_with_work(path, ["r", "done"]) == {"r"}
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        # Both state indexes are partial: a copy made is in neither.
        partial = {row[1]: row[4] for row in db.execute("PRAGMA index_list('copies')")}
        assert partial["copies_due"] == partial["copies_open"] == 1
        in_due = db.execute("SELECT COUNT(*) FROM copies INDEXED BY copies_due"
                            " WHERE state = 'pending'").fetchone()
        in_open = db.execute("SELECT COUNT(*) FROM copies INDEXED BY copies_open WHERE"
                             " state = 'copying' OR state = 'failed' OR state = 'ignored'")
        assert (in_due, in_open.fetchone()) == ((3,), (2,))


async def test_the_log_is_checkpointed_in_large_steps(tmp_path: Path) -> None:
    """Both connections leave the write-ahead log to grow to WAL_CHECKPOINT_PAGES before a
    commit copies it into the database (SQLite's default, 1,000, copied the same pages
    again and again in a first run), and the log is gone once the inventory is closed."""
    path = tmp_path / "inventory.db"
    inventory = await Inventory.open(path)
    async with inventory:
        for db in (inventory._db, inventory._reader):
            async with db.execute("PRAGMA wal_autocheckpoint") as cursor:
                assert await cursor.fetchone() == (WAL_CHECKPOINT_PAGES,)
        await inventory.begin_run("run", "host")
        assert path.with_name("inventory.db-wal").exists()
    assert not path.with_name("inventory.db-wal").exists()


async def test_an_aiosqlite_without_its_thread_runner_is_refused_up_front(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The inventory's writes run through aiosqlite's private ``Connection._execute``: an
    aiosqlite without it is named before anything is opened or written."""
    import aiosqlite

    from replicator._errors import InventoryError

    monkeypatch.delattr(aiosqlite.Connection, "_execute")
    with pytest.raises(InventoryError, match=r"aiosqlite .* has no Connection\._execute"):
        await Inventory.open(tmp_path / "inv" / "inventory.db")
    assert not (tmp_path / "inv").exists()
