"""The configuration model, the TOML loader and the checks shared by both.

Every error is a ConfigError of the form ``FILE: KEY.PATH: reason`` so that the user can
find the offending line without reading a traceback.
"""

from __future__ import annotations

__all__ = [
    "Config",
    "EngineConfig",
    "OriginConfig",
    "ReplicaConfig",
    "derive_name",
    "load_config",
    "sanitize_name",
    "validate_config",
]

import math
import os
import posixpath
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from replicator._errors import ConfigError
from replicator._globs import compile_globs
from replicator._layout import Layout

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_SCP_RE = re.compile(r"[^/]+:")
_TOML_POS_RE = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$", re.DOTALL)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    retry_window: float = 60.0
    shutdown_grace: float = 30.0


class _SshAddress:
    """User, host and port of a config entry's ssh:// URL (``ssh_url``)."""

    __slots__ = ()

    @property
    def ssh_url(self) -> str:
        raise NotImplementedError

    @property
    def ssh_user(self) -> str | None:
        return _parse_url(self.ssh_url, "ssh").user

    @property
    def ssh_host(self) -> str:
        host = _parse_url(self.ssh_url, "ssh").host
        assert host is not None  # _parse_url rejects ssh URLs without a host
        return host

    @property
    def ssh_port(self) -> int | None:
        return _parse_url(self.ssh_url, "ssh").port


@dataclass(frozen=True, slots=True)
class OriginConfig(_SshAddress):
    """A tree to replicate: a local folder, or ``ssh://[user@]host[:port]/path`` (pull mode).

    ``host`` defaults to this machine's host name, or for ssh:// origins to the URL's host.
    """

    name: str
    path: str
    host: str = ""
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    settle_seconds: float = 60.0
    scan_interval: float = 60.0
    # ssh:// origins only; the same keys as ssh:// replicas.
    identity_file: str | None = None
    known_hosts: str | None = None
    connect_timeout: float = 30.0
    connections: int = 2
    insecure_skip_host_key_check: bool = False
    op_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.path.startswith("/"):
            object.__setattr__(self, "path", _normpath(self.path))
        if not self.host:
            host = None
            if self.remote:
                with suppress(ValueError):
                    host = _parse_url(self.path, "ssh").host
            object.__setattr__(self, "host", host or socket.gethostname())

    @property
    def remote(self) -> bool:
        """Whether the origin lives on an SSH host (its path is an ssh:// URL)."""
        m = _SCHEME_RE.match(self.path)
        return m is not None and m.group(1).lower() == "ssh"

    @property
    def ssh_url(self) -> str:
        return self.path

    @property
    def root(self) -> str:
        """The folder scanned: the local path, or the path on the SSH host (absolute, or
        relative to the login's home). File paths in the inventory start with it."""
        return _parse_url(self.path, "ssh").path if self.remote else self.path


@dataclass(frozen=True, slots=True)
class _Url:
    scheme: str
    path: str
    user: str | None = None
    host: str | None = None
    port: int | None = None


@dataclass(frozen=True, slots=True)
class ReplicaConfig(_SshAddress):
    url: str
    name: str = ""
    workers: int = 4
    max_attempts: int = 10
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    op_timeout: float = 60.0
    stall_timeout: float = 60.0
    layout: str = "{host}/{path}"
    origins: tuple[str, ...] = ()
    local: bool | None = None
    # ssh:// replicas only; see config.example.toml.
    identity_file: str | None = None
    known_hosts: str | None = None
    connect_timeout: float = 30.0
    connections: int = 2
    insecure_skip_host_key_check: bool = False
    # How files travel: "auto" streams them to a receiver through the OpenSSH client (or
    # asyncssh), falling back to SFTP; "openssh", "asyncssh" or "sftp" pin one way.
    transfer: str = "auto"

    def __post_init__(self) -> None:
        if not self.name:
            try:
                object.__setattr__(self, "name", derive_name(self.url))
            except ValueError:
                pass  # validate_config reports the bad URL with its key path

    @property
    def scheme(self) -> str:
        """``file`` for local folders, ``ssh`` for remote ones; ValueError for a bad URL."""
        return _parse_url(self.url).scheme

    @property
    def path(self) -> str:
        """The normalised absolute local folder of a file replica."""
        return _parse_url(self.url, "file").path

    @property
    def ssh_url(self) -> str:
        return self.url

    @property
    def remote_path(self) -> str:
        """The folder on the SSH host: absolute, or relative to the login's home."""
        return _parse_url(self.url, "ssh").path


