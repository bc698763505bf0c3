"""Listing origin folders: the per-entry work of a scan, standard library only.

The scanner runs ``list_folders`` in a worker thread for small trees, and for big ones in
helper processes that run this file as a script (``serve``): on 2 cores a no-change rescan
of 300,000 files is half system calls and half Python per entry, so a second process halves
it where a second thread would wait for the GIL. The script imports nothing of replicator,
so a helper starts in milliseconds.

A folder whose digest equals the one recorded after its last diff comes back as ``SAME``
with its subfolders only: the entries of an unchanged folder never leave the helper.

Where the package's C accelerator was built, a folder's entries are examined by its
``lstat_names`` (one call per folder, without the GIL: see ``_fastcopy.c``); a
helper loads it from the path the scanner gives, as this file runs outside its package.
"""

from __future__ import annotations

import errno
import hashlib
import marshal
import os
import re
import stat
import struct
import sys

TYPE_CHECKING = False  # typing's: a helper starts without importing typing (mypy sees True)
if TYPE_CHECKING:
    from collections.abc import Callable

    # (errno, st_mode, st_size, st_mtime_ns) of each name of a folder open as the descriptor.
    LstatNames = Callable[[int, list[bytes]], list[tuple[int, int, int, int]]]

# What list_folder returns, by its second field.
VANISHED = 0  # (folder, VANISHED)
UNREADABLE = 1  # (folder, UNREADABLE, strerror)
SAME = 2  # (folder, SAME, subfolders, warnings, fingerprint, entries)
LISTED = 3  # (folder, LISTED, subfolders, warnings, names, modes, sizes, mtimes, targets,
#             unsettled, fingerprint)

_LENGTH = struct.Struct(">I")

_ACCELERATOR = "replicator._fastcopy"


def lstat_each(fd: int, names: list[bytes]) -> list[tuple[int, int, int, int]]:
    """What the accelerator's ``lstat_names`` returns, made with ``os.lstat``: the reference
    and the fallback."""
    rows: list[tuple[int, int, int, int]] = []
    for name in names:
        try:
            st = os.lstat(name, dir_fd=fd)
        except OSError as exc:
            rows.append((exc.errno or errno.EIO, 0, 0, 0))
            continue
        rows.append((0, st.st_mode, st.st_size, st.st_mtime_ns))
    return rows


def _lstat_names_at(path: str | None) -> LstatNames:
    """The accelerator's ``lstat_names``, from the module built at ``path``: the package's
    (already imported in the engine's process), else loaded from that file (a helper runs
    this file as a script). ``lstat_each`` without one, for a build that predates it, or
    where the file cannot be loaded."""
    if path is None:
        return lstat_each
    module = sys.modules.get(_ACCELERATOR)
    if module is None:
        import importlib.machinery
        import importlib.util

        loader = importlib.machinery.ExtensionFileLoader(_ACCELERATOR, path)
        spec = importlib.util.spec_from_loader(_ACCELERATOR, loader)
        assert spec is not None
        try:
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
        except (ImportError, OSError):
            return lstat_each
    found: LstatNames = getattr(module, "lstat_names", lstat_each)
    return found


class Rules:
    """What a folder's listing keeps: settled regular files and symlinks, filtered.
    ``accelerator``: the path of the C accelerator's module, None for the Python path."""

    __slots__ = ("exclude", "filtered", "include", "lstat_names", "settle_ns", "skip")

    def __init__(self, root: bytes, settle_ns: int, include: str | None,
                 exclude: str | None, accelerator: str | None = None) -> None:
        self.skip = len(root.rstrip(b"/")) + 1
        self.settle_ns = settle_ns
        self.include = re.compile(include, re.DOTALL) if include else None
        self.exclude = re.compile(exclude, re.DOTALL) if exclude else None
        self.filtered = bool(include or exclude)
        self.lstat_names = _lstat_names_at(accelerator)


def fingerprint(names: list[bytes], modes: list[int], sizes: list[int], mtimes: list[int],
                targets: list[bytes | None]) -> bytes:
    """A digest of a folder's settled entries, given sorted by name.

    marshal version 2 has no back-references, so equal lists give equal bytes.
    """
    data = marshal.dumps((names, modes, sizes, mtimes, targets), 2)
    return hashlib.blake2b(data, digest_size=16).digest()


def list_folder(folder: bytes, rules: Rules, recorded: bytes | None) -> tuple[object, ...]:
    """One folder's entries; ``SAME`` when their digest equals ``recorded``."""
    try:
        names = os.listdir(folder)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return (folder, VANISHED)
    except OSError as exc:
        return (folder, UNREADABLE, exc.strerror or str(exc))
    names.sort()
    settle_ns = rules.settle_ns
    exclude, include = rules.exclude, rules.include
    base = folder.rstrip(b"/") + b"/"
    subfolders: list[bytes] = []
    warnings: list[tuple[bytes, str]] = []
    kept: list[bytes] = []
    modes: list[int] = []
    sizes: list[int] = []
    mtimes: list[int] = []
    targets: list[bytes | None] = []
    unsettled: list[bytes] = []
    try:
        for name, (error, mode, size, mtime_ns) in zip(names, rules.lstat_names(fd, names),
                                                        strict=True):
            if error:
                if error != errno.ENOENT:
                    # Exists but cannot be examined: keep what the inventory knows of it.
                    warnings.append((base + name, os.strerror(error)))
                    unsettled.append(name)
                continue
            if rules.filtered:
                rel = os.fsdecode((base + name)[rules.skip:])
                if exclude is not None and exclude.fullmatch(rel):
                    continue
                if stat.S_ISDIR(mode):
                    subfolders.append(base + name)
                    continue
                if include is not None and not include.fullmatch(rel):
                    continue
            elif stat.S_ISDIR(mode):
                subfolders.append(base + name)
                continue
            target = None
            if stat.S_ISLNK(mode):
                try:
                    target = os.readlink(name, dir_fd=fd)
                except OSError:
                    continue
            elif not stat.S_ISREG(mode):
                continue  # sockets, fifos, devices are not data
            if mtime_ns > settle_ns:
                unsettled.append(name)  # still being written
                continue
            kept.append(name)
            modes.append(mode)
            sizes.append(size)
            mtimes.append(mtime_ns)
            targets.append(target)
    finally:
        os.close(fd)
    digest = None if unsettled else fingerprint(kept, modes, sizes, mtimes, targets)
    if digest is not None and digest == recorded:
        return (folder, SAME, subfolders, warnings, digest, len(kept))
    return (folder, LISTED, subfolders, warnings, kept, modes, sizes, mtimes, targets,
            unsettled, digest)


def list_folders(tasks: list[tuple[bytes, bytes | None]], rules: Rules) -> list[tuple[object, ...]]:
    return [list_folder(folder, rules, recorded) for folder, recorded in tasks]


def _read_frame(stream: object) -> object:
    read = stream.read  # type: ignore[attr-defined]
    head = read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    return marshal.loads(read(size))


def frame(value: object) -> bytes:
    data = marshal.dumps(value)  # type: ignore[arg-type]
    return _LENGTH.pack(len(data)) + data


def serve() -> None:
    """A helper process: rules in the first frame, then one frame of results per task."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    config = _read_frame(stdin)
    if config is None:
        return
    rules = Rules(*config)  # type: ignore[misc]
    while True:
        tasks = _read_frame(stdin)
        if tasks is None:
            return
        stdout.write(frame(list_folders(tasks, rules)))  # type: ignore[arg-type]
        stdout.flush()


if __name__ == "__main__":
    serve()
