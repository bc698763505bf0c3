"""What the command line reads from the inventory before it imports the engine: plain
``sqlite3``, read only (the engine's access goes through ``_store`` and aiosqlite, whose
import brings asyncio's)."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection
from pathlib import Path


def replicas_with_work(path: Path, names: Collection[str]) -> set[str]:
    """Of ``names``, the replicas the inventory at ``path`` does not know yet (a first run
    copies everything there) or holds copies for that wait or were being made; read only,
    without the engine (the command line asks before it imports it). An inventory that
    cannot be read answers none."""
    if not path.exists():
        return set(names)
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return set()
    try:
        known = {name for (name,) in db.execute("SELECT name FROM replicas")}
        # Each state by ``=``, so that an index answers in every schema version (v6 made
        # them partial, see _schema); without INDEXED BY, SQLite reads every copy of a
        # replica with nothing pending to find none.
        busy = {name for name in names if name in known and db.execute(
            "SELECT EXISTS (SELECT 1 FROM copies INDEXED BY copies_due"
            " WHERE replica = ?1 AND state = 'pending')"
            " OR EXISTS (SELECT 1 FROM copies WHERE replica = ?1 AND state = 'copying')",
            (name,)).fetchone()[0]}
    except sqlite3.Error:
        return set()
    finally:
        db.close()
    return {name for name in names if name not in known} | busy
