"""zstd layers: zTOCs built from real writers' output, files read back through them, bad
input refused in one line, and create/convert of a zstd image in a real registry."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import struct
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from soci._native.zstdframes import MAX_SKIPPABLE

from images import big_file, files_layer, write_image
from registryd import Registry, push_layout
from soci.errors import LayerFormatError
from soci.oci import mediatypes as mt
from soci.ztoc import (
    Compression,
    LayerReader,
    UnservableLayerError,
    ZstdZinfo,
    build_ztoc,
    decode,
    encode,
    zinfo_of,
)
from soci.ztoc.extract import SpanMismatch, decode_zstd_span

SPAN = 1 << 20
#: About 12 MiB of tar: several spans of SPAN, files crossing span and frame boundaries.
FILES = {f"opt/data/f{i:02d}.bin": big_file(f"z{i}", 350_000 + i * 10_007) for i in range(24)}
FILES["opt/data/empty"] = b""
FILES["etc/motd"] = b"hello from a zstd layer\n"
TAR = files_layer(FILES)


def zstd(*args: str, data: bytes = TAR) -> bytes:
    return subprocess.run(["zstd", "-q", "-c", *args], input=data, check=True,
                          capture_output=True).stdout


def skippable(payload: bytes, nibble: int = 0) -> bytes:
    return struct.pack("<II", 0x184D2A50 | nibble, len(payload)) + payload


def frames_with_skippables(data: bytes = TAR, piece: int = 700_000, lead: bool = True) -> bytes:
    """A multi-frame stream made here: a leading, middle and trailing skippable frame
    around frames of ``piece`` bytes each (with and without a declared content size)."""
    out = [skippable(b"lead")] if lead else []
    for i, at in enumerate(range(0, len(data), piece)):
        chunk = data[at : at + piece]
        # From a pipe zstd does not know the size; with --stream-size it declares it.
        out.append(zstd(f"--stream-size={len(chunk)}", data=chunk) if i % 2 else
                   zstd(data=chunk))
        if i == 3:
            out.append(skippable(b"middle" * 10, 7))
    out.append(skippable(b"trailing toc" * 1000, 15))
    return b"".join(out)


class Blob:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read_at(self, offset: int, size: int) -> bytes:
        assert offset >= 0 and offset + size <= len(self.data)
        return self.data[offset : offset + size]


def build(blob: bytes, span: int = SPAN):
    return build_ztoc(io.BytesIO(blob), span_size=span)


def check_every_file(blob: bytes, tar: bytes = TAR, span: int = SPAN) -> int:
    """Build, round-trip the zTOC, and read every regular file through it; the span count."""
    result = build(blob, span)
    ztoc = decode(encode(result.ztoc))
    assert ztoc.compression is Compression.ZSTD
    assert result.layer_size == len(blob)
    reader = LayerReader(ztoc, Blob(blob))
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        want = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
    got = {e.name: reader.read_file(e) for e in ztoc.entries if e.type == "reg"}
    assert got == want
    # Ranges across span boundaries, and each span whole, decode exactly.
    zinfo = zinfo_of(ztoc)
    assert isinstance(zinfo, ZstdZinfo)
    for span_id in range(ztoc.span_count):
        start, end = zinfo.compressed_start(span_id), zinfo.compressed_end(span_id)
        out = decode_zstd_span(zinfo, span_id, blob[start:end])
        assert out == tar[zinfo.uncompressed_start(span_id) : zinfo.uncompressed_end(span_id)]
    mid = len(tar) // 2
    assert reader.read(mid - 3000, 7000) == tar[mid - 3000 : mid + 4000]
    return ztoc.span_count


@pytest.mark.parametrize("args", [[], ["-T0"], ["-19"], ["--long"]])
def test_zstd_cli_one_frame_within_the_bound_is_one_span(args: list[str]) -> None:
    # One frame of about 12 MiB: within 4x a 4 MiB span size, so it is served as one span.
    assert check_every_file(zstd(*args), span=4 << 20) == 1


@pytest.mark.parametrize("args", [[], ["-T0"]])
def test_zstd_cli_one_frame_over_the_bound_is_unservable(args: list[str]) -> None:
    with pytest.raises(UnservableLayerError, match=r"4x the span size") as info:
        build(zstd(*args), SPAN)
    assert "\n" not in str(info.value)


def test_pzstd_frames_are_spans() -> None:
    blob = subprocess.run(["pzstd", "-q", "-c", "-p", "2", "-1"], input=TAR, check=True,
                          capture_output=True).stdout
    # pzstd at level 1 cuts 1 MiB... 8 MiB frames depending on level: at 4 MiB spans
    # every span is whole frames, so more than one span means more than one frame.
    assert check_every_file(blob, span=1 << 20) > 1


def test_python_made_frames_with_skippable_frames() -> None:
    blob = frames_with_skippables()
    spans = check_every_file(blob)
    assert 5 <= spans <= 18
    z = build(blob).ztoc
    zinfo = zinfo_of(z)
    # Leading and trailing skippable frames belong to no span.
    assert zinfo.compressed_start(0) == len(skippable(b"lead"))
    assert zinfo.compressed_end(z.max_span_id) == len(blob) - len(
        skippable(b"trailing toc" * 1000))


def test_zstd_chunked_from_skopeo(tmp_path: Path) -> None:
    """containers/image's zstd:chunked: a frame per file or chunk, plus its TOC in trailing
    skippable frames (the same code podman push uses)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_image(src, "t", [TAR])
    subprocess.run(["skopeo", "--insecure-policy", "copy", "-q", "--dest-compress-format",
                    "zstd:chunked", f"oci:{src}:t", f"oci:{dst}:t"], check=True)
    index = json.loads((dst / "index.json").read_text())
    manifest = json.loads((dst / "blobs/sha256" / index["manifests"][0]["digest"][7:])
                          .read_bytes())
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == mt.OCI_LAYER_ZSTD
    assert any("zstd-chunked" in k for k in layer.get("annotations", {}))
    blob = (dst / "blobs/sha256" / layer["digest"][7:]).read_bytes()
    assert check_every_file(blob) > 1
    assert build(blob).layer_digest == layer["digest"]


