"""SSH URL forms from issue 3: home-relative paths, trailing slashes, IPv6 hosts."""

from __future__ import annotations

import pwd
import shutil
import uuid
from pathlib import Path

import pytest
from ssh_server import run_sshd, sftp_server
from test_ssh import assert_all_copied, make_origin, ssh_config

from replicator import ReplicaConfig, Replicator

pytestmark = pytest.mark.anyio


async def test_trailing_slash_changes_nothing(tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    files = make_origin(origin)
    async with sftp_server(tmp_path / "server") as server:
        replica = server.root / "replica"
        replica.mkdir()
        config = ssh_config(tmp_path, origin, server.url("/replica/"), **server.replica_keys())
        async with Replicator(config) as rep:
            summary = await rep.sync_once()
        assert (summary.exit_code, summary.copied) == (0, len(files))
        assert_all_copied(replica, origin, files)
        assert ReplicaConfig(server.url("/replica/")).name == ReplicaConfig(server.url()).name


async def test_home_relative_path_on_openssh(tmp_path: Path) -> None:
    """``ssh://host/~/x`` is ``x`` in the login folder, not ``/x``."""
    origin = tmp_path / "origin"
    files = make_origin(origin)
    with run_sshd(tmp_path / "sshd") as sshd:
        home = Path(pwd.getpwnam(sshd.user).pw_dir)
        folder = f"replicator-test-{uuid.uuid4().hex[:8]}"
        replica = home / folder
        replica.mkdir()
        try:
            keys = sshd.replica_keys()
            config = ssh_config(tmp_path, origin, sshd.url(f"/~/{folder}"), **keys)
            async with Replicator(config) as rep:
                summary = await rep.sync_once()
            assert (summary.exit_code, summary.copied) == (0, len(files))
            assert_all_copied(replica, origin, files)
            assert not Path("/" + folder).exists()
        finally:
            shutil.rmtree(replica)


async def test_ipv6_host(tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    files = make_origin(origin)
    async with sftp_server(tmp_path / "server", host="::1") as server:
        replica = server.root / "replica"
        replica.mkdir()
        url = server.url("/replica")
        assert url.startswith("ssh://tester@[::1]:")
        config = ssh_config(tmp_path, origin, url, **server.replica_keys())
        assert config.replicas[0].ssh_host == "::1"
        async with Replicator(config) as rep:
            summary = await rep.sync_once()
        assert (summary.exit_code, summary.copied) == (0, len(files))
        assert_all_copied(replica, origin, files)
