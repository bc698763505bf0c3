"""Awaiting independent steps at once, each step's failure kept in its place."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

_T = TypeVar("_T")


async def together(*steps: Callable[[], Awaitable[_T]],
                   catch: tuple[type[Exception], ...]) -> list[_T | Exception]:
    """Run ``steps`` concurrently; their results in order, an exception of ``catch`` in
    place of a step's result. Used for round trips that do not depend on each other: over a
    long link, together they cost one. Other exceptions, and cancellation, propagate."""
    outcomes: dict[int, _T | Exception] = {}

    async def run(index: int, step: Callable[[], Awaitable[_T]]) -> None:
        try:
            outcomes[index] = await step()
        except catch as exc:
            outcomes[index] = exc

    async with anyio.create_task_group() as tg:
        for index, step in enumerate(steps):
            tg.start_soon(run, index, step)
    return [outcomes[index] for index in range(len(steps))]


__all__ = ["together"]