def test_gzip_ztocs_unchanged_by_the_zstd_value() -> None:
    """The enum's new value leaves gzip zTOCs alone: gzip still encodes as 1."""
    import gzip

    z = build_ztoc(io.BytesIO(gzip.compress(TAR, mtime=0))).ztoc
    assert z.compression is Compression.GZIP and int(Compression.ZSTD) == 3


# -- bad input ------------------------------------------------------------------------------

def lying_header() -> bytes:
    """A frame whose header declares one byte more than its content (4-byte size field)."""
    frame = zstd(f"--stream-size={len(TAR)}", "--no-check")
    d = frame[4]
    assert d >> 6 == 2 and not d & 0x20  # 4-byte content size, window byte present
    size = struct.unpack_from("<I", frame, 6)[0]
    return frame[:6] + struct.pack("<I", size + 1) + frame[10:]


def with_dictionary_id(frame: bytes) -> bytes:
    """The same frame with a 1-byte dictionary id in its header."""
    d = frame[4]
    assert d & 3 == 0 and not d & 0x20
    return frame[:4] + bytes([d | 1, frame[5], 0x2A]) + frame[6:]


def _long_window_frame() -> bytes:
    """A frame whose header asks for a 256 MiB window (window byte 0x90: 2**28)."""
    frame = zstd(data=TAR[:100_000])
    assert not frame[4] & 0x20
    return frame[:5] + b"\x90" + frame[6:]


