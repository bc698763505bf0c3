"""replicator: verified, atomic, resumable replication of data files.

Library use::

    config = replicator.load_config("replicator.toml")
    async with replicator.Replicator(config) as rep:
        summary = await rep.sync_once()

The library logs through structlog but never configures logging.
"""

from ._lazy import lazy_exports
from ._version import __version__

# typing.TYPE_CHECKING without importing typing: ``_early`` imports this package first.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._config import Config, EngineConfig, OriginConfig, ReplicaConfig, load_config
    from ._errors import (
        ConfigError,
        EngineLockedError,
        ErrorClass,
        FileError,
        InventoryError,
        ReplicatorError,
        ReplicaUnavailableError,
        TransferStalledError,
    )
    from ._events import (
        Event,
        EventsDropped,
        ReplicaAvailable,
        ReplicaUnavailable,
        RunCompleted,
        ScanFinished,
        TransferCompleted,
        TransferFailed,
        TransferStarted,
    )
    from ._replicator import PlannedCopy, Replicator, ScanSummary, SyncSummary

__all__ = [
    "Config",
    "ConfigError",
    "EngineConfig",
    "EngineLockedError",
    "ErrorClass",
    "Event",
    "EventsDropped",
    "FileError",
    "InventoryError",
    "OriginConfig",
    "PlannedCopy",
    "ReplicaAvailable",
    "ReplicaConfig",
    "ReplicaUnavailable",
    "ReplicaUnavailableError",
    "Replicator",
    "ReplicatorError",
    "RunCompleted",
    "ScanFinished",
    "ScanSummary",
    "SyncSummary",
    "TransferCompleted",
    "TransferFailed",
    "TransferStalledError",
    "TransferStarted",
    "__version__",
    "load_config",
]

# Imported on first use: ``import replicator.cli`` must not import the engine (see _lazy).
__getattr__, __dir__ = lazy_exports(globals(), {
    "._config": ("Config", "EngineConfig", "OriginConfig", "ReplicaConfig", "load_config"),
    "._errors": ("ConfigError", "EngineLockedError", "ErrorClass", "FileError",
                 "InventoryError", "ReplicatorError", "ReplicaUnavailableError",
                 "TransferStalledError"),
    "._events": ("Event", "EventsDropped", "ReplicaAvailable", "ReplicaUnavailable",
                 "RunCompleted", "ScanFinished", "TransferCompleted", "TransferFailed",
                 "TransferStarted"),
    "._replicator": ("PlannedCopy", "Replicator", "ScanSummary", "SyncSummary"),
})
