"""The cold-span pipeline (issue 11, "cold spans on both cores"): disk-cache writes never sit
in front of a fetch or an inflate a reader may wait for, a span's waiters go as soon as it
is in memory (not when its disk write is done), and a run of spans fetched in one request is
verified span by span before any byte of it is served. A real gzip layer, real zTOC, real
inflate, real disk cache; the registry is the layer file (the FUSE and registry tests in
test_store.py cover the same path end to end)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from soci.errors import DigestMismatchError
from soci.fs.cache import DiskCache, MemoryCache
from soci.fs.spans import SpanManager, Workers
from soci.ztoc import build_ztoc, zinfo_of
from spanlayers import gzip_layer, read_in_order

SPAN = 64 << 10
LAYER = "sha256:" + "c" * 64
ZTOC = "sha256:" + "d" * 64


@pytest.fixture
def layer(tmp_path: Path):
    """A gzip layer of a few files, its tar, where each file sits in it, and its zTOC."""
    path = tmp_path / "layer.tar.gz"
    tar, where = gzip_layer(path, [900_000, 7_000, 600_000], b"a line of text\n")
    with open(path, "rb") as f:
        ztoc = build_ztoc(f, span_size=SPAN).ztoc
    return path.read_bytes(), tar, where, ztoc


def test_disk_writes_wait_behind_fetches_and_inflates() -> None:
    workers = Workers(1)
    busy, order = threading.Event(), []
    assert workers.submit(lambda: busy.wait(30))  # hold the one worker
    assert workers.submit(lambda: order.append("disk write"), urgent=False)
    assert workers.submit(lambda: order.append("inflate 1"))
    assert workers.submit(lambda: order.append("inflate 2"))
    busy.set()
    assert workers.wait_idle(30)
    assert order == ["inflate 1", "inflate 2", "disk write"]
    assert workers.pending == 0


def test_a_full_lane_refuses_while_the_other_still_queues() -> None:
    workers = Workers(1, depth=2, later_depth=1)
    started, busy = threading.Event(), threading.Event()
    assert workers.submit(lambda: (started.set(), busy.wait(30)))
    assert started.wait(30)  # the worker holds it: both lanes are empty
    assert workers.wait_idle(0) is False
    assert workers.submit(lambda: None, urgent=False)
    assert not workers.submit(lambda: None, urgent=False)  # the caller writes it itself
    assert workers.submit(lambda: None) and workers.submit(lambda: None)
    assert not workers.submit(lambda: None)
    busy.set()
    assert workers.wait_idle(30)


class _StuckDisk(DiskCache):
    """A real disk cache whose writes wait for ``gate`` (a slow or busy disk)."""

    gate = threading.Event()

    def put_inflated(self, name: str, data: bytes | bytearray | memoryview) -> bool:
        self.gate.wait(60)
        return super().put_inflated(name, data)


def test_a_span_is_served_from_memory_while_its_disk_write_waits(layer, tmp_path: Path
                                                                 ) -> None:
    blob, tar, where, ztoc = layer
    disk = _StuckDisk(tmp_path / "cache", 1 << 30)
    disk.gate = threading.Event()
    workers = Workers(3, later_depth=64)  # room for every span's write
    spans = SpanManager(LAYER, ztoc, lambda s, e: blob[s:e], MemoryCache(1 << 30), disk,
                        ZTOC, workers)
    done = threading.Event()
    failed: list[BaseException] = []

    def scan() -> None:
        try:
            read_in_order(spans, tar, where)
        except BaseException as e:  # reported by the test thread
            failed.append(e)
        finally:
            done.set()

    reader = threading.Thread(target=scan)
    reader.start()
    try:
        # Every write is stuck (two of the three workers wait in one); the reads still
        # finish, from memory, on the worker left for fetches and inflates.
        finished = done.wait(60)
    finally:
        disk.gate.set()
        reader.join(60)
    assert finished and not failed
    assert workers.wait_idle(60)
    assert spans.held_spans == ztoc.span_count  # and every span reached the disk after all
    assert spans.fetches < ztoc.span_count  # runs of spans came in one request each


def test_a_corrupt_span_in_a_run_is_never_served(layer, tmp_path: Path) -> None:
    blob, tar, _, ztoc = layer
    zinfo = zinfo_of(ztoc)
    bad_span = 5
    bad = bytearray(blob)
    bad[zinfo.compressed_start(bad_span) + 10] ^= 0xFF
    fetched: list[tuple[int, int]] = []

    def fetch(start: int, end: int) -> bytes:
        fetched.append((start, end))
        return bytes(bad[start:end])

    memory = MemoryCache(1 << 30)
    spans = SpanManager(LAYER, ztoc, fetch, memory, DiskCache(tmp_path / "cache", 1 << 30),
                        ZTOC, Workers(2))
    lo = zinfo.uncompressed_start(bad_span - 2)
    # A read of span 3 fetches spans 3.. (to the end of the file) in one request: span 5
    # fails its digest, the run is fetched once more, then the read fails.
    with pytest.raises(DigestMismatchError):
        spans.read(lo, 100, zinfo.uncompressed_start(bad_span + 2))
    assert len(fetched) == 2 and spans.verify_failures == 2
    assert fetched[0][0] <= zinfo.compressed_start(bad_span) < fetched[0][1]
    assert spans.workers.wait_idle(30)
    assert (spans.owner, bad_span, 0) not in memory and memory.size == 0
    # Spans outside it are served right; the bad one stays refused.
    first = zinfo.uncompressed_start(1)
    assert spans.read(first, 4096, first + 4096) == tar[first : first + 4096]
    with pytest.raises(DigestMismatchError):
        spans.read(zinfo.uncompressed_start(bad_span), 10)
