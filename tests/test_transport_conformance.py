"""One conformance suite for every transport and data path: local folders; SSH over SFTP
(the in-process asyncssh server, SFTP-only, and OpenSSH sshd); SSH streams to the receiver
carried by the OpenSSH client and by an asyncssh channel (to sshd and to the in-process server).

Every backend keeps its replica in a local folder, so the suite checks results on disk.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from conftest import OLD, temp_files, write
from ssh_server import run_sshd, sftp_server

from replicator import ErrorClass, FileError, ReplicaUnavailableError
from replicator._accelerator import PURE_PYTHON_ENV
from replicator._inventory import Kind
from replicator.transports import (
    LocalTransport,
    Progress,
    PutRequest,
    PutResult,
    PutStatus,
    Transport,
)
from replicator.transports._ssh import SshTransport

pytestmark = pytest.mark.anyio

NON_UTF8 = b"caf\xe9 \xff.dat"
BIG = 5 << 20  # several chunks of every transport


@dataclass
class Target:
    transport: Transport
    root: Path  # the replica root on disk
    transfer: str = ""  # the SSH data path this target must use

    @property
    def precision(self) -> int:
        return self.transport.capabilities.mtime_precision_ns


# name: (server, transfer); servers: "sftp-only" and "commands" are the in-process asyncssh
# server without and with exec requests, "sshd" is OpenSSH.
SSH_TARGETS = {
    "asyncssh": ("sftp-only", "sftp"),
    "asyncssh+stream": ("commands", "asyncssh"),
    "asyncssh+openssh-client": ("commands", "openssh"),
    "openssh": ("sshd", "openssh"),
    "openssh+stream": ("sshd", "asyncssh"),
    "openssh+sftp": ("sshd", "sftp"),
}


# "local" and "local-threads" copy small files through the C accelerator, "local-python"
# through the Python path that it mirrors.
@pytest.fixture(params=["local", "local-threads", "local-python", *SSH_TARGETS])
async def target(request: pytest.FixtureRequest, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Target]:
    limiter = anyio.CapacityLimiter(4)
    transport: Transport
    if request.param.startswith("local"):
        root = tmp_path / "replica"
        root.mkdir()
        if request.param == "local-python":
            monkeypatch.setenv(PURE_PYTHON_ENV, "1")  # before the helper starts
        helper = request.param != "local-threads"
        transport = LocalTransport(str(root), limiter, helper=helper, helper_min_files=1)
        yield Target(transport, root, "helper" if helper else "threads")
        await transport.aclose()
        return
    server_kind, transfer = SSH_TARGETS[request.param]
    carriers = () if transfer == "sftp" else (transfer,)
    if server_kind == "sshd":
        with run_sshd(tmp_path / "sshd") as sshd:
            root = tmp_path / "replica"
            root.mkdir()
            transport = SshTransport(sshd.options(), str(root), limiter, op_timeout=10,
                                     carriers=carriers)
            yield Target(transport, root, transfer)
            await transport.aclose()
        return
    commands = server_kind == "commands"
    async with sftp_server(tmp_path / "server", commands=commands) as server:
        root = server.root / "replica"
        root.mkdir()
        # Commands run in the server's root, its "home": the replica path is relative.
        transport = SshTransport(server.options(), "replica" if commands else "/replica",
                                 limiter, op_timeout=10, carriers=carriers)
        yield Target(transport, root, transfer)
        await transport.aclose()


def request_for(path: Path, dest: bytes) -> PutRequest:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return PutRequest(os.fsencode(path), dest, Kind.SYMLINK, st.st_size, st.st_mtime_ns,
                          stat.S_IMODE(st.st_mode), os.readlink(os.fsencode(path)))
    return PutRequest(os.fsencode(path), dest, Kind.FILE, st.st_size, st.st_mtime_ns,
                      stat.S_IMODE(st.st_mode))


async def put(target: Target, requests: list[PutRequest], run_id: str = "1x1"
              ) -> list[PutResult]:
    progress = Progress()
    results = await target.transport.put(requests, run_id, progress)
    assert progress.results == results
    assert len(results) == len(requests)
    if isinstance(target.transport, SshTransport | LocalTransport):
        # The data path under test was used: no silent fallback to another one.
        assert target.transport.transfer == target.transfer
    return results


def on_disk(target: Target, dest: bytes) -> Path:
    return Path(os.fsdecode(os.path.join(os.fsencode(target.root), dest)))


async def test_put_files_of_every_kind(target: Target, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = {
        b"a/small.txt": write(src / "small.txt", b"hello\n", mtime=OLD + 0.123456789),
        b"a/empty": write(src / "empty", b""),
        b"a/b/c/big.bin": write(src / "big.bin", os.urandom(BIG) + b"tail"),
        b"odd/" + NON_UTF8: src / os.fsdecode(NON_UTF8),
    }
    files[b"odd/" + NON_UTF8].write_bytes(b"bytes in a non-UTF-8 name")
    os.utime(files[b"odd/" + NON_UTF8], (OLD, OLD))
    os.chmod(files[b"a/small.txt"], 0o640)
    os.chmod(files[b"a/empty"], 0o600)
    os.symlink("small.txt", src / "link")
    requests = [request_for(p, dest) for dest, p in files.items()]
    requests.append(request_for(src / "link", b"a/link"))

    results = await put(target, requests)

    assert [r.status for r in results] == [PutStatus.COPIED] * len(requests)
    for result, request in zip(results, requests, strict=True):
        # The inventory records the source's exact version, whatever the transport's precision.
        assert (result.size, result.mtime_ns) == (request.size, request.mtime_ns)
    for dest, path in files.items():
        copy = on_disk(target, dest)
        assert copy.read_bytes() == path.read_bytes()
        src_st, dst_st = path.stat(), copy.stat()
        assert stat.S_IMODE(dst_st.st_mode) == stat.S_IMODE(src_st.st_mode)
        assert dst_st.st_mtime_ns // target.precision == src_st.st_mtime_ns // target.precision
    assert os.readlink(on_disk(target, b"a/link")) == "small.txt"
    assert temp_files(target.root) == []


async def test_stat_listdir_remove(target: Target, tmp_path: Path) -> None:
    source = write(tmp_path / "f.txt", b"12345")
    os.chmod(source, 0o644)
    await put(target, [request_for(source, b"d/f.txt")])
    t = target.transport

    st = await t.stat(b"d/f.txt")
    assert st is not None
    assert (st.size, st.mode, st.is_dir, st.is_symlink) == (5, 0o644, False, False)
    assert st.mtime_ns // target.precision == source.stat().st_mtime_ns // target.precision
    folder = await t.stat(b"d")
    assert folder is not None
    assert folder.is_dir
    assert await t.stat(b"d/missing") is None
    assert await t.stat(b"nope/missing") is None
    assert sorted(await t.listdir(b"")) == [b"d"]
    assert await t.listdir(b"d") == [b"f.txt"]

    await t.remove(b"d/f.txt")
    await t.remove(b"d/f.txt")  # absent is fine
    assert not on_disk(target, b"d/f.txt").exists()
    assert await t.listdir(b"d") == []


async def test_replacing_a_file_never_shows_a_partial_one(target: Target, tmp_path: Path
                                                          ) -> None:
    old = os.urandom(BIG)
    new = os.urandom(BIG)
    dest = on_disk(target, b"x/data.bin")
    write(dest, old)
    source = write(tmp_path / "data.bin", new)
    seen: set[bytes] = set()
    done = anyio.Event()

    async def watch() -> None:
        while not done.is_set():
            seen.add(await anyio.Path(dest).read_bytes())
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        results = await put(target, [request_for(source, b"x/data.bin")])
        done.set()
    assert results[0].status is PutStatus.COPIED
    assert seen <= {old, new}
    assert dest.read_bytes() == new


async def test_changed_source_is_reported_not_copied(target: Target, tmp_path: Path) -> None:
    source = write(tmp_path / "grows.dat", b"first version")
    request = request_for(source, b"g/grows.dat")
    write(source, b"second, longer version")
    results = await put(target, [request])
    assert results[0].status is PutStatus.CHANGED
    assert not on_disk(target, b"g/grows.dat").exists()
    assert temp_files(target.root) == []


async def test_vanished_source(target: Target, tmp_path: Path) -> None:
    source = write(tmp_path / "gone.dat", b"x")
    request = request_for(source, b"gone.dat")
    source.unlink()
    assert (await put(target, [request]))[0].status is PutStatus.VANISHED


@pytest.mark.parametrize("dest", [b"../escape.txt", b"a/../../escape.txt", b"/abs/escape.txt",
                                  b"a/nul\0.txt"])
async def test_paths_that_leave_the_root_are_refused(target: Target, tmp_path: Path,
                                                     dest: bytes) -> None:
    source = write(tmp_path / "src" / "f.txt", b"payload")
    results = await put(target, [request_for(source, dest)])
    assert results[0].status is PutStatus.ERROR
    assert results[0].error is not None
    assert results[0].error.error_class is ErrorClass.PERMANENT
    assert not (target.root.parent / "escape.txt").exists()
    with pytest.raises(FileError):
        await target.transport.remove(dest)


async def test_symlinked_folder_inside_the_replica_is_not_followed(target: Target,
                                                                   tmp_path: Path) -> None:
    outside = target.root.parent / "outside"
    outside.mkdir()
    os.symlink(outside, target.root / "evil")
    source = write(tmp_path / "f.txt", b"payload")
    results = await put(target, [request_for(source, b"evil/f.txt"),
                                 request_for(source, b"evil/sub/f.txt"),
                                 request_for(source, b"fine/f.txt")])
    assert [r.status for r in results] == [PutStatus.ERROR, PutStatus.ERROR, PutStatus.COPIED]
    for result in results[:2]:
        assert result.error is not None
        assert result.error.error_class is ErrorClass.PERMANENT
    assert list(outside.iterdir()) == []


async def test_destination_blocked_by_a_folder(target: Target, tmp_path: Path) -> None:
    (target.root / "d" / "f.txt").mkdir(parents=True)
    (target.root / "plain").write_bytes(b"a file where a folder should be")
    source = write(tmp_path / "f.txt", b"payload")
    results = await put(target, [request_for(source, b"d/f.txt"),
                                 request_for(source, b"plain/f.txt")])
    assert [r.status for r in results] == [PutStatus.ERROR, PutStatus.ERROR]
    for result in results:
        assert result.error is not None
        assert result.error.error_class is ErrorClass.PERMANENT
        assert "blocked" in str(result.error)
    assert temp_files(target.root) == []


async def test_stale_temps_of_other_runs_are_removed(target: Target) -> None:
    folder = target.root / "n"
    folder.mkdir()
    (folder / ".~rep-dead1x2-abcdef.tmp").write_bytes(b"partial")
    (folder / ".~rep-cur-123456.tmp").write_bytes(b"ours, in flight")
    (folder / "keep.dat").write_bytes(b"data")
    assert await target.transport.remove_stale_temps([b"n", b"missing"], "cur") == 1
    assert sorted(p.name for p in folder.iterdir()) == [".~rep-cur-123456.tmp", "keep.dat"]


async def test_probe(target: Target) -> None:
    await target.transport.probe()
    assert list(target.root.iterdir()) == []
    aside = target.root.with_name("aside")
    target.root.rename(aside)
    with pytest.raises(ReplicaUnavailableError, match="does not exist"):
        await target.transport.probe()
    target.root.write_bytes(b"a file where the root should be")
    with pytest.raises(ReplicaUnavailableError, match="is not a folder"):
        await target.transport.probe()
    target.root.unlink()
    aside.rename(target.root)
    await target.transport.probe()
    assert list(target.root.iterdir()) == []
