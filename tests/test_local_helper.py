"""The copy helper process of local replicas: progress, cancellation, and its death."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import backdate, make_config, write
from structlog.testing import capture_logs

from replicator import Replicator
from replicator._inventory import Kind
from replicator.transports import (
    LocalTransport,
    Progress,
    PutRequest,
    PutResult,
    PutStatus,
    _spares,
)
from replicator.transports._local_helper import CopyHelper

pytestmark = pytest.mark.anyio

# Imported by the helper's interpreter at start-up (PYTHONPATH): every file it copies takes
# 20 ms longer, so a batch lasts long enough to watch and to cancel. The files take the
# Python path, which reports each file (the accelerator reports a group of files at once).
SLOW_HELPER = '''
import time
from replicator import _accelerator
from replicator.transports import _local_batch

_accelerator._fastcopy = None

_stage = _local_batch.BatchWriter._stage

def slow_stage(self, *args, **kwargs):
    time.sleep(0.02)
    return _stage(self, *args, **kwargs)

_local_batch.BatchWriter._stage = slow_stage
'''


class Watched(Progress):
    """Progress that says when the first of it arrived (frames arrive on the event loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.moved = anyio.Event()

    def add(self, nbytes: int = 0, files: int = 0) -> None:
        super().add(nbytes, files)
        self.moved.set()


def sources(folder: Path, count: int, under: str = "out") -> list[PutRequest]:
    """``count`` new files in ``folder``, each to be copied to ``under/NNNN.dat``."""
    requests = []
    for i in range(count):
        path = write(folder / f"{i:04}.dat", os.urandom(1000 + i))
        st = path.stat()
        requests.append(PutRequest(os.fsencode(path), f"{under}/{i:04}.dat".encode(), Kind.FILE,
                                   st.st_size, st.st_mtime_ns, 0o644))
    return requests


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.startswith(".~rep-")]


@pytest.fixture
def slow_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_HELPER)
    monkeypatch.setenv("PYTHONPATH", str(hooks))


