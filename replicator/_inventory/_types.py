"""Value types passed between the scanner, the engine and the inventory."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from ._kind import Kind as Kind


class CopyState(StrEnum):
    PENDING = "pending"
    COPYING = "copying"
    REPLICATED = "replicated"
    FAILED = "failed"
    IGNORED = "ignored"


# The records made once per file (Entry, Work, and the transports' PutRequest and
# PutResult) are named tuples, not frozen dataclasses: just as immutable, but a frozen
# dataclass's __init__ sets each field through object.__setattr__, 1.8 us for Work's twelve
# fields against 0.3 us, paid several times per file in a run of small files.
class Entry(NamedTuple):
    """One directory entry as the scanner saw it."""

    name: bytes
    kind: Kind
    size: int
    mtime_ns: int
    mode: int
    target: bytes | None = None


@dataclass(frozen=True, slots=True)
class DirListing:
    """The settled entries of one folder.

    ``unsettled`` names exist but were modified too recently to copy: they are neither new
    nor missing. ``complete`` is false when the folder could not be read: nothing in it is
    then taken as deleted.
    """

    dir: bytes
    entries: tuple[Entry, ...]
    unsettled: frozenset[bytes] = frozenset()
    complete: bool = True
    # A digest of ``entries`` (None: diff file by file). A folder whose digest equals the one
    # recorded after its last diff is unchanged: its rows need not be loaded at all.
    fingerprint: bytes | None = None


@dataclass(frozen=True, slots=True)
class ScanDelta:
    new: int = 0
    changed: int = 0
    deleted: int = 0
    unchanged: int = 0

    def __add__(self, other: ScanDelta) -> ScanDelta:
        return ScanDelta(
            self.new + other.new,
            self.changed + other.changed,
            self.deleted + other.deleted,
            self.unchanged + other.unchanged,
        )


@dataclass(slots=True)
class ListingsDiff:
    """What a batch of folder listings changes in the inventory (``Inventory.diff_listings``),
    to be recorded by ``Inventory.record_diff``. Filled once by the diff, then only read."""

    origin: str
    host: str
    now: float  # when the changes are recorded
    # Folders whose digest is the recorded one, and how many entries they hold.
    same: list[bytes] = field(default_factory=list)
    skipped: int = 0
    listings: list[DirListing] = field(default_factory=list)  # the others: diffed
    # Rows of new files (origin, host, dir, name, kind, size, mtime_ns, mode, target,
    # first_seen, last_seen), and each one's folder and entry.
    inserts: list[tuple[Any, ...]] = field(default_factory=list)
    inserted: list[tuple[bytes, Entry]] = field(default_factory=list)
    # Changed files: (kind, size, mtime_ns, mode, target, last_seen, id).
    updates: list[tuple[Any, ...]] = field(default_factory=list)
    seen_ids: list[int] = field(default_factory=list)  # unchanged files
    gone_ids: list[int] = field(default_factory=list)  # missing from complete listings
    unchanged: int = 0


class NewFile(NamedTuple):
    """A file a scan batch recorded for the first time, with its id in the inventory."""

    file_id: int
    dir: bytes
    entry: Entry


class Work(NamedTuple):
    """One file due on one replica, claimed by the engine (state ``copying``)."""

    replica: str
    file_id: int
    origin: str
    host: str
    path: bytes  # absolute, on the origin's host
    kind: Kind
    size: int
    mtime_ns: int
    mode: int
    target: bytes | None
    attempts: int
    dest: bytes  # relative to the replica root


def join_path(folder: bytes, name: bytes) -> bytes:
    """``os.path.join`` for a folder and a plain name (no slash): once per file claimed."""
    return folder + name if folder.endswith(b"/") else folder + b"/" + name


class OutcomeKind(StrEnum):
    REPLICATED = "replicated"
    CHANGED = "changed"  # the source changed during the copy: stays pending, not charged
    VANISHED = "vanished"  # the source is gone: the pending copy is dropped
    ERROR = "error"  # per-file error, charged one attempt
    RELEASED = "released"  # not attempted (shutdown, replica unavailable): not charged


@dataclass(frozen=True, slots=True)
class Outcome:
    replica: str
    file_id: int
    kind: OutcomeKind
    # REPLICATED: the version now held by the replica; CHANGED: the version claimed.
    size: int = 0
    mtime_ns: int = 0
    error_class: str | None = None
    error: str | None = None
    next_attempt: float = 0.0
    final: bool = False  # ERROR: attempts are used up, the copy becomes ``failed``


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    name: str
    url: str
    condition: str
    last_error: str | None
    files: int
    replicated: int
    pending: int
    failed: int
    ignored: int
    bytes_pending: int
    oldest_pending_age: float | None


@dataclass(frozen=True, slots=True)
class OriginStats:
    name: str
    files: int
    bytes: int


@dataclass(frozen=True, slots=True)
class FailedCopy:
    origin: str
    path: bytes
    replica: str
    attempts: int
    error_class: str | None
    error: str | None
    state: str
