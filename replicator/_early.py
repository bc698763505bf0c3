"""The command's entry point, and the receiver logins it starts before its own imports.

A ``sync`` to an SSH host waits first for the login (a key exchange, the host's shell and
its start-up files: a third of a second on a LAN), and the command reaches the point where
it starts that login (``cli._spares_wanted``: the config read, the inventory asked) only
after about 0.1 s of imports. So each such run records the ``ssh`` command lines of its
receiver sessions, with the config file they came from; the next run of the same config
starts them first thing, before importing anything but the standard library it needs.
The command then takes a session started this way only where it would start the very
same command line itself (``transports._logins``), which checks the host key as every
login does; one it does not take (the config changed since, or another ``ssh``) is
stopped. A record is a cache: a missing, stale or unreadable one only means no head start.

Where: ``$XDG_CACHE_HOME/replicator/sessions.json`` (default ``~/.cache``), written by the
user alone (a file another user can write is ignored, as ssh ignores such a config).
"""

from __future__ import annotations

import json
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

_RECORD_VERSION = 1
# The record of the last run (its config's entry), as read by ``start``.
_read: dict[str, object] | None = None


def run() -> None:
    """The ``replicator`` command: the recorded logins, then the command line."""
    start(sys.argv[1:])
    from .cli import run as cli_run

    cli_run()


def record_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "replicator", "sessions.json")


def _config_key(config: str) -> list[object] | None:
    """What must not change for a record to hold: the config file (where, which, its
    size and mtime), the working folder (relative paths in it), this release and home."""
    try:
        st = os.stat(config)
    except OSError:
        return None
    from ._version import __version__

    return [os.path.abspath(config), os.getcwd(), st.st_dev, st.st_ino, st.st_size,
            st.st_mtime_ns, __version__, os.path.expanduser("~")]


def _sync_config(argv: Sequence[str]) -> tuple[str, set[str]] | None:
    """(config file, replicas asked for: empty for all) of a plain ``sync [--once]``
    command line; None for anything else (the engine's other commands, a dry or continuous
    run, help, an option this reader does not know)."""
    config = os.environ.get("REPLICATOR_CONFIG") or "replicator.toml"
    replicas: set[str] = set()
    seen_sync = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-c", "--config", "--log-format", "--replica") and args:
            value = args.pop(0)
        elif arg.startswith(("--config=", "--log-format=", "--replica=")):
            arg, value = arg.split("=", 1)
        elif arg in ("-q", "--quiet", "--verbose", "--once") or (
                arg.startswith("-v") and set(arg[1:]) == {"v"}):
            continue
        elif arg == "sync" and not seen_sync:
            seen_sync = True
            continue
        else:
            return None
        if arg in ("-c", "--config"):
            if seen_sync:
                return None
            config = value
        elif arg == "--replica":
            if not seen_sync:
                return None
            replicas.add(value)
    return (config, replicas) if seen_sync else None


def _records() -> dict[object, object]:
    """The record file's entries by config file; none from a file that someone else
    wrote or may write, or that does not parse."""
    try:
        fd = os.open(record_path(), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            return {}  # written by someone else, or writable by them
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
    return data if isinstance(data, dict) else {}


def _load(config: str) -> dict[str, object] | None:
    """The record's entry for ``config``, if it holds for it now."""
    key = _config_key(config)
    if key is None:
        return None
    entry = _records().get(key[0])
    if not (isinstance(entry, dict) and entry.get("version") == _RECORD_VERSION
            and entry.get("key") == key):
        return None
    return entry


def start(argv: Sequence[str]) -> None:
    """Start the receiver sessions the last run of this ``sync`` command's config started,
    for the replicas the inventory says have work (as ``cli._spares_wanted`` decides).
    Never fails: any error means no head start."""
    global _read
    try:
        found = _sync_config(argv)
        if found is None:
            return
        config, wanted = found
        entry = _read = _load(config)
        if entry is None:
            return
        sessions = entry["sessions"]
        inventory = entry["inventory"]
        if not (isinstance(sessions, list) and isinstance(inventory, str)):
            return
        names = [name for name, _argv in sessions if not wanted or name in wanted]
        if not names:
            return
        from pathlib import Path

        from ._inventory._peek import replicas_with_work

        busy = replicas_with_work(Path(inventory), names)
        argvs: list[list[str]] = []
        for name, argv in sessions:
            if (name in busy and argv not in argvs and isinstance(argv, list) and argv
                    and argv[0] == "ssh" and all(isinstance(a, str) for a in argv)):
                argvs.append(argv)
        if argvs:
            from .transports._logins import start_sessions

            start_sessions(argvs)
    except Exception:  # a head start only: the command goes on without it
        return


def remember(config: str, inventory: str, sessions: list[tuple[str, list[str]]]) -> None:
    """Record this config's receiver sessions (every SSH replica's that the OpenSSH client
    may carry, by name) for the next run, unless the record already says so. Errors are
    ignored: a cache."""
    key = _config_key(config)
    if key is None:
        return
    entry = {"version": _RECORD_VERSION, "key": key, "inventory": inventory,
             "sessions": [[name, argv] for name, argv in sessions]}
    if _read == entry:
        return
    path = record_path()
    # The other configs' entries are kept, from a file this process would trust only: one
    # it rewrites becomes its own, and is then trusted.
    data = _records()
    try:
        if entry["sessions"]:
            data[key[0]] = entry
        elif data.pop(key[0], None) is None:
            return
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        return
