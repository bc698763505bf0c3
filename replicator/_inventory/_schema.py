"""Schema and migrations of the inventory, versioned with ``PRAGMA user_version``."""

from __future__ import annotations

import aiosqlite

from .._errors import InventoryError

# Each entry migrates from version i to i + 1. Never edit a released entry: append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE files (
        id INTEGER PRIMARY KEY,
        origin TEXT NOT NULL,
        host TEXT NOT NULL,
        dir BLOB NOT NULL,          -- absolute folder, raw bytes: names need not be UTF-8
        name BLOB NOT NULL,
        kind INTEGER NOT NULL,      -- 0 regular file, 1 symlink
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        mode INTEGER NOT NULL,
        target BLOB,                -- symlink target
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        deleted REAL,               -- when it was found missing; NULL while it exists
        UNIQUE (origin, host, dir, name)
    );
    CREATE TABLE replicas (
        name TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        origins TEXT NOT NULL,      -- the origin set the copies table was backfilled for
        condition TEXT NOT NULL DEFAULT 'unknown',
        last_error TEXT,
        changed REAL
    );
    CREATE TABLE copies (
        replica TEXT NOT NULL,
        file_id INTEGER NOT NULL,
        state TEXT NOT NULL,        -- pending, copying, replicated, failed, ignored
        size INTEGER,               -- origin version the replica holds (NULL: none yet)
        mtime_ns INTEGER,
        dest BLOB,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL DEFAULT 0,
        error_class TEXT,
        error TEXT,
        replicated_at REAL,
        src_mtime_ns INTEGER NOT NULL,  -- copy of files.mtime_ns: oldest-first from the index
        PRIMARY KEY (replica, file_id)
    ) WITHOUT ROWID;
    CREATE INDEX copies_due ON copies (replica, state, next_attempt, src_mtime_ns);
    CREATE INDEX copies_file ON copies (file_id);
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        host TEXT NOT NULL,
        started REAL NOT NULL,
        ended REAL,
        outcome TEXT
    );
    """,
    # v2: the identity marker each replica root must hold (see transports.MARKER).
    """
    ALTER TABLE replicas ADD COLUMN marker TEXT;
    """,
    # v3: which file owns a destination path, looked up at every claim.
    """
    CREATE INDEX copies_dest ON copies (replica, dest);
    """,
    # v4: per-folder digests of the last diffed listing, so a rescan skips unchanged folders;
    # last_seen of the files of such a folder is the folder's last_seen.
    """
    CREATE TABLE dirs (
        origin TEXT NOT NULL,
        host TEXT NOT NULL,
        dir BLOB NOT NULL,
        fingerprint BLOB,
        last_seen REAL NOT NULL,
        PRIMARY KEY (origin, host, dir)
    ) WITHOUT ROWID;
    """,
    # v5: how the replica's copies placed without a recorded destination were placed (JSON:
    # layout, origin, origin root; NULL: none were, every copy made has its destination).
    """
    ALTER TABLE replicas ADD COLUMN unrecorded_placement TEXT;
    """,
    # v6: partial indexes. copies_due holds the pending copies only, copies_open the copying,
    # failed and ignored ones. A copy made (most of them) is in neither: a new file's copy,
    # claimed as the scan records it, adds and removes no entry of them, where it made
    # three changes to copies_due (in as copying; out, and in again as replicated; at
    # places set by its mtime, scattered when folders are written side by side). SQLite
    # uses a partial index only where the query names the state with ``=`` (see _store).
    """
    DROP INDEX copies_due;
    CREATE INDEX copies_due ON copies (replica, next_attempt, src_mtime_ns)
        WHERE state = 'pending';
    CREATE INDEX copies_open ON copies (replica, state)
        WHERE state = 'copying' OR state = 'failed' OR state = 'ignored';
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(db: aiosqlite.Connection) -> None:
    """Bring the schema to ``SCHEMA_VERSION``; refuse a database from a newer release."""
    async with db.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise InventoryError(
            f"inventory schema version {version} is newer than this release supports "
            f"({SCHEMA_VERSION}); upgrade replicator"
        )
    for index in range(version, SCHEMA_VERSION):
        # executescript commits first, so the version bump rides in the same script.
        await db.executescript(
            f"BEGIN IMMEDIATE;\n{MIGRATIONS[index]}\nPRAGMA user_version = {index + 1};\nCOMMIT;"
        )
