"""Pull mode: ssh:// origins scanned over SFTP (or a remote find) and copied into local
replicas, against the in-process asyncssh server and OpenSSH."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import stat
import sys
from collections.abc import AsyncGenerator
from contextlib import aclosing, closing
from pathlib import Path
from typing import Any

import anyio
import asyncssh
import pytest
from conftest import OLD, backdate, temp_files, write
from ssh_server import Faults, Sshd, run_sshd, sftp_server
from structlog.testing import capture_logs

from replicator import (
    Config,
    ConfigError,
    EngineConfig,
    OriginConfig,
    ReplicaConfig,
    Replicator,
    load_config,
)
from replicator._config import validate_config
from replicator.transports._ssh_options import SshOptions
from replicator.transports._ssh_source import RemoteFolder, SshSource

pytestmark = pytest.mark.anyio

WEIRD = b"caf\xe9-\xff.dat"  # not UTF-8


def make_tree(origin: Path) -> dict[bytes, bytes]:
    """Nested folders, a non-UTF-8 name, an empty file, a multi-MB file, a symlink."""
    files = {
        b"a/one.txt": b"one\n",
        b"a/b/c/deep.txt": os.urandom(5000),
        b"a/" + WEIRD: b"weird name",
        b"empty.dat": b"",
        b"big/cube.fits": os.urandom(3 << 20),
    }
    for name, data in files.items():
        write(Path(os.fsdecode(os.fsencode(origin) + b"/" + name)), data)
    os.chmod(origin / "a" / "one.txt", 0o640)
    os.symlink("one.txt", origin / "a" / "link.txt")
    backdate(origin)
    return files


def pull_config(tmp: Path, url: str, replica: Path | str, *, retry_window: float = 5.0,
                replica_keys: dict[str, Any] | None = None, **keys: Any) -> Config:
    """An ssh:// origin ``url`` into ``replica`` (a local folder or an ssh:// URL)."""
    return Config(
        inventory=tmp / "inventory.db",
        origins=(OriginConfig("det", url, settle_seconds=1.0, scan_interval=0.5, **keys),),
        replicas=(ReplicaConfig(str(replica), backoff_initial=0.05, backoff_max=0.2,
                                **(replica_keys or {})),),
        engine=EngineConfig(retry_window=retry_window, shutdown_grace=5.0),
    )


def copy_path(replica: Path, remote_root: str, name: bytes) -> bytes:
    """Where layout {host}/{path} puts a file of an origin on 127.0.0.1."""
    return (os.fsencode(replica) + b"/127.0.0.1/" + os.fsencode(remote_root).strip(b"/")
            + b"/" + name)


def assert_tree_copied(origin: Path, replica: Path, remote_root: str,
                       files: dict[bytes, bytes]) -> None:
    for name, data in files.items():
        src = os.fsencode(origin) + b"/" + name
        dst = copy_path(replica, remote_root, name)
        with open(dst, "rb") as f:
            assert f.read() == data, name
        s, d = os.stat(src), os.stat(dst)
        # Whole-second mtimes: the precision of an SSH origin.
        assert d.st_mtime_ns == s.st_mtime_ns // 10**9 * 10**9, name
        assert stat.S_IMODE(d.st_mode) == stat.S_IMODE(s.st_mode), name
    link = copy_path(replica, remote_root, b"a/link.txt")
    assert os.readlink(link) == b"one.txt"
    assert os.lstat(link).st_mtime_ns == os.lstat(origin / "a" / "link.txt").st_mtime_ns \
        // 10**9 * 10**9
    assert temp_files(replica) == []


async def sync(config: Config) -> Any:
    async with Replicator(config) as rep:
        return await rep.sync_once()


def deleted_files(config: Config | Path) -> list[bytes]:
    path = config.inventory if isinstance(config, Config) else config / "inventory.db"
    with closing(sqlite3.connect(path)) as db:
        return [bytes(r[0]) for r in db.execute(
            "SELECT name FROM files WHERE deleted IS NOT NULL")]


