"""Confinement of destination paths (``transports._paths.confine``), shared by transports."""

from __future__ import annotations

import pytest

from replicator import FileError
from replicator.transports._paths import confine


@pytest.mark.parametrize(("dest", "confined"), [
    (b"a/b.dat", b"a/b.dat"),  # the common case, returned as it is
    (b"b.dat", b"b.dat"),
    (b".hidden", b".hidden"),
    (b"a/.hidden/b", b"a/.hidden/b"),
    (b"a//b", b"a/b"),
    (b"./a/./b", b"a/b"),
    (b"a/b/", b"a/b"),
    (b"a/..b/c", b"a/..b/c"),  # a name that starts with two dots is a name
    (b"sub/.replicator-replica", b"sub/.replicator-replica"),  # only the root's is ours
])
def test_normal_paths_are_kept_and_odd_ones_normalised(dest: bytes, confined: bytes) -> None:
    assert confine(dest) == confined


@pytest.mark.parametrize("dest", [b"../x", b"a/../../x", b"a/..", b"..", b"/abs/x", b"a/\0b",
                                  b".replicator-replica", b"./.replicator-replica"])
def test_paths_that_leave_the_root_or_hit_the_marker_are_refused(dest: bytes) -> None:
    with pytest.raises(FileError):
        confine(dest)
