"""Typed events and the bus that carries them to subscribers.

Publishing never waits: each subscriber has a small bounded buffer, and a subscriber that
falls behind loses events and is then told how many with ``EventsDropped``.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = [
    "Event",
    "EventBus",
    "EventsDropped",
    "ReplicaAvailable",
    "ReplicaUnavailable",
    "RunCompleted",
    "ScanFinished",
    "TransferCompleted",
    "TransferFailed",
    "TransferStarted",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base class of every event."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanFinished(Event):
    origin: str
    new: int
    changed: int
    deleted: int
    unchanged: int
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferStarted(Event):
    replica: str
    origin: str
    path: bytes
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferCompleted(Event):
    replica: str
    origin: str
    path: bytes
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferFailed(Event):
    replica: str
    origin: str
    path: bytes
    error_class: str
    error: str
    attempts: int
    final: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaUnavailable(Event):
    replica: str
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaAvailable(Event):
    replica: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RunCompleted(Event):
    copied: int
    failed: int
    pending: int
    bytes: int
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class EventsDropped(Event):
    """This subscriber missed ``count`` events because it read too slowly."""

    count: int


@dataclass(slots=True)
class _Subscriber:
    send: MemoryObjectSendStream[Event]
    dropped: int = field(default=0)

    def offer(self, event: Event) -> None:
        if self.dropped:
            try:
                self.send.send_nowait(EventsDropped(count=self.dropped))
            except anyio.WouldBlock:
                self.dropped += 1
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            self.dropped = 0
        try:
            self.send.send_nowait(event)
        except anyio.WouldBlock:
            self.dropped += 1
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[_Subscriber] = []

    @property
    def active(self) -> bool:
        """Whether anyone listens: lets publishers skip building events nobody reads."""
        return bool(self._subscribers)

    def publish(self, event: Event) -> None:
        """Hand ``event`` to every subscriber without waiting."""
        for subscriber in self._subscribers:
            subscriber.offer(event)

    @asynccontextmanager
    async def subscribe(self, buffer: int = 256) -> AsyncIterator[MemoryObjectReceiveStream[Event]]:
        if buffer < 1 or buffer == math.inf:
            raise ValueError("buffer must be a positive bound")
        send, receive = anyio.create_memory_object_stream[Event](buffer)
        subscriber = _Subscriber(send)
        self._subscribers.append(subscriber)
        try:
            async with receive:
                yield receive
        finally:
            self._subscribers.remove(subscriber)
            send.close()

    def close(self) -> None:
        """End every subscription: their iterators finish after the buffered events."""
        for subscriber in self._subscribers:
            subscriber.send.close()