async def _pull_changes(tmp_path: Path, origin: Path, config: Config, replica: Path,
                        remote_root: str, files: dict[bytes, bytes]) -> None:
    """Modified, new and deleted remote files; then nothing is copied again."""
    write(origin / "a" / "one.txt", b"one, longer now\n", OLD + 100)
    write(origin / "new.dat", b"new", OLD)
    os.unlink(origin / "empty.dat")
    summary = await sync(config)
    assert (summary.exit_code, summary.copied) == (0, 2)
    assert deleted_files(config) == [b"empty.dat"]
    with open(copy_path(replica, remote_root, b"a/one.txt"), "rb") as f:
        assert f.read() == b"one, longer now\n"
    with open(copy_path(replica, remote_root, b"new.dat"), "rb") as f:
        assert f.read() == b"new"
    again = await sync(config)
    assert (again.exit_code, again.copied, again.pending) == (0, 0, 0)


async def test_pull_from_asyncssh_server(tmp_path: Path) -> None:
    async with sftp_server(tmp_path / "server") as server:
        origin = server.root / "origin"
        files = make_tree(origin)
        replica = tmp_path / "replica"
        replica.mkdir()
        config = pull_config(tmp_path, server.url("/origin"), replica, **server.replica_keys())
        with capture_logs() as logs:
            summary = await sync(config)
        assert (summary.exit_code, summary.copied, summary.pending) == (0, len(files) + 1, 0)
        assert [e["method"] for e in logs if e["event"] == "scan finished"] == ["sftp"]
        assert_tree_copied(origin, replica, "/origin", files)
        # Whole-second mtimes must not make every file look changed: no re-copy, ever.
        for _ in range(2):
            again = await sync(config)
            assert (again.exit_code, again.copied, again.pending) == (0, 0, 0)
        await _pull_changes(tmp_path, origin, config, replica, "/origin", files)


async def test_pull_from_openssh_with_find(tmp_path: Path) -> None:
    with run_sshd(tmp_path / "sshd") as sshd:
        origin = tmp_path / "origin"
        files = make_tree(origin)
        replica = tmp_path / "replica"
        replica.mkdir()
        keys = sshd.replica_keys()
        config = pull_config(tmp_path, sshd.url(origin), replica, **keys)
        with capture_logs() as logs:
            summary = await sync(config)
        assert (summary.exit_code, summary.copied, summary.pending) == (0, len(files) + 1, 0)
        assert [e["method"] for e in logs if e["event"] == "scan finished"] == ["find"]
        assert_tree_copied(origin, replica, str(origin), files)
        assert (await sync(config)).copied == 0
        await _pull_changes(tmp_path, origin, config, replica, str(origin), files)


def files_of(entries: Any) -> list[Any]:
    # find reports a folder in its own record, SFTP as an entry of its parent.
    return sorted((e for e in entries or () if e.kind != "d"), key=lambda e: e.name)


async def test_find_and_sftp_listings_agree(tmp_path: Path) -> None:
    """One origin, both listing methods: identical rows, so switching copies nothing."""
    from replicator.transports._ssh_source import SshSource

    with run_sshd(tmp_path / "sshd") as sshd:
        origin = tmp_path / "origin"
        make_tree(origin)
        os.mkdir(origin / "locked")
        write(origin / "locked" / "x.dat", b"x")
        source = SshSource(sshd.options(), str(origin))
        try:
            by_find: dict[bytes, Any] = {}
            async for folder in source.find_tree():
                by_find[folder.path] = files_of(folder.entries)
            by_sftp: dict[bytes, Any] = {}
            for path in by_find:
                entries = await source.list_folder(path)
                by_sftp[path] = files_of(entries)
        finally:
            await source.aclose()
        assert by_find == by_sftp
        assert os.fsencode(origin / "a" / "b" / "c") in by_find


def kill_remote_find(sshd_pid: int, root: Path) -> int:
    """SIGKILL the ``find`` our sshd runs over ``root``; its pid, or 0 if it already ended."""

    def parent(pid: int) -> int:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])

    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if argv[:3] != [b"find", b"-H", os.fsencode(root)]:
                continue
            ancestor = int(entry)
            while ancestor > 1 and ancestor != sshd_pid:
                ancestor = parent(ancestor)
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
        if ancestor == sshd_pid:
            os.kill(int(entry), signal.SIGKILL)
            return int(entry)
    return 0