@dataclass(frozen=True, slots=True)
class Config:
    inventory: Path
    origins: tuple[OriginConfig, ...]
    replicas: tuple[ReplicaConfig, ...]
    engine: EngineConfig = EngineConfig()
    source: Path | None = None

    def origin(self, name: str) -> OriginConfig:
        for origin in self.origins:
            if origin.name == name:
                return origin
        raise ConfigError(f"no origin named {name!r}; known: {_names(self.origins)}")

    def replica(self, name: str) -> ReplicaConfig:
        for replica in self.replicas:
            if replica.name == name:
                return replica
        raise ConfigError(f"no replica named {name!r}; known: {_names(self.replicas)}")

    def origins_for(self, replica: ReplicaConfig) -> tuple[OriginConfig, ...]:
        if not replica.origins:
            return self.origins
        return tuple(o for o in self.origins if o.name in replica.origins)


def _names(items: tuple[OriginConfig, ...] | tuple[ReplicaConfig, ...]) -> str:
    return ", ".join(repr(i.name) for i in items) or "none"


# --- URLs and names ------------------------------------------------------------------------


def _normpath(path: str) -> str:
    # posixpath keeps a leading '//' (POSIX leaves it implementation-defined); Linux does not.
    return posixpath.normpath("/" + path.lstrip("/"))


def _parse_url(url: str, want: str | None = None) -> _Url:
    parsed = _parse_url_unchecked(url)
    if want is not None and parsed.scheme != want:
        raise ValueError(f"{url!r} is not a {want} replica")
    return parsed


def _parse_url_unchecked(url: str) -> _Url:
    if not url:
        raise ValueError("empty replica URL")
    if "\0" in url:
        raise ValueError("NUL byte in replica URL")
    m = _SCHEME_RE.match(url)
    if m is None:
        if not url.startswith("/"):
            if _SCP_RE.match(url):
                raise ValueError(f"{url!r} looks like scp syntax; write ssh://host/path")
            raise ValueError(f"{url!r} is a relative path; replica paths must be absolute")
        return _Url("file", _normpath(url))
    scheme = m.group(1).lower()
    if scheme not in ("file", "ssh"):
        raise ValueError(f"unsupported URL scheme {scheme!r}; use a local path or ssh://")
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError("URL must not have a query or fragment (percent-encode '?' and '#')")
    path = unquote(parts.path)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError("file:// URLs must name no host (file:///path)")
        if not path.startswith("/"):
            raise ValueError("file:// URL needs an absolute path")
        return _Url("file", _normpath(path))
    if not parts.hostname:
        raise ValueError("ssh:// URL needs a host (ssh://[user@]host[:port]/path)")
    if parts.password is not None:
        raise ValueError("passwords in ssh:// URLs are not supported; use keys")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in ssh:// URL: {exc}") from None
    if not path.startswith("/"):
        raise ValueError("ssh:// URL needs a path (ssh://host/abs/path or ssh://host/~/path)")
    if path == "/~" or path.startswith("/~/"):
        path = posixpath.normpath(path[3:] or ".")
        if path == ".." or path.startswith("../"):
            raise ValueError("ssh:// URL path escapes the home folder")
    else:
        path = _normpath(path)
    user = unquote(parts.username) if parts.username is not None else None
    return _Url("ssh", path, user, parts.hostname, port)


def sanitize_name(text: str, fallback: str) -> str:
    """Map free text onto the name charset, e.g. a folder name."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")
    return name if name and name not in (".", "..") else fallback


def derive_name(url: str) -> str:
    """The default replica name: ``/mnt/backup`` -> ``backup``,
    ``ssh://user@popeye/ceph/magao-x`` -> ``popeye-magao-x``."""
    parsed = _parse_url(url)
    last = posixpath.basename(parsed.path)
    if parsed.scheme == "file":
        return sanitize_name(last, "root")
    assert parsed.host is not None
    host = sanitize_name(parsed.host, "host")
    return f"{host}-{sanitize_name(last, '')}".rstrip("-") if last not in ("", ".") else host


