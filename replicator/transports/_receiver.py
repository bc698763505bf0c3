"""The remote end of the SSH stream data path: run on the replica's host with its own python3.

``transports._ssh_stream`` sends this file's source as ``python3 -c SOURCE ROOT`` through an
SSH exec channel, then streams many files through the channel: no round trip per file. It
keeps the guarantees of every other data path: each file is written to a temp name in its
destination folder, given its mode and mtime, and only renamed into place after the client
said the source did not change during the read (``C``, else ``A`` discards it) and after the
batch was made durable (one ``syncfs`` per filesystem, else an fsync per file). Paths are
confined to the root: no absolute paths, no ``..``, folders opened one by one without
following symlinks. When the stream ends without a final sync (dropped connection, killed
client) the temp files of the unfinished batch are removed. The stream does not pause for
the disk: a second thread only waits for each batch's flush while the main thread reads and
writes the next batch, then renames the flushed one into place and reports it, in order
(one thread making the system calls: two would pass the interpreter's lock at each one).

Frames from the client, each one byte of kind then a fixed header (network order):
  W seq:I mode:I mtime_ns:q dest_len:H tmp_len:H length:I, dest, tmp, content
                                                               a small file, whole (read,
                                                               and found unchanged, first)
  F seq:I mode:I mtime_ns:q dest_len:H tmp_len:H, dest, tmp   a regular file begins
  D len:I, bytes                                               content of the current file
  C / A                                                        commit / abort the current file
  L seq:I mtime_ns:q dest_len:H tmp_len:H target_len:H, ...    a symlink
  S                                                            flush, rename, report
  P                                                            answer "pong" (round trip)
  I name_len:H, name                                           inspect the root (see below)
  K name_len:H length:I, name, content                         write a file of the root
  Q                                                            quit
Replies, one line each: the greeting ``replicator-receiver 3``, and for each ``S`` the line
``flushing`` (all frames were read) then a JSON list of ``[seq, 0, size, mtime_ns, kind_ok]``
(in place) or ``[seq, errno, what, strerror]``, in the order of the syncs (a sync's
``flushing`` comes after the report before it; ``P``, ``I`` and ``K`` are answered after the
reports due). ``I`` answers ``[root, probe, marker]``:
``root`` null when the root is a folder, ``probe`` null when a file can be created in it
(and removed), ``marker`` the text of the root's file ``name`` (null: none), each else
``[errno, strerror]``. ``K`` writes the root's file ``name`` whole (a temp file, fsync,
rename) and answers null or ``[errno, strerror]``. Both answer the engine's check of the
replica, before any batch: the SSH login that starts the receiver is the only one a run
needs.

Written for Python 3.6 and later, standard library only: it runs on whatever the host has.
"""

import errno
import json
import os
import queue
import select
import stat
import struct
import sys
import threading
from collections import deque

# typing.TYPE_CHECKING without importing typing, which would take a third of the
# receiver's start (10 of 30 ms): the annotations that name its types are strings, and
# those in function bodies are never evaluated.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple, Union

GREETING = b"replicator-receiver 3\n"
FLUSHING = b"flushing\n"
PONG = b"pong\n"
FILE = struct.Struct("!IIqHH")
WHOLE = struct.Struct("!IIqHHI")
LINK = struct.Struct("!IqHHH")
LENGTH = struct.Struct("!I")
NAME = struct.Struct("!H")
SPLICE = getattr(os, "splice", None)  # Python 3.10+, Linux
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | O_CLOEXEC
ROOT_FLAGS = DIR_FLAGS & ~os.O_NOFOLLOW  # the root may be a symlink; nothing below it
TEMP_PREFIX = b".~rep-"


class Refused(Exception):
    """A frame this receiver will not act on: the stream is broken or hostile."""


def _syncfs() -> "Optional[Callable[[int], None]]":
    """``syncfs(2)`` through ctypes (``os`` lacks it), or None where there is none."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (ImportError, AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int]

    def syncfs(fd: int) -> None:
        if fn(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return syncfs


WRITEBACK_EVERY = 8 << 20


def _writeback() -> "Optional[Callable[[int, int, int], object]]":
    """``sync_file_range(fd, offset, count, SYNC_FILE_RANGE_WRITE)``: start writing a
    large file to disk while it is still arriving, so the batch's flush waits for its tail
    only. A head start, not durability (the flush gives that): its result is ignored."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (ImportError, AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, count: fn(fd, offset, count, 2)


