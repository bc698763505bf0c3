"""The CLI against OpenSSH with what ssh users already have: ``~/.ssh/config`` (host aliases;
user and port in the URL win over it) and ssh-agent instead of an identity_file.

Each test runs ``python -m replicator`` with HOME pointed at a temp folder, so the real
``~/.ssh`` is never read.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from conftest import write
from ssh_server import Sshd, run_sshd
from structlog.testing import capture_logs

from replicator.transports._ssh import SshTransport
from replicator.transports._ssh_options import SshOptions, openssh_client_refusal

FILES = {"a/one.txt": b"one\n", "b/two.dat": os.urandom(3000)}


def home_with(tmp_path: Path, sshd: Sshd, ssh_config: str | None) -> Path:
    """A HOME whose ~/.ssh trusts the sshd (known_hosts) and holds ``ssh_config``; no keys."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(sshd.keys.known_hosts.read_text())
    if ssh_config is not None:
        (home / ".ssh" / "config").write_text(ssh_config)
    return home


def sync(tmp_path: Path, home: Path, url: str, **extra_env: str
         ) -> subprocess.CompletedProcess[str]:
    """``replicator sync --once`` of a small local origin into the replica ``url``."""
    origin = tmp_path / "origin"
    for name, data in FILES.items():
        write(origin / name, data)
    config = tmp_path / "replicator.toml"
    config.write_text(f'[origins.raw]\npath = "{origin}"\nhost = "inst"\nsettle_seconds = 1\n\n'
                      f'[replicas."{url}"]\nconnect_timeout = 5\n')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("REPLICATOR_") and k != "SSH_AUTH_SOCK"}
    env.update(HOME=str(home), REPLICATOR_CONFIG=str(config), NO_COLOR="1", **extra_env)
    return subprocess.run([sys.executable, "-m", "replicator", "sync", "--once"], cwd=tmp_path,
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)


def assert_copied(result: subprocess.CompletedProcess[str], replica: Path,
                  origin: Path) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    for name, data in FILES.items():
        assert (replica / "inst" / str(origin / name).lstrip("/")).read_bytes() == data


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_host_alias_from_ssh_config(tmp_path: Path) -> None:
    """``ssh://archive/path``: host, port, user and key all come from ~/.ssh/config."""
    with run_sshd(tmp_path / "sshd") as sshd:
        home = home_with(tmp_path, sshd, (
            "Host archive\n"
            "    HostName 127.0.0.1\n"
            f"    Port {sshd.port}\n"
            f"    User {sshd.user}\n"
            f"    IdentityFile {sshd.keys.client_key}\n"))
        replica = tmp_path / "replica"
        replica.mkdir()
        assert_copied(sync(tmp_path, home, f"ssh://archive{replica}"), replica,
                      tmp_path / "origin")


@pytest.mark.parametrize("override", ["port", "user"])
def test_url_user_and_port_win_over_ssh_config(tmp_path: Path, override: str) -> None:
    with run_sshd(tmp_path / "sshd") as sshd:
        # The config names a port nobody listens on, or a user the server refuses.
        port = unused_port() if override == "port" else sshd.port
        user = "nobody-here" if override == "user" else sshd.user
        home = home_with(tmp_path, sshd, (
            "Host archive\n"
            "    HostName 127.0.0.1\n"
            f"    Port {port}\n"
            f"    User {user}\n"
            f"    IdentityFile {sshd.keys.client_key}\n"))
        replica = tmp_path / "replica"
        replica.mkdir()
        # The config alone does not reach the server...
        refused = sync(tmp_path, home, f"ssh://archive{replica}")
        assert refused.returncode == 3, refused.stdout + refused.stderr
        # ...the URL's port or user does.
        url = (f"ssh://archive:{sshd.port}{replica}" if override == "port"
               else f"ssh://{sshd.user}@archive{replica}")
        assert_copied(sync(tmp_path, home, url), replica, tmp_path / "origin")


@contextmanager
def ssh_agent(folder: Path, key: Path) -> Iterator[str]:
    """A real ssh-agent holding ``key``; its socket path. Stopped at the end."""
    sock = folder / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ssh-agent did not start")
            time.sleep(0.02)
        subprocess.run(["ssh-add", "-q", str(key)], env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
                       check=True, capture_output=True, timeout=10)
        yield str(sock)
    finally:
        agent.terminate()
        try:
            agent.wait(5)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def test_ssh_agent_authenticates(tmp_path: Path) -> None:
    """No identity_file and no key in ~/.ssh: the agent's key logs in."""
    with run_sshd(tmp_path / "sshd") as sshd:
        home = home_with(tmp_path, sshd, None)
        replica = tmp_path / "replica"
        replica.mkdir()
        url = sshd.url(replica)
        # Without the agent there is no key to log in with.
        refused = sync(tmp_path, home, url)
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert "authentication failed" in refused.stdout, refused.stdout + refused.stderr
        assert not any(replica.iterdir())
        with ssh_agent(tmp_path, sshd.keys.client_key) as sock:
            assert_copied(sync(tmp_path, home, url, SSH_AUTH_SOCK=sock), replica,
                          tmp_path / "origin")


@pytest.mark.anyio
async def test_the_openssh_client_carries_files_only_where_it_reads_homes_ssh(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncssh reads ~/.ssh under $HOME, the OpenSSH client under the account's home
    directory: where they differ, the client could take a name of ~/.ssh/config to another
    host, or log in with other keys. Then files go through asyncssh (the command's start
    of sessions ahead asks the same ``openssh_client_refusal``)."""
    if shutil.which("ssh") is None:
        pytest.skip("no ssh client")
    limiter = anyio.CapacityLimiter(2)
    own = pwd.getpwuid(os.getuid()).pw_dir
    monkeypatch.setenv("HOME", own)
    assert openssh_client_refusal() is None
    assert SshTransport(SshOptions("archive"), "/data", limiter).transfer == "openssh"

    monkeypatch.setenv("HOME", str(tmp_path))
    why = openssh_client_refusal()
    assert why is not None
    assert str(tmp_path) in why
    assert own in why
    with capture_logs() as logs:
        assert SshTransport(SshOptions("archive"), "/data", limiter).transfer == "asyncssh"
    assert [e["event"] for e in logs] == [f"not using the ssh client: {why}"]
    pinned = SshTransport(SshOptions("archive"), "/data", limiter, carriers=("openssh",))
    assert pinned.transfer == "sftp"
