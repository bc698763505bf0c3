"""The C accelerator of local batches gives the results of the Python path it mirrors."""

from __future__ import annotations

import errno
import marshal
import os
import tempfile
import time
from pathlib import Path

import pytest
from conftest import OLD, write

from replicator._accelerator import PURE_PYTHON_ENV
from replicator._inventory import Kind
from replicator.transports import Progress, PutRequest, PutResult, PutStatus, _local_batch
from replicator.transports._local_batch import BatchWriter
from replicator.transports._ssh_files import _load, _Source


def test_accelerator_is_built() -> None:
    # `pip install` builds it wherever a C compiler exists (it does on every machine this
    # project is developed and tested on); without one the package falls back silently,
    # and this import fails.
    from replicator import _fastcopy

    assert _fastcopy.stage([], False) == []


def request_for(path: Path, dest: bytes, size: int | None = None) -> PutRequest:
    st = os.lstat(path)
    return PutRequest(os.fsencode(path), dest, Kind.FILE,
                      st.st_size if size is None else size, st.st_mtime_ns, 0o644)


def tricky_batch(src: Path, root: Path) -> list[PutRequest]:
    """A batch with one of each outcome a small regular file can have."""
    ok = [write(src / f"ok{i}.dat", bytes([i]) * (100 * i), mtime=OLD + i) for i in range(5)]
    os.chmod(ok[1], 0o6755)  # set-id bits are never copied
    requests = [request_for(p, b"out/" + p.name.encode()) for p in ok]
    gone = write(src / "gone.dat", b"x")
    requests.append(request_for(gone, b"out/gone.dat"))
    gone.unlink()
    grown = write(src / "grown.dat", b"short")
    requests.append(request_for(grown, b"out/grown.dat", size=3))
    link = src / "link.dat"
    link.symlink_to("ok0.dat")  # a symlink where the scan saw a file
    requests.append(PutRequest(os.fsencode(link), b"out/link.dat", Kind.FILE, 1,
                               int(OLD * 1e9), 0o644))
    blocked = write(src / "blocked.dat", b"b")
    (root / "out" / "blocked.dat").mkdir(parents=True)
    (root / "out" / "blocked.dat" / "x").write_bytes(b"")
    requests.append(request_for(blocked, b"out/blocked.dat"))
    file_in_way = write(src / "deep.dat", b"d")
    (root / "notadir").write_bytes(b"")
    requests.append(request_for(file_in_way, b"notadir/deep.dat"))
    requests.append(request_for(write(src / "empty.dat", b""), b"out/empty.dat"))
    return requests


def run_batch(root: Path, requests: list[PutRequest]) -> list[PutResult]:
    results: list[PutResult] = []
    BatchWriter(os.fsencode(root), True).put_batch(requests, "7x7", Progress(), results)
    return results


def summary(results: list[PutResult]) -> list[tuple[bytes, str, int, int, str | None]]:
    return sorted((r.request.dest, r.status.value, r.size, r.mtime_ns,
                   None if r.error is None else f"{r.error} [{r.error.error_class}]")
                  for r in results)


