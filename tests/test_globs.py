import pytest

from replicator._globs import compile_globs, path_filter


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("*.fits", ["a.fits", ".x.fits"], ["d/a.fits", "a.fitsx"]),
        ("**/*.fits", ["a.fits", "x/y/a.fits"], ["a.fit", "x/a.fits/b"]),
        ("**/.*", [".hidden", "a/.hidden", "a/b/.x"], ["a/b", "a.b/c"]),
        ("raw/**", ["raw/a", "raw/a/b"], ["raw", "rawx/a", "x/raw/a"]),
        ("raw/", ["raw/a", "raw/a/b"], ["raw", "x/raw/a"]),
        ("**", ["a", "a/b/c"], []),
        ("a/**/b", ["a/b", "a/x/b", "a/x/y/b"], ["a/xb", "b"]),
        ("?.txt", ["a.txt"], ["ab.txt", "/.txt"]),
        ("[ab]*", ["a", "bcd"], ["c", "a/b"]),
        ("[!a]", ["b"], ["a", "/"]),
        ("x[!a]y", ["xby"], ["x/y", "xay"]),
        ("[a-c]", ["b"], ["d"]),
        ("[]]", ["]"], ["a"]),
        ("[", ["["], ["a"]),
        ("a*b", ["ab", "axxb"], ["a/b"]),
        ("a.b", ["a.b"], ["axb"]),
        ("*", ["a\nb", "caf\udcc3"], ["a/b"]),
    ],
)
def test_patterns(pattern: str, matches: list[str], misses: list[str]) -> None:
    globs = compile_globs([pattern])
    for path in matches:
        assert globs.match(path), path
    for path in misses:
        assert not globs(path), path


def test_any_of_several_patterns() -> None:
    globs = compile_globs(["*.a", "**/*.b"])
    assert globs.match("x.a")
    assert globs.match("d/x.b")
    assert not globs.match("d/x.a")


def test_empty_set_matches_nothing() -> None:
    globs = compile_globs([])
    assert not globs
    assert not globs.match("a")


@pytest.mark.parametrize("pattern", ["", "/abs", "a//b", "[z-a]"])
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(ValueError, match="invalid glob pattern"):
        compile_globs([pattern])


def test_path_filter() -> None:
    keep = path_filter(["**/*.fits"], ["**/.*", "tmp/"])
    assert keep("a.fits")
    assert keep("d/a.fits")
    assert not keep("a.txt")
    assert not keep(".a.fits")
    assert not keep("tmp/a.fits")
    everything = path_filter([], ["*.tmp"])
    assert everything("a/b")
    assert not everything("x.tmp")
