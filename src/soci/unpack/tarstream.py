"""A streaming reader of layer tars that holds no more than one chunk and one header.

Python's ``tarfile`` reads PAX and GNU long-name records whole whatever size they claim,
keeps every member it has seen, and truncates names at NUL; a layer is hostile input, so
this reader bounds every record, refuses what it cannot represent faithfully, and leaves
the meaning of names (escapes, symlinks) to the extractor.

Formats: ustar, POSIX pax (per-entry ``x`` records: ``path``, ``linkpath``, ``size``,
``uid``, ``gid``, ``mtime``, ``atime``, ``SCHILY.xattr.*``), GNU (``L``/``K`` long names,
base-256 numbers), and v7. Decisions where tar implementations differ:

- PAX global headers (``g``) are read (bounded) and ignored, as containerd's applier does:
  our tree must be the one containerd would have unpacked from the same layer.
- GNU sparse files (type ``S`` or ``GNU.sparse.*`` pax keys) raise
  ``UnsupportedLayerError``: the caller falls back to containerd's own unpack.
- Header-only types (links, directories, devices, fifos) carry no data whatever their size
  field says, as in Go's ``archive/tar`` (what containerd and the layer producers use).
- End of archive: two zero blocks, or a clean end of stream at a header boundary (the
  digests, not the marker, prove a layer whole).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from soci.unpack.errors import UnpackError, UnsafeLayerError, UnsupportedLayerError

BLOCK = 512
#: Largest pax record or GNU long name accepted (Go's archive/tar uses the same bound).
MAX_SPECIAL = 1 << 20
CHUNK = 1 << 20

REGULAR = b"0"
HARDLINK = b"1"
SYMLINK = b"2"
CHAR = b"3"
BLOCKDEV = b"4"
DIRECTORY = b"5"
FIFO = b"6"
CONTIGUOUS = b"7"
_HEADER_ONLY = {HARDLINK, SYMLINK, CHAR, BLOCKDEV, DIRECTORY, FIFO}
_DEVICES = {CHAR, BLOCKDEV}


class CorruptLayerError(UnsafeLayerError):
    """The layer stream is not a well-formed (or not a complete) tar."""


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


@dataclass(slots=True)
class Entry:
    """One member, with the pax/GNU extensions already applied. Names are raw bytes."""

    type: bytes
    path: bytes
    linkpath: bytes
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int | None
    devmajor: int
    devminor: int
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


class TarInput:
    """The uncompressed stream, read in large chunks; every byte read is fed to ``hasher``
    (the diff ID), including what follows the end-of-archive marker (see ``drain``)."""

    def __init__(self, raw: _Readable, hasher: Any, check: Callable[[], None] | None = None):
        self._raw = raw
        self._hasher = hasher
        self._check = check
        self._chunk = b""
        self._view = memoryview(b"")
        self._pos = 0
        self.total = 0
        self._eof = False

    def _fill(self) -> bool:
        if self._eof:
            return False
        if self._check is not None:
            self._check()
        data = self._raw.read(CHUNK)
        if not data:
            self._eof = True
            return False
        self._hasher.update(data)
        self.total += len(data)
        self._chunk = data
        self._view = memoryview(data)
        self._pos = 0
        return True

    def read_upto(self, n: int) -> bytes:
        """Exactly ``n`` bytes unless the stream ends first (then what there was)."""
        avail = len(self._chunk) - self._pos
        if avail >= n:
            out = self._chunk[self._pos:self._pos + n]
            self._pos += n
            return out
        parts = []
        while n > 0:
            if self._pos == len(self._chunk) and not self._fill():
                break
            take = min(n, len(self._chunk) - self._pos)
            parts.append(self._chunk[self._pos:self._pos + take])
            self._pos += take
            n -= take
        return b"".join(parts)

    def copy_to(self, fd: int, n: int) -> None:
        """Write the next ``n`` bytes to ``fd``."""
        while n > 0:
            if self._pos == len(self._chunk) and not self._fill():
                raise CorruptLayerError("layer tar ends inside a file's data")
            take = min(n, len(self._chunk) - self._pos)
            view = self._view[self._pos:self._pos + take]
            while view:
                written = os.write(fd, view)
                view = view[written:]
            self._pos += take
            n -= take

    def skip(self, n: int) -> None:
        while n > 0:
            if self._pos == len(self._chunk) and not self._fill():
                raise CorruptLayerError("layer tar ends inside an entry")
            take = min(n, len(self._chunk) - self._pos)
            self._pos += take
            n -= take

    def drain(self) -> None:
        """Hash the rest of the stream (padding after the end marker is part of the diff ID)."""
        self._pos = len(self._chunk)
        while self._fill():
            self._pos = len(self._chunk)


def _octal(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:
        # GNU base-256: big-endian two's complement with the marker bit cleared.
        if field[0] == 0xFF:
            return int.from_bytes(field, "big", signed=True)
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if text.strip(b"01234567"):
        raise CorruptLayerError(f"layer tar header has a bad {what} field")
    return int(text, 8)


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _pax_time(value: bytes) -> int:
    text = value.decode("ascii", "replace")
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()) or len(whole) > 19:
        raise CorruptLayerError(f"layer tar has a bad pax time {text[:40]!r}")
    return sign * (int(whole) * 1_000_000_000 + int((frac + "000000000")[:9]))


def _pax_int(value: bytes, key: str) -> int:
    if not value.isdigit() or len(value) > 19:
        raise CorruptLayerError(f"layer tar has a bad pax {key} value")
    return int(value)


def parse_pax(data: bytes) -> dict[bytes, bytes]:
    """Records ``"LEN KEY=VALUE\\n"``; a later record replaces an earlier one of its key."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding at the end of the record block
            if data[pos:].strip(b"\0"):
                raise CorruptLayerError("layer tar has a malformed pax record")
            break
        space = data.find(b" ", pos, pos + 20)
        length_text = data[pos:space] if space > 0 else b""
        if not length_text.isdigit():
            raise CorruptLayerError("layer tar has a malformed pax record")
        end = pos + int(length_text)
        if end > len(data) or end <= space + 1 or data[end - 1] != 0x0A:
            raise CorruptLayerError("layer tar has a malformed pax record")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq or not key:
            raise CorruptLayerError("layer tar has a malformed pax record")
        out[key] = value
        pos = end
    return out


