"""SSH replicas end to end: host keys, auth, faults of the server, OpenSSH, the CLI."""

from __future__ import annotations

import os
import sqlite3
import sys
import tomllib
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import asyncssh
import pytest
from conftest import backdate, temp_files, write
from ssh_server import Faults, SftpServer, run_sshd, sftp_server
from structlog.testing import capture_logs

from replicator import (
    Config,
    ConfigError,
    EngineConfig,
    OriginConfig,
    ReplicaConfig,
    Replicator,
    ReplicaUnavailableError,
    load_config,
)
from replicator._config import validate_config
from replicator.transports import open_transport
from replicator.transports._ssh import SHORT_LINK_SESSIONS, SshTransport

pytestmark = pytest.mark.anyio


def make_origin(origin: Path) -> dict[str, bytes]:
    """A few small files, one large (several chunks), one in a folder named 'locked'."""
    files = {
        "a/one.txt": b"one\n",
        "a/two.txt": os.urandom(3000),
        "empty.dat": b"",
        "locked/secret.dat": b"only when permitted",
        "big/cube.fits": os.urandom(3 << 20),
    }
    for name, data in files.items():
        write(origin / name, data)
    backdate(origin)
    return files


def ssh_config(tmp: Path, origin: Path, url: str, *, retry_window: float = 5.0,
               **keys: Any) -> Config:
    return Config(
        inventory=tmp / "inventory.db",
        origins=(OriginConfig("raw", str(origin), host="inst", settle_seconds=1.0,
                              scan_interval=0.5),),
        replicas=(ReplicaConfig(url, backoff_initial=0.05, backoff_max=0.2, **keys),),
        engine=EngineConfig(retry_window=retry_window, shutdown_grace=5.0),
    )


def copy_of(replica: Path, origin: Path, name: str) -> Path:
    return replica / "inst" / str(origin / name).lstrip("/")


def assert_no_partial(replica: Path, origin: Path, files: dict[str, bytes]) -> None:
    """Every final name holds a complete copy or nothing."""
    for name, data in files.items():
        copy = copy_of(replica, origin, name)
        if copy.exists():
            assert copy.read_bytes() == data, name


