"""Tar headers to zTOC entries, with the semantics of Go's archive/tar.

Upstream SOCI fills its TOC from Go's ``tar.Reader``; matching its choices
(PAX overrides, GNU long names, prefix joining, V7 directories, raw PAX
records) is what makes our zTOCs identical to upstream's. The native scanner
has already found the headers; this module turns them into ``FileMetadata``.
"""

from __future__ import annotations

import re
import struct

from soci._native.tarscan import decode_header, parse_pax
from soci.errors import LayerFormatError
from soci.ztoc.model import FileMetadata

_RECORD = struct.Struct("<qi")
_GO_INT = re.compile(rb"[+-]?[0-9]+\Z")
_DIGITS = re.compile(rb"[0-9]*\Z")
_INT64 = 1 << 63

_TYPES = {
    ord("0"): "reg",
    ord("1"): "hardlink",
    ord("2"): "symlink",
    ord("3"): "char",
    ord("4"): "block",
    ord("5"): "dir",
    ord("6"): "fifo",
}


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _go_int(raw: bytes, what: str) -> int:
    """strconv.ParseInt(s, 10, 64): optional sign, decimal digits, int64 range."""
    if not _GO_INT.match(raw):
        raise ValueError(f"invalid PAX {what} {raw!r}")
    value = int(raw)
    if not -_INT64 <= value < _INT64:
        raise ValueError(f"PAX {what} {raw!r} is out of range")
    return value


def _days_to_civil(days: int) -> tuple[int, int, int]:
    """Proleptic Gregorian date of a day number since 1970-01-01, any year."""
    days += 719468
    era = days // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def format_time(seconds: int, nanos: int = 0) -> str:
    """Go's ``time.Time.MarshalText`` (RFC 3339, trimmed nanoseconds) in UTC.

    Go refuses years outside [0, 9999] and upstream then stores an empty string.
    """
    days, rem = divmod(seconds, 86400)
    year, month, day = _days_to_civil(days)
    if not 0 <= year <= 9999:
        return ""
    hour, rem = divmod(rem, 3600)
    minute, second = divmod(rem, 60)
    text = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    return text + "Z"


def _pax_time(raw: bytes) -> str:
    """Go's parsePAXTime: seconds, then up to 9 fractional digits (truncated)."""
    whole, _, frac = raw.partition(b".")
    secs = _go_int(whole, "time")
    if not frac:
        return format_time(secs)
    if not _DIGITS.match(frac):
        raise ValueError(f"invalid PAX time {raw!r}")
    nanos = int(frac[:9].ljust(9, b"0"))
    if whole.startswith(b"-"):
        nanos = -nanos
    extra, nanos = divmod(nanos, 1_000_000_000)
    return format_time(secs + extra, nanos)


class TocDecoder:
    """Accumulates entries from the scanner's packed header records, in stream order."""

    def __init__(self) -> None:
        self.entries: list[FileMetadata] = []
        self._pax: dict[bytes, bytes] | None = None
        self._long_name: bytes | None = None
        self._long_link: bytes | None = None

    def feed(self, packed: bytes) -> None:
        view = memoryview(packed)
        pos = 0
        while pos < len(view):
            offset, length = _RECORD.unpack_from(view, pos)
            pos += _RECORD.size
            record = view[pos : pos + length]
            pos += length
            try:
                self._record(offset, record)
            except ValueError as e:
                raise LayerFormatError(f"bad tar header before offset {offset}: {e}") from None

    def _record(self, offset: int, record: memoryview) -> None:
        (typeflag, name, linkname, size, mode, uid, gid, mtime, uname, gname, devmajor,
         devminor) = decode_header(record[:512])
        body = record[512:]
        if typeflag == ord("x"):
            self._pax = self._parse_pax(body)
            return
        if typeflag == ord("g"):
            # Go returns global headers as entries and upstream then refuses the layer;
            # they describe the archive, not a file, so we leave them out instead. Being an
            # entry of its own to Go, it still ends what earlier extended headers said.
            parse_pax(body)  # Go refuses a malformed one
            self._pax = self._long_name = self._long_link = None
            return
        if typeflag in (ord("L"), ord("K")):
            value = bytes(body).split(b"\0", 1)[0]
            if typeflag == ord("L"):
                self._long_name = value
            else:
                self._long_link = value
            return

        mod_time = format_time(mtime)
        pax = self._pax or {}
        for key, value in pax.items():
            if not value:
                continue  # an empty record keeps the header's value
            if key == b"path":
                name = value
            elif key == b"linkpath":
                linkname = value
            elif key == b"uname":
                uname = value
            elif key == b"gname":
                gname = value
            elif key == b"uid":
                uid = _go_int(value, "uid")
            elif key == b"gid":
                gid = _go_int(value, "gid")
            elif key == b"size":
                size = _go_int(value, "size")
            elif key == b"mtime":
                mod_time = _pax_time(value)
            elif key in (b"atime", b"ctime"):
                _pax_time(value)  # Go rejects the entry if these are malformed
        if self._long_name:
            name = self._long_name
        if self._long_link:
            linkname = self._long_link
        self._pax = self._long_name = self._long_link = None

        if typeflag == 0:
            kind = "dir" if name.endswith(b"/") else "reg"
        else:
            kind = _TYPES.get(typeflag, "")
        if not kind:
            raise LayerFormatError(
                f"unsupported tar entry type {chr(typeflag)!r} for {_text(name)!r} "
                f"at offset {offset}"
            )
        if size < 0:
            raise ValueError("negative size")
        self.entries.append(
            FileMetadata(
                _text(name), kind, offset, size, _text(linkname), mode, uid & 0xFFFFFFFF,
                gid & 0xFFFFFFFF, _text(uname), _text(gname), mod_time, devmajor, devminor,
                {_text(k): _text(v) for k, v in pax.items()},
            )
        )

    @staticmethod
    def _parse_pax(body: memoryview) -> dict[bytes, bytes]:
        records: dict[bytes, bytes] = {}
        for key, value in parse_pax(body):
            if b"=" in key or (b"\0" in value if key in (b"path", b"linkpath", b"uname", b"gname")
                               else b"\0" in key):
                raise ValueError(f"invalid PAX record {key!r}")
            if key.startswith(b"GNU.sparse."):
                raise LayerFormatError("GNU sparse files are not supported")
            records[key] = value
        return records
