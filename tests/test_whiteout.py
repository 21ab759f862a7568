"""The one classifier of OCI whiteout names (soci.oci.whiteout), pinned on tricky names."""

from __future__ import annotations

import pytest

from soci.oci.whiteout import (
    OPAQUE_MARKER,
    WHITEOUT_PREFIX,
    Kind,
    classify_base,
    is_aufs_meta,
    whiteout_kind,
)

CASES = [
    # name, kind, target
    ("etc", Kind.PLAIN, "etc"),
    ("a/b/c", Kind.PLAIN, "a/b/c"),
    (".wh.etc", Kind.WHITEOUT, "etc"),  # root level
    ("a/b/.wh.c", Kind.WHITEOUT, "a/b/c"),  # nested
    (".wh.", Kind.WHITEOUT, ""),  # '.wh.' alone: hides no name; callers refuse it
    ("a/.wh.", Kind.WHITEOUT, "a/"),
    (".wh..", Kind.WHITEOUT, "."),
    (".wh...", Kind.WHITEOUT, ".."),
    (".wh..wh..opq", Kind.OPAQUE, ""),  # the root made opaque
    ("a/b/.wh..wh..opq", Kind.OPAQUE, "a/b"),  # in a subdirectory
    (".wh..wh.plnk", Kind.AUFS_META, ".wh.plnk"),
    ("a/.wh..wh.aufs", Kind.AUFS_META, "a/.wh.aufs"),
    (".wh..wh.", Kind.AUFS_META, ".wh."),
    (".wh..wh..opqx", Kind.AUFS_META, ".wh..opqx"),  # not exactly the marker
    ("a/x.wh.b", Kind.PLAIN, "a/x.wh.b"),  # merely contains '.wh.'
    ("a.wh..wh..opq", Kind.PLAIN, "a.wh..wh..opq"),
    ("a/.wh.b/c", Kind.PLAIN, "a/.wh.b/c"),  # only the last component counts
    (".wh..wh.plnk/123.456", Kind.PLAIN, ".wh..wh.plnk/123.456"),
    ("a/.wh.b/", Kind.WHITEOUT, "a/b"),  # trailing slash of a tar directory entry
    ("a/.wh..wh..opq/", Kind.OPAQUE, "a"),
    ("a/b/", Kind.PLAIN, "a/b/"),
    ("", Kind.PLAIN, ""),
    (".wh", Kind.PLAIN, ".wh"),
    ("wh.a", Kind.PLAIN, "wh.a"),
]


@pytest.mark.parametrize(("name", "kind", "target"), CASES)
def test_whiteout_kind_str_and_bytes(name: str, kind: Kind, target: str) -> None:
    assert whiteout_kind(name) == (kind, target)
    got_kind, got_target = whiteout_kind(name.encode())
    assert (got_kind, got_target) == (kind, target.encode())
    assert isinstance(got_target, bytes)


@pytest.mark.parametrize(("base", "kind", "target"), [
    ("c", Kind.PLAIN, "c"),
    (".wh.c", Kind.WHITEOUT, "c"),
    (".wh.", Kind.WHITEOUT, ""),
    (".wh..wh..opq", Kind.OPAQUE, ""),
    (".wh..wh.plnk", Kind.AUFS_META, ".wh.plnk"),
    ("x.wh.c", Kind.PLAIN, "x.wh.c"),
])
def test_classify_base(base: str, kind: Kind, target: str) -> None:
    assert classify_base(base) == (kind, target)
    assert classify_base(base.encode()) == (kind, target.encode())


def test_non_utf8_bytes_names() -> None:
    assert whiteout_kind(b"d/.wh.\xff\xfe") == (Kind.WHITEOUT, b"d/\xff\xfe")
    assert whiteout_kind(b"\xff/.wh..wh..opq") == (Kind.OPAQUE, b"\xff")


def test_is_aufs_meta() -> None:
    for yes in (".wh..wh.plnk", ".wh..wh..opq", ".wh..wh.", b".wh..wh.orph"):
        assert is_aufs_meta(yes)
    for no in (".wh.a", ".wh.", "a.wh..wh.b", b"plain", ""):
        assert not is_aufs_meta(no)


def test_constants() -> None:
    assert WHITEOUT_PREFIX == ".wh."
    assert OPAQUE_MARKER == WHITEOUT_PREFIX + WHITEOUT_PREFIX + ".opq"
