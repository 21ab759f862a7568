"""Span geometry from a zTOC's checkpoints: which compressed bytes hold which output.

``GzipZinfo`` reads upstream's packed gzip checkpoint blob (``gzip_zinfo.h``,
versions 1 and 2); ``TarZinfo`` describes an uncompressed layer cut into equal
spans; ``ZstdZinfo`` reads soci's table of zstd frame starts (layout below). All
answer the same questions, so readers never branch on the format.

The zstd checkpoint table (little-endian, version 1)::

    0   4  magic b"SZST"
    4   4  uint32 version (1)
    8   8  int64 span_size the zTOC was built with
    16  4  uint32 span_count N (1 <= N <= 2**31 - 1)
    20  4  uint32 reserved, 0
    24  16*(N+1)  N+1 pairs (int64 compressed_offset, int64 uncompressed_offset)

Pair ``i < N`` is where span ``i`` starts: the first byte of a zstd data frame and the
uncompressed offset of its first byte. Pair ``N`` closes the last span: just past the
last data frame, and the total decoded size. Span ``i`` is compressed bytes
``[c_i, c_{i+1})`` (whole frames, plus any skippable frames between them): its digest is
the sha256 of exactly those bytes, and it decodes from its first byte with no other state.
Skippable frames before the first or after the last data frame belong to no span.
"""

from __future__ import annotations

import bisect
import struct
from typing import Protocol

from soci._native import flatbuf
from soci.errors import ZtocFormatError
from soci.ztoc.model import Compression, Ztoc

WINDOW_SIZE = 32768
_CHECKPOINT = struct.Struct("<qqB")
_CHECKPOINT_SIZE = _CHECKPOINT.size + WINDOW_SIZE
_HEADER = struct.Struct("<iq")
#: The version written into TarZinfo by upstream.
TAR_ZINFO_VERSION = 2

#: No span may hold more uncompressed bytes than this, whatever the zTOC says its span size
#: is: far above any span size in use (upstream's default, and ours, is 4 MiB), and what
#: one span read may have to inflate at worst.
MAX_SPAN_BYTES = 64 << 20
#: How far past its span size a gzip span may run. A checkpoint goes at the first deflate
#: block boundary after more than span_size bytes of output (the final block of a member
#: is no boundary), so a span exceeds span_size by at most one block's output: at most
#: 32767 matches of 258 bytes (8,454,144 bytes) from zlib, GNU gzip and Go's encoders,
#: even for zeros. Twice that leaves room for other encoders.
SPAN_SLACK = 16 << 20
#: The largest span size a zTOC may be built with: its spans must still pass the cap above.
MAX_SPAN_SIZE = MAX_SPAN_BYTES - SPAN_SLACK


class Zinfo(Protocol):
    span_size: int

    @property
    def max_span_id(self) -> int: ...

    def span_of(self, offset: int) -> int: ...

    def compressed_start(self, span: int) -> int: ...

    def compressed_end(self, span: int) -> int: ...

    def uncompressed_start(self, span: int) -> int: ...