class TarReader:
    """Iterates the entries of a tar stream: ``next()`` then ``copy_data``/``skip_data``."""

    def __init__(self, inp: TarInput) -> None:
        self._in = inp
        self._pending = 0  # unread data + padding of the current entry
        self.ended = False

    def _special(self, size: int, what: str) -> bytes:
        if size > MAX_SPECIAL:
            raise CorruptLayerError(f"layer tar has a {what} record of {size} bytes")
        data = self._in.read_upto(size)
        if len(data) != size:
            raise CorruptLayerError("layer tar ends inside a header record")
        self._in.skip(-size % BLOCK)
        return data

    def next(self) -> Entry | None:
        """The next entry, or None at the end of the archive."""
        if self._pending:
            self._in.skip(self._pending)
            self._pending = 0
        pax: dict[bytes, bytes] = {}
        longname: bytes | None = None
        longlink: bytes | None = None
        while True:
            block = self._in.read_upto(BLOCK)
            if not block and not pax and longname is None and longlink is None:
                self.ended = True
                return None
            if len(block) != BLOCK:
                raise CorruptLayerError("layer tar ends inside a header")
            if block.count(0) == BLOCK:
                following = self._in.read_upto(BLOCK)
                if following and following.count(0) != BLOCK:
                    raise CorruptLayerError("layer tar has a zero block inside the archive")
                if pax or longname is not None or longlink is not None:
                    raise CorruptLayerError("layer tar ends after an extended header")
                self.ended = True
                return None
            stored = _octal(block[148:156], "checksum")
            unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
            if stored != unsigned:  # some old tars summed signed chars
                high = sum(1 for b in block[:148] + block[156:] if b > 127)
                if not high or stored != unsigned - 256 * high:
                    raise CorruptLayerError("layer tar header checksum mismatch")
            kind = block[156:157]
            size = _octal(block[124:136], "size")
            if size < 0:
                raise CorruptLayerError("layer tar header has a negative size")
            if kind in (b"x", b"X"):
                pax.update(parse_pax(self._special(size, "pax")))
                continue
            if kind == b"g":
                self._special(size, "pax global")  # ignored, as containerd does
                continue
            if kind == b"L":
                longname = self._longname(self._special(size, "long name"))
                continue
            if kind == b"K":
                longlink = self._longname(self._special(size, "long link"))
                continue
            if kind == b"S":
                raise UnsupportedLayerError("layer tar holds a GNU sparse file (unsupported)")
            return self._entry(block, kind, size, pax, longname, longlink)

    @staticmethod
    def _longname(data: bytes) -> bytes:
        name = data.rstrip(b"\0")
        if b"\0" in name:
            raise UnsafeLayerError("layer tar has a name containing NUL")
        return name

    def _entry(
        self, block: bytes, kind: bytes, size: int, pax: dict[bytes, bytes],
        longname: bytes | None, longlink: bytes | None,
    ) -> Entry:
        name = _cstr(block[0:100])
        if block[257:263] == b"ustar\0":  # POSIX ustar: the prefix field extends the name
            prefix = _cstr(block[345:500])
            if prefix:
                name = prefix + b"/" + name
        if longname is not None:
            name = longname
        link = longlink if longlink is not None else _cstr(block[157:257])
        uid = _octal(block[108:116], "uid")
        gid = _octal(block[116:124], "gid")
        mtime_ns = _octal(block[136:148], "mtime") * 1_000_000_000
        atime_ns: int | None = None
        xattrs: dict[bytes, bytes] = {}
        for key, value in pax.items():
            if key.startswith(b"GNU.sparse."):
                raise UnsupportedLayerError("layer tar holds a GNU sparse file (unsupported)")
            if key.startswith(b"SCHILY.xattr."):
                xattrs[key[len(b"SCHILY.xattr."):]] = value
            elif not value:
                continue  # an empty value unsets the key: keep the header's field
            elif key == b"path":
                name = value
            elif key == b"linkpath":
                link = value
            elif key == b"size":
                size = _pax_int(value, "size")
            elif key == b"uid":
                uid = _pax_int(value, "uid")
            elif key == b"gid":
                gid = _pax_int(value, "gid")
            elif key == b"mtime":
                mtime_ns = _pax_time(value)
            elif key == b"atime":
                atime_ns = _pax_time(value)
        if b"\0" in name or b"\0" in link:
            raise UnsafeLayerError("layer tar has a name containing NUL")
        if uid < 0 or gid < 0:
            raise CorruptLayerError("layer tar header has a negative owner")
        if kind in (b"\0", b""):
            kind = DIRECTORY if name.endswith(b"/") else REGULAR
        elif kind == CONTIGUOUS:
            kind = REGULAR
        elif kind not in _HEADER_ONLY and kind != REGULAR:
            raise UnsupportedLayerError(
                f"layer tar has an entry of unsupported type {kind!r} ({_show(name)})")
        if kind in _HEADER_ONLY:
            size = 0
        self._pending = size + (-size % BLOCK)
        return Entry(
            type=kind, path=name, linkpath=link, size=size,
            mode=_octal(block[100:108], "mode") & 0o7777, uid=uid, gid=gid,
            mtime_ns=mtime_ns, atime_ns=atime_ns,
            devmajor=_octal(block[329:337], "devmajor") if kind in _DEVICES else 0,
            devminor=_octal(block[337:345], "devminor") if kind in _DEVICES else 0,
            xattrs=xattrs,
        )

    def copy_data(self, entry: Entry, fd: int) -> None:
        """Write the current entry's data to ``fd`` (and consume its padding)."""
        if self._pending < entry.size:
            raise UnpackError("tar entry data was already consumed")
        self._in.copy_to(fd, entry.size)
        self._pending -= entry.size


def _show(name: bytes) -> str:
    """A name for an error message: printable, one line, bounded."""
    text = name[:200].decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else "?" for c in text)
