import socket
from pathlib import Path

import pytest

from replicator._config import (
    Config,
    EngineConfig,
    OriginConfig,
    ReplicaConfig,
    derive_name,
    load_config,
    validate_config,
)
from replicator._errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"

ORIGIN = '[origins.raw]\npath = "/data/raw"\n'


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "replicator.toml"
    path.write_text(text)
    return load_config(path)


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'replicator.toml'}: ")
    return message


def test_example_loads() -> None:
    config = load_config(EXAMPLE)
    assert [o.path for o in config.origins] == ["/data/raw"]
    assert [r.path for r in config.replicas] == ["/mnt/backup"]
    assert config.replicas[0].name == "backup"
    assert config.inventory == EXAMPLE.parent / "replicator.db"


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    for cls in (EngineConfig, OriginConfig, ReplicaConfig):
        for name in cls.__dataclass_fields__:
            if name not in ("name", "url"):
                assert f"{name} = " in text, name


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, ORIGIN + '[replicas."/mnt/backup"]\n')
    assert config.inventory == tmp_path / "replicator.db"
    assert config.engine == EngineConfig()
    assert config.source == tmp_path / "replicator.toml"
    origin = config.origin("raw")
    assert origin == OriginConfig("raw", "/data/raw", host=socket.gethostname())
    replica = config.replica("backup")
    assert replica == ReplicaConfig("/mnt/backup", name="backup")
    assert replica.scheme == "file"
    assert config.origins_for(replica) == (origin,)


