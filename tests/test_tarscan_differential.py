"""The native tar scanner against an independent reading of Go's archive/tar rules.

Upstream SOCI lists a layer with Go's ``tar.Reader``; so do the runtimes that unpack
it. Where our scanner walks the stream differently (which header a size comes from,
when pending extended headers are forgotten), file data is read as headers and the
zTOC lists files that are not in the layer. The reference decoder below is written
from Go's ``Reader.Next`` semantics (plus this project's documented choices: global
PAX headers are left out, GNU sparse files, unknown entry types and negative sizes
are refused) and must agree entry for entry with what ends up in a built zTOC.
"""

from __future__ import annotations

import gzip
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soci.errors import SociError
from soci.ztoc import build_ztoc

BLOCK = 512
ZERO = bytes(BLOCK)
INT64_MAX = (1 << 63) - 1


# -- writing raw tar pieces -----------------------------------------------------------


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _base256(value: int, width: int) -> bytes:
    return bytes([0x80]) + value.to_bytes(width - 1, "big")


def raw_header(
    name: bytes,
    typeflag: bytes = b"0",
    size: int = 0,
    *,
    fmt: str = "ustar",
    prefix: bytes = b"",
    linkname: bytes = b"",
    base256: bool = False,
) -> bytes:
    """One 512-byte header; ``fmt`` is "ustar", "gnu" or "v7" (no magic)."""
    h = bytearray(BLOCK)
    h[0:100] = name[:100].ljust(100, b"\0")
    h[100:108] = _octal(0o644, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _base256(size, 12) if base256 or size >= 8**11 else _octal(size, 12)
    h[136:148] = _octal(1_600_000_000, 12)
    h[156:157] = typeflag
    h[157:257] = linkname[:100].ljust(100, b"\0")
    if fmt == "ustar":
        h[257:265] = b"ustar\x0000"
        h[345:345 + len(prefix)] = prefix
    elif fmt == "gnu":
        h[257:265] = b"ustar  \x00"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def padded(body: bytes) -> bytes:
    return body + bytes(-len(body) % BLOCK)


def pax_body(records: list[tuple[bytes, bytes]]) -> bytes:
    out = b""
    for key, value in records:
        core = b" " + key + b"=" + value + b"\n"
        n = len(core) + 1
        while len(b"%d" % n) + len(core) != n:
            n += 1
        out += b"%d" % n + core
    return out


def extended(typeflag: bytes, body: bytes) -> bytes:
    return raw_header(b"PaxHeaders/x", typeflag, len(body)) + padded(body)


FAKE = raw_header(b"etc/ld.so.preload", b"0", 0)


# -- the reference: Go's Reader.Next, written from its documented rules ----------------


class Refused(Exception):
    """The reference (Go, or a documented choice of this project) refuses the stream."""


def _cstr(b: bytes) -> bytes:
    return b.split(b"\0", 1)[0]


def _go_numeric(field: bytes) -> int:
    if field[0] & 0x80:
        value = int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
        if field[0] & 0x40:
            value -= 1 << (8 * len(field) - 1)
        if not -(1 << 63) <= value < 1 << 63:
            raise Refused("base-256 overflow")
        return value
    text = _cstr(field.strip(b" \0"))
    if not text:
        return 0
    if any(c not in b"01234567" for c in text) or int(text, 8) >= 1 << 64:
        raise Refused("bad octal")
    value = int(text, 8)
    return value - (1 << 64) if value >= 1 << 63 else value


def _go_int(text: bytes) -> int:
    body = text[1:] if text[:1] in (b"+", b"-") else text
    if not body or any(c not in b"0123456789" for c in body):
        raise Refused("bad PAX integer")
    value = int(text)
    if not -(1 << 63) <= value <= INT64_MAX:
        raise Refused("PAX integer out of range")
    return value


def _pax_records(body: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    while body:
        length_text, sep, _ = body.partition(b" ")
        if not sep:
            raise Refused("PAX record without length")
        n = _go_int(length_text)
        if n < 5 or n > len(body) or n <= len(length_text) + 1 or body[n - 1:n] != b"\n":
            raise Refused("malformed PAX record")
        key, eq, value = body[len(length_text) + 1:n - 1].partition(b"=")
        if not eq or not key:
            raise Refused("malformed PAX record")
        out[key] = value
        body = body[n:]
    return out


def _checksum_ok(h: bytes) -> bool:
    text = _cstr(h[148:156].strip(b" \0"))
    if not text or any(c not in b"01234567" for c in text):
        return not text and False
    want = int(text, 8)
    blanked = h[:148] + b" " * 8 + h[156:]
    signed = sum(c - 256 if c >= 128 else c for c in blanked)
    return want in (sum(blanked), signed)


_KINDS = {b"0": "reg", b"1": "hardlink", b"2": "symlink", b"3": "char", b"4": "block",
          b"5": "dir", b"6": "fifo"}
_HEADER_ONLY = {"hardlink", "symlink", "char", "block", "dir", "fifo"}


def go_listing(blob: bytes) -> list[tuple[str, str, int, int, str]]:
    """(name, type, data offset, size, linkname) of each entry, as Go lists them."""
    entries = []
    pos = 0
    pax: dict[bytes, bytes] = {}
    long_name = long_link = b""
    while pos < len(blob):
        if pos + BLOCK > len(blob):
            raise Refused("truncated header")
        h = blob[pos:pos + BLOCK]
        pos += BLOCK
        if h == ZERO:
            if pos == len(blob) or blob[pos:pos + BLOCK] == ZERO:
                break
            raise Refused("zero block, then a non-zero block")
        if not _checksum_ok(h):
            raise Refused("checksum")
        size = _go_numeric(h[124:136])
        flag = h[156:157]
        if size < 0:
            raise Refused("negative size")
        if flag in (b"x", b"g", b"L", b"K"):
            if size > 1 << 20 or pos + size > len(blob):
                raise Refused("special file too long or truncated")
            body = blob[pos:pos + size]
            pos += size + (-size % BLOCK)
            if flag == b"x":
                pax = _pax_records(body)  # replaces an earlier one
            elif flag == b"g":
                _pax_records(body)
                pax, long_name, long_link = {}, b"", b""  # its own entry to Go (left out here)
            elif flag == b"L":
                long_name = _cstr(body)
            else:
                long_link = _cstr(body)
            continue
        name = _cstr(h[0:100])
        if h[257:263] == b"ustar\0" and _cstr(h[345:500]):
            name = _cstr(h[345:500]) + b"/" + name
        link = _cstr(h[157:257])
        for key, value in pax.items():
            if value and key == b"path":
                name = value
            elif value and key == b"linkpath":
                link = value
            elif value and key == b"size":
                size = _go_int(value)
        if long_name:
            name = long_name
        if long_link:
            link = long_link
        pax, long_name, long_link = {}, b"", b""
        if flag == b"\0":
            kind = "dir" if name.endswith(b"/") else "reg"
        elif flag in _KINDS:
            kind = _KINDS[flag]
        else:
            raise Refused("unsupported type")
        if size < 0:
            raise Refused("negative size")
        data = 0 if kind in _HEADER_ONLY else size
        entries.append((name.decode(), kind, pos, size, link.decode()))
        if pos + data + (-data % BLOCK) > len(blob):
            raise Refused("truncated data")
        pos += data + (-data % BLOCK)
    return entries


def ztoc_listing(blob: bytes, gz: bool) -> list[tuple[str, str, int, int, str]]:
    layer = gzip.compress(blob, compresslevel=1, mtime=0) if gz else blob
    ztoc = build_ztoc(io.BytesIO(layer), span_size=4096).ztoc
    return [(e.name, e.type, e.offset, e.size, e.linkname) for e in ztoc.entries]


# -- random streams --------------------------------------------------------------------

NAMES = [b"a", b"dir/", b"dir/b", b"etc/ld.so.preload", b"x" * 99, b"l/" + b"n" * 120]
SIZES = [0, 1, 100, 511, 512, 513, 1024, 1536, 3000]
PAX_SIZES = [b"", b"0", b"1", b"512", b"+512", b"01024", b"abc", b"-1", b"9" * 19,
             b"9223372036854775807", b"9223372036854775808"]


names = st.sampled_from(NAMES)
data_kinds = st.sampled_from(["fake"] * 6 + ["junk", "zero"])


@st.composite
def file_piece(draw: st.DrawFn) -> bytes:
    name = draw(names)
    flag = draw(st.sampled_from([b"0", b"\0", b"5", b"2", b"1", b"6"]))
    size = draw(st.sampled_from(SIZES))
    fmt = draw(st.sampled_from(["ustar", "gnu", "v7"]))
    prefix = draw(st.sampled_from([b"", b"pre", b"pre/fix"])) if fmt == "ustar" else b""
    head = raw_header(name, flag, size, fmt=fmt, prefix=prefix,
                      linkname=draw(st.sampled_from([b"", b"target"])),
                      base256=draw(st.booleans()))
    # What a wrong walk would read as headers: a real-looking one, an end marker, junk.
    fill = {"fake": FAKE * 8, "zero": bytes(4096), "junk": b"\xaa" * 4096}[draw(data_kinds)]
    return head + padded(fill[:size])


@st.composite
def pax_piece(draw: st.DrawFn) -> bytes:
    keys = st.sampled_from([b"path", b"size", b"linkpath", b"mtime", b"comment"])
    records = []
    for key in draw(st.lists(keys, max_size=4)):
        if key == b"size":
            value = draw(st.sampled_from(PAX_SIZES))
        elif key in (b"path", b"linkpath"):
            value = draw(st.sampled_from([b"", *NAMES]))
        elif key == b"mtime":
            value = b"1700000000.5"
        else:
            value = b"hello"
        records.append((key, value))
    body = pax_body(records)
    if draw(st.sampled_from([False] * 30 + [True])):
        body += b"9 x\n"  # malformed
    return extended(draw(st.sampled_from([b"x", b"x", b"g"])), body)


@st.composite
def gnu_long_piece(draw: st.DrawFn) -> bytes:
    value = draw(st.sampled_from([b"", *NAMES, b"long/" * 40]))
    nul = draw(st.sampled_from([b"\0", b"", b"\0junk"]))
    return extended(draw(st.sampled_from([b"L", b"K"])), value + nul)


# Weighted by repetition: mostly entries and extended headers, now and then a lone zero block.
pieces = st.one_of(
    *[file_piece()] * 6, *[pax_piece()] * 4, *[gnu_long_piece()] * 2, st.just(ZERO),
)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    body = b"".join(draw(st.lists(pieces, min_size=1, max_size=10)))
    return body + bytes(BLOCK * draw(st.integers(0, 2)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=streams(), gz=st.booleans())
def test_scanner_lists_what_go_lists(blob: bytes, gz: bool) -> None:
    try:
        want = go_listing(blob)
    except Refused:
        want = None
    try:
        got = ztoc_listing(blob, gz)
    except SociError:
        got = None
    assert got == want


# -- the exact reproductions, pinned ---------------------------------------------------


def _files_after(extended_headers: bytes) -> bytes:
    """A real file whose 512 data bytes are a fake header, after some extended headers."""
    return extended_headers + raw_header(b"real", b"0", BLOCK) + FAKE + bytes(2 * BLOCK)


def test_second_pax_header_replaces_the_first_size() -> None:
    """x(size=0), x(mtime): Go uses only the second, so the file keeps its 512 bytes."""
    blob = _files_after(
        extended(b"x", pax_body([(b"size", b"0")]))
        + extended(b"x", pax_body([(b"mtime", b"1700000000")]))
    )
    assert go_listing(blob) == [("real", "reg", 5 * BLOCK, BLOCK, "")]
    for gz in (False, True):
        assert ztoc_listing(blob, gz) == [("real", "reg", 5 * BLOCK, BLOCK, "")]


def test_empty_size_record_later_in_a_pax_header_wins() -> None:
    blob = _files_after(extended(b"x", pax_body([(b"size", b"0"), (b"size", b"")])))
    assert ztoc_listing(blob, True) == [("real", "reg", 3 * BLOCK, BLOCK, "")]


def test_global_header_ends_pending_extended_headers() -> None:
    """Go returns the 'g' header as an entry, which consumes the pending 'x' and 'L'."""
    blob = _files_after(
        extended(b"x", pax_body([(b"size", b"0")])) + extended(b"L", b"other\0")
        + extended(b"g", pax_body([(b"comment", b"hi")]))
    )
    assert ztoc_listing(blob, True) == go_listing(blob) == [("real", "reg", 7 * BLOCK, BLOCK, "")]


def test_v7_directory_by_trailing_slash_has_no_data() -> None:
    """A '\\0' entry named 'd/' is a directory to Go, whose next block is a header."""
    blob = raw_header(b"d/", b"\0", BLOCK) + FAKE + bytes(2 * BLOCK)
    want = [("d/", "dir", BLOCK, BLOCK, ""), ("etc/ld.so.preload", "reg", 2 * BLOCK, 0, "")]
    assert go_listing(blob) == want
    assert ztoc_listing(blob, True) == want


def test_v7_directory_named_by_a_long_name() -> None:
    blob = extended(b"L", b"d/\0") + raw_header(b"d", b"\0", BLOCK) + FAKE + bytes(2 * BLOCK)
    assert ztoc_listing(blob, True) == go_listing(blob)
    assert [e[0] for e in go_listing(blob)] == ["d/", "etc/ld.so.preload"]


def test_plus_signed_pax_size_is_read_as_go_reads_it() -> None:
    blob = _files_after(extended(b"x", pax_body([(b"size", b"+512")])))
    assert ztoc_listing(blob, True) == [("real", "reg", 3 * BLOCK, BLOCK, "")]


def _patched(h: bytes, at: int, data: bytes) -> bytes:
    b = bytearray(h)
    b[at:at + len(data)] = data
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def test_gnu_header_from_old_go_keeps_its_prefix() -> None:
    """Go < 1.8 wrote a USTAR prefix into GNU headers; Go reads it back as one when
    the GNU access/change time fields there do not parse as numbers."""
    h = _patched(raw_header(b"b", b"0", 0, fmt="gnu"), 345, b"some/prefix")
    assert ztoc_listing(h + bytes(2 * BLOCK), True) == [("some/prefix/b", "reg", BLOCK, 0, "")]
    octal_times = _patched(raw_header(b"b", b"0", 0, fmt="gnu"), 345, b"0000000017\0")
    assert [e[0] for e in ztoc_listing(octal_times + bytes(2 * BLOCK), True)] == ["b"]


def test_star_header_with_bad_times_is_refused() -> None:
    h = _patched(raw_header(b"b", b"0", 0), 508, b"tar\0")
    assert [e[0] for e in ztoc_listing(h + bytes(2 * BLOCK), True)] == ["b"]
    with pytest.raises(SociError, match="access or change time"):
        ztoc_listing(_patched(h, 476, b"zz") + bytes(2 * BLOCK), True)
