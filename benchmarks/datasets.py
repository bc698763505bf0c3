"""Deterministic data sets: the same bytes, names and mtimes on every run.

Content comes from a seeded pseudo-random pool (incompressible, so neither tool gains from
compression); every file is backdated to a whole second (SFTP v3 carries whole seconds, so
both tools can reproduce the mtime exactly and trees compare equal to the nanosecond).
"""

from __future__ import annotations

import multiprocessing
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

MTIME = 1_600_000_000  # 2020-09-13, whole seconds; file i gets MTIME + i % 86400
_POOL_SIZE = 8 << 20
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Dataset:
    name: str
    path: Path
    files: int
    bytes: int

    def describe(self) -> str:
        return f"{self.files:,} files, {human_bytes(self.bytes)}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _pool(seed: int) -> bytes:
    return random.Random(seed).randbytes(_POOL_SIZE + _BLOCK)


def _block(pool: bytes, file_index: int, block_index: int, size: int) -> bytes:
    """A deterministic slice of the pool (4 KiB aligned offsets, varied per file and block)."""
    slots = _POOL_SIZE // 4096
    offset = ((file_index * 2_654_435_761 + block_index * 40_503 + 17) % slots) * 4096
    return pool[offset:offset + size]


def _write(dir_fd: int, name: str, chunks: Iterable[bytes], mtime: int) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.utime(fd, ns=(mtime * 1_000_000_000, mtime * 1_000_000_000))
    finally:
        os.close(fd)


def _open_dir(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def small_files(root: Path, files: int, size: int, folders: int, seed: int = 1) -> Dataset:
    """``files`` files of ``size`` bytes spread evenly over ``folders`` folders."""
    rng = random.Random(seed)
    per_folder = -(-files // folders)
    index = 0
    for folder in range(folders):
        dir_fd = _open_dir(root / f"d{folder:03d}")
        try:
            for _ in range(per_folder):
                if index == files:
                    break
                _write(dir_fd, f"f{index:07d}.dat", (rng.randbytes(size),), MTIME + index % 86400)
                index += 1
        finally:
            os.close(dir_fd)
    return Dataset(root.name, root, files, files * size)


def big_files(root: Path, files: int, size: int, seed: int = 2) -> Dataset:
    """``files`` files of ``size`` bytes in one folder (whole 1 MiB blocks and a tail)."""
    pool = _pool(seed)
    dir_fd = _open_dir(root)
    try:
        for index in range(files):
            _write(dir_fd, f"big{index:04d}.dat", _blocks(pool, index, size), MTIME + index)
    finally:
        os.close(dir_fd)
    return Dataset(root.name, root, files, files * size)


def _blocks(pool: bytes, index: int, size: int) -> Iterator[bytes]:
    block = 0
    while size > 0:
        n = min(size, _BLOCK)
        yield _block(pool, index, block, n)
        size -= n
        block += 1


def _tree_part(root: str, first_folder: int, folders: int, per_folder: int, size: int,
               seed: int) -> int:
    pool = _pool(seed)
    written = 0
    for folder in range(first_folder, first_folder + folders):
        dir_fd = _open_dir(Path(root) / f"g{folder // 100:03d}" / f"d{folder:05d}")
        try:
            for i in range(per_folder):
                index = folder * per_folder + i
                _write(dir_fd, f"f{index:08d}.dat", (_block(pool, index, 0, size),),
                       MTIME + index % 86400)
                written += 1
        finally:
            os.close(dir_fd)
    return written


def file_tree(root: Path, files: int, size: int = 256, per_folder: int = 1000,
              first_folder: int = 0, seed: int = 3, workers: int = 2) -> Dataset:
    """A big tree of tiny files (``per_folder`` a folder, 100 folders a group), built by
    ``workers`` processes. ``first_folder`` numbers the folders so parts of one tree differ."""
    folders = files // per_folder
    assert folders * per_folder == files, "files must be a multiple of per_folder"
    shares = [folders // workers + (1 if w < folders % workers else 0) for w in range(workers)]
    starts = [first_folder + sum(shares[:w]) for w in range(workers)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        done = sum(pool.map(_tree_part, [str(root)] * workers, starts, shares,
                            [per_folder] * workers, [size] * workers, [seed] * workers))
    assert done == files
    return Dataset(root.name, root, files, files * size)


def combined(name: str, root: Path, parts: Sequence[Dataset]) -> Dataset:
    """A data set made of sub-folders already generated below ``root``."""
    return Dataset(name, root, sum(p.files for p in parts), sum(p.bytes for p in parts))
