"""The ``replicator`` command line.

Logs go to stderr; results and ``--json`` documents (one per command) go to stdout.
Exit codes: 0 done; 1 some files failed; 2 configuration or usage error (also: another
engine runs on the inventory); 3 work remains because a replica or origin was unavailable.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ._config import Config, OriginConfig, ReplicaConfig, load_config
from ._config_edit import append_replica, remove_replica, render_initial_config
from ._errors import ConfigError, EngineLockedError, InventoryError, ReplicatorError
from ._gc_tuning import tune_gc
from ._lazy import LazyModule
from ._version import __version__
from .transports._logins import close_sessions, start_sessions
from .transports._spares import helpers_for, spare_processes
from .transports._ssh_options import openssh_client_refusal, options_for, session_argv

# The engine's modules (structlog, aiosqlite, the engine, the transports) are imported where
# a command first needs them: ``sync`` starts its copy helpers first (see ``_run_async``).
if TYPE_CHECKING:
    import anyio

    from ._inventory import Inventory, ReplicaStats
    from ._replicator import Replicator, SyncSummary
else:
    # anyio (and so asyncio) once a command needs it: ``sync`` spawns its SSH sessions first.
    anyio = LazyModule("anyio")

# Open files the CLI asks for (see _raise_open_files_limit).
OPEN_FILES = 65536
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


class _Usage(Exception):
    """A usage error reported with exit code 2."""


def _print_json(document: object) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def _config_path(args: argparse.Namespace) -> Path:
    if args.config:
        return Path(args.config)
    return Path(os.environ.get("REPLICATOR_CONFIG") or "replicator.toml")


def _load(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args))


def _fs(path: bytes) -> str:
    return os.fsdecode(path)


# -- read-only commands ------------------------------------------------------------------


def _replica_doc(stats: ReplicaStats) -> dict[str, Any]:
    return {
        "name": stats.name,
        "url": stats.url,
        "condition": stats.condition,
        "last_error": stats.last_error,
        "files": stats.files,
        "replicated": stats.replicated,
        "pending": stats.pending,
        "failed": stats.failed,
        "ignored": stats.ignored,
        "bytes_pending": stats.bytes_pending,
        "oldest_pending_age": (
            None if stats.oldest_pending_age is None else round(stats.oldest_pending_age, 3)
        ),
    }


async def _open_inventory(config: Config) -> Inventory:
    from ._inventory import Inventory

    inventory = await Inventory.open(config.inventory)
    await inventory.sync_replicas(
        [(r.name, r.url, [o.name for o in config.origins_for(r)]) for r in config.replicas]
    )
    return inventory


async def _replica_docs(config: Config, inventory: Inventory) -> list[dict[str, Any]]:
    names = {r.name for r in config.replicas}
    return [_replica_doc(s) for s in await inventory.replica_stats(time.time())
            if s.name in names]


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")  # never cut a path short
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    # Not a terminal: do not squeeze the table into rich's default 80 columns.
    width = None if sys.stdout.isatty() else 200
    Console(file=sys.stdout, width=width).print(table)


_REPLICA_COLUMNS = ("name", "url", "condition", "files", "replicated", "pending", "failed",
                    "ignored", "bytes_pending", "oldest_pending_age", "last_error")
_REPLICA_SHORT = ("name", "condition", "files", "replicated", "pending", "failed", "ignored",
                  "bytes_pending", "oldest_pending_age", "last_error")


async def cmd_replicas(args: argparse.Namespace) -> int:
    config = _load(args)
    async with await _open_inventory(config) as inventory:
        docs = await _replica_docs(config, inventory)
    if args.json:
        _print_json(docs)
    else:
        _table("replicas", _REPLICA_SHORT, [[d[c] for c in _REPLICA_SHORT] for d in docs])
    return EXIT_OK


async def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    async with await _open_inventory(config) as inventory:
        stats = {s.name: s for s in await inventory.origin_stats()}
        origins = [
            {"name": o.name, "path": o.path,
             "files": stats[o.name].files if o.name in stats else 0,
             "bytes": stats[o.name].bytes if o.name in stats else 0}
            for o in config.origins
        ]
        replicas = await _replica_docs(config, inventory)
    if args.json:
        _print_json({"origins": origins, "replicas": replicas})
    else:
        _table("origins", ("name", "path", "files", "bytes"),
               [[o["name"], o["path"], o["files"], o["bytes"]] for o in origins])
        _table("replicas", _REPLICA_SHORT, [[d[c] for c in _REPLICA_SHORT] for d in replicas])
    return EXIT_OK


async def cmd_failed(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.replica:
        config.replica(args.replica)
    async with await _open_inventory(config) as inventory:
        failed = await inventory.failed(args.replica)
    docs = [
        {"origin": f.origin, "path": _fs(f.path), "replica": f.replica, "attempts": f.attempts,
         "error_class": f.error_class, "error": f.error}
        for f in failed
    ]
    if args.json:
        _print_json(docs)
    else:
        columns = ("origin", "path", "replica", "attempts", "error_class", "error")
        _table("failed copies", columns, [[d[c] for c in columns] for d in docs])
    return EXIT_OK


def _paths(raw: Sequence[str]) -> list[bytes]:
    """Origin file paths as given and made absolute: a local origin's relative path is
    relative to the current folder, but an ``ssh://host/~/x`` origin records its files as
    given (relative to the remote login folder), and ``failed`` prints them so."""
    paths: list[bytes] = []
    for path in raw:
        paths.append(os.fsencode(path))
        absolute = os.fsencode(os.path.abspath(path))
        if absolute != paths[-1]:
            paths.append(absolute)
    return paths


async def _set_state(args: argparse.Namespace, to: str, from_states: Sequence[str],
                     paths: list[bytes] | None) -> int:
    """Copies in ``from_states`` (``CopyState`` values) go to ``to``."""
    from ._inventory import CopyState

    config = _load(args)
    if args.replica:
        config.replica(args.replica)
    async with await _open_inventory(config) as inventory:
        changed = await inventory.set_state(
            to=CopyState(to), from_states=[CopyState(state) for state in from_states],
            replica=args.replica, paths=paths)
        in_flight = await inventory.count_copying(args.replica, paths)
    print(f"{changed} cop{'y' if changed == 1 else 'ies'} now {to}")
    if in_flight:
        print(f"{in_flight} matching cop{'y is' if in_flight == 1 else 'ies are'} being"
              " transferred by a running engine and did not change; try again after it")
    return EXIT_OK


async def cmd_retry(args: argparse.Namespace) -> int:
    if bool(args.all) == bool(args.paths):
        raise _Usage("retry needs either --all or one or more PATHs")
    paths = None if args.all else _paths(args.paths)
    return await _set_state(args, "pending", ("failed", "pending"), paths)


async def cmd_ignore(args: argparse.Namespace) -> int:
    return await _set_state(args, "ignored", ("pending", "failed"), _paths(args.paths))


async def cmd_unignore(args: argparse.Namespace) -> int:
    return await _set_state(args, "pending", ("ignored",), _paths(args.paths))


def _readable_folder(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.R_OK | os.X_OK)


async def _remote_origin_ok(origin: OriginConfig) -> bool:
    """An ssh:// origin (pull mode): the host answers and the root is a folder."""
    from .transports._ssh_source import open_source

    source = open_source(origin)
    try:
        with anyio.fail_after(origin.connect_timeout + origin.op_timeout):
            await source.check_root()
    except (ReplicatorError, TimeoutError) as exc:
        print(f"origin {origin.name}: {exc or 'timed out'}", file=sys.stderr)
        return False
    finally:
        await source.aclose()
    return True


