"""How to reach an SSH host (``SshOptions``), and the OpenSSH client's command line that
starts a receiver session with those options.

Imports neither asyncssh nor the rest of the transport: the command line builds its first
receiver session's command line here while the engine's modules are still to be imported
(the session itself is started by ``_logins``).
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from math import ceil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._config import OriginConfig, ReplicaConfig

GCM_FIRST = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"
# Cleanup after cancellation or failure must not hang on a dead server.
CLEANUP_TIMEOUT = 5.0
WHOLE_SECOND = 1_000_000_000
RECEIVER_SOURCE = (Path(__file__).with_name("_receiver.py")).read_bytes()


@dataclass(frozen=True, slots=True)
class SshOptions:
    """How to reach one SSH host; equal options share one connection pool."""

    host: str
    port: int | None = None
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    insecure: bool = False
    connect_timeout: float = 30.0
    connections: int = 2
    keepalive_interval: float = 15.0
    keepalive_count_max: int = 3

    @property
    def where(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{user}{self.host}{port}"

    @property
    def known_hosts_path(self) -> str:
        return self.known_hosts or os.path.expanduser("~/.ssh/known_hosts")

    def keyscan_hint(self) -> str:
        port = f"-p {self.port} " if self.port else ""
        return f"ssh-keyscan {port}{self.host} >> {self.known_hosts_path}"


def options_for(config: ReplicaConfig | OriginConfig) -> SshOptions:
    """Connection options of an ssh:// replica or origin (both carry the same keys)."""
    return SshOptions(
        host=config.ssh_host, port=config.ssh_port, user=config.ssh_user,
        identity_file=config.identity_file, known_hosts=config.known_hosts,
        insecure=config.insecure_skip_host_key_check,
        connect_timeout=config.connect_timeout, connections=config.connections,
    )


def _quote_option(value: str) -> str:
    # ssh splits -o values on whitespace (UserKnownHostsFile takes several files).
    return f'"{value}"' if any(c.isspace() for c in value) else value


def openssh_argv(o: SshOptions, command: str) -> list[str]:
    """The ``ssh`` command line running ``command`` with the transport's own rules."""
    argv = ["ssh", "-T", "-x", "-a", "-o", "BatchMode=yes", "-o", "ClearAllForwardings=yes",
            "-o", "ControlPath=none", "-o", f"ConnectTimeout={ceil(o.connect_timeout)}",
            "-o", f"ServerAliveInterval={ceil(o.keepalive_interval)}",
            "-o", f"ServerAliveCountMax={o.keepalive_count_max}", "-o", f"Ciphers={GCM_FIRST}"]
    if o.insecure:
        argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "LogLevel=ERROR"]
    else:
        # Trust exactly what the asyncssh path trusts: the configured known_hosts file (no
        # DNS records, no checks of the address beside the name, no keys vouched for by a
        # command of an ssh_config), which is read and never written (no keys learnt
        # from the server). Options given here win over any ssh_config file.
        argv += ["-o", "StrictHostKeyChecking=yes",
                 "-o", f"UserKnownHostsFile={_quote_option(o.known_hosts_path)}",
                 "-o", "GlobalKnownHostsFile=/dev/null", "-o", "VerifyHostKeyDNS=no",
                 "-o", "CheckHostIP=no", *client_only_options()]
    if o.identity_file:
        argv += ["-i", o.identity_file, "-o", "IdentitiesOnly=yes"]
    if o.port:
        argv += ["-p", str(o.port)]
    if o.user:
        argv += ["-l", o.user]
    return [*argv, "--", o.host, command]


@functools.cache
def client_only_options() -> tuple[str, ...]:
    """``-o UpdateHostKeys=no`` (OpenSSH 6.8) and ``-o KnownHostsCommand=none`` (8.5),
    unless ``ssh -V`` says the client is older: an option a client does not know fails
    every session. A client that does not tell gets both (if it refuses them, its
    sessions fail and the transport goes on through asyncssh, which has neither).

    Runs ``ssh -V`` once per process (a few milliseconds): call it first from a thread.
    """
    version = _openssh_version()
    options: list[str] = []
    if version is None or version >= (6, 8):
        options += ["-o", "UpdateHostKeys=no"]
    if version is None or version >= (8, 5):
        options += ["-o", "KnownHostsCommand=none"]
    return tuple(options)


NO_SSH_CLIENT = "no ssh client is installed"