async def test_batches_run_in_the_helper_with_progress(tmp_path: Path,
                                                      slow_helper: None) -> None:
    root = tmp_path / "replica"
    root.mkdir()
    requests = sources(tmp_path / "src", 60)
    transport = LocalTransport(str(root), anyio.CapacityLimiter(2), helper_min_files=1)
    try:
        await transport.prepare()
        progress = Progress()
        seen: list[int] = []

        async def watch() -> None:
            while True:
                seen.append(progress.files)
                await anyio.sleep(0.1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            results = await transport.put(requests, "run1", progress)
            tg.cancel_scope.cancel()
        assert transport.transfer == "helper"
        assert [r.status for r in results] == [PutStatus.COPIED] * len(requests)
        assert [r.request for r in results] == requests  # the caller's own objects
        # Progress came while the batch ran (1.2 s), not only at its end.
        assert any(0 < files < len(requests) for files in seen), seen
        for request in requests:
            assert (root / os.fsdecode(request.dest)).read_bytes() == \
                Path(os.fsdecode(request.source)).read_bytes()
    finally:
        await transport.aclose()


async def test_cancelled_batch_stops_the_helper_and_leaves_no_temp_file(
        tmp_path: Path, slow_helper: None) -> None:
    root = tmp_path / "replica"
    root.mkdir()
    requests = sources(tmp_path / "src", 200)  # 4 s in the slowed helper
    transport = LocalTransport(str(root), anyio.CapacityLimiter(2), helper_min_files=1)
    progress = Watched()
    with anyio.move_on_after(10):
        async with anyio.create_task_group() as tg:

            async def cancel_when_started() -> None:
                await progress.moved.wait()
                started = time.monotonic()
                tg.cancel_scope.cancel()
                cancelled_at.append(started)

            cancelled_at: list[float] = []
            tg.start_soon(cancel_when_started)
            await transport.put(requests, "run1", progress)
    assert cancelled_at, "the batch finished before it could be cancelled"
    assert time.monotonic() - cancelled_at[0] < 1.0  # put did not wait for the helper
    assert progress.cancelled
    [helper] = transport._helpers
    stopping = list(helper._stopping)
    assert len(stopping) == 1
    await transport.aclose()
    assert stopping[0].returncode is not None
    assert leftovers(root) == []
    # Renames come after a whole batch is staged and flushed: a batch cancelled while
    # staging renames nothing. Whatever has its final name is whole.
    done = list((root / "out").iterdir())
    assert len(done) < len(requests)
    for path in done:
        assert path.read_bytes() == (tmp_path / "src" / path.name).read_bytes()


async def test_a_dead_helper_hands_over_to_threads(tmp_path: Path) -> None:
    root = tmp_path / "replica"
    root.mkdir()
    requests = sources(tmp_path / "src", 30)
    transport = LocalTransport(str(root), anyio.CapacityLimiter(2), helper_min_files=1)
    try:
        helper = transport._pick_helper()
        assert helper is not None
        await helper.start()
        assert helper.process is not None
        helper.process.kill()
        await helper.process.wait()
        with capture_logs() as logs:
            results = await transport.put(requests, "run1", Progress())
        assert [r.status for r in results] == [PutStatus.COPIED] * len(requests)
        assert transport.transfer == "threads"
        assert any(e["event"] == "local copies go on in worker threads" for e in logs)
        assert leftovers(root) == []
        # And it stays so: the next batch goes to the threads at once.
        more = sources(tmp_path / "more", 3, under="more/out")
        assert [r.status for r in await transport.put(more, "run1", Progress())] == [
            PutStatus.COPIED] * 3
    finally:
        await transport.aclose()


async def test_a_batch_of_few_files_does_not_start_the_helper(tmp_path: Path) -> None:
    root = tmp_path / "replica"
    root.mkdir()
    transport = LocalTransport(str(root), anyio.CapacityLimiter(2))  # the default threshold
    try:
        few = sources(tmp_path / "few", 3)
        assert [r.status for r in await transport.put(few, "run1", Progress())] == [
            PutStatus.COPIED] * 3
        assert transport._helpers == []  # a few files: worker threads, no start-up to pay
        many = sources(tmp_path / "many", 40, under="many/out")
        assert [r.status for r in await transport.put(many, "run1", Progress())] == [
            PutStatus.COPIED] * 40
        [helper] = transport._helpers
        assert helper.process is not None
    finally:
        await transport.aclose()


async def test_prepare_starts_the_first_helper(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine prepares a replica once a copy is due: the helper's interpreter starts
    up while the first batch is claimed, and that batch finds it. A run with nothing to copy
    prepares nothing, so starts no helper."""
    spawned: list[int] = []
    start = CopyHelper.start

    async def counting_start(self: CopyHelper) -> None:
        await start(self)  # (prepare's and a batch's may start the same helper together)
        if self.process is not None and self.process.pid not in spawned:
            spawned.append(self.process.pid)

    monkeypatch.setattr(CopyHelper, "start", counting_start)
    root = tmp_path / "replica"
    root.mkdir()
    transport = LocalTransport(str(root), anyio.CapacityLimiter(2), helpers=2)
    try:
        await transport.prepare()
        assert len(spawned) == 1  # spawned, before any batch
        requests = sources(tmp_path / "src", 40)
        assert [r.status for r in await transport.put(requests, "run1", Progress())] == [
            PutStatus.COPIED] * 40
        assert len(spawned) == 1
        assert len(transport._helpers) == 1
    finally:
        await transport.aclose()

    without = LocalTransport(str(root), anyio.CapacityLimiter(2), helper=False)
    await without.prepare()
    assert without._helpers == []
    assert len(spawned) == 1

    # Through the engine: the first run prepares (a helper), a run with nothing to do not.
    origin = tmp_path / "origin"
    for i in range(40):
        write(origin / f"{i:02}.dat", b"x" * i)
    backdate(origin)
    replica = tmp_path / "engine-replica"
    replica.mkdir()
    spawned.clear()
    async with Replicator(make_config(tmp_path, origin, [replica])) as rep:
        assert (await rep.sync_once()).copied == 40
        assert len(spawned) == 1
        assert (await rep.sync_once()).copied == 0
        assert len(spawned) == 1


async def test_spares_are_taken_first_and_the_others_stopped(tmp_path: Path) -> None:
    """Helpers started ahead (as the command line does) are the ones a replica's batches
    run in; those not taken are stopped when the block ends, without waiting for them."""
    root = tmp_path / "replica"
    root.mkdir()
    async with _spares.spare_processes(3):
        spares = list(_spares._helpers)
        assert len(spares) == 3
        transport = LocalTransport(str(root), anyio.CapacityLimiter(2), helpers=1)
        try:
            results = await transport.put(sources(tmp_path / "src", 40), "run1", Progress())
            assert [r.status for r in results] == [PutStatus.COPIED] * 40
            taken = transport._helpers[0].process
            assert taken in spares
            assert taken not in _spares._helpers
            assert len(_spares._helpers) == 2
        finally:
            await transport.aclose()
        assert taken.returncode == 0  # its replica stopped it: end of input
    assert _spares._helpers == []
    assert all(p.returncode is not None for p in spares)
    assert len(list((root / "out").iterdir())) == 40


@pytest.mark.parametrize("helpers", [1, 2])
async def test_batches_at_once_run_in_as_many_helpers_as_allowed(
        tmp_path: Path, slow_helper: None, helpers: int) -> None:
    """A batch that finds the helpers busy starts another, up to ``helpers``; beyond that
    batches wait their turn. Every batch lands whole either way."""
    root = tmp_path / "replica"
    root.mkdir()
    batches = []
    for b in range(3):
        # 0.4 s each in the slowed helper
        batches.append(sources(tmp_path / f"src{b}", 20, under=f"b{b}/out"))
    transport = LocalTransport(str(root), anyio.CapacityLimiter(4), helper_min_files=1,
                               helpers=helpers)
    results: list[list[PutStatus]] = []
    try:
        async def put(batch: list[PutRequest]) -> None:
            done = await transport.put(batch, "run1", Progress())
            results.append([r.status for r in done])

        async with anyio.create_task_group() as tg:
            for batch in batches:
                tg.start_soon(put, batch)
        assert len(transport._helpers) == helpers
        assert all(h.process is not None for h in transport._helpers)
        assert transport.transfer == "helper"
    finally:
        await transport.aclose()
    assert results == [[PutStatus.COPIED] * 20] * 3
    for b, batch in enumerate(batches):
        for request in batch:
            assert (root / f"b{b}" / os.fsdecode(request.dest).split("/", 1)[1]).read_bytes() \
                == Path(os.fsdecode(request.source)).read_bytes()
    assert leftovers(root) == []


def test_a_large_file_is_pushed_to_disk_chunk_by_chunk(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each chunk of a large file is handed to the disk as soon as it is copied, so the
    batch's flush waits for the last one only; small files are left to that flush."""
    from replicator.transports import _local_batch

    real = _local_batch._start_writeback
    assert real is not None  # Linux: sync_file_range is in the C library
    pushed: list[tuple[int, int]] = []

    def recording(fd: int, offset: int, count: int) -> None:
        pushed.append((offset, count))
        real(fd, offset, count)

    monkeypatch.setattr(_local_batch, "_start_writeback", recording)
    monkeypatch.setattr(_local_batch, "CHUNK", 1 << 20)
    root = tmp_path / "replica"
    root.mkdir()
    big = write(tmp_path / "src" / "big.bin", os.urandom((3 << 20) + 5))
    small = write(tmp_path / "src" / "small.txt", b"small")
    requests = [PutRequest(os.fsencode(p), os.fsencode(p.name), Kind.FILE, p.stat().st_size,
                           p.stat().st_mtime_ns, 0o644) for p in (big, small)]
    results: list[PutResult] = []
    _local_batch.BatchWriter(os.fsencode(root), fsync=True).put_batch(
        requests, "run1", Progress(), results)
    assert [r.status for r in results] == [PutStatus.COPIED] * 2
    assert (root / "big.bin").read_bytes() == big.read_bytes()
    assert pushed == [(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 1 << 20), (3 << 20, 5)]
    pushed.clear()
    (root / "nosync").mkdir()  # fsync = false: no flush, so nothing to give a head start
    results.clear()
    _local_batch.BatchWriter(os.fsencode(root / "nosync"), fsync=False).put_batch(
        requests, "run1", Progress(), results)
    assert [r.status for r in results] == [PutStatus.COPIED] * 2
    assert pushed == []


# Appended to SLOW_HELPER: the helper notes when it stages and finishes batches, and each
# finish (a flush) takes 0.3 s longer.
NOTING_HELPER = '''
import os
_log = os.environ["HELPER_LOG"]

def _note(what):
    with open(_log, "a") as f:
        f.write(what + "\\n")

_stage_batch = _local_batch.BatchWriter.stage
_finish = _local_batch.BatchWriter.finish

def noted_stage(self, requests, *args, **kwargs):
    _note(f"stage {os.path.basename(os.path.dirname(requests[0].dest)).decode()}")
    return _stage_batch(self, requests, *args, **kwargs)

def noted_finish(self, batches):
    _note(f"finish {len(batches)}")
    if os.environ.get("HELPER_FINISH_FAILS"):
        raise OSError(5, "finish failed (test)")
    time.sleep(float(os.environ.get("HELPER_FINISH_DELAY", "0.3")))
    _finish(self, batches)
    _note("finished")

_local_batch.BatchWriter.stage = noted_stage
_local_batch.BatchWriter.finish = noted_finish
'''


@pytest.fixture
def noting_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_HELPER + NOTING_HELPER)
    monkeypatch.setenv("PYTHONPATH", str(hooks))
    monkeypatch.setenv("HELPER_LOG", str(tmp_path / "helper.log"))
    return tmp_path / "helper.log"


async def test_a_helper_writes_the_next_batch_while_the_last_is_flushed(
        tmp_path: Path, noting_helper: Path) -> None:
    """One helper, two batches: the second's files are written while the first is made
    durable (its flush mostly waits for the disk), and each gets its own results."""
    root = tmp_path / "replica"
    root.mkdir()
    first, second = sources(tmp_path / "a", 10, "a"), sources(tmp_path / "b", 10, "b")
    helper = CopyHelper(os.fsencode(root), True)
    results: dict[str, list[PutResult]] = {}
    try:
        async def put(name: str, requests: list[PutRequest]) -> None:
            progress = Progress()
            assert await helper.put(requests, "run1", progress)
            results[name] = progress.results

        async with anyio.create_task_group() as tg:
            tg.start_soon(put, "a", first)
            await anyio.sleep(0.05)  # in order: the first batch goes first
            tg.start_soon(put, "b", second)
    finally:
        await helper.aclose()
    notes = noting_helper.read_text().splitlines()
    assert notes[0] == "stage a", notes
    assert notes.index("stage b") < notes.index("finished"), notes  # during the first's finish
    for name, requests in (("a", first), ("b", second)):
        assert [r.request for r in results[name]] == requests
        assert {r.status for r in results[name]} == {PutStatus.COPIED}
        for request in requests:
            assert (root / os.fsdecode(request.dest)).read_bytes() == \
                Path(os.fsdecode(request.source)).read_bytes()
    assert leftovers(root) == []


async def test_cancelling_one_of_a_helpers_two_batches_stops_both(
        tmp_path: Path, noting_helper: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper holding two batches is stopped when one is cancelled: here the second,
    while the first is being finished. Neither renames anything, no temp file of either
    stays, and the first is reported not done (the transport then copies it in a
    thread)."""
    monkeypatch.setenv("HELPER_FINISH_DELAY", "2")
    root = tmp_path / "replica"
    root.mkdir()
    first, second = sources(tmp_path / "a", 5, "a"), sources(tmp_path / "b", 100, "b")
    helper = CopyHelper(os.fsencode(root), True)
    watched, other = Watched(), Progress()
    outcome: list[bool] = []
    try:
        async with anyio.create_task_group() as tg:

            async def carried_on() -> None:
                outcome.append(await helper.put(first, "run1", other))

            async def cancelled() -> None:
                with anyio.CancelScope() as scope:
                    tg.start_soon(cancel_when_moving, scope)
                    await helper.put(second, "run1", watched)

            async def cancel_when_moving(scope: anyio.CancelScope) -> None:
                await watched.moved.wait()  # the second batch's files are being written
                scope.cancel()

            tg.start_soon(carried_on)
            await anyio.sleep(0.05)
            tg.start_soon(cancelled)
        assert outcome == [False]
        assert other.results == []
        assert watched.cancelled
        assert helper.broken is None  # stopped on purpose: the next batch starts another
        assert helper.process is None
    finally:
        await helper.aclose()
    notes = noting_helper.read_text().splitlines()
    # Both were in the helper: the second was read while the first was being finished.
    assert notes[0] == "stage a", notes
    assert notes.index("stage b") < notes.index("finished"), notes
    assert leftovers(root) == []
    assert list(root.rglob("*.dat")) == []


async def test_a_helper_that_fails_to_finish_hands_its_batches_to_threads(
        tmp_path: Path, noting_helper: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error in the helper's second thread stops the helper: the engine sees its output
    end, and the transport copies the batch in a worker thread; no temp file stays."""
    monkeypatch.setenv("HELPER_FINISH_FAILS", "1")
    root = tmp_path / "replica"
    root.mkdir()
    requests = sources(tmp_path / "src", 10)
    transport = LocalTransport(str(root), anyio.CapacityLimiter(2), helper_min_files=1)
    try:
        with anyio.fail_after(30):
            results = await transport.put(requests, "run1", Progress())
        [helper] = transport._helpers
        stopped = list(helper._stopping)
    finally:
        await transport.aclose()
    assert [r.status for r in results] == [PutStatus.COPIED] * len(requests)
    assert transport.transfer == "threads"
    assert noting_helper.read_text().splitlines()[:2] == ["stage out", "finish 1"]
    assert [p.returncode for p in stopped] == [1]  # it exited on its own, with an error
    assert leftovers(root) == []
    for request in requests:
        assert (root / os.fsdecode(request.dest)).read_bytes() == \
            Path(os.fsdecode(request.source)).read_bytes()


def test_staged_batches_are_finished_together(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``BatchWriter.finish`` of several staged batches flushes once for all their data and
    once for all their renames; an abandoned batch among them gets no results, keeps no
    temp file and renames nothing."""
    from replicator.transports import _local_batch

    flushes: list[str] = []
    flush = _local_batch.flush_folders

    def counted(dir_fds: set[int], what: str) -> Any:
        flushes.append(what)
        return flush(dir_fds, what)

    monkeypatch.setattr(_local_batch, "flush_folders", counted)
    root = tmp_path / "replica"
    root.mkdir()
    writer = _local_batch.BatchWriter(os.fsencode(root), True)
    batches, outputs, progresses = [], [], []
    for name in ("a", "b", "c"):
        results: list[PutResult] = []
        progress = Progress()
        staged = writer.stage(sources(tmp_path / name, 5, name), "run1", progress, results)
        assert staged is not None
        assert progress.idle_for() == 0.0  # staged: waiting for its flush, not stalled
        batches.append(staged)
        outputs.append(results)
        progresses.append(progress)
    progresses[1].cancelled = True
    writer.finish(batches)
    assert flushes == ["write", "rename"]
    assert [len(results) for results in outputs] == [5, 0, 5]
    assert all(r.status is PutStatus.COPIED for r in outputs[0] + outputs[2])
    assert not (root / "b").exists() or not list((root / "b").iterdir())
    assert sorted(p.name for p in (root / "a").iterdir()) == [f"{i:04}.dat" for i in range(5)]
    assert leftovers(root) == []
    assert all(progress.idle_for() > 0.0 for progress in progresses)  # flushes ended


def test_a_helper_starts_without_the_engines_types() -> None:
    """A copy helper imports what copies need, not ``dataclasses`` (with ``inspect``) nor
    the inventory's types: they were 25 to 30 ms of each helper's start-up, and a run
    starts its helpers while its own imports want the cores."""
    import subprocess
    import sys

    from replicator.transports._spares import _BOOTSTRAP

    heavy = ("dataclasses", "inspect", "traceback", "replicator._inventory._types",
             "replicator._inventory._store", "anyio", "structlog")
    assert _BOOTSTRAP.rstrip().endswith("serve()")
    code = _BOOTSTRAP.rstrip()[:-len("serve()")] + (
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False, stdin=subprocess.DEVNULL)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr
