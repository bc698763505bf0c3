"""The local scanner on real trees: in its worker thread and in its helper processes."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Collection, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import OLD, backdate, write
from structlog.testing import capture_logs

from replicator import OriginConfig, _walk
from replicator import _scanner as scanner_module
from replicator._inventory import Inventory, NewFile, ScanDelta
from replicator._scanner import Scanner, ScanResult

pytestmark = pytest.mark.anyio

NON_UTF8 = b"caf\xe9 \xff.dat"


@pytest.fixture(params=["thread", "helpers"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``helpers``: helper processes from the first task on, with tasks of a few folders, so
    that a small tree makes many tasks; ``thread``: none at all."""
    if request.param == "helpers":
        monkeypatch.setattr(scanner_module, "HELPERS_AFTER", 0)
        monkeypatch.setattr(scanner_module, "TASK_ENTRIES", 40)
    else:
        monkeypatch.setattr(scanner_module, "HELPERS_AFTER", 1 << 60)
    return str(request.param)


class Counting:
    """Counts the tasks helper processes ran (the real ones, through their pipes).

    ``gate``: the scan's thread lists its first task, then waits until helpers finished
    three (ten seconds at most): on a busy machine it could list the whole tree before they
    started."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, gate: bool = False) -> None:
        self.tasks = 0
        self.kill_at: int | None = None
        finished = 0
        three = threading.Event()
        original = scanner_module._Helper.run

        async def run(helper: Any, task: Any) -> Any:
            nonlocal finished
            self.tasks += 1
            if self.tasks == self.kill_at:
                helper._process.kill()  # the helper dies with this task in hand
            result = await original(helper, task)
            finished += 1
            if finished >= 3:
                three.set()
            return result

        monkeypatch.setattr(scanner_module._Helper, "run", run)
        if gate:
            list_folders, listed = _walk.list_folders, [0]

            def gated(task: Any, rules: Any) -> Any:
                listed[0] += 1
                if listed[0] > 1:
                    three.wait(10)
                return list_folders(task, rules)

            monkeypatch.setattr(_walk, "list_folders", gated)


def build(origin: Path) -> set[bytes]:
    """A tree with nested folders, a symlink, odd names and things a scan leaves out;
    returns the relative paths the scan must record."""
    expected: set[bytes] = set()
    for i in range(600):
        rel = f"night {i % 6}/seq-{i % 4}/frame_{i:04}.fits"
        write(origin / rel, os.urandom(i % 50))
        expected.add(rel.encode())
    write(origin / "empty.dat", b"")
    expected.add(b"empty.dat")
    os.makedirs(origin / "a" / "b" / "c" / "d")
    write(origin / "a" / "b" / "c" / "d" / "deep.dat", b"deep")
    expected.add(b"a/b/c/d/deep.dat")
    with open(os.path.join(os.fsencode(origin), b"night 0", NON_UTF8), "wb") as f:
        f.write(b"raw name")
    expected.add(b"night 0/" + NON_UTF8)
    os.symlink("night 1", origin / "latest")
    expected.add(b"latest")
    write(origin / ".cache" / "skip.fits", b"excluded folder")
    write(origin / "notes.txt", b"not included")
    os.mkfifo(origin / "night 2" / "pipe")
    backdate(origin)
    write(origin / "night 3" / "fresh.fits", b"still being written", mtime=time.time())
    return expected


def recorded(db: Path) -> dict[bytes, tuple[int, int, int]]:
    """(relative path) -> (kind, size, mtime_ns) of the files the inventory has as present."""
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT dir, name, kind, size, mtime_ns FROM files WHERE deleted IS NULL").fetchall()
    return {os.path.join(d, n): (k, s, m) for d, n, k, s, m in rows}


def on_disk(origin: Path, rels: set[bytes]) -> dict[bytes, tuple[int, int, int]]:
    out = {}
    for rel in rels:
        path = os.path.join(os.fsencode(origin), rel)
        st = os.lstat(path)
        out[path] = (1 if os.path.islink(path) else 0, st.st_size, st.st_mtime_ns)
    return out


async def scan(tmp_path: Path, origin: Path) -> ScanResult:
    config = OriginConfig("raw", str(origin), host="inst", settle_seconds=60,
                          include=("**/*.fits", "*.dat", "**/*.dat", "latest"),
                          exclude=("**/.*",))
    async with await Inventory.open(tmp_path / "inventory.db") as inventory:
        return await Scanner(config, inventory, [], anyio.CapacityLimiter(2)).scan()


async def test_scan_rescan_and_changes(tmp_path: Path, mode: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    origin = tmp_path / "origin"
    expected = build(origin)
    helpers = Counting(monkeypatch, gate=mode == "helpers")
    first = await scan(tmp_path, origin)
    assert (first.delta.new, first.delta.changed, first.delta.deleted) == (len(expected), 0, 0)
    assert recorded(tmp_path / "inventory.db") == on_disk(origin, expected)
    assert (helpers.tasks > 5) == (mode == "helpers")

    # Nothing changed: every folder's digest matches, nothing is diffed file by file.
    second = await scan(tmp_path, origin)
    assert (second.delta.new, second.delta.changed, second.delta.deleted,
            second.delta.unchanged) == (0, 0, 0, len(expected))

    # In place, same size: only the mtime tells, and the folder's digest with it.
    inplace = origin / "night 4" / "seq-0" / "frame_0004.fits"
    write(inplace, b"x" * inplace.stat().st_size, mtime=OLD + 5)
    os.chmod(origin / "night 5" / "seq-1" / "frame_0005.fits", 0o600)
    write(origin / "a" / "b" / "new.dat", b"new")
    expected.add(b"a/b/new.dat")
    gone = {rel for rel in expected if rel.startswith(b"night 2/")}
    for rel in gone:
        os.unlink(os.path.join(os.fsencode(origin), rel))
    os.rmdir(origin / "night 2" / "seq-0")
    expected -= gone
    os.utime(origin / "night 3" / "fresh.fits", (OLD, OLD))  # settled now
    expected.add(b"night 3/fresh.fits")
    third = await scan(tmp_path, origin)
    assert (third.delta.new, third.delta.changed, third.delta.deleted) == (2, 2, len(gone))
    assert recorded(tmp_path / "inventory.db") == on_disk(origin, expected)


async def test_a_helper_that_dies_hands_its_task_back(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scanner_module, "HELPERS_AFTER", 0)
    monkeypatch.setattr(scanner_module, "TASK_ENTRIES", 40)
    origin = tmp_path / "origin"
    expected = build(origin)
    helpers = Counting(monkeypatch)
    helpers.kill_at = 3
    with capture_logs() as logs:
        result = await scan(tmp_path, origin)
    assert any(e["event"] == "scan helper lost" for e in logs)
    assert helpers.tasks > 3
    assert result.delta.new == len(expected)
    assert recorded(tmp_path / "inventory.db") == on_disk(origin, expected)


async def test_a_folder_diffed_meanwhile_is_listed_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between reading a folder's digest and recording it as unchanged, another scan diffed it:
    the folder is listed and diffed again instead of being taken as unchanged."""
    origin = tmp_path / "origin"
    expected = build(origin)
    await scan(tmp_path, origin)
    db = tmp_path / "inventory.db"
    folder = os.path.join(os.fsencode(origin), b"night 1", b"seq-1")
    original = _walk.list_folders

    def list_then_interfere(tasks: Any, rules: Any) -> Any:
        results = original(tasks, rules)
        if any(task[0] == folder for task in tasks):
            with closing(sqlite3.connect(db)) as conn, conn:
                conn.execute("UPDATE dirs SET fingerprint = x'00' WHERE dir = ?", (folder,))
        return results

    monkeypatch.setattr(_walk, "list_folders", list_then_interfere)
    monkeypatch.setattr(scanner_module, "HELPERS_AFTER", 1 << 60)
    second = await scan(tmp_path, origin)
    assert (second.delta.new, second.delta.changed, second.delta.unchanged) == (
        0, 0, len(expected))
    with closing(sqlite3.connect(db)) as conn:
        [(digest,)] = conn.execute("SELECT fingerprint FROM dirs WHERE dir = ?", (folder,))
    assert digest not in (None, b"\x00")  # the full diff recorded the real digest again


