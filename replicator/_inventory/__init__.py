"""The inventory of origin files and of their copies on each replica."""

from ._store import Inventory
from ._types import (
    CopyState,
    DirListing,
    Entry,
    FailedCopy,
    Kind,
    ListingsDiff,
    NewFile,
    OriginStats,
    Outcome,
    OutcomeKind,
    ReplicaStats,
    ScanDelta,
    Work,
    join_path,
)

__all__ = [
    "CopyState",
    "DirListing",
    "Entry",
    "FailedCopy",
    "Inventory",
    "Kind",
    "ListingsDiff",
    "NewFile",
    "OriginStats",
    "Outcome",
    "OutcomeKind",
    "ReplicaStats",
    "ScanDelta",
    "Work",
    "join_path",
]
