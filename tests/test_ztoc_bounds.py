"""Hostile zTOCs cost bounded memory: decoding is bounded by the input, spans by a cap.

Decoding: FlatBuffer offsets may point many times at one entry or string, so a small zTOC
can describe gigabytes; the decoder charges every use and refuses past a budget
proportional to the input. Spans: a zTOC whose checkpoints were dropped (digests
recomputed, so it verifies) would make one small read inflate a whole layer; ``check``
refuses spans longer than the declared span size allows.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile

import pytest

from images import big_file, files_layer
from layers import Node, tar_with_tarfile
from soci.errors import ZtocFormatError
from soci.ztoc import build_ztoc, decode, encode
from soci.ztoc.codec import MAX_NAME
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