def assert_all_copied(replica: Path, origin: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert copy_of(replica, origin, name).read_bytes() == data, name
    assert temp_files(replica) == []


async def sync(config: Config) -> Any:
    async with Replicator(config) as rep:
        return await rep.sync_once()


async def test_sync_to_ssh_replica_copies_once(tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    files = make_origin(origin)
    async with sftp_server(tmp_path / "server") as server:
        replica = server.root / "replica"
        replica.mkdir()
        config = ssh_config(tmp_path, origin, server.url(), **server.replica_keys())
        summary = await sync(config)
        assert (summary.exit_code, summary.copied, summary.pending) == (0, len(files), 0)
        assert_all_copied(replica, origin, files)
        # Whole-second mtimes on the replica must not make every file look stale.
        again = await sync(config)
        assert (again.exit_code, again.copied, again.pending) == (0, 0, 0)


async def test_openssh_replica_end_to_end(tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    files = make_origin(origin)
    with run_sshd(tmp_path / "sshd") as sshd:
        replica = tmp_path / "replica"
        replica.mkdir()
        keys = sshd.replica_keys()
        config = ssh_config(tmp_path, origin, sshd.url(replica), **keys)
        summary = await sync(config)
        assert (summary.exit_code, summary.copied) == (0, len(files))
        assert_all_copied(replica, origin, files)
        assert (await sync(config)).copied == 0


# --- host keys and authentication ----------------------------------------------------------


async def _unavailable_run(tmp_path: Path, server: SftpServer, files: dict[str, bytes],
                           **keys: Any) -> str:
    origin = tmp_path / "origin"
    (server.root / "replica").mkdir()
    config = ssh_config(tmp_path, origin, server.url(), **{**server.replica_keys(), **keys})
    summary = await sync(config)
    assert summary.exit_code == 3
    assert summary.pending == len(files)
    assert summary.copied == 0
    assert list((server.root / "replica").iterdir()) == []
    [(name, reason)] = summary.unavailable
    assert name == config.replicas[0].name
    return str(reason)


async def test_unknown_host_key_makes_the_replica_unavailable(tmp_path: Path) -> None:
    files = make_origin(tmp_path / "origin")
    async with sftp_server(tmp_path / "server", trust=False) as server:
        reason = await _unavailable_run(tmp_path, server, files)
        assert "127.0.0.1" in reason
        assert f"ssh-keyscan -p {server.port} 127.0.0.1 >> {server.keys.known_hosts}" in reason
        # Refused by the OpenSSH logins that started together (the replica's check, and
        # the sessions prepare starts beside it for the work found), each before it
        # authenticates, and once by the SFTP login that says why; not retried in a loop.
        assert 2 <= len(server.connections) <= 2 + SHORT_LINK_SESSIONS


async def test_changed_host_key_is_refused_and_not_retried(tmp_path: Path) -> None:
    async with sftp_server(tmp_path / "server", trust=False) as server:
        other = asyncssh.generate_private_key("ssh-ed25519")
        server.keys.known_hosts.write_text(
            f"[127.0.0.1]:{server.port} {other.export_public_key().decode()}")
        transport = SshTransport(server.options(), "/", anyio.CapacityLimiter(1))
        try:
            for _ in range(3):
                with pytest.raises(ReplicaUnavailableError, match="ssh-keyscan"):
                    await transport.probe()
            assert len(server.connections) == 2  # OpenSSH's login and the SFTP one, once
            # Fixing known_hosts is noticed without a restart.
            server.keys.trust(server.port)
            await transport.probe()
        finally:
            await transport.aclose()


async def test_missing_known_hosts_file(tmp_path: Path) -> None:
    files = make_origin(tmp_path / "origin")
    async with sftp_server(tmp_path / "server") as server:
        reason = await _unavailable_run(tmp_path, server, files,
                                        known_hosts=str(tmp_path / "nope"))
        assert "does not exist" in reason
        assert "ssh-keyscan" in reason
        assert server.connections == []


async def test_insecure_skip_host_key_check_works_and_warns(tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    files = make_origin(origin)
    async with sftp_server(tmp_path / "server", trust=False) as server:
        (server.root / "replica").mkdir()
        config = ssh_config(tmp_path, origin, server.url(), **server.replica_keys(),
                            insecure_skip_host_key_check=True)
        with capture_logs() as logs:
            summary = await sync(config)
        assert summary.exit_code == 0
        assert_all_copied(server.root / "replica", origin, files)
        warnings = [e for e in logs if e["log_level"] == "warning"
                    and "NOT verified" in e["event"]]
        assert len(warnings) == len(server.connections) >= 1


async def test_authentication_failure_is_replica_level(tmp_path: Path) -> None:
    files = make_origin(tmp_path / "origin")
    stranger = tmp_path / "stranger_key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    async with sftp_server(tmp_path / "server") as server:
        reason = await _unavailable_run(tmp_path, server, files, identity_file=str(stranger))
        assert "authentication failed" in reason


async def test_unreachable_host_is_replica_level(tmp_path: Path) -> None:
    files = make_origin(tmp_path / "origin")
    async with sftp_server(tmp_path / "server") as server:
        port = server.port
    async with sftp_server(tmp_path / "server2") as server:
        server.port = port  # nobody listens there any more
        server.keys.trust(port)
        reason = await _unavailable_run(tmp_path, server, files)
        assert "unreachable" in reason


# --- a misbehaving server ------------------------------------------------------------------


RECOVERS: dict[str, Callable[[Faults], None]] = {
    "connection dropped mid-file": lambda f: setattr(f, "drop_after", 1 << 20),
    "server stops reading": lambda f: setattr(f, "stall", True),
    "slow server": lambda f: setattr(f, "write_delay", 0.005),
}


@pytest.mark.parametrize("fault", list(RECOVERS))
async def test_faults_that_recover_within_the_run(tmp_path: Path, fault: str) -> None:
    origin = tmp_path / "origin"
    files = make_origin(origin)
    faults = Faults()
    RECOVERS[fault](faults)
    async with sftp_server(tmp_path / "server", faults) as server:
        replica = server.root / "replica"
        replica.mkdir()
        config = ssh_config(tmp_path, origin, server.url(), retry_window=15.0,
                            stall_timeout=1.0, **server.replica_keys())
        summary = await sync(config)
        assert (summary.exit_code, summary.copied, summary.pending) == (0, len(files), 0)
        assert_all_copied(replica, origin, files)
    if fault != "slow server":
        assert faults.dropped + faults.stalled == 1  # the fault did happen


FAILS: dict[str, tuple[Callable[[Faults], None], str, list[str]]] = {
    "permission denied": (lambda f: setattr(f, "deny_open", b"locked"), "permission",
                          ["locked/secret.dat"]),
    "no space left": (lambda f: setattr(f, "full_after", 1 << 20), "no_space",
                      ["big/cube.fits"]),
}


@pytest.mark.parametrize("fault", list(FAILS))
async def test_faults_that_fail_per_file_then_recover(tmp_path: Path, fault: str) -> None:
    origin = tmp_path / "origin"
    files = make_origin(origin)
    setup, error_class, failing = FAILS[fault]
    faults = Faults()
    setup(faults)
    async with sftp_server(tmp_path / "server", faults) as server:
        replica = server.root / "replica"
        replica.mkdir()
        config = ssh_config(tmp_path, origin, server.url(), **server.replica_keys())
        summary = await sync(config)
        assert (summary.exit_code, summary.unavailable) == (1, ())
        assert summary.copied == len(files) - len(failing)
        assert_no_partial(replica, origin, files)
        assert temp_files(replica) == []
        for name in failing:
            assert not copy_of(replica, origin, name).exists()
        assert {cls for cls, _ in copy_errors(config)} == {error_class}
        # Conditions recover: the next run copies what is left, each file once.
        faults.enabled = False
        await anyio.sleep(0.3)  # the retry backoff of the failed files (backoff_max 0.2 s)
        again = await sync(config)
        assert (again.exit_code, again.copied, again.pending) == (0, len(failing), 0)
        assert_all_copied(replica, origin, files)


def copy_errors(config: Config) -> list[tuple[str, str]]:
    with closing(sqlite3.connect(config.inventory)) as db:
        rows = db.execute("SELECT error_class, error FROM copies WHERE error IS NOT NULL")
        return [(str(c), str(e)) for c, e in rows]


# --- configuration and CLI -----------------------------------------------------------------


@pytest.mark.parametrize("line", ['identity_file = "/k"', 'known_hosts = "/kh"',
                                  "connect_timeout = 5", "connections = 3",
                                  "insecure_skip_host_key_check = true"])
def test_ssh_keys_are_errors_on_local_replicas(tmp_path: Path, line: str) -> None:
    path = tmp_path / "replicator.toml"
    path.write_text(f'[replicas."/mnt/backup"]\n{line}\n')
    key = line.split()[0]
    with pytest.raises(ConfigError, match=rf'replicas\."/mnt/backup"\.{key}: only ssh://'):
        load_config(path)
    with pytest.raises(ConfigError, match=key):
        validate_config(Config(tmp_path / "i.db", (), (ReplicaConfig(
            "/mnt/backup", **{key: load_value(line)}),)))


def load_value(line: str) -> Any:
    return next(iter(tomllib.loads(line).values()))


def test_ssh_keys_on_ssh_replicas(tmp_path: Path) -> None:
    path = tmp_path / "replicator.toml"
    path.write_text('[replicas."ssh://u@host:2222/data"]\nidentity_file = "keys/id"\n'
                    'known_hosts = "/etc/kh"\nconnect_timeout = 5\nconnections = 3\n'
                    "insecure_skip_host_key_check = false\n")
    [replica] = load_config(path).replicas
    assert replica.identity_file == str(tmp_path / "keys" / "id")
    assert (replica.known_hosts, replica.connect_timeout, replica.connections) == (
        "/etc/kh", 5.0, 3)
    transport = open_transport(replica, anyio.CapacityLimiter(1))
    assert isinstance(transport, SshTransport)
    for bad, why in (("connections = 0", "integer >= 1"), ("connect_timeout = -1", "> 0"),
                     ("insecure_skip_host_key_check = 1", "true or false")):
        path.write_text(f'[replicas."ssh://host/data"]\n{bad}\n')
        with pytest.raises(ConfigError, match=why):
            load_config(path)


async def run_cli(tmp_path: Path, *args: str) -> str:
    """``python -m replicator ARGS`` in ``tmp_path`` with its replicator.toml, which must
    succeed; returns what it wrote to stderr."""
    env = {**os.environ, "REPLICATOR_CONFIG": str(tmp_path / "replicator.toml")}
    done = await anyio.run_process([sys.executable, "-m", "replicator", *args], cwd=tmp_path,
                                   env=env, check=False)
    assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
    return done.stderr.decode()


async def test_cli_add_replica_and_sync(tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    files = make_origin(origin)
    async with sftp_server(tmp_path / "server") as server:
        replica = server.root / "replica"
        replica.mkdir()
        await run_cli(tmp_path, "init", "--origin", str(origin))
        await run_cli(tmp_path, "add-replica", server.url(), "--identity-file",
                      os.path.relpath(server.keys.client_key, tmp_path),
                      "--known-hosts", str(server.keys.known_hosts))
        config = load_config(tmp_path / "replicator.toml")
        assert config.replicas[0].identity_file == str(server.keys.client_key)
        await run_cli(tmp_path, "check")
        await run_cli(tmp_path, "sync", "--once")
        host = config.origins[0].host
        for name, data in files.items():
            assert (replica / host / str(origin / name).lstrip("/")).read_bytes() == data
        assert temp_files(replica) == []
