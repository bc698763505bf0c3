"""The exception hierarchy of replicator.

Every foreign error (OSError, timeouts, SSH errors) is mapped into these classes at the
transport boundary, so the engine decides on retries by class, never by foreign type.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "EngineLockedError",
    "ErrorClass",
    "FileError",
    "InventoryError",
    "OriginUnavailableError",
    "ReplicaUnavailableError",
    "ReplicatorError",
    "TransferStalledError",
]

from enum import StrEnum


class ErrorClass(StrEnum):
    """How a per-file error is treated by the retry logic."""

    TRANSIENT = "transient"
    PERMANENT = "permanent"
    NO_SPACE = "no_space"
    PERMISSION = "permission"


class ReplicatorError(Exception):
    """Base class of every error replicator raises on purpose."""


class ConfigError(ReplicatorError):
    """The configuration is invalid. The message names the file, the key or line, the reason."""


class InventoryError(ReplicatorError):
    """The inventory database cannot be used (wrong schema version, corrupt file)."""


class EngineLockedError(ReplicatorError):
    """Another engine is already running on the same inventory."""


class ReplicaUnavailableError(ReplicatorError):
    """The replica as a whole cannot be used now (root missing, unwritable, unreachable).

    Not charged to files: the replica is paused and its files stay pending.
    """


class OriginUnavailableError(ReplicatorError):
    """The origin cannot be read now (root missing, SSH host unreachable, host key refused).

    Nothing under it is taken as deleted, and copies from it are released, not charged.
    """


class FileError(ReplicatorError):
    """One file could not be transferred; ``error_class`` decides how it is retried."""

    def __init__(self, message: str, error_class: ErrorClass = ErrorClass.TRANSIENT) -> None:
        super().__init__(message)
        self.error_class = error_class


class TransferStalledError(FileError):
    """No bytes moved for ``stall_timeout`` seconds."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorClass.TRANSIENT)
