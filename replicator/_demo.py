"""``replicator demo``: a sample tree, a config for it, one sync, the status."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from ._config_edit import append_replica, render_initial_config


def make_sample_tree(root: Path, nights: int = 3, files_per_night: int = 40) -> None:
    """A small instrument-like tree: nights of frames, a log, a symlink, odd names."""
    rng = random.Random(42)
    old = time.time() - 3600
    for night in range(nights):
        folder = root / "camsci1" / f"2026_11_{20 + night:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(files_per_night):
            path = folder / f"frame_{index:04d}.fits"
            path.write_bytes(rng.randbytes(rng.randint(1_000, 40_000)))
        (folder / "notes - ñight log.txt").write_text(f"night {night}: clear skies\n")
    (root / "camsci1" / "latest").unlink(missing_ok=True)
    os.symlink(f"2026_11_{20 + nights - 1:02d}", root / "camsci1" / "latest")
    for path in root.rglob("*"):
        # Written an hour ago: older than settle_seconds, so ready to copy.
        os.utime(path, (old, old), follow_symlinks=False)


def run_demo(scratch: Path) -> int:
    from .cli import main

    scratch = scratch.absolute()
    origin = scratch / "instrument"
    backup = scratch / "backup"
    backup.mkdir(parents=True, exist_ok=True)
    make_sample_tree(origin)
    config = scratch / "replicator.toml"
    text = render_initial_config([str(origin)], str(scratch / "replicator.db"))
    config.write_text(append_replica(text, str(backup), {"name": "backup"}))
    print(f"demo: sample tree {origin}, replica {backup}, config {config}\n")
    code = main(["-c", str(config), "sync", "--once"])
    if code:
        return code
    return main(["-c", str(config), "status"])
