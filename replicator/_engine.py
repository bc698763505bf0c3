"""The engine: scanners, one feeder and worker pool per replica, one recorder.

    scanners -> inventory -> feeder (per replica) -> bounded queue -> workers -> transport
                                                                         |
                          inventory <- recorder (batched) <- outcomes <--+

A full queue only holds up its own replica's feeder. Outcomes are recorded in batches, and
events are published after the record committed, so subscribers can trust the inventory.
The new files a scan records are claimed in the same transaction for the feeders that have
room for them (``ReplicaRunner.take``), instead of being read back by their next claim.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._config import Config, OriginConfig, ReplicaConfig
from ._errors import ErrorClass, FileError, ReplicaUnavailableError, TransferStalledError
from ._events import (
    EventBus,
    ReplicaAvailable,
    ReplicaUnavailable,
    ScanFinished,
    TransferCompleted,
    TransferFailed,
    TransferStarted,
)
from ._inventory import Inventory, NewFile, Outcome, OutcomeKind, ScanDelta, Work, join_path
from ._layout import Layout
from ._scanner import OriginUnavailableError, Scanner
from ._together import together
from .transports import MARKER, Progress, PutRequest, PutResult, PutStatus, Transport

if TYPE_CHECKING:
    from .transports._ssh_source import SshSource

log = structlog.get_logger("replicator.engine")

CLAIM_BATCH = 4096
# New files a replica's feeder holds, taken from scans and not yet handed on (see take),
# about 400 bytes each (13 MB at most). Enough for what a scan records during an SSH login
# (small-ssh's 20,000 files): beyond it, new files wait as due copies for a claim, which
# reads them back from SQLite behind the scan's writes (with 8,192, a third of them did:
# small-ssh 8% slower on tmpfs).
TAKE_FILES = 8 * CLAIM_BATCH
# Small files travel together: one worker-thread hand-off copies many of them. Each batch
# ends with a flush and, over SSH, a round trip: large batches keep a long link busy.
BATCH_FILES = 1024
BATCH_BYTES = 64 << 20
SPLIT_FILES = 512
SPLIT_BYTES = 8 << 20
RECORD_BATCH = 1000
IDLE_POLL = 2.0
CLAIM_EVERY = 1.0  # seconds: how long a feeder busy with taken files goes without a claim


def backoff_delay(attempts: int, initial: float, maximum: float) -> float:
    """Jittered exponential backoff: around initial * 2**(attempts-1), capped."""
    base: float = min(maximum, initial * 2.0 ** max(0, attempts - 1))
    return min(maximum, base * random.uniform(0.5, 1.5))


@dataclass(slots=True)
class RunState:
    """Counters of one run, updated by the recorder."""

    started: float = field(default_factory=time.monotonic)
    copied: int = 0
    bytes: int = 0
    file_errors: int = 0
    failed: int = 0
    unavailable: dict[str, str] = field(default_factory=dict)


def _logs_info(logger: Any) -> bool:
    """Whether ``logger`` writes info lines (True when it cannot tell: the library does
    not know how, or whether, its user configured structlog)."""
    enabled = getattr(logger, "is_enabled_for", None)
    return True if enabled is None else bool(enabled(logging.INFO))


class _Wake:
    """A resettable wake-up signal."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait(self, seconds: float) -> None:
        event = self._event
        with anyio.move_on_after(max(0.0, seconds)):
            await event.wait()


class _Outcomes:
    """One transfer's outcomes on their way to the recorder, with what their events need.

    Each transfer collects its own: a replica's workers run transfers concurrently. Copies
    made, the common outcome, are kept as plain rows.
    """

    __slots__ = ("copied", "copied_works", "outcomes", "runner", "works")

    def __init__(self, runner: ReplicaRunner) -> None:
        self.runner = runner
        self.works: list[Work] = []
        self.outcomes: list[Outcome] = []
        self.copied_works: list[Work] = []
        self.copied: list[tuple[str, int, int, int]] = []  # replica, file_id, size, mtime_ns

    def add(self, work: Work, outcome: Outcome) -> None:
        self.works.append(work)
        self.outcomes.append(outcome)

    def add_copied(self, work: Work, size: int, mtime_ns: int) -> None:
        self.copied_works.append(work)
        self.copied.append((work.replica, work.file_id, size, mtime_ns))

    def __len__(self) -> int:
        return len(self.outcomes) + len(self.copied)


