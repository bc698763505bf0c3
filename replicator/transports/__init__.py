"""Transports: the places replicas live in, behind one small protocol."""

from ._base import (
    MARKER,
    Capabilities,
    DestStat,
    Progress,
    PutRequest,
    PutResult,
    PutStatus,
    Source,
    SourceReader,
    SourceStat,
    Transport,
)
from ._factory import open_transport
from ._local import LocalTransport

__all__ = [
    "MARKER",
    "Capabilities",
    "DestStat",
    "LocalTransport",
    "Progress",
    "PutRequest",
    "PutResult",
    "PutStatus",
    "Source",
    "SourceReader",
    "SourceStat",
    "Transport",
    "open_transport",
]
