"""The inventory of origin files and of their copies on each replica."""

from .._lazy import lazy_exports

# typing.TYPE_CHECKING without importing typing: ``_early`` imports this package first.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._kind import Kind
    from ._store import Inventory
    from ._types import (
        CopyState,
        DirListing,
        Entry,
        FailedCopy,
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

# Imported on first use: the command line reads the inventory (``_peek``) before it imports
# aiosqlite and asyncio with ``_store``.
__getattr__, __dir__ = lazy_exports(globals(), {
    "._kind": ("Kind",),
    "._store": ("Inventory",),
    "._types": ("CopyState", "DirListing", "Entry", "FailedCopy", "ListingsDiff",
                "NewFile", "OriginStats", "Outcome", "OutcomeKind", "ReplicaStats",
                "ScanDelta", "Work", "join_path"),
})