class Receiver:
    def __init__(self, root: bytes, out: "BinaryIO") -> None:
        os.umask(0)  # files are created with the mode they are sent with
        self.root_fd = os.open(root, ROOT_FLAGS)  # as the check and SFTP take it
        self.out = out
        self.syncfs = _syncfs()
        self.writeback = _writeback()
        self.written = 0  # bytes of the current file so far
        self.pushed = 0  # of which writing to disk was started
        self.dirs: Dict[bytes, int] = {b"": self.root_fd}
        self.made: Set[int] = set()  # folders in which this batch created sub-folders
        # (seq, folder fd, temp name, final name, [size, mtime_ns, kind_ok] of the temp file)
        self.staged: List[Tuple[int, int, bytes, bytes, List[int]]] = []
        self.results: List[Sequence[object]] = []
        # The current file: (seq, folder fd, temp name, final name, fd); fd -1 once failed.
        self.current: Optional[Tuple[int, int, bytes, bytes, int]] = None
        self.mode = 0
        self.mtime_ns = 0
        # Batches whose sync was asked and whose report is not written yet, in order.
        self.inflight: Deque[Pending] = deque()
        self.flusher: Optional[Flusher] = None  # started at the first sync

    # -- paths --

    def folder(self, reldir: bytes) -> int:
        fd = self.dirs.get(reldir)
        if fd is not None:
            return fd
        parent_rel, name = reldir.rpartition(b"/")[::2]
        parent = self.folder(parent_rel)
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            try:
                os.mkdir(name, 0o755, dir_fd=parent)
                self.made.add(parent)
            except FileExistsError:
                pass
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        self.dirs[reldir] = fd
        return fd

    @staticmethod
    def split(dest: bytes, tmp: bytes) -> "Tuple[bytes, bytes]":
        # Once per file: the parts are looked at one by one only when one may be . or ..
        if (not dest or dest[:1] == b"/" or dest[-1:] == b"/" or b"//" in dest
                or b"\0" in dest
                or ((dest[:1] == b"." or b"/." in dest)
                    and any(p in (b".", b"..") for p in dest.split(b"/")))):
            raise Refused("path outside the root: %r" % dest)
        if b"/" in tmp or b"\0" in tmp or not tmp.startswith(TEMP_PREFIX):
            raise Refused("bad temp name: %r" % tmp)
        reldir, _, name = dest.rpartition(b"/")
        return reldir, name

    # -- frames --

    def begin(self, seq: int, mode: int, mtime_ns: int, dest: bytes, tmp: bytes) -> None:
        reldir, name = self.split(dest, tmp)
        self.mode, self.mtime_ns = mode & 0o1777, mtime_ns
        dir_fd, fd, what = -1, -1, "mkdir"
        try:
            dir_fd = self.folder(reldir)
            what = "write"
            # Created with its final mode (umask 0, set in serve): no chmod per file.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | O_CLOEXEC, self.mode, dir_fd=dir_fd)
        except OSError as exc:
            self.fail(seq, exc, what)
        self.current = (seq, dir_fd, tmp, name, fd)
        self.written = self.pushed = 0

    def wrote(self, fd: int, n: int) -> None:
        self.written += n
        if self.written - self.pushed >= WRITEBACK_EVERY and self.writeback is not None:
            self.writeback(fd, self.pushed, self.written - self.pushed)
            self.pushed = self.written

    def data(self, chunk: "Union[bytes, memoryview]") -> None:
        cur = self.current
        if cur is None:
            raise Refused("content outside a file")
        fd = cur[4]
        if fd < 0:
            return  # failed already: the rest of its content is skipped
        try:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
            self.wrote(fd, len(chunk))
        except OSError as exc:
            self.drop(cur)
            self.fail(cur[0], exc, "write")

    def data_from(self, src: int, n: int) -> None:
        """The next ``n`` content bytes, straight from the input ``src``: spliced into the
        file where the input is a pipe (no copy through this process), else read."""
        cur = self.current
        if cur is None:
            raise Refused("content outside a file")
        while n > 0 and SPLICE is not None and cur[4] >= 0:
            if self.inflight:  # never block on the input while a report is due
                self.wait_input(src)
            try:
                moved = SPLICE(src, cur[4], n)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    self.drop(cur)  # the file's side (ENOSPC, EIO...): nothing was moved
                    self.fail(cur[0], exc, "write")
                break  # the rest is read (and written, or skipped)
            if not moved:
                raise EOFError
            n -= moved
            self.wrote(cur[4], moved)
        while n > 0:
            if self.inflight:
                self.wait_input(src)
            block = os.read(src, min(n, 1 << 20))
            if not block:
                raise EOFError
            n -= len(block)
            self.data(block)

    def end(self, commit: bool) -> None:
        cur = self.current
        if cur is None:
            raise Refused("end outside a file")
        self.current = None
        seq, dir_fd, tmp, name, fd = cur
        if fd < 0:
            return
        if not commit:
            self.drop(cur)
            return
        try:
            os.utime(fd, ns=(self.mtime_ns, self.mtime_ns))
            if self.syncfs is None:
                os.fsync(fd)
            st = os.fstat(fd)  # what the copy holds, reported once it is in place
        except OSError as exc:
            self.drop(cur)
            self.fail(seq, exc, "write")
            return
        os.close(fd)
        self.staged.append((seq, dir_fd, tmp, name, [st.st_size, st.st_mtime_ns, 1]))

    def whole(self, seq: int, mode: int, mtime_ns: int, dest: bytes, tmp: bytes,
              content: memoryview) -> None:
        """``begin``, ``data`` and ``end(True)`` of a small file sent whole, in one call."""
        reldir, name = self.split(dest, tmp)
        mode &= 0o1777
        what = "mkdir"
        try:
            dir_fd = self.folder(reldir)
            what = "write"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | O_CLOEXEC, mode, dir_fd=dir_fd)
        except OSError as exc:
            self.fail(seq, exc, what)
            return
        try:
            view = content
            while view:
                view = view[os.write(fd, view):]
            os.utime(fd, ns=(mtime_ns, mtime_ns))
            if self.syncfs is None:
                os.fsync(fd)
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            self.unlink(dir_fd, tmp)
            self.fail(seq, exc, "write")
            return
        os.close(fd)
        self.staged.append((seq, dir_fd, tmp, name, [st.st_size, st.st_mtime_ns, 1]))

    def link(self, seq: int, mtime_ns: int, dest: bytes, tmp: bytes, target: bytes) -> None:
        reldir, name = self.split(dest, tmp)
        what = "mkdir"
        try:
            dir_fd = self.folder(reldir)
            what = "create symlink"
            os.symlink(target, tmp, dir_fd=dir_fd)
            what = "set symlink mtime"
            os.utime(tmp, ns=(mtime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
            st = os.stat(tmp, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            self.fail(seq, exc, what)
            return
        ok = int(stat.S_ISLNK(st.st_mode))
        self.staged.append((seq, dir_fd, tmp, name, [st.st_size, st.st_mtime_ns, ok]))

    def sync(self) -> None:
        """Ask for the files since the last sync to be made durable; the renames into place
        and the report follow once the disk is done (``advance``), and the next batch's
        frames are read meanwhile: one session streams on while the disk flushes."""
        batch = Pending(self.staged, self.dirs, self.made, self.results)
        self.staged, self.dirs, self.made, self.results = [], {b"": self.root_fd}, set(), []
        if not self.inflight:
            self.announce(batch)
        self.inflight.append(batch)
        if self.flusher is None:
            self.flusher = Flusher(self.flush)
        self.flusher.ask(batch, {dir_fd for _, dir_fd, _, _, _ in batch.staged})
        while len(self.inflight) > MAX_INFLIGHT:
            self.advance(True)

    def announce(self, batch: "Pending") -> None:
        """Tell the client the batch was read whole (its wait is the disk's from now on),
        in the order of the reports: after the report of the batch before it."""
        batch.announced = True
        self.out.write(FLUSHING)
        self.out.flush()

    def advance(self, block: bool) -> None:
        """Take the flushes the flusher finished: a batch whose files are durable is
        renamed into place and its renames flushed; a batch whose renames are durable is
        reported, in order. ``block``: wait for one flush first."""
        assert self.flusher is not None
        for batch in self.flusher.finished(block):
            if batch.placed is None:
                self.rename(batch)
            else:
                if batch.error is not None:
                    for entry in batch.placed:
                        batch.results.append(_failed(entry[0], batch.error, "flush"))
                    batch.placed = []
                batch.results.extend(batch.placed)
                batch.done = True
        while self.inflight and self.inflight[0].done:
            batch = self.inflight.popleft()
            for rel, fd in batch.dirs.items():
                if rel:
                    os.close(fd)
            self.out.write(json.dumps(batch.results).encode() + b"\n")
            self.out.flush()
            if self.inflight and not self.inflight[0].announced:
                self.announce(self.inflight[0])

    def rename(self, batch: "Pending") -> None:
        """A batch whose files are durable (or failed to be): into place, then the renames'
        flush asked for."""
        staged, batch.staged = batch.staged, []
        if batch.error is not None:
            for seq, dir_fd, tmp, _, _ in staged:
                self.unlink(dir_fd, tmp)
                batch.results.append(_failed(seq, batch.error, "flush"))
            staged, batch.error = [], None
        placed: List[List[int]] = []
        for seq, dir_fd, tmp, name, held in staged:
            try:
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except OSError as exc:
                self.unlink(dir_fd, tmp)
                batch.results.append(_failed(seq, exc, "rename into"))
                continue
            placed.append([seq, 0, *held])
        batch.placed = placed
        assert self.flusher is not None
        self.flusher.ask(batch, {dir_fd for _, dir_fd, _, _, _ in staged} | batch.made)

    def drain(self) -> None:
        """Every batch whose sync was asked renamed and reported."""
        while self.inflight:
            self.advance(True)

    def wait_input(self, fd: int) -> None:
        """Until ``fd`` has input, finishing what the flusher finished meanwhile."""
        assert self.flusher is not None
        wake = self.flusher.wake
        # poll, not select: a batch may hold more than 1,024 folders open.
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(wake, select.POLLIN)
        while self.inflight:
            ready = [ready_fd for ready_fd, _ in poller.poll()]
            if wake in ready:
                self.advance(False)
            if fd in ready:
                return

    def flush(self, folders: "Set[int]") -> None:
        if self.syncfs is not None:
            devices: Dict[int, int] = {}
            for fd in folders:
                devices.setdefault(os.fstat(fd).st_dev, fd)
            for fd in devices.values():
                self.syncfs(fd)
        else:
            for fd in folders:
                os.fsync(fd)

    # -- helpers --

    def fail(self, seq: int, exc: OSError, what: str) -> None:
        self.results.append(_failed(seq, exc, what))

    def drop(self, cur: "Tuple[int, int, bytes, bytes, int]") -> None:
        if cur[4] >= 0:
            os.close(cur[4])
            self.unlink(cur[1], cur[2])
        self.current = (cur[0], cur[1], cur[2], cur[3], -1)

    @staticmethod
    def unlink(dir_fd: int, name: bytes) -> None:
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass

    def close(self) -> None:
        """The batches whose sync was asked finished; nothing of the unfinished one stays
        behind (the stream ended without its sync); the flusher stopped."""
        try:
            self.drain()
        finally:
            if self.flusher is not None:
                self.flusher.stop()
            if self.current is not None:
                self.drop(self.current)
            # The unfinished batch, and any a failed report left unrenamed.
            for batch in [*self.inflight, Pending(self.staged, {}, set(), [])]:
                for _, dir_fd, tmp, _, _ in batch.staged:
                    self.unlink(dir_fd, tmp)
                batch.staged = []
            self.staged = []


# Batches whose sync was asked and whose report is not written: beyond this many, reading
# waits for the disk (bounds the open folders and temp files of a session).
MAX_INFLIGHT = 2


def _failed(seq: int, exc: OSError, what: str) -> "List[object]":
    return [seq, exc.errno or errno.EIO, what, exc.strerror or str(exc)]


class Pending:
    """A batch whose sync was asked: its files staged, then renamed (``placed``), then
    reported (``done``). ``error``: what the last flush of it raised."""

    def __init__(self, staged: "List[Tuple[int, int, bytes, bytes, List[int]]]",
                 dirs: "Dict[bytes, int]", made: "Set[int]", results: "List[Sequence[object]]"):
        self.staged = staged
        self.dirs = dirs
        self.made = made
        self.results = results
        self.placed = None  # type: Optional[List[List[int]]]
        self.error = None  # type: Optional[OSError]
        self.announced = False
        self.done = False


class Flusher:
    """A thread that only waits for the disk: it flushes (``Receiver.flush``) the folders
    it is asked to, in order, and says so through a pipe the main thread selects on. The
    renames and reports stay on the main thread: two threads making system calls would hand
    the interpreter's lock back and forth at each one."""

    def __init__(self, flush: "Callable[[Set[int]], None]") -> None:
        self.flush = flush
        self.todo = queue.Queue()  # type: queue.Queue[Optional[Tuple[Pending, Set[int]]]]
        self.done = queue.Queue()  # type: queue.Queue[Pending]
        self.wake, self._signal = os.pipe()
        os.set_blocking(self.wake, False)
        self.thread = threading.Thread(target=self.run, name="flush", daemon=True)
        self.thread.start()

    def ask(self, batch: Pending, folders: "Set[int]") -> None:
        self.todo.put((batch, folders))

    def run(self) -> None:
        while True:
            item = self.todo.get()
            if item is None:
                return
            batch, folders = item
            try:
                self.flush(folders)
            except Exception as exc:  # the main thread must hear back whatever happened
                batch.error = (exc if isinstance(exc, OSError)
                               else OSError(errno.EIO, "flush: %r" % exc))
            self.done.put(batch)
            os.write(self._signal, b"x")

    def finished(self, block: bool) -> "List[Pending]":
        """The batches flushed since last asked (at least one if ``block``)."""
        try:
            while os.read(self.wake, 4096):
                pass
        except BlockingIOError:
            pass
        batches = [self.done.get()] if block else []
        while True:
            try:
                batches.append(self.done.get_nowait())
            except queue.Empty:
                return batches

    def stop(self) -> None:
        self.todo.put(None)
        self.thread.join()
        os.close(self.wake)
        os.close(self._signal)


def _error(exc: OSError) -> "List[object]":
    return [exc.errno or errno.EIO, exc.strerror or str(exc)]


def _root_name(name: bytes) -> bytes:
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise Refused("not a name in the root: %r" % name)
    return name


def inspect(root: bytes, marker: bytes) -> "List[object]":
    """``[root, probe, marker]`` (see the frames above). Symlinks are followed, as the
    SFTP server's checks follow them."""
    try:
        fd = os.open(root, ROOT_FLAGS)
    except OSError as exc:
        return [_error(exc), None, None]
    try:
        probe = None  # type: Optional[List[object]]
        name = TEMP_PREFIX + b"probe-" + os.urandom(4).hex().encode()
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o600, dir_fd=fd))
            os.unlink(name, dir_fd=fd)
        except OSError as exc:
            probe = _error(exc)
        text = None  # type: Union[None, str, List[object]]
        try:
            mfd = os.open(marker, os.O_RDONLY, dir_fd=fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            text = _error(exc)
        else:
            try:
                text = os.read(mfd, 4096).decode(errors="replace")
            except OSError as exc:
                text = _error(exc)
            finally:
                os.close(mfd)
        return [None, probe, text]
    finally:
        os.close(fd)


def write_whole(root: bytes, name: bytes, content: bytes) -> "Optional[List[object]]":
    """The root's file ``name`` holds ``content``, or is as it was: None, else the error."""
    tmp = name + b".tmp"
    try:
        fd = os.open(root, ROOT_FLAGS)
    except OSError as exc:
        return _error(exc)
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644,
                      dir_fd=fd)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(out, view):]
            os.fsync(out)
        finally:
            os.close(out)
        os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        os.fsync(fd)
    except OSError as exc:
        try:
            os.unlink(tmp, dir_fd=fd)
        except OSError:
            pass
        return _error(exc)
    finally:
        os.close(fd)
    return None


