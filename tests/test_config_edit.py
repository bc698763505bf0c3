import tomllib
from pathlib import Path

import pytest

from replicator._config import load_config
from replicator._config_edit import (
    append_replica,
    origin_names,
    remove_replica,
    render_initial_config,
)
from replicator._errors import ConfigError

TEXT = """\
# top comment
[origins.raw]  # trailing comment
path = "/data/raw"

# about the first replica
[replicas."/mnt/a"]
workers = 2
# inside a

[ replicas . '/mnt/b' ]
workers = 3

# about c
[replicas."/mnt/c"]
layout = "{origin}/{relpath}"
"""


def test_origin_names() -> None:
    assert origin_names(["/data/raw", "/x/raw/", "/y/raw", "/my data", "/"]) == [
        "raw",
        "raw-2",
        "raw-3",
        "my-data",
        "root",
    ]


def test_initial_config_loads(tmp_path: Path) -> None:
    text = render_initial_config(["/data/raw", "/other/raw"], "inv.db")
    assert text.startswith("#")
    path = tmp_path / "replicator.toml"
    path.write_text(text)
    config = load_config(path)
    assert [(o.name, o.path) for o in config.origins] == [
        ("raw", "/data/raw"),
        ("raw-2", "/other/raw"),
    ]
    assert config.inventory == tmp_path / "inv.db"
    assert config.replicas == ()


def test_initial_config_without_anything() -> None:
    assert tomllib.loads(render_initial_config([], None)) == {}


def test_append_then_load(tmp_path: Path) -> None:
    text = render_initial_config(["/data/raw"], None)
    text = append_replica(text, "/mnt/backup", {"workers": 2, "origins": ["raw"]})
    text = append_replica(text, "ssh://u@popeye/ceph/x", {})
    path = tmp_path / "replicator.toml"
    path.write_text(text)
    config = load_config(path)
    assert config.replica("backup").workers == 2
    assert config.replica("popeye-x").ssh_host == "popeye"


def test_append_keeps_text_and_separates() -> None:
    original = "# comment\n[origins.raw]\npath = '/d'"
    text = append_replica(original, "/mnt/x", {"workers": 1})
    assert text == original + '\n\n[replicas."/mnt/x"]\nworkers = 1\n'
    assert append_replica("", "/m", {}) == '[replicas."/m"]\n'


def test_append_rejects_duplicates() -> None:
    with pytest.raises(ConfigError, match="already configured"):
        append_replica(TEXT, "/mnt/b", {})


def test_remove_middle_keeps_everything_else() -> None:
    result = remove_replica(TEXT, "/mnt/a")
    assert result == TEXT.replace('[replicas."/mnt/a"]\nworkers = 2\n# inside a\n\n', "")


def test_remove_with_other_quoting_keeps_comment_of_next_table() -> None:
    result = remove_replica(TEXT, "/mnt/b")
    assert result == TEXT.replace("[ replicas . '/mnt/b' ]\nworkers = 3\n\n", "")
    assert "# about c\n" in result


def test_remove_last() -> None:
    result = remove_replica(TEXT, "/mnt/c")
    assert result == TEXT.split('[replicas."/mnt/c"]')[0]
    assert tomllib.loads(result)["replicas"].keys() == {"/mnt/a", "/mnt/b"}


def test_remove_round_trip(tmp_path: Path) -> None:
    base = render_initial_config(["/data/raw"], None)
    assert remove_replica(append_replica(base, "/mnt/x", {"workers": 1}), "/mnt/x") == base


def test_remove_missing() -> None:
    with pytest.raises(ConfigError, match=r'no \[replicas."/mnt/z"\] table'):
        remove_replica(TEXT, "/mnt/z")


def test_remove_refuses_when_scan_is_fooled() -> None:
    text = '[replicas."/m"]\nnote = """\n[origins.x]\n"""\nworkers = 1\n'
    with pytest.raises(ConfigError, match="edit the file by hand"):
        remove_replica(text, "/m")