# --- value checks, shared by the loader and validate_config ----------------------------------


class _Invalid(Exception):
    """A value failed a check; the caller adds file and key path."""


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _integer(minimum: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _Invalid(f"expected an integer >= {minimum}, got {_show(value)}")
        return value

    return check


def _number(op: str) -> Callable[[object], float]:
    def check(value: object) -> float:
        number = math.nan
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        if math.isfinite(number) and (number > 0 or (op == ">=" and number == 0)):
            return number
        raise _Invalid(f"expected a finite number {op} 0, got {_show(value)}")

    return check


def _string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"expected a non-empty string, got {_show(value)}")
    return value


def _choice(*choices: str) -> Callable[[object], str]:
    def check(value: object) -> str:
        if value not in choices:
            raise _Invalid(f"expected one of {', '.join(map(repr, choices))}, got {_show(value)}")
        assert isinstance(value, str)
        return value

    return check


TRANSFERS = ("auto", "openssh", "asyncssh", "sftp")


def _optional_bool(value: object) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_show(value)}")
    return value


def _optional_string(value: object) -> str | None:
    return None if value is None else _string(value)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_show(value)}")
    return value


def _strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f"expected a list of strings, got {_show(value)}")
    return tuple(value)


def _globs(value: object) -> tuple[str, ...]:
    patterns = _strings(value)
    try:
        compile_globs(patterns)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return patterns


def _layout(value: object) -> str:
    try:
        Layout.parse(_string(value))
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    return str(value)


def _name(value: object) -> str:
    name = _string(value)
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise _Invalid(f"names may only contain letters, digits, '_', '.' and '-', got {name!r}")
    return name


_Check = Callable[[object], Any]
_SSH_KEYS_COMMON = ("identity_file", "known_hosts", "connect_timeout", "connections",
                    "insecure_skip_host_key_check")

_ENGINE_KEYS: dict[str, _Check] = {"retry_window": _number(">"), "shutdown_grace": _number(">=")}
_ORIGIN_KEYS: dict[str, _Check] = {
    "path": _string,
    "host": _string,
    "include": _globs,
    "exclude": _globs,
    "settle_seconds": _number(">="),
    "scan_interval": _number(">"),
    "identity_file": _optional_string,
    "known_hosts": _optional_string,
    "connect_timeout": _number(">"),
    "connections": _integer(1),
    "insecure_skip_host_key_check": _bool,
    "op_timeout": _number(">"),
}
# Keys that only make sense for ssh:// origins.
_SSH_ORIGIN_KEYS = (*_SSH_KEYS_COMMON, "op_timeout")
_REPLICA_KEYS: dict[str, _Check] = {
    "name": _name,
    "workers": _integer(1),
    "max_attempts": _integer(1),
    "backoff_initial": _number(">="),
    "backoff_max": _number(">="),
    "op_timeout": _number(">"),
    "stall_timeout": _number(">"),
    "layout": _layout,
    "origins": _strings,
    "local": _optional_bool,
    "identity_file": _optional_string,
    "known_hosts": _optional_string,
    "connect_timeout": _number(">"),
    "connections": _integer(1),
    "insecure_skip_host_key_check": _bool,
    "transfer": _choice(*TRANSFERS),
}
# Keys that only make sense for ssh:// replicas: an error on local ones, not silently ignored.
_SSH_REPLICA_KEYS = (*_SSH_KEYS_COMMON, "transfer")
_SSH_PATH_KEYS = ("identity_file", "known_hosts")
_REPLICA_DEFAULTS = {f.name: f.default for f in fields(ReplicaConfig)}
_ORIGIN_DEFAULTS = {f.name: f.default for f in fields(OriginConfig)}
_INVENTORY_KEYS: dict[str, _Check] = {"path": _string}
_TOP_KEYS = ("inventory", "engine", "origins", "replicas")


