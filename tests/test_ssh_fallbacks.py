"""SFTP servers without fsync@openssh.com or posix-rename@openssh.com: explicit fallbacks."""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh
import pytest
import structlog
from conftest import OLD, write
from ssh_server import sftp_server
from test_ssh import assert_all_copied, make_origin, ssh_config

from replicator import Replicator

pytestmark = pytest.mark.anyio

_MISSING = (b"posix-rename@openssh.com", b"fsync@openssh.com")


async def test_without_fsync_and_posix_rename_copies_work_and_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = asyncssh.sftp.SFTPServerHandler
    monkeypatch.setattr(handler, "_extensions",
                        [e for e in handler._extensions if e[0] not in _MISSING])
    origin = tmp_path / "origin"
    files = make_origin(origin)
    async with sftp_server(tmp_path / "server") as server:
        replica = server.root / "replica"
        replica.mkdir()
        config = ssh_config(tmp_path, origin, server.url(), **server.replica_keys())
        with structlog.testing.capture_logs() as logs:
            async with Replicator(config) as rep:
                summary = await rep.sync_once()
            assert (summary.exit_code, summary.copied) == (0, len(files))
            assert_all_copied(replica, origin, files)
            # Replacing an existing copy needs the fallback rename (SFTP v3 rename refuses to
            # overwrite): remove, then rename, never a partial file.
            files["a/one.txt"] = b"one, second version\n"
            write(origin / "a" / "one.txt", files["a/one.txt"], mtime=OLD + 100)
            async with Replicator(config) as rep:
                again = await rep.sync_once()
            assert (again.exit_code, again.copied) == (0, 1)
            assert_all_copied(replica, origin, files)
    warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert any("fsync@openssh.com" in w for w in warnings), warnings
    assert any("posix-rename@openssh.com" in w for w in warnings), warnings
    assert os.listdir(replica)  # sanity: the copies are really there
