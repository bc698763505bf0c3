"""The SSH stream data path under faults: a receiver fed through the OpenSSH client or an
asyncssh channel, by the in-process server running real commands (the receiver with the
host's python3), and by OpenSSH sshd with real read-only and full filesystems.

Each ends with every file copied once conditions recover, or a clear per-file failure, never
a partial file under its final name, and no temp file left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import asyncssh
import pytest
from conftest import backdate, temp_files, write
from ssh_server import Faults, run_sshd, sftp_server
from structlog.testing import capture_logs
from test_ssh import (
    assert_all_copied,
    assert_no_partial,
    copy_errors,
    copy_of,
    make_origin,
    run_cli,
    ssh_config,
    sync,
)
from test_transport_conformance import request_for

from replicator import load_config
from replicator._errors import ReplicaUnavailableError
from replicator.transports import (
    MARKER,
    Progress,
    PutResult,
    PutStatus,
    _logins,
    _receiver,
    _spares,
    _ssh_options,
)
from replicator.transports import _ssh as ssh_transport
from replicator.transports._ssh import SshTransport
from replicator.transports._ssh_carriers import Carrier, OpensshCarrier, StreamLost
from replicator.transports._ssh_options import client_only_options, openssh_argv
from replicator.transports._ssh_stream import StreamSession

pytestmark = pytest.mark.anyio

CARRIERS = ["asyncssh", "openssh"]

RECOVERS: dict[str, Callable[[Faults], None]] = {
    "connection dropped mid-file": lambda f: setattr(f, "drop_after", 1 << 20),
    "server stops reading": lambda f: setattr(f, "stall", True),
    "slow server": lambda f: setattr(f, "write_delay", 0.002),
}


@pytest.mark.parametrize("carrier", CARRIERS)
@pytest.mark.parametrize("fault", list(RECOVERS))
async def test_faults_that_recover_within_the_run(tmp_path: Path, fault: str, carrier: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Every link counts as long: batches of large files go over two sessions (lanes).
    monkeypatch.setattr(ssh_transport, "LONG_LINK", 0.0)
    origin = tmp_path / "origin"
    files = make_origin(origin)
    files["big/second.fits"] = os.urandom(2 << 20)  # two large files: a batch on two lanes
    write(origin / "big/second.fits", files["big/second.fits"])
    backdate(origin)
    faults = Faults()
    RECOVERS[fault](faults)
    async with sftp_server(tmp_path / "server", faults, commands=True) as server:
        replica = server.root / "replica"
        replica.mkdir()
        config = ssh_config(tmp_path, origin, server.url("/~/replica"), retry_window=15.0,
                            stall_timeout=1.0, transfer=carrier, **server.replica_keys())
        with capture_logs() as logs:
            summary = await sync(config)
        assert (summary.exit_code, summary.copied, summary.pending) == (0, len(files), 0), [
            (e["event"], e.get("error")) for e in logs if e["log_level"] != "debug"]
        # The receiver removes the temp files of the broken stream once the server sees the
        # channel go and ends the command's input: soon, not necessarily before the run ends.
        await wait_for_no_temps(replica)
        assert_all_copied(replica, origin, files)
    assert not [e for e in logs if "did not start" in e["event"]]  # no fallback to SFTP
    if fault != "slow server":
        assert faults.dropped + faults.stalled == 1  # the fault did happen


async def wait_for_no_temps(replica: Path) -> None:
    with anyio.fail_after(10):
        while temp_files(replica):  # noqa: ASYNC110 (files on disk: no event to wait on)
            await anyio.sleep(0.05)


async def _sync_through_a_shell(tmp_path: Path, carrier: str) -> list[MutableMapping[str, Any]]:
    """Sync a new origin to a server whose commands run in a shell with the test's
    environment; every file must be copied. Returns the run's logs."""
    origin = tmp_path / "origin"
    files = make_origin(origin)
    async with sftp_server(tmp_path / "server", commands=True) as server:
        replica = server.root / "replica"
        replica.mkdir()
        config = ssh_config(tmp_path, origin, server.url("/~/replica"), transfer=carrier,
                            **server.replica_keys())
        with capture_logs() as logs:
            summary = await sync(config)
        assert (summary.exit_code, summary.copied) == (0, len(files))
        assert_all_copied(replica, origin, files)
    return logs


