"""Build the transport a replica's URL asks for."""

from __future__ import annotations

import anyio

from .._config import ReplicaConfig
from .._errors import ConfigError
from ._base import Transport
from ._local import LocalTransport


def open_transport(replica: ReplicaConfig, limiter: anyio.CapacityLimiter) -> Transport:
    if replica.scheme == "file":
        return LocalTransport(replica.path, limiter)
    raise ConfigError(
        f"replica {replica.name!r}: {replica.scheme}:// replicas are not supported yet"
    )
