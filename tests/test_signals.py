"""Signals to a running ``replicator sync``: SIGTERM drains, SIGKILL is recovered from."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import OLD, backdate, replica_path, temp_files, write

from replicator import load_config

_T = TypeVar("_T")

BIG = 200 << 20
CHUNK = 8 << 20
GRACE = 30.0


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPLICATOR_")}
    env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", NO_COLOR="1", TERM="dumb")
    return env


def cli(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replicator", *args], cwd=cwd, env=cli_env(),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )


@contextmanager
def background(cwd: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A CLI process in the background; killed (and reaped) if the test leaves early."""
    with (cwd / "bg.out").open("w") as out, (cwd / "bg.err").open("w") as err:
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


def wait_for(predicate: Callable[[], _T], timeout: float, what: str,
             interval: float = 0.005) -> _T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def write_config(tmp: Path, origin: Path, replica: Path, *, workers: int,
                 shutdown_grace: float = GRACE) -> None:
    path = tmp / "replicator.toml"
    path.write_text(
        '[inventory]\npath = "inventory.db"\n\n'
        f"[engine]\nretry_window = 1.0\nshutdown_grace = {shutdown_grace}\n\n"
        f'[origins.raw]\npath = {json.dumps(str(origin))}\nhost = "inst"\n'
        "settle_seconds = 0.5\n\n"
        f"[replicas.{json.dumps(str(replica))}]\n"
        f'name = "bk"\nworkers = {workers}\nbackoff_initial = 0.05\nbackoff_max = 0.2\n'
    )
    load_config(path)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_big(path: Path, size: int, mtime: float) -> str:
    """``size`` random bytes (no holes: every byte must really be copied); the sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for _ in range(size // CHUNK):
            chunk = os.urandom(CHUNK)
            digest.update(chunk)
            f.write(chunk)
    os.utime(path, (mtime, mtime))
    return digest.hexdigest()


def copy_in_flight(dest: Path) -> bool:
    """Whether a copy's temp file with data in it lies beside ``dest`` (not the probe's)."""
    try:
        names = os.listdir(dest.parent)
    except FileNotFoundError:
        return False
    for name in names:
        if name.startswith(".~rep-") and not name.startswith(".~rep-probe-"):
            try:
                if os.path.getsize(dest.parent / name) > 0:
                    return True
            except FileNotFoundError:
                pass
    return False


def regular_files(root: Path) -> dict[str, Path]:
    """Regular files below ``root`` by relative path (temp files included, the replica's
    identity marker not)."""
    found: dict[str, Path] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if name == ".replicator-replica" and Path(dirpath) == root:
                continue
            path = Path(dirpath, name)
            found[str(path.relative_to(root))] = path
    return found


def final_count(root: Path) -> int:
    return sum(1 for rel in regular_files(root) if not Path(rel).name.startswith(".~rep-"))


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    origin, replica = tmp_path / "origin", tmp_path / "replica"
    origin.mkdir()
    replica.mkdir()
    return origin, replica


def test_sigterm_lets_the_copy_in_flight_finish(dirs: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    origin, replica = dirs
    big = origin / "big" / "cube.fits"
    big_sha = write_big(big, BIG, OLD - 600)  # the oldest file: copied first
    small = {f"small/{i:03d}.dat": os.urandom(1000 + i) for i in range(200)}
    for rel, data in small.items():
        write(origin / rel, data)
    backdate(origin / "small")
    write_config(tmp_path, origin, replica, workers=2)
    big_dest = replica_path(replica, big)

    with background(tmp_path, "sync", "--once") as proc:
        wait_for(lambda: copy_in_flight(big_dest) or proc.poll() is not None, 60,
                 "the big file's temp file")
        assert proc.poll() is None, "the run ended before the big copy was seen in flight"
        assert not big_dest.exists()
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = proc.wait(timeout=GRACE + 15)
        took = time.monotonic() - sent
    err = (tmp_path / "bg.err").read_text()
    assert took < GRACE, f"took {took:.1f} s to stop"
    assert "SIGTERM" in err
    assert "Traceback" not in err
    # Stopped early with work left: 3; everything done after all: 0.
    assert code in (0, 3), err
    # Never a partial file under the final name: complete and identical, or absent.
    if big_dest.exists():
        assert big_dest.stat().st_size == BIG
        assert sha256(big_dest) == big_sha
    else:
        # Abandoned only when the grace ran out; a prompt exit must have finished it.
        assert took > GRACE - 2, "SIGTERM abandoned the copy in flight instead of draining"
    for rel, data in small.items():
        dest = replica_path(replica, origin / rel)
        assert not dest.exists() or dest.read_bytes() == data
    assert temp_files(replica) == []  # the drained transfer cleaned up after itself

    result = cli(tmp_path, "sync", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["failed"], summary["pending"]) == (0, 0)
    assert sha256(big_dest) == big_sha
    for rel, data in small.items():
        assert replica_path(replica, origin / rel).read_bytes() == data
    assert temp_files(replica) == []
    assert final_count(replica) == len(small) + 1


def test_second_sigterm_aborts_without_partial_files(dirs: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    origin, replica = dirs
    big = origin / "cube.fits"
    big_sha = write_big(big, BIG, OLD)
    write_config(tmp_path, origin, replica, workers=1)
    big_dest = replica_path(replica, big)

    with background(tmp_path, "sync") as proc:
        wait_for(lambda: copy_in_flight(big_dest) or proc.poll() is not None, 60,
                 "the big file's temp file")
        assert proc.poll() is None, "the run ended before the copy was seen in flight"
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "finishing transfers" in (tmp_path / "bg.err").read_text()
                 or proc.poll() is not None, 30, "the first SIGTERM to be handled")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=GRACE)
    err = (tmp_path / "bg.err").read_text()
    assert "Traceback" not in err
    if big_dest.exists():
        # The copy won the race against the second signal: either the run recorded it (0),
        # or the abandoned thread renamed its durable, checked copy just before the process
        # ended (3: the inventory still says pending). Never a partial file.
        assert code in (0, 3), err
        assert sha256(big_dest) == big_sha
    else:
        assert code == 3, err  # aborted: work remains, and no file has an error
        assert "aborted" in err

    result = cli(tmp_path, "sync")
    assert result.returncode == 0, result.stderr
    assert sha256(big_dest) == big_sha
    assert temp_files(replica) == []
    assert final_count(replica) == 1


def test_sigkill_mid_run_is_recovered(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    origin, replica = dirs
    content: dict[str, bytes] = {}
    for i in range(4000):
        rel = f"night{i % 30:02d}/frame_{i:05d}.dat"
        content[rel] = os.urandom(4096)
        write(origin / rel, content[rel])
    backdate(origin)
    # The big files are the newest: copied last, after most small files.
    big_sha = {f"cubes/cube{i}.fits": write_big(origin / f"cubes/cube{i}.fits", 20 << 20,
                                                 OLD + 60) for i in range(3)}
    write_config(tmp_path, origin, replica, workers=2)
    total = len(content) + len(big_sha)

    def mid_run() -> bool:
        # Preferably while a temp file exists, so that the next run has debris to clear.
        # Early: a run of these takes a few tenths of a second, and each look at the
        # replica a few hundredths on a busy machine.
        count = final_count(replica)
        return (count >= 100 and bool(temp_files(replica))) or count >= 500

    with background(tmp_path, "sync") as proc:
        wait_for(lambda: mid_run() or proc.poll() is not None, 60,
                 "the first files to be copied", interval=0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=20) == -signal.SIGKILL
    copied = final_count(replica)
    assert 0 < copied < total, "the kill should land mid-run"

    result = cli(tmp_path, "sync", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["failed"], summary["pending"]) == (0, 0)

    found = regular_files(replica)
    assert [rel for rel in found if ".~rep-" in rel] == []
    assert len(found) == total  # every file exactly once, no duplicates under other names
    expected = {str(replica_path(replica, origin / rel).relative_to(replica))
                for rel in [*content, *big_sha]}
    assert set(found) == expected
    for rel, data in content.items():
        assert replica_path(replica, origin / rel).read_bytes() == data, rel
    for rel, digest in big_sha.items():
        assert sha256(replica_path(replica, origin / rel)) == digest, rel