class GzipZinfo:
    """Checkpoints of a gzip layer: ``(in, out, bits, window)`` per span."""

    def __init__(self, blob: bytes, compressed_size: int) -> None:
        if len(blob) < _HEADER.size:
            raise ZtocFormatError("gzip checkpoint blob is shorter than its header")
        count, self.span_size = _HEADER.unpack_from(blob, 0)
        body = len(blob) - _HEADER.size
        if count < 1 or self.span_size <= 0:
            raise ZtocFormatError("gzip checkpoint blob has no checkpoints or a bad span size")
        if body == count * _CHECKPOINT_SIZE:
            first, self.version = 0, 2
        elif body == (count - 1) * _CHECKPOINT_SIZE:
            # Version 1 left out checkpoint 0, which was always just after a 10-byte header.
            first, self.version = 1, 1
        else:
            raise ZtocFormatError(
                f"gzip checkpoint blob size {len(blob)} does not match its {count} checkpoints"
            )
        self._blob = memoryview(blob)
        self.compressed_size = compressed_size
        self.ins: list[int] = [10] if first else []
        self.outs: list[int] = [0] if first else []
        self.bits: list[int] = [0] if first else []
        self._windows: list[int] = [-1] if first else []
        pos = _HEADER.size
        for _ in range(first, count):
            cin, cout, bits = _CHECKPOINT.unpack_from(blob, pos)
            self.ins.append(cin)
            self.outs.append(cout)
            self.bits.append(bits)
            self._windows.append(pos + _CHECKPOINT.size)
            pos += _CHECKPOINT_SIZE
        self._validate()

    def _validate(self) -> None:
        if self.outs[0] != 0:
            raise ZtocFormatError("first gzip checkpoint does not start at uncompressed offset 0")
        for i in range(len(self.ins)):
            if not 0 <= self.bits[i] <= 7:
                raise ZtocFormatError(f"gzip checkpoint {i} has invalid bit count {self.bits[i]}")
            if not ((self.bits[i] == 0 and self.ins[i] >= 0) or self.ins[i] >= 1) or (
                self.ins[i] > self.compressed_size
            ):
                raise ZtocFormatError(f"gzip checkpoint {i} lies outside the layer")
            if i and (self.ins[i] < self.ins[i - 1] or self.outs[i] < self.outs[i - 1]):
                raise ZtocFormatError(f"gzip checkpoint {i} goes backwards")

    @property
    def max_span_id(self) -> int:
        return len(self.ins) - 1

    def span_of(self, offset: int) -> int:
        """The span holding uncompressed ``offset`` (the last checkpoint at or before it)."""
        return max(bisect.bisect_right(self.outs, offset) - 1, 0)

    def compressed_start(self, span: int) -> int:
        return self.ins[span] - (1 if self.bits[span] else 0)

    def compressed_end(self, span: int) -> int:
        return self.compressed_size if span == self.max_span_id else self.ins[span + 1]

    def uncompressed_start(self, span: int) -> int:
        return self.outs[span]

    def window(self, span: int) -> memoryview | bytes:
        at = self._windows[span]
        return bytes(WINDOW_SIZE) if at < 0 else self._blob[at : at + WINDOW_SIZE]


_ZSTD_MAGIC = b"SZST"
_ZSTD_HEADER = struct.Struct("<4sIqII")
_ZSTD_POINT = struct.Struct("<qq")
ZSTD_ZINFO_VERSION = 1
#: A zstd span may hold at most this many times the span size (frames are never cut, so a
#: span is a run of whole frames: at least span_size bytes, plus at most one frame).
ZSTD_SPAN_FACTOR = 4


def zstd_span_limit(span_size: int) -> int:
    """Most uncompressed bytes a zstd span of a zTOC built with ``span_size`` may hold."""
    return min(MAX_SPAN_BYTES, ZSTD_SPAN_FACTOR * span_size)


