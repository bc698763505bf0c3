"""Run a tool the way a user does and time it until its copy is on disk; compare trees."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# The process of the tool run in progress, so that cleanup (Ctrl-C, SIGTERM) can kill it.
_running: set[int] = set()
GNU_TIME = "/usr/bin/time"


@dataclass
class RunResult:
    argv: list[str]
    returncode: int | None  # None: killed at the time limit
    seconds: float  # tool + sync: until the copy is on disk
    tool_seconds: float
    sync_seconds: float
    rss_kib: int  # peak RSS of the largest process of the tool's process tree
    rss_source: str  # "gnu-time" or "wait4" (see run_tool)
    log: Path

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_running() -> None:
    """Kill the tool run in progress, if any (its whole process group)."""
    for pid in list(_running):
        _kill_group(pid)


def run_sync() -> float:
    started = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - started


def run_tool(argv: Sequence[str], log: Path, timeout: float,
             env: dict[str, str] | None = None) -> RunResult:
    """Run ``argv`` (its own session, output to ``log``), then ``sync``; time both.

    Peak RSS is ``ru_maxrss`` of a wait4: on Linux it covers the process and every
    descendant it waited for (the ``ssh`` rsync starts, rsync's receiver), so it is the peak
    of the largest process of the tool. The tool is started by GNU time (``-f %M``) when
    installed: a child forked from this harness would count the harness's own memory
    (Linux keeps the maximum across fork and exec), a child of the small ``time`` does not.
    Without GNU time the wait4 figure is reported: an upper bound.
    """
    rss_file = log.with_suffix(".rss")
    use_time = os.access(GNU_TIME, os.X_OK)
    command = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *argv] if use_time else list(argv)
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
        _running.add(proc.pid)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _kill_group(proc.pid)

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            _kill_group(proc.pid)
            try:
                os.waitpid(proc.pid, 0)
            except ChildProcessError:
                pass
            proc.returncode = -9
            raise
        finally:
            timer.cancel()
            _running.discard(proc.pid)
        tool_seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait
    _kill_group(proc.pid)  # stray grandchildren of a finished tool, if any
    sync_seconds = run_sync()
    rss, source = usage.ru_maxrss, "wait4"
    if use_time:
        try:
            rss, source = int(rss_file.read_text().split()[-1]), "gnu-time"
        except (OSError, ValueError, IndexError):
            pass  # killed before time wrote it: keep the wait4 upper bound
    return RunResult(list(argv), None if expired.is_set() else proc.returncode,
                     tool_seconds + sync_seconds, tool_seconds, sync_seconds, rss, source, log)


# --- tree comparison ------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    kind: str  # "file", "dir", "link", "other"
    size: int
    mtime_ns: int
    mode: int
    target: bytes = b""


def _walk(root: bytes, rel: bytes = b"") -> Iterator[tuple[bytes, Node]]:
    with os.scandir(os.path.join(root, rel) if rel else root) as entries:
        items = list(entries)
    for item in items:
        path = os.path.join(rel, item.name) if rel else item.name
        st = item.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            yield path, Node("dir", 0, 0, 0)
            yield from _walk(root, path)
        elif stat.S_ISREG(st.st_mode):
            yield path, Node("file", st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
        elif stat.S_ISLNK(st.st_mode):
            yield path, Node("link", 0, 0, 0, os.readlink(item.path))
        else:
            yield path, Node("other", 0, 0, 0)


def snapshot(root: Path) -> dict[bytes, Node]:
    """Every entry below ``root`` (folder metadata is not compared: replicator does not
    preserve folder mtimes, and neither tool is asked to)."""
    return dict(_walk(os.fsencode(root)))


def _same_content(a: bytes, b: bytes, size: int) -> bool:
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        if size <= 1 << 20:
            return fa.read(size + 1) == fb.read(size + 1)
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def compare_trees(src: Path, dst: Path, content_every: int = 1,
                  expected: dict[bytes, Node] | None = None) -> tuple[list[str], int]:
    """Problems found comparing ``dst`` with ``src`` (empty: equal) and files content-compared.

    Names, kinds, sizes, mtimes (to the nanosecond) and modes of every entry; the content of
    every ``content_every``-th file (byte by byte). ``expected`` is ``snapshot(src)`` when the
    caller has it already.
    """
    want = expected if expected is not None else snapshot(src)
    have = snapshot(dst)
    have.pop(b".replicator-replica", None)  # replicator's identity marker in a replica root
    problems: list[str] = []
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    for path in missing[:5]:
        problems.append(f"missing in destination: {os.fsdecode(path)}")
    for path in extra[:5]:
        problems.append(f"not in source: {os.fsdecode(path)}")
    if len(missing) > 5 or len(extra) > 5:
        problems.append(f"{len(missing)} missing, {len(extra)} extra in all")
    differ = 0
    compared = 0
    src_b, dst_b = os.fsencode(src), os.fsencode(dst)
    for index, path in enumerate(sorted(set(want) & set(have))):
        a, b = want[path], have[path]
        if a != b:
            differ += 1
            if differ <= 5:
                problems.append(f"{os.fsdecode(path)}: source {a}, destination {b}")
            continue
        if a.kind == "file" and index % content_every == 0:
            compared += 1
            if not _same_content(os.path.join(src_b, path), os.path.join(dst_b, path), a.size):
                differ += 1
                if differ <= 5:
                    problems.append(f"{os.fsdecode(path)}: content differs")
    if differ > 5:
        problems.append(f"{differ} entries differ in all")
    return problems, compared