async def test_touch_dirs_reports_digests_that_changed(tmp_path: Path) -> None:
    async with await Inventory.open(tmp_path / "inventory.db") as inventory:
        origin = tmp_path / "origin"
        write(origin / "a" / "1.dat", b"1")
        write(origin / "b" / "2.dat", b"2")
        config = OriginConfig("raw", str(origin), host="inst", settle_seconds=0)
        await Scanner(config, inventory, [], anyio.CapacityLimiter(1)).scan()
        dirs = [os.fsencode(origin / "a"), os.fsencode(origin / "b")]
        digests = await inventory.fingerprints("raw", "inst", dirs)
        assert sorted(digests) == dirs
        now = time.time()
        assert await inventory.touch_dirs("raw", "inst", list(digests.items()), now) == []
        assert await inventory.touch_dirs(
            "raw", "inst", [(dirs[0], digests[dirs[0]]), (dirs[1], b"other")], now) == [dirs[1]]


class Feed:
    """A ``ScanFeed`` that notes what it is told, and has the new files claimed for the
    replicas in ``takes``."""

    def __init__(self, takes: tuple[str, ...] = (), copying: bool = True) -> None:
        self.takes = takes
        self.copies_made = copying
        self.batches: list[ScanDelta] = []
        self.claimed: list[tuple[tuple[str, ...], list[NewFile]]] = []

    def copying(self) -> bool:
        return self.copies_made

    def takers(self, files: int) -> Collection[str]:
        return self.takes

    def recorded(self, delta: ScanDelta, takers: Collection[str],
                 claimed: Sequence[NewFile]) -> None:
        self.batches.append(delta)
        if claimed:
            self.claimed.append((tuple(takers), list(claimed)))


