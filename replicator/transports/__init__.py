"""Transports: the places replicas live in, behind one small protocol."""

from .._lazy import lazy_exports

# typing.TYPE_CHECKING without importing typing: ``_early`` imports this package first.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ._base import (
        MARKER,
        Progress,
        PutRequest,
        PutResult,
        PutStatus,
        Source,
        SourceReader,
        Transport,
    )
    from ._factory import open_transport
    from ._local import LocalTransport
    from ._stats import Capabilities, DestStat, SourceStat

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
    "._base": ("MARKER", "Progress", "PutRequest", "PutResult", "PutStatus", "Source",
               "SourceReader", "Transport"),
    "._factory": ("open_transport",),
    "._local": ("LocalTransport",),
    "._stats": ("Capabilities", "DestStat", "SourceStat"),
})
