"""End-to-end behaviour of the engine through the library API, on real folders."""

from __future__ import annotations

import filecmp
import json
import os
import sqlite3
import stat
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import OLD, backdate, make_config, replica_path, temp_files, write

from replicator import (
    Config,
    EngineLockedError,
    Event,
    EventsDropped,
    InventoryError,
    OriginConfig,
    Replicator,
    ReplicaUnavailableError,
    ScanFinished,
    TransferCompleted,
    TransferFailed,
)
from replicator import _engine as engine_module
from replicator._engine import ReplicaRunner
from replicator._inventory import FailedCopy, Inventory, NewFile, Work
from replicator._scanner import Scanner
from replicator.transports import LocalTransport, Progress, PutRequest, PutResult

pytestmark = pytest.mark.anyio

NON_UTF8 = b"caf\xe9 \xff.dat"


def build_tree(origin: Path, count: int) -> list[Path]:
    files: list[Path] = []
    for i in range(count):
        folder = origin / f"night {i % 7}" / f"séq-{i % 5}"
        files.append(write(folder / f"frame_{i:05d}.fits", os.urandom(100 + i % 3000)))
    files.append(write(origin / "empty.dat", b""))
    files.append(write(origin / "big" / "cube.fits", os.urandom(24 << 20)))
    odd = os.path.join(os.fsencode(origin), b"night 0", NON_UTF8)
    with open(odd, "wb") as f:
        f.write(b"bytes in a non-UTF-8 name")
    os.chmod(origin / "empty.dat", 0o640)
    os.chmod(files[0], 0o600)
    os.symlink("night 1", origin / "latest")
    backdate(origin)
    return files


def assert_same_tree(origin: Path, replica_root: Path) -> int:
    """Contents, mtimes, modes and links identical; returns the number of entries."""
    count = 0
    base = os.fsencode(origin)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            src = os.path.join(dirpath, name)
            dst = os.path.join(os.fsencode(replica_root), os.path.relpath(src, base))
            s, d = os.lstat(src), os.lstat(dst)
            assert stat.S_IFMT(s.st_mode) == stat.S_IFMT(d.st_mode), src
            assert s.st_mtime_ns == d.st_mtime_ns, src
            if stat.S_ISLNK(s.st_mode):
                assert os.readlink(src) == os.readlink(dst)
            else:
                assert stat.S_IMODE(s.st_mode) == stat.S_IMODE(d.st_mode), src
                assert filecmp.cmp(src, dst, shallow=False), src
            count += 1
    return count


def files_under(root: Path) -> int:
    """Files below a replica root, without its identity marker."""
    return sum(len(f) for _, _, f in os.walk(root)) - (root / ".replicator-replica").exists()


async def test_full_tree_to_two_replicas_then_changes(tmp_path: Path) -> None:
    origin, r1, r2 = tmp_path / "o", tmp_path / "r1", tmp_path / "r2"
    r1.mkdir()
    r2.mkdir()
    files = build_tree(origin, 3000)
    config = make_config(tmp_path, origin, [r1, r2], workers=3)
    async with Replicator(config) as rep:
        summary = await rep.sync_once()
        assert summary.exit_code == 0
        assert summary.copied == 2 * (len(files) + 2)
        for replica in (r1, r2):
            mirror = replica_path(replica, origin)
            assert assert_same_tree(origin, mirror) == len(files) + 2
            assert temp_files(replica) == []
        stats = await rep.inventory.replica_stats(time.time())
        assert [(s.files, s.replicated, s.pending) for s in stats] == [
            (len(files) + 2, len(files) + 2, 0)
        ] * 2

        # Nothing changed: nothing copied.
        assert (await rep.sync_once()).copied == 0

        modified, grown, touched, deleted = files[1], files[2], files[3], files[4]
        write(modified, b"x" * (modified.stat().st_size), mtime=OLD + 10)
        with open(grown, "ab") as f:
            f.write(b"more")
        os.utime(grown, (OLD + 20, OLD + 20))
        os.utime(touched, (OLD + 30, OLD + 30))
        deleted.unlink()
        new = write(origin / "night 3" / "new.fits", b"new data")
        summary = await rep.sync_once()
        assert summary.copied == 2 * 4
        for replica in (r1, r2):
            mirror = replica_path(replica, origin)
            assert (replica_path(replica, deleted)).exists()  # copies are kept
            (replica_path(replica, deleted)).unlink()
            assert assert_same_tree(origin, mirror) == len(files) + 2
            assert replica_path(replica, new).read_bytes() == b"new data"
            assert temp_files(replica) == []
        assert [s.files for s in await rep.inventory.origin_stats()] == [len(files) + 2]


async def test_non_utf8_paths_round_trip_in_the_inventory(tmp_path: Path) -> None:
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    origin.mkdir()
    raw = os.path.join(os.fsencode(origin), NON_UTF8)
    with open(raw, "wb") as f:
        f.write(b"1")
    backdate(origin)
    async with Replicator(make_config(tmp_path, origin, [r1])) as rep:
        await rep.sync_once()
    with closing(sqlite3.connect(tmp_path / "inventory.db")) as db:
        names = [row[0] for row in db.execute("SELECT name FROM files")]
    assert names == [NON_UTF8]
    assert os.path.exists(os.path.join(os.fsencode(replica_path(r1, origin)), NON_UTF8))


async def test_settle_include_exclude(tmp_path: Path) -> None:
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    write(origin / "a.fits", b"a")
    write(origin / "sub" / "b.fits", b"b")
    write(origin / "sub" / "b.txt", b"not included")
    write(origin / ".hidden" / "c.fits", b"excluded folder")
    write(origin / "fresh.fits", b"still being written", mtime=time.time())
    base = make_config(tmp_path, origin, [r1], settle=60)
    config = Config(
        inventory=base.inventory,
        origins=(OriginConfig("raw", str(origin), host="inst", settle_seconds=60,
                              include=("**/*.fits",), exclude=("**/.*",)),),
        replicas=base.replicas,
        engine=base.engine,
    )
    async with Replicator(config) as rep:
        await rep.sync_once()
        mirror = replica_path(r1, origin)
        assert sorted(str(p.relative_to(mirror)) for p in mirror.rglob("*") if p.is_file()) == [
            "a.fits", "sub/b.fits"]
        # Once it has settled, the fresh file is copied.
        os.utime(origin / "fresh.fits", (OLD, OLD))
        assert (await rep.sync_once()).copied == 1
        assert (mirror / "fresh.fits").read_bytes() == b"still being written"