@pytest.mark.parametrize("carrier", CARRIERS)
async def test_a_host_without_python3_falls_back_to_sftp(tmp_path: Path, carrier: str,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # The commands run with the test's environment: a PATH without python3 is a host
    # without it (sh and ssh stay reachable through their own folders).
    for tool in ("sh", "ssh"):
        found = shutil.which(tool)
        assert found is not None
        os.symlink(found, bin_dir / tool)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(_ssh_options, "SYSTEM_PYTHONS", (str(tmp_path / "no-python3"),))
    logs = await _sync_through_a_shell(tmp_path, carrier)
    warnings = [e for e in logs if "did not start" in e["event"]]
    assert len(warnings) == 1
    assert "SFTP" in warnings[0]["event"]


@pytest.mark.parametrize("carrier", CARRIERS)
async def test_the_receiver_runs_with_the_hosts_own_python3_first(
        tmp_path: Path, carrier: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first of ``SYSTEM_PYTHONS`` the host has runs the receiver, not the PATH's
    python3 (which may be a version manager's slow shim); none of them: the PATH's."""
    runs = tmp_path / "runs"
    system = tmp_path / "bin" / "system-python3"
    system.parent.mkdir()
    system.write_text(f'#!/bin/sh\necho system >> "{runs}"\nexec "{sys.executable}" "$@"\n')
    system.chmod(0o755)
    on_path = tmp_path / "path" / "python3"
    on_path.parent.mkdir()
    on_path.write_text(f'#!/bin/sh\necho path >> "{runs}"\nexec "{sys.executable}" "$@"\n')
    on_path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{on_path.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(_ssh_options, "SYSTEM_PYTHONS",
                        (str(tmp_path / "no-python3"), str(system)))
    logs = await _sync_through_a_shell(tmp_path / "first", carrier)
    assert not [e for e in logs if "did not start" in e["event"]]
    assert set(runs.read_text().split()) == {"system"}
    runs.unlink()
    monkeypatch.setattr(_ssh_options, "SYSTEM_PYTHONS", (str(tmp_path / "no-python3"),))
    await _sync_through_a_shell(tmp_path / "then", carrier)
    assert set(runs.read_text().split()) == {"path"}


async def test_spare_sessions_go_by_their_exact_command_and_the_rest_are_killed() -> None:
    """A spare session is taken only for the very command it was started with, once; the
    ones not taken are killed and reaped when the block ends."""
    wanted, other = ["sleep", "30"], ["sleep", "31"]
    async with _spares.spare_processes(0, _logins.start_sessions([wanted, other])):
        assert _logins.take_spare_session(["sleep", "29"]) is None
        taken = _logins.take_spare_session(wanted)
        assert taken is not None
        assert taken.poll() is None
        assert _logins.take_spare_session(wanted) is None  # once
        left = [proc for _, proc in _logins._sessions]
        assert len(left) == 1
    assert left[0].poll() is not None  # killed and reaped
    assert _logins._sessions == []
    assert taken.poll() is None  # the taker's to end
    with taken:  # closes its pipes and waits
        taken.kill()

    # Started and the event loop never ran: closed all the same, once.
    started = _logins.start_sessions([wanted])
    _logins.close_sessions(started)
    _logins.close_sessions(started)
    assert started[0].poll() is not None
    assert _logins._sessions == []


async def test_sync_takes_the_session_it_started_before_the_engine(tmp_path: Path) -> None:
    """``replicator sync`` starts its SSH replica's first receiver session (the OpenSSH
    client) before it imports the engine; the replica takes that session once its own login
    passed the host key check, and copies every file through it."""
    origin = tmp_path / "origin"
    files = make_origin(origin)
    async with sftp_server(tmp_path / "server", commands=True) as server:
        replica = server.root / "replica"
        replica.mkdir()
        await run_cli(tmp_path, "init", "--origin", str(origin))
        # The receiver runs in a real shell, not chrooted as SFTP is: a home-relative root.
        await run_cli(tmp_path, "add-replica", server.url("/~/replica"), "--identity-file",
                      str(server.keys.client_key), "--known-hosts",
                      str(server.keys.known_hosts))
        logs = await run_cli(tmp_path, "-vv", "--log-format", "json", "sync", "--once")
        host = load_config(tmp_path / "replicator.toml").origins[0].host
        for name, data in files.items():
            assert (replica / host / str(origin / name).lstrip("/")).read_bytes() == data
        assert temp_files(replica) == []
    events = [json.loads(line)["event"] for line in logs.splitlines() if line.startswith("{")]
    assert "receiver session from a spare" in events, logs
    assert "receiver session started" in events


# --- real filesystems on the far side (OpenSSH sshd) ---------------------------------------


@pytest.fixture
def mount() -> Iterator[Callable[..., None]]:
    mounted: list[str] = []

    def do(*args: str) -> None:
        done = subprocess.run(["mount", *args], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount ({' '.join(args)}): needs root: {done.stderr.strip()}")
        mounted.append(args[-1])

    yield do
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", target], check=False)


@pytest.mark.parametrize("carrier", CARRIERS)
async def test_full_disk_fails_the_file_then_recovers(tmp_path: Path, carrier: str,
                                                      mount: Callable[..., None]) -> None:
    origin = tmp_path / "origin"
    files = make_origin(origin)  # one 3 MiB file: more than the 1 MiB disk holds
    replica = tmp_path / "replica"
    replica.mkdir()
    mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(replica))
    with run_sshd(tmp_path / "sshd") as sshd:
        keys = sshd.replica_keys()
        config = ssh_config(tmp_path, origin, sshd.url(replica), transfer=carrier, **keys)
        summary = await sync(config)
        assert summary.exit_code == 1
        assert summary.copied == len(files) - 1
        assert_no_partial(replica, origin, files)
        assert temp_files(replica) == []
        assert not copy_of(replica, origin, "big/cube.fits").exists()
        assert {cls for cls, _ in copy_errors(config)} == {"no_space"}
        # More room: the next run copies the file that did not fit, once.
        mount("-o", "remount,size=8m", str(replica))
        await anyio.sleep(0.3)  # the retry backoff of the failed file
        again = await sync(config)
        assert (again.exit_code, again.copied, again.pending) == (0, 1, 0)
        assert_all_copied(replica, origin, files)


@pytest.mark.parametrize("carrier", CARRIERS)
async def test_small_files_that_fill_the_disk_leave_no_temp_file(
        tmp_path: Path, carrier: str, mount: Callable[..., None]) -> None:
    """Small files travel whole, one frame each: one that fills the disk half-way is
    removed, reported no_space, and copied by the next run once there is room."""
    origin = tmp_path / "origin"
    for i in range(6):
        write(origin / f"f{i}.dat", bytes([i]) * (300 << 10))
    backdate(origin)
    replica = tmp_path / "replica"
    replica.mkdir()
    mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(replica))
    with run_sshd(tmp_path / "sshd") as sshd:
        config = ssh_config(tmp_path, origin, sshd.url(replica), transfer=carrier,
                            **sshd.replica_keys())
        summary = await sync(config)
        assert summary.exit_code == 1
        assert 0 < summary.copied < 6
        assert temp_files(replica) == []
        assert {cls for cls, _ in copy_errors(config)} == {"no_space"}
        for i in range(6):
            copy = copy_of(replica, origin, f"f{i}.dat")
            assert not copy.exists() or copy.read_bytes() == bytes([i]) * (300 << 10)
        mount("-o", "remount,size=8m", str(replica))
        await anyio.sleep(0.3)  # the retry backoff of the failed files
        again = await sync(config)
        assert (again.exit_code, again.copied + summary.copied, again.pending) == (0, 6, 0)
        assert temp_files(replica) == []


@pytest.mark.parametrize("carrier", CARRIERS)
async def test_read_only_folder_fails_its_files(tmp_path: Path, carrier: str,
                                                mount: Callable[..., None]) -> None:
    origin = tmp_path / "origin"
    files = make_origin(origin)
    replica = tmp_path / "replica"
    replica.mkdir()
    locked = copy_of(replica, origin, "locked")
    locked.mkdir(parents=True)
    mount("--bind", str(locked), str(locked))
    mount("-o", "remount,bind,ro", str(locked))
    with run_sshd(tmp_path / "sshd") as sshd:
        keys = sshd.replica_keys()
        config = ssh_config(tmp_path, origin, sshd.url(replica), transfer=carrier, **keys)
        summary = await sync(config)
        assert summary.exit_code == 1
        assert summary.copied == len(files) - 1
        assert not copy_of(replica, origin, "locked/secret.dat").exists()
        assert {cls for cls, _ in copy_errors(config)} == {"permission"}
        assert temp_files(replica) == []


# --- the OpenSSH client obeys the same rules -----------------------------------------------


async def test_openssh_client_refuses_an_unknown_host_key(tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    files = make_origin(origin)
    async with sftp_server(tmp_path / "server", trust=False, commands=True) as server:
        replica = server.root / "replica"
        replica.mkdir()
        config = ssh_config(tmp_path, origin, server.url("/~/replica"), transfer="openssh",
                            **server.replica_keys())
        summary = await sync(config)
        assert (summary.exit_code, summary.copied, summary.pending) == (3, 0, len(files))
        assert list(replica.iterdir()) == []
        # OpenSSH's logins that started together (see test_ssh), refused before they
        # authenticate, then the SFTP login that says why; nothing knocks again.
        assert 2 <= len(server.connections) <= 2 + ssh_transport.SHORT_LINK_SESSIONS


async def test_openssh_client_uses_only_the_configured_known_hosts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The OpenSSH client gets the replica's known_hosts file and identity, nothing else:
    a key it would find elsewhere (~/.ssh/known_hosts) is not trusted."""
    origin = tmp_path / "origin"
    make_origin(origin)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    async with sftp_server(tmp_path / "server", commands=True) as server:
        replica = server.root / "replica"
        replica.mkdir()
        # The user's own known_hosts trusts the server; the replica's file trusts another key.
        (home / ".ssh" / "known_hosts").write_text(server.keys.known_hosts.read_text())
        options = server.options()
        argv = openssh_argv(options, "true")
        assert f"UserKnownHostsFile={options.known_hosts}" in argv
        assert "StrictHostKeyChecking=yes" in argv
        assert "GlobalKnownHostsFile=/dev/null" in argv
        assert ["-i", options.identity_file] == argv[argv.index("-i"):argv.index("-i") + 2]
        done = await anyio.run_process(openssh_argv(options, "echo hello"), check=False)
        assert (done.returncode, done.stdout) == (0, b"hello\n"), done.stderr
        other = tmp_path / "other_known_hosts"
        other.write_text("")
        argv = openssh_argv(server.options(known_hosts=str(other)), "echo hello")
        done = await anyio.run_process(argv, check=False)
        assert done.returncode == 255
        assert b"Host key verification failed" in done.stderr


async def test_openssh_client_ignores_host_keys_vouched_for_by_ssh_config(
        tmp_path: Path) -> None:
    """A ``KnownHostsCommand`` in an ssh_config (a user's ~/.ssh/config, here given with
    ``-F``) makes the OpenSSH client trust keys the replica's known_hosts file does not
    hold; asyncssh knows no such option. The client's command line turns it off, so the
    host is refused as on the asyncssh path."""
    if "KnownHostsCommand=none" not in client_only_options():
        pytest.skip("this ssh predates KnownHostsCommand (OpenSSH 8.5)")
    async with sftp_server(tmp_path / "server", commands=True) as server:
        vouched = tmp_path / "vouched_hosts"
        vouched.write_text(server.keys.known_hosts.read_text())
        config = tmp_path / "ssh_config"
        config.write_text(f"Host *\n    KnownHostsCommand /bin/cat {vouched}\n")
        empty = tmp_path / "known_hosts"
        empty.write_text("")
        argv = openssh_argv(server.options(known_hosts=str(empty)), "echo hello")
        argv[1:1] = ["-F", str(config)]
        done = await anyio.run_process(argv, check=False)
        assert done.returncode == 255
        assert b"Host key verification failed" in done.stderr
        # The same command line without the override: the config's command vouches.
        at = argv.index("KnownHostsCommand=none")
        del argv[at - 1:at + 1]
        done = await anyio.run_process(argv, check=False)
        assert (done.returncode, done.stdout) == (0, b"hello\n"), done.stderr
        assert empty.read_text() == ""


@asynccontextmanager
async def sshd_transport(tmp_path: Path, carrier: str = "openssh", lanes: int = 1
                         ) -> AsyncIterator[tuple[SshTransport, Path]]:
    """A transport to an empty replica folder on a private OpenSSH sshd, closed after.
    ``carrier`` "sftp": none (plain SFTP)."""
    with run_sshd(tmp_path / "sshd") as sshd:
        replica = tmp_path / "replica"
        replica.mkdir()
        transport = SshTransport(sshd.options(), str(replica), anyio.CapacityLimiter(2),
                                 op_timeout=10, carriers=(carrier,) if carrier != "sftp" else (),
                                 lanes=lanes)
        try:
            yield transport, replica
        finally:
            await transport.aclose()


def count_sftp_logins(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per asyncssh login (the SFTP pool's) from now on."""
    logins: list[int] = []
    connect = asyncssh.connect

    async def counted(*args: Any, **kwargs: Any) -> asyncssh.SSHClientConnection:
        logins.append(1)
        return await connect(*args, **kwargs)

    monkeypatch.setattr(asyncssh, "connect", counted)
    return logins


def count_session_starts(monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> list[float]:
    """The round trips of the receiver sessions started from now on, each ``delay``
    seconds slower to start."""
    started: list[float] = []
    start = StreamSession.start.__func__  # type: ignore[attr-defined]

    async def counting_start(cls: type[StreamSession], carrier: Carrier) -> StreamSession:
        try:
            await anyio.sleep(delay)
        except BaseException:
            # Cancelled before the real start (a session still starting when the run
            # ends): close the carrier as that start would. An ssh left running here
            # would be found by the garbage collector during a later test, failing it.
            carrier.close()
            raise
        session: StreamSession = await start(cls, carrier)
        started.append(session.rtt)
        return session

    monkeypatch.setattr(StreamSession, "start", classmethod(counting_start))
    return started


@pytest.mark.parametrize("carrier", CARRIERS)
@pytest.mark.parametrize("long_link", [False, True])
async def test_many_batches_through_the_stream(tmp_path: Path, carrier: str, long_link: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Several batches and sessions (two per batch of large files on a long link): every
    file lands once, complete, and nothing is copied again. On a short link no more than
    SHORT_LINK_SESSIONS sessions start, however many workers there are."""
    if long_link:
        monkeypatch.setattr(ssh_transport, "LONG_LINK", 0.0)
    started = count_session_starts(monkeypatch)
    origin = tmp_path / "origin"
    files = {f"d{i % 7}/f{i}.dat": os.urandom(i % 5000) for i in range(2500)}
    files.update({f"large/{i}.bin": os.urandom((3 << 20) + i) for i in range(4)})
    for name, data in files.items():
        write(origin / name, data)
    backdate(origin)
    with run_sshd(tmp_path / "sshd") as sshd:
        replica = tmp_path / "replica"
        replica.mkdir()
        keys = sshd.replica_keys()
        config = ssh_config(tmp_path, origin, sshd.url(replica), transfer=carrier,
                            workers=4, **keys)
        summary = await sync(config)
        assert (summary.exit_code, summary.copied, summary.pending) == (0, len(files), 0)
        assert_all_copied(replica, origin, files)
        if not long_link:
            assert 1 <= len(started) <= 2, started  # SHORT_LINK_SESSIONS
        attempts: list[int] = []
        start_session = SshTransport._start_session

        async def counted(self: SshTransport) -> StreamSession | None:
            attempts.append(1)
            return await start_session(self)

        monkeypatch.setattr(SshTransport, "_start_session", counted)
        assert (await sync(config)).copied == 0
        # Nothing to copy: the replica's check is the one login on the host (a session
        # that looks at the root and the marker, as an SFTP login would); no batch, none
        # for a batch.
        assert len(attempts) <= 1


async def test_a_missing_root_is_not_taken_for_a_host_without_the_receiver(
        tmp_path: Path) -> None:
    """The root vanishing between the probe and a batch (an unmount) fails that batch; the
    stream stays the way files travel."""
    origin = tmp_path / "origin"
    files = make_origin(origin)
    with run_sshd(tmp_path / "sshd") as sshd:
        replica = tmp_path / "replica"
        replica.mkdir()
        transport = SshTransport(sshd.options(), str(replica / "gone"), anyio.CapacityLimiter(2),
                                 op_timeout=10, carriers=("openssh",))
        try:
            requests = [request_for(origin / name, name.encode()) for name in files]
            results = await transport.put(requests, "1x1", Progress())
            assert {r.status for r in results} == {PutStatus.ERROR}
            assert transport.transfer == "openssh"
            (replica / "gone").mkdir()
            results = await transport.put(requests, "1x1", Progress())
            assert {r.status for r in results} == {PutStatus.COPIED}
        finally:
            await transport.aclose()


class ChangesSource(Progress):
    """Progress that rewrites the source once the first bytes of it have been sent."""

    def __init__(self, source: Path, change: Callable[[Path], None]) -> None:
        super().__init__()
        self.source, self.change, self.changed = source, change, False

    def add(self, nbytes: int = 0, files: int = 0) -> None:
        super().add(nbytes, files)
        if nbytes and not self.changed:
            self.changed = True
            self.change(self.source)


def shrink(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def grow(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"more")


@pytest.mark.parametrize("carrier", CARRIERS)
@pytest.mark.parametrize("change", [shrink, grow])
async def test_a_large_file_changing_while_it_streams_is_not_copied(
        tmp_path: Path, carrier: str, change: Callable[[Path], None]) -> None:
    """The bytes of a large file go straight from the file to the carrier (spliced into the
    OpenSSH client's pipe): a file that shrinks under it still ends its frames, and one that
    shrinks or grows is reported changed, with nothing under its final name."""
    source = write(tmp_path / "big.bin", os.urandom(9 << 20))
    request = request_for(source, b"d/big.bin")
    small = write(tmp_path / "small.txt", b"next file of the batch")
    async with sshd_transport(tmp_path, carrier) as (transport, replica):
        progress = ChangesSource(source, change)
        results = await transport.put([request, request_for(small, b"d/small.txt")],
                                      "1x1", progress)
        assert transport.transfer == carrier
    assert progress.changed
    assert [r.status for r in results] == [PutStatus.CHANGED, PutStatus.COPIED]
    assert not (replica / "d" / "big.bin").exists()
    assert (replica / "d" / "small.txt").read_bytes() == b"next file of the batch"
    assert temp_files(replica) == []


def serve_fed(root: Path, frames: bytes, dribble: int) -> bytes:
    """The receiver itself, in this process, fed ``frames`` through a pipe ``dribble`` bytes
    at a time (as sshd feeds it); what it wrote."""
    import io
    import threading

    from replicator.transports import _receiver

    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with open(write_fd, "wb", buffering=0) as pipe:
            for start in range(0, len(frames), dribble):
                pipe.write(frames[start:start + dribble])

    feeder = threading.Thread(target=feed)
    feeder.start()
    out = io.BytesIO()
    old_umask = os.umask(0)
    try:
        _receiver.serve(os.fsencode(root), read_fd, out)
    finally:
        os.umask(old_umask)
        feeder.join()
        os.close(read_fd)
    return out.getvalue()


@pytest.mark.parametrize("splice", [True, False])
def test_the_receiver_takes_content_from_its_input_spliced_or_read(
        tmp_path: Path, splice: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver itself, in this process, fed through a pipe as sshd feeds it: content
    beyond what it has buffered goes from the pipe into the file with splice (Python 3.10+),
    or is read and written (older Pythons, or an input that is not a pipe)."""
    import json

    from replicator.transports import _receiver
    from replicator.transports._ssh_stream import COMMIT, data_header, file_frame

    spliced: list[int] = []
    if not splice:
        monkeypatch.setattr(_receiver, "SPLICE", None)
    elif _receiver.SPLICE is None:
        pytest.skip("os.splice needs Python 3.10+ on Linux")
    else:
        real_splice = _receiver.SPLICE

        def counting_splice(src: int, dst: int, count: int) -> int:
            moved: int = real_splice(src, dst, count)
            spliced.append(moved)
            return moved

        monkeypatch.setattr(_receiver, "SPLICE", counting_splice)
    # Writing to disk starts every WRITEBACK_EVERY bytes of a file, as they arrive.
    monkeypatch.setattr(_receiver, "WRITEBACK_EVERY", 1 << 20)
    pushed: list[tuple[int, int]] = []
    real_writeback = _receiver._writeback()
    assert real_writeback is not None  # Linux: sync_file_range is in the C library

    def recording_writeback(fd: int, offset: int, count: int) -> object:
        pushed.append((offset, count))
        return real_writeback(fd, offset, count)

    monkeypatch.setattr(_receiver, "_writeback", lambda: recording_writeback)
    root = tmp_path / "replica"
    root.mkdir()
    big, small = os.urandom((3 << 20) + 7), b"small file"
    frames = (file_frame(1, 0o640, 1_600_000_000_123_456_789, b"a/big.bin", b".~rep-1-a.tmp")
              + data_header(len(big)) + big + COMMIT
              + file_frame(2, 0o600, 1_600_000_000_000_000_000, b"a/small", b".~rep-1-b.tmp")
              + data_header(len(small)) + small + COMMIT + b"S" + b"Q")
    greeting, flushing, report = serve_fed(root, frames, len(frames)).splitlines()
    assert (greeting + b"\n", flushing + b"\n") == (_receiver.GREETING, _receiver.FLUSHING)
    assert sorted(json.loads(report)) == [[1, 0, len(big), 1_600_000_000_123_456_789, 1],
                                          [2, 0, len(small), 1_600_000_000_000_000_000, 1]]
    assert (root / "a" / "big.bin").read_bytes() == big
    assert (root / "a" / "small").read_bytes() == small
    assert temp_files(root) == []
    assert (sum(spliced) > 0) == splice
    # The big file in order and without gaps, but for a tail under 1 MiB that the flush
    # takes; nothing of the small file.
    assert [offset for offset, _ in pushed] == [sum(c for _, c in pushed[:i])
                                                for i in range(len(pushed))], pushed
    assert all(count >= 1 << 20 for _, count in pushed)
    assert len(big) - (1 << 20) < sum(count for _, count in pushed) <= len(big)


@pytest.mark.parametrize("dribble", [1, 7, 4096, 1 << 20])
def test_the_receiver_takes_frames_split_anywhere_by_its_reads(tmp_path: Path,
                                                               dribble: int) -> None:
    """Small files sent whole (W frames, parsed in place in the receiver's buffer), a
    file in parts and a symlink, fed through a pipe ``dribble`` bytes at a time: a frame
    split by the reads anywhere (header, names, content) arrives whole, as does a W frame
    larger than one read."""
    import json

    from replicator.transports._ssh_stream import (
        COMMIT,
        data_header,
        file_frame,
        link_frame,
        whole_header,
    )

    root = tmp_path / "replica"
    root.mkdir()
    contents = [b"", b"x", os.urandom(4096), os.urandom(3 << 20), b"last"]
    frames = b""
    for i, content in enumerate(contents):
        frames += whole_header(i, 0o640 + i, 1_600_000_000_000_000_000 + i,
                               f"d{i % 2}/f{i}".encode(), f".~rep-1-{i}.tmp".encode(),
                               len(content)) + content
        if i == 2:
            frames += (file_frame(10, 0o600, 1_700_000_000_000_000_000, b"parts",
                                  b".~rep-1-p.tmp") + data_header(3) + b"abc" + COMMIT
                       + link_frame(11, 1_700_000_000_000_000_001, b"d0/link",
                                    b".~rep-1-l.tmp", b"f0"))
    frames += b"S" + b"Q"
    report = sorted(json.loads(serve_fed(root, frames, dribble).splitlines()[2]))
    link_size = len(b"f0")
    assert report == [[i, 0, len(c), 1_600_000_000_000_000_000 + i, 1]
                      for i, c in enumerate(contents)] + [
        [10, 0, 3, 1_700_000_000_000_000_000, 1],
        [11, 0, link_size, 1_700_000_000_000_000_001, 1]]
    for i, content in enumerate(contents):
        path = root / f"d{i % 2}" / f"f{i}"
        assert path.read_bytes() == content
        st = path.stat()
        assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o640 + i,
                                                         1_600_000_000_000_000_000 + i)
    assert (root / "parts").read_bytes() == b"abc"
    assert os.readlink(root / "d0" / "link") == "f0"
    assert temp_files(root) == []


class _Replies:
    """The lines a receiver writes to the pipe ``fd``, collected by a thread."""

    def __init__(self, fd: int) -> None:
        import threading

        self.lines: list[bytes] = []
        self._arrived = threading.Condition()
        self._thread = threading.Thread(target=self._collect, args=(fd,))
        self._thread.start()

    def _collect(self, fd: int) -> None:
        with open(fd, "rb") as out:
            for line in out:
                with self._arrived:
                    self.lines.append(line)
                    self._arrived.notify_all()

    def wait_for(self, count: int) -> list[bytes]:
        """The first ``count`` lines, waited for 20 s at most (then fewer: the test fails)."""
        with self._arrived:
            self._arrived.wait_for(lambda: len(self.lines) >= count, timeout=20)
            return self.lines[:count]

    def join(self) -> None:
        self._thread.join(20)


@contextmanager
def live_receiver(root: Path) -> Iterator[tuple[BinaryIO, _Replies]]:
    """The receiver serving ``root`` in a thread, fed through one pipe and answering through
    another: the feed (closed at the end, and the receiver must then end) and its replies."""
    import threading

    from replicator.transports import _receiver

    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    replies = _Replies(out_read)
    old_umask = os.umask(0)
    try:
        with open(out_write, "wb") as out:
            server = threading.Thread(target=_receiver.serve,
                                      args=(os.fsencode(root), in_read, out))
            server.start()
            with open(in_write, "wb", buffering=0) as feed:
                yield feed, replies
            server.join(20)
            assert not server.is_alive()
    finally:
        os.umask(old_umask)
        replies.join()
        os.close(in_read)


def test_the_receiver_reports_a_batch_while_the_next_is_read(tmp_path: Path) -> None:
    """The receiver reads on while a batch's flush is under way, and reports each batch
    once its files are in place, without waiting for more input (a client may send nothing
    until it has a report); its replies keep the order of the requests: ``flushing`` and
    the report of each sync, in turn, then the answer to a ping sent behind them."""
    import json

    from replicator.transports import _receiver
    from replicator.transports._ssh_stream import whole_header

    root = tmp_path / "replica"
    root.mkdir()

    def batch(first: int, count: int) -> bytes:
        return b"".join(whole_header(i, 0o644, 1_600_000_000_000_000_000 + i,
                                     f"b{first}/f{i}".encode(), f".~rep-1-{i}.tmp".encode(),
                                     3) + b"abc" for i in range(first, first + count)) + b"S"

    with live_receiver(root) as (feed, replies):
        feed.write(batch(0, 5))
        # Nothing more is sent until the report: it comes from the flush alone.
        assert len(replies.wait_for(3)) == 3, replies.lines
        feed.write(batch(5, 3) + batch(8, 4) + b"P")
        assert len(replies.wait_for(8)) == 8, replies.lines
        feed.write(b"Q")
    lines = [line.rstrip(b"\n") for line in replies.lines]
    greeting, *rest = lines
    assert greeting + b"\n" == _receiver.GREETING
    flushing = _receiver.FLUSHING.rstrip(b"\n")
    assert rest[0::2][:3] == [flushing] * 3
    assert rest[-1] + b"\n" == _receiver.PONG
    reports = [json.loads(line) for line in rest[1:6:2]]
    assert [[entry[0] for entry in report] for report in reports] == [
        list(range(0, 5)), list(range(5, 8)), list(range(8, 12))]
    assert all(entry[1] == 0 for report in reports for entry in report)
    assert sorted(p.name for p in root.rglob("f*")) == sorted(f"f{i}" for i in range(12))
    assert temp_files(root) == []


@pytest.mark.parametrize("splice", [True, False])
def test_the_receiver_reports_a_batch_while_a_large_file_waits_for_content(
        tmp_path: Path, splice: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A report comes while the next batch's large file waits for the rest of its content
    (its bytes go straight from the input to the file: spliced, or read): the client may
    wait for that report before it sends more, and a stream that stopped moving (a stalled
    server) must not hold the report of a batch already sent."""
    import json

    from replicator.transports import _receiver
    from replicator.transports._ssh_stream import (
        COMMIT,
        data_header,
        file_frame,
        whole_header,
    )

    if not splice:
        monkeypatch.setattr(_receiver, "SPLICE", None)
    root = tmp_path / "replica"
    root.mkdir()
    big = os.urandom(3 << 20)
    first = whole_header(0, 0o644, 1_600_000_000_000_000_000, b"small", b".~rep-1-s.tmp",
                         3) + b"abc" + b"S"
    head = (file_frame(1, 0o644, 1_600_000_000_000_000_001, b"big", b".~rep-1-b.tmp")
            + data_header(len(big)) + big[:1 << 20])
    rest = big[1 << 20:] + COMMIT + b"S" + b"Q"
    with live_receiver(root) as (feed, replies):
        feed.write(first)
        feed.write(head)  # the large file begins; its rest waits for the report
        got = replies.wait_for(3)
        assert len(got) == 3, got
        greeting, flushing, report = got
        assert (greeting, flushing) == (_receiver.GREETING, _receiver.FLUSHING)
        assert [entry[:2] for entry in json.loads(report)] == [[0, 0]]
        feed.write(rest)
        got = replies.wait_for(5)
        assert len(got) == 5, got
        flushing, report = got[3:]
        assert flushing == _receiver.FLUSHING
        assert [entry[:3] for entry in json.loads(report)] == [[1, 0, len(big)]]
    assert (root / "big").read_bytes() == big
    assert temp_files(root) == []


@pytest.mark.parametrize("long_link", [False, True])
async def test_prepare_starts_one_session_per_lane_on_a_long_link(
        tmp_path: Path, long_link: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the first batch, prepare leaves sessions ready: SHORT_LINK_SESSIONS on a short
    link, one per lane on a long one (its logins are round trips the engine's checks leave
    time for), no more than SESSION_STARTS logging in at once (sshd's MaxStartups)."""
    if long_link:
        monkeypatch.setattr(ssh_transport, "LONG_LINK", 0.0)
    starting, most = [0], [0]
    start_session = SshTransport._start_session

    async def counted(self: SshTransport) -> StreamSession | None:
        starting[0] += 1
        most[0] = max(most[0], starting[0])
        try:
            return await start_session(self)
        finally:
            starting[0] -= 1

    monkeypatch.setattr(SshTransport, "_start_session", counted)
    lanes = ssh_transport.SESSION_STARTS + 2
    short = ssh_transport.SHORT_LINK_SESSIONS
    async with sshd_transport(tmp_path, lanes=lanes) as (transport, _):
        await transport.prepare()
        assert len(transport._sessions) == (lanes if long_link else short)
        await transport.prepare()  # once only
        assert len(transport._sessions) == (lanes if long_link else short)
    assert transport._live == 0
    assert most[0] == (ssh_transport.SESSION_STARTS if long_link else short)


async def test_a_cancelled_session_start_leaves_no_ssh_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session start cancelled while it asks why the receiver did not start (as when a
    run ends while prepare's sessions are starting) kills and reaps its ssh process."""
    carriers: list[OpensshCarrier] = []
    real_open = OpensshCarrier.open.__func__  # type: ignore[attr-defined]

    async def recording_open(cls: type[OpensshCarrier], argv: list[str], op_timeout: float
                             ) -> OpensshCarrier:
        carrier: OpensshCarrier = await real_open(cls, argv, op_timeout)
        carriers.append(carrier)
        return carrier

    async def stuck(self: OpensshCarrier) -> tuple[str, bool]:
        await anyio.sleep_forever()
        raise AssertionError

    monkeypatch.setattr(OpensshCarrier, "open", classmethod(recording_open))
    monkeypatch.setattr(OpensshCarrier, "failure", stuck)
    async with sftp_server(tmp_path / "server") as server:  # commands refused: no receiver
        transport = SshTransport(server.options(), "/", anyio.CapacityLimiter(2),
                                 op_timeout=10, carriers=("openssh",))
        try:
            with anyio.move_on_after(2) as scope:
                await transport._start_session()
            assert scope.cancelled_caught
            [carrier] = carriers
            assert carrier._proc.poll() is not None  # killed and reaped
            assert carrier._proc.stdout is not None
            assert carrier._proc.stdout.closed
        finally:
            await transport.aclose()


async def test_a_host_key_refused_later_starts_no_session(tmp_path: Path) -> None:
    """A host whose key changed after a session worked (known_hosts changed): OpenSSH's
    login is refused before it authenticates, the SFTP login says why, no session
    starts, and nothing knocks again until known_hosts changes."""
    async with sftp_server(tmp_path / "server", commands=True) as server:
        (server.root / "replica").mkdir()
        transport = SshTransport(server.options(), "replica", anyio.CapacityLimiter(2),
                                 op_timeout=10, carriers=("openssh",))
        try:
            await transport.probe()  # through a receiver session
            assert (transport._live, len(server.connections)) == (1, 1)
            other = asyncssh.generate_private_key("ssh-ed25519")
            server.keys.known_hosts.write_text(
                f"[127.0.0.1]:{server.port} {other.export_public_key().decode()}")
            for session in transport._sessions:
                transport._drop(session)
            transport._sessions.clear()
            for _ in range(2):
                with pytest.raises(ReplicaUnavailableError, match="ssh-keyscan"):
                    await transport.probe()
                await transport.prepare()
                assert transport._live == 0
            assert len(server.connections) == 3  # the first session, then each client once
        finally:
            await transport.aclose()


@pytest.mark.parametrize("long_link", [False, True])
async def test_the_openssh_carrier_needs_no_sftp_login(
        tmp_path: Path, long_link: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where OpenSSH carries the stream, the replica's check (the root, the marker) and
    prepare go through receiver sessions: no SFTP login at all (OpenSSH checks the host
    key by the same rules). prepare starts the sessions a short link takes, or one per lane
    on a long link."""
    if long_link:
        monkeypatch.setattr(ssh_transport, "LONG_LINK", 0.0)
    logins = count_sftp_logins(monkeypatch)
    lanes = 3
    async with sshd_transport(tmp_path, lanes=lanes) as (transport, replica):
        await transport.probe()
        assert await transport.read_marker() is None
        await transport.write_marker("replicator test 1")
        assert (replica / MARKER.decode()).read_text() == "replicator test 1\n"
        assert await transport.read_marker() == "replicator test 1"
        assert transport._live == 1  # one session did all of it
        await transport.prepare()
        assert len(transport._sessions) == (
            lanes if long_link else ssh_transport.SHORT_LINK_SESSIONS)
        assert logins == []
        (replica / "file").write_text("")
        missing = SshTransport(transport.options, str(replica / "nope"),
                               anyio.CapacityLimiter(2), op_timeout=10, carriers=("openssh",))
        a_file = SshTransport(transport.options, str(replica / "file"),
                              anyio.CapacityLimiter(2), op_timeout=10, carriers=("openssh",))
        try:
            with pytest.raises(ReplicaUnavailableError, match="does not exist"):
                await missing.probe()
            with pytest.raises(ReplicaUnavailableError, match="is not a folder"):
                await a_file.probe()
        finally:
            await missing.aclose()
            await a_file.aclose()
        assert logins == []


@pytest.mark.parametrize("check", ["receiver", "sftp"])
async def test_the_check_reports_what_blocks_the_replica(
        tmp_path: Path, check: str, mount: Callable[..., None],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The replica's check says the same through a receiver session as over SFTP: a marker
    that cannot be read or replaced, a root where no file can be created. The receiver's
    check needs no SFTP login."""
    logins = count_sftp_logins(monkeypatch)
    async with sshd_transport(tmp_path, "openssh" if check == "receiver" else "sftp") as (
            transport, replica):
        marker = replica / MARKER.decode()
        marker.mkdir()  # a folder where the marker file should be
        await transport.probe()
        # SFTP's status says less than the receiver's errno.
        said = "directory" if check == "receiver" else ""
        with pytest.raises(ReplicaUnavailableError, match=f"^replica marker: .*{said}"):
            await transport.read_marker()
        with pytest.raises(ReplicaUnavailableError,
                           match=f"^cannot write the replica marker: .*{said}"):
            await transport.write_marker("replicator test 1")
        assert marker.is_dir()
        assert list(marker.iterdir()) == []
        marker.rmdir()
        mount("--bind", str(replica), str(replica))
        mount("-o", "remount,bind,ro", str(replica))
        with pytest.raises(ReplicaUnavailableError, match=r"^replica root .* is not usable: "):
            await transport.probe()
        assert await transport.read_marker() is None
        with pytest.raises(ReplicaUnavailableError,
                           match=r"^cannot write the replica marker: "):
            await transport.write_marker("replicator test 1")
        assert list(replica.iterdir()) == []
        assert (logins == []) == (check == "receiver")


async def test_a_check_cancelled_while_another_waits_for_its_look(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The root's probe and the marker's read share one look through the receiver; when
    the caller whose look it is gets cancelled, the one waiting looks for itself."""
    looking = anyio.Event()
    inspect = StreamSession.inspect

    async def slow_first_look(self: StreamSession, marker: bytes) -> list[Any]:
        if not looking.is_set():
            looking.set()
            await anyio.sleep(30)
        answer: list[Any] = await inspect(self, marker)
        return answer

    monkeypatch.setattr(StreamSession, "inspect", slow_first_look)
    async with sshd_transport(tmp_path) as (transport, replica):
        (replica / MARKER.decode()).write_text("replicator test 7\n")
        got: list[str | None] = []
        probing = anyio.CancelScope()

        async def probe() -> None:
            with probing:
                await transport.probe()

        async def read() -> None:
            got.append(await transport.read_marker())

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(probe)
                await looking.wait()
                tg.start_soon(read)
                await anyio.sleep(0.1)  # the read waits for the probe's look
                assert got == []
                probing.cancel()
        assert got == ["replicator test 7"]


@pytest.mark.parametrize("carrier", CARRIERS)
async def test_on_a_long_link_batches_take_the_prepared_sessions(
        tmp_path: Path, carrier: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches that arrive while prepare's sessions are still starting wait for them instead
    of starting sessions of their own: as many sessions as workers, not twice as many."""
    monkeypatch.setattr(ssh_transport, "LONG_LINK", 0.0)
    # A login over a long link: the first batches come before the sessions are up.
    started = count_session_starts(monkeypatch, delay=0.5)
    origin = tmp_path / "origin"
    files = {f"d{i % 5}/f{i}.dat": os.urandom(i % 3000) for i in range(3000)}
    for name, data in files.items():
        write(origin / name, data)
    backdate(origin)
    with run_sshd(tmp_path / "sshd") as sshd:
        replica = tmp_path / "replica"
        replica.mkdir()
        config = ssh_config(tmp_path, origin, sshd.url(replica), transfer=carrier,
                            workers=3, **sshd.replica_keys())
        summary = await sync(config)
        assert (summary.exit_code, summary.copied, summary.pending) == (0, len(files), 0)
        assert_all_copied(replica, origin, files)
    # (A session still starting when the last batch is done is not waited for.)
    assert 1 <= len(started) <= 3, started


async def test_what_ssh_said_outlives_a_write_to_it_once_it_died() -> None:
    """A batch that writes to an ssh already gone closes the carrier; why it went (its
    stderr) is still what tells a dropped login from a refusal."""
    said = "kex_exchange_identification: Connection closed by remote host"
    carrier = await OpensshCarrier.open(["sh", "-c", f'echo "{said}" >&2; exit 255'], 10)
    await anyio.to_thread.run_sync(carrier._proc.wait, 5)
    with pytest.raises(StreamLost):
        await carrier.write(b"x" * (4 << 20))  # more than the pipe holds: EPIPE
    assert await carrier.failure() == (f"ssh exit 255: {said}", False)  # not definitive


async def test_a_carrier_closed_while_its_ssh_is_slow_to_die_reaps_it_later(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine too busy to let a killed ssh die within the half second ``close``
    waits, the process is reaped in the background: no zombie, no running process left
    to the garbage collector (whose warning CI turns into a failure)."""
    carrier = await OpensshCarrier.open(["sleep", "30"], 10)
    proc = carrier._proc
    wait = proc.wait
    waits: list[float | None] = []

    def busy_first_wait(timeout: float | None = None) -> int:
        waits.append(timeout)
        if len(waits) == 1:  # as if the killed process had not run yet
            raise subprocess.TimeoutExpired(proc.args, timeout or 0)
        return wait(timeout)

    monkeypatch.setattr(proc, "wait", busy_first_wait)
    carrier.close()

    def reaped() -> int | None:
        deadline = time.monotonic() + 10
        while proc.returncode is None and time.monotonic() < deadline:
            time.sleep(0.01)  # another thread reaps it: only look
        return proc.returncode

    assert await anyio.to_thread.run_sync(reaped) == -signal.SIGKILL
    assert waits == [0.5, None]


@pytest.mark.parametrize("drops", [1, ssh_transport.OPENSSH_DROPS + 1])
async def test_a_dropped_openssh_login_is_tried_again(tmp_path: Path, drops: int,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An OpenSSH login dropped before it completed (sshd's MaxStartups, a blip) while the
    SFTP connection works sends that batch another way and leaves the OpenSSH client in use;
    only OPENSSH_DROPS drops in a row give it up for the process."""
    real_ssh = shutil.which("ssh")
    assert real_ssh is not None
    client_only_options()  # the real client's version, asked once per process
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    # An ssh whose first ``drops`` logins are dropped the way sshd drops them.
    (bin_dir / "ssh").write_text(
        "#!/bin/sh\n"
        f'echo x >> "{calls}"\n'
        f'if [ "$(wc -l < "{calls}")" -le {drops} ]; then\n'
        '  echo "kex_exchange_identification: Connection closed by remote host" >&2\n'
        "  exit 255\n"
        "fi\n"
        f'exec "{real_ssh}" "$@"\n')
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    async with sshd_transport(tmp_path) as (transport, replica):
        with capture_logs() as logs:
            for batch in range(drops + 1):
                source = write(tmp_path / "src" / f"{batch}.dat", os.urandom(1000))
                results = await transport.put(
                    [request_for(source, f"b/{batch}.dat".encode())], "1x1", Progress())
                assert [r.status for r in results] == [PutStatus.COPIED]
                assert (replica / "b" / f"{batch}.dat").read_bytes() == source.read_bytes()
        dropped = [e for e in logs if "login was dropped" in e["event"]]
        given_up = [e for e in logs if "did not start through openssh: using" in e["event"]]
        if drops <= ssh_transport.OPENSSH_DROPS:
            assert (len(dropped), given_up) == (drops, []), logs
            assert transport.transfer == "openssh"  # the last batch went through it
            assert len(calls.read_text().split()) == drops + 1
        else:
            assert (len(dropped), len(given_up)) == (ssh_transport.OPENSSH_DROPS, 1), logs
            assert transport.transfer == "sftp"
            assert len(calls.read_text().split()) == drops  # none once given up
    assert temp_files(replica) == []


@pytest.mark.parametrize("dest", [
    b"", b"/abs.dat", b"../up.dat", b"a/../../up.dat", b"a/./b.dat", b"./a.dat", b"a//b.dat",
    b"a/", b"..", b".", b"a/..", b"nul\0.dat"])
def test_the_receiver_refuses_paths_outside_its_root(dest: bytes) -> None:
    """The receiver checks every destination itself: a broken or hostile stream cannot make
    it write outside the root (the sender confines paths too)."""
    with pytest.raises(_receiver.Refused):
        _receiver.Receiver.split(dest, b".~rep-x-1.tmp")


@pytest.mark.parametrize(("dest", "parts"), [
    (b"a.dat", (b"", b"a.dat")), (b"d/e/.hidden", (b"d/e", b".hidden")),
    (b".cfg/x..y", (b".cfg", b"x..y")), (b"n/...", (b"n", b"..."))])
def test_the_receiver_takes_names_that_only_look_odd(dest: bytes,
                                                     parts: tuple[bytes, bytes]) -> None:
    assert _receiver.Receiver.split(dest, b".~rep-x-1.tmp") == parts
    for tmp in (b"x.tmp", b".~rep-x/1.tmp", b".~rep-\0.tmp"):
        with pytest.raises(_receiver.Refused):
            _receiver.Receiver.split(dest, tmp)


@pytest.mark.parametrize("carrier", CARRIERS)
async def test_the_receiver_ignores_the_hosts_python_environment(
        tmp_path: Path, carrier: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver needs the standard library only: a PYTHONPATH or site-packages on the
    host (here a sitecustomize that ends any interpreter importing it) cannot stop it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os\nos._exit(3)\n")
    monkeypatch.setenv("PYTHONPATH", str(site))  # the commands run with this environment
    logs = await _sync_through_a_shell(tmp_path, carrier)
    assert not [e for e in logs if "did not start" in e["event"]]


def test_the_receiver_starts_without_importing_typing() -> None:
    """The receiver's start is part of every login: it does not import typing (a third of
    the 30 ms it took to start); its annotations that name typing's types are strings."""
    from replicator.transports._ssh_options import RECEIVER_SOURCE

    load = ("import sys; exec(compile(sys.stdin.buffer.read(), 'receiver', 'exec'),"
            " {'__name__': 'receiver'}); print(sorted({'typing', 'json'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", load], input=RECEIVER_SOURCE,
                          capture_output=True, check=True, timeout=60)
    assert done.stdout.split() == [b"['json']"]
    import ast

    ast.parse(RECEIVER_SOURCE, feature_version=(3, 6))  # what the oldest hosts run


async def test_a_check_while_batches_hold_every_session_does_not_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once batches have streamed, a check (the engine probes after a failed file) takes an
    idle session or goes over SFTP: it never waits for a lane, which may take minutes."""
    logins = count_sftp_logins(monkeypatch)
    async with sshd_transport(tmp_path, lanes=2) as (transport, _replica):
        await transport.prepare()
        source = write(tmp_path / "src" / "a.dat", b"a")
        [result] = await transport.put([request_for(source, b"a.dat")], "1x1", Progress())
        assert result.status is PutStatus.COPIED
        held = []
        while (session := transport._idle_session()) is not None:
            held.append(session)
        assert len(held) == ssh_transport.SHORT_LINK_SESSIONS  # what prepare started
        try:
            with anyio.fail_after(10):
                await transport.probe()
                assert await transport.read_marker() is None
            assert len(logins) == 1  # over SFTP
        finally:
            for session in held:
                transport._keep(session)


@pytest.mark.parametrize("bulky", [False, True])
async def test_on_a_short_link_only_batches_of_large_files_start_a_second_session(
        tmp_path: Path, bulky: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a short link two batches of small files at once share one receiver session (the
    second waits for it: a login costs more CPU than the wait), while two batches with large
    files take a session each: their bytes go through two ssh processes at once."""
    from replicator.transports._ssh_files import SMALL_FILE

    started = count_session_starts(monkeypatch)
    size = SMALL_FILE + 1 if bulky else 100
    sources = [write(tmp_path / "src" / f"{i}.dat", os.urandom(size)) for i in range(4)]
    async with sshd_transport(tmp_path, lanes=2) as (transport, replica):
        await transport.prepare()
        assert len(started) == 1
        results: list[list[PutResult]] = []

        async def put(pair: list[Path]) -> None:
            results.append(await transport.put(
                [request_for(p, p.name.encode()) for p in pair], "1x1", Progress()))

        async with anyio.create_task_group() as tg:
            tg.start_soon(put, sources[:2])
            tg.start_soon(put, sources[2:])
        assert len(started) == (2 if bulky else 1)
        assert [r.status for batch in results for r in batch] == [PutStatus.COPIED] * 4
        for source in sources:
            assert (replica / source.name).read_bytes() == source.read_bytes()


async def test_a_batch_reads_its_first_files_while_it_waits_for_a_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch frames its first group while it waits for a session (the batch before
    holds it): it is sent as soon as the batch has one. Here a session is given to a batch
    only once its first group was framed: a batch that framed after it had a session
    would never get one. Its second group waits for the session: a batch waiting holds
    one group's bytes."""
    from replicator.transports import _ssh
    from replicator.transports._ssh_files import SMALL_GROUP_FILES
    from replicator.transports._ssh_files import _load_frames as frame

    framed = [anyio.Event(), anyio.Event()]
    calls: list[int] = []

    def framing(sources: list[Any], run_id: str) -> bytes:  # in a worker thread
        calls.append(len(sources))
        anyio.from_thread.run_sync(framed[min(len(calls), 2) - 1].set)
        return frame(sources, run_id)

    monkeypatch.setattr(_ssh, "_load_frames", framing)
    count = SMALL_GROUP_FILES + 3  # two groups
    sources = [write(tmp_path / "src" / f"{i}.dat", os.urandom(i % 7)) for i in range(count)]
    async with sshd_transport(tmp_path) as (transport, replica):
        session = transport._session

        async def after_framing(*args: Any, **kwargs: Any) -> Any:
            await framed[0].wait()
            with anyio.move_on_after(0.5):  # what a second group would take, many times
                await framed[1].wait()
            assert calls == [SMALL_GROUP_FILES]
            return await session(*args, **kwargs)

        monkeypatch.setattr(transport, "_session", after_framing)
        with anyio.fail_after(30):
            results = await transport.put(
                [request_for(p, p.name.encode()) for p in sources], "1x1", Progress())
        assert transport.transfer == "openssh"
        assert calls == [SMALL_GROUP_FILES, 3]
        assert [r.status for r in results] == [PutStatus.COPIED] * count
        for source in sources:
            assert (replica / source.name).read_bytes() == source.read_bytes()


async def test_a_root_that_is_a_symlink_takes_streamed_files(tmp_path: Path) -> None:
    """The replica root may be a symlink (the check follows it, as SFTP does): batches
    through the receiver land in the folder it points to."""
    async with sshd_transport(tmp_path) as (transport, _replica):
        real = tmp_path / "real"
        real.mkdir()
        link = tmp_path / "link"
        link.symlink_to(real)
        linked = SshTransport(transport.options, str(link), anyio.CapacityLimiter(2),
                              op_timeout=10, carriers=("openssh",))
        try:
            await linked.probe()
            source = write(tmp_path / "src" / "b.dat", b"bb")
            [result] = await linked.put([request_for(source, b"d/b.dat")], "1x1",
                                        Progress())
            assert result.status is PutStatus.COPIED
            assert linked.transfer == "openssh"
            assert (real / "d" / "b.dat").read_bytes() == b"bb"
        finally:
            await linked.aclose()


async def test_a_garbled_answer_to_the_check_falls_back_to_sftp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer to the check that is not what the receiver sends (a broken stream) drops
    the session; SFTP answers the check instead of an error escaping it."""
    async def garbled(self: StreamSession) -> bytes:
        return b"not json\n"

    monkeypatch.setattr(StreamSession, "_answer", garbled)
    async with sshd_transport(tmp_path) as (transport, _replica):
        await transport.probe()
        assert await transport.read_marker() is None
        assert transport._live == 0  # both sessions dropped
        assert transport._pool is not None  # SFTP answered


async def test_a_batch_is_sent_while_the_report_before_it_is_awaited(tmp_path: Path) -> None:
    """A session carries the next batch's files once the batch before asked for its sync;
    each report holds its own batch's files, read in the order asked, whoever asks first.
    A report given up (cancelled while it waits its turn) closes the session: no report
    can take another's line, and none waits for a turn that never comes.
    The receiver runs in a local shell, through the OpenSSH carrier's pipes."""
    from replicator.transports._ssh_options import receiver_command
    from replicator.transports._ssh_stream import whole_header

    root = tmp_path / "replica"
    root.mkdir()

    def batch(seqs: range) -> bytes:
        return b"".join(whole_header(seq, 0o644, 1_600_000_000_000_000_000 + seq,
                                     b"f%d" % seq, b".~rep-1-%d.tmp" % seq, seq) + b"x" * seq
                        for seq in seqs)

    carrier = await OpensshCarrier.open(["sh", "-c", receiver_command(os.fsencode(root))], 10)
    session = await StreamSession.start(carrier)
    try:
        await session.send(batch(range(1, 4)))
        first = await session.request_sync()
        await session.send(batch(range(4, 6)))
        second = await session.request_sync()
        assert session.pending == 2
        reports: dict[int, list[list[object]]] = {}

        async def report(ticket: int, progress: Progress | None = None) -> None:
            reports[ticket] = await session.report(ticket, progress or Progress())

        waiting = Progress()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(report, second, waiting)  # asks first, reads second
                await anyio.sleep(0.1)
                # Waiting for another batch's report is waiting for the session: no stall.
                assert waiting.idle_for() == 0.0
                tg.start_soon(report, first)
        assert sorted(int(str(entry[0])) for entry in reports[first]) == [1, 2, 3]
        assert sorted(int(str(entry[0])) for entry in reports[second]) == [4, 5]
        assert session.pending == 0
        assert sorted(p.name for p in root.iterdir()) == [f"f{i}" for i in range(1, 6)]

        await session.send(batch(range(6, 7)))
        third = await session.request_sync()
        await session.send(batch(range(7, 8)))
        fourth = await session.request_sync()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(report, fourth)  # waits for the third's turn ...
                await anyio.sleep(0.05)
                tg.cancel_scope.cancel()  # ... and gives up
        assert session.broken
        with anyio.fail_after(10), pytest.raises(StreamLost):
            await session.report(third, Progress())
    finally:
        session.close()


def test_the_receiver_takes_a_batch_of_more_than_1024_folders(tmp_path: Path) -> None:
    """A batch keeps its folders open until its renames: with more than 1,024 of them, the
    receiver's own descriptors are past what ``select`` takes, and it waits with ``poll``."""
    import json
    import resource

    from replicator.transports._ssh_stream import whole_header

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"at most {hard} open files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    root = tmp_path / "replica"
    root.mkdir()
    count = 1100
    frames = b"".join(whole_header(i, 0o644, 1_600_000_000_000_000_000,
                                   f"d{i}/f".encode(), f".~rep-1-{i}.tmp".encode(), 1) + b"x"
                      for i in range(count))
    try:
        with live_receiver(root) as (feed, replies):
            feed.write(frames + b"S")
            # The report comes while the receiver waits for input with a flush under way.
            got = replies.wait_for(3)
            assert len(got) == 3, got
            feed.write(b"Q")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert [entry[:2] for entry in json.loads(got[2])] == [[i, 0] for i in range(count)]
    assert len(list(root.glob("d*/f"))) == count


def test_the_receiver_enlarges_its_input_pipe(tmp_path: Path) -> None:
    """The receiver makes the pipe it reads (from sshd) 1 MiB: with 64 KiB, sshd and the
    receiver took turns a block at a time and small files over SSH ran 15% slower. It is
    started as a session starts it, through a shell, on a plain pipe of the default size."""
    import fcntl
    import subprocess

    from replicator.transports._ssh_options import RECEIVER_SOURCE, receiver_command
    from replicator.transports._ssh_stream import GREETING

    get_size = getattr(fcntl, "F_GETPIPE_SZ", 1032)
    read_end, write_end = os.pipe()
    default = fcntl.fcntl(write_end, get_size)  # 64 KiB with 4 KiB pages
    os.close(read_end)
    os.close(write_end)
    if default >= 1 << 20:
        pytest.skip(f"a new pipe holds {default} bytes here already")
    root = tmp_path / "replica"
    root.mkdir()
    proc = subprocess.Popen(["sh", "-c", receiver_command(os.fsencode(root))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        before = fcntl.fcntl(proc.stdin.fileno(), get_size)
        proc.stdin.write(RECEIVER_SOURCE)
        proc.stdin.flush()
        assert proc.stdout.readline() == GREETING  # main() has run
        # The pipe is one object with one size, whichever end asks.
        assert (before, fcntl.fcntl(proc.stdin.fileno(), get_size)) == (default, 1 << 20)
    finally:
        proc.stdin.close()  # end of input: the receiver exits
        assert proc.wait(10) == 0
        proc.stdout.close()
