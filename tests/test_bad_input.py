"""Bad layers fail with one clear error and no output; odd-but-valid ones are handled."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile

import pytest

from layers import Node, tar_with_tarfile
from soci.errors import LayerFormatError
from soci.ztoc import build_ztoc

RAW = tar_with_tarfile(
    [Node(f"f{i}", data=hashlib.shake_256(b"%d" % i).digest(3000) + b"x" * 20_000)
     for i in range(20)],
    tarfile.PAX_FORMAT,
)
GZ = gzip.compress(RAW, mtime=0)


def build(blob: bytes, span: int = 16_384):
    return build_ztoc(io.BytesIO(blob), span_size=span)


def header(
    name: bytes, size_field: bytes, typeflag: bytes = b"0", fix_checksum: bool = True
) -> bytes:
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = size_field.ljust(12, b"\0")
    h[136:148] = b"00000000000\0"
    h[156:157] = typeflag
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"        "
    if fix_checksum:
        h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "empty"),
        (GZ[: len(GZ) // 2], "truncated"),
        (GZ[:-4], "truncated"),
        (GZ[:15], "truncated"),
        (GZ + b"\0" * 64, "corrupt gzip"),
        (GZ + b"garbage!", "corrupt gzip"),
        (GZ[:200] + bytes(b ^ 0x55 for b in GZ[200:260]) + GZ[260:], "corrupt gzip|checksum"),
        (GZ[:-8] + b"\0\0\0\0" + GZ[-4:], "corrupt gzip"),  # CRC mismatch
        (gzip.compress(b"not a tar at all" * 100), "checksum"),
        (os.urandom(5000), "checksum"),
        (b"\x28\xb5\x2f\xfd" + os.urandom(100), "zstd"),
        (RAW[:5000], "truncated"),
        (RAW[:512 * 3 + 100], "truncated"),
        (header(b"big", b"77777777777\0") + b"x" * 1024, "truncated"),
        (header(b"neg", b"\xff" * 12) + bytes(1024), "size"),
        (header(b"bad", b"0000001000\0\0", fix_checksum=False) + bytes(2048), "checksum"),
        (header(b"sparse", b"00000000000\0", b"S") + bytes(1024), "sparse"),
        (header(b"x", b"00000000000\0") + bytes(512) + header(b"y", b"0\0") + bytes(1024),
         "zero block"),
        (header(b"pax", b"%011o\0" % 20, b"x") + b"99999 path=aaa\n".ljust(512, b"\0")
         + header(b"f", b"0\0") + bytes(1024), "PAX"),
    ],
)
def test_bad_layers_raise_one_clear_error(blob: bytes, message: str) -> None:
    with pytest.raises(LayerFormatError, match=message) as info:
        build(blob)
    assert "\n" not in str(info.value)


def test_pax_sparse_is_refused() -> None:
    records = b"22 GNU.sparse.major=1\n"
    blob = header(b"pax", b"%011o\0" % len(records), b"x") + records.ljust(512, b"\0")
    blob += header(b"f", b"0\0") + bytes(1024)
    with pytest.raises(LayerFormatError, match="sparse"):
        build(blob)


def test_unsupported_entry_type_names_the_entry() -> None:
    blob = header(b"weird", b"0\0", b"V") + bytes(1024)
    with pytest.raises(LayerFormatError, match="unsupported tar entry type 'V' for 'weird'"):
        build(blob)


def test_global_pax_header_is_left_out() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "made by git archive"}) as tf:
        ti = tarfile.TarInfo("a")
        ti.size = 3
        tf.addfile(ti, io.BytesIO(b"abc"))
    z = build(gzip.compress(buf.getvalue())).ztoc
    assert [e.name for e in z.entries] == ["a"]


def test_tar_without_end_marker_is_accepted() -> None:
    """umoci-style tars stop after the last entry; Go's reader takes that as a clean end."""
    with tarfile.open(fileobj=io.BytesIO(RAW)) as tf:
        last = tf.getmembers()[-1]
    raw = RAW[: last.offset_data + -(-last.size // 512) * 512]
    z = build(gzip.compress(raw)).ztoc
    assert len(z.entries) == 20
    assert z.uncompressed_size == len(raw)


def test_cli_failure_is_one_line_and_leaves_no_file(tmp_path) -> None:
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(GZ[: len(GZ) // 2])
    out = tmp_path / "out.ztoc"
    proc = subprocess.run(
        [sys.executable, "-m", "soci.cli", "ztoc", "build", str(bad), "-o", str(out)],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "truncated" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [bad]


def test_span_sizes_a_reader_would_refuse_are_not_built(tmp_path) -> None:
    """Readers cap a span at MAX_SPAN_BYTES, so the builder refuses span sizes past it."""
    from soci.ztoc import MAX_SPAN_SIZE

    with pytest.raises(ValueError, match="span size"):
        build_ztoc(io.BytesIO(b""), span_size=MAX_SPAN_SIZE + 1)
    layer = tmp_path / "layer.tar"
    layer.write_bytes(b"\0" * 1024)
    proc = subprocess.run([sys.executable, "-m", "soci.cli", "ztoc", "build", "--span-size",
                           str(MAX_SPAN_SIZE + 1), str(layer), "-o", str(tmp_path / "z")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "span-size" in proc.stderr
    assert not (tmp_path / "z").exists()