async def test_a_scan_feeding_copies_leaves_the_cores_to_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan that feeds copies (the engine's, with ``on_batch``) starts no helper process
    while it finds new files, which are being copied meanwhile; it starts them once it finds
    the tree unchanged."""
    monkeypatch.setattr(scanner_module, "HELPERS_AFTER", 0)
    monkeypatch.setattr(scanner_module, "TASK_ENTRIES", 40)
    origin = tmp_path / "origin"
    expected = build(origin)
    helpers = Counting(monkeypatch)
    feed = Feed()
    config = OriginConfig("raw", str(origin), host="inst", settle_seconds=60)
    async with await Inventory.open(tmp_path / "inventory.db") as inventory:
        first = await Scanner(config, inventory, ["r"], anyio.CapacityLimiter(2), feed).scan()
        assert first.delta.new >= len(expected)
        assert feed.batches
        assert helpers.tasks == 0
        second = await Scanner(config, inventory, ["r"], anyio.CapacityLimiter(2), feed).scan()
        assert second.delta.unchanged == first.delta.new
        assert helpers.tasks > 0


async def test_a_scan_whose_copies_wait_uses_the_helpers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """New files, but no copies being made meanwhile (no replica available): the cores are
    the scan's, helper processes start."""
    monkeypatch.setattr(scanner_module, "HELPERS_AFTER", 0)
    monkeypatch.setattr(scanner_module, "TASK_ENTRIES", 40)
    origin = tmp_path / "origin"
    expected = build(origin)
    helpers = Counting(monkeypatch)
    config = OriginConfig("raw", str(origin), host="inst", settle_seconds=60)
    async with await Inventory.open(tmp_path / "inventory.db") as inventory:
        first = await Scanner(config, inventory, ["r"], anyio.CapacityLimiter(2),
                              Feed(copying=False)).scan()
    assert first.delta.new >= len(expected)
    assert helpers.tasks > 0


async def test_new_files_are_claimed_for_the_replicas_that_take_them(tmp_path: Path) -> None:
    """A batch's new files are claimed (``copying``) for the replicas the feed names and
    returned with their ids; the other replicas' copies are pending; known files are not."""
    origin = tmp_path / "origin"
    expected = build(origin)
    feed = Feed(takes=("a",))
    config = OriginConfig("raw", str(origin), host="inst", settle_seconds=60)
    db = tmp_path / "inventory.db"
    async with await Inventory.open(db) as inventory:
        scanner = Scanner(config, inventory, ["a", "b"], anyio.CapacityLimiter(2), feed)
        first = await scanner.scan()
        write(origin / "later" / "new.dat", b"new")
        await scanner.scan()
    with closing(sqlite3.connect(db)) as conn:
        rows = {i: os.path.join(d, n)
                for i, d, n in conn.execute("SELECT id, dir, name FROM files")}
        states = set(conn.execute("SELECT replica, state, COUNT(*) FROM copies GROUP BY 1, 2"))
    assert states == {("a", "copying", len(rows)), ("b", "pending", len(rows))}
    claimed = [f for takers, files in feed.claimed for f in files]
    assert {takers for takers, _ in feed.claimed} == {("a",)}
    assert len(claimed) == len(rows) == first.delta.new + 1 >= len(expected)
    assert {f.file_id: os.path.join(f.dir, f.entry.name) for f in claimed} == rows
    assert claimed[-1].entry.name == b"new.dat"


async def test_new_files_get_their_copies_when_ids_ran_out_at_the_top(tmp_path: Path) -> None:
    """Once the largest id is taken, SQLite gives new rows free ids below it: the new
    files still get their copies (pending: none is claimed from such a batch)."""
    origin = tmp_path / "origin"
    expected = build(origin)
    db = tmp_path / "inventory.db"
    async with await Inventory.open(db) as inventory:
        await inventory._db.execute(
            "INSERT INTO files (id, origin, host, dir, name, kind, size, mtime_ns, mode,"
            " first_seen, last_seen, deleted) VALUES (?, 'other', 'h', x'2f', x'61', 0, 0, 0,"
            " 0, 0, 0, 1)", (2**63 - 1,))
        feed = Feed(takes=("a",))
        config = OriginConfig("raw", str(origin), host="inst", settle_seconds=60)
        first = await Scanner(config, inventory, ["a", "b"], anyio.CapacityLimiter(2),
                              feed).scan()
    assert first.delta.new >= len(expected)
    assert feed.claimed == []
    with closing(sqlite3.connect(db)) as conn:
        states = set(conn.execute("SELECT replica, state, COUNT(*) FROM copies GROUP BY 1, 2"))
    assert states == {("a", "pending", first.delta.new), ("b", "pending", first.delta.new)}
