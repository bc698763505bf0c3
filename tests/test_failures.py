"""Failure handling under real conditions: blocked paths, read-only mounts, a full disk,
a missing replica root, sources that vanish or change mid-copy, stalls, timeouts, retries.

Mount-based tests need root (they skip otherwise). Faults that cannot be produced for real
come from ``FaultyTransport``, a wrapper around ``LocalTransport`` that injects them.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import backdate, replica_path, temp_files, write

from replicator import (
    Config,
    EngineConfig,
    ErrorClass,
    FileError,
    OriginConfig,
    ReplicaConfig,
    Replicator,
    TransferFailed,
)
from replicator._inventory import CopyState
from replicator.transports import (
    Capabilities,
    DestStat,
    LocalTransport,
    Progress,
    PutRequest,
    PutResult,
    PutStatus,
)

pytestmark = pytest.mark.anyio

RUN_LIMIT = 30  # seconds any single sync_once may take before the test fails


# -- helpers ------------------------------------------------------------------------------


def config_for(
    tmp: Path,
    origin: Path,
    replicas: Sequence[Path],
    *,
    retry_window: float = 0.01,
    settle: float = 1.0,
    **replica_keys: Any,
) -> Config:
    keys: dict[str, Any] = {"backoff_initial": 0.05, "backoff_max": 0.2, **replica_keys}
    return Config(
        inventory=tmp / "inventory.db",
        origins=(OriginConfig("raw", str(origin), host="inst", settle_seconds=settle,
                              scan_interval=0.5),),
        replicas=tuple(ReplicaConfig(str(r), **keys) for r in replicas),
        engine=EngineConfig(retry_window=retry_window, shutdown_grace=5.0),
    )


def copies(config: Config, replica: str) -> dict[str, dict[str, Any]]:
    """Every copy row of a replica, by origin file name, read straight from the inventory."""
    db = sqlite3.connect(config.inventory)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute(
            "SELECT f.name, c.state, c.attempts, c.error_class, c.error, c.next_attempt"
            " FROM copies c JOIN files f ON f.id = c.file_id WHERE c.replica = ?",
            (replica,),
        ).fetchall()
    finally:
        db.close()
    return {os.fsdecode(row["name"]): dict(row) for row in rows}


async def stats(rep: Replicator, name: str) -> Any:
    (found,) = [s for s in await rep.inventory.replica_stats(time.time()) if s.name == name]
    return found


async def sync(rep: Replicator, limit: float = RUN_LIMIT) -> Any:
    with anyio.fail_after(limit):
        return await rep.sync_once()


def drain(events: Any) -> list[Any]:
    received = []
    while True:
        try:
            received.append(events.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            return received


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


@pytest.fixture
def mounts() -> Iterator[Callable[..., None]]:
    """``mount(*args, target)``: mount, skipping the test if that is not possible here;
    everything mounted is unmounted at the end, innermost first."""
    mounted: list[str] = []

    def mount(*args: str) -> None:
        result = run("mount", *args)
        if result.returncode != 0:
            pytest.skip(f"cannot mount ({' '.join(args)}): needs root and mount rights:"
                        f" {result.stderr.strip()}")
        if args[-1] not in mounted:
            mounted.append(args[-1])

    yield mount
    for target in reversed(mounted):
        run("umount", target)


def ro_bind(mount: Callable[..., None], folder: Path) -> None:
    mount("--bind", str(folder), str(folder))
    mount("-o", "remount,bind,ro", str(folder))


class FaultyTransport:
    """A ``LocalTransport`` with injectable faults.

    ``on_put(request, progress)`` runs before each file is handed to the real transport;
    it may return a result instead (the file is then not copied), or hang. ``probe_hangs``
    makes probe() never answer.
    """

    def __init__(
        self,
        root: Path,
        on_put: Callable[[PutRequest, Progress], Awaitable[PutResult | None]] | None = None,
        *,
        probe_hangs: bool = False,
        progress_hook: Callable[[PutRequest], None] | None = None,
    ) -> None:
        self.inner = LocalTransport(str(root), anyio.CapacityLimiter(4))
        self.on_put = on_put
        self.probe_hangs = probe_hangs
        self.progress_hook = progress_hook
        self.puts: list[bytes] = []  # source paths, one per attempt

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    async def probe(self) -> None:
        if self.probe_hangs:
            await anyio.sleep_forever()
        await self.inner.probe()

    async def prepare(self) -> None:
        await self.inner.prepare()

    async def stat(self, dest: bytes) -> DestStat | None:
        return await self.inner.stat(dest)

    async def listdir(self, dest: bytes) -> list[bytes]:
        return await self.inner.listdir(dest)

    async def remove(self, dest: bytes) -> None:
        await self.inner.remove(dest)

    async def remove_stale_temps(self, dirs: Iterable[bytes], run_id: str) -> int:
        return await self.inner.remove_stale_temps(dirs, run_id)

    async def read_marker(self) -> str | None:
        return await self.inner.read_marker()

    async def write_marker(self, text: str) -> None:
        await self.inner.write_marker(text)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def put(
        self, requests: Sequence[PutRequest], run_id: str, progress: Progress
    ) -> list[PutResult]:
        # One file at a time, so a fault hits exactly one file of the batch.
        for request in requests:
            self.puts.append(request.source)
            if self.on_put is not None:
                injected = await self.on_put(request, progress)
                if injected is not None:
                    progress.results.append(injected)
                    progress.add(files=1)
                    continue
            inner_progress = progress
            if self.progress_hook is not None:
                inner_progress = _HookedProgress(progress, request, self.progress_hook)
            await self.inner.put([request], run_id, inner_progress)
        return progress.results


class _HookedProgress(Progress):
    """Forwards to the engine's Progress, calling ``hook`` (in the copying thread) the first
    time bytes move."""

    __slots__ = ("_fired", "_hook", "_outer", "_request")

    def __init__(self, outer: Progress, request: PutRequest,
                 hook: Callable[[PutRequest], None]) -> None:
        super().__init__()
        self.results = outer.results
        self._outer = outer
        self._request = request
        self._hook = hook
        self._fired = False

    def add(self, nbytes: int = 0, files: int = 0) -> None:
        self._outer.add(nbytes, files)
        if nbytes and not self._fired:
            self._fired = True
            self._hook(self._request)


def error_result(request: PutRequest, error_class: ErrorClass) -> PutResult:
    return PutResult(request, PutStatus.ERROR,
                     error=FileError(f"injected {error_class} error", error_class))


# -- 1. blocked destination paths ---------------------------------------------------------


async def test_blocked_destination_is_permanent_and_fails_after_max_attempts(
    tmp_path: Path, tree: tuple[Path, Path, Path]
) -> None:
    origin, r1, _ = tree
    write(origin / "sub" / "a.dat", b"a" * 100)  # needs folder sub/, where a file lies
    write(origin / "b.dat", b"b" * 100)  # its place is taken by a folder
    write(origin / "ok1.dat", b"1" * 100)
    write(origin / "deep" / "ok2.dat", b"2" * 100)
    file_blocker = write(replica_path(r1, origin / "sub"), b"i am a file")
    dir_blocker = replica_path(r1, origin / "b.dat")
    write(dir_blocker / "inside.txt", b"keep me")
    # backoff 0: both copies are due again at once, yet a one-shot run must leave
    # non-transient errors for the next run.
    config = config_for(tmp_path, origin, [r1], max_attempts=2, backoff_initial=0.0,
                        retry_window=5.0)

    async with Replicator(config) as rep:
        first = await sync(rep)
        rows = copies(config, "r1")
        for name in ("a.dat", "b.dat"):
            assert rows[name]["state"] == "pending"
            assert rows[name]["attempts"] == 1
            assert rows[name]["error_class"] == "permanent"
            assert "blocked" in rows[name]["error"]
        assert rows["ok1.dat"]["state"] == rows["ok2.dat"]["state"] == "replicated"
        assert replica_path(r1, origin / "ok1.dat").read_bytes() == b"1" * 100
        assert replica_path(r1, origin / "deep" / "ok2.dat").read_bytes() == b"2" * 100
        assert first.copied == 2
        assert first.exit_code == 1

        second = await sync(rep)
        failed = {os.path.basename(f.path): f for f in await rep.inventory.failed()}
        assert set(failed) == {b"a.dat", b"b.dat"}
        assert all(f.attempts == 2 and f.error_class == "permanent" for f in failed.values())
        assert second.failed == 2
        assert second.exit_code == 1
        assert (await stats(rep, "r1")).replicated == 2

    assert file_blocker.read_bytes() == b"i am a file"
    assert os.listdir(dir_blocker) == ["inside.txt"]
    assert (dir_blocker / "inside.txt").read_bytes() == b"keep me"
    assert temp_files(r1) == []


# -- 2. read-only mounts ----------------------------------------------------------------


async def test_read_only_subfolder_is_a_permission_error(
    tmp_path: Path, tree: tuple[Path, Path, Path], mounts: Callable[..., None]
) -> None:
    origin, r1, _ = tree
    write(origin / "locked" / "a.dat", b"a" * 100)
    write(origin / "free.dat", b"f" * 100)
    locked = replica_path(r1, origin / "locked")
    locked.mkdir(parents=True)
    ro_bind(mounts, locked)
    config = config_for(tmp_path, origin, [r1])

    async with Replicator(config) as rep:
        summary = await sync(rep)
        rows = copies(config, "r1")
        assert rows["a.dat"]["state"] == "pending"
        assert rows["a.dat"]["error_class"] == "permission"
        assert rows["a.dat"]["attempts"] == 1
        assert rows["free.dat"]["state"] == "replicated"
        replica = await stats(rep, "r1")
        assert replica.condition == "ok"
        assert replica.last_error is None
        assert summary.unavailable == ()
        assert summary.exit_code == 1
    assert os.listdir(locked) == []


async def test_read_only_replica_root_is_unavailable_until_writable(
    tmp_path: Path, tree: tuple[Path, Path, Path], mounts: Callable[..., None]
) -> None:
    origin, r1, _ = tree
    write(origin / "a.dat", b"a" * 100)
    write(origin / "sub" / "b.dat", b"b" * 100)
    ro_bind(mounts, r1)
    config = config_for(tmp_path, origin, [r1])

    async with Replicator(config) as rep:
        summary = await sync(rep)
        replica = await stats(rep, "r1")
        assert replica.condition == "unavailable"
        assert replica.last_error is not None
        assert "not writable" in replica.last_error
        rows = copies(config, "r1")
        assert {n: (r["state"], r["attempts"], r["error_class"]) for n, r in rows.items()} == {
            "a.dat": ("pending", 0, None), "b.dat": ("pending", 0, None)}
        assert summary.copied == 0
        assert dict(summary.unavailable).keys() == {"r1"}
        assert summary.exit_code == 3
        assert await rep.inventory.failed() == []

        assert run("umount", str(r1)).returncode == 0
        summary = await sync(rep)
        assert summary.copied == 2
        assert summary.exit_code == 0
        assert (await stats(rep, "r1")).condition == "ok"
    assert replica_path(r1, origin / "sub" / "b.dat").read_bytes() == b"b" * 100


# -- 3. a full disk -----------------------------------------------------------------------


async def test_full_replica_is_no_space_and_leaves_nothing_behind(
    tmp_path: Path, tree: tuple[Path, Path, Path], mounts: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No copy helper started beside the copies (these four go in a worker thread anyway):
    # a process spawned while the big file's temp is being removed holds the descriptors
    # it inherited until it execs, and so, for a moment, the temp's space; a small file
    # written then (rightly) gets no_space too, and which one does is a race (1 run in 5
    # once the copies no longer waited for the inventory's record of the replica's check).
    async def no_helper_ahead(transport: LocalTransport) -> None:
        return None

    monkeypatch.setattr(LocalTransport, "prepare", no_helper_ahead)
    origin, r1, _ = tree
    big = os.urandom(4 << 20)
    write(origin / "big.dat", big)
    for i in range(3):
        write(origin / f"small{i}.dat", bytes([i]) * 10_000)
    mounts("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(r1))
    # One worker: with several, a small file written while the big one fills the disk also
    # (rightly) gets no_space, and which one does is a race.
    config = config_for(tmp_path, origin, [r1], workers=1)

    async with Replicator(config) as rep:
        summary = await sync(rep)
        rows = copies(config, "r1")
        assert rows["big.dat"]["state"] == "pending"
        assert rows["big.dat"]["error_class"] == "no_space"
        for i in range(3):
            assert rows[f"small{i}.dat"]["state"] == "replicated"
            assert replica_path(r1, origin / f"small{i}.dat").read_bytes() == bytes([i]) * 10_000
        assert summary.copied == 3
        assert summary.exit_code == 1
        assert (await stats(rep, "r1")).condition == "ok"
    assert not replica_path(r1, origin / "big.dat").exists()
    assert temp_files(r1) == []


# -- 4. a missing replica root --------------------------------------------------------


async def test_missing_replica_root_is_unavailable_then_catches_up(
    tmp_path: Path, tree: tuple[Path, Path, Path]
) -> None:
    origin, _, _ = tree
    root = tmp_path / "not-mounted"
    write(origin / "a.dat", b"a" * 100)
    write(origin / "b.dat", b"b" * 100)
    config = config_for(tmp_path, origin, [root])

    async with Replicator(config) as rep:
        summary = await sync(rep)
        replica = await stats(rep, "not-mounted")
        assert replica.condition == "unavailable"
        assert replica.last_error is not None
        assert "does not exist" in replica.last_error
        assert replica.pending == 2
        rows = copies(config, "not-mounted")
        assert [(r["state"], r["attempts"], r["error_class"]) for r in rows.values()] == [
            ("pending", 0, None)] * 2
        assert summary.exit_code == 3
        assert not root.exists()  # an unmounted mount point must not receive copies

        root.mkdir()
        summary = await sync(rep)
        assert summary.copied == 2
        assert summary.exit_code == 0
        assert (await stats(rep, "not-mounted")).condition == "ok"
    assert replica_path(root, origin / "b.dat").read_bytes() == b"b" * 100


# -- 5. a source that vanishes after the scan ------------------------------------------


async def test_source_vanishing_before_copy_drops_the_copy(
    tmp_path: Path, tree: tuple[Path, Path, Path]
) -> None:
    origin, r1, _ = tree
    gone = write(origin / "gone.dat", b"g" * 100)
    write(origin / "stays.dat", b"s" * 100)

    async def delete_source(request: PutRequest, progress: Progress) -> PutResult | None:
        if request.source == os.fsencode(gone):
            gone.unlink()
        return None

    transport = FaultyTransport(r1, delete_source)
    config = config_for(tmp_path, origin, [r1])
    async with Replicator(config, transports={"r1": transport}) as rep:
        async with rep.subscribe() as events:
            summary = await sync(rep)
            failures = [e for e in drain(events) if isinstance(e, TransferFailed)]
        assert os.fsencode(gone) in transport.puts  # the copy was really attempted
        assert failures == []
        rows = copies(config, "r1")
        assert rows["stays.dat"]["state"] == "replicated"
        # Not charged, not failed: a source missing at copy time may come back (a folder
        # moved away and back); only the scanner decides that the file is gone.
        assert (rows["gone.dat"]["state"], rows["gone.dat"]["attempts"]) == ("pending", 0)
        assert rows["gone.dat"]["error_class"] is None
        assert summary.copied == 1
        assert summary.failed == summary.errors == 0
        assert summary.exit_code == 0
        assert await rep.inventory.failed() == []
        [scan] = await rep.scan()
        assert scan.deleted == 1
        assert set(copies(config, "r1")) == {"stays.dat"}  # dropped, not failed
    assert not replica_path(r1, gone).exists()


# -- 6. a source that changes while it is copied ---------------------------------------


async def test_source_changed_during_copy_is_discarded_then_copied_when_settled(
    tmp_path: Path, tree: tuple[Path, Path, Path]
) -> None:
    origin, r1, _ = tree
    old = os.urandom(1 << 20) * 24  # 24 MiB: several chunks
    source = write(origin / "growing.dat", old)
    final = replica_path(r1, source)
    seen_temp: list[list[str]] = []

    def append(request: PutRequest) -> None:
        # Runs in the copying thread after the first chunk moved: the copy is under way.
        seen_temp.append(temp_files(r1))
        with open(request.source, "ab") as f:
            f.write(b"appended while copying")

    transport = FaultyTransport(r1, progress_hook=append)
    config = config_for(tmp_path, origin, [r1])
    async with Replicator(config, transports={"r1": transport}) as rep:
        summary = await sync(rep)
        assert len(seen_temp) == 1
        assert len(seen_temp[0]) == 1
        assert not final.exists()
        assert temp_files(r1) == []
        rows = copies(config, "r1")
        assert rows["growing.dat"]["state"] == "pending"
        assert rows["growing.dat"]["attempts"] == 0  # not charged
        assert rows["growing.dat"]["error_class"] is None
        assert summary.copied == 0
        assert summary.errors == 0

        transport.progress_hook = None
        backdate(origin)  # the writer is done: the new version has settled
        summary = await sync(rep)
        assert summary.copied == 1
        assert copies(config, "r1")["growing.dat"]["state"] == "replicated"
    assert final.read_bytes() == old + b"appended while copying"


# -- 7. stalls and timeouts --------------------------------------------------------------


async def test_stalled_transfer_is_abandoned_and_others_replicate(
    tmp_path: Path, tree: tuple[Path, Path, Path]
) -> None:
    origin, r1, _ = tree
    # The stuck file is the oldest, so it is first in the (single) batch.
    stuck = write(origin / "stuck.dat", b"s" * 100, mtime=time.time() - 7200)
    write(origin / "a.dat", b"a" * 100)
    write(origin / "b.dat", b"b" * 100)

    async def hang(request: PutRequest, progress: Progress) -> PutResult | None:
        if request.source == os.fsencode(stuck):
            await anyio.sleep_forever()
        return None

    transport = FaultyTransport(r1, hang)
    config = config_for(tmp_path, origin, [r1], workers=1, stall_timeout=1.0)
    async with Replicator(config, transports={"r1": transport}) as rep:
        async with rep.subscribe() as events:
            summary = await sync(rep, limit=15)
            failures = [e for e in drain(events) if isinstance(e, TransferFailed)]
        # Retried within the run's retry window if time allows: once or more, never other.
        assert failures
        assert {(e.path, e.error_class) for e in failures} == {(os.fsencode(stuck), "transient")}
        assert all("no progress" in e.error for e in failures)
        rows = copies(config, "r1")
        assert rows["stuck.dat"]["state"] == "pending"
        assert rows["stuck.dat"]["error_class"] == "transient"
        assert rows["stuck.dat"]["attempts"] == len(failures)
        assert rows["a.dat"]["state"] == rows["b.dat"]["state"] == "replicated"
        assert summary.copied == 2
        assert summary.exit_code == 1
        assert (await stats(rep, "r1")).condition == "ok"
    assert not replica_path(r1, stuck).exists()
    assert temp_files(r1) == []


async def test_probe_timeout_makes_replica_unavailable(
    tmp_path: Path, tree: tuple[Path, Path, Path]
) -> None:
    origin, r1, _ = tree
    write(origin / "a.dat", b"a" * 100)
    transport = FaultyTransport(r1, probe_hangs=True)
    config = config_for(tmp_path, origin, [r1], op_timeout=1.0)
    async with Replicator(config, transports={"r1": transport}) as rep:
        summary = await sync(rep, limit=15)
        replica = await stats(rep, "r1")
        assert replica.condition == "unavailable"
        assert replica.last_error
        assert replica.pending == 1
        assert transport.puts == []
        assert summary.exit_code == 3
        assert copies(config, "r1")["a.dat"]["attempts"] == 0


# -- 8. retry_window ------------------------------------------------------------------


def fail_first(times: int, error_class: ErrorClass
               ) -> Callable[[PutRequest, Progress], Awaitable[PutResult | None]]:
    calls: dict[bytes, int] = {}

    async def inject(request: PutRequest, progress: Progress) -> PutResult | None:
        calls[request.source] = calls.get(request.source, 0) + 1
        if os.path.basename(request.source) == b"flaky.dat" and calls[request.source] <= times:
            return error_result(request, error_class)
        return None

    return inject


async def test_transient_errors_are_retried_within_retry_window(
    tmp_path: Path, tree: tuple[Path, Path, Path]
) -> None:
    origin, r1, _ = tree
    flaky = write(origin / "flaky.dat", b"f" * 100)
    write(origin / "other.dat", b"o" * 100)
    transport = FaultyTransport(r1, fail_first(2, ErrorClass.TRANSIENT))
    config = config_for(tmp_path, origin, [r1], retry_window=5.0, backoff_initial=0.05)
    async with Replicator(config, transports={"r1": transport}) as rep:
        summary = await sync(rep)
        assert transport.puts.count(os.fsencode(flaky)) == 3
        assert copies(config, "r1")["flaky.dat"]["state"] == "replicated"
        assert copies(config, "r1")["flaky.dat"]["attempts"] == 0
        assert summary.copied == 2
        assert summary.exit_code == 0
    assert replica_path(r1, flaky).read_bytes() == b"f" * 100


async def test_transient_error_outside_retry_window_stays_pending(
    tmp_path: Path, tree: tuple[Path, Path, Path]
) -> None:
    origin, r1, _ = tree
    flaky = write(origin / "flaky.dat", b"f" * 100)
    write(origin / "other.dat", b"o" * 100)
    transport = FaultyTransport(r1, fail_first(2, ErrorClass.TRANSIENT))
    # The smallest window there is: the retry falls outside it, however quick the backoff.
    config = config_for(tmp_path, origin, [r1], retry_window=1e-9, backoff_initial=0.05)
    async with Replicator(config, transports={"r1": transport}) as rep:
        summary = await sync(rep)
        assert transport.puts.count(os.fsencode(flaky)) == 1
        row = copies(config, "r1")["flaky.dat"]
        assert (row["state"], row["attempts"], row["error_class"]) == ("pending", 1, "transient")
        assert copies(config, "r1")["other.dat"]["state"] == "replicated"
        assert summary.pending == 1
        assert summary.exit_code == 1


# -- 9. max_attempts and retry of failed copies ---------------------------------------


async def test_failed_after_exactly_max_attempts_then_retry_resets(
    tmp_path: Path, tree: tuple[Path, Path, Path]
) -> None:
    origin, r1, _ = tree
    flaky = write(origin / "flaky.dat", b"f" * 100)
    transport = FaultyTransport(r1, fail_first(10**6, ErrorClass.PERMANENT))
    config = config_for(tmp_path, origin, [r1], max_attempts=3, backoff_initial=0.0,
                        retry_window=5.0)
    async with Replicator(config, transports={"r1": transport}) as rep:
        for attempt in (1, 2):
            summary = await sync(rep)
            row = copies(config, "r1")["flaky.dat"]
            assert (row["state"], row["attempts"]) == ("pending", attempt)
            assert summary.exit_code == 1
        summary = await sync(rep)
        (failed,) = await rep.inventory.failed()
        assert failed.path == os.fsencode(flaky)
        assert failed.attempts == 3
        assert failed.error_class == "permanent"
        assert summary.failed == 1
        await sync(rep)  # a failed copy is not tried again
        assert transport.puts.count(os.fsencode(flaky)) == 3

        changed = await rep.inventory.set_state(
            to=CopyState.PENDING, from_states=(CopyState.FAILED,), replica=None, paths=None)
        assert changed == 1
        assert await rep.inventory.failed() == []
        row = copies(config, "r1")["flaky.dat"]
        assert (row["state"], row["attempts"], row["error_class"]) == ("pending", 0, None)

        transport.on_put = None
        summary = await sync(rep)
        assert summary.copied == 1
        assert summary.exit_code == 0
    assert replica_path(r1, flaky).read_bytes() == b"f" * 100


# -- 10. a deleted origin file ----------------------------------------------------------


async def test_deleted_origin_file_drops_pending_copies_keeps_replicated_ones(
    tmp_path: Path, tree: tuple[Path, Path, Path]
) -> None:
    origin, r1, r2 = tree
    doomed = write(origin / "doomed.dat", b"d" * 100)
    write(origin / "kept.dat", b"k" * 100)
    config = config_for(tmp_path, origin, [r1, r2])
    async with Replicator(config) as rep:
        summary = await sync_replicas(rep, ["r1"])
        assert summary.copied == 2
        assert copies(config, "r2")["doomed.dat"]["state"] == "pending"

        doomed.unlink()
        summary = await sync(rep)
        assert summary.copied == 1  # kept.dat to r2
        assert summary.failed == summary.pending == summary.errors == 0
        assert summary.exit_code == 0
        assert set(copies(config, "r2")) == {"kept.dat"}
        assert copies(config, "r1")["doomed.dat"]["state"] == "replicated"
        assert await rep.inventory.failed() == []
        r1_stats, r2_stats = await stats(rep, "r1"), await stats(rep, "r2")
        assert (r1_stats.files, r1_stats.replicated) == (2, 2)
        assert (r2_stats.files, r2_stats.replicated, r2_stats.pending) == (1, 1, 0)
    assert replica_path(r1, doomed).read_bytes() == b"d" * 100
    assert not replica_path(r2, doomed).exists()


async def sync_replicas(rep: Replicator, names: list[str]) -> Any:
    with anyio.fail_after(RUN_LIMIT):
        return await rep.sync_once(names)


# -- 5b. a source replaced by a fifo after the scan ---------------------------------------


async def test_source_replaced_by_fifo_does_not_hang(
    tmp_path: Path, tree: tuple[Path, Path, Path]
) -> None:
    origin, r1, _ = tree
    piped = write(origin / "piped.dat", b"p" * 100)
    write(origin / "plain.dat", b"x" * 100)

    async def make_fifo(request: PutRequest, progress: Progress) -> PutResult | None:
        if request.source == os.fsencode(piped):
            piped.unlink()
            os.mkfifo(piped)
        return None

    transport = FaultyTransport(r1, make_fifo)
    # A stall timeout far beyond the run's limit: only not blocking on the fifo passes.
    config = config_for(tmp_path, origin, [r1], workers=1, stall_timeout=60.0)
    try:
        async with Replicator(config, transports={"r1": transport}) as rep:
            summary = await sync(rep, limit=10)
            assert summary.copied == 1
            assert summary.errors == 0
            row = copies(config, "r1")["piped.dat"]
            assert (row["state"], row["attempts"]) == ("pending", 0)
            assert copies(config, "r1")["plain.dat"]["state"] == "replicated"
    finally:
        # Should a reader be blocked in open(), a writer lets it go.
        if piped.is_fifo():
            with suppress(OSError):
                os.close(os.open(piped, os.O_WRONLY | os.O_NONBLOCK))
    assert not replica_path(r1, piped).exists()
    assert temp_files(r1) == []