async def test_new_replica_is_backfilled_without_rescan(tmp_path: Path) -> None:
    origin, r1, r2 = tmp_path / "o", tmp_path / "r1", tmp_path / "r2"
    r1.mkdir()
    r2.mkdir()
    for i in range(20):
        write(origin / f"f{i}", b"%d" % i)
    async with Replicator(make_config(tmp_path, origin, [r1])) as rep:
        await rep.sync_once()
    # The origin disappears from view (say, the instrument is off): r2 still gets the files,
    # straight from the inventory.
    hidden = tmp_path / "hidden"
    origin.rename(hidden)
    origin.mkdir()
    config = make_config(tmp_path, origin, [r1, r2])
    async with Replicator(config) as rep:
        await rep.inventory.sync_replicas([(r.name, r.url, ["raw"]) for r in config.replicas])
        stats = {s.name: s for s in await rep.inventory.replica_stats(time.time())}
        assert stats["r2"].pending == 20
        assert stats["r1"].replicated == 20


async def test_slow_replica_does_not_hold_up_the_others(tmp_path: Path) -> None:
    origin, fast, slow = tmp_path / "o", tmp_path / "fast", tmp_path / "slow"
    fast.mkdir()
    slow.mkdir()
    for i in range(200):
        write(origin / f"d{i % 4}" / f"f{i}", b"x" * 100)
    release = anyio.Event()

    class Stuck(LocalTransport):
        async def put(self, requests: Sequence[PutRequest], run_id: str,
                      progress: Progress) -> list[PutResult]:
            while not release.is_set():  # keep "moving" so the stall timeout stays quiet
                progress.add()
                with anyio.move_on_after(0.1):
                    await release.wait()
            return await super().put(requests, run_id, progress)

    config = make_config(tmp_path, origin, [fast, slow], workers=1)
    limiter = anyio.CapacityLimiter(4)
    completed: dict[str, int] = {"fast": 0, "slow": 0}
    async with Replicator(config, transports={"slow": Stuck(str(slow), limiter)}) as rep:
        async with anyio.create_task_group() as tg, rep.subscribe(4096) as events:
            tg.start_soon(rep.sync_once)
            with anyio.fail_after(30):
                async for event in events:
                    if isinstance(event, TransferCompleted):
                        completed[event.replica] += 1
                        if completed["fast"] == 200:
                            break
            assert completed["slow"] == 0  # the fast replica finished while slow was stuck
            release.set()
    assert files_under(slow) == 200


async def test_events_never_block_and_drops_are_reported(tmp_path: Path) -> None:
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    for i in range(300):
        write(origin / f"f{i}", b"x")
    async with Replicator(make_config(tmp_path, origin, [r1])) as rep:
        async with rep.subscribe(buffer=5) as events:
            with anyio.fail_after(30):
                summary = await rep.sync_once()  # nobody reads: the run must still finish
            assert summary.copied == 300
            received: list[Event] = []
            while True:
                try:
                    received.append(events.receive_nowait())
                except anyio.WouldBlock:
                    break
    assert len(received) == 5
    assert not any(isinstance(e, EventsDropped) for e in received)
    async with Replicator(make_config(tmp_path, origin, [r1])) as rep:
        async with rep.subscribe(buffer=2) as events:
            await rep.sync_once()  # ScanFinished, RunCompleted: fits
            await rep.sync_once()  # two more: these are dropped
            assert isinstance(events.receive_nowait(), ScanFinished)
            events.receive_nowait()
            with pytest.raises(anyio.WouldBlock):
                events.receive_nowait()
            # The reader caught up: the next event is preceded by the count it missed.
            await rep.sync_once()
            dropped = events.receive_nowait()
            assert isinstance(dropped, EventsDropped)
            assert dropped.count == 2
            assert isinstance(events.receive_nowait(), ScanFinished)


async def test_hard_links_are_copied_as_separate_files(tmp_path: Path) -> None:
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    write(origin / "a", b"shared")
    os.link(origin / "a", origin / "b")
    async with Replicator(make_config(tmp_path, origin, [r1])) as rep:
        assert (await rep.sync_once()).copied == 2
    a, b = replica_path(r1, origin / "a"), replica_path(r1, origin / "b")
    assert a.read_bytes() == b.read_bytes() == b"shared"
    assert a.stat().st_ino != b.stat().st_ino


async def test_second_engine_on_the_same_inventory_is_refused(tmp_path: Path) -> None:
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    origin.mkdir()
    config = make_config(tmp_path, origin, [r1])
    async with Replicator(config):
        with pytest.raises(EngineLockedError, match="another replicator engine"):
            async with Replicator(config):
                pass
    async with Replicator(config):  # released on exit
        pass


async def test_temp_files_of_dead_runs_are_removed_but_not_live_ones(tmp_path: Path) -> None:
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    write(origin / "a" / "x.dat", b"payload")
    config = make_config(tmp_path, origin, [r1])
    async with Replicator(config) as rep:
        await rep.scan()
        # A dead run claimed the copy and left a temp file next to its destination.
        claimed, _ = await rep.inventory.claim(
            "r1", time.time(), 10,
            lambda _origin, _host, path: os.path.relpath(os.fsencode(replica_path(r1, path)),
                                                         os.fsencode(r1)))
        assert len(claimed) == 1
        folder = replica_path(r1, origin / "a")
        folder.mkdir(parents=True)
        dead = folder / ".~rep-dead1x000000-0123456789ab.tmp"
        dead.write_bytes(b"partial")
    async with Replicator(config) as rep:
        # A temp file of the live run (this one) must survive the clean-up.
        live = folder / f".~rep-{rep.run_id}-0123456789ab.tmp"
        live.write_bytes(b"ours")
        summary = await rep.sync_once()
        assert summary.copied == 1
        assert not dead.exists()
        assert live.exists()