def bad_blobs() -> list[tuple[str, bytes, str]]:
    good = zstd()
    return [
        ("truncated frame", good[: len(good) // 2], "truncated"),
        ("truncated header", good[:7], "truncated"),
        ("corrupt block", good[:5000] + bytes(b ^ 0x5A for b in good[5000:5100])
         + good[5100:], "corrupt zstd data"),
        ("lying header", lying_header(), "declares|corrupt zstd data"),
        ("absurd skippable", good + struct.pack("<II", 0x184D2A50, 0xFFFFFFF0) + b"x" * 100,
         "declares 4294967280 bytes"),
        ("absurd skippable mid-stream", good + struct.pack(
            "<II", 0x184D2A5F, (64 << 20) + 1) + good, "declares 67108865 bytes"),
        ("skippable past the end", good + struct.pack("<II", 0x184D2A50, 5000) + b"x" * 10,
         "runs past the end"),
        ("dictionary frame", with_dictionary_id(good), "dictionary"),
        ("garbage after a frame", good + b"garbage!", "bad magic"),
        ("no data frame", skippable(b"only"), "no data frame"),
        ("window over 128 MiB", _long_window_frame(), "zstd --long=28"),
    ]


@pytest.mark.parametrize(("name", "blob", "message"), bad_blobs(), ids=[b[0] for b in bad_blobs()])
def test_bad_zstd_input_one_line_and_nothing_written(tmp_path: Path, name: str, blob: bytes,
                                                     message: str) -> None:
    with pytest.raises(LayerFormatError, match=message) as info:
        build(blob, 4 << 20)
    assert "\n" not in str(info.value)
    layer, out = tmp_path / "layer.zst", tmp_path / "layer.ztoc"
    layer.write_bytes(blob)
    proc = subprocess.run([sys.executable, "-m", "soci.cli", "--root", str(tmp_path / "root"),
                           "ztoc", "build", str(layer), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) != []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("layer.ztoc")]


def test_skippable_limit_is_absurd_only_beyond_real_tocs() -> None:
    assert MAX_SKIPPABLE >= 50 << 20  # containers/storage caps a zstd:chunked TOC at 50 MiB


def test_corrupt_span_bytes_never_decode_to_wrong_bytes() -> None:
    """A span's compressed bytes that do not match its digest are refused before decoding."""
    blob = frames_with_skippables()
    z = build(blob).ztoc
    zinfo = zinfo_of(z)
    start = zinfo.compressed_start(1)
    bad = bytearray(blob)
    bad[start + 100] ^= 0xFF
    with pytest.raises(SpanMismatch, match="span 1"):
        LayerReader(z, Blob(bytes(bad))).read(zinfo.uncompressed_start(1), 10)


def test_forged_zstd_checkpoints_are_refused() -> None:
    from soci.errors import ZtocFormatError

    z = build(frames_with_skippables()).ztoc
    zinfo = zinfo_of(z)
    # Drop every inner checkpoint (digest list adjusted): one span far over 4x the span size.
    points = [(zinfo.ins[0], 0), (zinfo.ins[-1], zinfo.outs[-1])]
    z.checkpoints = ZstdZinfo.encode(SPAN, points)
    z.max_span_id = 0
    z.span_digests = z.span_digests[:1]
    with pytest.raises(ZtocFormatError, match="uncompressed bytes"):
        zinfo_of(z)
    for blob in (z.checkpoints[:-1], b"XXXX" + z.checkpoints[4:],
                 ZstdZinfo.encode(SPAN, [(10, 0), (5, 100)])):
        z.checkpoints = blob
        with pytest.raises(ZtocFormatError):
            zinfo_of(z)


# -- create and convert through a real registry ---------------------------------------------

def soci(root: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "soci.cli", "--plain-http", "--root", str(root),
                           *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def zstd_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """An image with a gzip base layer, a multi-frame zstd layer and a one-frame zstd layer
    too large to serve, in a real registry.

    Not pzstd's output: it starts with a skippable frame, so skopeo (containers/image sniffs
    the magic) takes it for an uncompressed tar and pushes it gzip-compressed.
    """
    tmp = tmp_path_factory.mktemp("zimg")
    write_image(tmp, "v1", [files_layer({"etc/os-release": b"NAME=zstd-test\n"})])
    multi = frames_with_skippables(lead=False)
    one = zstd(data=files_layer({"opt/big.bin": big_file("one", 20 << 20)}))
    top = json.loads((tmp / "index.json").read_text())["manifests"][0]["digest"]
    manifest_path = tmp / "blobs/sha256" / top[7:]
    manifest = json.loads(manifest_path.read_bytes())
    config_path = tmp / "blobs/sha256" / manifest["config"]["digest"][7:]
    config = json.loads(config_path.read_bytes())
    import hashlib

    for blob, tar in ((multi, TAR), (one, None)):
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        (tmp / "blobs/sha256" / digest[7:]).write_bytes(blob)
        manifest["layers"].append({"mediaType": mt.OCI_LAYER_ZSTD, "digest": digest,
                                   "size": len(blob)})
        raw = tar if tar is not None else subprocess.run(
            ["zstd", "-dc"], input=blob, check=True, capture_output=True).stdout
        config["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(raw).hexdigest())
    config_bytes = json.dumps(config).encode()
    cdigest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    (tmp / "blobs/sha256" / cdigest[7:]).write_bytes(config_bytes)
    manifest["config"] = {**manifest["config"], "digest": cdigest, "size": len(config_bytes)}
    data = json.dumps(manifest).encode()
    mdigest = "sha256:" + hashlib.sha256(data).hexdigest()
    (tmp / "blobs/sha256" / mdigest[7:]).write_bytes(data)
    (tmp / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": mt.OCI_MANIFEST, "digest": mdigest, "size": len(data),
         "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
    with Registry() as reg:
        push_layout(tmp, reg.host, "zstd:v1", tag="v1")
        multi_digest = "sha256:" + hashlib.sha256(multi).hexdigest()
        one_digest = "sha256:" + hashlib.sha256(one).hexdigest()
        yield f"{reg.host}/zstd:v1", multi_digest, one_digest


def index_ztocs(root: Path, index_digest: str) -> dict[str, dict]:
    data = (root / "content" if (root / "content").exists() else root)
    found = list(data.rglob(index_digest[7:]))
    assert found, f"index {index_digest} not in {root}"
    index = json.loads(found[0].read_bytes())
    return {b["annotations"][mt.ANN_LAYER_DIGEST]: b for b in index["layers"]}


def test_create_indexes_the_multi_frame_zstd_layer(tmp_path: Path,
                                                   zstd_image: tuple[str, str, str]) -> None:
    ref, multi, one = zstd_image
    root = tmp_path / "root"
    out = soci(root, "create", "--min-layer-size", "0", ref)
    index_digest = out.stdout.strip().splitlines()[-1].split()[0]
    assert "cannot be served lazily" in out.stdout + out.stderr
    ztocs = index_ztocs(root, index_digest)
    assert multi in ztocs and one not in ztocs
    assert ztocs[multi]["annotations"][mt.ANN_LAYER_MEDIA_TYPE] == mt.OCI_LAYER_ZSTD
    ztoc_digest = ztocs[multi]["digest"]
    z = decode(next(root.rglob(ztoc_digest[7:])).read_bytes())
    assert z.compression is Compression.ZSTD and z.span_count > 1
    # get-file reads the zstd layer lazily from the registry through that zTOC.
    got = subprocess.run([sys.executable, "-m", "soci.cli", "--plain-http", "--root", str(root),
                          "ztoc", "get-file", ztoc_digest, "opt/data/f07.bin", "--ref", ref],
                         capture_output=True, check=True).stdout
    assert got == FILES["opt/data/f07.bin"]
    info = json.loads(soci(root, "ztoc", "info", ztoc_digest).stdout)
    assert info["num_spans"] == z.span_count


def test_convert_indexes_the_zstd_layer(tmp_path: Path,
                                        zstd_image: tuple[str, str, str]) -> None:
    ref, multi, _one = zstd_image
    root = tmp_path / "root"
    dst = ref.replace(":v1", ":v1-soci")
    soci(root, "convert", "--min-layer-size", "0", ref, dst)
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{dst}"],
                         capture_output=True, check=True).stdout
    index = json.loads(raw)
    soci_entry = next(m for m in index["manifests"]
                      if m.get("artifactType") == mt.SOCI_INDEX_V2)
    ztocs = index_ztocs(root, soci_entry["digest"])
    assert multi in ztocs


def test_docker_zstd_media_type_is_a_zstd_layer() -> None:
    assert "application/vnd.docker.image.rootfs.diff.tar.zstd" in mt.ZSTD_LAYERS
    assert shutil.which("zstd") is not None


class ShortReads(io.BytesIO):
    """A source that returns short reads (as a socket does), so frame headers straddle
    the pieces the indexer is fed."""

    def __init__(self, data: bytes, seed: int) -> None:
        super().__init__(data)
        self.sizes = itertools.cycle([*[1, 3, 17, 5, 4096, 9, 2, 65536, 11, 18][seed:], 7])

    def read(self, n: int | None = -1) -> bytes:
        return super().read(min(n, next(self.sizes)) if n and n > 0 else n)


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_short_reads_give_the_same_ztoc(seed: int) -> None:
    small = files_layer({f"f{i}": big_file(f"s{i}", 150_000 + i) for i in range(16)})
    blob = frames_with_skippables(small, piece=100_000)
    want = encode(build(blob, 256 << 10).ztoc)
    got = build_ztoc(ShortReads(blob, seed), span_size=256 << 10)
    assert encode(got.ztoc) == want
