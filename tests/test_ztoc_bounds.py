"""Hostile zTOCs cost bounded memory: decoding is bounded by the input, spans by a cap.

Decoding: FlatBuffer offsets may point many times at one entry or string, so a small zTOC
can describe gigabytes; the decoder charges every use and refuses past a budget
proportional to the input. Spans: a zTOC whose checkpoints were dropped (digests
recomputed, so it verifies) would make one small read inflate a whole layer; ``check``
refuses spans longer than the declared span size allows.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import struct
import subprocess
import sys
import tarfile

import pytest

from images import big_file, files_layer
from layers import Node, gzip_with, tar_with_tarfile
from soci.errors import ZtocFormatError
from soci.ztoc import Ztoc, build_ztoc, decode, encode
from soci.ztoc.codec import MAX_NAME, check
from soci.ztoc.extract import split_verified
from soci.ztoc.zinfo import (
    MAX_SPAN_BYTES,
    SPAN_SLACK,
    GzipZinfo,
    TarZinfo,
    check_span_lengths,
    span_limit,
    zinfo_of,
)
from ztoc_craft import shared_entry_ztoc

#: The address space the decoding child may use: far below what the hostile zTOCs below
#: decoded to before (2 GB for the first), far above what decoding them should take.
CHILD_MEMORY = 400 << 20

# Peak RSS is the child's VmHWM: ru_maxrss would carry over pytest's own from before exec.
_CHILD = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from soci.errors import ZtocFormatError
from soci.ztoc import decode
def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
data = sys.stdin.buffer.read()
before = peak()
try:
    print(f"decoded {len(decode(data).entries)} entries")
except ZtocFormatError as e:
    print(f"refused: {e}")
print(before, peak())
"""


