"""Fuzzing the parsers that face untrusted bytes: zTOCs, checkpoint blobs, manifests, indexes.

Each parser must either return a value or raise its own one-line error (a SociError);
anything else (an IndexError, a crash, a hang) is a bug. Inputs that once found a bug are
pinned with @example so they are tried on every run.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import resource
import tarfile
from collections.abc import Iterator

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from layers import Node, tar_with_tarfile
from soci.errors import SociError
from soci.fs.tree import LayerTree
from soci.index.model import SociIndex
from soci.oci.descriptor import Index, Manifest
from soci.ztoc import build_ztoc, decode, encode
from soci.ztoc.codec import check
from soci.ztoc.zinfo import GzipZinfo
from ztoc_craft import shared_entry_ztoc

RAW = tar_with_tarfile([Node("a/b", data=b"x" * 70_000), Node("a/../../etc", data=b"y"),
                        Node("c", "symlink", target="/etc/passwd")], tarfile.PAX_FORMAT)
VALID = encode(build_ztoc(io.BytesIO(gzip.compress(RAW)), span_size=20_000).ztoc)
#: A plain-tar zTOC has no 32 KiB windows, so mutations land on the table itself.
VALID_TAR = encode(build_ztoc(io.BytesIO(RAW), span_size=20_000).ztoc)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


#: Address space a fuzzed zTOC may add while it is decoded and checked: hundreds of times
#: what any input here may honestly need, a fraction of what a decoder without bounds takes.
FUZZ_MEMORY = 256 << 20


@contextlib.contextmanager
def memory_cap(extra: int = FUZZ_MEMORY) -> Iterator[None]:
    """Limit this process's address space to its current size plus ``extra`` for a while,
    so a parser that allocates without bound fails here (MemoryError) instead of passing."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) << 10 for line in f if line.startswith("VmSize:"))
    cap = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _survives_ztoc(data: bytes) -> None:
    with memory_cap():
        try:
            z = decode(data)
            check(z)
            LayerTree(z)
        except SociError:
            pass


@FUZZ
@given(st.binary(max_size=4096))
@example(b"")
@example(b"\x04\x00\x00\x00" + b"\xff" * 60)
@example(VALID[:64])
def test_ztoc_decoder_on_random_bytes(data: bytes) -> None:
    _survives_ztoc(data)


@FUZZ
@given(st.sampled_from([VALID, VALID_TAR]), st.data())
def test_ztoc_decoder_on_mutated_ztocs(valid: bytes, draw: st.DataObject) -> None:
    flips = draw.draw(st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)),
                               max_size=8))
    cut = draw.draw(st.integers(0, len(valid)))
    data = bytearray(valid)
    for pos, value in flips:
        data[pos] = value
    _survives_ztoc(bytes(data[:cut]) if cut else bytes(data))


@settings(FUZZ, max_examples=40)
@given(st.integers(0, 45_000), st.integers(0, 100_000), st.integers(0, 40),
       st.integers(0, 5000), st.integers(0, 5000))
@example(20_000, 100_000, 0, 0, 71)  # 180 KB that decoded to 2 GB before decoding had bounds
@example(45_000, 4000, 0, 0, 71)  # names within MAX_NAME: 180 MB before
@example(1000, 10, 40, 5000, 5000)
def test_ztoc_decoder_on_shared_structures(entries: int, name_len: int, pax: int,
                                           digests: int, digest_len: int) -> None:
    # Valid FlatBuffers whose offsets point many times at one entry, record or string.
    _survives_ztoc(shared_entry_ztoc(entries, name_len, pax=pax, digests=digests,
                                     digest_len=digest_len))


@FUZZ
@given(st.binary(max_size=200), st.integers(1, 1 << 40))
@example(b"\x01\x00\x00\x00" + b"\x00" * 8, 100)
def test_checkpoint_blob_parser(data: bytes, size: int) -> None:
    with contextlib.suppress(SociError):
        GzipZinfo(data, size)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["schemaVersion", "mediaType", "config", "layers", "manifests",
                         "digest", "size", "annotations", "subject", "platform", "os",
                         "architecture", "artifactType", "urls"]), children, max_size=6),
    max_leaves=30,
)


@FUZZ
@given(_json)
@example({"mediaType": [None]})  # found by this test: a non-string mediaType crashed
@example({"schemaVersion": 2, "config": {"digest": "sha256:" + "a" * 64, "size": -1},
          "layers": []})
@example({"schemaVersion": 2, "manifests": [{"digest": "sha256:" + "b" * 64, "size": 1,
                                             "platform": {"os": 1}}]})
def test_manifest_parsers_on_junk_json(doc: object) -> None:
    data = json.dumps(doc).encode()
    for parse in (Manifest.parse, Index.parse, SociIndex.parse):
        with contextlib.suppress(SociError):
            parse(data)


@FUZZ
@given(st.binary(max_size=300))
def test_manifest_parsers_on_junk_bytes(data: bytes) -> None:
    for parse in (Manifest.parse, Index.parse, SociIndex.parse):
        with contextlib.suppress(SociError):
            parse(data)


def test_hostile_entries_are_refused_or_dropped() -> None:
    z = decode(VALID)
    # "a/../../etc" escapes the layer: the tree drops it rather than serving it anywhere.
    tree = LayerTree(z)
    assert tree.lookup(1, b"etc") is None
    z.entries[0].offset = z.uncompressed_size + 10
    try:
        check(z)
        raise AssertionError("an entry outside the layer was accepted")
    except SociError as e:
        assert "outside the layer" in str(e)
