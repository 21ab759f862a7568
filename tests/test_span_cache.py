"""The span caches behind every lazily served read (issue 11): a span read once is cheap to
read again (inflated bytes on disk, read with one pread, never inflated again), one image's
cache files never answer for another, a tampered or torn file is never served, the disk
cache keeps to its bound, read-ahead keeps to its own, and concurrent readers of one span
load it once. A real gzip layer, real zTOC, real inflate; the registry is the layer file."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import threading
from pathlib import Path

import pytest

from soci.fs.cache import DiskCache, MemoryCache
from soci.fs.spans import SpanManager, Workers
from soci.ztoc import build_ztoc
from spanlayers import gzip_layer, read_in_order

SPAN = 64 << 10
LAYER = "sha256:" + "a" * 64
ZTOC = "sha256:" + "b" * 64


class _Registry:
    """Ranged reads of the layer file, counted (and optionally slowed, to overlap readers)."""

    def __init__(self, path: Path, delay: threading.Event | None = None) -> None:
        self.data = path.read_bytes()
        self.ranges: list[tuple[int, int]] = []
        self.gate = delay
        self.lock = threading.Lock()

    def __call__(self, start: int, end: int) -> bytes:
        if self.gate is not None:
            self.gate.wait(30)
        with self.lock:
            self.ranges.append((start, end))
        return self.data[start:end]


@pytest.fixture
def layer(tmp_path: Path):
    path = tmp_path / "layer.tar.gz"
    tar, where = gzip_layer(path, [300_000, 5_000, 700_000, 12_000, 200_000, 9_000])
    with open(path, "rb") as f:
        ztoc = build_ztoc(f, span_size=SPAN).ztoc
    return path, tar, where, ztoc


def _manager(ztoc, fetch, cache_dir: Path, *, memory: int = 0, disk: int = 1 << 30,
             key: str = LAYER, ztoc_digest: str = ZTOC, workers: Workers | None = None
             ) -> SpanManager:
    return SpanManager(key, ztoc, fetch, MemoryCache(memory), DiskCache(cache_dir, disk),
                       ztoc_digest, workers or Workers(2))


def test_a_disk_cache_hit_is_not_fetched_verified_or_inflated_again(layer, tmp_path: Path
                                                                    ) -> None:
    path, tar, where, ztoc = layer
    registry = _Registry(path)
    workers = Workers(2)
    spans = _manager(ztoc, registry, tmp_path / "cache", workers=workers)  # no memory cache
    read_in_order(spans, tar, where)
    workers.wait_idle()
    assert ztoc.span_count > 8
    fetched, inflated = len(registry.ranges), spans.inflates
    assert spans.held_spans == spans.fetched_fraction * ztoc.span_count > 0
    read_in_order(spans, tar, where)
    read_in_order(spans, tar, where)
    assert (len(registry.ranges), spans.inflates) == (fetched, inflated)
    assert spans.disk is not None and spans.disk.inflated_hits > 0
    # A restarted daemon (a new cache object over the same directory) checks each file
    # once, then reads it without inflating either.
    again = _manager(ztoc, registry, tmp_path / "cache", workers=workers)
    read_in_order(again, tar, where)
    assert (len(registry.ranges), again.inflates) == (fetched, 0)
    for p in (tmp_path / "cache").iterdir():
        assert p.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700


def test_a_foreign_or_tampered_cache_file_is_never_served(layer, tmp_path: Path) -> None:
    path, tar, where, ztoc = layer
    registry = _Registry(path)
    workers = Workers(2)
    cache = tmp_path / "cache"
    read_in_order(_manager(ztoc, registry, cache, workers=workers), tar, where)
    workers.wait_idle()
    files = sorted(cache.iterdir())
    fetched = len(registry.ranges)
    # Another layer or another zTOC over the same cache directory: nothing of it is used.
    for key, zd in ((("sha256:" + "c" * 64), ZTOC), (LAYER, "sha256:" + "d" * 64)):
        other = _manager(ztoc, registry, cache, key=key, ztoc_digest=zd, workers=workers)
        offset, size = where["f2"]
        assert other.read(offset, size, offset + size) == tar[offset : offset + size]
        assert len(registry.ranges) > fetched and other.inflates > 0
        workers.wait_idle()
        fetched = len(registry.ranges)
    # Tampered (same length) and torn files: refused, fetched and verified again.
    for p in files:
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    files[0].write_bytes(files[0].read_bytes()[:100])
    again = _manager(ztoc, registry, cache, workers=workers)
    read_in_order(again, tar, where)
    assert again.disk is not None and again.disk.rejected >= len(files) > 0
    assert len(registry.ranges) > fetched


def test_the_disk_cache_keeps_to_disk_mb(layer, tmp_path: Path) -> None:
    path, tar, where, ztoc = layer
    bound = 3 * SpanManager.PREFIX_STEP  # a few spans' worth
    workers = Workers(2)
    spans = _manager(ztoc, _Registry(path), tmp_path / "cache", disk=bound, workers=workers)
    read_in_order(spans, tar, where)
    workers.wait_idle()
    read_in_order(spans, tar, where)
    workers.wait_idle()
    held = sum(p.stat().st_size for p in (tmp_path / "cache").iterdir())
    assert 0 < held <= bound and spans.disk is not None and spans.disk.size <= bound


def test_read_ahead_keeps_to_its_bounds(layer, tmp_path: Path) -> None:
    path, tar, where, ztoc = layer
    registry = _Registry(path)
    workers = Workers(2)
    spans = _manager(ztoc, registry, tmp_path / "cache", memory=64 << 20, workers=workers)
    spans.SCAN_SPANS = 4  # the test layer has a dozen spans: a scan starts sooner
    zinfo = spans.zinfo

    def fetched_spans() -> set[int]:
        out = set()
        for start, end in registry.ranges:
            out |= {s for s in range(spans.spans) if zinfo.compressed_start(s) >= start
                    and zinfo.compressed_end(s) <= end}
        return out

    # A small file read on its own fetches its span only: no read-ahead past its end.
    offset, size = next((o, n) for o, n in (where[f] for f in ("f1", "f3", "f5"))
                        if zinfo.span_of(o) == zinfo.span_of(o + n - 1))
    assert spans.read(offset, size, offset + size) == tar[offset : offset + size]
    workers.wait_idle()
    assert fetched_spans() == {zinfo.span_of(offset)}
    # A reader going through the layer in order: never more than MAX_AHEAD spans ahead.
    highest, total = -1, ztoc.uncompressed_size
    for at in range(0, total, 32 << 10):
        n = min(32 << 10, total - at)
        got = spans.read_cached(at, n, total)
        got = spans.read(at, n, at + n) if got is None else got
        assert got == tar[at : at + n]
        highest = max(highest, zinfo.span_of(at + n - 1))
        assert max(fetched_spans()) <= highest + SpanManager.MAX_AHEAD
    workers.wait_idle()
    assert spans.read_ahead_spans > 0
    # Each span inflated whole once; a prefix first for the small file and for the spans
    # read before the reader counted as going in order (reads that end in their span).
    assert spans.inflates <= spans.spans + 1 + spans.SCAN_SPANS


def test_concurrent_readers_of_a_span_load_it_once(layer, tmp_path: Path) -> None:
    path, tar, where, ztoc = layer
    gate = threading.Event()
    registry = _Registry(path, gate)
    workers = Workers(2)
    spans = _manager(ztoc, registry, tmp_path / "cache", memory=64 << 20, workers=workers)
    offset, size = where["f2"]
    span = spans.zinfo.span_of(offset + size // 2)
    lo = spans.zinfo.uncompressed_start(span)
    results: list[bytes] = []

    def reader(i: int) -> None:
        results.append(bytes(spans.read(lo + i * 1000, 4000, lo + 4000)))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    while not spans._loading:  # one reader is loading: let its fetch go
        gate.wait(0.01)
    gate.set()
    for t in threads:
        t.join(60)
    workers.wait_idle()
    assert sorted(results) == sorted(tar[lo + i * 1000 : lo + i * 1000 + 4000]
                                     for i in range(8))
    assert len(registry.ranges) == 1
    assert spans.inflates <= 2  # the prefix a first reader needed, then the whole span
    assert os.listdir(tmp_path / "cache") == [spans._disk_name(span)]


def test_the_daemon_sets_the_mounts_read_ahead(tmp_path: Path) -> None:
    """[fuse] read_ahead_kb: the kernel reads ahead that much on the mount (the FUSE
    handshake alone leaves 128 KiB), so a cold sequential read comes in large requests."""
    import time

    from storeenv import StoreDaemon

    with StoreDaemon(tmp_path / "root", tmp_path / "mnt",
                     extra_config="[fuse]\nread_ahead_kb = 2048\n") as daemon:
        st = os.stat(daemon.mountpoint)
        knob = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
        deadline = time.monotonic() + 30
        while knob.read_text().strip() != "2048":  # set once the mount answers
            assert time.monotonic() < deadline, daemon.logs()[-2000:]
            time.sleep(0.05)


def test_a_cold_small_file_late_in_its_span_inflates_only_its_prefix_first(tmp_path: Path
                                                                          ) -> None:
    """A container opening one small file that sits past the middle of a large span waits
    for the span's prefix up to the file's end, not for the whole span: the rest is a
    worker's job. (No worker threads here, so what the reader did is all there is.)"""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, size in [("big", 1_500_000), ("small", 5_000), ("after", 1_200_000)]:
            data = (hashlib.shake_256(name.encode()).digest(size // 3) + b"line\n" * size)[:size]
            info = tarfile.TarInfo(name)
            info.size = size
            tf.addfile(info, io.BytesIO(data))
    tar = buf.getvalue()
    path = tmp_path / "layer.tar.gz"
    path.write_bytes(gzip.compress(tar, compresslevel=6, mtime=0))
    with open(path, "rb") as f:
        ztoc = build_ztoc(f, span_size=4 << 20).ztoc
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        offset, size = next((m.offset_data, m.size) for m in tf if m.name == "small")
    workers = Workers(0, depth=64)
    spans = _manager(ztoc, _Registry(path), tmp_path / "cache", memory=64 << 20,
                     workers=workers)
    assert spans.spans == 1
    full = len(tar)
    assert offset + size > full // 2  # past the middle: once inflated whole
    got = spans.read(offset, size, offset + size)
    assert got == tar[offset : offset + size]
    held = spans.memory.peek((spans.owner, 0, 0))
    step = spans.PREFIX_STEP
    assert held is not None and len(held) == -(-(offset + size) // step) * step < full
    assert held == tar[: len(held)]
    workers.run_pending()  # the workers' share: the whole span, then its disk write
    whole = spans.memory.peek((spans.owner, 0, 0))
    assert whole is not None and len(whole) > len(held) and whole == tar[: len(whole)]
    assert spans.read(offset + size, 4096, offset + size + 4096) == tar[
        offset + size : offset + size + 4096]
