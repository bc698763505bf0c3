"""Build the transport a replica's URL asks for."""

from __future__ import annotations

import anyio

from .._config import ReplicaConfig
from .._errors import ConfigError
from ._base import Transport
from ._local import LocalTransport
from ._spares import helpers_for


def open_transport(replica: ReplicaConfig, limiter: anyio.CapacityLimiter) -> Transport:
    if replica.scheme == "file":
        return LocalTransport(replica.path, limiter, helpers=helpers_for(replica.workers))
    if replica.scheme == "ssh":
        from ._ssh import SshTransport  # asyncssh is imported only when an ssh replica is used

        return SshTransport.from_config(replica, limiter)
    raise ConfigError(
        f"replica {replica.name!r}: {replica.scheme}:// replicas are not supported yet"
    )