async def test_dead_runs_temp_files_are_found_without_recorded_destinations(
        tmp_path: Path) -> None:
    """With a layout that gives each file its own path, claims do not record destinations:
    a restart finds a dead run's temp files by the layout the replica remembers."""
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    write(origin / "first", b"1")
    config = make_config(tmp_path, origin, [r1])
    async with Replicator(config) as rep:
        assert (await rep.sync_once()).copied == 1
        how, recorded = await rep.inventory.placement("r1")
        assert json.loads(how or "") == {"layout": "{host}/{path}", "origin": "raw",
                                          "root": str(origin)}
        assert not recorded
        write(origin / "a" / "x.dat", b"payload")
        await rep.scan()
        claimed, _ = await rep.inventory.claim(
            "r1", time.time(), 10, lambda *_: b"elsewhere/x.dat", record_dest=False)
        assert [w.path for w in claimed] == [os.fsencode(origin / "a" / "x.dat")]
        folder = replica_path(r1, origin / "a")
        folder.mkdir(parents=True)
        dead = folder / ".~rep-dead1x000000-0123456789ab.tmp"
        dead.write_bytes(b"partial")
    with closing(sqlite3.connect(tmp_path / "inventory.db")) as db:
        assert db.execute("SELECT COUNT(*) FROM copies WHERE dest IS NOT NULL").fetchone() == (0,)
    async with Replicator(config) as rep:
        summary = await rep.sync_once()
        assert summary.copied == 1
        assert not dead.exists()
    assert replica_path(r1, origin / "a" / "x.dat").read_bytes() == b"payload"


async def test_a_copy_cancelled_in_flight_leaves_its_temp_file_to_the_next_run(
        tmp_path: Path) -> None:
    """A cancelled (aborted) run cannot stop a copy running in a worker thread or helper:
    its claim stays, so that the next run removes the temp file it may leave behind."""
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    write(origin / "a" / "x.dat", b"payload")
    backdate(origin)
    writing = anyio.Event()
    left: list[Path] = []

    class StillWriting(LocalTransport):
        """Leaves a temp file as a worker abandoned in mid-copy would."""

        async def put(self, requests: Sequence[PutRequest], run_id: str,
                      progress: Progress) -> list[PutResult]:
            dest = Path(os.fsdecode(os.path.join(self.root, requests[0].dest)))
            temp = dest.parent / f".~rep-{run_id}-0123456789ab.tmp"
            await anyio.Path(dest.parent).mkdir(parents=True, exist_ok=True)
            await anyio.Path(temp).write_bytes(b"part")
            left.append(temp)
            writing.set()
            await anyio.sleep_forever()
            raise AssertionError("not reached")

    config = make_config(tmp_path, origin, [r1], workers=1)
    limiter = anyio.CapacityLimiter(4)
    async with Replicator(config, transports={"r1": StillWriting(str(r1), limiter)}) as rep:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rep.sync_once)
            with anyio.fail_after(30):
                await writing.wait()
            tg.cancel_scope.cancel()
    assert [p.exists() for p in left] == [True]
    async with Replicator(config) as rep:
        summary = await rep.sync_once()
    assert (summary.copied, summary.exit_code) == (1, 0)
    assert not left[0].exists()
    assert temp_files(r1) == []
    assert replica_path(r1, origin / "a" / "x.dat").read_bytes() == b"payload"


@pytest.mark.parametrize(("before", "after"), [("{relpath}", "{name}"), ("{name}", "{relpath}")])
async def test_a_new_layout_never_takes_a_path_the_old_one_filled(
        tmp_path: Path, before: str, after: str) -> None:
    """Copies placed by one layout keep their paths when the layout changes, whether or
    not their destinations were recorded when they were made."""
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    # Both layouts put one of these files at "f", each a different one.
    old_file = origin / ("sub/f" if before == "{name}" else "f")
    new_file = origin / ("f" if before == "{name}" else "sub/f")
    write(old_file, b"placed first")
    base = make_config(tmp_path, origin, [r1], max_attempts=1)

    def config(layout: str) -> Config:
        return Config(inventory=base.inventory, origins=base.origins, engine=base.engine,
                      replicas=(replace(base.replicas[0], layout=layout),))

    async with Replicator(config(before)) as rep:
        assert (await rep.sync_once()).copied == 1
    assert (r1 / "f").read_bytes() == b"placed first"
    write(new_file, b"second")
    async with Replicator(config(after)) as rep:
        summary = await rep.sync_once()
        assert (summary.copied, summary.exit_code) == (0, 1)
        [failed] = await rep.inventory.failed()
        assert failed.path == os.fsencode(new_file)
        assert "another origin file" in (failed.error or "")
        assert (await rep.inventory.placement("r1"))[1] is True
    assert (r1 / "f").read_bytes() == b"placed first"  # not overwritten


@pytest.mark.parametrize("change", ["root", "origin"])
async def test_another_origin_never_takes_a_path_filled_without_a_record(
        tmp_path: Path, change: str) -> None:
    """Copies placed without recorded destinations keep their paths when the replica's one
    origin moves (another root) or is another origin, under the same layout."""
    first, second, r1 = tmp_path / "o1", tmp_path / "o2", tmp_path / "r1"
    r1.mkdir()
    write(first / "x.dat", b"placed first")
    write(second / "x.dat", b"second")
    base = make_config(tmp_path, first, [r1], max_attempts=1)

    def config(origin: OriginConfig) -> Config:
        return Config(inventory=base.inventory, origins=(origin,), engine=base.engine,
                      replicas=(replace(base.replicas[0], layout="{relpath}"),))

    async with Replicator(config(base.origins[0])) as rep:
        assert (await rep.sync_once()).copied == 1
    moved = replace(base.origins[0], path=str(second))
    if change == "origin":
        moved = replace(moved, name="other")
    async with Replicator(config(moved)) as rep:
        summary = await rep.sync_once()
        assert (summary.copied, summary.exit_code) == (0, 1)
        [failed] = await rep.inventory.failed()
        assert failed.path == os.fsencode(second / "x.dat")
        assert "another origin file" in (failed.error or "")
    assert (r1 / "x.dat").read_bytes() == b"placed first"


async def test_continuous_mode_copies_new_files_and_stops(tmp_path: Path) -> None:
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    write(origin / "first.dat", b"1")
    config = make_config(tmp_path, origin, [r1])
    async with Replicator(config) as rep, rep.subscribe(1024) as events:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rep.run)
            seen: set[bytes] = set()
            with anyio.fail_after(30):
                async for event in events:
                    if isinstance(event, TransferCompleted):
                        seen.add(os.path.basename(event.path))
                        if seen == {b"first.dat"}:
                            write(origin / "second.dat", b"2")
                        if b"second.dat" in seen:
                            break
            rep.stop()
    assert replica_path(r1, origin / "second.dat").read_bytes() == b"2"


