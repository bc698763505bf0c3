"""Processes started before a run needs them: local copy helpers and SSH receiver sessions.

A copy helper is a Python interpreter (``_copy_worker``) that takes about 0.05 s of CPU to
start; a receiver session through the OpenSSH client is a login and a ``python3`` on the
host, half a second or more. ``replicator sync`` starts them first thing (the sessions
even before its event loop, which imports asyncio), and only then imports the engine's
modules: that takes its process about 0.1 s on one core, while the helper starts on the
other and the login goes on. A local replica takes a spare helper
before it starts one itself (``CopyHelper.start``); an SSH replica takes a spare session
only where it would start the same ``ssh`` command itself (``SshTransport``), which checks
the host key as every one of its logins does. Spares not taken are stopped when the run ends: they
never had work, so there is nothing of theirs to clean up.

Imports nothing but the standard library and ``_logins`` (anyio on first use): it runs
before the rest is imported. The sessions themselves are ``_logins``'s.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .._lazy import LazyModule
from ._logins import close_sessions

if TYPE_CHECKING:
    import anyio
    from anyio.abc import Process
else:
    # anyio only once the event loop runs: the command spawns its SSH sessions first.
    anyio = LazyModule("anyio")

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

# Started and not yet taken; only ``spare_processes`` fills them.
_helpers: list[Process] = []
_dead: list[Process] = []  # spare helpers found dead when taken: reaped at the end


def helpers_for(workers: int) -> int:
    """The copy helpers a local replica with ``workers`` may run: one per worker, but no
    more than there are cores (each keeps one busy, and the engine's process needs one)."""
    return min(workers, os.cpu_count() or 1)


async def start_helper() -> Process:
    """Start a copy helper process. Raises OSError when it cannot be started."""
    return await anyio.open_process([sys.executable, "-c", _BOOTSTRAP], stderr=None)


def take_spare_helper() -> Process | None:
    """A copy helper started ahead, now the caller's; None if none is left alive."""
    while _helpers:
        process = _helpers.pop(0)
        if process.returncode is None:
            return process
        _dead.append(process)
    return None


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
async def spare_processes(helpers: int, sessions: Sequence[subprocess.Popen[bytes]] = ()
                          ) -> AsyncIterator[None]:
    """Start ``helpers`` copy helpers for this process's replicas to take; those not taken,
    and the ``sessions`` (``start_sessions``) not taken, are stopped on exit. One that cannot
    start is no error here: a replica that needs it starts its own as usual (and says so
    if it cannot)."""
    mine: list[Process] = []
    try:
        for _ in range(helpers):
            try:
                process = await start_helper()
            except OSError:
                break
            mine.append(process)
            _helpers.append(process)
        yield
    finally:
        with anyio.CancelScope(shield=True):
            left = [process for process in mine if process in _helpers]
            for process in left:
                _helpers.remove(process)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            for process in [*left, *_dead]:
                await stop_helper(process)
            _dead.clear()
            if sessions:  # no thread hand-off at the end of every run without
                await anyio.to_thread.run_sync(close_sessions, sessions)