def test_same_results_as_the_python_path(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    by_path = {}
    for name, pure in (("c", ""), ("python", "1")):
        monkeypatch.setenv(PURE_PYTHON_ENV, pure)
        root = tmp_path / name / "replica"
        root.mkdir(parents=True)
        requests = tricky_batch(tmp_path / name / "src", root)
        results = run_batch(root, requests)
        assert len(results) == len(requests)
        # The copies: every regular file but the test's own obstacles.
        by_path[name] = summary(results), sorted(
            (str(p.relative_to(root)), p.stat().st_mode, p.stat().st_mtime_ns, p.read_bytes())
            for p in root.rglob("*")
            if p.is_file() and p.name != "notadir" and "blocked.dat" not in str(p))
    c, python = by_path["c"], by_path["python"]
    # Paths differ between the two runs (src folders): compare what is inside the replicas
    # and the results' statuses and messages with the folder names taken out.
    assert c[1] == python[1]
    assert [row[:4] for row in c[0]] == [row[:4] for row in python[0]]
    assert [(row[4] or "").replace("/c/", "/X/") for row in c[0]] == \
        [(row[4] or "").replace("/python/", "/X/") for row in python[0]]
    statuses = {row[0]: row[1] for row in c[0]}
    assert statuses == {
        **{f"out/ok{i}.dat".encode(): "copied" for i in range(5)},
        b"out/gone.dat": "vanished", b"out/grown.dat": "changed", b"out/link.dat": "changed",
        b"out/blocked.dat": "error", b"notadir/deep.dat": "error", b"out/empty.dat": "copied",
    }
    assert oct(os.stat(tmp_path / "c" / "replica" / "out" / "ok1.dat").st_mode & 0o7777) \
        == "0o755"


@pytest.mark.parametrize("pure", ["", "1"])
def test_copies_get_their_sources_mode_whatever_the_umask(
        tmp_path: Path, pure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator creates a temp file with its final mode where the umask leaves that
    mode whole (no chmod), else chmods it, as the Python path always does: a copy has its
    source's permission bits but set-user-ID and set-group-ID, under any umask, also one
    changed between two batches of one process."""
    monkeypatch.setenv(PURE_PYTHON_ENV, pure)
    modes = [0o644, 0o664, 0o600, 0o755, 0o444, 0o000, 0o1777, 0o6755, 0o777]
    src = tmp_path / "src"
    for umask in (0o022, 0o077, 0o000, 0o002):
        root = tmp_path / f"replica-{umask:o}"
        root.mkdir()
        requests = []
        for mode in modes:
            path = write(src / f"{umask:o}-{mode:o}.dat", b"m" * 10)
            os.chmod(path, mode)
            requests.append(request_for(path, path.name.encode()))
        old = os.umask(umask)
        try:
            results = run_batch(root, requests)
        finally:
            os.umask(old)
        assert [r.status for r in results] == [PutStatus.COPIED] * len(modes)
        assert [oct((root / r.request.dest.decode()).stat().st_mode & 0o7777)
                for r in results] == [oct(m & 0o1777) for m in modes]


def test_copies_between_filesystems(tmp_path: Path) -> None:
    """Sources on one filesystem (tmpfs), the replica on another: copy_file_range cannot
    copy between them, so the accelerator reads and writes (and, after the first file of a
    call, no longer tries it). Every file of several calls arrives whole."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        src = Path(shm)
        root = tmp_path / "replica"
        root.mkdir()
        assert os.stat(src).st_dev != os.stat(root).st_dev
        files = [write(src / f"f{i:03}.dat", os.urandom(i * 97), mtime=OLD + i)
                 for i in range(150)]  # three calls of the accelerator (FAST_GROUP files)
        results = run_batch(root, [request_for(p, b"out/" + p.name.encode()) for p in files])
        assert [r.status for r in results] == [PutStatus.COPIED] * len(files)
        for path in files:
            copy = root / "out" / path.name
            assert copy.read_bytes() == path.read_bytes()
            assert copy.stat().st_mtime_ns == path.stat().st_mtime_ns


def test_source_changed_between_copy_and_rename_is_not_renamed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit compares the source with the version read: a change in between (here,
    during the flush) leaves the destination alone."""
    root = tmp_path / "replica"
    root.mkdir()
    paths = [write(tmp_path / "src" / f"f{i}", b"old", mtime=OLD) for i in range(3)]
    requests = [request_for(p, p.name.encode()) for p in paths]
    flush = _local_batch.flush_folders

    def flush_then_touch(*args: object, **kwargs: object) -> object:
        if not (tmp_path / "touched").exists():
            (tmp_path / "touched").write_bytes(b"")
            os.utime(paths[1], (time.time(), time.time()))
            paths[2].unlink()
        return flush(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_local_batch, "flush_folders", flush_then_touch)
    results = {r.request.dest: r.status for r in run_batch(root, requests)}
    assert results == {b"f0": PutStatus.COPIED, b"f1": PutStatus.CHANGED,
                       b"f2": PutStatus.VANISHED}
    assert sorted(p.name for p in root.iterdir()) == ["f0"]  # no temp file left either


def test_ssh_sources_read_the_same_as_the_python_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SSH sender's small files, read whole by the accelerator or by Python."""
    src = tmp_path / "src"
    ok = [write(src / f"ok{i}.dat", bytes([i]) * (1000 * i), mtime=OLD + i) for i in range(4)]
    requests = [request_for(p, p.name.encode()) for p in ok]
    gone = write(src / "gone.dat", b"x")
    requests.append(request_for(gone, b"gone.dat"))
    gone.unlink()
    requests.append(request_for(write(src / "grown.dat", b"longer"), b"grown.dat", size=2))
    (src / "link.dat").symlink_to("ok1.dat")
    requests.append(PutRequest(os.fsencode(src / "link.dat"), b"link.dat", Kind.FILE, 1000,
                               int(OLD * 1e9) + 10**9, 0o644))
    big = write(src / "big.dat", b"b" * ((1 << 20) + 1))  # streamed later: opened, not read
    requests.append(request_for(big, b"big.dat"))

    def load(pure: str) -> list[tuple[object, ...]]:
        monkeypatch.setenv(PURE_PYTHON_ENV, pure)
        sources = [_Source(i, r) for i, r in enumerate(requests)]
        _load(sources)
        try:
            return [(s.result.status if s.result else None,
                     str(s.result.error) if s and s.result and s.result.error else None,
                     s.data, s.fd >= 0,
                     None if s.before is None or s.result else
                     (s.before.st_ino, s.before.st_size, s.before.st_mode,
                      s.before.st_mtime_ns)) for s in sources]
        finally:
            for s in sources:
                s.close()

    atimes = [os.stat(p).st_atime_ns for p in ok]  # as fstat sees them before the read
    monkeypatch.setenv(PURE_PYTHON_ENV, "")
    first = [_Source(i, r) for i, r in enumerate(requests[:4])]
    _load(first)
    assert [s.before.st_atime_ns if s.before else None for s in first] == atimes
    c, python = load(""), load("1")
    assert c == python
    assert [row[0] for row in c] == [None] * 4 + [PutStatus.VANISHED, PutStatus.CHANGED,
                                                  PutStatus.CHANGED, None]
    assert c[2][2] == bytes([2]) * 2000
    assert c[-1][3]  # the large file's descriptor is open for streaming


def test_ssh_frames_are_the_python_paths(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The SSH sender's frames of a group, built by ``read_frames`` in one buffer or by the
    Python path file by file: the same bytes for the receiver, the same outcomes."""
    from itertools import count

    from replicator import _fastcopy
    from replicator.transports import _ssh_files

    src = tmp_path / "src"
    ok = [write(src / f"ok{i}.dat", bytes([i]) * (1000 * i), mtime=OLD + i) for i in range(4)]
    os.chmod(ok[1], 0o6755)  # no set-id bits in the frame's mode
    requests = [request_for(p, b"d/" + p.name.encode()) for p in ok]
    (src / "link").symlink_to("ok1.dat")  # a symlink copied as one: its frame after
    st = os.lstat(src / "link")
    requests.append(PutRequest(os.fsencode(src / "link"), b"d/link", Kind.SYMLINK, st.st_size,
                               st.st_mtime_ns, 0o777, b"ok1.dat"))
    gone = write(src / "gone.dat", b"x")
    requests.append(request_for(gone, b"d/gone.dat"))
    gone.unlink()
    requests.append(request_for(write(src / "grown.dat", b"longer"), b"d/grown.dat", size=2))
    (src / "swapped.dat").symlink_to("ok2.dat")  # a symlink where the scan saw a file
    requests.append(PutRequest(os.fsencode(src / "swapped.dat"), b"d/swapped.dat", Kind.FILE,
                               2000, int(OLD * 1e9), 0o644))
    requests.append(request_for(write(src / "empty.dat", b""), b"d/./empty.dat"))
    requests.append(request_for(write(src / "out.dat", b"o"), b"../out.dat"))  # refused
    big = write(src / "big.dat", b"b" * ((1 << 20) + 1))  # streamed later: opened, not framed
    requests.append(request_for(big, b"d/big.dat"))

    def frames(pure: str) -> tuple[bytes, list[tuple[object, ...]]]:
        monkeypatch.setenv(PURE_PYTHON_ENV, pure)
        names = count()  # the same temp names in both runs
        monkeypatch.setattr(_ssh_files, "temp_name", lambda run_id: b"t%d" % next(names))
        sources = [_Source(i, r) for i, r in enumerate(requests)]
        try:
            data = _ssh_files._load_frames(sources, "7x7")
            return data, [(s.result.status if s.result else None,
                           str(s.result.error) if s.result and s.result.error else None,
                           s.fd >= 0, None if s.before is None or s.result else
                           (s.before.st_ino, s.before.st_size, s.before.st_mode,
                            s.before.st_mtime_ns)) for s in sources]
        finally:
            for s in sources:
                s.close()

    (c_frames, c), (py_frames, python) = frames(""), frames("1")
    assert c == python
    assert [row[0] for row in c] == [None] * 5 + [
        PutStatus.VANISHED, PutStatus.CHANGED, PutStatus.CHANGED, None, PutStatus.ERROR, None]
    assert c[-1][2]  # the large file's descriptor is open for streaming
    # The same frames but for their temp names, which are taken in another order: the C
    # path frames the small files first (the receiver takes frames in any order).
    assert len(c_frames) == len(py_frames)
    fast, slow = _split_frames(c_frames), _split_frames(py_frames)
    assert sorted(fast) == sorted(slow)
    assert [f[:2] for f in fast] == [(b"W", f"d/ok{i}.dat".encode()) for i in range(4)] + [
        (b"W", b"d/empty.dat"), (b"L", b"d/link")]
    assert fast[1][2][5:9] == (0o755).to_bytes(4, "big")  # the mode, without set-id bits
    assert fast[2][3] == bytes([2]) * 2000
    # Bad input raises before anything is read.
    with pytest.raises(ValueError, match="null byte"):
        _fastcopy.read_frames([(b"a\0b", 1, 1, 0, b"d", b"t")])
    with pytest.raises(OverflowError):
        _fastcopy.read_frames([(b"a", 1, 1, 1 << 32, b"d", b"t")])


def _split_frames(data: bytes) -> list[tuple[bytes, bytes, bytes, bytes]]:
    """(kind, dest, header, what follows the temp name) of each W or L frame in ``data``."""
    import struct

    whole, link = struct.Struct("!cIIqHHI"), struct.Struct("!cIqHHH")
    out: list[tuple[bytes, bytes, bytes, bytes]] = []
    pos = 0
    while pos < len(data):
        kind = data[pos:pos + 1]
        if kind == b"W":
            *_, dlen, tlen, n = whole.unpack_from(data, pos)
            size = whole.size
        else:
            assert kind == b"L"
            *_, dlen, tlen, n = link.unpack_from(data, pos)
            size = link.size
        start = pos + size
        out.append((kind, data[start:start + dlen], data[pos:start],
                    data[start + dlen + tlen:start + dlen + tlen + n]))
        pos = start + dlen + tlen + n
    return out


def test_lstat_names_gives_what_os_lstat_gives(tmp_path: Path) -> None:
    """A scan's listing through the accelerator: each entry's mode, size and mtime, or the
    errno, as the os.lstat loop (``_walk.lstat_each``) makes them."""
    from replicator import _fastcopy, _walk

    write(tmp_path / "file.dat", b"12345", mtime=OLD + 0.123456789)
    (tmp_path / "folder").mkdir()
    (tmp_path / "link").symlink_to("file.dat")
    (tmp_path / "dangling").symlink_to("nowhere")
    os.mkfifo(tmp_path / "fifo")
    write(tmp_path / "folder" / "inside.dat", b"")
    names = [b"file.dat", b"folder", b"link", b"dangling", b"fifo", b"missing",
             b"x" * 300, b"folder/inside.dat", b"file.dat/below"]
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fast = _fastcopy.lstat_names(fd, names)
        assert fast == _walk.lstat_each(fd, names)
        with pytest.raises(TypeError):
            _fastcopy.lstat_names(fd, [b"nul\0name"])
    finally:
        os.close(fd)
    st = os.lstat(tmp_path / "file.dat")
    assert fast[0] == (0, st.st_mode, 5, st.st_mtime_ns)
    assert [row[0] for row in fast[5:]] == [errno.ENOENT, errno.ENAMETOOLONG, 0,
                                            errno.ENOTDIR]


def test_a_scan_helper_loads_the_accelerator(tmp_path: Path) -> None:
    """A scan's helper process runs ``_walk.py`` as a script, outside the package: it loads
    the accelerator from the path in its rules, and lists as the scan's thread does."""
    import subprocess
    import sys

    from replicator import _fastcopy, _walk

    for i in range(5):
        write(tmp_path / "d" / f"f{i}.dat", b"x" * i)
    (tmp_path / "d" / "sub").mkdir()
    config = (os.fsencode(tmp_path), time.time_ns(), None, None, _fastcopy.__file__)
    source = Path(_walk.__file__).read_text("utf-8")
    probe = ("\nprint(_lstat_names_at(sys.argv[1]).__name__,"
             " type(_lstat_names_at(sys.argv[1])).__name__)")
    found = subprocess.run([sys.executable, "-I", "-S", "-c", source + probe,
                            _fastcopy.__file__], input=b"", capture_output=True, check=True)
    assert found.stdout.split() == [b"lstat_names", b"builtin_function_or_method"]
    bogus = write(tmp_path / "not-a-module.so", b"text")  # a stale or foreign build
    found = subprocess.run([sys.executable, "-I", "-S", "-c", source + probe, str(bogus)],
                           input=b"", capture_output=True, check=True)
    assert found.stdout.split() == [b"lstat_each", b"function"]
    task: list[tuple[bytes, bytes | None]] = [(os.fsencode(tmp_path / "d"), None)]
    helper = subprocess.run([sys.executable, "-I", "-S", "-c", source],
                            input=_walk.frame(config) + _walk.frame(task),
                            capture_output=True, check=True)
    assert marshal.loads(helper.stdout[4:]) == _walk.list_folders(task, _walk.Rules(*config))
    assert _walk.Rules(*config[:4]).lstat_names is _walk.lstat_each
