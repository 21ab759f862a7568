"""Reading and writing zTOCs in upstream's FlatBuffers format.

The encoding is byte-identical to upstream SOCI's (the native codec replays its
builder calls), so a zTOC's digest is the same whichever tool wrote it.
"""

from __future__ import annotations

import hashlib

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


def decode(data: bytes) -> Ztoc:
    """Parse zTOC bytes; raise ``ZtocFormatError`` naming the problem if they are malformed."""
    try:
        (version, tool, csize, usize, entries, algorithm, max_span, digests, checkpoints) = (
            flatbuf.decode_ztoc(data, FileMetadata)
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


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