class FindKilledMidway(SshSource):
    """The real source; the real remote ``find`` is killed once ``kill_after`` folders of
    its stream have arrived."""

    def __init__(self, options: SshOptions, root: Path, sshd_pid: int) -> None:
        super().__init__(options, str(root))
        self.path = root
        self.sshd_pid = sshd_pid
        self.kill_after: int | None = None
        self.killed = 0
        self.listed: list[bytes] = []

    async def find_tree(self) -> AsyncGenerator[RemoteFolder, None]:
        self.listed = []
        async with aclosing(super().find_tree()) as folders:
            async for folder in folders:
                self.listed.append(folder.path)
                yield folder
                if len(self.listed) == self.kill_after:
                    self.killed = await anyio.to_thread.run_sync(
                        kill_remote_find, self.sshd_pid, self.path)


async def test_find_failing_midway_hands_over_to_sftp(tmp_path: Path) -> None:
    """The remote find dies part-way: what it listed is recorded, nothing is deleted, and the
    next scan lists over SFTP, finding everything and what was really deleted."""
    from replicator._inventory import Inventory
    from replicator._scanner import Scanner

    with run_sshd(tmp_path / "sshd") as sshd:
        origin = tmp_path / "origin"
        # Long paths: find's output (~8 MB) is far more than the pipe and SSH window hold,
        # so find is still writing when it is killed.
        deep = origin / ("l" * 200) / ("m" * 200)
        folders = [deep / f"d{i:02}" for i in range(60)]
        for folder in folders:
            folder.mkdir(parents=True)
            for j in range(200):
                (folder / f"{j:03}{'n' * 200}").write_bytes(b"x")
        for j in range(3):
            write(origin / "gone" / f"{j}.dat", b"gone")
        backdate(origin)
        config = OriginConfig("det", sshd.url(origin), settle_seconds=1.0,
                              identity_file=str(sshd.keys.client_key),
                              known_hosts=str(sshd.keys.known_hosts), connect_timeout=5.0)
        source = FindKilledMidway(sshd.options(), origin, sshd.pid)
        try:
            async with await Inventory.open(tmp_path / "inventory.db") as inventory:
                scanner = Scanner(config, inventory, [], anyio.CapacityLimiter(2),
                                  source=source)

                def scan_logs(logs: list[Any]) -> list[Any]:
                    return [e for e in logs if e["event"] == "scan finished"]

                with capture_logs() as logs:
                    first = await scanner.scan()
                assert [e["method"] for e in scan_logs(logs)] == ["find"]
                assert first.delta.new == 60 * 200 + 3

                shutil.rmtree(origin / "gone")
                for folder in folders:
                    write(folder / "new.dat", b"new")
                source.kill_after = 5
                with capture_logs() as logs:
                    second = await scanner.scan()
                assert source.killed, "find ended before it was killed: make the tree bigger"
                [scan] = scan_logs(logs)
                assert scan["method"] == "find"
                assert any(e["event"].startswith("remote find failed") for e in logs), str(scan)
                # The folders of the stream before it broke are recorded...
                listed = {os.fsencode(f) for f in folders} & set(source.listed)
                assert len(listed) >= 5
                assert (second.delta.new, second.delta.deleted) == (len(listed), 0)
                # ...the rest were not listed, and still nothing is taken as deleted.
                assert len(listed) < len(folders)
                assert deleted_files(tmp_path) == []

                source.listed = []
                with capture_logs() as logs:
                    third = await scanner.scan()
                assert source.listed == []  # find is not used again
                assert [e["method"] for e in scan_logs(logs)] == ["sftp"]
                assert third.delta.new == len(folders) - len(listed)
                assert sorted(deleted_files(tmp_path)) == [b"0.dat", b"1.dat", b"2.dat"]
        finally:
            await source.aclose()


async def test_host_key_mismatch_makes_the_origin_unavailable(tmp_path: Path) -> None:
    async with sftp_server(tmp_path / "server") as server:
        origin = server.root / "origin"
        files = make_tree(origin)
        replica = tmp_path / "replica"
        replica.mkdir()
        config = pull_config(tmp_path, server.url("/origin"), replica, **server.replica_keys())
        assert (await sync(config)).exit_code == 0
        write(origin / "later.dat", b"later")  # pending once the host is trusted again
        other = asyncssh.generate_private_key("ssh-ed25519")
        server.keys.known_hosts.write_text(
            f"[127.0.0.1]:{server.port} {other.export_public_key().decode()}")
        summary = await sync(config)
        assert summary.exit_code == 3
        [(name, reason)] = summary.unavailable
        assert name == "det"
        assert "ssh-keyscan" in reason
        assert deleted_files(config) == []
        assert len(files) + 1 == sum(1 for _ in replica.rglob("*")
                                     if not _.is_dir() and _.name != ".replicator-replica")