class ZstdZinfo:
    """Checkpoints of a zstd layer: the frame start (compressed, uncompressed) of each span."""

    def __init__(self, blob: bytes, compressed_size: int) -> None:
        if len(blob) < _ZSTD_HEADER.size:
            raise ZtocFormatError("zstd checkpoint table is shorter than its header")
        magic, self.version, self.span_size, count, reserved = _ZSTD_HEADER.unpack_from(blob)
        if magic != _ZSTD_MAGIC or self.version != ZSTD_ZINFO_VERSION or reserved:
            raise ZtocFormatError(
                f"zstd checkpoint table has an unknown magic or version ({magic!r}, "
                f"{self.version})"
            )
        if self.span_size <= 0 or not 1 <= count <= 0x7FFFFFFF:
            raise ZtocFormatError("zstd checkpoint table has a bad span size or span count")
        if len(blob) != _ZSTD_HEADER.size + (count + 1) * _ZSTD_POINT.size:
            raise ZtocFormatError(
                f"zstd checkpoint table size {len(blob)} does not match its {count} spans"
            )
        points = list(_ZSTD_POINT.iter_unpack(memoryview(blob)[_ZSTD_HEADER.size :]))
        self.ins = [p[0] for p in points]
        self.outs = [p[1] for p in points]
        self.compressed_size = compressed_size
        if self.ins[0] < 0 or self.outs[0] != 0:
            raise ZtocFormatError("first zstd checkpoint is not at uncompressed offset 0")
        if self.ins[-1] > compressed_size:
            raise ZtocFormatError("zstd checkpoints lie outside the layer")
        for i in range(1, len(points)):
            if self.ins[i] <= self.ins[i - 1] or self.outs[i] < self.outs[i - 1]:
                raise ZtocFormatError(f"zstd checkpoint {i} goes backwards")

    @staticmethod
    def encode(span_size: int, points: list[tuple[int, int]]) -> bytes:
        """The table for spans starting at ``points[:-1]``, closed by ``points[-1]``."""
        head = _ZSTD_HEADER.pack(_ZSTD_MAGIC, ZSTD_ZINFO_VERSION, span_size, len(points) - 1, 0)
        return head + b"".join(_ZSTD_POINT.pack(c, u) for c, u in points)

    @property
    def max_span_id(self) -> int:
        return len(self.ins) - 2

    @property
    def decoded_size(self) -> int:
        """Uncompressed bytes of all spans (the tar archive plus any trailing padding)."""
        return self.outs[-1]

    def span_of(self, offset: int) -> int:
        """The span holding uncompressed ``offset`` (the last checkpoint at or before it)."""
        return min(max(bisect.bisect_right(self.outs, offset, 0, len(self.outs) - 1) - 1, 0),
                   self.max_span_id)

    def compressed_start(self, span: int) -> int:
        return self.ins[span]

    def compressed_end(self, span: int) -> int:
        return self.ins[span + 1]

    def uncompressed_start(self, span: int) -> int:
        return self.outs[span]

    def uncompressed_end(self, span: int) -> int:
        return self.outs[span + 1]


