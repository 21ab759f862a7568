"""Sizes and offsets at the edges of the native core: refused cleanly, never a crash.

A tar size near 2**63 once overflowed when rounded up to a block, became a negative
skip and then a huge memcpy (the indexer died with SIGSEGV). The native code now
checks every size before use; these tests pin each check.
"""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
import zlib

import pytest
from soci._native.tarscan import TarScanner
from soci._native.zran import GzipIndexer, _set_zlib_piece, inflate_new, inflate_range

from soci.errors import LayerFormatError
from soci.ztoc import build_ztoc
from test_tarscan_differential import BLOCK, extended, pax_body, raw_header

INT64_MAX = (1 << 63) - 1


def _layer_with_size(size: int) -> bytes:
    return raw_header(b"huge", b"0", size, base256=True) + bytes(4 * BLOCK)


@pytest.mark.parametrize(
    "size", [INT64_MAX, INT64_MAX - 511, INT64_MAX - 1023, (1 << 63) - 300],
)
def test_base256_size_near_int64_max_is_refused(size: int) -> None:
    for layer in (_layer_with_size(size), gzip.compress(_layer_with_size(size))):
        with pytest.raises(LayerFormatError, match="tar entry 'huge' has a size larger") as e:
            build_ztoc(io.BytesIO(layer))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("size", [1 << 40, INT64_MAX - 1024])
def test_size_that_still_fits_is_only_truncated(size: int) -> None:
    """A size whose end still fits an int64 offset: the stream just ends too early."""
    with pytest.raises(LayerFormatError, match="truncated"):
        build_ztoc(io.BytesIO(_layer_with_size(size)))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"9223372036854775807", "has a size larger"),
        (b"9223372036854775808", "has an invalid PAX size"),
        (b"-5", "has a negative size"),
        (b"-9223372036854775808", "has a negative size"),
        (b"12x", "has an invalid PAX size"),
    ],
)
def test_absurd_pax_sizes_are_refused(value: bytes, message: str) -> None:
    layer = (extended(b"x", pax_body([(b"size", value)])) + raw_header(b"paxed", b"0", 0)
             + bytes(2 * BLOCK))
    with pytest.raises(LayerFormatError, match=f"tar entry 'paxed' {message}"):
        build_ztoc(io.BytesIO(gzip.compress(layer)))


def test_scanner_refuses_huge_size_fed_in_pieces() -> None:
    scanner = TarScanner()
    data = _layer_with_size(INT64_MAX)
    with pytest.raises(LayerFormatError, match="'huge'"):
        for i in range(0, len(data), 7):
            scanner.feed_bytes(data[i:i + 7])
    assert scanner.failed


def test_cli_build_of_huge_size_fails_with_one_line(tmp_path) -> None:
    """The reproduction: `soci ztoc build` used to exit 139 (SIGSEGV) here."""
    bad = tmp_path / "huge.tar.gz"
    bad.write_bytes(gzip.compress(_layer_with_size((1 << 63) - 300)))
    out = tmp_path / "out.ztoc"
    proc = subprocess.run(
        [sys.executable, "-m", "soci.cli", "ztoc", "build", str(bad), "-o", str(out)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "'huge'" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [bad]


def test_inflate_range_refuses_negative_skip() -> None:
    with pytest.raises(ValueError, match="negative"):
        inflate_range(b"\x03\x00", 0, bytes(32768), -1, bytearray(10))


def test_inflate_new_hands_out_only_what_it_inflated() -> None:
    """The unzeroed buffer is cut to what was written: asking past the stream's end gives
    the stream, never whatever memory held before."""
    blob, plain = _two_members()
    comp = blob[10:]  # raw deflate from member one's first byte
    assert inflate_new(comp, 0, bytes(32768), 100, len(plain) - 100) == plain[100:]
    assert inflate_new(comp, 0, bytes(32768), 0, 1000) == plain[:1000]
    past = inflate_new(comp, 0, bytes(32768), 0, len(plain) + (1 << 20))
    assert past == plain and len(past) == len(plain)
    assert inflate_new(b"", 0, bytes(32768), 0, 4096) == b""
    assert inflate_new(comp, 0, bytes(32768), 0, 0) == b""
    with pytest.raises(ValueError, match="negative"):
        inflate_new(comp, 0, bytes(32768), 0, -1)
    with pytest.raises(ValueError, match="negative"):
        inflate_new(comp, 0, bytes(32768), -1, 10)
    with pytest.raises(ValueError, match="32768"):
        inflate_new(comp, 0, bytes(10), 0, 10)
    with pytest.raises(LayerFormatError, match="corrupt gzip"):
        inflate_new(b"\xff" * 64, 0, bytes(32768), 0, 1000)


def _two_members() -> tuple[bytes, bytes]:
    one = bytes(range(256)) * 300
    two = b"second member " * 5000
    return gzip.compress(one, mtime=0) + gzip.compress(two, mtime=0), one + two


@pytest.fixture
def small_zlib_pieces():
    """Hand zlib a few bytes at a time: the path that buffers over 4 GiB would take."""
    _set_zlib_piece(3)
    try:
        yield
    finally:
        _set_zlib_piece(0)


def _index(blob: bytes) -> bytes:
    indexer = GzipIndexer(8192, None)
    indexer.feed(blob)
    indexer.finish()
    return indexer.zinfo()


def test_indexer_in_small_pieces_matches(small_zlib_pieces) -> None:
    blob, _ = _two_members()
    _set_zlib_piece(0)
    whole = _index(blob)
    _set_zlib_piece(3)
    assert _index(blob) == whole


def test_inflate_range_in_small_pieces_crosses_members(small_zlib_pieces) -> None:
    """Raw inflate from the start of member one, over its trailer, into member two."""
    blob, plain = _two_members()
    header_len = 10  # gzip.compress writes no optional header fields
    for piece in (3, 8, 1 << 20):
        _set_zlib_piece(piece)
        dest = bytearray(len(plain) - 100)
        got = inflate_range(blob[header_len:], 0, bytes(32768), 100, dest)
        assert got == len(dest) and bytes(dest) == plain[100:]


def test_inflate_range_trailer_split_across_pieces(small_zlib_pieces) -> None:
    """Member one's 8-byte trailer straddles an input piece: the skip must resume after it."""
    one, two = b"a" * 1000, b"b" * 1000
    first = zlib.compressobj(6, zlib.DEFLATED, -15)
    deflated = first.compress(one) + first.flush()
    trailer = zlib.crc32(one).to_bytes(4, "little") + len(one).to_bytes(4, "little")
    comp = deflated + trailer + gzip.compress(two, mtime=0)
    for piece in range(1, 12):
        _set_zlib_piece(piece)
        dest = bytearray(2000)
        assert inflate_range(comp, 0, bytes(32768), 0, dest) == 2000
        assert bytes(dest) == one + two