async def test_unreachable_origin_is_unavailable_not_deleted(tmp_path: Path) -> None:
    async with sftp_server(tmp_path / "server") as server:
        origin = server.root / "origin"
        make_tree(origin)
        replica = tmp_path / "replica"
        replica.mkdir()
        config = pull_config(tmp_path, server.url("/origin"), replica, **server.replica_keys())
        assert (await sync(config)).exit_code == 0
    summary = await sync(config)  # the server is gone
    assert summary.exit_code == 3
    assert "unreachable" in dict(summary.unavailable)["det"]
    assert deleted_files(config) == []


async def test_origin_lost_mid_run_releases_copies(tmp_path: Path) -> None:
    """Scanned fine, then the host goes away: copies are released, not charged."""
    async with sftp_server(tmp_path / "server") as server:
        origin = server.root / "origin"
        files = make_tree(origin)
        replica = tmp_path / "replica"
        replica.mkdir()
        config = pull_config(tmp_path, server.url("/origin"), replica, **server.replica_keys())
        async with Replicator(config) as rep:
            await rep.scan()
    async with Replicator(config) as rep:
        summary = await rep.sync_once()
    assert summary.exit_code == 3
    assert (summary.copied, summary.pending) == (0, len(files) + 1)
    with closing(sqlite3.connect(config.inventory)) as db:
        assert db.execute("SELECT MAX(attempts) FROM copies").fetchone() == (0,)


async def test_connection_dropped_mid_file(tmp_path: Path) -> None:
    faults = Faults(drop_read_after=1 << 20)
    async with sftp_server(tmp_path / "server", faults) as server:
        origin = server.root / "origin"
        files = make_tree(origin)
        replica = tmp_path / "replica"
        replica.mkdir()
        config = pull_config(tmp_path, server.url("/origin"), replica, retry_window=0.01,
                             **server.replica_keys())
        first = await sync(config)
        assert faults.dropped == 1
        big = copy_path(replica, "/origin", b"big/cube.fits")
        if os.path.exists(big):  # never partial under its final name
            with open(big, "rb") as f:
                assert f.read() == files[b"big/cube.fits"]
        assert temp_files(replica) == []
        await anyio.sleep(0.3)  # the retry backoff (backoff_max 0.2 s)
        again = await sync(config)
        assert again.exit_code == 0
        assert first.copied + again.copied == len(files) + 1
        assert_tree_copied(origin, replica, "/origin", files)


# --- ssh:// origins into ssh:// replicas -------------------------------------------------


def sshd_keys(sshd: Sshd) -> dict[str, Any]:
    return {"identity_file": str(sshd.keys.client_key),
            "known_hosts": str(sshd.keys.known_hosts), "connect_timeout": 5.0}


async def test_openssh_origin_into_asyncssh_replica(tmp_path: Path) -> None:
    """Read over one SSH connection, written over another: same guarantees as local copies."""
    with run_sshd(tmp_path / "sshd") as sshd:
        origin = tmp_path / "origin"
        files = make_tree(origin)
        async with sftp_server(tmp_path / "server") as server:
            replica = server.root / "replica"
            replica.mkdir()
            config = pull_config(tmp_path, sshd.url(origin), server.url("/replica"),
                                 replica_keys=server.replica_keys(), **sshd_keys(sshd))
            summary = await sync(config)
            assert (summary.exit_code, summary.copied, summary.pending) == (0, len(files) + 1, 0)
            assert_tree_copied(origin, replica, str(origin), files)
            assert (await sync(config)).copied == 0
            await _pull_changes(tmp_path, origin, config, replica, str(origin), files)


