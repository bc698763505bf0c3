"""Transports: the places replicas live in, behind one small protocol."""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
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

# Imported on first use, like the package's (see .._lazy).
__getattr__, __dir__ = lazy_exports(globals(), {
    "._base": ("MARKER", "Capabilities", "DestStat", "Progress", "PutRequest", "PutResult",
               "PutStatus", "Source", "SourceReader", "SourceStat", "Transport"),
    "._factory": ("open_transport",),
    "._local": ("LocalTransport",),
})