async def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    problems = 0
    for origin in config.origins:
        if origin.remote:
            ok = await _remote_origin_ok(origin)
        else:
            ok = await anyio.to_thread.run_sync(_readable_folder, origin.path)
        print(f"origin {origin.name}: {'ok' if ok else 'UNREACHABLE'} ({origin.path})")
        problems += not ok
    from .transports import open_transport

    limiter = anyio.CapacityLimiter(2)
    for replica in config.replicas:
        transport = open_transport(replica, limiter)
        try:
            with anyio.fail_after(replica.op_timeout):
                await transport.probe()
        except (ReplicatorError, TimeoutError) as exc:
            print(f"replica {replica.name}: UNAVAILABLE ({exc or 'timed out'})")
            problems += 1
        else:
            print(f"replica {replica.name}: ok ({replica.url})")
        finally:
            await transport.aclose()
    return EXIT_UNAVAILABLE if problems else EXIT_OK


async def cmd_scan(args: argparse.Namespace) -> int:
    from ._replicator import Replicator

    config = _load(args)
    async with Replicator(config) as rep:
        results = await rep.scan()
    docs = [{"origin": s.origin, "new": s.new, "changed": s.changed, "deleted": s.deleted,
             "unchanged": s.unchanged, "seconds": round(s.seconds, 3), "error": s.error}
            for s in results]
    if args.json:
        _print_json(docs)
    else:
        for d in docs:
            if d["error"]:
                print(f"{d['origin']}: UNAVAILABLE: {d['error']}")
            else:
                print(f"{d['origin']}: {d['new']} new, {d['changed']} changed,"
                      f" {d['deleted']} deleted, {d['unchanged']} unchanged"
                      f" in {d['seconds']} s")
    return EXIT_UNAVAILABLE if any(d["error"] for d in docs) else EXIT_OK


