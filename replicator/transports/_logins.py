"""SSH receiver logins started ahead of the transport that takes them: ``ssh`` processes
by command line, for ``_spares`` (the command line's spare sessions) and ``_early`` (the
logins a ``sync`` starts first thing, from the last run's record), which imports this
before anything else: the standard library only, and no typing at run time.
"""

from __future__ import annotations

import contextlib
import fcntl
import subprocess

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# An ssh client killed gets this long to be reaped.
REAP_SECONDS = 5.0

# Started and not yet taken, by command line.
_sessions: list[tuple[tuple[str, ...], subprocess.Popen[bytes]]] = []


def spawn_ssh(argv: list[str]) -> subprocess.Popen[bytes]:
    """Start ``ssh`` (``_ssh_options.openssh_argv``) in a session of its own, its pipes
    ours."""
    # Buffered pipes (replies are read by line); writes bypass the buffer (os.write).
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    assert proc.stdin is not None
    with contextlib.suppress(OSError):  # a larger pipe: fewer hand-offs per MiB
        fcntl.fcntl(proc.stdin.fileno(), _F_SETPIPE_SZ, PIPE_SIZE)
    return proc


def take_spare_session(argv: Sequence[str]) -> subprocess.Popen[bytes] | None:
    """An ``ssh`` process started ahead with exactly ``argv``, now the caller's (its
    receiver not yet sent); None if there is none, or it already ended."""
    for index, (started, proc) in enumerate(_sessions):
        if started == tuple(argv):
            del _sessions[index]
            if proc.poll() is None:
                return proc
            _close_session(proc)
            return None
    return None


def _close_session(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(REAP_SECONDS)


def start_sessions(sessions: Sequence[Sequence[str]]) -> list[subprocess.Popen[bytes]]:
    """Start an ``ssh`` process for each of ``sessions`` (a ``session_argv``) for this
    process's replicas to take (``take_spare_session``); the first that cannot start ends
    the list. One started already with the same command line (``_early``, from the last
    run's record) counts as started; one started already that is none of ``sessions`` is
    stopped. Blocking: called before the event loop runs, so that the logins start before
    the command imports asyncio and anyio's back end (some 50 ms). Pass what it returns to
    ``spare_processes`` (or ``close_sessions``), which stops those not taken."""
    wanted = [tuple(argv) for argv in sessions]
    close_sessions([proc for argv, proc in _sessions if argv not in wanted])
    started: list[subprocess.Popen[bytes]] = []
    for argv in wanted:
        proc = next((p for a, p in _sessions if a == argv and p not in started), None)
        if proc is None:
            try:
                proc = spawn_ssh(list(argv))
            except OSError:
                break
            _sessions.append((argv, proc))
        started.append(proc)
    return started


def close_sessions(started: Sequence[subprocess.Popen[bytes]]) -> None:
    """Stop the sessions of ``started`` that no replica took. Idempotent."""
    unused = [proc for _argv, proc in _sessions if proc in started]
    _sessions[:] = [(argv, proc) for argv, proc in _sessions if proc not in started]
    for proc in unused:
        _close_session(proc)
