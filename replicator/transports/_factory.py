"""Build the transport a replica's URL asks for."""

from __future__ import annotations

import os

import anyio

from .._config import ReplicaConfig
from .._errors import ConfigError
from ._base import Transport
from ._local import LocalTransport


def open_transport(replica: ReplicaConfig, limiter: anyio.CapacityLimiter) -> Transport:
    if replica.scheme == "file":
        # A copy helper per worker, but no more than there are cores: each is a process
        # that keeps one busy while the engine's own process needs one too.
        return LocalTransport(replica.path, limiter,
                              helpers=min(replica.workers, os.cpu_count() or 1))
    if replica.scheme == "ssh":
        from ._ssh import SshTransport  # asyncssh is imported only when an ssh replica is used

        return SshTransport.from_config(replica, limiter)
    raise ConfigError(
        f"replica {replica.name!r}: {replica.scheme}:// replicas are not supported yet"
    )