class Stream:
    """Frames from the input file descriptor, read in large blocks. The loader read this
    source from the same descriptor byte by byte exactly, so nothing that follows is
    buffered elsewhere, and content can go from the descriptor straight to a file.

    ``buf[pos:]`` is read and not yet taken. ``buf`` is bytes, never resized in place: a
    frame's parts are sliced out of it or viewed, with no copy of the buffer per frame."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.pos = 0
        self.receiver: Optional[Receiver] = None  # finishes flushed batches while we wait

    def need(self, n: int) -> None:
        """At least ``n`` bytes from ``pos`` on in ``buf`` (EOFError if the input ends)."""
        have = len(self.buf) - self.pos
        if have >= n:
            return
        parts = [self.buf[self.pos:]]
        while have < n:
            if self.receiver is not None and self.receiver.inflight:
                self.receiver.wait_input(self.fd)
            block = os.read(self.fd, max(1 << 20, n - have))
            if not block:
                raise EOFError
            parts.append(block)
            have += len(block)
        self.buf = b"".join(parts)
        self.pos = 0

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes (headers and names: small)."""
        self.need(n)
        start = self.pos
        self.pos = start + n
        return self.buf[start:self.pos]

    def buffered(self, n: int) -> bytes:
        """Up to ``n`` bytes already read (the rest of them is still in the input)."""
        count = min(len(self.buf) - self.pos, n)
        start = self.pos
        self.pos = start + count
        return self.buf[start:self.pos]