class ReplicaRunner:
    """Feeds one replica's queue from the inventory and runs its workers."""

    def __init__(
        self,
        engine: Engine,
        config: ReplicaConfig,
        transport: Transport,
        origins: Sequence[OriginConfig],
    ) -> None:
        self.engine = engine
        self.config = config
        self.name = config.name
        self.transport = transport
        self._origins = {o.name: o for o in origins}
        self._roots = {o.name: os.fsencode(o.root) for o in origins}
        self._layout = Layout.parse(config.layout)
        self._renderers: dict[tuple[str, str], Callable[[bytes], bytes]] = {}
        self._stale_dirs: list[bytes] = []
        # Set by place(): whether claims record destinations and check who owns them.
        self._record_dest = True
        self._check_owners = True
        # New files a scan claimed for this replica as it recorded them (see ``take``), and
        # those of them that cannot go to it, with the reason; the feeder hands both on.
        self._taken: list[Work] = []
        self._taken_refused: list[tuple[Work, str]] = []
        self._serving = False
        self._drained = False  # the last claim took every due copy: none is older than new
        # Whether copies may have become due since the last claim (scan batches recorded as
        # due, outcomes that leave copies pending), and when that claim was.
        self._maybe_due = True
        self._claimed_at = 0.0
        self.wake = _Wake()
        self.inflight = 0
        self._idle = _Wake()
        self.unavailable: str | None = None
        self._log = log.bind(replica=self.name)

    def destination(self, origin: str, host: str, path: bytes) -> bytes:
        """Where origin file ``path`` goes in this replica; ValueError if it cannot go."""
        render = self._renderers.get((origin, host))
        if render is None:
            root = self._roots.get(origin)
            if root is None:
                raise ValueError(f"origin {origin!r} is no longer replicated to {self.name!r}")
            render = self._layout.renderer(host=host, origin=origin, root=root)
            self._renderers[origin, host] = render
        return render(path)

    def _placement(self) -> str | None:
        """How this replica places files when no two can get the same path, as a key that
        changes with anything that could make a new file's path another's old one: the
        layout, the one origin and its root. None when destinations must be recorded."""
        if not self._layout.unique_per_file(len(self._roots)):
            return None
        [(origin, root)] = self._roots.items()
        return json.dumps({"layout": self.config.layout, "origin": origin,
                           "root": os.fsdecode(root)})

    @staticmethod
    def _placed_by(placement: str) -> Callable[[str, str, bytes], bytes]:
        """``destination`` as a ``_placement`` key says: ValueError for other origins."""
        how = json.loads(placement)
        layout, origin, root = Layout.parse(how["layout"]), how["origin"], how["root"]
        renderers: dict[str, Callable[[bytes], bytes]] = {}

        def place(file_origin: str, host: str, path: bytes) -> bytes:
            if file_origin != origin:
                raise ValueError(f"origin {file_origin!r} was not placed this way")
            render = renderers.get(host)
            if render is None:
                render = layout.renderer(host=host, origin=origin, root=os.fsencode(root))
                renderers[host] = render
            return render(path)

        return place

    async def place(self, recovered: Sequence[tuple[bytes | None, str, str, bytes]]) -> None:
        """Decide how claims record destinations, before the first claim; note where temp
        files of the ``recovered`` copies of a dead run may lie.

        Recording a copy's destination doubles what a claim writes. It is needed to refuse
        a destination that another file's copy holds, and to find a dead run's temp files.
        A replica that gives each file its own path (one origin, ``Layout.unique_per_file``)
        needs it for neither, as long as every copy placed without one was placed the same
        way (layout, origin, origin root): the replica remembers how. When that changes, the
        destinations of those copies are recorded first, as they were placed.
        """
        inventory = self.engine.inventory
        unrecorded, any_recorded = await inventory.placement(self.name)
        old = self._placed_by(unrecorded) if unrecorded is not None else None
        for dest, origin, host, path in recovered:
            if dest is None and old is not None:
                with contextlib.suppress(ValueError):
                    dest = old(origin, host, path)
            if dest is not None:
                self._stale_dirs.append(dest)
        placement = self._placement()
        if old is not None and unrecorded != placement:
            count = await inventory.record_destinations(self.name, old)
            self._log.info("recorded destinations of copies placed without them",
                           placement=unrecorded, count=count)
            await inventory.set_unrecorded_placement(self.name, None)
            unrecorded, any_recorded = None, any_recorded or count > 0
        if placement is not None:
            if unrecorded is None:
                await inventory.set_unrecorded_placement(self.name, placement)
            self._record_dest, self._check_owners = False, any_recorded

    @property
    def serving(self) -> bool:
        """Whether the feeder runs: the replica is available and being fed."""
        return self._serving

    def can_take(self, files: int) -> bool:
        """Whether the next scan batch, of up to ``files`` new files, may claim them for
        this replica as it records them (``take``): only while the feeder runs, has room
        for them and its last claim found every due copy (older copies go first; one due
        since then waits for the next claim, a second at most), and only where
        claims need not record destinations (then a claim is the inventory's ``copying``
        state alone, and the new files' rows need not be read back)."""
        return (self._serving and self._drained and not self._record_dest
                and not self._check_owners and len(self._taken) + files <= TAKE_FILES)

    def take(self, origin: str, host: str, files: Sequence[NewFile]) -> None:
        """Files a scan batch recorded and claimed for this replica (``copying``): queued
        for the feeder ahead of the next claim."""
        # Where the layout allows, a folder's files are placed by one render (the usual
        # batch holds a few folders of hundreds of files): its path for a probe name.
        by_folder = self._layout.name_last
        last: bytes | None = None
        head: bytes | None = None
        for file_id, folder, entry in files:
            name = entry.name
            path = join_path(folder, name)
            if by_folder and folder != last:
                last = folder
                try:
                    head = self.destination(origin, host, join_path(folder, b"x"))[:-1]
                except ValueError:
                    head = None
            if head is not None and b"/" not in name and name not in (b".", b".."):
                dest, refusal = head + name, ""
            else:
                try:
                    dest, refusal = self.destination(origin, host, path), ""
                except ValueError as exc:
                    dest, refusal = b"", str(exc)
            work = Work(self.name, file_id, origin, host, path, entry.kind, entry.size,
                        entry.mtime_ns, entry.mode, entry.target, 0, dest)
            if refusal:
                self._taken_refused.append((work, refusal))
            else:
                self._taken.append(work)
        self.wake.set()

    def due_soon(self) -> None:
        """Copies of this replica may have become due: the feeder claims before it waits."""
        self._maybe_due = True
        self.wake.set()

    async def run(self, once: bool) -> None:
        # The transport gets ready (an SSH session logs in) while the replica is checked
        # and while the first batches are claimed, not after: on a long link a login is
        # many round trips, and the workers' own sessions start alongside it.
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._prepare)
            await self._run(once)
            tg.cancel_scope.cancel()

    async def _run(self, once: bool) -> None:
        delay = self.config.backoff_initial
        while not self.engine.stopping:
            if self.unavailable is None:
                # Not known to be unavailable: the feeder claims, and scan batches hand over
                # their new files, while the replica is checked; the workers wait for the
                # verdict. Over SSH the check is a login: the first batches are ready when
                # it ends instead of being claimed after it. A replica found unavailable is
                # checked alone until it is back, so that a retry claims nothing.
                available = await self._serve(once, check=True)
            else:
                available = await self._checked()
                if available:
                    await self._serve(once)
            if not available:
                await self._hand_back_taken()
                if once:
                    return
                await self.engine.sleep(max(0.1, delay))
                # Never faster than 0.1 s, even with backoff_initial = 0: no busy loop.
                delay = min(self.config.backoff_max, max(0.1, delay * 2))
                continue
            delay = self.config.backoff_initial
            if self.unavailable is None or once:
                return

    async def _checked(self, passed: Callable[[], None] | None = None) -> bool:
        """Check the replica and record the verdict: whether it is available.

        ``passed`` is called once the replica itself passed, before the inventory records
        it: the workers need not wait for SQLite's writer, which a scan's inserts keep busy
        (an SSH run's first copies waited 40 ms for it). Copies recorded before the marker
        are harmless: a run that finds the marker file but no record adopts it.
        """
        try:
            new_marker = await self._check_replica()
        except (ReplicaUnavailableError, FileError, TimeoutError) as exc:
            reason = str(exc) or f"no answer within {self.config.op_timeout} s"
            await self._set_unavailable(reason)
            return False
        self._became_available()
        if passed is not None:
            passed()
        if new_marker is not None:
            await self.engine.inventory.set_replica_marker(self.name, new_marker)
        await self.engine.inventory.set_condition(self.name, "ok", None)
        return True

    async def _check_replica(self) -> str | None:
        """Probe, check the marker, remove dead runs' temp files. The marker the inventory
        is to record, if the replica has none recorded yet."""
        with anyio.fail_after(self.config.op_timeout):
            # The marker is read while the root is probed: on a long link each is a round
            # trip or more. The probe's verdict comes first, the marker's after.
            probed, found = await together(
                self.transport.probe, self.transport.read_marker,
                catch=(ReplicaUnavailableError, FileError, TimeoutError))
            for outcome in (probed, found):
                if isinstance(outcome, Exception):
                    raise outcome
            assert found is None or isinstance(found, str)
            new_marker = await self._check_marker(found)
            if self._stale_dirs:
                dirs = {os.path.dirname(d) for d in self._stale_dirs}
                removed = await self.transport.remove_stale_temps(dirs, self.engine.run_id)
                self._stale_dirs = []
                if removed:
                    self._log.info("removed temp files of dead runs", count=removed)
            return new_marker

    async def _prepare(self) -> None:
        # Only once there is something to copy: a run that finds nothing to do starts no
        # session (an SSH login, a shell and an interpreter on the host).
        inventory = self.engine.inventory
        while not self.engine.stopping:
            scanned = self.engine.scans_done.is_set()  # before the query: no scan in between
            due = await inventory.next_due_time(self.name)
            # Taken files may already be claimed by the feeder (in flight) when this looks.
            if self._taken or self.inflight or (due is not None and due <= time.time()):
                break
            if scanned:
                return
            await self.wake.wait(IDLE_POLL)
        with anyio.move_on_after(self.config.op_timeout):
            await self.transport.prepare()

    async def _check_marker(self, found: str | None) -> str | None:
        """The root must hold this replica's marker (``found`` in it) once the replica has
        been used. Returns the marker for the inventory to record where it has none yet
        (the root's, or one written now).

        An unmounted disk leaves an empty, writable mount point: copies made there would be
        recorded as replicated and then hidden when the disk comes back.
        """
        expected = await self.engine.inventory.replica_marker(self.name)
        if expected is None:
            if found is None:
                found = f"replicator {self.name} {uuid.uuid4()}"
                await self.transport.write_marker(found)
            return found
        if found != expected:
            what = "has no" if found is None else "has another replica's"
            raise ReplicaUnavailableError(
                f"replica root {self.config.url} {what} identity marker"
                f" ({MARKER.decode()}): is the right disk mounted? If this folder really is"
                f" this replica, write {expected!r} into that file"
            )
        return None

    async def _set_unavailable(self, reason: str) -> None:
        self.unavailable = reason
        self.engine.state.unavailable[self.name] = reason
        self._log.warning("replica unavailable", error=reason)
        await self.engine.inventory.set_condition(self.name, "unavailable", reason)
        self.engine.bus.publish(ReplicaUnavailable(replica=self.name, error=reason))

    def _became_available(self) -> None:
        if self.unavailable is not None or self.name in self.engine.state.unavailable:
            self.engine.bus.publish(ReplicaAvailable(replica=self.name))
        self.unavailable = None
        self.engine.state.unavailable.pop(self.name, None)

    async def _serve(self, once: bool, check: bool = False) -> bool:
        """Feed the workers until the run's end or the replica's; with ``check``, check
        the replica meanwhile (the workers wait for the verdict). Whether it passed."""
        send, receive = anyio.create_memory_object_stream[list[Work]](self.config.workers)
        verdict = anyio.Event()
        passed = True

        async def checking() -> None:
            nonlocal passed
            try:
                passed = await self._checked(verdict.set)
            finally:
                verdict.set()
                self.wake.set()  # a feeder waiting for work sees an unavailable replica
                self._idle.set()

        async with anyio.create_task_group() as tg:
            for _ in range(self.config.workers):
                tg.start_soon(self._worker, receive.clone(), verdict)
            receive.close()
            if check:
                tg.start_soon(checking)
            else:
                verdict.set()
            async with send:
                self._serving = True
                try:
                    await self._feed(send, once)
                finally:
                    self._serving = self._drained = False
        return passed

    async def _hand_back_taken(self) -> None:
        """The files scan batches took for this replica while it was found unavailable
        (also after its feeder stopped: a batch decides before it records): pending again,
        uncharged, until it is back; those that cannot go to it, failed."""
        if self._taken_refused:
            await self._refuse_taken()
        if self._taken:
            out = _Outcomes(self)
            self._release(out, self._taken)
            self._taken = []
            self.inflight += len(out)
            await self.engine.emit(out)

    async def _feed(self, send: MemoryObjectSendStream[list[Work]], once: bool) -> None:
        engine = self.engine
        while not engine.stopping and self.unavailable is None:
            if self._taken_refused:
                await self._refuse_taken()
            taken, self._taken = self._taken, []
            self.inflight += len(taken)  # in flight from now on, for _prepare to see
            # Taken files go to the workers before the claim: it waits its turn on SQLite's
            # thread behind the scan's writes, and the workers need not wait with it.
            for batch in self._batches(taken) if taken else ():
                await send.send(batch)
            if self.unavailable is not None:
                return  # found so meanwhile (by its check, beside this): no claim
            more: list[Work] = []
            refused: list[tuple[Work, str]] = []
            skipped = True
            # Due copies are claimed beside taken ones, at least a few at a time: whether
            # any is left decides whether new files may be taken ahead of the next claim.
            # Not again while nothing can have become due since a claim found none (tens of
            # ms each, see above; files taken meanwhile wait). At least once a second.
            if (not self._drained or self._maybe_due
                    or time.monotonic() - self._claimed_at > CLAIM_EVERY):
                skipped = self._maybe_due = False
                self._claimed_at = time.monotonic()
                limit = max(CLAIM_BATCH - len(taken), CLAIM_BATCH // 8)
                more, refused = await engine.inventory.claim(
                    self.name, time.time(), limit, self.destination,
                    engine.started_at if once else None, self._record_dest,
                    self._check_owners,
                )
                self._drained = len(more) + len(refused) < limit
            self.inflight += len(more)
            for work, reason in refused:
                engine.state.failed += 1
                engine.state.file_errors += 1
                self._log.error("transfer", path=os.fsdecode(work.path), outcome="failed",
                                error=reason)
                engine.bus.publish(TransferFailed(
                    replica=self.name, origin=work.origin, path=work.path,
                    error_class=ErrorClass.PERMANENT, error=reason, attempts=work.attempts + 1,
                    final=True))
            if more:
                for batch in self._batches(more):
                    await send.send(batch)
            if taken or more:
                continue
            if refused or self._taken or self._taken_refused:
                continue  # taken while claiming: no scan batch is left behind
            if not once:
                due = await engine.inventory.next_due_time(self.name)
                if self._taken or self._taken_refused:
                    continue  # taken meanwhile: its wake-up was before this wait
                timeout = IDLE_POLL if due is None else min(IDLE_POLL, due - time.time())
                self._maybe_due = True  # a retry may be due when this wait ends
                await self.wake.wait(timeout)
                continue
            if not engine.scans_done.is_set():
                await self.wake.wait(0.2)
                continue
            if skipped:
                self._maybe_due = True  # the scans are done: claim once before waiting
                continue
            # A copy due meanwhile (a retry without backoff) goes beside those in flight.
            while self.inflight and not self._maybe_due:
                await self._idle.wait(1.0)
            if self._maybe_due:
                continue
            if self.unavailable is not None or engine.stopping:
                return
            due = await engine.inventory.next_retry(self.name, time.time(), engine.retry_deadline,
                                                    engine.started_at)
            if due is None or self.unavailable is not None or engine.stopping:
                return  # (the replica's check may have failed meanwhile)
            self._maybe_due = True
            # Woken early by a stop, a take, or the check beside it finding the replica
            # unavailable (then the run's end need not wait for this retry).
            await self.wake.wait(due - time.time())

    async def _refuse_taken(self) -> None:
        """Fail, through the recorder, the taken files that cannot go to this replica."""
        out = _Outcomes(self)
        for work, reason in self._taken_refused:
            out.add(work, Outcome(self.name, work.file_id, OutcomeKind.ERROR,
                                  error_class=str(ErrorClass.PERMANENT), error=reason,
                                  next_attempt=time.time(), final=True))
        self._taken_refused = []
        self.inflight += len(out)
        await self.engine.emit(out)

    def _batches(self, claimed: list[Work]) -> list[list[Work]]:
        # Work is spread over the workers, but a little of it is not split: each batch costs
        # a thread hand-off and a flush, over SSH a session (round trips on a long link).
        workers = self.config.workers
        per_batch = min(BATCH_FILES, max(SPLIT_FILES, math.ceil(len(claimed) / workers)))
        total = sum(w.size for w in claimed)
        per_bytes = min(BATCH_BYTES, max(SPLIT_BYTES, math.ceil(total / workers)))
        batches: list[list[Work]] = []
        current: list[Work] = []
        size = 0
        # One origin per batch: sources of different origins are read by different means.
        for work in sorted(claimed, key=lambda w: w.origin):
            if current and (len(current) >= per_batch or size + work.size > per_bytes
                            or current[0].origin != work.origin):
                batches.append(current)
                current, size = [], 0
            current.append(work)
            size += work.size
        if current:
            batches.append(current)
        return batches

    def settled(self, count: int) -> None:
        self.inflight -= count
        if self.inflight <= 0:
            self._idle.set()

    async def _worker(self, receive: MemoryObjectReceiveStream[list[Work]],
                      verdict: anyio.Event) -> None:
        async with receive:
            async for batch in receive:
                await verdict.wait()  # the replica's check, when it runs beside the feeder
                if self.engine.stopping or self.unavailable is not None:
                    out = _Outcomes(self)
                    self._release(out, batch)
                    await self.engine.emit(out)
                    continue
                await self._transfer(batch)

    def _release(self, out: _Outcomes, batch: Sequence[Work], next_attempt: float = 0.0
                 ) -> None:
        for work in batch:
            out.add(work, Outcome(self.name, work.file_id, OutcomeKind.RELEASED,
                                  next_attempt=next_attempt))

    async def _transfer(self, batch: list[Work]) -> None:
        engine = self.engine
        # A batch holds files of one origin (see _batches).
        source = engine.sources.get(batch[0].origin)
        requests = [
            PutRequest(work.path, work.dest, work.kind, work.size, work.mtime_ns, work.mode,
                       work.target, source)
            for work in batch
        ]
        if engine.bus.active:
            for work in batch:
                engine.bus.publish(TransferStarted(
                    replica=self.name, origin=work.origin, path=work.path, size=work.size))
        out = _Outcomes(self)
        try:
            await self._transfer_batch(batch, requests, out)
        except BaseException:
            # Cancelled (an abort) or worse: a worker thread or helper may still be writing
            # these files' temp files. Their claims stay 'copying' at the end of the run, so
            # the next run knows where to look for them (see Engine.run).
            settled = {w.file_id for w in out.works} | {w.file_id for w in out.copied_works}
            engine.abandoned.extend((self.name, w.file_id) for w in batch
                                    if w.file_id not in settled)
            raise
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                await engine.emit(out)

    async def _transfer_batch(self, batch: list[Work], requests: list[PutRequest],
                              out: _Outcomes) -> None:
        engine = self.engine
        progress = Progress()
        stalled = False
        crashed: FileError | None = None
        with anyio.CancelScope() as scope:
            engine.transfer_scopes.add(scope)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch, progress, scope)
                    try:
                        await self.transport.put(requests, engine.run_id, progress)
                    except Exception as exc:
                        # A transport must map its errors per file; if one escapes anyway,
                        # it is charged to the unfinished files instead of stopping the engine.
                        self._log.exception("transport error", error=str(exc))
                        crashed = FileError(f"transport error: {exc!r}")
                    tg.cancel_scope.cancel()
            finally:
                engine.transfer_scopes.discard(scope)
        if scope.cancelled_caught and not engine.stopping:
            stalled = True
        results: list[PutResult | None] = list(progress.results[: len(batch)])
        results += [None] * (len(batch) - len(results))
        errors = [r for r in results if r is not None and r.status is PutStatus.ERROR]
        if errors or stalled or crashed:
            # A per-file error may really be the whole replica failing (unmounted, gone).
            try:
                with anyio.fail_after(self.config.op_timeout):
                    await self.transport.probe()
            except (ReplicaUnavailableError, FileError, TimeoutError) as exc:
                if self.unavailable is None:
                    await self._set_unavailable(str(exc) or "probe timed out")
                self._release(out, [w for w, r in zip(batch, results, strict=True)
                                    if r is None or r.status is not PutStatus.COPIED])
                for work, result in zip(batch, results, strict=True):
                    if result is not None and result.status is PutStatus.COPIED:
                        self._outcome(out, work, result)
                return
        first_missing = True
        for work, result in zip(batch, results, strict=True):
            if result is None:
                if crashed is not None:
                    self._error(out, work, crashed)
                elif stalled and first_missing:
                    first_missing = False
                    err = TransferStalledError(
                        f"no progress for {self.config.stall_timeout} s; transfer abandoned")
                    self._error(out, work, err)
                else:
                    self._release(out, [work])
                continue
            self._outcome(out, work, result)

    def _outcome(self, out: _Outcomes, work: Work, result: PutResult) -> None:
        if result.status is PutStatus.COPIED:
            out.add_copied(work, result.size, result.mtime_ns)
        elif result.status is PutStatus.CHANGED:
            # Not charged. Due again once settled, or at once if a scan recorded a newer
            # version meanwhile (claimed before that scan: see Inventory.record).
            settle = self._origins[work.origin].settle_seconds
            out.add(work, Outcome(self.name, work.file_id, OutcomeKind.CHANGED,
                                  size=work.size, mtime_ns=work.mtime_ns,
                                  next_attempt=time.time() + max(1.0, settle)))
        elif result.status is PutStatus.VANISHED:
            # Not charged; the next scan tells whether the file is really gone.
            retry = time.time() + max(1.0, self._origins[work.origin].settle_seconds)
            out.add(work, Outcome(self.name, work.file_id, OutcomeKind.VANISHED,
                                  next_attempt=retry))
        elif result.status is PutStatus.SOURCE_UNAVAILABLE:
            # The origin's host is gone (pull mode): not this file's fault, not charged.
            origin = self._origins[work.origin]
            self.engine.origin_unavailable(origin.name, str(result.error or "unreachable"))
            self._release(out, [work], time.time() + max(1.0, origin.scan_interval))
        elif result.status is PutStatus.NOT_STARTED:
            self._release(out, [work])
        else:
            assert result.error is not None
            self._error(out, work, result.error)

    def _error(self, out: _Outcomes, work: Work, error: FileError) -> None:
        attempts = work.attempts + 1
        final = attempts >= self.config.max_attempts
        delay = backoff_delay(attempts, self.config.backoff_initial, self.config.backoff_max)
        out.add(work, Outcome(
            self.name, work.file_id, OutcomeKind.ERROR, error_class=str(error.error_class),
            error=str(error), next_attempt=time.time() + delay, final=final))

    async def _watch(self, progress: Progress, scope: anyio.CancelScope) -> None:
        stall = self.config.stall_timeout
        while True:
            await anyio.sleep(min(1.0, stall / 4))
            if progress.idle_for() > stall:
                self._log.warning("transfer stalled", seconds=stall)
                scope.cancel()
                return


