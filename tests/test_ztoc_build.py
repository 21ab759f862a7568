"""Building zTOCs from real tar writers and gzip writers, checked against independent references."""

from __future__ import annotations

import gzip
import hashlib
import io
import string
import tarfile
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference
from layers import GZIP_WRITERS, Node, gzip_with, tar_with_cli, tar_with_tarfile
from soci.ztoc import (
    Compression,
    GzipZinfo,
    LayerReader,
    build_ztoc,
    decode,
    encode,
)
from soci.ztoc.tarmeta import format_time

_TYPES = {
    tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.FIFOTYPE: "fifo",
    tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block",
}


class BytesBlob:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read_at(self, offset: int, size: int) -> bytes:
        assert offset >= 0 and offset + size <= len(self.data)
        return self.data[offset : offset + size]


def expected_mod_time(m: tarfile.TarInfo) -> str:
    raw = m.pax_headers.get("mtime")
    if raw is None:
        return format_time(int(m.mtime))
    whole, _, frac = raw.partition(".")
    value = Decimal(whole) + (Decimal("0." + frac[:9]) * (-1 if whole.startswith("-") else 1)
                              if frac else 0)
    secs = int(value // 1)
    return format_time(secs, int((value - secs) * 1_000_000_000))


def end_of_archive(raw: bytes, members: list[tarfile.TarInfo]) -> int:
    """Where Go's tar reader stops: after the two zero blocks following the last entry."""
    if not members:
        return min(1024, len(raw))
    last = members[-1]
    end = last.offset_data + (-(-last.size // 512) * 512 if last.isreg() else 0)
    return min(end + 1024, len(raw))


def check_layer(blob: bytes, raw_tar: bytes, span: int, flatc_ztoc=None) -> None:
    result = build_ztoc(io.BytesIO(blob), span_size=span)
    z = result.ztoc
    assert result.layer_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert result.layer_size == z.compressed_size == len(blob)

    # Checkpoints and span digests, against the reference zran and hashing.
    if blob[:2] == b"\x1f\x8b":
        assert z.compression is Compression.GZIP
        points = reference.checkpoints(blob, span)
        assert z.checkpoints == reference.zinfo_blob(points, span)
        assert z.span_digests == reference.span_digests(blob, [(p[0], p[2]) for p in points])
        assert isinstance(result.ztoc.checkpoints, bytes)
        GzipZinfo(z.checkpoints, len(blob))
    else:
        assert z.compression is Compression.UNCOMPRESSED
        spans = [blob[i : i + span] for i in range(0, len(blob), span)]
        assert z.span_digests == ["sha256:" + hashlib.sha256(s).hexdigest() for s in spans]
    assert z.max_span_id == len(z.span_digests) - 1

    # The encoding: byte-identical to upstream's builder calls, and round-trips.
    data = encode(z)
    assert data == reference.encode_ztoc(z)
    assert encode(decode(data)) == data
    assert decode(data) == z

    # The TOC, against Python's tarfile.
    tf = tarfile.open(fileobj=io.BytesIO(raw_tar))  # noqa: SIM115 (read below, in memory)
    members = [m for m in tf.getmembers()]
    assert z.uncompressed_size == end_of_archive(raw_tar, members)
    assert len(z.entries) == len(members)
    reader = LayerReader(z, BytesBlob(blob))
    for e, m in zip(z.entries, members, strict=True):
        assert e.name.rstrip("/") == m.name.rstrip("/")
        assert e.type == _TYPES[m.type]
        assert e.offset == m.offset_data
        assert e.size == m.size
        assert e.linkname == m.linkname
        assert e.mode == m.mode
        assert (e.uid, e.gid, e.uname, e.gname) == (m.uid, m.gid, m.uname, m.gname)
        assert (e.devmajor, e.devminor) == (m.devmajor, m.devminor)
        assert e.pax_records == m.pax_headers
        assert e.mod_time == expected_mod_time(m)
        if m.isreg():
            assert reader.read_file(e) == tf.extractfile(m).read(), e.name

    # An independent FlatBuffers reader (flatc's generated code) sees the same TOC.
    if flatc_ztoc is not None:
        root = flatc_ztoc.Ztoc.GetRootAs(data, 0)
        assert root.Version() == b"0.9"
        assert root.CompressedArchiveSize() == len(blob)
        toc = root.Toc()
        assert toc.MetadataLength() == len(z.entries)
        for i, e in enumerate(z.entries):
            me = toc.Metadata(i)
            assert me.Name().decode("utf-8", "surrogateescape") == e.name
            assert (me.UncompressedOffset(), me.UncompressedSize()) == (e.offset, e.size)
        info = root.CompressionInfo()
        assert info.MaxSpanId() == z.max_span_id
        assert info.CompressionAlgorithm() == int(z.compression)
        assert info.CheckpointsAsNumpy().tobytes() == z.checkpoints if _has_numpy() else True


def _has_numpy() -> bool:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


# -- generated trees -----------------------------------------------------------

_name_chars = st.sampled_from(string.ascii_letters + string.digits + "._-") | st.sampled_from(
    ["é", "ü", "名", " "]
)
_segment = st.text(_name_chars, min_size=1, max_size=40).filter(lambda s: s not in (".", ".."))


@st.composite
def trees(draw: st.DrawFn, cli_safe: bool = False) -> list[Node]:
    nodes: list[Node] = []
    paths: set[str] = set()
    files: list[str] = []
    count = draw(st.integers(1, 25))
    for i in range(count):
        depth = draw(st.integers(0, 3))
        parts = [draw(_segment) for _ in range(depth)] + [draw(_segment) + f"_{i}"]
        if draw(st.booleans()) and not cli_safe:
            parts.insert(0, "x" * draw(st.integers(60, 120)))  # long names: GNU/PAX records
        path = "/".join(parts)
        if any(path.startswith(p + "/") or p.startswith(path + "/") for p in paths):
            continue
        kind = draw(st.sampled_from(["file"] * 6 + ["dir", "symlink", "hardlink", "fifo"]))
        if kind == "hardlink" and not files:
            kind = "file"
        node = Node(path, kind, mtime=draw(st.integers(0, 2_000_000_000)))
        if kind == "file":
            size = draw(st.sampled_from([0, 1, 511, 512, 513, 5000, 70_000, 300_000]))
            seed = draw(st.binary(min_size=1, max_size=64))
            compressible = draw(st.booleans())
            node.data = (seed * (size // len(seed) + 1))[:size] if compressible else (
                hashlib.shake_256(seed).digest(size))
            node.mode = draw(st.sampled_from([0o644, 0o755, 0o600, 0o4755]))
            files.append(path)
        elif kind == "symlink":
            near = "../" + (files[-1] if files else "x")
            node.target = draw(st.sampled_from([near, "/etc/passwd", "rel"]))
        elif kind == "hardlink":
            node.target = draw(st.sampled_from(files))
        if not cli_safe and draw(st.integers(0, 4)) == 0:
            frac = f"{draw(st.integers(1, 999_999_999)):09d}".rstrip("0")
            node.pax = {"SCHILY.xattr.user.test": draw(st.text(min_size=1, max_size=20)),
                        "mtime": f"{node.mtime}.{frac}"}
        paths.add(path)
        nodes.append(node)
    return nodes


FAST = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))


@FAST
@given(trees(), st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
       st.sampled_from(GZIP_WRITERS), st.sampled_from([32_768, 100_000, 1 << 20]))
def test_tarfile_layers(flatc_ztoc, nodes, fmt, writer, span):
    if fmt == tarfile.GNU_FORMAT:
        for n in nodes:
            n.pax = {}
    raw = tar_with_tarfile(nodes, fmt)
    check_layer(gzip_with(raw, writer), raw, span, flatc_ztoc)
    check_layer(raw, raw, span)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(trees(cli_safe=True), st.sampled_from(["gnu", "posix", "ustar"]),
       st.sampled_from(GZIP_WRITERS), st.sampled_from([50_000, 1 << 20]))
def test_gnu_tar_layers(nodes, fmt, writer, span):
    raw = tar_with_cli(nodes, "gnutar", fmt)
    check_layer(gzip_with(raw, writer), raw, span)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(trees(cli_safe=True), st.sampled_from(["pax", "ustar", "gnutar"]),
       st.sampled_from(GZIP_WRITERS), st.sampled_from([50_000, 1 << 20]))
def test_bsdtar_layers(nodes, fmt, writer, span):
    raw = tar_with_cli(nodes, "bsdtar", fmt)
    check_layer(gzip_with(raw, writer), raw, span)


@pytest.mark.parametrize("writer", GZIP_WRITERS)
def test_every_gzip_writer_with_many_spans(writer: str, flatc_ztoc) -> None:
    nodes = [Node(f"d/f{i}", data=hashlib.shake_256(bytes([i])).digest(40_000) * (i % 3 + 1))
             for i in range(40)]
    nodes.append(Node("d/dev", "char"))
    nodes.append(Node("d/link", "hardlink", target="d/f3"))
    raw = tar_with_tarfile(nodes, tarfile.PAX_FORMAT)
    blob = gzip_with(raw, writer)
    check_layer(blob, raw, 32_768, flatc_ztoc)


def test_reads_cross_gzip_members() -> None:
    """A file whose bytes straddle two gzip members reads back whole from any offset."""
    data = hashlib.shake_256(b"straddle").digest(200_000)
    raw = tar_with_tarfile([Node("big", data=data)], tarfile.PAX_FORMAT)
    cut = 100_000
    blob = gzip.compress(raw[:cut], mtime=0) + gzip.compress(raw[cut:], mtime=0)
    z = build_ztoc(io.BytesIO(blob), span_size=20_000).ztoc
    reader = LayerReader(z, BytesBlob(blob))
    for offset in (0, cut - 5, cut, cut + 1, len(raw) - 3000):
        for size in (1, 10, 5000, 150_000):
            size = min(size, len(raw) - offset)
            assert reader.read(offset, size) == raw[offset : offset + size]