class Intake:
    """Which files reached a replica's feeder straight from a scan (``ReplicaRunner.take``)
    and which through ``Inventory.claim``; the real methods do the work. ``fed`` is set
    once ``expect`` files were handed over (either way). The files of folders named
    ``refuse`` cannot go to the replica (the layout refuses their paths)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, refuse: bytes = b"",
                 expect: int = 0) -> None:
        self.taken: list[bytes] = []
        self.claimed: list[bytes] = []
        self.fed = anyio.Event()
        take, claim = ReplicaRunner.take, Inventory.claim
        destination = ReplicaRunner.destination

        def count() -> None:
            if expect and self.handed >= expect:
                self.fed.set()

        def spy_take(runner: ReplicaRunner, origin: str, host: str,
                     files: Sequence[NewFile]) -> None:
            self.taken += [f.entry.name for f in files]
            take(runner, origin, host, files)
            count()

        async def spy_claim(inventory: Inventory, *args: Any, **kwargs: Any) -> Any:
            claimed, refused = await claim(inventory, *args, **kwargs)
            self.claimed += [os.path.basename(w.path) for w in claimed]
            count()
            return claimed, refused

        def refusing(runner: ReplicaRunner, origin: str, host: str, path: bytes) -> bytes:
            # Folders named ``refuse``: a folder's files are placed from its own path.
            if refuse and b"/" + refuse + b"/" in path:
                raise ValueError("refused by the test")
            return destination(runner, origin, host, path)

        monkeypatch.setattr(ReplicaRunner, "take", spy_take)
        monkeypatch.setattr(Inventory, "claim", spy_claim)
        monkeypatch.setattr(ReplicaRunner, "destination", refusing)

    @property
    def handed(self) -> int:
        return len(self.taken) + len(self.claimed)


class ScanDuringAClaim:
    """The scan starts only once the feeder claims a second time: the first claim found
    nothing due, so new files are taken from then on. ``hold``: a claim that finds nothing
    returns only once the scans are done (else: after ``delay`` seconds)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold: bool = True,
                 delay: float = 0.0, first_claims: int = 1) -> None:
        self.claims = 0
        claiming = anyio.Event()
        claim, scan = Inventory.claim, Scanner.scan

        async def slow_claim(inventory: Inventory, replica: str, now: float, limit: int,
                             destination: Any, *args: Any) -> Any:
            self.claims += 1
            if self.claims > first_claims:
                claiming.set()
            await anyio.sleep(delay)
            claimed, refused = await claim(inventory, replica, now, limit, destination,
                                           *args)
            if hold and claiming.is_set() and not claimed:
                with anyio.fail_after(10):
                    await destination.__self__.engine.scans_done.wait()
            return claimed, refused

        async def scan_once_claiming(scanner: Scanner) -> Any:
            with anyio.fail_after(10):
                await claiming.wait()
            return await scan(scanner)

        monkeypatch.setattr(Inventory, "claim", slow_claim)
        monkeypatch.setattr(Scanner, "scan", scan_once_claiming)


async def _continuous_run(tmp_path: Path, names: list[str]
                          ) -> tuple[Path, Path, list[FailedCopy]]:
    """A continuous run from ``tmp_path/o`` to ``tmp_path/r1``: once ``first.dat`` is
    copied, ``names`` are written (in three folders, ``n0`` to ``n2``); it stops once each
    of them got a final outcome. Returns the origin, the replica and the failed copies."""
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    write(origin / "first.dat", b"1")
    async with Replicator(make_config(tmp_path, origin, [r1])) as rep:
        async with rep.subscribe(1024) as events, anyio.create_task_group() as tg:
            tg.start_soon(rep.run)
            done: set[bytes] = set()
            with anyio.fail_after(20):
                async for event in events:
                    if isinstance(event, TransferCompleted | TransferFailed):
                        name = os.path.basename(event.path)
                        if name == b"first.dat":
                            for i, new in enumerate(names):
                                write(origin / f"n{i % 3}" / new, new.encode())
                        else:
                            done.add(name)
                            if len(done) == len(names):
                                break
            rep.stop()
        failed = await rep.inventory.failed()
    return origin, r1, failed


async def test_new_files_go_from_the_scan_to_the_feeder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a replica's feeder runs, the new files a scan records are claimed for it in the
    same transaction and handed over: no claim reads them back."""
    intake = Intake(monkeypatch)
    names = [f"new{i:02d}.dat" for i in range(30)]
    origin, r1, _ = await _continuous_run(tmp_path, names)
    # (first.dat too when the scan recorded it after the feeder's first claim, which comes
    # with the replica's check)
    assert sorted(n for n in intake.taken if n != b"first.dat") == sorted(
        n.encode() for n in names)
    assert not set(intake.claimed) & set(intake.taken)
    for i, name in enumerate(names):
        assert replica_path(r1, origin / f"n{i % 3}" / name).read_bytes() == name.encode()
    with closing(sqlite3.connect(tmp_path / "inventory.db")) as conn:
        states = dict(conn.execute("SELECT state, COUNT(*) FROM copies GROUP BY state"))
    assert states == {"replicated": len(names) + 1}


async def test_a_scan_batch_larger_than_the_room_left_is_not_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A feeder holds at most TAKE_FILES taken files: a batch that could bring more is
    recorded as due and claimed a part at a time."""
    monkeypatch.setattr(engine_module, "TAKE_FILES", 5)  # a folder brings 10
    intake = Intake(monkeypatch)
    names = [f"new{i:02d}.dat" for i in range(30)]
    await _continuous_run(tmp_path, names)
    assert set(intake.taken) <= {b"first.dat"}  # alone in its folder: see above
    assert sorted(n for n in intake.claimed if n != b"first.dat") == sorted(
        n.encode() for n in names)


