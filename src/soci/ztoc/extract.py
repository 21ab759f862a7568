"""Reading uncompressed bytes of a layer through its zTOC.

A read touches only the spans that hold the requested range: their compressed
bytes are fetched with one positional read (or, later, one HTTP range
request) and inflated from the first span's checkpoint in the native core
(for zstd layers: its whole frames decoded from the first span's first frame).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from typing import Protocol

from soci._native.zran import inflate_range
from soci._native.zstdframes import decompress_range
from soci.errors import DigestMismatchError, LayerFormatError, NotFoundError
from soci.ztoc.model import FileMetadata, Ztoc
from soci.ztoc.zinfo import GzipZinfo, TarZinfo, ZstdZinfo, zinfo_of

_MAX_LINK_DEPTH = 40


class BlobReader(Protocol):
    """Anything that can return ``size`` bytes of the compressed blob at ``offset``."""

    def read_at(self, offset: int, size: int) -> bytes: ...


class FileBlob:
    """A layer blob in a local file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def read_at(self, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise LayerFormatError(
                f"layer blob is shorter than its zTOC says (wanted {size} bytes at {offset})"
            )
        return data

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> FileBlob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SpanMismatch(DigestMismatchError):
    """A span's compressed bytes do not match its digest in the zTOC."""

    def __init__(self, span: int) -> None:
        super().__init__(f"span {span} of the layer does not match its digest in the zTOC")
        self.span = span


def split_verified(ztoc: Ztoc, zinfo: GzipZinfo | TarZinfo | ZstdZinfo, comp: bytes, base: int,
                   first: int, last: int) -> dict[int, memoryview]:
    """Cut compressed bytes starting at offset ``base`` into spans first..last, each checked
    against its span digest (``SpanMismatch`` names the first that is wrong).

    The spans are views of ``comp``, not copies: a run of spans fetched in one response is
    verified and inflated without copying it again, and lives until its last span is used.
    """
    view = memoryview(comp)
    out: dict[int, memoryview] = {}
    for span in range(first, last + 1):
        piece = view[zinfo.compressed_start(span) - base : zinfo.compressed_end(span) - base]
        if "sha256:" + hashlib.sha256(piece).hexdigest() != ztoc.span_digests[span]:
            raise SpanMismatch(span)
        out[span] = piece
    return out


class LayerReader:
    """Random access to a layer's uncompressed tar stream through its zTOC."""

    def __init__(self, ztoc: Ztoc, blob: BlobReader) -> None:
        self.ztoc = ztoc
        self.zinfo: GzipZinfo | TarZinfo | ZstdZinfo = zinfo_of(ztoc)
        self.blob = blob

    def read(self, offset: int, size: int) -> bytes:
        """Return ``size`` uncompressed bytes starting at ``offset``.

        The whole spans holding the range are fetched and each is checked
        against its span digest before a byte of it is used.
        """
        if size <= 0:
            return b""
        zinfo = self.zinfo
        first = zinfo.span_of(offset)
        last = zinfo.span_of(offset + size - 1)
        start = zinfo.compressed_start(first)
        comp = self.blob.read_at(start, zinfo.compressed_end(last) - start)
        split_verified(self.ztoc, zinfo, comp, start, first, last)
        if isinstance(zinfo, TarZinfo):
            data = comp[offset - start : offset - start + size]
            got = len(data)
        elif isinstance(zinfo, ZstdZinfo):
            data = decode_zstd_spans(zinfo, comp, first, offset, size)
            got = len(data)
        else:
            out = bytearray(size)
            got = inflate_range(
                comp, zinfo.bits[first], zinfo.window(first), offset - zinfo.outs[first], out
            )
            data = bytes(out)
        if got != size:
            raise LayerFormatError(
                f"layer ended early: got {got} of {size} bytes at uncompressed offset {offset}"
            )
        return data

    def read_file(self, entry: FileMetadata) -> bytes:
        return self.read(entry.offset, entry.size)


def decode_zstd_spans(zinfo: ZstdZinfo, comp: bytes | memoryview, first: int, offset: int,
                      size: int) -> bytes:
    """``size`` uncompressed bytes at ``offset`` from the verified compressed bytes of whole
    zstd spans starting with span ``first`` (only the frames up to the last byte wanted are
    decoded). Raises ``LayerFormatError`` if the frames are corrupt or end early."""
    out = bytearray(size)
    got = decompress_range(comp, offset - zinfo.uncompressed_start(first), out)
    if got != size:
        raise LayerFormatError(
            f"zstd spans decode to fewer bytes than the zTOC says: got {got} of {size} at "
            f"uncompressed offset {offset}"
        )
    return bytes(out)


def decode_zstd_span(zinfo: ZstdZinfo, span: int, comp: bytes | memoryview) -> bytes:
    """All uncompressed bytes of zstd span ``span`` from its verified compressed bytes: exactly
    ``uncompressed_end - uncompressed_start`` of them, or ``LayerFormatError``."""
    want = zinfo.uncompressed_end(span) - zinfo.uncompressed_start(span)
    out = bytearray(want + 1)  # one spare byte: a span decoding to more is refused too
    got = decompress_range(comp, 0, out)
    if got != want:
        raise LayerFormatError(
            f"zstd span {span} decodes to {'more' if got > want else got} bytes, not the "
            f"{want} its zTOC says"
        )
    return bytes(out[:want])


def _clean(path: str) -> str:
    """A tar name as a canonical absolute path ('./a//b/' -> '/a/b')."""
    return posixpath.normpath("/" + path).replace("//", "/")


def find_file(ztoc: Ztoc, path: str) -> FileMetadata:
    """The regular-file entry for ``path``, following hard and symbolic links.

    Names are compared after cleaning (``./usr/bin/x`` matches ``usr/bin/x``);
    when a name appears more than once the last entry wins, as on extraction.
    """
    by_name = {_clean(e.name): e for e in ztoc.entries}
    want = _clean(path)
    for _ in range(_MAX_LINK_DEPTH):
        entry = by_name.get(want)
        if entry is None:
            raise NotFoundError(f"{path}: no such file in the layer")
        if entry.type == "reg":
            return entry
        if entry.type == "hardlink":
            want = _clean(entry.linkname)
        elif entry.type == "symlink":
            want = _clean(posixpath.join(posixpath.dirname(want), entry.linkname))
        else:
            raise NotFoundError(f"{path}: is a {entry.type}, not a regular file")
    raise NotFoundError(f"{path}: too many levels of links")