def decode_in_child(data: bytes) -> tuple[str, int, int]:
    """Decode ``data`` in a fresh interpreter limited to CHILD_MEMORY.

    Returns the outcome and the peak RSS in KiB before and after decoding.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", _CHILD, str(CHILD_MEMORY)], input=data,
                          capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    outcome, peaks = done.stdout.decode().splitlines()
    before, after = map(int, peaks.split())
    return outcome, before, after


HOSTILE = {
    # 180 KB: 20,000 TOC slots all pointing at one entry with a 100 kB name (2 GB decoded).
    "shared-entry-long-name": (dict(entries=20_000, name_len=100_000), "name is 100000 bytes"),
    # Names within MAX_NAME: only the budget stops 45,000 uses of one 4000-byte name.
    "shared-entry": (dict(entries=45_000, name_len=4000), "entries and strings"),
    # One entry whose 2000 PAX records share one 1000-byte value.
    "shared-pax-value": (dict(entries=1, name_len=10, pax=2000), "bytes of PAX records"),
    # 1000 slots all pointing at that entry: each within MAX_PAX, together over budget.
    "shared-pax-entry": (dict(entries=1000, name_len=10, pax=500), "entries and strings"),
    # 45,000 span digests sharing one 4000-byte string.
    "shared-digest": (dict(entries=1, name_len=10, digests=45_000, digest_len=4000),
                      "entries and strings"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_shared_structures_are_refused_in_bounded_memory(kind: str) -> None:
    params, reason = HOSTILE[kind]
    data = shared_entry_ztoc(**params)
    assert len(data) < 200_000
    outcome, before, after = decode_in_child(data)
    print(f"{kind}: {len(data)}-byte zTOC -> {outcome!r}, peak RSS {after / 1024:.1f} MiB"
          f" ({before / 1024:.1f} MiB before decoding)")
    assert outcome.startswith("refused: malformed zTOC: ") and reason in outcome
    assert after < 100 << 10


def test_shared_strings_within_budget_still_decode() -> None:
    # Sharing as such is legal FlatBuffers: a few uses of one entry fit in the budget.
    z = decode(shared_entry_ztoc(entries=50, name_len=100, pax=3))
    assert len(z.entries) == 50 and z.entries[49].name == "n" * 100
    assert len(z.entries[0].pax_records) == 3


def test_long_names_are_refused_while_decoding() -> None:
    assert decode(shared_entry_ztoc(entries=1, name_len=MAX_NAME)).entries[0].name
    with pytest.raises(ZtocFormatError, match=f"name is {MAX_NAME + 1} bytes long"):
        decode(shared_entry_ztoc(entries=1, name_len=MAX_NAME + 1))


def _real_layer(name: str) -> bytes:
    if name == "long-names":
        return files_layer({("d" * 200 + "/") * 15 + f"f{i}": b"x" * i for i in range(50)})
    if name == "many-empty-files":
        return files_layer({f"dir{i % 7}/file-{i}": b"" for i in range(3000)})
    if name == "pax-records":
        return tar_with_tarfile([Node(f"f{i}", data=b"x", pax={
            "SCHILY.xattr.user.a": "v" * 60_000, "SCHILY.xattr.security.selinux": "ctx",
            "comment": "c" * i}) for i in range(20)], tarfile.PAX_FORMAT)
    return files_layer({"a": big_file("a", 300_000), "b/c": bytes(200_000)})


@pytest.mark.parametrize("name", ["long-names", "many-empty-files", "pax-records", "data"])
@pytest.mark.parametrize("gz", [True, False])
def test_real_ztocs_charge_at_most_their_own_size(name: str, gz: bool) -> None:
    # The budget argument: a zTOC that shares nothing (upstream's and ours) charges no more
    # than its own size, so the default budget (twice that plus 1 MiB) never refuses one.
    raw = _real_layer(name)
    blob = gzip.compress(raw, mtime=0) if gz else raw
    data = encode(build_ztoc(io.BytesIO(blob), span_size=64 << 10).ztoc)
    z = decode(data, budget=len(data))
    assert encode(z) == data
    with pytest.raises(ZtocFormatError, match="entries and strings"):
        decode(data, budget=len(data) // 4)


# -- span lengths -----------------------------------------------------------------------


def _zeros_and_noise() -> bytes:
    # Zeros: one deflate block of zeros inflates to megabytes (about 8 MiB from GNU gzip),
    # so spans of this layer overrun their span size by the most a real encoder makes.
    return files_layer({"a/zeros": bytes(24 << 20), "b/noise": big_file("n", 2 << 20),
                        "c/zeros": bytes(9 << 20)})


@pytest.fixture(scope="module")
def zeros_and_noise() -> bytes:
    return _zeros_and_noise()


def _span_lengths(z: Ztoc) -> list[int]:
    zinfo = zinfo_of(z)
    assert isinstance(zinfo, GzipZinfo)
    ends = [*zinfo.outs[1:], max(z.uncompressed_size, zinfo.outs[-1])]
    return [b - a for a, b in zip(zinfo.outs, ends, strict=True)]


@pytest.mark.parametrize("writer", ["py-1", "py-9", "gzip-cli", "pigz", "multi"])
def test_real_layers_pass_the_span_check(zeros_and_noise: bytes, writer: str) -> None:
    blob = gzip_with(zeros_and_noise, writer)
    for span in (64 << 10, 1 << 20, 4 << 20):
        z = decode(encode(build_ztoc(io.BytesIO(blob), span_size=span).ztoc))
        check(z)
        lengths = _span_lengths(z)
        overrun = max(lengths[:-1]) - span
        print(f"{writer} span {span}: {len(lengths)} spans, longest overruns by {overrun}")
        assert max(lengths) <= span_limit(span)


def forge_fewer_checkpoints(z: Ztoc, blob: bytes, keep: int, span_size: int | None = None
                            ) -> Ztoc:
    """``z`` with only its first ``keep`` checkpoints (and optionally another declared span
    size), re-encoded with our codec and its span digests recomputed: self-consistent."""
    count, declared = struct.unpack_from("<iq", z.checkpoints)
    each = (len(z.checkpoints) - 12) // count
    blob_cps = struct.pack("<iq", keep, span_size or declared) + z.checkpoints[12:12 + keep * each]
    zinfo = GzipZinfo(blob_cps, len(blob))
    digests = ["sha256:" + hashlib.sha256(
        blob[zinfo.compressed_start(i) : zinfo.compressed_end(i)]).hexdigest()
        for i in range(keep)]
    forged = dataclasses.replace(z, checkpoints=blob_cps, max_span_id=keep - 1,
                                 span_digests=digests)
    forged = decode(encode(forged))
    # The forgery verifies: every span matches its digest.
    split_verified(forged, zinfo, blob, 0, 0, keep - 1)
    return forged


@pytest.mark.parametrize("span", [1 << 20, 4 << 20])
def test_zTOC_with_dropped_checkpoints_is_refused(zeros_and_noise: bytes, span: int) -> None:
    blob = gzip.compress(zeros_and_noise, 1, mtime=0)
    z = build_ztoc(io.BytesIO(blob), span_size=span).ztoc
    check(z)
    assert z.span_count > 5
    forged = forge_fewer_checkpoints(z, blob, keep=1)
    with pytest.raises(ZtocFormatError) as e:
        check(forged)
    assert str(e.value) == (
        f"zTOC span 0 holds {z.uncompressed_size} uncompressed bytes, over the "
        f"{span + SPAN_SLACK} a {span}-byte span size allows (checkpoints missing?)"
    )


def test_declared_span_size_cannot_lift_the_absolute_cap() -> None:
    # A forger who also raises the declared span size still meets MAX_SPAN_BYTES.
    raw = files_layer({"zeros": bytes(MAX_SPAN_BYTES + (4 << 20))})
    blob = gzip.compress(raw, 1, mtime=0)
    z = build_ztoc(io.BytesIO(blob), span_size=4 << 20).ztoc
    check(z)
    forged = forge_fewer_checkpoints(z, blob, keep=1, span_size=1 << 40)
    with pytest.raises(ZtocFormatError, match=f"over the {MAX_SPAN_BYTES} a"):
        check(forged)


def test_tar_span_lengths_are_capped() -> None:
    # Plain-tar spans are exactly the span size (the last shorter), so only the size matters.
    check_span_lengths(TarZinfo(TarZinfo.encode(1 << 40, 10_000)), 10_000)
    check_span_lengths(TarZinfo(TarZinfo.encode(MAX_SPAN_BYTES, 1 << 40)), 1 << 40)
    with pytest.raises(ZtocFormatError, match="spans are 67108865 bytes long"):
        check_span_lengths(TarZinfo(TarZinfo.encode(MAX_SPAN_BYTES + 1, 1 << 40)), 1 << 40)