async def test_a_first_run_takes_what_its_scan_records_during_a_login(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a replica's check lasts as long as the scan (an SSH login, a long link), its
    feeder takes every new file the scan records, up to TAKE_FILES: none is recorded as
    due and claimed later. 20,000 files, as in the benchmark's small-file cases: with
    the 8,192 it held before (and what its feeder had in hand), a third were claimed."""
    files = 20_000
    intake = Intake(monkeypatch, expect=files)
    probe = LocalTransport.probe

    async def probe_once_all_were_taken(transport: LocalTransport) -> None:
        with anyio.move_on_after(10):
            await intake.fed.wait()
        await probe(transport)

    monkeypatch.setattr(LocalTransport, "probe", probe_once_all_were_taken)
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    for folder in range(100):
        (origin / f"d{folder:02d}").mkdir(parents=True)
    for i in range(files):
        (origin / f"d{i % 100:02d}" / f"f{i:05d}").write_bytes(b"%d" % i)
    backdate(origin)
    async with Replicator(make_config(tmp_path, origin, [r1])) as rep:
        summary = await rep.sync_once()
    assert (summary.copied, summary.pending, summary.failed) == (files, 0, 0)
    assert intake.claimed == []
    assert len(intake.taken) == files
    assert replica_path(r1, origin / "d77" / "f19977").read_bytes() == b"19977"


async def test_files_taken_while_the_idle_feeder_looks_are_fed_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Continuous mode: files taken while the idle feeder asks when copies are next due are
    fed at once, not after its idle wait (made 60 s here)."""
    monkeypatch.setattr(engine_module, "IDLE_POLL", 60.0)
    intake = Intake(monkeypatch)
    names = ["new00.dat", "new01.dat"]
    took = anyio.Event()
    take, next_due_time = ReplicaRunner.take, Inventory.next_due_time

    def noting_take(runner: ReplicaRunner, origin: str, host: str,
                    files: Sequence[NewFile]) -> None:
        take(runner, origin, host, files)
        if any(f.entry.name.decode() in names for f in files):
            took.set()

    async def due_once_taken(inventory: Inventory, replica: str) -> float | None:
        """Asked once first.dat went to the feeder (taken or claimed), answers only once the
        scan took the new files: they were taken while it asked. Whether first.dat went is
        seen as the feeder asks, not after the answer: first.dat taken during the query
        waits for the feeder, which waits for this answer."""
        went = b"first.dat" in intake.taken + intake.claimed
        due = await next_due_time(inventory, replica)
        if went:
            with anyio.fail_after(10):
                await took.wait()
        return due

    monkeypatch.setattr(ReplicaRunner, "take", noting_take)
    monkeypatch.setattr(Inventory, "next_due_time", due_once_taken)
    await _continuous_run(tmp_path, names)  # 20 s at most
    assert sorted(n for n in intake.taken if n != b"first.dat") == [n.encode() for n in names]


async def test_taken_files_are_copied_while_the_feeder_claims(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files a scan took go to the workers before the feeder's claim of due copies, which
    waits its turn on SQLite's thread behind the scan: here a claim made with taken files
    in hand returns only once a copy of a taken file has started."""
    intake = Intake(monkeypatch)
    copying = anyio.Event()
    claim, put = Inventory.claim, LocalTransport.put
    waited: list[int] = []

    async def noting_put(transport: LocalTransport, requests: Sequence[PutRequest],
                         *args: Any) -> Any:
        if {os.path.basename(r.source) for r in requests} & set(intake.taken):
            copying.set()
        return await put(transport, requests, *args)

    async def claim_after_a_copy(inventory: Inventory, replica: str, now: float, limit: int,
                                 *args: Any) -> Any:
        if limit < engine_module.CLAIM_BATCH:  # the feeder has taken files in hand
            waited.append(limit)
            with anyio.fail_after(10):
                await copying.wait()
        return await claim(inventory, replica, now, limit, *args)

    monkeypatch.setattr(LocalTransport, "put", noting_put)
    monkeypatch.setattr(Inventory, "claim", claim_after_a_copy)
    names = [f"new{i:02d}.dat" for i in range(6)]
    origin, r1, failed = await _continuous_run(tmp_path, names)
    assert waited
    assert failed == []
    # first.dat too, when the scan recorded it after the feeder's first claim (the feeder
    # starts with the replica's check).
    assert sorted(n for n in intake.taken if n != b"first.dat") == sorted(
        n.encode() for n in names)
    for i, name in enumerate(names):
        assert replica_path(r1, origin / f"n{i % 3}" / name).read_bytes() == name.encode()


async def test_a_feeder_busy_with_taken_files_claims_only_when_copies_may_be_due(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a claim found nothing due, the feeder hands over the scan's batches without
    claiming between them (each claim waits behind the scan's writes on SQLite's thread).
    Copies due again (a changed file) are still claimed."""
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    files = [write(origin / f"d{i % 40:02d}" / f"f{i}.dat", b"x" * i) for i in range(400)]
    intake = Intake(monkeypatch)
    claims: list[int] = []
    claim = Inventory.claim

    async def counted(inventory: Inventory, *args: Any) -> Any:
        result = await claim(inventory, *args)
        claims.append(len(result[0]))
        return result

    monkeypatch.setattr(Inventory, "claim", counted)
    monkeypatch.setattr(engine_module, "CLAIM_EVERY", 60.0)  # a slow machine: no extra
    async with Replicator(make_config(tmp_path, origin, [r1])) as rep:
        summary = await rep.sync_once()
        assert (summary.copied, summary.pending) == (len(files), 0)
        assert len(intake.taken) >= 300  # the scan's batches after the first claim
        # The first; one for a batch recorded before it; one once the scan is done.
        assert len(claims) <= 4, claims
        # A changed file beside a new one: its copy is due again, and a claim takes it.
        write(origin / "d00" / "f0.dat", b"changed")
        write(origin / "d00" / "new.dat", b"new")
        intake.claimed.clear()
        summary = await rep.sync_once()
        assert (summary.copied, summary.pending) == (2, 0), summary
        assert b"f0.dat" in intake.claimed
    assert replica_path(r1, origin / "d00" / "f0.dat").read_bytes() == b"changed"
    assert replica_path(r1, origin / "d00" / "new.dat").read_bytes() == b"new"


async def test_a_taken_file_that_cannot_go_to_the_replica_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    intake = Intake(monkeypatch, refuse=b"n1")
    origin, r1, failed = await _continuous_run(tmp_path, ["new00.dat", "new01.dat",
                                                          "new02.dat"])
    assert b"new01.dat" in intake.taken
    assert [(os.path.basename(f.path), f.state, f.error) for f in failed] == [
        (b"new01.dat", "failed", "refused by the test")]
    assert not replica_path(r1, origin / "n1" / "new01.dat").exists()
    assert replica_path(r1, origin / "n2" / "new02.dat").read_bytes() == b"new02.dat"


async def test_files_taken_while_the_feeder_claims_are_not_left_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-shot run: the scan's batches are recorded, and the scan ends, while the feeder
    waits for a claim that finds nothing; the files handed over meanwhile are still copied."""
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    files = [write(origin / f"d{i % 4}" / f"f{i}.dat", b"x" * i) for i in range(40)]
    ScanDuringAClaim(monkeypatch)
    intake = Intake(monkeypatch)
    async with Replicator(make_config(tmp_path, origin, [r1])) as rep:
        summary = await rep.sync_once()
    assert (summary.copied, summary.pending) == (len(files), 0)
    assert len(intake.taken) == len(files)


async def test_due_copies_go_before_new_files_are_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While due copies are left to claim (older ones, oldest first), a scan's new files are
    recorded as due behind them, not taken ahead of them."""
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    backlog = [write(origin / "old" / f"f{i:02}.dat", b"old") for i in range(20)]
    config = make_config(tmp_path, origin, [r1])
    async with Replicator(config) as rep:
        await rep.scan()  # due copies, not copied yet
    fresh = [write(origin / f"new{i % 2}" / f"g{i:02}.dat", b"new") for i in range(20)]
    monkeypatch.setattr(engine_module, "CLAIM_BATCH", 4)
    # The scan records its batches while the backlog is claimed, 4 files a claim.
    ScanDuringAClaim(monkeypatch, hold=False, delay=0.05, first_claims=0)
    order: list[bytes] = []
    take, claim_spied = ReplicaRunner.take, Inventory.claim

    def noting_take(runner: ReplicaRunner, origin: str, host: str,
                    files: Sequence[NewFile]) -> None:
        order.extend(f.entry.name for f in files)
        take(runner, origin, host, files)

    async def noting_claim(inventory: Inventory, *args: Any) -> Any:
        claimed, refused = await claim_spied(inventory, *args)
        order.extend(os.path.basename(w.path) for w in claimed)
        return claimed, refused

    monkeypatch.setattr(ReplicaRunner, "take", noting_take)
    monkeypatch.setattr(Inventory, "claim", noting_claim)
    async with Replicator(config) as rep:
        summary = await rep.sync_once()
    assert (summary.copied, summary.pending) == (len(backlog) + len(fresh), 0)
    old = {p.name.encode() for p in backlog}
    assert set(order[:len(old)]) == old, order


async def test_taken_files_prepare_the_replica(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica is prepared (its copy helper started, its SSH sessions) once it has work,
    also when that work was taken from the scan and is already in flight, so that no copy
    is due in the inventory when the preparing task looks."""
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    for i in range(40):
        write(origin / f"d{i % 4}" / f"f{i}.dat", b"x" * i)
    prepared: list[str] = []
    next_due_time, prepare = Inventory.next_due_time, LocalTransport.prepare
    put, batches = LocalTransport.put, ReplicaRunner._batches
    in_flight, was_prepared = anyio.Event(), anyio.Event()

    def batches_in_flight(runner: ReplicaRunner, claimed: list[Work]) -> list[list[Work]]:
        in_flight.set()  # the feeder counted them in flight and took the taken ones over
        return batches(runner, claimed)

    async def once_in_flight(inventory: Inventory, replica: str) -> float | None:
        """The query answers once the taken files are in flight (none is due then)."""
        due = await next_due_time(inventory, replica)
        with anyio.fail_after(10):
            await in_flight.wait()
        return due

    async def noting_prepare(transport: LocalTransport) -> None:
        prepared.append(os.fsdecode(transport.root))
        was_prepared.set()
        await prepare(transport)

    async def put_once_prepared(transport: LocalTransport, *args: Any) -> Any:
        """Copies stay in flight until the replica is prepared (or 3 s have passed)."""
        with anyio.move_on_after(3):
            await was_prepared.wait()
        return await put(transport, *args)

    ScanDuringAClaim(monkeypatch)
    monkeypatch.setattr(Inventory, "next_due_time", once_in_flight)
    monkeypatch.setattr(LocalTransport, "prepare", noting_prepare)
    monkeypatch.setattr(LocalTransport, "put", put_once_prepared)
    monkeypatch.setattr(ReplicaRunner, "_batches", batches_in_flight)
    intake = Intake(monkeypatch)
    async with Replicator(make_config(tmp_path, origin, [r1])) as rep:
        assert (await rep.sync_once()).copied == 40
    assert len(intake.taken) == 40
    assert prepared == [str(r1)]


async def test_cancelling_a_run_leaves_the_inventory_consistent(tmp_path: Path) -> None:
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    for i in range(50):
        write(origin / f"f{i}", os.urandom(1 << 20))
    config = make_config(tmp_path, origin, [r1], workers=1)
    async with Replicator(config) as rep, rep.subscribe(1024) as events:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rep.run)
            with anyio.fail_after(30):
                async for event in events:
                    if isinstance(event, TransferCompleted):
                        break
            tg.cancel_scope.cancel()
        stats = (await rep.inventory.replica_stats(time.time()))[0]
        # Pending here counts the copies cancelled in flight, which stay claimed (see
        # test_a_copy_cancelled_in_flight_leaves_its_temp_file_to_the_next_run).
        assert stats.replicated + stats.pending == 50
    async with Replicator(config) as rep:
        assert (await rep.sync_once()).exit_code == 0
    assert files_under(r1) == 50
    assert temp_files(r1) == []


async def test_inventory_schema_is_versioned(tmp_path: Path) -> None:
    path = tmp_path / "inv.db"
    async with await Inventory.open(path):
        pass
    with closing(sqlite3.connect(path)) as db:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        assert version >= 1
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute(f"PRAGMA user_version = {version + 1}")
        db.commit()
    with pytest.raises(InventoryError, match="newer"):
        await Inventory.open(path)


async def test_missing_origin_is_unavailable_and_deletes_nothing(tmp_path: Path) -> None:
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    write(origin / "a" / "x", b"x")
    config = make_config(tmp_path, origin, [r1])
    async with Replicator(config) as rep:
        await rep.sync_once()
        origin.rename(tmp_path / "unmounted")
        summary = await rep.sync_once()
        assert summary.exit_code == 3
        assert dict(summary.unavailable)["raw"].startswith("origin root")
        assert [s.files for s in await rep.inventory.origin_stats()] == [1]


async def test_removed_folder_marks_its_files_deleted(tmp_path: Path) -> None:
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    write(origin / "keep" / "k", b"k")
    for i in range(3):
        write(origin / "gone" / "deep" / f"g{i}", b"g")
    config = make_config(tmp_path, origin, [r1])
    async with Replicator(config) as rep:
        [first] = await rep.scan()
        assert first.new == 4
        for p in sorted((origin / "gone").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (origin / "gone").rmdir()
        [second] = await rep.scan()
        assert (second.deleted, second.unchanged) == (3, 1)
        stats = (await rep.inventory.replica_stats(time.time()))[0]
        assert (stats.files, stats.pending) == (1, 1)  # pending copies of deleted files dropped


async def test_empty_mount_point_in_place_of_the_replica_is_refused(tmp_path: Path) -> None:
    """An unmounted backup disk leaves an empty, writable folder: never fill it."""
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    write(origin / "a", b"a")
    config = make_config(tmp_path, origin, [r1])
    async with Replicator(config) as rep:
        assert (await rep.sync_once()).copied == 1
    assert (r1 / ".replicator-replica").read_text().startswith("replicator r1 ")
    r1.rename(tmp_path / "disk")  # "unmount": the mount point stays, empty
    r1.mkdir()
    write(origin / "b", b"b")
    async with Replicator(config) as rep:
        summary = await rep.sync_once()
        assert summary.exit_code == 3
        reason = dict(summary.unavailable)["r1"]
        assert "identity marker" in reason
        assert "mounted" in reason
    assert list(r1.iterdir()) == []  # nothing written into the mount point
    r1.rmdir()
    (tmp_path / "disk").rename(r1)  # "mount" again
    async with Replicator(config) as rep:
        summary = await rep.sync_once()
        assert (summary.exit_code, summary.copied) == (0, 1)
    assert replica_path(r1, origin / "b").read_bytes() == b"b"


async def test_layout_cannot_overwrite_the_marker(tmp_path: Path) -> None:
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    write(origin / ".replicator-replica", b"not a marker")
    base = make_config(tmp_path, origin, [r1], max_attempts=1)
    config = Config(inventory=base.inventory, origins=base.origins, engine=base.engine,
                    replicas=(replace(base.replicas[0], layout="{name}"),))
    async with Replicator(config) as rep:
        summary = await rep.sync_once()
        assert summary.exit_code == 1
        [failed] = await rep.inventory.failed()
        assert "marker" in (failed.error or "")
    assert (r1 / ".replicator-replica").read_text().startswith("replicator r1 ")


async def test_two_files_never_share_a_destination(tmp_path: Path) -> None:
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    write(origin / "x" / "same.fits", b"first", mtime=OLD)
    write(origin / "y" / "same.fits", b"second", mtime=OLD + 1)
    base = make_config(tmp_path, origin, [r1], max_attempts=1)
    config = Config(inventory=base.inventory, origins=base.origins, engine=base.engine,
                    replicas=(replace(base.replicas[0], layout="{name}"),))
    async with Replicator(config) as rep:
        summary = await rep.sync_once()
        assert (summary.copied, summary.exit_code) == (1, 1)
        [failed] = await rep.inventory.failed()
        assert failed.path.endswith(b"y/same.fits")
        assert "another origin file" in (failed.error or "")
    assert (r1 / "same.fits").read_bytes() == b"first"  # not overwritten


async def test_folder_that_comes_back_identical_is_not_left_deleted(tmp_path: Path) -> None:
    """Unchanged folders are skipped by digest; a folder found missing loses its digest, so
    when it comes back exactly as it was its files are live again."""
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    for i in range(5):
        write(origin / "night" / f"f{i}", b"%d" % i)
    write(origin / "other" / "g", b"g")
    async with Replicator(make_config(tmp_path, origin, [r1])) as rep:
        assert (await rep.scan())[0].new == 6
        assert (await rep.scan())[0].unchanged == 6  # from the folder digests
        (origin / "night").rename(tmp_path / "away")
        assert (await rep.scan())[0].deleted == 5
        (tmp_path / "away").rename(origin / "night")
        again = (await rep.scan())[0]
        assert (again.changed, again.unchanged) == (5, 1)  # undeleted, not skipped
        assert [s.files for s in await rep.inventory.origin_stats()] == [6]
        os.utime(origin / "night" / "f0", (OLD + 5, OLD + 5))
        assert (await rep.scan())[0].changed == 1


async def test_the_feeder_claims_while_the_replica_is_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first files go to the feeder while the replica is checked (over SSH a login and
    round trips); no copy starts before the check passed."""
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    for i in range(30):
        write(origin / f"d{i % 3}" / f"f{i}.dat", b"x" * i)
    backdate(origin)
    intake = Intake(monkeypatch, expect=30)
    probe, put = LocalTransport.probe, LocalTransport.put
    checking: list[bool] = []
    fed_during_check: list[int] = []

    async def slow_probe(transport: LocalTransport) -> None:
        checking.append(True)
        try:
            with anyio.fail_after(10):  # the feeder gets the files meanwhile
                await intake.fed.wait()
            fed_during_check.append(intake.handed)
            await probe(transport)
        finally:
            checking.append(False)

    async def checked_put(transport: LocalTransport, requests: Sequence[PutRequest],
                          *args: Any) -> Any:
        assert checking[-1] is False, "a copy started before the check passed"
        return await put(transport, requests, *args)

    monkeypatch.setattr(LocalTransport, "probe", slow_probe)
    monkeypatch.setattr(LocalTransport, "put", checked_put)
    async with Replicator(make_config(tmp_path, origin, [r1])) as rep:
        summary = await rep.sync_once()
    assert fed_during_check == [30]
    assert (summary.copied, summary.exit_code) == (30, 0)


async def test_copies_start_before_the_inventory_records_the_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the replica itself passed its check, copies need not wait for the inventory to
    record the marker and the condition (its writer may be busy with a scan's inserts);
    both are recorded by the end of the run."""
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    for i in range(30):
        write(origin / f"d{i % 3}" / f"f{i}.dat", b"x" * i)
    backdate(origin)
    put, set_marker = LocalTransport.put, Inventory.set_replica_marker
    copying = anyio.Event()

    async def noted_put(transport: LocalTransport, *args: Any) -> Any:
        copying.set()
        return await put(transport, *args)

    async def held_marker(inventory: Inventory, replica: str, marker: str) -> None:
        with anyio.fail_after(10):  # a copy starts meanwhile
            await copying.wait()
        await set_marker(inventory, replica, marker)

    monkeypatch.setattr(LocalTransport, "put", noted_put)
    monkeypatch.setattr(Inventory, "set_replica_marker", held_marker)
    async with Replicator(make_config(tmp_path, origin, [r1])) as rep:
        summary = await rep.sync_once()
    assert (summary.copied, summary.exit_code) == (30, 0)
    written = (r1 / ".replicator-replica").read_text().strip()
    with closing(sqlite3.connect(tmp_path / "inventory.db")) as conn:
        assert conn.execute("SELECT marker, condition FROM replicas").fetchall() == [
            (written, "ok")]


async def test_an_unavailable_replica_claims_nothing_until_it_is_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Continuous mode: the copies claimed, or taken from scan batches, while a replica was
    first checked are released uncharged when the check fails, also those still held by
    the feeder (one worker: its queue is full); the checks that retry it claim nothing (no
    claim and release at every retry); once it is back, everything is copied."""
    origin, r1 = tmp_path / "o", tmp_path / "r1"  # r1 does not exist yet: unavailable
    for i in range(80):  # 40 folders: scan batches of 1, 2, 4... folders, a take each
        write(origin / f"d{i % 40:02d}" / f"f{i}.dat", b"y" * i)
    backdate(origin)
    intake = Intake(monkeypatch, expect=80)
    probe = LocalTransport.probe
    probes: list[int] = []  # files handed to the feeder at each probe
    retried = anyio.Event()

    async def counting_probe(transport: LocalTransport) -> None:
        if not probes:  # the first check ends once the feeder has every file
            with anyio.fail_after(10):
                await intake.fed.wait()
        probes.append(intake.handed)
        if len(probes) == 6:  # the first check and five retries (backoff 0.05 s and up)
            retried.set()
        await probe(transport)

    monkeypatch.setattr(LocalTransport, "probe", counting_probe)
    config = make_config(tmp_path, origin, [r1], workers=1)
    async with Replicator(config) as rep:
        async with rep.subscribe(1024) as events, anyio.create_task_group() as tg:
            tg.start_soon(rep.run)
            copied: set[bytes] = set()
            with anyio.fail_after(20):
                await retried.wait()
                with closing(sqlite3.connect(config.inventory)) as db:
                    rows = db.execute("SELECT state, attempts FROM copies").fetchall()
                assert sorted(set(rows)) == [("pending", 0)]
                assert len(rows) == 80
                handed = probes[0]
                assert handed == 80  # all of them, while the replica was first checked
                r1.mkdir()
                async for event in events:
                    if isinstance(event, TransferCompleted):
                        copied.add(os.path.basename(event.path))
                        if len(copied) == 80:
                            break
            rep.stop()
    # The retries before the root came back handed nothing more to the feeder.
    assert probes[1:6] == [handed] * 5
    assert len(copied) == 80


async def test_a_copy_claimed_before_the_scan_saw_its_change_is_copied_in_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run claims due copies before its scan has looked: a file pending from an earlier
    run and changed since is claimed as it was. Its transfer finds the source changed; the
    scan has recorded the new (settled) version by then, so the copy is due at once and
    made in this run, not left for the next one."""
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    write(origin / "a.dat", b"version 1")
    backdate(origin)
    config = make_config(tmp_path, origin, [r1])
    async with Replicator(config) as rep:
        assert (await rep.sync_once()).copied == 1
    with closing(sqlite3.connect(config.inventory)) as db, db:
        db.execute("UPDATE copies SET state = 'pending'")  # to be retried, say
    write(origin / "a.dat", b"version 2, longer")
    backdate(origin, OLD + 10)
    claimed = anyio.Event()
    claim, diff_listings = Inventory.claim, Inventory.diff_listings

    async def noting_claim(inventory: Inventory, *args: Any, **kwargs: Any) -> Any:
        result = await claim(inventory, *args, **kwargs)
        claimed.set()
        return result

    async def after_the_claim(inventory: Inventory, *args: Any, **kwargs: Any) -> Any:
        with anyio.fail_after(10):
            await claimed.wait()
        return await diff_listings(inventory, *args, **kwargs)

    monkeypatch.setattr(Inventory, "claim", noting_claim)
    monkeypatch.setattr(Inventory, "diff_listings", after_the_claim)
    async with Replicator(config) as rep:
        summary = await rep.sync_once()
    assert (summary.copied, summary.pending, summary.exit_code) == (1, 0, 0)
    assert replica_path(r1, origin / "a.dat").read_bytes() == b"version 2, longer"


async def test_a_once_run_ends_when_its_check_fails_while_the_feeder_waits_for_a_retry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The feeder runs beside the replica's check: with nothing else to do it waits for a
    retry due later in the run's window. A check that then finds the replica unavailable
    ends the run at once, instead of after that wait."""
    origin, r1 = tmp_path / "o", tmp_path / "r1"
    r1.mkdir()
    write(origin / "a.dat", b"a")
    backdate(origin)
    config = make_config(tmp_path, origin, [r1], retry_window=60.0)
    async with Replicator(config) as rep:
        assert (await rep.sync_once()).copied == 1
    with closing(sqlite3.connect(config.inventory)) as db, db:
        db.execute("UPDATE copies SET state = 'pending', attempts = 1,"
                   " error_class = 'transient', next_attempt = ?", (time.time() + 30,))
    waiting = anyio.Event()
    next_retry = Inventory.next_retry

    async def noting_next_retry(inventory: Inventory, *args: Any) -> float | None:
        due = await next_retry(inventory, *args)
        waiting.set()
        return due

    async def failing_probe(transport: LocalTransport) -> None:
        with anyio.fail_after(10):
            await waiting.wait()  # the feeder is about to wait for the retry
        await anyio.sleep(0.05)
        raise ReplicaUnavailableError("replica root is gone (the test)")

    monkeypatch.setattr(Inventory, "next_retry", noting_next_retry)
    monkeypatch.setattr(LocalTransport, "probe", failing_probe)
    started = time.monotonic()
    async with Replicator(config) as rep:
        with anyio.fail_after(20):
            summary = await rep.sync_once()
    assert time.monotonic() - started < 10  # not the 30 s wait for the retry
    assert dict(summary.unavailable) == {"r1": "replica root is gone (the test)"}
    assert (summary.copied, summary.pending) == (0, 1)