def _key(*parts: str) -> str:
    return ".".join(p if _BARE_KEY_RE.fullmatch(p) else _quote(p) for p in parts)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Reporter:
    def __init__(self, label: str) -> None:
        self.label = label

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.label}: {key}: {reason}" if key else f"{self.label}: {reason}")

    def check(self, key: str, check: _Check, value: object) -> Any:
        try:
            return check(value)
        except _Invalid as exc:
            raise self.error(key, str(exc)) from None

    def table(
        self, key: str, raw: object, checks: Mapping[str, _Check], required: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """Check a TOML table: every key known, every value valid, required keys present."""
        if not isinstance(raw, dict):
            raise self.error(key, f"expected a table, got {_show(raw)}")
        out = {}
        for name, value in raw.items():
            if name not in checks:
                known = ", ".join(checks)
                raise self.error(f"{key}.{_key(name)}", f"unknown key; known keys: {known}")
            out[name] = self.check(f"{key}.{_key(name)}", checks[name], value)
        for name in required:
            if name not in out:
                raise self.error(f"{key}.{_key(name)}", "required key is missing")
        return out


# --- loading -------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> Config:
    label = os.fspath(path)
    report = _Reporter(label)
    try:
        text = Path(label).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{label}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read configuration: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: not valid UTF-8 (byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_POS_RE.match(str(exc))
        where = f"line {m.group(2)}, column {m.group(3)}: {m.group(1)}" if m else str(exc)
        raise ConfigError(f"{label}: TOML syntax error at {where}") from None

    source = Path(os.path.abspath(label))
    base = source.parent

    def resolve(key: str, value: str) -> str:
        if value.startswith("~"):
            raise report.error(key, "'~' is not expanded; write an absolute path")
        return _normpath(os.path.join(base, value))

    for name in data:
        if name not in _TOP_KEYS:
            raise report.error(_key(name), f"unknown key; known keys: {', '.join(_TOP_KEYS)}")

    inventory = report.table("inventory", data.get("inventory", {}), _INVENTORY_KEYS)
    engine = EngineConfig(**report.table("engine", data.get("engine", {}), _ENGINE_KEYS))

    origins = []
    raw_origins = data.get("origins", {})
    if not isinstance(raw_origins, dict):
        raise report.error("origins", f"expected a table, got {_show(raw_origins)}")
    for name, raw in raw_origins.items():
        key = _key("origins", name)
        report.check(key, _name, name)
        values = report.table(key, raw, _ORIGIN_KEYS, required=("path",))
        remote = bool(_SCHEME_RE.match(values["path"]))
        if not remote:
            values["path"] = resolve(f"{key}.path", values["path"])
        for option in _SSH_ORIGIN_KEYS:
            if option in values and not remote:
                raise report.error(f"{key}.{option}", "only ssh:// origins take this key")
        for option in _SSH_PATH_KEYS:
            if option in values:
                values[option] = resolve(f"{key}.{option}", values[option])
        origins.append(OriginConfig(name=name, **values))

    replicas = []
    raw_replicas = data.get("replicas", {})
    if not isinstance(raw_replicas, dict):
        raise report.error("replicas", f"expected a table, got {_show(raw_replicas)}")
    for url, raw in raw_replicas.items():
        key = _key("replicas", url)
        values = report.table(key, raw, _REPLICA_KEYS)
        if url and not (_SCHEME_RE.match(url) or url.startswith("/") or _SCP_RE.match(url)):
            url = resolve(key, url)
        try:
            scheme = _parse_url(url).scheme
        except ValueError:
            scheme = "file"  # _validate reports the bad URL
        for name in _SSH_REPLICA_KEYS:
            if name in values and scheme != "ssh":
                raise report.error(f"{key}.{name}", "only ssh:// replicas take this key")
        for name in _SSH_PATH_KEYS:
            if name in values:
                values[name] = resolve(f"{key}.{name}", values[name])
        replicas.append(ReplicaConfig(url=url, **values))

    config = Config(
        inventory=Path(resolve("inventory.path", inventory.get("path", "replicator.db"))),
        origins=tuple(origins),
        replicas=tuple(replicas),
        engine=engine,
        source=source,
    )
    return _validate(config, report)


# --- validation ----------------------------------------------------------------------------


def validate_config(config: Config) -> Config:
    """Check values and cross-references; return the config unchanged or raise ConfigError."""
    return _validate(config, _Reporter(str(config.source) if config.source else "<config>"))


def _inside(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _check_origin_path(report: _Reporter, key: str, origin: OriginConfig) -> None:
    if not origin.remote:
        if not origin.path.startswith("/"):
            raise report.error(f"{key}.path", f"expected an absolute path, got {origin.path!r}")
        for name in _SSH_ORIGIN_KEYS:
            if getattr(origin, name) != _ORIGIN_DEFAULTS[name]:
                raise report.error(f"{key}.{name}", "only ssh:// origins take this key")
        return
    try:
        root = origin.root
    except ValueError as exc:
        raise report.error(f"{key}.path", str(exc)) from None
    if root in ("/", "."):
        raise report.error(f"{key}.path", "an ssh:// origin cannot be the whole file system"
                           " or the whole home folder; name a folder below it")


def _validate(config: Config, report: _Reporter) -> Config:
    for name, check in _ENGINE_KEYS.items():
        report.check(_key("engine", name), check, getattr(config.engine, name))

    seen: dict[str, OriginConfig] = {}
    for origin in config.origins:
        key = _key("origins", origin.name)
        report.check(key, _name, origin.name)
        if origin.name in seen:
            raise report.error(key, "duplicate origin name")
        for name, check in _ORIGIN_KEYS.items():
            report.check(f"{key}.{name}", check, getattr(origin, name))
        _check_origin_path(report, key, origin)
        for other in seen.values():
            # Origins are (host, folder): the same folder on two hosts is two origins. A
            # home-relative remote folder is only compared with other home-relative ones.
            if (other.host == origin.host
                    and other.root.startswith("/") == origin.root.startswith("/")
                    and (_inside(origin.root, other.root) or _inside(other.root, origin.root))):
                raise report.error(
                    f"{key}.path",
                    f"{origin.path!r} overlaps origin {other.name!r} ({other.path!r})",
                )
        seen[origin.name] = origin

    names: dict[str, ReplicaConfig] = {}
    local_paths: dict[str, ReplicaConfig] = {}
    for replica in config.replicas:
        key = _key("replicas", replica.url)
        try:
            url = _parse_url(replica.url)
        except ValueError as exc:
            raise report.error(key, str(exc)) from None
        for name, check in _REPLICA_KEYS.items():
            report.check(f"{key}.{name}", check, getattr(replica, name))
        if replica.backoff_max < replica.backoff_initial:
            raise report.error(
                f"{key}.backoff_max",
                f"must be >= backoff_initial ({replica.backoff_initial}),"
                f" got {replica.backoff_max}",
            )
        if url.scheme == "ssh" and replica.local is True:
            raise report.error(f"{key}.local", "an ssh:// replica cannot be local")
        if url.scheme == "file" and replica.local is False:
            raise report.error(f"{key}.local", "a local path is always local; use ssh:// instead")
        if url.scheme != "ssh":
            for name in _SSH_REPLICA_KEYS:
                if getattr(replica, name) != _REPLICA_DEFAULTS[name]:
                    raise report.error(f"{key}.{name}", "only ssh:// replicas take this key")
        for wanted in replica.origins:
            if wanted not in seen:
                known = _names(config.origins)
                raise report.error(f"{key}.origins", f"unknown origin {wanted!r}; known: {known}")
        if url.scheme == "ssh":
            for origin in config.origins:
                # A replica inside an origin on the same host would be scanned as new files.
                if (origin.remote and origin.ssh_host.lower() == str(url.host).lower()
                        and origin.root.startswith("/") == url.path.startswith("/")
                        and (_inside(url.path, origin.root) or _inside(origin.root, url.path))):
                    raise report.error(
                        key, f"replica folder {url.path!r} on {url.host} overlaps origin"
                        f" {origin.name!r} ({origin.path!r})")
        if replica.name in names:
            used_by = _key("replicas", names[replica.name].url)
            raise report.error(
                key, f"name {replica.name!r} is already used by {used_by}; set a distinct name"
            )
        names[replica.name] = replica
        if url.scheme != "file":
            continue
        for origin in config.origins:
            if origin.remote:
                continue  # on another host: a local folder cannot overlap it
            if _inside(url.path, origin.path) or _inside(origin.path, url.path):
                raise report.error(
                    key,
                    f"replica folder {url.path!r} overlaps origin {origin.name!r}"
                    f" ({origin.path!r})",
                )
        for path, sibling in local_paths.items():
            if _inside(url.path, path) or _inside(path, url.path):
                raise report.error(
                    key, f"replica folder {url.path!r} overlaps replica {sibling.name!r} ({path!r})"
                )
        local_paths[url.path] = replica
    return config
