import pytest

from replicator._layout import Layout


def render(template: str, path: bytes, root: bytes = b"/data/raw", host: str = "h") -> bytes:
    return Layout.parse(template).render(host=host, origin="raw", root=root, path=path)


def test_fields() -> None:
    path = b"/data/raw/2024/a.fits"
    assert render("{host}/{path}", path) == b"h/data/raw/2024/a.fits"
    assert render("{origin}/{relpath}", path) == b"raw/2024/a.fits"
    assert render("flat/{name}", path) == b"flat/a.fits"
    assert Layout.parse("{host}/{path}").fields == {"host", "path"}


def test_root_is_slash_and_trailing_slash() -> None:
    assert render("{relpath}", b"/a/b", root=b"/") == b"a/b"
    assert render("{relpath}", b"/data/raw/a", root=b"/data/raw/") == b"a"


def test_non_utf8_bytes_round_trip() -> None:
    assert render("{host}/{relpath}", b"/data/raw/caf\xe9") == b"h/caf\xe9"


def test_collapses_doubled_slashes() -> None:
    assert render("{host}//{relpath}", b"/data/raw/a") == b"h/a"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{host}/{bogus}", "unknown field {bogus}"),
        ("{}/{path}", "positional"),
        ("{0}/{path}", "positional"),
        ("{path!r}", "conversions"),
        ("{path:>10}", "format specs"),
        ("{path.x}", "unknown field"),
        ("{path", "bad layout"),
        ("}{path}", "bad layout"),
        ("{host}/x", "must contain"),
    ],
)
def test_parse_rejects(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Layout.parse(template)


@pytest.mark.parametrize(
    ("template", "host", "path"),
    [
        ("{host}/{path}", "", b"/data/raw/a"),  # absolute
        ("{relpath}/", "h", b"/data/raw/a"),  # trailing slash
        ("{host}/{relpath}", "..", b"/data/raw/a"),
        ("{host}/{relpath}", ".", b"/data/raw/a"),
        ("{host}/{relpath}", "a\0b", b"/data/raw/a"),
        ("../{relpath}", "h", b"/data/raw/a"),
    ],
)
def test_render_never_escapes(template: str, host: str, path: bytes) -> None:
    with pytest.raises(ValueError, match="layout rendered"):
        render(template, path, host=host)


def test_render_rejects_file_outside_root() -> None:
    with pytest.raises(ValueError, match="not inside"):
        render("{relpath}", b"/data/rawx/a")
    with pytest.raises(ValueError, match="not inside"):
        render("{relpath}", b"/data/raw")


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        # One field from the path, fixed text around it (joined once per renderer).
        ("{host}/{origin}/x/{relpath}.bak", b"h/raw/x/2024/a.fits.bak"),
        ("pre-{name}", b"pre-a.fits"),
        ("{path}", b"data/raw/2024/a.fits"),
        # Two fields from the path: the general loop over the pieces.
        ("{relpath}/{name}", b"2024/a.fits/a.fits"),
        ("{host}/{name}/{origin}/{path}", b"h/a.fits/raw/data/raw/2024/a.fits"),
    ],
)
def test_render_one_and_several_path_fields(template: str, expected: bytes) -> None:
    assert render(template, b"/data/raw/2024/a.fits") == expected


@pytest.mark.parametrize(
    ("template", "origins", "unique"),
    [
        ("{host}/{path}", 1, True),
        ("{relpath}", 1, True),
        ("{origin}/x/{relpath}.bak", 1, True),
        ("{relpath}", 2, False),  # two origins can hold the same relative path
        ("{origin}/{relpath}", 2, False),  # "a" + "b/x" and "ab" + "/x": not proved
        ("{name}", 1, False),  # a bare name repeats across folders
        ("{relpath}/{name}", 1, False),  # two file fields: not proved
        ("{path}/{relpath}", 1, False),
    ],
)
def test_unique_per_file(template: str, origins: int, unique: bool) -> None:
    assert Layout.parse(template).unique_per_file(origins) is unique


@pytest.mark.parametrize(
    ("template", "name_last"),
    [
        ("{relpath}", True),
        ("{host}/{path}", True),
        ("{origin}//{relpath}", True),
        ("flat/{name}", True),
        ("{host}/{name}", True),
        ("{relpath}.bak", False),
        ("{relpath}/{name}", False),
        ("{name}/{relpath}", False),
        ("{path}/x/{host}", False),
    ],
)
def test_name_last(template: str, name_last: bool) -> None:
    assert Layout.parse(template).name_last is name_last


@pytest.mark.parametrize("template", ["{relpath}", "{host}/{path}", "{origin}//{relpath}",
                                      "a/./{relpath}", "flat/{name}", "x/{name}"])
@pytest.mark.parametrize("root", [b"/data/raw", b"/", b"/data/raw/"])
def test_a_folder_rendered_once_places_each_of_its_files(template: str, root: bytes) -> None:
    # What the engine relies on for a layout whose file's name is last (``name_last``):
    # render(folder/name) is render(folder/x) with x replaced by the name, or both fail.
    layout = Layout.parse(template)
    assert layout.name_last
    render = layout.renderer(host="h", origin="raw", root=root)
    base = root.rstrip(b"/")
    for folder in (base or b"/", base + b"/2024", base + b"/2024//n\xe9", base + b"/.d/..e"):
        for name in (b"a.fits", b".hidden", b"...", b"..x", b"caf\xe9", b"sp ace", b"x"):
            path = (folder.rstrip(b"/") + b"/" + name)
            try:
                expected: bytes | None = render(path)
            except ValueError:
                expected = None
            try:
                head: bytes | None = render(folder.rstrip(b"/") + b"/x")[:-1]
            except ValueError:
                head = None
            assert (None if head is None else head + name) == expected, (folder, name)
