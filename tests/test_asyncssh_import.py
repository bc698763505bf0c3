"""asyncssh is imported without warnings (cryptography 51 warns that DSA is deprecated when
asyncssh's modules load): a run that uses SFTP or lists an SSH origin prints none."""

from __future__ import annotations

import subprocess
import sys


def test_asyncssh_imports_quietly() -> None:
    # A fresh interpreter: this one may have imported asyncssh already.
    code = ("import replicator.transports._asyncssh as m, replicator._lazy as lazy;"
            " m.asyncssh.SSHClientConnection;"
            " lazy.LazyModule('replicator.transports._asyncssh').SFTPError")
    result = subprocess.run([sys.executable, "-W", "error", "-c", code],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