class _Feed:
    """The engine's side of one origin's scans (``ScanFeed``): new files go straight to the
    runners that can take them; the others are woken to claim."""

    def __init__(self, engine: Engine, origin: OriginConfig, replicas: Sequence[str]) -> None:
        self._runners = [r for r in engine._runners if r.name in replicas]
        self._origin = origin

    def copying(self) -> bool:
        return any(r.serving for r in self._runners)

    def takers(self, files: int) -> list[str]:
        return [r.name for r in self._runners if r.can_take(files)]

    def recorded(self, delta: ScanDelta, takers: Collection[str],
                 claimed: Sequence[NewFile]) -> None:
        for runner in self._runners:
            if claimed and runner.name in takers:
                runner.take(self._origin.name, self._origin.host, claimed)
                if delta.changed:
                    runner.due_soon()  # changed files' copies are due again
            else:
                runner.due_soon()


class Engine:
    """One run of the engine over an open inventory; owns every long-lived task."""

    def __init__(
        self,
        config: Config,
        inventory: Inventory,
        bus: EventBus,
        run_id: str,
        transports: dict[str, Transport],
        replicas: Sequence[ReplicaConfig],
        limiter: anyio.CapacityLimiter,
    ) -> None:
        self.config = config
        self.inventory = inventory
        self.bus = bus
        self.run_id = run_id
        self.limiter = limiter
        self.state = RunState()
        self.stopping = False
        self._stop = anyio.Event()
        self.scans_done = anyio.Event()
        self.transfer_scopes: set[anyio.CancelScope] = set()
        # (replica, file id) of copies whose transfer was cancelled while it ran.
        self.abandoned: list[tuple[str, int]] = []
        self.started_at = time.time()
        self.retry_deadline = self.started_at + config.engine.retry_window
        self._transports = transports
        self._replicas = tuple(replicas)
        self._runners: list[ReplicaRunner] = []
        self._send: MemoryObjectSendStream[_Outcomes] | None = None
        self.origin_errors: dict[str, str] = {}
        # Readers of ssh:// origins (pull mode), open for the run: scans and copies share them.
        self.sources: dict[str, SshSource] = {}

    def origin_unavailable(self, name: str, reason: str) -> None:
        if self.origin_errors.get(name) != reason:
            log.warning("origin unavailable", origin=name, error=reason)
        self.origin_errors[name] = reason

    def stop(self) -> None:
        """Stop taking work; in-flight transfers get ``shutdown_grace`` seconds."""
        if self.stopping:
            return
        self.stopping = True
        self._stop.set()
        deadline = anyio.current_time() + self.config.engine.shutdown_grace
        for scope in self.transfer_scopes:
            scope.deadline = min(scope.deadline, deadline)
        for runner in self._runners:
            runner.wake.set()

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once when the engine stops."""
        with anyio.move_on_after(max(0.0, seconds)):
            await self._stop.wait()

    async def emit(self, out: _Outcomes) -> None:
        """Hand a transfer's outcomes to the recorder in one message."""
        assert self._send is not None
        if len(out):
            try:
                await self._send.send(out)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                # The run is being torn down: these copies stay 'copying' in the inventory
                # and are released at the end of the run (or recovered by the next one).
                pass

    async def run(self, once: bool) -> None:
        recovered: dict[str, list[tuple[bytes | None, str, str, bytes]]] = {}
        names = [r.name for r in self._replicas]
        for name, dest, origin, host, path in await self.inventory.recover(names):
            recovered.setdefault(name, []).append((dest, origin, host, path))
        for replica in self._replicas:
            runner = ReplicaRunner(self, replica, self._transports[replica.name],
                                   self.config.origins_for(replica))
            await runner.place(recovered.get(replica.name, ()))
            self._runners.append(runner)
        # Bounded in messages; a message is one transfer's outcomes (a batch of files).
        send, receive = anyio.create_memory_object_stream[_Outcomes](64)
        self._send = send
        if any(o.remote for o in self.config.origins):
            from .transports._ssh_source import open_source

            self.sources = {o.name: open_source(o) for o in self.config.origins if o.remote}
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._recorder, receive)
                async with send, anyio.create_task_group() as tg:
                    tg.start_soon(self._scan_all, once)
                    for runner in self._runners:
                        tg.start_soon(runner.run, once)
                    # After stop(), whatever still runs (a long scan, a stuck transfer) gets
                    # the grace period, then is cancelled.
                    watcher = anyio.CancelScope()
                    outer.start_soon(self._bound_after_stop, tg.cancel_scope, watcher)
                watcher.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await self.inventory.release_all(names, keep=self.abandoned)
                for source in self.sources.values():
                    await source.aclose()

    async def _bound_after_stop(self, scope: anyio.CancelScope,
                                watcher: anyio.CancelScope) -> None:
        with watcher:
            await self._stop.wait()
            scope.deadline = anyio.current_time() + self.config.engine.shutdown_grace + 5

    async def _scan_all(self, once: bool) -> None:
        try:
            async with anyio.create_task_group() as tg:
                for origin in self.config.origins:
                    tg.start_soon(self._scan_loop, origin, once)
                if once:
                    return
        finally:
            self.scans_done.set()
            for runner in self._runners:
                runner.wake.set()

    async def _scan_loop(self, origin: OriginConfig, once: bool) -> None:
        replicas = [r.name for r in self.config.replicas
                    if origin in self.config.origins_for(r)]
        scanner = Scanner(origin, self.inventory, replicas, self.limiter,
                          _Feed(self, origin, replicas), self.sources.get(origin.name))
        while not self.stopping:
            try:
                result = await scanner.scan()
            except OriginUnavailableError as exc:
                self.origin_unavailable(origin.name, str(exc))
            else:
                self.origin_errors.pop(origin.name, None)
                d = result.delta
                self.bus.publish(ScanFinished(
                    origin=origin.name, new=d.new, changed=d.changed, deleted=d.deleted,
                    unchanged=d.unchanged, seconds=result.seconds))
            if once:
                return
            await self.sleep(origin.scan_interval)

    async def _recorder(self, receive: MemoryObjectReceiveStream[_Outcomes]) -> None:
        async with receive:
            while True:
                try:
                    messages = [await receive.receive()]
                except anyio.EndOfStream:
                    return
                outcomes = list(messages[0].outcomes)
                copied = list(messages[0].copied)
                while len(outcomes) + len(copied) < RECORD_BATCH:
                    try:
                        messages.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    outcomes += messages[-1].outcomes
                    copied += messages[-1].copied
                await self.inventory.record(outcomes, time.time(), copied)
                for message in messages:
                    self._after_record(message)

    def _after_record(self, out: _Outcomes) -> None:
        state = self.state
        bus = self.bus if self.bus.active else None
        info = out.runner._log.info
        state.copied += len(out.copied)
        state.bytes += sum(row[2] for row in out.copied)
        # Per copy only when someone listens: the usual run logs no line per file.
        if bus is not None or _logs_info(out.runner._log):
            for work, (_replica, _file_id, size, _mtime_ns) in zip(
                    out.copied_works, out.copied, strict=True):
                info("transfer", path=os.fsdecode(work.path), outcome="replicated", size=size)
                if bus is not None:
                    bus.publish(TransferCompleted(
                        replica=work.replica, origin=work.origin, path=work.path, size=size))
        for work, o in zip(out.works, out.outcomes, strict=True):
            if o.kind is OutcomeKind.ERROR:
                state.file_errors += 1
                state.failed += o.final
                out.runner._log.warning(
                    "transfer", path=os.fsdecode(work.path),
                    outcome="failed" if o.final else "retry", error_class=o.error_class,
                    error=o.error, attempts=work.attempts + 1)
                if bus is not None:
                    bus.publish(TransferFailed(
                        replica=work.replica, origin=work.origin, path=work.path,
                        error_class=o.error_class or "", error=o.error or "",
                        attempts=work.attempts + 1, final=o.final))
            elif o.kind is not OutcomeKind.RELEASED:
                info("transfer", path=os.fsdecode(work.path), outcome=str(o.kind))
        if out.outcomes:
            out.runner.due_soon()  # released, or to be retried: pending again
        out.runner.settled(len(out))


__all__ = ["Engine", "ReplicaRunner", "RunState", "backoff_delay"]
