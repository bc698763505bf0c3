"""The transport protocol's value types (``_base`` has the rest): what a transport can do,
and what a source or a destination file looks like."""

from __future__ import annotations

from dataclasses import dataclass

from .._inventory._kind import Kind


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a transport can do; the engine adapts its comparisons to it."""

    mtime_precision_ns: int = 1
    fsync: bool = True
    atomic_rename: bool = True
    symlinks: bool = True


@dataclass(frozen=True, slots=True)
class SourceStat:
    """An origin file as a remote source sees it (lstat), mtime at the source's precision.

    ``kind`` is None for anything but a regular file or a symlink (folders, fifos...).
    """

    kind: Kind | None
    size: int
    mtime_ns: int
    mode: int
    target: bytes | None = None

    def same_version(self, other: SourceStat | None) -> bool:
        """Whether ``other`` shows this version (kind, size, mtime, target): a copy read
        between the two is not a mix of two versions."""
        return other is not None and (self.kind, self.size, self.mtime_ns, self.target) == (
            other.kind, other.size, other.mtime_ns, other.target)


@dataclass(frozen=True, slots=True)
class DestStat:
    size: int
    mtime_ns: int
    mode: int
    is_dir: bool
    is_symlink: bool


__all__ = ["Capabilities", "DestStat", "SourceStat"]
