"""The zTOC data model: what upstream SOCI's ``ztoc.Ztoc`` holds, in Python.

Strings are kept exactly as they appear in the FlatBuffer (non-UTF-8 bytes
survive as surrogate escapes) and ``mod_time`` stays the RFC 3339 text that was
stored, so reading and re-writing a zTOC gives back identical bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

#: The only zTOC version upstream writes and reads.
ZTOC_VERSION = "0.9"

#: Upstream's default span size, and ours.
DEFAULT_SPAN_SIZE = 4 << 20

#: PAX records with this prefix carry extended attributes (Go and GNU tar).
XATTR_PREFIX = "SCHILY.xattr."


class Compression(enum.IntEnum):
    """``CompressionAlgorithm`` in upstream's ztoc.fbs, plus ``ZSTD`` (soci's extension).

    Upstream's enum stops at 2; an upstream reader turns 3 into the name
    "compressionalgorithm(3)", finds no zinfo for it and refuses the zTOC, so its
    snapshotter falls back to pulling the layer instead of serving it.
    """

    GZIP = 1
    UNCOMPRESSED = 2
    ZSTD = 3

    @property
    def label(self) -> str:
        """The lower-case name upstream uses in its Go structs and CLI output."""
        return self.name.lower()


@dataclass(slots=True)
class FileMetadata:
    """One tar entry, with upstream's field meanings.

    ``offset`` is where the entry's data starts in the uncompressed tar stream
    and ``size`` is the header's size (after PAX overrides), even for entry
    types that carry no data. ``pax_records`` holds every raw PAX record of the
    entry; upstream stores them in the FlatBuffer field named ``xattrs``.
    """

    name: str
    type: str
    offset: int
    size: int
    linkname: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mod_time: str = ""
    devmajor: int = 0
    devminor: int = 0
    pax_records: dict[str, str] = field(default_factory=dict)

    @property
    def xattrs(self) -> dict[str, str]:
        """The extended attributes: ``SCHILY.xattr.*`` PAX records, prefix removed."""
        n = len(XATTR_PREFIX)
        return {k[n:]: v for k, v in self.pax_records.items() if k.startswith(XATTR_PREFIX)}


@dataclass(slots=True)
class Ztoc:
    """A table of contents plus the checkpoints needed to read any span of a layer."""

    version: str
    build_tool: str
    compressed_size: int
    uncompressed_size: int
    entries: list[FileMetadata]
    compression: Compression
    max_span_id: int
    span_digests: list[str]
    checkpoints: bytes

    @property
    def span_count(self) -> int:
        return self.max_span_id + 1