@pytest.mark.parametrize("fault", ["connection dropped", "read error"])
async def test_ssh_origin_failing_mid_file_into_ssh_replica(tmp_path: Path, fault: str) -> None:
    """The origin's connection drops, or a read fails, while a large file is read: nothing
    partial gets a final name on the replica, no temp file stays, and the next run copies
    the file."""
    faults = (Faults(drop_read_after=1 << 20) if fault == "connection dropped"
              else Faults(read_error=b"cube.fits"))
    async with sftp_server(tmp_path / "server", faults) as server:
        origin = server.root / "origin"
        files = make_tree(origin)
        with run_sshd(tmp_path / "sshd") as sshd:
            replica = tmp_path / "replica"
            replica.mkdir()
            config = pull_config(tmp_path, server.url("/origin"), sshd.url(replica),
                                 retry_window=0.01, replica_keys=sshd_keys(sshd),
                                 **server.replica_keys())
            first = await sync(config)
            assert faults.dropped + faults.read_errors >= 1
            assert first.errors >= 1
            big = copy_path(replica, "/origin", b"big/cube.fits")
            assert not os.path.exists(big)
            assert temp_files(replica) == []
            faults.enabled = False
            await anyio.sleep(0.3)  # the retry backoff (backoff_max 0.2 s)
            again = await sync(config)
            assert again.exit_code == 0
            assert first.copied + again.copied == len(files) + 1
            assert_tree_copied(origin, replica, "/origin", files)


async def test_ssh_origin_file_changing_during_read_into_ssh_replica(tmp_path: Path) -> None:
    """A file rewritten while it is read is not renamed into place (it would mix two
    versions); once settled, its new version is copied."""
    faults = Faults(change_during_read=b"cube.fits")
    async with sftp_server(tmp_path / "server", faults) as server:
        origin = server.root / "origin"
        files = make_tree(origin)
        with run_sshd(tmp_path / "sshd") as sshd:
            replica = tmp_path / "replica"
            replica.mkdir()
            config = pull_config(tmp_path, server.url("/origin"), sshd.url(replica),
                                 retry_window=0.01, replica_keys=sshd_keys(sshd),
                                 **server.replica_keys())
            first = await sync(config)
            assert faults.changed == 1
            assert (first.exit_code, first.errors, first.copied, first.pending) == (
                0, 0, len(files), 1)
            big = copy_path(replica, "/origin", b"big/cube.fits")
            assert not os.path.exists(big)
            assert temp_files(replica) == []
            files[b"big/cube.fits"] = (origin / "big" / "cube.fits").read_bytes()
            await anyio.sleep(1.1)  # a changed source is retried after settle_seconds
            again = await sync(config)
            assert (again.exit_code, again.copied, again.pending) == (0, 1, 0)
            assert_tree_copied(origin, replica, "/origin", files)


async def test_ssh_origin_lost_releases_copies_into_ssh_replica(tmp_path: Path) -> None:
    """Scanned, then the origin's host goes away: copies to the SSH replica are released,
    not charged, and the run says the origin is unavailable."""
    with run_sshd(tmp_path / "sshd") as sshd:
        replica = tmp_path / "replica"
        replica.mkdir()
        async with sftp_server(tmp_path / "server") as server:
            files = make_tree(server.root / "origin")
            config = pull_config(tmp_path, server.url("/origin"), sshd.url(replica),
                                 replica_keys=sshd_keys(sshd), **server.replica_keys())
            async with Replicator(config) as rep:
                await rep.scan()
        summary = await sync(config)
        assert (summary.exit_code, summary.errors) == (3, 0)
        assert (summary.copied, summary.pending) == (0, len(files) + 1)
        assert [name for name, _ in summary.unavailable] == ["det"]
        with closing(sqlite3.connect(config.inventory)) as db:
            assert db.execute("SELECT MAX(attempts) FROM copies").fetchone() == (0,)
        assert sorted(os.listdir(replica)) == [".replicator-replica"]


