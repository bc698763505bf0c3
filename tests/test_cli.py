"""The ``replicator`` command line, run as a real subprocess on real folders."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import backdate, replica_path, temp_files, write

from replicator import load_config
from replicator._version import __version__

_T = TypeVar("_T")

REPLICA_KEYS = {"name", "url", "condition", "files", "replicated", "pending", "failed",
                "ignored", "bytes_pending", "oldest_pending_age"}
FAILED_KEYS = {"origin", "path", "replica", "attempts", "error_class", "error"}


# -- helpers ------------------------------------------------------------------------------


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLICATOR_")}
    env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", NO_COLOR="1",
               TERM="dumb", COLUMNS="200")
    return env


def python_c(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -c CODE`` in the CLI's environment; it must succeed."""
    return subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True,
                          text=True, timeout=60, check=True)


def cli(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m replicator ARGS`` in ``cwd`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "replicator", *args], cwd=cwd, env=cli_env(),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )


def ok(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = cli(cwd, *args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result


def fails(cwd: Path, code: int, *args: str) -> subprocess.CompletedProcess[str]:
    result = cli(cwd, *args)
    assert result.returncode == code, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def as_json(cwd: Path, *args: str) -> Any:
    """Run a command with ``--json``: stdout must be exactly one JSON document."""
    return json.loads(ok(cwd, *args, "--json").stdout)


def wait_for(predicate: Callable[[], _T], timeout: float, what: str,
             interval: float = 0.02) -> _T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def write_config(
    tmp: Path,
    origin: Path,
    replica: Path,
    *,
    replica_lines: str = "",
    engine_lines: str = "retry_window = 1.0\nshutdown_grace = 5.0\n",
) -> Path:
    """A config with one origin (host "inst", short settle time) and one replica "bk"."""
    text = (
        '# test config\n[inventory]\npath = "inventory.db"\n\n'
        f"[engine]\n{engine_lines}\n"
        f"[origins.raw]\npath = {json.dumps(str(origin))}\nhost = \"inst\"\n"
        "settle_seconds = 0.5\nscan_interval = 0.5\n\n"
        f"[replicas.{json.dumps(str(replica))}]\n"
        'name = "bk"\nbackoff_initial = 0.05\nbackoff_max = 0.2\n'
        f"{replica_lines}"
    )
    path = tmp / "replicator.toml"
    path.write_text(text)
    load_config(path)
    return path


def files_below(root: Path) -> dict[str, Path]:
    """Regular files below ``root`` by relative path, temp files included, marker excluded."""
    found: dict[str, Path] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if name == ".replicator-replica" and Path(dirpath) == root:
                continue  # the replica's identity marker, not a copy
            path = Path(dirpath, name)
            found[str(path.relative_to(root))] = path
    return found


def small_tree(origin: Path) -> dict[str, bytes]:
    content = {
        "a.dat": b"alpha\n" * 100,
        "sub/b.dat": os.urandom(5000),
        "sub/deep/c.fits": os.urandom(70_000),
    }
    for rel, data in content.items():
        write(origin / rel, data)
    backdate(origin)
    return content


def assert_replicated(origin: Path, replica: Path, content: dict[str, bytes]) -> None:
    for rel, data in content.items():
        dest = replica_path(replica, origin / rel)
        assert dest.read_bytes() == data, rel
        assert dest.stat().st_mtime_ns == (origin / rel).stat().st_mtime_ns, rel


def copy_rows(tmp: Path) -> list[tuple[str, int, str | None]]:
    with contextlib.closing(sqlite3.connect(tmp / "inventory.db")) as db:
        return list(db.execute("SELECT state, attempts, error_class FROM copies"))


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    origin, replica = tmp_path / "origin", tmp_path / "replica"
    origin.mkdir()
    replica.mkdir()
    return origin, replica


@contextlib.contextmanager
def background(cwd: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A CLI process in the background; killed (and reaped) if the test leaves early."""
    out = (cwd / "bg.out").open("w")
    err = (cwd / "bg.err").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "replicator", *args], cwd=cwd, env=cli_env(),
        stdin=subprocess.DEVNULL, stdout=out, stderr=err, text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        out.close()
        err.close()


# -- 1. version and config editing ----------------------------------------------------------


def test_version(tmp_path: Path) -> None:
    result = ok(tmp_path, "--version")
    assert result.stdout.strip() == f"replicator {__version__}"


def test_init_writes_a_loadable_config_and_refuses_to_overwrite(dirs: tuple[Path, Path],
                                                                tmp_path: Path) -> None:
    origin, _ = dirs
    ok(tmp_path, "init", "--origin", "origin")  # relative to the working folder
    path = tmp_path / "replicator.toml"
    config = load_config(path)
    assert [(o.name, o.path) for o in config.origins] == [("origin", str(origin))]
    assert config.replicas == ()
    before = path.read_bytes()

    result = fails(tmp_path, 2, "init", "--origin", str(tmp_path / "other"))
    assert "--force" in result.stderr
    assert path.read_bytes() == before

    ok(tmp_path, "init", "--origin", str(origin), "--force", "--inventory", "inv.db")
    assert load_config(path).inventory == tmp_path / "inv.db"


def test_add_and_remove_replica_keep_comments(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    origin, replica = dirs
    ok(tmp_path, "init", "--origin", str(origin))
    path = tmp_path / "replicator.toml"
    original = path.read_text() + "# operator note: keep me  \n[engine]  # a trailing comment\n"
    path.write_text(original)
    second = tmp_path / "second"

    ok(tmp_path, "add-replica", str(replica), "--name", "N", "--workers", "2",
       "--layout", "{origin}/{relpath}")
    one = path.read_text()
    assert one.startswith(original)
    assert tomllib.loads(one)["replicas"] == {
        str(replica): {"name": "N", "workers": 2, "layout": "{origin}/{relpath}"}}
    (r,) = load_config(path).replicas
    assert (r.name, r.url, r.workers, r.layout) == ("N", str(replica), 2, "{origin}/{relpath}")

    ok(tmp_path, "add-replica", f"file://{second}")
    two = path.read_text()
    assert two.startswith(one)
    assert [r.name for r in load_config(path).replicas] == ["N", "second"]

    result = ok(tmp_path, "remove-replica", "N")
    assert "removed replica N" in result.stdout
    # Only N's table went: every other byte, comments included, is where it was.
    assert path.read_text() == original + two[len(one):]
    assert [r.name for r in load_config(path).replicas] == ["second"]

    ok(tmp_path, "remove-replica", "second")
    assert path.read_text() == original

    result = fails(tmp_path, 2, "remove-replica", "second")
    assert "second" in result.stderr
    assert path.read_text() == original


@pytest.mark.parametrize("url", ["ftp://host/data", "popeye:/data", "ssh:///no-host"])
def test_add_replica_bad_url_exits_2_and_leaves_the_file(
    dirs: tuple[Path, Path], tmp_path: Path, url: str
) -> None:
    origin, _ = dirs
    ok(tmp_path, "init", "--origin", str(origin))
    path = tmp_path / "replicator.toml"
    before = path.read_bytes()
    result = fails(tmp_path, 2, "add-replica", url)
    assert result.stderr.startswith("replicator: error: ")
    assert url in result.stderr
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["origin", "replica", "replicator.toml"]


def test_relative_replica_paths_are_named_and_removable(dirs: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    origin, _ = dirs
    ok(tmp_path, "init", "--origin", str(origin))
    result = ok(tmp_path, "add-replica", "backups/disk1")
    assert "added replica disk1" in result.stdout
    (replica,) = load_config(tmp_path / "replicator.toml").replicas
    assert (replica.name, replica.url) == ("disk1", str(tmp_path / "backups" / "disk1"))
    ok(tmp_path, "remove-replica", "disk1")
    assert load_config(tmp_path / "replicator.toml").replicas == ()


# -- 2. configuration errors -------------------------------------------------------------------


READ_COMMANDS = [["status"], ["replicas", "--json"], ["sync"], ["scan"], ["failed"],
                 ["retry", "--all"], ["ignore", "x"], ["check"], ["add-replica", "/mnt/x"],
                 ["remove-replica", "x"]]


@pytest.mark.parametrize("command", READ_COMMANDS, ids=lambda c: c[0])
def test_malformed_toml_names_file_and_line(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "my.toml"
    path.write_text('[origins.raw]\npath = "/data/raw"\nsettle_seconds = = 3\n')
    result = fails(tmp_path, 2, "-c", str(path), *command)
    assert str(path) in result.stderr
    assert "line 3" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("command", [["status"], ["sync", "--once"], ["failed", "--json"]],
                         ids=lambda c: c[0])
def test_unknown_key_is_named(tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "replicator.toml").write_text(
        '[origins.raw]\npath = "/data/raw"\nsetle_seconds = 3\n')
    result = fails(tmp_path, 2, *command)
    assert "replicator.toml" in result.stderr
    assert "origins.raw.setle_seconds" in result.stderr
    assert "unknown key" in result.stderr


def test_missing_config_and_environment_variable(tmp_path: Path) -> None:
    result = fails(tmp_path, 2, "status")
    assert "replicator.toml" in result.stderr
    assert "not found" in result.stderr
    env_path = tmp_path / "elsewhere.toml"
    env_path.write_text("[inventory]\nbogus = 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "replicator", "status"], cwd=tmp_path,
        env={**cli_env(), "REPLICATOR_CONFIG": str(env_path)},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "elsewhere.toml" in result.stderr
    assert "inventory.bogus" in result.stderr
    assert "Traceback" not in result.stderr


# -- 3. sync, status, replicas, scan, dry run ---------------------------------------------------


def test_the_command_and_its_copy_helpers_collect_garbage_less_often() -> None:
    """``cli.run`` and the copy helper set the collector's threshold (``_gc_tuning``) before
    their work; the library alone leaves it as its owner set it."""
    from replicator import _gc_tuning

    probe = ("import gc, sys; import replicator.cli as cli; "
             "cli.main = lambda: print(gc.get_threshold()[0]) or 0; cli.run()")
    command = subprocess.run([sys.executable, "-c", probe], env=cli_env(),
                             capture_output=True, text=True, timeout=60)
    assert command.stdout.strip() == str(_gc_tuning.YOUNGEST), command.stderr
    library = subprocess.run(
        [sys.executable, "-c", "import gc, replicator; print(gc.get_threshold()[0])"],
        env=cli_env(), capture_output=True, text=True, timeout=60)
    assert library.stdout.strip() != str(_gc_tuning.YOUNGEST), library.stderr
    helper = subprocess.run(
        [sys.executable, "-c", "import gc, replicator.transports._copy_worker as w; "
         "w._Server.run = lambda self, stdin: print(gc.get_threshold()[0], file=sys.stderr); "
         "import sys; w.serve()"],
        env=cli_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert helper.stderr.strip() == str(_gc_tuning.YOUNGEST), helper.stderr


def test_the_command_exits_with_its_output_and_code(dirs: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    """The command leaves without the interpreter's teardown (``cli.run``): what it printed
    to a pipe (block-buffered, as for any user's script) is all there, and its exit code
    is the run's."""
    origin, replica = dirs
    names = [f"d{i % 7}/file{i:04d}.dat" for i in range(400)]
    for name in names:
        write(origin / name, b"x")
    write_config(tmp_path, origin, replica)
    env = {k: v for k, v in cli_env().items() if k != "PYTHONUNBUFFERED"}

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "replicator", *args], cwd=tmp_path,
                              env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=60)

    listed = command("sync", "--dry-run")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[-1] == "400 copies would be made"
    assert sum(str(origin / name) in listed.stdout for name in names) == 400
    replica.rmdir()  # the replica's root is gone: unavailable, exit code 3
    gone = command("sync", "--once")
    assert gone.returncode == 3, gone.stdout + gone.stderr
    assert "unavailable: " in gone.stdout


def test_sync_status_and_json_documents(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    origin, replica = dirs
    content = small_tree(origin)
    write_config(tmp_path, origin, replica, replica_lines="workers = 2\n")
    total = sum(len(d) for d in content.values())

    (scan,) = as_json(tmp_path, "scan")
    assert scan["origin"] == "raw"
    assert (scan["new"], scan["changed"], scan["deleted"], scan["error"]) == (3, 0, 0, None)

    result = ok(tmp_path, "sync", "--dry-run")
    for rel in content:
        assert str(origin / rel) in result.stdout
    assert "3 copies would be made" in result.stdout
    planned = as_json(tmp_path, "sync", "--dry-run")
    assert sorted(p["path"] for p in planned) == sorted(str(origin / rel) for rel in content)
    assert {p["replica"] for p in planned} == {"bk"}
    assert files_below(replica) == {}

    result = ok(tmp_path, "sync")
    assert "copied 3 files" in result.stdout
    assert_replicated(origin, replica, content)
    assert len(files_below(replica)) == 3

    status = as_json(tmp_path, "status")
    assert status["origins"] == [
        {"name": "raw", "path": str(origin), "files": 3, "bytes": total}]
    (rep,) = status["replicas"]
    assert rep.keys() >= REPLICA_KEYS
    assert (rep["name"], rep["url"], rep["condition"]) == ("bk", str(replica), "ok")
    assert rep["files"] == rep["replicated"] + rep["pending"] + rep["failed"] + rep["ignored"]
    assert (rep["files"], rep["replicated"], rep["bytes_pending"]) == (3, 3, 0)
    assert rep["oldest_pending_age"] is None
    assert as_json(tmp_path, "replicas") == status["replicas"]

    write(origin / "sub" / "new.dat", b"late arrival")
    planned = as_json(tmp_path, "sync", "--dry-run")
    assert [p["path"] for p in planned] == [str(origin / "sub" / "new.dat")]
    assert not replica_path(replica, origin / "sub" / "new.dat").exists()

    (rep,) = as_json(tmp_path, "replicas")
    assert (rep["files"], rep["pending"], rep["bytes_pending"]) == (4, 1, 12)
    assert rep["oldest_pending_age"] is not None
    assert rep["oldest_pending_age"] >= 0

    result = ok(tmp_path, "-v", "--log-format", "json", "sync", "--json")
    summary = json.loads(result.stdout)  # logs stay on stderr
    assert (summary["copied"], summary["failed"], summary["pending"]) == (1, 0, 0)
    assert summary["bytes"] == 12
    logs = [json.loads(line) for line in result.stderr.splitlines()]
    assert {"event": "transfer", "outcome": "replicated", "replica": "bk",
            "path": str(origin / "sub" / "new.dat")}.items() <= next(
        log for log in logs if log.get("event") == "transfer").items()
    assert summary["unavailable"] == {}
    assert replica_path(replica, origin / "sub" / "new.dat").read_bytes() == b"late arrival"

    # Nothing new: a second run copies nothing.
    summary = as_json(tmp_path, "sync", "--once")
    assert (summary["copied"], summary["failed"], summary["pending"]) == (0, 0, 0)
    assert temp_files(replica) == []


def test_non_utf8_names_in_text_and_json_output(dirs: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    origin, replica = dirs
    base = os.fsencode(origin)
    fine = os.path.join(base, b"caf\xe9.dat")
    stuck = os.path.join(base, b"sub", b"\xff.dat")
    os.mkdir(os.path.join(base, b"sub"))
    for raw in (fine, stuck):
        with open(raw, "wb") as f:
            f.write(raw)
    backdate(origin)
    write_config(tmp_path, origin, replica, replica_lines="max_attempts = 1\n")
    write(replica_path(replica, origin / "sub"), b"not a folder")
    # A UTF-8 locale's strict stdout, as on most workstations.
    env = {**cli_env(), "PYTHONIOENCODING": "utf-8:strict"}

    def run(*args: bytes | str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "replicator", *args], cwd=tmp_path,
                              env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=60)

    result = run("sync", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert fine in result.stdout
    assert stuck in result.stdout
    assert run("sync").returncode == 1
    result = run("failed")
    assert result.returncode == 0, result.stderr
    assert b"\xff" in result.stdout, result.stdout.decode(errors="backslashreplace")
    (failed,) = json.loads(run("failed", "--json").stdout)
    assert failed["path"] == os.fsdecode(stuck)
    result = run("ignore", stuck)
    assert result.stdout.strip() == b"1 copy now ignored", result.stderr
    assert run("sync").returncode == 0
    assert os.path.exists(os.path.join(os.fsencode(replica_path(replica, origin)), b"caf\xe9.dat"))


def test_sync_copies_in_helpers_started_before_the_engine_is_imported(
        dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """``sync`` starts its copy helpers first (for a replica new to the inventory one per
    worker and core), then imports the engine; the replica's batches run in them. A run
    whose inventory has no copies waiting starts one per core but its own, and the others
    when a batch finds them busy."""
    origin, replica = dirs
    content = {f"d{i % 3}/{i:03}.dat": os.urandom(100 + i) for i in range(120)}
    for rel, data in content.items():
        write(origin / rel, data)
    backdate(origin)
    write_config(tmp_path, origin, replica, replica_lines="workers = 2\n")
    result = ok(tmp_path, "-vv", "--log-format", "json", "sync")
    assert "copied 120 files" in result.stdout
    assert_replicated(origin, replica, content)
    helpers = [json.loads(line) for line in result.stderr.splitlines()
               if '"copy helper"' in line]
    spares = [h["spare"] for h in helpers]
    # A new replica: every helper it used was started ahead.
    assert spares, result.stderr
    assert all(spares), result.stderr

    # And the spares start before the engine's modules are imported: one per core but the
    # command's own, now that the inventory has no copies waiting.
    driver = ("import sys\n"
              "import replicator.transports._spares as spares\n"
              "real = spares.spare_processes\n"
              "def watching(helpers, *args, **kwargs):\n"
              "    print('engine imported:', 'replicator._engine' in sys.modules, helpers,\n"
              "          flush=True)\n"
              "    return real(helpers, *args, **kwargs)\n"
              "spares.spare_processes = watching\n"
              "import replicator.cli\n"
              "raise SystemExit(replicator.cli.main(sys.argv[1:]))\n")
    write(origin / "later.dat", b"later")
    backdate(origin)
    done = subprocess.run([sys.executable, "-c", driver, "sync"], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ahead = min(2, (os.cpu_count() or 1) - 1)
    assert done.stdout.startswith(f"engine imported: False {ahead}\n"), done.stdout
    assert "copied 1 files" in done.stdout


def write_unreachable_ssh_config(tmp_path: Path, origin: Path, origin_lines: str = "") -> None:
    """``tmp_path/replicator.toml``: ``origin`` to one SSH replica on a port nobody answers
    at (127.0.0.1:1), its host key file empty."""
    (tmp_path / "kh").write_text("")
    (tmp_path / "replicator.toml").write_text(
        f'[inventory]\npath = "{tmp_path}/inv.db"\n'
        f"[origins.raw]\npath = {json.dumps(str(origin))}\n{origin_lines}"
        '[replicas."ssh://user@127.0.0.1:1/srv/a"]\nname = "a"\n'
        f'known_hosts = "{tmp_path}/kh"\nconnect_timeout = 5\n')


def test_sync_starts_its_ssh_logins_before_the_event_loop(tmp_path: Path) -> None:
    """The spare receiver session of an SSH replica is started before asyncio is imported
    (a login is the longest thing a run starts with); ``sync`` goes on when it cannot be."""
    if shutil.which("ssh") is None:
        pytest.skip("no ssh client")
    origin = tmp_path / "origin"
    origin.mkdir()
    write_unreachable_ssh_config(tmp_path, origin)
    driver = ("import sys\n"
              "import replicator.transports._logins as logins\n"
              "def spawn(argv):\n"
              "    print('asyncio imported:', 'asyncio' in sys.modules, argv[0], flush=True)\n"
              "    raise OSError('not here')\n"
              "logins.spawn_ssh = spawn\n"
              "import replicator.cli\n"
              "raise SystemExit(replicator.cli.main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", driver, "sync", "--once"], cwd=tmp_path,
                          env=cli_env(), capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("asyncio imported: False ssh\n"), (done.stdout, done.stderr)
    assert "copied 0 files" in done.stdout, (done.stdout, done.stderr)


def test_how_many_copy_helpers_sync_starts_ahead(tmp_path: Path) -> None:
    """One per worker of each local replica with a local origin, at most one per core but
    the command's own, or one per core where a replica is new to the inventory or has
    copies waiting; none for other commands, dry or continuous runs, or a config that does
    not load."""
    import anyio

    from replicator import cli as cli_module
    from replicator._inventory import Inventory

    origin = tmp_path / "origin"
    origin.mkdir()
    cores = os.cpu_count() or 1

    def wanted(config: str, *args: str) -> tuple[int, list[list[str]]]:
        (tmp_path / "replicator.toml").write_text(config)
        parsed = cli_module.build_parser().parse_args(
            ["-c", str(tmp_path / "replicator.toml"), *args])
        return cli_module._spares_wanted(parsed)[:2]

    base = (f'[inventory]\npath = "inv.db"\n[origins.raw]\npath = {json.dumps(str(origin))}\n'
            f'[replicas."{tmp_path}/a"]\nname = "a"\nworkers = 1\n')
    two = base + f'[replicas."{tmp_path}/b"]\nname = "b"\nworkers = 4\n'
    # No inventory yet: both replicas are new, everything is to be copied.
    assert wanted(base, "sync") == (1, [])
    for other in (["sync", "--dry-run"], ["sync", "--continuous"], ["scan"], ["status"]):
        assert wanted(base, *other) == (0, []), other
    assert wanted(two, "sync") == (min(1 + min(4, cores), cores), [])
    assert wanted(two, "sync", "--replica", "a") == (1, [])

    async def known(pending: str | None) -> None:
        """An inventory that knows both replicas, with a copy waiting on ``pending``."""
        async with await Inventory.open(tmp_path / "inv.db") as inventory:
            await inventory.sync_replicas([("a", f"{tmp_path}/a", ["raw"]),
                                           ("b", f"{tmp_path}/b", ["raw"])])
            await inventory._db.execute("DELETE FROM copies")
            if pending is not None:
                await inventory._db.execute(
                    "INSERT INTO files (id, origin, host, dir, name, kind, size, mtime_ns,"
                    " mode, first_seen, last_seen) VALUES (1, 'raw', 'h', x'2f', x'61', 0,"
                    " 0, 0, 0, 0, 0)")
                await inventory._db.execute(
                    "INSERT INTO copies (replica, file_id, state, src_mtime_ns)"
                    " VALUES (?, 1, 'pending', 0)", (pending,))

    anyio.run(known, None)
    room = cores - 1  # nothing waiting: a core for the command itself
    assert wanted(two, "sync") == (min(1 + min(4, cores), room), [])
    assert wanted(two, "sync", "--replica", "a") == (min(1, room), [])
    anyio.run(known, "b")
    assert wanted(two, "sync") == (min(1 + min(4, cores), cores), [])
    assert wanted(two, "sync", "--replica", "a") == (min(1, room), [])
    remote = base.replace(json.dumps(str(origin)), '"ssh://user@example.org/data"')
    assert wanted(remote, "sync") == (0, [])
    assert wanted(base + "[bogus]\n", "sync") == (0, [])
    assert wanted("not toml [", "sync") == (0, [])


@pytest.mark.anyio
async def test_sync_starts_an_ssh_session_ahead_only_where_copies_are_due(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first receiver session of an SSH replica that may use the OpenSSH client with
    host keys checked, the very command the replica's transport runs; only for a replica the
    inventory does not know yet or holds waiting copies for, one per host."""
    import anyio

    from replicator import cli as cli_module
    from replicator._inventory import Inventory
    from replicator.transports._ssh import SshTransport
    from replicator.transports._ssh_options import session_argv

    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    origin = tmp_path / "origin"
    origin.mkdir()
    config_path = tmp_path / "replicator.toml"
    base = (f'[inventory]\npath = "{tmp_path}/inv.db"\n'
            f"[origins.raw]\npath = {json.dumps(str(origin))}\n"
            '[replicas."ssh://user@example.org:2222/srv/a b"]\nname = "a"\n'
            f'known_hosts = "{tmp_path}/kh"\n')

    def wanted(config: str, *args: str) -> tuple[int, list[list[str]]]:
        config_path.write_text(config)
        parsed = cli_module.build_parser().parse_args(["-c", str(config_path), *args])
        return cli_module._spares_wanted(parsed)[:2]

    helpers, (argv,) = wanted(base, "sync")
    assert helpers == 0
    transport = SshTransport.from_config(load_config(config_path).replicas[0],
                                         anyio.CapacityLimiter(1))
    assert argv == session_argv(transport.options, transport.root)
    assert argv[argv.index("--") + 1:-1] == ["example.org"]
    assert "StrictHostKeyChecking=yes" in argv
    assert f"UserKnownHostsFile={tmp_path}/kh" in argv
    assert argv[-1].endswith(" '/srv/a b'")  # the receiver's root, quoted for the shell
    for setting in ('transfer = "sftp"\n', 'transfer = "asyncssh"\n',
                    "insecure_skip_host_key_check = true\n"):
        assert wanted(base + setting, "sync") == (0, []), setting
    assert len(wanted(base + 'transfer = "openssh"\n', "sync")[1]) == 1
    assert wanted(base, "sync", "--replica", "nothing-here") == (0, [])
    assert wanted(base, "sync", "--continuous") == (0, [])
    same_host = base + '[replicas."ssh://user@example.org:2222/srv/b"]\nname = "b"\n'
    assert len(wanted(same_host, "sync")[1]) == 1  # one login at a time per host
    other_port = base + '[replicas."ssh://user@example.org:2200/srv/b"]\nname = "b"\n'
    assert len(wanted(other_port, "sync")[1]) == 2

    # Known to the inventory with nothing waiting: no login ahead; with a copy waiting: one.
    config_path.write_text(base)
    replica = load_config(config_path).replicas[0]
    async with await Inventory.open(tmp_path / "inv.db") as inventory:
        await inventory.sync_replicas([(replica.name, replica.url, ["raw"])])
    assert wanted(base, "sync") == (0, [])
    with sqlite3.connect(tmp_path / "inv.db") as db:
        db.execute("INSERT INTO copies (replica, file_id, state, src_mtime_ns)"
                   " VALUES ('a', 1, 'pending', 0)")
    assert len(wanted(base, "sync")[1]) == 1
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert wanted(base, "sync") == (0, [])


def test_the_command_line_imports_the_engine_only_when_a_command_needs_it() -> None:
    """What lets ``sync`` start its copy helpers before the engine's modules are imported:
    importing the command line (and the package) imports none of them."""
    heavy = ["structlog", "aiosqlite", "rich", "asyncssh", "replicator._engine",
             "replicator._replicator", "replicator._inventory", "replicator._events",
             "replicator.transports._local"]
    code = (f"import sys, replicator.cli\nprint([m for m in {heavy!r} if m in sys.modules])\n"
            "import replicator\nassert replicator.Replicator.__name__ == 'Replicator'\n"
            "assert set(replicator.__all__) <= set(dir(replicator))\n"
            "print('replicator._replicator' in sys.modules)\n"
            "from replicator import _walk\nassert _walk.__name__ == 'replicator._walk'\n")
    result = python_c(code)
    assert result.stdout.split("\n")[:2] == ["[]", "True"], result.stdout


def test_logging_to_a_file_or_pipe_does_not_load_rich_for_tracebacks() -> None:
    """structlog loads rich on import for its console tracebacks (about 35 ms of every
    command's start-up); with stderr not a terminal the command line keeps it from that. rich
    stays importable (progress bars, tables), and a logged exception's traceback is
    still rendered, plainly."""
    code = ("import sys, structlog\n"
            "from replicator import _cli_logging\n"
            "_cli_logging.configure(0, 'text')\n"
            "print('rich' in sys.modules, structlog.dev.rich is None)\n"
            "try:\n    1 / 0\nexcept ZeroDivisionError:\n"
            "    structlog.get_logger('t').error('boom', exc_info=True)\n"
            "import rich.progress\nprint('rich' in sys.modules)\n")
    # structlog imported first (as a library user's process would): left as it is.
    first = python_c(code)
    assert first.stdout.split() == ["True", "False", "True"], first.stdout
    result = python_c(code.replace("import sys, structlog\n", "import sys\n", 1).replace(
        "_cli_logging.configure(0, 'text')\n",
        "_cli_logging.configure(0, 'text')\nimport structlog\n"))
    assert result.stdout.split() == ["False", "True", "True"], result.stdout
    assert "boom" in result.stderr
    assert "ZeroDivisionError: division by zero" in result.stderr
    assert "Traceback (most recent call last)" in result.stderr  # the plain format


def test_the_package_exports_every_name_of_its_all() -> None:
    import replicator
    import replicator.transports

    for package in (replicator, replicator.transports):
        for name in package.__all__:
            assert getattr(package, name) is not None, name
        with pytest.raises(AttributeError, match="no_such_name"):
            package.no_such_name  # noqa: B018


# -- 4. exit code 3: an unavailable replica ---------------------------------------------------


def test_missing_replica_root_exits_3_and_keeps_files_pending(dirs: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    origin, _ = dirs
    replica = tmp_path / "unmounted"
    content = small_tree(origin)
    write_config(tmp_path, origin, replica)

    result = fails(tmp_path, 3, "sync")
    assert "unavailable" in result.stdout
    assert not replica.exists()  # an empty mount point is never created
    (rep,) = as_json(tmp_path, "replicas")
    assert rep["condition"] == "unavailable"
    assert "does not exist" in rep["last_error"]
    assert (rep["files"], rep["pending"], rep["failed"], rep["replicated"]) == (3, 3, 0, 0)
    assert sorted(copy_rows(tmp_path)) == [("pending", 0, None)] * 3
    assert as_json(tmp_path, "failed") == []

    result = fails(tmp_path, 3, "check")
    assert "replica bk: UNAVAILABLE" in result.stdout
    assert "origin raw: ok" in result.stdout
    summary = json.loads(fails(tmp_path, 3, "sync", "--json").stdout)
    assert summary["pending"] == 3
    assert "bk" in summary["unavailable"]
    assert sorted(copy_rows(tmp_path)) == [("pending", 0, None)] * 3  # still no attempts

    replica.mkdir()  # the disk is back
    ok(tmp_path, "check")
    ok(tmp_path, "sync")
    assert_replicated(origin, replica, content)
    (rep,) = as_json(tmp_path, "replicas")
    assert (rep["condition"], rep["last_error"], rep["replicated"]) == ("ok", None, 3)


# -- 5. exit code 1: failed, ignore, retry -----------------------------------------------------


def test_failed_ignore_unignore_retry(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    origin, replica = dirs
    write(origin / "a.dat", b"fine")
    blocked_file = write(origin / "sub" / "x.dat", b"blocked for now")
    backdate(origin)
    write_config(tmp_path, origin, replica, replica_lines="max_attempts = 1\n")
    blocker = replica_path(replica, origin / "sub")
    write(blocker, b"a file where a folder should be")

    result = fails(tmp_path, 1, "sync")
    assert "1 failed" in result.stdout
    assert replica_path(replica, origin / "a.dat").read_bytes() == b"fine"
    (failed,) = as_json(tmp_path, "failed")
    assert set(failed) == FAILED_KEYS
    assert failed["origin"] == "raw"
    assert failed["path"] == str(blocked_file)
    assert failed["replica"] == "bk"
    assert failed["attempts"] == 1
    assert failed["error_class"] == "permanent"
    assert "blocked" in failed["error"]
    assert as_json(tmp_path, "failed", "--replica", "bk") == [failed]
    table = ok(tmp_path, "failed").stdout
    assert "permanent" in table
    assert "\N{HORIZONTAL ELLIPSIS}" not in table  # paths and errors are shown in full
    (rep,) = as_json(tmp_path, "replicas")
    assert (rep["failed"], rep["replicated"], rep["pending"]) == (1, 1, 0)
    fails(tmp_path, 1, "sync")  # still failed: a failed copy keeps the exit code at 1

    # Paths are resolved against the working folder.
    assert ok(tmp_path, "ignore", "origin/sub/x.dat").stdout.strip() == "1 copy now ignored"
    ok(tmp_path, "sync")
    (rep,) = as_json(tmp_path, "replicas")
    assert (rep["ignored"], rep["failed"], rep["replicated"], rep["pending"]) == (1, 0, 1, 0)
    assert rep["files"] == 2
    assert as_json(tmp_path, "failed") == []

    assert ok(tmp_path, "unignore", str(blocked_file)).stdout.strip() == "1 copy now pending"
    (rep,) = as_json(tmp_path, "replicas")
    assert (rep["ignored"], rep["pending"]) == (0, 1)

    blocker.unlink()
    ok(tmp_path, "retry", "--all")
    summary = as_json(tmp_path, "sync")
    assert (summary["copied"], summary["failed"], summary["pending"]) == (1, 0, 0)
    assert replica_path(replica, blocked_file).read_bytes() == b"blocked for now"
    (rep,) = as_json(tmp_path, "replicas")
    assert (rep["replicated"], rep["failed"], rep["ignored"]) == (2, 0, 0)


def test_retry_of_specific_paths(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    origin, replica = dirs
    blocked_file = write(origin / "sub" / "x.dat", b"x")
    write_config(tmp_path, origin, replica, replica_lines="max_attempts = 1\n")
    blocker = write(replica_path(replica, origin / "sub"), b"not a folder")
    fails(tmp_path, 1, "sync")
    blocker.unlink()
    fails(tmp_path, 1, "sync")  # failed copies wait for an operator
    assert ok(tmp_path, "retry", "origin/nope.dat").stdout.strip() == "0 copies now pending"
    assert ok(tmp_path, "retry", str(blocked_file)).stdout.strip() == "1 copy now pending"
    ok(tmp_path, "sync")
    assert replica_path(replica, blocked_file).read_bytes() == b"x"


@pytest.mark.parametrize("args", [[], ["--all", "some/path"]], ids=["neither", "both"])
def test_retry_usage_errors(dirs: tuple[Path, Path], tmp_path: Path, args: list[str]) -> None:
    origin, replica = dirs
    write_config(tmp_path, origin, replica)
    result = fails(tmp_path, 2, "retry", *args)
    assert "--all" in result.stderr


def test_unknown_replica_name_is_a_usage_error(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    origin, replica = dirs
    write_config(tmp_path, origin, replica)
    for command in (["sync", "--replica", "nope"], ["failed", "--replica", "nope"],
                    ["retry", "--all", "--replica", "nope"]):
        result = fails(tmp_path, 2, *command)
        assert "nope" in result.stderr


# -- 6. one engine per inventory ----------------------------------------------------------------


def test_second_engine_refused_and_sigterm_releases_the_lock(dirs: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    origin, replica = dirs
    content = small_tree(origin)
    write_config(tmp_path, origin, replica)

    with background(tmp_path, "sync", "--continuous") as engine:
        # Final names only: temp files of a batch exist side by side before their renames.
        wait_for(lambda: all(replica_path(replica, origin / rel).exists() for rel in content)
                 or engine.poll() is not None, 30, "the continuous engine to copy the tree")
        assert engine.poll() is None, (tmp_path / "bg.err").read_text()
        assert_replicated(origin, replica, content)

        for command in (["sync", "--once"], ["sync"], ["sync", "--dry-run"], ["scan"]):
            result = fails(tmp_path, 2, *command)
            assert "another replicator engine" in result.stderr
            assert f"pid {engine.pid}" in result.stderr
        for command in (["status"], ["replicas"], ["failed"], ["retry", "--all"],
                        ["ignore", str(origin / "a.dat")], ["status", "--json"]):
            ok(tmp_path, *command)

        # Still replicating: a new file is picked up by the next scan.
        write(origin / "later.dat", b"while running", mtime=time.time() - 60)
        wait_for(replica_path(replica, origin / "later.dat").exists, 30,
                 "the continuous engine to copy a new file")
        assert engine.poll() is None

        engine.send_signal(signal.SIGTERM)
        assert engine.wait(timeout=20) == 0
    assert "SIGTERM" in (tmp_path / "bg.err").read_text()
    assert "Traceback" not in (tmp_path / "bg.err").read_text()
    assert "copied 4 files" in (tmp_path / "bg.out").read_text()

    summary = as_json(tmp_path, "sync")
    assert (summary["copied"], summary["pending"], summary["failed"]) == (0, 0, 0)


def test_lock_of_a_killed_engine_does_not_block(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    origin, replica = dirs
    content = small_tree(origin)
    write_config(tmp_path, origin, replica)
    lock = tmp_path / "inventory.db.lock"
    with background(tmp_path, "sync", "--continuous") as engine:
        wait_for(lambda: (lock.exists() and lock.read_text().strip() == str(engine.pid))
                 or engine.poll() is not None, 30, "the engine to take the lock")
        assert engine.poll() is None, (tmp_path / "bg.err").read_text()
        fails(tmp_path, 2, "sync")
        engine.send_signal(signal.SIGKILL)
        assert engine.wait(timeout=20) == -signal.SIGKILL
    assert lock.exists()  # left behind, but no longer locked
    ok(tmp_path, "sync")
    assert_replicated(origin, replica, content)
    assert temp_files(replica) == []



def test_demo_replicates_a_sample_tree_and_shows_the_status(tmp_path: Path) -> None:
    """The README's first command runs ``replicator demo``: check what it leaves behind."""
    result = ok(tmp_path, "demo", "--dir", "scratch")
    assert "copied 124 files" in result.stdout
    scratch = tmp_path / "scratch"
    status = as_json(scratch, "-c", "replicator.toml", "status", "--json")
    [replica] = status["replicas"]
    assert (replica["files"], replica["replicated"], replica["pending"]) == (124, 124, 0)
    origin = scratch / "instrument"
    copied = [p for p in (scratch / "backup").rglob("*") if p.is_file() or p.is_symlink()]
    sources = [p for p in origin.rglob("*") if p.is_file() or p.is_symlink()]
    assert len(sources) == 124
    assert len(copied) == 124 + 1  # and the replica's identity marker
    for source in sources:
        copy = replica_path(scratch / "backup", source, socket.gethostname())
        if source.is_symlink():
            assert os.readlink(copy) == os.readlink(source)
        else:
            assert copy.read_bytes() == source.read_bytes()


def test_retry_and_ignore_say_when_a_copy_is_in_flight(dirs: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    origin, replica = dirs
    small_tree(origin)
    write_config(tmp_path, origin, replica)
    ok(tmp_path, "scan")
    with contextlib.closing(sqlite3.connect(tmp_path / "inventory.db")) as db:
        # What a running engine's claim looks like from another process.
        changed = db.execute("UPDATE copies SET state = 'copying' WHERE file_id IN"
                             " (SELECT id FROM files WHERE name = ?)", (b"a.dat",)).rowcount
        assert changed == 1
        db.commit()
    result = ok(tmp_path, "ignore", str(origin / "a.dat"))
    assert result.stdout.startswith("0 copies now ignored")
    assert "1 matching copy is being transferred" in result.stdout
    result = ok(tmp_path, "retry", "--all")
    assert "1 matching copy is being transferred" in result.stdout


def test_a_batch_with_more_folders_than_the_soft_open_files_limit(tmp_path: Path) -> None:
    """A batch keeps its destination folders open until the renames: the CLI raises the
    common soft limit (1,024 on most systems; 128 here) up to the hard one."""
    origin, replica = tmp_path / "origin", tmp_path / "replica"
    replica.mkdir()
    for i in range(300):
        write(origin / f"night{i:03d}" / "a" / "frame.fits", b"x" * i)
    backdate(origin)
    config = write_config(tmp_path, origin, replica)

    def low_limit() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))

    result = subprocess.run(
        [sys.executable, "-m", "replicator", "-c", str(config), "sync", "--once"],
        cwd=tmp_path, env=cli_env(), stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=60, preexec_fn=low_limit)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "outcome=retry" not in result.stderr, result.stderr[-2000:]  # no file failed once
    assert len(files_below(replica)) == 300