class TarZinfo:
    """An uncompressed layer: span ``i`` is bytes ``[i*span_size, (i+1)*span_size)``."""

    def __init__(self, blob: bytes) -> None:
        try:
            self.version, self.span_size, self.size = flatbuf.decode_tar_zinfo(blob)
        except ValueError as e:
            raise ZtocFormatError(f"malformed tar zinfo: {e}") from None
        if self.span_size <= 0 or self.size < 0:
            raise ZtocFormatError("tar zinfo has a bad span size or layer size")

    @staticmethod
    def encode(span_size: int, size: int) -> bytes:
        return flatbuf.encode_tar_zinfo(TAR_ZINFO_VERSION, span_size, size)

    @property
    def max_span_id(self) -> int:
        spans, rest = divmod(self.size, self.span_size)
        return spans if rest else spans - 1

    def span_of(self, offset: int) -> int:
        return min(offset // self.span_size, max(self.max_span_id, 0))

    def compressed_start(self, span: int) -> int:
        return span * self.span_size

    def compressed_end(self, span: int) -> int:
        return self.size if span == self.max_span_id else (span + 1) * self.span_size

    def uncompressed_start(self, span: int) -> int:
        return span * self.span_size


def span_limit(span_size: int) -> int:
    """Most uncompressed bytes a span of a zTOC built with ``span_size`` may hold."""
    return min(MAX_SPAN_BYTES, span_size + SPAN_SLACK)


def check_span_lengths(zinfo: GzipZinfo | TarZinfo | ZstdZinfo, uncompressed_size: int) -> None:
    """Refuse spans longer than ``span_limit`` of the span size the checkpoints declare.

    The zTOC records where each span starts, not how long it may be, and a zTOC whose
    checkpoints were dropped (its digests recomputed, so it verifies) leaves a reader
    inflating a whole layer for one small read. The last gzip span counts up to
    ``uncompressed_size`` (what a reader may ask for; trailing padding past the tar's end
    is never read).
    """
    if isinstance(zinfo, ZstdZinfo):
        _check_zstd_spans(zinfo, uncompressed_size)
        return
    if isinstance(zinfo, TarZinfo):
        longest = min(zinfo.span_size, zinfo.size)
        if longest > MAX_SPAN_BYTES:
            raise ZtocFormatError(
                f"zTOC spans are {longest} bytes long (limit {MAX_SPAN_BYTES})"
            )
        return
    limit = span_limit(zinfo.span_size)
    # What a span may take compressed: deflate never grows data by more than a few bytes per
    # 64 KiB block, and member headers and trailers are small; the rest is a forged
    # checkpoint making one small read fetch most of the layer.
    compressed_limit = limit + limit // 8 + (1 << 20)
    outs = zinfo.outs
    for i in range(len(outs)):
        end = outs[i + 1] if i + 1 < len(outs) else max(uncompressed_size, outs[i])
        if end - outs[i] > limit:
            raise ZtocFormatError(
                f"zTOC span {i} holds {end - outs[i]} uncompressed bytes, over the {limit}"
                f" a {zinfo.span_size}-byte span size allows (checkpoints missing?)"
            )
        compressed = zinfo.compressed_end(i) - zinfo.compressed_start(i)
        if compressed > compressed_limit:
            raise ZtocFormatError(
                f"zTOC span {i} takes {compressed} compressed bytes, over the "
                f"{compressed_limit} a {zinfo.span_size}-byte span size allows"
            )


def _check_zstd_spans(zinfo: ZstdZinfo, uncompressed_size: int) -> None:
    """Every zstd span within ``zstd_span_limit`` decoded, and within what that decodes
    from compressed (incompressible blocks grow by 3 bytes per 128 KiB; frame headers and
    small skippable frames add little): so no read fetches or decodes a whole layer."""
    if zinfo.decoded_size < uncompressed_size:
        raise ZtocFormatError("zstd checkpoints end before the tar archive does")
    limit = zstd_span_limit(zinfo.span_size)
    compressed_limit = limit + limit // 8 + (1 << 20)
    for i in range(zinfo.max_span_id + 1):
        out = zinfo.outs[i + 1] - zinfo.outs[i]
        if out > limit:
            raise ZtocFormatError(
                f"zTOC span {i} holds {out} uncompressed bytes, over the {limit} a "
                f"{zinfo.span_size}-byte span size allows for zstd (frames too large?)"
            )
        compressed = zinfo.ins[i + 1] - zinfo.ins[i]
        if compressed > compressed_limit:
            raise ZtocFormatError(
                f"zTOC span {i} takes {compressed} compressed bytes, over the "
                f"{compressed_limit} a {zinfo.span_size}-byte span size allows"
            )


def zinfo_of(ztoc: Ztoc) -> GzipZinfo | TarZinfo | ZstdZinfo:
    """The span geometry for a zTOC, checked against the zTOC's own span count and sizes."""
    zinfo: GzipZinfo | TarZinfo | ZstdZinfo
    if ztoc.compression is Compression.GZIP:
        zinfo = GzipZinfo(ztoc.checkpoints, ztoc.compressed_size)
    elif ztoc.compression is Compression.ZSTD:
        zinfo = ZstdZinfo(ztoc.checkpoints, ztoc.compressed_size)
    else:
        zinfo = TarZinfo(ztoc.checkpoints)
    if zinfo.max_span_id != ztoc.max_span_id or len(ztoc.span_digests) != ztoc.span_count:
        raise ZtocFormatError(
            f"zTOC claims {ztoc.span_count} spans but its checkpoints and digests disagree"
        )
    check_span_lengths(zinfo, ztoc.uncompressed_size)
    return zinfo