# -- sync ----------------------------------------------------------------------------------


async def _watch_signals(rep: Replicator, run: anyio.CancelScope,
                         *, task_status: anyio.abc.TaskStatus[None]) -> None:
    """SIGTERM or SIGINT: the first stops the run, the second cancels it (``run``). Watched
    until the inventory is closed: a signal after the run, during the (time-bounded) close,
    is not to kill the process with the default action half-way through it."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                print(f"replicator: {signal.Signals(signum).name}: finishing transfers in"
                      f" flight (again to abort)", file=sys.stderr)
                rep.stop()
            else:
                run.cancel()


async def _progress(rep: Replicator) -> None:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    from ._events import ScanFinished, TransferCompleted

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("copying", total=None)
        copied = 0
        async with rep.subscribe(1024) as events:
            async for event in events:
                if isinstance(event, ScanFinished):
                    stats = await rep.inventory.replica_stats(time.time())
                    total = sum(s.bytes_pending for s in stats)
                    bar.update(task, total=bar.tasks[0].completed + total)
                elif isinstance(event, TransferCompleted):
                    copied += 1
                    bar.update(task, advance=event.size, description=f"{copied} files")


def _summary_doc(summary: SyncSummary, stopped: bool) -> dict[str, Any]:
    return {"copied": summary.copied, "failed": summary.failed, "pending": summary.pending,
            "errors": summary.errors, "bytes": summary.bytes,
            "seconds": round(summary.seconds, 3),
            "unavailable": dict(summary.unavailable), "stopped": stopped}


async def _sync_run(rep: Replicator, args: argparse.Namespace,
                    replicas: list[str] | None) -> SyncSummary:
    async with anyio.create_task_group() as tg:
        if sys.stderr.isatty() and not args.json and args.verbose <= 0:
            tg.start_soon(_progress, rep)
        summary = await (rep.run(replicas) if args.continuous else rep.sync_once(replicas))
        tg.cancel_scope.cancel()
    return summary


async def cmd_sync(args: argparse.Namespace) -> int:
    from ._replicator import Replicator

    config = _load(args)
    replicas = args.replica or None
    if replicas:
        for name in replicas:
            config.replica(name)
    if args.dry_run:
        async with Replicator(config) as rep:
            planned = await rep.plan(replicas)
        if args.json:
            _print_json([{"replica": p.replica, "origin": p.origin, "path": _fs(p.source),
                          "dest": _fs(p.dest), "size": p.size} for p in planned])
        else:
            for p in planned:
                print(f"{p.replica}: {_fs(p.source)} -> {_fs(p.dest)} ({p.size} bytes)")
            print(f"{len(planned)} copies would be made")
        return EXIT_OK
    summary: SyncSummary | None = None
    stopped = False
    rep = Replicator(config)
    run = anyio.CancelScope()
    error: Exception | None = None
    async with anyio.create_task_group() as watching:
        await watching.start(_watch_signals, rep, run)
        try:
            async with rep:
                with run:
                    summary = await _sync_run(rep, args, replicas)
                    stopped = rep.stopped
        except Exception as exc:  # raised below as it is, not in the task group's group
            error = exc
        watching.cancel_scope.cancel()
    if error is not None:
        raise error
    if summary is None:  # a second signal aborted the run
        print("replicator: aborted; unfinished copies stay pending", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.json:
        _print_json(_summary_doc(summary, stopped))
    else:
        unavailable = "".join(
            f"\n  unavailable: {name}: {why}" for name, why in summary.unavailable
        )
        print(f"copied {summary.copied} files ({summary.bytes} bytes) in {summary.seconds:.1f} s;"
              f" {summary.pending} pending, {summary.failed} failed,"
              f" {summary.errors} with errors{unavailable}")
    code = summary.exit_code
    if code == EXIT_OK and stopped and summary.pending:
        code = EXIT_UNAVAILABLE  # stopped early: work remains
    return code


# -- config editing ------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    path = _config_path(args)
    if path.exists() and not args.force:
        raise _Usage(f"{path} exists; use --force to overwrite it")
    origins = [os.path.abspath(p) for p in args.origin]
    text = render_initial_config(origins, args.inventory)
    path.write_text(text)
    load_config(path)
    print(f"wrote {path}")
    return EXIT_OK


def _write_checked(path: Path, text: str) -> Config:
    """Validate the edited text as a config before it replaces the file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    try:
        config = load_config(tmp)
    except ConfigError as exc:
        tmp.unlink()
        raise ConfigError(str(exc).replace(str(tmp), str(path))) from None
    os.replace(tmp, path)
    return config


