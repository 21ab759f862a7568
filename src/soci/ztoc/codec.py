"""Reading and writing zTOCs in upstream's FlatBuffers format.

The encoding is byte-identical to upstream SOCI's (the native codec replays its
builder calls), so a zTOC's digest is the same whichever tool wrote it.
"""

from __future__ import annotations

from soci._native import flatbuf
from soci.errors import ZtocFormatError
from soci.ztoc.model import Compression, FileMetadata, Ztoc


def encode(ztoc: Ztoc) -> bytes:
    """Serialize a zTOC to its FlatBuffer bytes."""
    return flatbuf.encode_ztoc(
        ztoc.version,
        ztoc.build_tool,
        ztoc.compressed_size,
        ztoc.uncompressed_size,
        ztoc.entries,
        int(ztoc.compression),
        ztoc.max_span_id,
        ztoc.span_digests,
        ztoc.checkpoints,
    )


#: Limits that no real layer reaches and that keep a hostile zTOC from exhausting memory.
MAX_ENTRIES = 5_000_000
#: Longest entry name, link name, user/group name (bytes; Linux's PATH_MAX).
MAX_NAME = 4096
#: Most bytes of PAX records (keys plus values) one entry may carry: the tar scanner, like
#: Go's tar reader, refuses PAX headers over 1 MiB, so a real layer never has more.
MAX_PAX = 1 << 20
#: What decoding may charge beyond twice the zTOC's size (see ``decode``).
DECODE_SLACK = 1 << 20


def decode_budget(size: int) -> int:
    """Bytes of entries and strings a ``size``-byte zTOC may decode to.

    The decoder charges every entry, PAX record and string each time it is reached (an
    entry 40 bytes plus its strings, a string its length plus 5), which is never more than
    the bytes they take in a buffer that shares nothing: upstream's builder and ours never
    share a table or a string, so a real zTOC charges at most its own size. Twice that, plus
    a constant, leaves room for other writers, while a zTOC whose offsets all point at one
    large entry is refused after a few entries instead of decoding to gigabytes.
    """
    return 2 * size + DECODE_SLACK


def decode(data: bytes, *, budget: int | None = None) -> Ztoc:
    """Parse zTOC bytes; raise ``ZtocFormatError`` naming the problem if they are malformed.

    Memory is bounded by the input: decoding stops with an error once it has produced more
    than ``budget`` bytes of entries and strings (default ``decode_budget(len(data))``), more
    than ``MAX_ENTRIES`` entries, a name over ``MAX_NAME`` bytes or PAX records over
    ``MAX_PAX`` bytes in one entry, before building anything larger.
    """
    try:
        (version, tool, csize, usize, entries, algorithm, max_span, digests, checkpoints) = (
            flatbuf.decode_ztoc(
                data, FileMetadata,
                budget=decode_budget(len(data)) if budget is None else budget,
                max_entries=MAX_ENTRIES, max_name=MAX_NAME, max_pax=MAX_PAX,
            )
        )
    except (ValueError, OverflowError) as e:
        raise ZtocFormatError(f"malformed zTOC: {e}") from None
    try:
        compression = Compression(algorithm)
    except ValueError:
        raise ZtocFormatError(f"zTOC has unknown compression algorithm {algorithm}") from None
    # Upstream orders the TOC by offset when it reads one; so do we.
    if any(entries[i].offset > entries[i + 1].offset for i in range(len(entries) - 1)):
        entries.sort(key=lambda e: e.offset)
    return Ztoc(version, tool, csize, usize, entries, compression, max_span, digests, checkpoints)


_TYPES = frozenset({"reg", "dir", "symlink", "hardlink", "char", "block", "fifo"})


def check(ztoc: Ztoc) -> None:
    """Refuse a zTOC that could make a reader misbehave (before serving from it).

    Checks sizes, entry count, each entry's type, name length and data range, and the
    span geometry (checkpoints inside the layer, one digest per span, no span longer than
    ``zinfo.span_limit`` of the declared span size, so no read inflates a whole layer).
    """
    from soci.ztoc.zinfo import zinfo_of  # the geometry checks live with the geometry

    if ztoc.compressed_size <= 0 or ztoc.uncompressed_size < 0:
        raise ZtocFormatError("zTOC has impossible layer sizes")
    if len(ztoc.entries) > MAX_ENTRIES:
        raise ZtocFormatError(f"zTOC lists {len(ztoc.entries)} entries (limit {MAX_ENTRIES})")
    for e in ztoc.entries:
        if e.type not in _TYPES:
            raise ZtocFormatError(f"zTOC entry {e.name[:100]!r} has unknown type {e.type!r}")
        if len(e.name) > MAX_NAME or len(e.linkname) > MAX_NAME:
            raise ZtocFormatError(f"zTOC entry {e.name[:100]!r}... has an absurdly long name")
        if e.offset < 0 or e.size < 0 or (
            e.type == "reg" and e.offset + e.size > ztoc.uncompressed_size
        ):
            raise ZtocFormatError(f"zTOC entry {e.name[:100]!r} lies outside the layer")
    zinfo_of(ztoc)
