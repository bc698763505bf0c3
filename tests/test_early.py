"""The receiver logins a ``sync`` starts first thing, from the last run's record
(``_early``): what it starts, when it does not, and how the command takes them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator import _early
from replicator.transports import _logins


@pytest.fixture
def fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An ``ssh`` on the PATH that waits for the end of its input (as a login would)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    ssh.write_text("#!/bin/sh\nexec cat >/dev/null\n")
    ssh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    yield bin_dir
    _logins.close_sessions([proc for _argv, proc in _logins._sessions])


def record(tmp_path: Path, sessions: dict[str, list[str]]) -> Path:
    config = tmp_path / "replicator.toml"
    config.write_text("# a config\n")
    _early._read = None
    _early.remember(str(config), str(tmp_path / "inventory.db"), list(sessions.items()))
    return config


def started() -> list[tuple[str, ...]]:
    return [argv for argv, proc in _logins._sessions if proc.poll() is None]


def test_a_sync_command_line_is_recognised_and_nothing_else() -> None:
    assert _early._sync_config(["-c", "x.toml", "sync"]) == ("x.toml", set())
    assert _early._sync_config(["-q", "--config=x.toml", "sync", "--once", "--replica", "a",
                                "--replica=b"]) == ("x.toml", {"a", "b"})
    assert _early._sync_config(["-vv", "--log-format", "json", "sync"]) == (
        os.environ.get("REPLICATOR_CONFIG") or "replicator.toml", set())
    for other in (["-c", "x.toml", "sync", "--continuous"], ["-c", "x.toml", "sync", "--dry-run"],
                  ["-c", "x.toml", "status"], ["sync", "--help"], ["--version"],
                  ["sync", "-c", "x.toml"], ["--replica", "a", "sync"], [], ["sync", "sync"]):
        assert _early._sync_config(other) is None, other


def test_the_recorded_logins_start_first_and_the_command_takes_them(
        tmp_path: Path, fake_ssh: Path) -> None:
    argv = ["ssh", "-T", "--", "host", "python3 receiver"]
    config = record(tmp_path, {"r": argv, "again": argv})
    path = Path(_early.record_path())
    assert path.stat().st_mode & 0o777 == 0o600
    _early.start(["-q", "-c", str(config), "sync", "--once"])
    assert started() == [tuple(argv)]  # one login per command line
    early = _logins._sessions[0][1]
    # The command wants the same session: it takes the one started, and starts no other.
    assert _logins.start_sessions([argv]) == [early]
    assert started() == [tuple(argv)]
    # A command that wants another one stops it.
    other = ["ssh", "-T", "--", "other", "python3 receiver"]
    taken = _logins.start_sessions([other])
    assert started() == [tuple(other)]
    assert early.wait(10) is not None
    _logins.close_sessions(taken)


@pytest.mark.parametrize("case", ["changed config", "other command", "other replica",
                                  "writable by others", "not ssh", "no work"])
def test_no_login_starts_where_the_record_does_not_hold(
        tmp_path: Path, fake_ssh: Path, case: str) -> None:
    argv = ["ssh", "--", "host", "python3 receiver"]
    config = record(tmp_path, {"r": ["sh", "-c", "cat"] if case == "not ssh" else argv})
    command = ["-c", str(config), "sync"]
    if case == "changed config":
        config.write_text("# another config\n")
    elif case == "other command":
        command = ["-c", str(config), "sync", "--dry-run"]
    elif case == "other replica":
        command += ["--replica", "s"]
    elif case == "writable by others":
        os.chmod(_early.record_path(), 0o622)
    elif case == "no work":  # the inventory holds the replica, and nothing due for it
        import sqlite3

        from replicator._inventory._schema import MIGRATIONS

        with sqlite3.connect(tmp_path / "inventory.db") as db:
            for migration in MIGRATIONS:
                db.executescript(migration)
            db.execute("INSERT INTO replicas (name, url, origins) VALUES ('r', 'u', '[]')")
    _early.start(command)
    assert started() == []


def test_the_record_is_what_the_command_would_start(tmp_path: Path) -> None:
    """The command's own choice of sessions (``cli._spares_wanted``) and the record agree:
    the record holds the command line the command starts for the replica."""
    from replicator import cli

    (tmp_path / "origin").mkdir()
    known = tmp_path / "known_hosts"
    known.write_text("")
    config = tmp_path / "replicator.toml"
    origin = json.dumps(str(tmp_path / "origin"))
    config.write_text(
        f'[inventory]\npath = "inv.db"\n[origins.o]\npath = {origin}\n'
        f'[replicas."ssh://me@host.example:2222/data"]\nname = "s"\n'
        f'known_hosts = {json.dumps(str(known))}\n')
    args = cli.build_parser().parse_args(["-c", str(config), "sync"])
    _helpers, sessions, chosen = cli._spares_wanted(args)
    if not sessions:
        pytest.skip("no ssh client on this machine")
    assert chosen is not None
    cli._remember(*chosen)
    data = json.loads(Path(_early.record_path()).read_text())
    assert data[str(config)]["sessions"] == [["s", sessions[0]]]
    assert data[str(config)]["inventory"] == str(tmp_path / "inv.db")


def test_the_next_sync_starts_its_login_before_importing_the_command(tmp_path: Path) -> None:
    """Through the command's entry point: the first ``sync`` of a config starts its login
    once the command line is imported, and records it; the next one starts the same login
    before (and the command takes it, see the test above)."""
    import shutil
    import subprocess
    import sys

    from conftest import write
    from test_cli import cli_env, write_unreachable_ssh_config

    if shutil.which("ssh") is None:
        pytest.skip("no ssh client")
    write(tmp_path / "origin" / "a.dat", b"x")  # stays due: the host never answers
    write_unreachable_ssh_config(tmp_path, tmp_path / "origin", "settle_seconds = 0\n")
    driver = ("import sys\n"
              "import replicator.transports._logins as logins\n"
              "real = logins.spawn_ssh\n"
              "def spawn(argv):\n"
              "    print('command imported:', 'replicator.cli' in sys.modules, flush=True)\n"
              "    return real(argv)\n"
              "logins.spawn_ssh = spawn\n"
              "from replicator._early import run\n"
              "sys.argv = ['replicator', 'sync', '--once']\n"
              "run()\n")

    def sync() -> list[str]:
        done = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, env=cli_env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 3, (done.stdout, done.stderr)  # the host is unavailable
        return [line for line in done.stdout.splitlines() if line.startswith("command")]

    # The first login each run starts (the transport tries again when it fails).
    assert sync()[0] == "command imported: True"
    assert sync()[0] == "command imported: False"


@pytest.mark.parametrize("trusted", [True, False])
def test_recording_keeps_other_configs_entries_only_from_a_record_it_trusts(
        tmp_path: Path, trusted: bool) -> None:
    """Rewriting the record makes it this user's own: entries of other configs are carried
    over only from a file that ``start`` would have read (not writable by others)."""
    argv = ["ssh", "--", "host", "python3 receiver"]
    other = tmp_path / "other"
    other.mkdir()
    record(other, {"r": argv})
    if not trusted:
        os.chmod(_early.record_path(), 0o622)
    config = record(tmp_path, {"s": argv})
    with open(_early.record_path()) as f:
        entries = json.load(f)
    assert str(config) in entries
    assert (str(other / "replicator.toml") in entries) is trusted
    assert os.stat(_early.record_path()).st_mode & 0o777 == 0o600
