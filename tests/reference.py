"""Independent reference implementations the tests compare the native core against.

- ``checkpoints``: upstream's zran algorithm re-done from its description with
  the system zlib through ctypes (16 KiB input reads, a circular 32 KiB output
  window), so chunking and buffering differ from the native builder.
- ``encode_ztoc``: upstream's sequence of FlatBuffers builder calls, made on
  the official Python FlatBuffers runtime.
- ``span_digests``: sha256 over the blob, per upstream's span boundaries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import struct

import flatbuffers

WINSIZE = 32768
_z = ctypes.CDLL(ctypes.util.find_library("z"))
_z.zlibVersion.restype = ctypes.c_char_p


class ZStream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


def _init(strm: ZStream, bits: int) -> None:
    rc = _z.inflateInit2_(ctypes.byref(strm), bits, _z.zlibVersion(), ctypes.sizeof(ZStream))
    assert rc == 0


def checkpoints(blob: bytes, span: int) -> list[tuple[int, int, int, bytes]]:
    """(in, out, bits, window) per checkpoint, exactly as upstream's generator places them."""
    strm = ZStream()
    _init(strm, 47)
    window = ctypes.create_string_buffer(WINSIZE)
    src = ctypes.create_string_buffer(blob, len(blob))
    base = ctypes.addressof(src)
    pos = totin = totout = last = 0
    points: list[tuple[int, int, int, bytes]] = []
    strm.avail_out = 0
    done = False
    while not done:
        n = min(16384, len(blob) - pos)
        if n == 0:
            raise ValueError("truncated")
        strm.next_in = base + pos
        strm.avail_in = n
        pos += n
        while True:
            if strm.avail_out == 0:
                strm.avail_out = WINSIZE
                strm.next_out = ctypes.addressof(window)
            totin += strm.avail_in
            totout += strm.avail_out
            ret = _z.inflate(ctypes.byref(strm), 5)  # Z_BLOCK
            totin -= strm.avail_in
            totout -= strm.avail_out
            if ret not in (0, 1, -5):
                raise ValueError(f"inflate error {ret}")
            if ret == 1:  # Z_STREAM_END
                if strm.avail_in > 0 or pos < len(blob):
                    _z.inflateReset2(ctypes.byref(strm), 47)
                    if strm.avail_in > 0:
                        continue
                    break
                done = True
                break
            dt = strm.data_type
            if (dt & 128) and not (dt & 64) and (totout == 0 or totout - last > span):
                left = strm.avail_out
                w = window.raw
                points.append((totin, totout, dt & 7, w[WINSIZE - left :] + w[: WINSIZE - left]))
                last = totout
            if strm.avail_in == 0:
                break
    _z.inflateEnd(ctypes.byref(strm))
    return points


def zinfo_blob(points: list[tuple[int, int, int, bytes]], span: int) -> bytes:
    out = [struct.pack("<iq", len(points), span)]
    for cin, cout, bits, window in points:
        out.append(struct.pack("<qqB", cin, cout, bits) + window)
    return b"".join(out)


def span_digests(blob: bytes, starts: list[tuple[int, int]]) -> list[str]:
    """Upstream's getPerSpanDigests for gzip: [in_i - (bits_i>0), in_{i+1})."""
    digests = []
    for i, (cin, bits) in enumerate(starts):
        start = cin - (1 if bits else 0)
        end = starts[i + 1][0] if i + 1 < len(starts) else len(blob)
        digests.append("sha256:" + hashlib.sha256(blob[start:end]).hexdigest())
    return digests


def encode_ztoc(z) -> bytes:
    """Upstream's ztocToFlatbuffer, call for call, on the official runtime."""
    b = flatbuffers.Builder(0)

    def s(text: str) -> int:
        return b.CreateString(text.encode("utf-8", "surrogateescape"))

    version = s(z.version)
    tool = s(z.build_tool)
    metas = [0] * len(z.entries)
    for i in range(len(z.entries) - 1, -1, -1):
        me = z.entries[i]
        name, typ, link, uname, gname, mtime = (
            s(me.name), s(me.type), s(me.linkname), s(me.uname), s(me.gname), s(me.mod_time)
        )
        pairs = []
        for key in sorted(me.pax_records, key=lambda k: k.encode("utf-8", "surrogateescape")):
            k, v = s(key), s(me.pax_records[key])
            b.StartObject(2)
            b.PrependUOffsetTRelativeSlot(0, k, 0)
            b.PrependUOffsetTRelativeSlot(1, v, 0)
            pairs.append(b.EndObject())
        b.StartVector(4, len(pairs), 4)
        for off in reversed(pairs):
            b.PrependUOffsetTRelative(off)
        xattrs = b.EndVector()
        b.StartObject(14)
        b.PrependUOffsetTRelativeSlot(0, name, 0)
        b.PrependUOffsetTRelativeSlot(1, typ, 0)
        b.PrependInt64Slot(2, me.offset, 0)
        b.PrependInt64Slot(3, me.size, 0)
        b.PrependUOffsetTRelativeSlot(4, link, 0)
        b.PrependInt64Slot(5, me.mode, 0)
        b.PrependUint32Slot(6, me.uid, 0)
        b.PrependUint32Slot(7, me.gid, 0)
        b.PrependUOffsetTRelativeSlot(8, uname, 0)
        b.PrependUOffsetTRelativeSlot(9, gname, 0)
        b.PrependUOffsetTRelativeSlot(10, mtime, 0)
        b.PrependInt64Slot(11, me.devmajor, 0)
        b.PrependInt64Slot(12, me.devminor, 0)
        b.PrependUOffsetTRelativeSlot(13, xattrs, 0)
        metas[i] = b.EndObject()
    b.StartVector(4, len(metas), 4)
    for off in reversed(metas):
        b.PrependUOffsetTRelative(off)
    meta_vec = b.EndVector()
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, meta_vec, 0)
    toc = b.EndObject()
    checkpoints = b.CreateByteVector(z.checkpoints)
    digests = [s(d) for d in z.span_digests]
    b.StartVector(4, len(digests), 4)
    for off in reversed(digests):
        b.PrependUOffsetTRelative(off)
    digest_vec = b.EndVector()
    b.StartObject(4)
    b.PrependInt32Slot(1, z.max_span_id, 0)
    b.PrependUOffsetTRelativeSlot(2, digest_vec, 0)
    b.PrependUOffsetTRelativeSlot(3, checkpoints, 0)
    b.PrependInt8Slot(0, int(z.compression), 1)
    info = b.EndObject()
    b.StartObject(6)
    b.PrependUOffsetTRelativeSlot(0, version, 0)
    b.PrependUOffsetTRelativeSlot(1, tool, 0)
    b.PrependUOffsetTRelativeSlot(4, toc, 0)
    b.PrependInt64Slot(2, z.compressed_size, 0)
    b.PrependInt64Slot(3, z.uncompressed_size, 0)
    b.PrependUOffsetTRelativeSlot(5, info, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())