def openssh_client_refusal() -> str | None:
    """Why the OpenSSH client may not carry a replica's files here, or None when it may.

    It must obey the asyncssh path's rules (``openssh_argv``), and read the same ~/.ssh:
    asyncssh finds ~/.ssh/config (host aliases, users, ports) and the default keys under
    ``$HOME``, the OpenSSH client under the account's home directory, whatever ``$HOME``
    says. Where the two differ (``HOME`` set for a service, or kept by sudo) the client
    could take the same name to another host or log in with other keys.
    """
    if shutil.which("ssh") is None:
        return NO_SSH_CLIENT
    home = os.path.expanduser("~")
    try:
        import pwd

        own = pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError):
        return "the account has no home directory the ssh client would read"
    if os.path.realpath(home) != os.path.realpath(own):
        return (f"HOME ({home}) is not the account's home directory ({own}), where the ssh"
                f" client would read ~/.ssh")
    return None


def _openssh_version() -> tuple[int, int] | None:
    """(major, minor) of the ``ssh`` on the PATH; None when it does not say."""
    try:
        said = subprocess.run(["ssh", "-V"], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=CLEANUP_TIMEOUT, check=False).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(rb"OpenSSH_(?:for_Windows_)?(\d+)\.(\d+)", said)
    return None if found is None else (int(found[1]), int(found[2]))


# The receiver's interpreter: the first of these that the host has, else the first python3
# on the PATH. The receiver needs the standard library of Python 3.6 or later only, which any
# of them has; a host's own interpreter starts at once, where the PATH's python3 may be a
# version manager's shim (pyenv's costs about 70 ms of CPU and of waiting per session).
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")


def receiver_command(root: bytes) -> str:
    """One shell line: python3 reads the receiver's source from stdin, then serves."""
    # Read exactly the source from the descriptor (a buffered read could take frames that
    # follow it, which the receiver reads from the same descriptor).
    # One line (a csh login shell refuses newlines in quotes); the read loop is a lambda.
    loader = ("import os;r=lambda n:(lambda d:d+r(n-len(d)) if 0<len(d)<n else d)"
              f"(os.read(0,n));exec(compile(r({len(RECEIVER_SOURCE)}),"
              '"replicator-receiver","exec"))')
    args = f"{shlex.quote(loader)} {shlex.quote(os.fsdecode(root))}"
    # -I -S: the standard library only, none of the host's site-packages, .pth files or
    # PYTHON* variables (a start about 20 ms shorter, and none of them can break it).
    if not SYSTEM_PYTHONS:
        return f"exec python3 -I -S -c {args}"
    # The choice is made by sh whatever the login shell (csh and fish have no such loop):
    # the loader and the root are its $0 and $1.
    run = 'exec "$p" -I -S -c "$0" "$1"'
    script = (f"for p in {' '.join(SYSTEM_PYTHONS)}; do if [ -x \"$p\" ]; then {run}; fi; "
              f"done; p=python3; {run}")
    return f"exec sh -c {shlex.quote(script)} {args}"


def session_argv(o: SshOptions, root: bytes) -> list[str]:
    """The ``ssh`` command line of a receiver session for the replica root ``root``: the one
    ``SshTransport`` runs, and the one the command line may start ahead (``_spares``)."""
    return openssh_argv(o, receiver_command(root))


def show(path: bytes) -> str:
    return repr(os.fsdecode(path))


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


# Hosts whose key was refused, with the known_hosts file's stamp then: no client of this
# process knocks on them again until that file changes.
_REFUSED: dict[SshOptions, tuple[str, tuple[int, int] | None]] = {}


def refuse(o: SshOptions, why: str) -> str:
    """Remember that ``o``'s host must not be trusted; the message that says so."""
    message = (f"ssh {o.where}: {why}. If this is the right host, add its key with:"
               f" {o.keyscan_hint()}")
    _REFUSED[o] = (message, _stamp(o.known_hosts_path))
    return message


def refusal(o: SshOptions) -> str | None:
    """Why no client may log in to ``o``'s host now: a host key refused while known_hosts
    has not changed since, or no known_hosts file to check it with. Asked before every
    login: the SFTP pool's and the OpenSSH client's."""
    refused = _REFUSED.get(o)
    if refused is not None:
        message, stamp = refused
        if stamp == _stamp(o.known_hosts_path):
            return message
        del _REFUSED[o]
    if not o.insecure and _stamp(o.known_hosts_path) is None:
        return refuse(o, f"known_hosts file {o.known_hosts_path!r} does not exist")
    return None
