"""Transports: the places replicas live in, behind one small protocol."""

from ._base import (
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