def serve(root: bytes, inp: int, out: "BinaryIO") -> None:
    # The greeting (and the answer to a ping) say this host runs the receiver; the root is
    # opened with the first file: one that cannot be (an unmounted disk) fails that batch,
    # and is not taken for a host without the receiver.
    out.write(GREETING)
    out.flush()
    stream = Stream(inp)
    receiver: Optional[Receiver] = None
    whole = WHOLE.size + 1
    try:
        while True:
            # A small file whole (W), the usual frame, in one piece: its header parsed in
            # place, its names sliced, its content viewed in the buffer and written.
            buf, pos = stream.buf, stream.pos
            if len(buf) - pos > whole and buf[pos] == 87 and receiver is not None:  # W
                seq, mode, mtime_ns, dlen, tlen, n = WHOLE.unpack_from(buf, pos + 1)
                start = pos + whole
                end = start + dlen + tlen + n
                if end > len(buf):
                    stream.need(end - pos)
                    buf, start, end = stream.buf, whole, end - pos
                names = start + dlen
                stream.pos = end
                receiver.whole(seq, mode, mtime_ns, buf[start:names],
                               buf[names:names + tlen], memoryview(buf)[names + tlen:end])
                continue
            kind = stream.take(1)
            if receiver is not None and kind in (b"P", b"Q", b"I", b"K"):
                receiver.drain()  # the reports due first: the replies keep their order
            if kind == b"P":
                out.write(PONG)
                out.flush()
                continue
            if kind == b"Q":
                return
            if kind in (b"I", b"K"):
                (nlen,) = NAME.unpack(stream.take(NAME.size))
                (length,) = LENGTH.unpack(stream.take(LENGTH.size)) if kind == b"K" else (0,)
                named = stream.take(nlen + length)
                name = _root_name(named[:nlen])
                answer = (inspect(root, name) if kind == b"I"
                          else write_whole(root, name, named[nlen:]))
                out.write(json.dumps(answer).encode() + b"\n")
                out.flush()
                continue
            if receiver is None:
                receiver = stream.receiver = Receiver(root, out)
            if kind == b"W":
                seq, mode, mtime_ns, dlen, tlen, n = WHOLE.unpack(stream.take(WHOLE.size))
                body = stream.take(dlen + tlen + n)  # names and content in one take
                receiver.whole(seq, mode, mtime_ns, body[:dlen], body[dlen:dlen + tlen],
                               memoryview(body)[dlen + tlen:])
            elif kind == b"F":
                seq, mode, mtime_ns, dlen, tlen = FILE.unpack(stream.take(FILE.size))
                names = stream.take(dlen + tlen)
                receiver.begin(seq, mode, mtime_ns, names[:dlen], names[dlen:])
            elif kind == b"D":
                (n,) = LENGTH.unpack(stream.take(LENGTH.size))
                head = stream.buffered(n)
                if head:
                    receiver.data(head)
                if n > len(head):
                    receiver.data_from(stream.fd, n - len(head))
            elif kind in (b"C", b"A"):
                receiver.end(kind == b"C")
            elif kind == b"L":
                seq, mtime_ns, dlen, tlen, glen = LINK.unpack(stream.take(LINK.size))
                names = stream.take(dlen + tlen + glen)
                receiver.link(seq, mtime_ns, names[:dlen], names[dlen:dlen + tlen],
                              names[dlen + tlen:])
            elif kind == b"S":
                receiver.sync()
            else:
                raise Refused("unknown frame %r" % kind)
    except EOFError:
        pass
    finally:
        if receiver is not None:
            receiver.close()


def main() -> int:
    root = os.fsencode(sys.argv[1])
    try:  # a batch keeps its folders open until the renames: more than 1,024 is common
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ImportError, ValueError, OSError):
        pass
    try:  # a larger input pipe (Linux): sshd writes, and this reads, a MiB at a time
        import fcntl

        fcntl.fcntl(0, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (ImportError, ValueError, OSError):
        pass
    import gc

    # Collect every 50,000 allocations, not 700: a batch allocates a few objects per file,
    # nearly all acyclic (replicator/_gc_tuning.py measured the same for the engine).
    gc.set_threshold(50000, *gc.get_threshold()[1:])
    try:
        serve(root, 0, sys.stdout.buffer)
    except Refused as exc:
        sys.stderr.write("replicator-receiver: refused: %s\n" % exc)
        return 2
    except OSError as exc:
        sys.stderr.write("replicator-receiver: %s\n" % exc)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    # Every answer was flushed as it was written: leave without the interpreter's teardown,
    # which the session's end would wait for.
    try:
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(code)
