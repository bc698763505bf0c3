"""Edits of the configuration file as text, so that the user's comments survive."""

from __future__ import annotations

__all__ = ["append_replica", "origin_names", "remove_replica", "render_initial_config"]

import posixpath
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

import tomli_w

from replicator._config import sanitize_name
from replicator._errors import ConfigError

_HEADER = """\
# replicator configuration. See config.example.toml for every key and its default.
# Relative paths are resolved against the folder of this file.
"""

_REPLICA_HINT = """
# Add replicas as tables keyed by a local path or an ssh:// URL, for example:
#
# [replicas."/mnt/backup"]
# workers = 4
# layout = "{host}/{path}"
"""


def origin_names(paths: Sequence[str]) -> list[str]:
    """One unique name per origin folder, from its base name: raw, raw-2, raw-3..."""
    names: list[str] = []
    for path in paths:
        base = sanitize_name(posixpath.basename(path.rstrip("/")), "root" if path else "origin")
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


def render_initial_config(origins: Sequence[str], inventory: str | None) -> str:
    tables: dict[str, Any] = {}
    if inventory is not None:
        tables["inventory"] = {"path": inventory}
    if origins:
        tables["origins"] = {
            n: {"path": p} for n, p in zip(origin_names(origins), origins, strict=True)
        }
    return "\n".join(filter(None, [_HEADER, tomli_w.dumps(tables)])) + _REPLICA_HINT


def append_replica(text: str, url: str, table: Mapping[str, object]) -> str:
    before = _parse(text)
    if url in before.get("replicas", {}):
        raise ConfigError(f"replica {url!r} is already configured")
    rendered = tomli_w.dumps({"replicas": {url: dict(table)}})
    if text and not text.endswith("\n"):
        text += "\n"
    result = text + ("\n" if text.strip() and not text.endswith("\n\n") else "") + rendered
    _parse(result)  # e.g. an inline `replicas = {...}` table cannot be extended this way
    return result


def remove_replica(text: str, url: str) -> str:
    """Drop the ``[replicas."URL"]`` table; comments directly above the next table stay."""
    lines = text.splitlines(keepends=True)
    target = ("replicas", url)
    start = next((i for i, line in enumerate(lines) if _header(line) == target), None)
    if start is None:
        raise ConfigError(f'no [replicas."{url}"] table in the configuration')
    end = start + 1
    while end < len(lines) and (_header(lines[end]) or target)[:2] == target:
        end += 1
    if end < len(lines):
        while end > start + 1 and lines[end - 1].lstrip().startswith("#"):
            end -= 1
        result = "".join(lines[:start] + lines[end:])
    else:
        result = "".join(lines[:start]).rstrip("\n") + "\n" if start else ""

    # A line that merely looks like a header (inside a multi-line string) would fool the scan
    # above; comparing the parsed documents catches that instead of corrupting the file.
    expected = _parse(text)
    expected["replicas"] = {k: v for k, v in expected.get("replicas", {}).items() if k != url}
    try:
        actual = tomllib.loads(result)
    except tomllib.TOMLDecodeError:
        actual = None
    if actual is None or {"replicas": {}, **actual} != expected:
        raise ConfigError(f'cannot remove [replicas."{url}"] safely; edit the file by hand')
    return result


def _parse(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration is not valid TOML: {exc}") from None


def _header(line: str) -> tuple[str, ...] | None:
    """The key path of a table header line, or None for any other line."""
    stripped = line.strip()
    if not stripped.startswith("["):
        return None
    try:
        node: object = tomllib.loads(stripped)
    except tomllib.TOMLDecodeError:
        return None
    keys: list[str] = []
    while True:
        if isinstance(node, list) and len(node) == 1:  # [[array.of.tables]]
            node = node[0]
        if not isinstance(node, dict) or len(node) != 1:
            return tuple(keys) if node == {} and keys else None
        key, node = next(iter(node.items()))
        keys.append(key)