def test_empty_file(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    assert config.origins == ()
    assert config.replicas == ()


def test_all_keys(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        [inventory]
        path = "db/inv.db"
        [engine]
        retry_window = 5
        shutdown_grace = 0
        [origins.raw]
        path = "data/raw/"
        host = "acq"
        include = ["**/*.fits"]
        exclude = ["**/.*"]
        settle_seconds = 0
        scan_interval = 1.5
        [origins."b.2"]
        path = "/b"
        [replicas."backup"]
        name = "bk"
        workers = 1
        max_attempts = 3
        backoff_initial = 0
        backoff_max = 0
        op_timeout = 2
        stall_timeout = 3
        layout = "{origin}/{relpath}"
        origins = ["b.2"]
        local = true
        """,
    )
    assert config.inventory == tmp_path / "db/inv.db"
    assert config.engine == EngineConfig(5.0, 0.0)
    raw = config.origin("raw")
    assert raw == OriginConfig(
        "raw", f"{tmp_path}/data/raw", "acq", ("**/*.fits",), ("**/.*",), 0, 1.5
    )
    replica = config.replica("bk")
    assert replica.path == f"{tmp_path}/backup"
    assert (replica.workers, replica.max_attempts, replica.local) == (1, 3, True)
    assert isinstance(replica.op_timeout, float)
    assert config.origins_for(replica) == (config.origin("b.2"),)


def test_lookup_errors(tmp_path: Path) -> None:
    config = load(tmp_path, ORIGIN)
    with pytest.raises(ConfigError, match="no origin named 'x'; known: 'raw'"):
        config.origin("x")
    with pytest.raises(ConfigError, match="no replica named 'x'; known: none"):
        config.replica("x")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"replicator\.toml: configuration file not found"):
        load_config(tmp_path / "replicator.toml")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "replicator.toml").write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(tmp_path / "replicator.toml")


def test_syntax_error_names_line(tmp_path: Path) -> None:
    message = error(tmp_path, ORIGIN + "\nsettle = \n")
    assert "TOML syntax error at line 4, column 10" in message


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("bogus = 1", "bogus", "unknown key"),
        ("inventory = 1", "inventory", "expected a table"),
        ("[inventory]\nfile = 'x'", "inventory.file", "unknown key"),
        ("[inventory]\npath = 3", "inventory.path", "expected a non-empty string, got 3"),
        ("[engine]\nretry = 1", "engine.retry", "unknown key"),
        ("[engine]\nretry_window = 0", "engine.retry_window", "number > 0, got 0"),
        ("[engine]\nshutdown_grace = -1", "engine.shutdown_grace", "number >= 0"),
        ("[engine]\nretry_window = nan", "engine.retry_window", "finite number"),
        ("[engine]\nretry_window = true", "engine.retry_window", "got true"),
        ("origins = 3", "origins", "expected a table"),
        ("replicas = 1", "replicas", "expected a table"),
        ("[replicas]\nx = 1", "replicas.x", "expected a table"),
        ("[origins]\nraw = 3", "origins.raw", "expected a table"),
        ("[origins.raw]\nhost = 'h'", "origins.raw.path", "required key is missing"),
        (ORIGIN + "colour = 1", "origins.raw.colour", "unknown key"),
        (ORIGIN + "host = ''", "origins.raw.host", "non-empty string"),
        (ORIGIN + "include = '*.fits'", "origins.raw.include", "list of strings"),
        (ORIGIN + "exclude = [1]", "origins.raw.exclude", "list of strings"),
        (ORIGIN + "exclude = ['/abs']", "origins.raw.exclude", "invalid glob pattern '/abs'"),
        (ORIGIN + "settle_seconds = -1", "origins.raw.settle_seconds", ">= 0"),
        (ORIGIN + "scan_interval = 0", "origins.raw.scan_interval", "> 0"),
        ("[origins.'a b']\npath = '/a'", 'origins."a b"', "names may only contain"),
        ("[origins.'..']\npath = '/a'", 'origins.".."', "names may only contain"),
        ("[origins.raw]\npath = '~/raw'", "origins.raw.path", "'~' is not expanded"),
    ],
)
def test_rejects(tmp_path: Path, text: str, key: str, reason: str) -> None:
    message = error(tmp_path, text)
    assert f": {key}: " in message
    assert reason in message


R = '[replicas."/mnt/backup"]\n'


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        (R + "speed = 1", 'replicas."/mnt/backup".speed', "unknown key"),
        (R + "workers = 'four'", 'replicas."/mnt/backup".workers', "integer >= 1, got 'four'"),
        (R + "workers = 0", 'replicas."/mnt/backup".workers', "integer >= 1, got 0"),
        (R + "workers = true", 'replicas."/mnt/backup".workers', "got true"),
        (R + "workers = 2.0", 'replicas."/mnt/backup".workers', "got 2.0"),
        (R + "max_attempts = 0", 'replicas."/mnt/backup".max_attempts', "integer >= 1"),
        (R + "backoff_initial = -1", 'replicas."/mnt/backup".backoff_initial', ">= 0"),
        (R + "backoff_max = -1", 'replicas."/mnt/backup".backoff_max', ">= 0"),
        (R + "backoff_initial = 5\nbackoff_max = 4", 'replicas."/mnt/backup".backoff_max', ">="),
        (R + "op_timeout = 0", 'replicas."/mnt/backup".op_timeout', "> 0"),
        (R + "stall_timeout = -2", 'replicas."/mnt/backup".stall_timeout', "> 0"),
        (R + "layout = '{host}/{file}'", 'replicas."/mnt/backup".layout', "unknown field {file}"),
        (R + "layout = '{path:x}'", 'replicas."/mnt/backup".layout', "format specs"),
        (R + "origins = 'raw'", 'replicas."/mnt/backup".origins', "list of strings"),
        (R + "origins = ['nope']", 'replicas."/mnt/backup".origins', "unknown origin 'nope'"),
        (R + "local = 'yes'", 'replicas."/mnt/backup".local', "true or false"),
        (R + "local = false", 'replicas."/mnt/backup".local', "always local"),
        (R + "name = 'a/b'", 'replicas."/mnt/backup".name', "names may only contain"),
        (R + "name = ''", 'replicas."/mnt/backup".name', "non-empty string"),
        ('[replicas."ssh://h/x"]\nlocal = true', 'replicas."ssh://h/x".local', "cannot be local"),
        ('[replicas."ftp://h/x"]', 'replicas."ftp://h/x"', "unsupported URL scheme 'ftp'"),
        ('[replicas."ssh:///x"]', 'replicas."ssh:///x"', "needs a host"),
        ('[replicas."ssh://h"]', 'replicas."ssh://h"', "needs a path"),
        ('[replicas."ssh://h:x/a"]', 'replicas."ssh://h:x/a"', "bad port"),
        ('[replicas."ssh://u:pw@h/a"]', 'replicas."ssh://u:pw@h/a"', "passwords"),
        ('[replicas."ssh://h/~/../a"]', 'replicas."ssh://h/~/../a"', "escapes the home"),
        ('[replicas."ssh://h/a?b"]', 'replicas."ssh://h/a?b"', "query or fragment"),
        ('[replicas."host:/a"]', 'replicas."host:/a"', "scp syntax"),
        ('[replicas."file://other/a"]', 'replicas."file://other/a"', "no host"),
        ('[replicas.""]', 'replicas.""', "empty replica URL"),
        ('[replicas."~/b"]', 'replicas."~/b"', "'~' is not expanded"),
    ],
)
def test_rejects_replica(tmp_path: Path, text: str, key: str, reason: str) -> None:
    message = error(tmp_path, ORIGIN + text)
    assert f": {key}: " in message
    assert reason in message


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        (
            '[origins.a]\npath = "/data"\n[origins.b]\npath = "/data/raw"\n',
            "origins.b.path",
            "overlaps origin 'a'",
        ),
        (
            '[origins.a]\npath = "/data/raw"\n[origins.b]\npath = "/data"\n',
            "origins.b.path",
            "overlaps origin 'a'",
        ),
        (
            '[origins.a]\npath = "/data"\n[origins.b]\npath = "/data/"\n',
            "origins.b.path",
            "overlaps origin 'a'",
        ),
        (ORIGIN + '[replicas."/data/raw/copy"]', 'replicas."/data/raw/copy"', "overlaps origin"),
        (ORIGIN + '[replicas."/data/raw"]', 'replicas."/data/raw"', "overlaps origin"),
        (ORIGIN + '[replicas."/data"]', 'replicas."/data"', "overlaps origin"),
        (ORIGIN + '[replicas."/"]', 'replicas."/"', "overlaps origin"),
        (
            ORIGIN + '[replicas."/a/b"]\n[replicas."/c/b"]',
            'replicas."/c/b"',
            "name 'b' is already used by replicas.\"/a/b\"",
        ),
        (
            ORIGIN + '[replicas."/m"]\nname = "x"\n[replicas."file:///m/"]\nname = "y"',
            'replicas."file:///m/"',
            "overlaps replica 'x'",
        ),
    ],
)
def test_rejects_cross_checks(tmp_path: Path, text: str, key: str, reason: str) -> None:
    message = error(tmp_path, text)
    assert f": {key}: " in message
    assert reason in message


def test_origins_on_different_hosts_may_share_a_path(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[origins.a]\npath = "/data"\nhost = "x"\n[origins.b]\npath = "/data"\nhost = "y"\n',
    )
    assert len(config.origins) == 2


def test_relative_replica_path_resolves(tmp_path: Path) -> None:
    config = load(tmp_path, '[replicas."../backup/"]\n')
    assert config.replicas[0].path == str(tmp_path.parent / "backup")
    assert config.replicas[0].name == "backup"


def test_file_urls(tmp_path: Path) -> None:
    config = load(tmp_path, '[replicas."file:///mnt/my%20disk/"]\n[replicas."file://localhost/x"]')
    assert [r.path for r in config.replicas] == ["/mnt/my disk", "/x"]
    assert [r.name for r in config.replicas] == ["my-disk", "x"]
    assert {r.scheme for r in config.replicas} == {"file"}


def test_ssh_urls(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        [replicas."ssh://user@popeye:22/ceph/magao-x/"]
        local = false
        [replicas."ssh://[::1]/~/backups"]
        [replicas."ssh://Host/~"]
        """,
    )
    a, b, c = config.replicas
    assert (a.scheme, a.ssh_user, a.ssh_host, a.ssh_port) == ("ssh", "user", "popeye", 22)
    assert a.remote_path == "/ceph/magao-x"
    assert a.name == "popeye-magao-x"
    assert (b.ssh_user, b.ssh_host, b.ssh_port, b.remote_path) == (None, "::1", None, "backups")
    assert b.name == "1-backups"
    assert c.remote_path == "."
    assert c.name == "host"
    with pytest.raises(ValueError, match="not a file replica"):
        _ = a.path
    with pytest.raises(ValueError, match="not a ssh replica"):
        _ = ReplicaConfig("/x").ssh_host


def test_derive_name() -> None:
    assert derive_name("/mnt/backup") == "backup"
    assert derive_name("/mnt/backup/") == "backup"
    assert derive_name("/") == "root"
    assert derive_name("ssh://user@popeye:22/ceph/magao-x/") == "popeye-magao-x"
    assert derive_name("ssh://popeye/") == "popeye"


def test_validate_code_built_config() -> None:
    origin = OriginConfig("raw", "/data/raw/", host="h")
    assert origin.path == "/data/raw"
    config = Config(Path("/inv.db"), (origin,), (ReplicaConfig("/mnt/b"),))
    assert validate_config(config) is config

    bad = Config(Path("/inv.db"), (origin,), (ReplicaConfig("/mnt/b", workers=0),))
    with pytest.raises(ConfigError, match=r'^<config>: replicas."/mnt/b".workers: '):
        validate_config(bad)
    relative = Config(Path("/inv.db"), (OriginConfig("raw", "raw"),), ())
    with pytest.raises(ConfigError, match=r"^<config>: origins.raw.path: expected an absolute"):
        validate_config(relative)
    bad_url = Config(Path("/inv.db"), (), (ReplicaConfig("ftp://x/y"),))
    with pytest.raises(ConfigError, match=r'^<config>: replicas."ftp://x/y": unsupported'):
        validate_config(bad_url)
    twice = Config(Path("/inv.db"), (origin, OriginConfig("raw", "/other")), ())
    with pytest.raises(ConfigError, match="duplicate origin name"):
        validate_config(twice)
