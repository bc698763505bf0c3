"""Shared fixtures: real folders, a real SQLite inventory, configs built in code."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from replicator import Config, EngineConfig, OriginConfig, ReplicaConfig

OLD = time.time() - 3600  # older than any settle_seconds used in tests


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's own cache folder (the records of ``_early``, commands included): no
    test starts a login another one recorded, none writes the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


def write(path: Path, data: bytes, mtime: float = OLD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


def backdate(root: Path, mtime: float = OLD) -> None:
    """Make every entry under ``root`` older than the settle time."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (mtime, mtime), follow_symlinks=False)


def make_config(
    tmp: Path,
    origin: Path,
    replicas: list[Path],
    *,
    settle: float = 1.0,
    retry_window: float = 2.0,
    shutdown_grace: float = 5.0,
    **replica_keys: object,
) -> Config:
    return Config(
        inventory=tmp / "inventory.db",
        origins=(OriginConfig("raw", str(origin), host="inst", settle_seconds=settle,
                              scan_interval=0.5),),
        replicas=tuple(
            ReplicaConfig(str(r), backoff_initial=0.05, backoff_max=0.2, **replica_keys)  # type: ignore[arg-type]
            for r in replicas
        ),
        engine=EngineConfig(retry_window=retry_window, shutdown_grace=shutdown_grace),
    )


def replica_path(replica: Path, origin_file: Path | bytes, host: str = "inst") -> Path:
    """Where the default layout ``{host}/{path}`` puts an origin file."""
    raw = origin_file if isinstance(origin_file, bytes) else os.fsencode(origin_file)
    return Path(os.fsdecode(os.path.join(os.fsencode(replica), host.encode(), raw.lstrip(b"/"))))


def temp_files(root: Path) -> list[str]:
    found = []
    for dirpath, _dirs, files in os.walk(root):
        found += [os.path.join(dirpath, f) for f in files if f.startswith(".~rep-")]
    return found


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(origin, replica1, replica2) folders, all existing and empty."""
    origin, r1, r2 = tmp_path / "origin", tmp_path / "r1", tmp_path / "r2"
    for p in (origin, r1, r2):
        p.mkdir()
    return origin, r1, r2
