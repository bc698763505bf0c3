"""The library's front door: ``async with Replicator(config) as rep``."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from ._config import Config, ReplicaConfig, validate_config
from ._engine import Engine, ReplicaRunner
from ._events import Event, EventBus, RunCompleted
from ._inventory import Inventory, ScanDelta
from ._lock import EngineLock
from ._scanner import OriginUnavailableError, Scanner
from .transports import Transport, open_transport

__all__ = ["PlannedCopy", "Replicator", "ScanSummary", "SyncSummary"]


@dataclass(frozen=True, slots=True)
class SyncSummary:
    """What a run did. ``unavailable`` maps replica or origin names to the reason."""

    copied: int
    failed: int
    pending: int
    bytes: int
    seconds: float
    errors: int = 0
    unavailable: tuple[tuple[str, str], ...] = ()

    @property
    def exit_code(self) -> int:
        """0 all due work done; 1 files have errors; 3 a replica or origin was unavailable."""
        if self.errors:
            return 1
        if self.unavailable:
            return 3
        return 0


@dataclass(frozen=True, slots=True)
class ScanSummary:
    origin: str
    new: int
    changed: int
    deleted: int
    unchanged: int
    seconds: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PlannedCopy:
    replica: str
    origin: str
    source: bytes
    dest: bytes
    size: int


class Replicator:
    """A replication engine over one inventory.

    Entering takes the inventory's engine lock (``EngineLockedError`` if another engine
    holds it) and leaves it on exit. Every method is cancellable: cancellation stops
    transfers, leaves no partial file under a final name, and keeps the inventory consistent.
    """

    def __init__(
        self, config: Config, *, transports: Mapping[str, Transport] | None = None
    ) -> None:
        self.config = validate_config(config)
        self._custom_transports = dict(transports or {})
        self._bus = EventBus()
        self._inventory: Inventory | None = None
        self._lock = EngineLock(config.inventory)
        self._engine: Engine | None = None
        self._stop_requested = False
        self.run_id = f"{os.getpid():x}x{os.urandom(3).hex()}"

    async def __aenter__(self) -> Self:
        self._lock.acquire()
        try:
            self._inventory = await Inventory.open(self.config.inventory)
            await self._inventory.begin_run(self.run_id, socket.gethostname())
            await self._inventory.sync_replicas([
                (r.name, r.url, [o.name for o in self.config.origins_for(r)])
                for r in self.config.replicas
            ])
        except BaseException:
            if self._inventory is not None:
                await self._inventory.close()
            self._lock.release()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        inventory = self._require()
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await inventory.end_run(self.run_id, "error" if exc else "ok")
        finally:
            self._bus.close()
            await inventory.close()
            self._lock.release()

    def _require(self) -> Inventory:
        if self._inventory is None:
            raise RuntimeError("use 'async with Replicator(config) as rep:' first")
        return self._inventory

    @property
    def inventory(self) -> Inventory:
        return self._require()

    @asynccontextmanager
    async def subscribe(self, buffer: int = 256) -> AsyncIterator[MemoryObjectReceiveStream[Event]]:
        """Receive events; a reader that falls behind gets ``EventsDropped`` instead of
        slowing replication down."""
        async with self._bus.subscribe(buffer) as stream:
            yield stream

    def _selected(self, names: Sequence[str] | None) -> list[ReplicaConfig]:
        if not names:
            return list(self.config.replicas)
        return [self.config.replica(name) for name in names]

    async def scan(self) -> list[ScanSummary]:
        """Update the inventory from every origin; copies nothing."""
        inventory = self._require()
        limiter = anyio.CapacityLimiter(2)
        summaries: list[ScanSummary] = []
        for origin in self.config.origins:
            replicas = [r.name for r in self.config.replicas
                        if origin in self.config.origins_for(r)]
            try:
                result = await Scanner(origin, inventory, replicas, limiter).scan()
            except OriginUnavailableError as exc:
                summaries.append(ScanSummary(origin.name, 0, 0, 0, 0, 0.0, str(exc)))
                continue
            d: ScanDelta = result.delta
            summaries.append(ScanSummary(origin.name, d.new, d.changed, d.deleted, d.unchanged,
                                         result.seconds))
        return summaries

    async def plan(self, replicas: Sequence[str] | None = None) -> list[PlannedCopy]:
        """Scan, then list what a sync would copy (``--dry-run``); replicas are untouched."""
        inventory = self._require()
        await self.scan()
        planned: list[PlannedCopy] = []
        limiter = anyio.CapacityLimiter(1)
        engine = Engine(self.config, inventory, self._bus, self.run_id, {}, (), limiter)
        for replica in self._selected(replicas):
            runner = ReplicaRunner(engine, replica, open_transport(replica, limiter),
                                   self.config.origins_for(replica))
            for work in await inventory.preview(replica.name, time.time()):
                try:
                    dest = runner.destination(work.origin, work.host, work.path)
                except ValueError:
                    continue
                planned.append(PlannedCopy(replica.name, work.origin, work.path, dest,
                                           work.size))
        return planned

    async def sync_once(self, replicas: Sequence[str] | None = None) -> SyncSummary:
        """Scan every origin and copy what is due, then return.

        Transient errors are retried within ``engine.retry_window`` seconds. Cancelling
        abandons in-flight transfers (no partial file keeps a final name) and leaves the
        unfinished copies pending.
        """
        return await self._run(once=True, replicas=replicas)

    async def run(self, replicas: Sequence[str] | None = None) -> SyncSummary:
        """Replicate continuously: rescan each origin every ``scan_interval`` seconds.

        Returns after ``stop()`` (in-flight transfers get ``shutdown_grace`` seconds);
        cancellation stops at once, leaving unfinished copies pending.
        """
        return await self._run(once=False, replicas=replicas)

    @property
    def stopped(self) -> bool:
        """Whether ``stop()`` was called."""
        return self._stop_requested

    def stop(self) -> None:
        """Stop taking work: the running ``sync_once``/``run`` drains and returns."""
        self._stop_requested = True
        if self._engine is not None:
            self._engine.stop()

    async def _run(self, once: bool, replicas: Sequence[str] | None) -> SyncSummary:
        inventory = self._require()
        selected = self._selected(replicas)
        limiter = anyio.CapacityLimiter(sum(r.workers for r in selected) + 2)
        transports: dict[str, Transport] = {}
        for replica in selected:
            transport = self._custom_transports.get(replica.name)
            transports[replica.name] = transport or open_transport(replica, limiter)
        engine = Engine(self.config, inventory, self._bus, self.run_id, transports, selected,
                        limiter)
        self._engine = engine
        started = time.monotonic()
        try:
            if self._stop_requested:
                engine.stop()
            await engine.run(once)
        finally:
            self._engine = None
            for name, transport in transports.items():
                if name not in self._custom_transports:
                    with anyio.CancelScope(shield=True):
                        await transport.aclose()
        names = [r.name for r in selected]
        stats = [s for s in await inventory.replica_stats(time.time()) if s.name in names]
        unavailable = dict(engine.state.unavailable)
        unavailable.update(engine.origin_errors)
        summary = SyncSummary(
            copied=engine.state.copied,
            failed=sum(s.failed for s in stats),
            pending=sum(s.pending for s in stats),
            bytes=engine.state.bytes,
            seconds=time.monotonic() - started,
            errors=await inventory.unresolved_errors(names) if names else 0,
            unavailable=tuple(sorted(unavailable.items())),
        )
        self._bus.publish(RunCompleted(copied=summary.copied, failed=summary.failed,
                                       pending=summary.pending, bytes=summary.bytes,
                                       seconds=summary.seconds))
        return summary