async def test_cli_pull_end_to_end(tmp_path: Path) -> None:
    async with sftp_server(tmp_path / "server") as server:
        origin = server.root / "origin"
        files = make_tree(origin)
        replica = tmp_path / "replica"
        replica.mkdir()
        (tmp_path / "replicator.toml").write_text(
            f'[origins.det]\npath = "{server.url("/origin")}"\nsettle_seconds = 1\n'
            f'identity_file = "{server.keys.client_key}"\n'
            f'known_hosts = "{server.keys.known_hosts}"\nconnect_timeout = 5\n\n'
            f'[replicas."{replica}"]\n')
        env = {**os.environ, "REPLICATOR_CONFIG": str(tmp_path / "replicator.toml")}

        async def cli(*args: str) -> None:
            done = await anyio.run_process([sys.executable, "-m", "replicator", *args],
                                           cwd=tmp_path, env=env, check=False)
            assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()

        await cli("check")
        await cli("sync", "--once")
        assert_tree_copied(origin, replica, "/origin", files)


# --- configuration -------------------------------------------------------------------------


def test_ssh_origin_config(tmp_path: Path) -> None:
    path = tmp_path / "replicator.toml"
    path.write_text('[origins.det]\npath = "ssh://u@detector:2222/data/raw/"\n'
                    'identity_file = "keys/id"\nknown_hosts = "/kh"\nconnect_timeout = 5\n'
                    "connections = 3\nop_timeout = 7\n"
                    '[origins.home]\npath = "ssh://detector/~/raw"\n'
                    '[origins.local]\npath = "/data/raw"\n'
                    '[replicas."/data/raw-copy"]\n')
    det, home, local = load_config(path).origins
    assert (det.remote, det.host, det.root, det.ssh_user, det.ssh_port) == (
        True, "detector", "/data/raw", "u", 2222)
    assert (det.identity_file, det.known_hosts, det.connections, det.op_timeout) == (
        str(tmp_path / "keys" / "id"), "/kh", 3, 7.0)
    assert (home.root, home.host) == ("raw", "detector")
    assert not local.remote


@pytest.mark.parametrize(("text", "error"), [
    ('path = "/data"\nidentity_file = "/k"', r"origins\.o\.identity_file: only ssh://"),
    ('path = "/data"\nop_timeout = 3', r"origins\.o\.op_timeout: only ssh://"),
    ('path = "ssh://h/data"\nconnections = 0', r"origins\.o\.connections: expected an int"),
    ('path = "ssh://h/data"\nconnect_timeout = -1', r"origins\.o\.connect_timeout"),
    ('path = "ssh://h/data"\ninsecure_skip_host_key_check = 1',
     r"origins\.o\.insecure_skip_host_key_check: expected true or false"),
    ('path = "ssh:///data"', r"origins\.o\.path: ssh:// URL needs a host"),
    ('path = "ssh://h/"', r"origins\.o\.path: an ssh:// origin cannot be the whole"),
    ('path = "ssh://h/~"', r"origins\.o\.path: an ssh:// origin cannot be the whole"),
])
def test_bad_ssh_origins(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "replicator.toml"
    path.write_text(f"[origins.o]\n{text}\n")
    with pytest.raises(ConfigError, match=error):
        load_config(path)


def test_ssh_origin_overlaps(tmp_path: Path) -> None:
    def config(*origins: OriginConfig, replica: str = "/backup") -> Config:
        return Config(tmp_path / "i.db", origins, (ReplicaConfig(replica),))

    a = OriginConfig("a", "ssh://det/data")
    # Same folder on another host, or a local folder of that path: no overlap.
    validate_config(config(a, OriginConfig("b", "ssh://other/data")))
    validate_config(config(a, OriginConfig("b", "/data", host="here")))
    with pytest.raises(ConfigError, match="overlaps origin 'a'"):
        validate_config(config(a, OriginConfig("b", "ssh://u@det:22/data/sub")))
    with pytest.raises(ConfigError, match="overlaps origin 'a'"):
        validate_config(config(a, OriginConfig("b", "/data/x", host="det")))
    # A local replica "inside" a remote origin's path is on another machine.
    validate_config(config(a, replica="/data/backup"))
    # SSH origins into SSH replicas: anywhere but inside each other on one host.
    validate_config(config(a, replica="ssh://archive/data"))
    validate_config(config(a, replica="ssh://det/backup"))
    validate_config(config(a, replica="ssh://det/~/data"))
    for inside in ("ssh://u@DET:2222/data/copy", "ssh://det/"):
        with pytest.raises(ConfigError, match="overlaps origin 'a'"):
            validate_config(config(a, replica=inside))
