"""Copy helper processes started before a run needs them.

A helper is a Python interpreter (``_copy_worker``) that takes about 0.05 s of CPU to start.
The command line starts a run's helpers first thing, and only then imports the engine's
modules: that takes this process about 0.1 s on one core, while the helpers start on the
other. ``CopyHelper.start`` takes one of these spares before it starts a process itself.

Imports nothing but anyio and the standard library: it runs before the rest is imported.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from anyio.abc import Process

# A helper told to stop gets this long to remove its temp files before it is killed.
STOP_GRACE = 10.0

# The helper imports the same package as this process, but not the packages' __init__
# modules: placeholders stand in for them, unless something imported the real ones first
# (a test's fault-injecting sitecustomize).
_PACKAGE = Path(__file__).resolve().parents[1]
_BOOTSTRAP = f"""
import signal, sys, types
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's, also while it starts
sys.path.insert(0, {str(_PACKAGE.parent)!r})
for name, folder in (("replicator", {str(_PACKAGE)!r}),
                     ("replicator.transports", {str(_PACKAGE / "transports")!r}),
                     ("replicator._inventory", {str(_PACKAGE / "_inventory")!r})):
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [folder]
        sys.modules[name] = package
from replicator.transports._copy_worker import serve
serve()
"""

# Started and not yet taken; only ``spare_copy_helpers`` fills it.
_spares: list[Process] = []


async def start_helper() -> Process:
    """Start a copy helper process. Raises OSError when it cannot be started."""
    return await anyio.open_process([sys.executable, "-c", _BOOTSTRAP], stderr=None)


def take_spare() -> Process | None:
    """A helper started ahead by ``spare_copy_helpers``, now the caller's; None if none is
    left."""
    return _spares.pop() if _spares else None


async def stop_helper(process: Process) -> None:
    """Wait for a helper told to stop (end of input or SIGTERM) to exit, at most
    ``STOP_GRACE`` seconds, then kill it. Shielded from cancellation."""
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(STOP_GRACE):
            await process.wait()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        await process.aclose()


@contextlib.asynccontextmanager
async def spare_copy_helpers(count: int) -> AsyncIterator[None]:
    """Start ``count`` copy helpers for this process's local replicas to take; those not
    taken are stopped on exit. A helper that cannot start is no error here: a replica that
    needs one starts it as usual (and says so if it cannot)."""
    started: list[Process] = []
    try:
        for _ in range(count):
            try:
                process = await start_helper()
            except OSError:
                break
            started.append(process)
            _spares.append(process)
        yield
    finally:
        # Not taken, so never given a batch: nothing of theirs to clean up, and no reason
        # to wait for them to finish starting.
        left = [process for process in started if process in _spares]
        for process in left:
            _spares.remove(process)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        for process in left:
            await stop_helper(process)
