"""The inventory of origin files and of their copies on each replica."""

from ._store import Inventory
from ._types import (
    CopyState,
    DirListing,
    Entry,
    FailedCopy,
    Kind,
    OriginStats,
    Outcome,
    OutcomeKind,
    ReplicaStats,
    ScanDelta,
    Work,
)

__all__ = [
    "CopyState",
    "DirListing",
    "Entry",
    "FailedCopy",
    "Inventory",
    "Kind",
    "OriginStats",
    "Outcome",
    "OutcomeKind",
    "ReplicaStats",
    "ScanDelta",
    "Work",
]
