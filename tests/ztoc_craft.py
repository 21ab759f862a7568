"""Hand-made hostile zTOCs: valid FlatBuffers whose offsets share one table or string.

Written with the ``flatbuffers`` package (not our codec), so they look like what an
attacker's own tool would produce. FlatBuffer offsets may point many times at one
table: a few hundred kilobytes can then describe gigabytes of entries.
"""

from __future__ import annotations

import flatbuffers


def _string_fields(b: flatbuffers.Builder) -> dict[int, int]:
    return {1: b.CreateString("reg"), 10: b.CreateString("2024-01-01T00:00:00Z")}


def shared_entry_ztoc(entries: int, name_len: int, *, pax: int = 0,
                      digests: int = 0, digest_len: int = 71) -> bytes:
    """A zTOC whose ``entries`` TOC slots all point at one entry named by ``name_len`` bytes.

    ``pax`` PAX records (each a shared 1000-byte value) hang off that entry; ``digests``
    span digest slots all point at one string of ``digest_len`` bytes.
    """
    b = flatbuffers.Builder(1 << 20)
    name = b.CreateString("n" * name_len)
    strings = _string_fields(b)
    records = []
    if pax:
        value = b.CreateString("v" * 1000)
        for i in range(pax):
            key = b.CreateString(f"SCHILY.xattr.user.k{i}")
            b.StartObject(2)
            b.PrependUOffsetTRelativeSlot(0, key, 0)
            b.PrependUOffsetTRelativeSlot(1, value, 0)
            records.append(b.EndObject())
    b.StartVector(4, len(records), 4)
    for r in reversed(records):
        b.PrependUOffsetTRelative(r)
    xattrs = b.EndVector()
    b.StartObject(14)
    b.PrependUOffsetTRelativeSlot(0, name, 0)
    for slot, off in strings.items():
        b.PrependUOffsetTRelativeSlot(slot, off, 0)
    b.PrependInt64Slot(3, 1, 0)
    b.PrependUOffsetTRelativeSlot(13, xattrs, 0)
    entry = b.EndObject()
    b.StartVector(4, entries, 4)
    for _ in range(entries):
        b.PrependUOffsetTRelative(entry)
    metadata = b.EndVector()
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, metadata, 0)
    toc = b.EndObject()

    digest = b.CreateString("s" * digest_len)
    b.StartVector(4, digests, 4)
    for _ in range(digests):
        b.PrependUOffsetTRelative(digest)
    span_digests = b.EndVector()
    b.StartObject(4)
    b.PrependInt32Slot(1, max(digests - 1, 0), 0)
    b.PrependUOffsetTRelativeSlot(2, span_digests, 0)
    info = b.EndObject()

    version = b.CreateString("0.9")
    tool = b.CreateString("crafted")
    b.StartObject(6)
    b.PrependUOffsetTRelativeSlot(0, version, 0)
    b.PrependUOffsetTRelativeSlot(1, tool, 0)
    b.PrependInt64Slot(2, 1000, 0)
    b.PrependInt64Slot(3, 1 << 30, 0)
    b.PrependUOffsetTRelativeSlot(4, toc, 0)
    b.PrependUOffsetTRelativeSlot(5, info, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())
