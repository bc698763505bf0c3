"""A private OpenSSH sshd on 127.0.0.1: its own host key, client key and known_hosts."""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"


class SshdUnavailable(Exception):
    """sshd cannot be started here (the reason is the message)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise SshdUnavailable(f"sshd exited: {log.read_text(errors='replace').strip()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SshdUnavailable("sshd did not start listening") from None
            time.sleep(0.02)


@dataclass
class Sshd:
    folder: Path
    port: int = 0
    user: str = field(default_factory=getpass.getuser)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_key(self) -> Path:
        return self.folder / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.folder / "known_hosts"

    @property
    def host_key(self) -> Path:
        return self.folder / "ssh_host_ed25519_key"

    def start(self) -> None:
        for tool in (SSHD, "ssh", "ssh-keygen"):
            if not shutil.which(tool):
                raise SshdUnavailable(f"{tool} not installed (apt-get install openssh-server)")
        self.folder.mkdir(parents=True, exist_ok=True)
        for key in (self.client_key, self.host_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench",
                            "-f", str(key)], check=True, stdin=subprocess.DEVNULL)
        authorized = self.folder / "authorized_keys"
        shutil.copyfile(f"{self.client_key}.pub", authorized)
        self.known_hosts.write_text("")
        self.port = free_port()
        config = self.folder / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {self.folder / 'sshd.pid'}",
            f"AuthorizedKeysFile {authorized}",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "UseDNS no",
            "MaxStartups 100:30:200",
            "MaxSessions 100",
            "Subsystem sftp internal-sftp",
            "LogLevel ERROR",
            "",
        ]))
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation
        check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True)
        if check.returncode:
            raise SshdUnavailable(f"sshd -t: {check.stderr.strip()}")
        log = self.folder / "sshd.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_listening(self.port, self.proc, log, 10)
        self.trust(self.port)

    def trust(self, port: int) -> None:
        """Add the host key for ``[127.0.0.1]:port`` (the sshd's port or a proxy's)."""
        public = Path(f"{self.host_key}.pub").read_text().split()
        with self.known_hosts.open("a") as out:
            out.write(f"[127.0.0.1]:{port} {public[0]} {public[1]}\n")

    def ssh_argv(self, port: int | None = None) -> list[str]:
        """The ssh client command (default cipher; no user config, no agent)."""
        return ["ssh", "-F", "/dev/null", "-p", str(port or self.port), "-i", str(self.client_key),
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "IdentityAgent=none"]

    def rsync_rsh(self, port: int | None = None) -> str:
        return " ".join(self.ssh_argv(port))

    def probe(self, port: int | None = None) -> dict[str, str]:
        """Log in once: the negotiated cipher and the remote rsync, or SshdUnavailable."""
        argv = [*self.ssh_argv(port), "-v", f"{self.user}@127.0.0.1", "rsync --version"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        if done.returncode:
            tail = done.stderr.strip().splitlines()[-3:]
            raise SshdUnavailable(f"ssh login or remote rsync failed: {' | '.join(tail)}")
        cipher = re.search(r"kex: client->server cipher: (\S+)", done.stderr)
        return {"cipher": cipher.group(1) if cipher else "unknown",
                "remote_rsync": done.stdout.splitlines()[0] if done.stdout else "",
                "ssh_version": subprocess.run(["ssh", "-V"], capture_output=True,
                                              text=True).stderr.strip()}

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