def _replica_keys(text: str, config: Config) -> dict[str, str]:
    """Each ``[replicas."KEY"]`` key as written in the file -> the replica's name.

    The loader keeps the file's order, and resolves relative paths, which
    ``derive_name`` alone cannot do.
    """
    raw = tomllib.loads(text).get("replicas", {})
    return {key: r.name for key, r in zip(raw, config.replicas, strict=True)}


def cmd_add_replica(args: argparse.Namespace) -> int:
    path = _config_path(args)
    if path.exists():
        load_config(path)  # report an existing error with the file's name and line
    text = path.read_text() if path.exists() else ""
    table: dict[str, object] = {}
    if args.name:
        table["name"] = args.name
    if args.workers is not None:
        table["workers"] = args.workers
    if args.layout:
        table["layout"] = args.layout
    # Paths on the command line are relative to the current folder, in the file to the file's.
    if args.identity_file:
        table["identity_file"] = os.path.abspath(args.identity_file)
    if args.known_hosts:
        table["known_hosts"] = os.path.abspath(args.known_hosts)
    text = append_replica(text, args.url, table)
    name = _replica_keys(text, _write_checked(path, text))[args.url]
    print(f"added replica {name} ({args.url}) to {path}")
    return EXIT_OK


def cmd_remove_replica(args: argparse.Namespace) -> int:
    path = _config_path(args)
    config = load_config(path)
    text = path.read_text()
    urls = [url for url, name in _replica_keys(text, config).items() if name == args.name]
    if not urls:
        raise ConfigError(f"{path}: no replica named {args.name!r}")
    _write_checked(path, remove_replica(text, urls[0]))
    print(f"removed replica {args.name} from {path}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(Path(args.dir))


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replicator",
        description="Replicate data files to local and SSH replicas, verified and atomic.",
    )
    parser.add_argument("--version", action="version", version=f"replicator {__version__}")
    parser.add_argument("-c", "--config", help="config file (default: $REPLICATOR_CONFIG,"
                        " then ./replicator.toml)")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="count", default=0,
                      help="more logging (-v: a line per transfer, -vv: debug)")
    loud.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    parser.add_argument("--log-format", choices=("console", "json"), default="console")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="write a new config file")
    p.add_argument("--origin", action="append", required=True, metavar="PATH")
    p.add_argument("--inventory", metavar="PATH")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("add-replica", help="add a replica to the config file")
    p.add_argument("url")
    p.add_argument("--name")
    p.add_argument("--workers", type=int)
    p.add_argument("--layout")
    p.add_argument("--identity-file", metavar="PATH", help="ssh:// replicas: private key")
    p.add_argument("--known-hosts", metavar="PATH",
                   help="ssh:// replicas: known_hosts file (default ~/.ssh/known_hosts)")
    p.set_defaults(func=cmd_add_replica)

    p = sub.add_parser("remove-replica", help="remove a replica from the config file")
    p.add_argument("name")
    p.set_defaults(func=cmd_remove_replica)

    p = sub.add_parser("check", help="validate the config and reach origins and replicas")
    p.set_defaults(func=cmd_check, is_async=True)

    for name, func, text in (("replicas", cmd_replicas, "per-replica counts"),
                             ("status", cmd_status, "origins and replicas"),
                             ("scan", cmd_scan, "update the inventory only")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func, is_async=True)

    p = sub.add_parser("sync", help="copy what is due (once by default)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="catch up, then exit (default)")
    mode.add_argument("--continuous", action="store_true", help="keep replicating until stopped")
    p.add_argument("--replica", action="append", metavar="NAME")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sync, is_async=True)

    p = sub.add_parser("failed", help="list failed copies")
    p.add_argument("--replica", metavar="NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_failed, is_async=True)

    p = sub.add_parser("retry", help="make failed copies due again")
    p.add_argument("--replica", metavar="NAME")
    p.add_argument("--all", action="store_true")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.set_defaults(func=cmd_retry, is_async=True)

    for name, func, text in (("ignore", cmd_ignore, "stop trying to copy these files"),
                             ("unignore", cmd_unignore, "copy these files again")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--replica", metavar="NAME")
        p.add_argument("paths", nargs="+", metavar="PATH")
        p.set_defaults(func=func, is_async=True)

    p = sub.add_parser("demo", help="replicate a generated sample tree in a scratch folder")
    p.add_argument("--dir", default="replicator-demo", help="scratch folder (default: %(default)s)")
    p.set_defaults(func=cmd_demo)
    return parser


def _fail(message: str, code: int) -> NoReturn:
    print(f"replicator: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _raise_open_files_limit() -> None:
    """A batch keeps its destination folders open until its renames (up to a few thousand
    descriptors); the common soft limit of 1,024 would fail files. The process is ours."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _spares_wanted(args: argparse.Namespace
                   ) -> tuple[int, list[list[str]], tuple[Config, Path] | None]:
    """What ``sync --once`` starts before it imports the engine (``transports._spares``).

    Copy helpers for its local replicas with a local origin: one per worker, at most one
    per core but this process's (more would only compete with its imports; a replica starts
    the others when it needs them), or one per core where such a replica has work the
    inventory knows of (new to it, or copies waiting): a first copy to a new replica keeps
    every helper busy from its first batches on, and a helper started when a batch finds
    the others busy spends its start-up while the copies wait (small-local 4% to 9%
    faster in four series). A run with nothing to copy pays for a helper it does not use
    (0.193 to 0.225 s with an empty origin), so only where the inventory says so.
    And the first receiver session of each SSH replica that may use the OpenSSH client with
    host keys checked, and that the inventory says has work: a login on the host is not
    spent on a run that may have nothing to copy there; one per host, user and port (sshd
    limits logins in progress).
    Nothing for other commands, a dry run, a continuous run (spares would wait for work as
    long as it runs), or a config that does not load (``sync`` says why).
    And, where it starts sessions, the config (and its file) for ``_remember``."""
    if args.func is not cmd_sync or args.dry_run or args.continuous:
        return 0, [], None
    try:
        config = _load(args)
    except (ConfigError, OSError):
        return 0, [], None
    cores = os.cpu_count() or 1
    local: list[ReplicaConfig] = []
    ssh: list[ReplicaConfig] = []
    for replica in config.replicas:
        if args.replica and replica.name not in args.replica:
            continue
        if replica.scheme == "file":
            if any(not origin.remote for origin in config.origins_for(replica)):
                local.append(replica)
        elif _started_ahead(replica):
            ssh.append(replica)
    if ssh and openssh_client_refusal() is not None:
        ssh = []  # the transport will not use the client either
    busy: set[str] = set()
    if local or ssh:
        from ._inventory._peek import replicas_with_work

        busy = replicas_with_work(config.inventory, [r.name for r in [*local, *ssh]])
    sessions: list[list[str]] = []
    hosts: set[str] = set()
    for replica in ssh:
        options = options_for(replica)
        if replica.name in busy and options.where not in hosts:
            hosts.add(options.where)
            sessions.append(session_argv(options, os.fsencode(replica.remote_path)))
    helpers = sum(helpers_for(replica.workers) for replica in local)
    room = cores if any(replica.name in busy for replica in local) else cores - 1
    return min(helpers, room), sessions, ((config, _config_path(args)) if sessions else None)


def _remember(config: Config, path: Path) -> None:
    """Record the sessions of every SSH replica of ``config`` that the OpenSSH client may
    carry (``_early``), for the next run of it to start first thing. After this run's own
    sessions started: their ``ssh -V`` is done, a command line costs microseconds."""
    from . import _early

    _early.remember(str(path), str(config.inventory.absolute()), [
        (replica.name, session_argv(options_for(replica), os.fsencode(replica.remote_path)))
        for replica in config.replicas if _started_ahead(replica)])


def _started_ahead(replica: ReplicaConfig) -> bool:
    """An SSH replica whose receiver session may be started ahead: one the OpenSSH client
    may carry, with host keys checked (as the transport's own logins are)."""
    return (replica.scheme == "ssh" and replica.transfer in ("auto", "openssh")
            and not replica.insecure_skip_host_key_check)


async def _run_async(args: argparse.Namespace, helpers: int,
                     sessions: list[subprocess.Popen[bytes]]) -> int:
    # Spares first: they start on the other core while this one imports the engine.
    async with spare_processes(helpers, sessions):
        from . import _cli_logging

        _cli_logging.configure(args.verbose, args.log_format)
        code: int = await args.func(args)
        return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet:
        args.verbose = -1
    _raise_open_files_limit()
    if isinstance(sys.stdout, io.TextIOWrapper):
        # File names need not be UTF-8: print their bytes as they are instead of failing.
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        if getattr(args, "is_async", False):
            # Decided before the event loop runs: it reads the config and the inventory.
            # The logins start at once, before asyncio is imported: each takes longer than
            # anything else a run starts with.
            helpers, argvs, started = _spares_wanted(args)
            sessions = start_sessions(argvs)
            if started is not None:
                _remember(*started)
            try:
                code = anyio.run(_run_async, args, helpers, sessions)
            finally:
                close_sessions(sessions)  # those no replica took (if the loop never ran)
        else:
            from . import _cli_logging

            _cli_logging.configure(args.verbose, args.log_format)
            code = args.func(args)
    except (ConfigError, EngineLockedError, InventoryError, _Usage) as exc:
        _fail(str(exc), EXIT_USAGE)
    except OSError as exc:
        # The inventory, its lock or the config file cannot be opened or written.
        where = f": {exc.filename}" if exc.filename else ""
        _fail(f"{exc.strerror or exc}{where}", EXIT_USAGE)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    return code


def run() -> NoReturn:
    """The command's entry point (``replicator``, ``python -m replicator``): ``main``, then
    an exit without the interpreter's teardown, which only frees what the process drops
    anyway (tens of milliseconds after a large run). By then the run is over: the
    inventory is closed, helpers and sessions have exited, no thread of ours is left."""
    tune_gc()
    code = main()
    if "logging" in sys.modules:  # handlers a library may have added
        sys.modules["logging"].shutdown()
    try:
        sys.stdout.flush()
    except OSError:  # stdout was closed early (a pipe into head): as Python's exit says
        code = code or 120
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
