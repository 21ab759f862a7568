"""Serving a layer's uncompressed bytes span by span, fetching only what is missing.

A read maps to spans; each span comes from memory, else from the disk cache of inflated
spans (one ``pread`` of just the range asked for), else from the registry: the missing
spans of a read are fetched with one ranged request, each verified against its span
digest (a failure is fetched once more, then the read fails: never a wrong byte), and
inflated from its checkpoint in the native core. A span is loaded once however many
readers want it (the others wait for that load), and the disk cache is written after the
reader has its bytes, on a worker thread.

The spans after a read, to the end of the file it reads (and READ_AHEAD spans further for a
reader that has gone through SCAN_SPANS spans in order), are fetched with one request,
verified and inflated ahead of the reader on worker threads (the native inflate releases
the GIL, so both cores work), at most MAX_AHEAD spans ahead; a scan refills that window in
batches, one request per few spans (a registry's cost per request is mostly latency). The
workers take fetches and inflates before disk-cache writes, and a span's waiters go as
soon as it is in memory. Memory: one run's response body (at most MAX_AHEAD + 1 spans,
compressed; the verified spans are views of it) per load, the memory cache's bound, and at
most ``later_depth`` inflated spans waiting for their disk write.

Inflated bytes are cached in memory under the zTOC's digest (what they depend on), and a
span too long to hold whole (a zTOC may have few checkpoints) is inflated only in aligned
windows around each read, so memory stays bounded by the read, not by the span; such spans
are kept on disk compressed, and verified on every use. What is "held" locally is whatever
the disk cache holds: it is the one record of fetched spans.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

from soci._native.zran import inflate_new
from soci._native.zstdframes import decompress_range
from soci.errors import DigestMismatchError, LayerFormatError
from soci.fs.cache import DiskCache, MemoryCache, inflated_name
from soci.ztoc import GzipZinfo, TarZinfo, ZstdZinfo, Ztoc, zinfo_of
from soci.ztoc.extract import SpanMismatch, split_verified

log = logging.getLogger("soci.spans")

#: Fetches compressed bytes [start, end) of the layer blob.
RangeFetcher = Callable[[int, int], bytes]

#: Verified compressed bytes of a span: a view of the response body it came in, or bytes.
Comp = bytes | memoryview

#: What a read answers: bytes, or a view of a cached span (no copy; FUSE takes either).
Data = bytes | bytearray | memoryview


class Workers:
    """A few daemon threads running span jobs (read-ahead, finishing inflates, disk
    writes) off the readers' threads; daemon threads, so a stalled registry request never
    holds up the daemon's exit.

    Two lanes: fetch and inflate jobs (``urgent``, what a reader may be waiting for) are
    always taken before disk-cache writes (what nobody waits for), so a write of span N
    never sits in front of the inflate of span N+1 on a busy machine, and one thread is
    always left for the urgent lane (a slow disk never holds up inflates). Each lane is
    bounded (a job holds at most one span, compressed or inflated): a full lane drops
    read-ahead (it is only a hint) and runs what must happen on the caller's thread."""

    def __init__(self, threads: int, depth: int = 32, later_depth: int = 16) -> None:
        self._depths = (depth, later_depth)
        self._lanes: tuple[deque[Callable[[], None]], deque[Callable[[], None]]] = (
            deque(), deque())
        lock = threading.Lock()
        self._work = threading.Condition(lock)  # a job was queued
        self._idle = threading.Condition(lock)  # the last unfinished job finished
        self._unfinished = 0
        self._writers = 0  # threads running a job of the later lane
        self._max_writers = max(1, threads - 1)
        self._threads = [threading.Thread(target=self._run, name=f"soci-span-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, job: Callable[[], None], urgent: bool = True) -> bool:
        """Queue ``job`` (in the urgent lane, or behind it); False when its lane is full
        (the caller decides what then)."""
        which = 0 if urgent else 1
        lane = self._lanes[which]
        with self._work:
            if len(lane) >= self._depths[which]:
                return False
            lane.append(job)
            self._unfinished += 1
            self._work.notify()
        return True

    def run_pending(self) -> None:
        """Run every queued job on the calling thread, urgent lane first, until both lanes
        are empty: for a pool of no threads, where a test decides when background work
        happens."""
        urgent, later = self._lanes
        while True:
            with self._work:
                if not urgent and not later:
                    return
                job = (urgent or later).popleft()
            try:
                job()
            finally:
                with self._idle:
                    self._unfinished -= 1
                    if not self._unfinished:
                        self._idle.notify_all()

    @property
    def pending(self) -> int:
        """Jobs queued or running (disk-cache writes among them)."""
        return self._unfinished

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every job queued so far (and any they queued) has run; False if
        ``timeout`` seconds passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._unfinished, timeout)

    def _run(self) -> None:
        urgent, later = self._lanes

        def ready() -> bool:
            return bool(urgent) or (bool(later) and self._writers < self._max_writers)

        while True:
            with self._work:
                self._work.wait_for(ready)
                writer = not urgent
                job = later.popleft() if writer else urgent.popleft()
                self._writers += writer
            try:
                job()
            except Exception:
                log.exception("span worker: job failed")
            finally:
                with self._idle:
                    self._unfinished -= 1
                    self._writers -= writer
                    if writer and later:
                        self._work.notify()  # a thread waiting for its turn to write
                    if not self._unfinished:
                        self._idle.notify_all()


_workers: Workers | None = None
_workers_lock = threading.Lock()


def drain_workers(timeout: float) -> bool:
    """At exit: let queued disk-cache writes finish (at most ``timeout`` seconds)."""
    with _workers_lock:
        workers = _workers
    return workers is None or workers.wait_idle(timeout)


def shared_workers() -> Workers:
    """The process's span workers, started on first use: one per core (at least two) to
    inflate, and one more, since a read-ahead job waits for its fetch on a worker."""
    global _workers
    with _workers_lock:
        if _workers is None:
            _workers = Workers(max(2, os.cpu_count() or 2) + 1)
        return _workers


class SpanManager:
    #: At most this many spans are fetched ahead of a read, in one request.
    MAX_AHEAD = 8
    #: A reader going through the layer in order has this many spans loaded ahead of it ...
    READ_AHEAD = 4
    #: ... past the end of the file it reads, once it has read this many spans in order
    #: (a scan of the layer; a container reading a few files in a row is not one).
    SCAN_SPANS = 4
    #: A first read inflates a span's prefix in steps of this many bytes.
    PREFIX_STEP = 256 << 10
    #: Spans longer than this (uncompressed) are never inflated or cached whole ...
    WHOLE_SPAN_MAX = 16 << 20
    #: ... but in aligned windows of this many bytes, only those a read touches.
    WINDOW = 1 << 20

    def __init__(self, key: str, ztoc: Ztoc, fetch: RangeFetcher, memory: MemoryCache,
                 disk: DiskCache | None, ztoc_digest: str,
                 workers: Workers | None = None) -> None:
        self.key = key  # the layer digest
        self.ztoc_digest = ztoc_digest
        # Memory cache entries belong to (layer, zTOC): the zTOC decides what a span inflates
        # to, and naming the layer too keeps one layer's bytes from ever serving another.
        self.owner = f"{key} {ztoc_digest}"
        self.ztoc = ztoc
        self.zinfo: GzipZinfo | TarZinfo | ZstdZinfo = zinfo_of(ztoc)
        self.fetch = fetch
        self.memory = memory
        self.disk = disk
        self.workers = workers or shared_workers()
        self.spans = ztoc.span_count
        self._lock = threading.Lock()
        self._inflight: dict[int, threading.Event] = {}  # huge spans being fetched
        self._fresh: dict[int, Comp] = {}  # verified compressed huge spans not yet inflated
        self._loading: dict[int, threading.Event] = {}  # spans being loaded (single flight)
        self._landing: set[int] = set()  # verified spans whose disk-cache write is pending
        self._background: set[int] = set()  # spans the background fetch already fetched once
        self._names: list[str | None] = [None] * self.spans  # disk cache names, made once
        self._run_start = -1  # where the reader's current in-order run of spans began
        self._last_span = -2  # the last span of the latest read
        self._scanning = False  # whether the latest read continued a scan (see _ahead)
        self.bytes_fetched = 0
        self.fetches = 0
        self.verify_failures = 0
        self.inflates = 0  # inflate calls (a span inflated again shows here)
        self.read_ahead_spans = 0  # spans loaded by read-ahead
        self.last_access = time.monotonic()

    # -- geometry ----------------------------------------------------------------------

    def _uncompressed_range(self, span: int) -> tuple[int, int]:
        start = self.zinfo.uncompressed_start(span)
        end = (self.zinfo.uncompressed_start(span + 1) if span < self.zinfo.max_span_id
               else self.ztoc.uncompressed_size)
        return start, max(start, min(end, self.ztoc.uncompressed_size))

    def _huge(self, span: int) -> bool:
        lo, hi = self._uncompressed_range(span)
        return hi - lo > self.WHOLE_SPAN_MAX

    def _disk_name(self, span: int) -> str:
        """The span's inflated disk cache name (a sha256: made once per span, not per use)."""
        name = self._names[span]
        if name is None:
            name = inflated_name(self.key, self.ztoc_digest, span, self.ztoc.span_digests[span])
            self._names[span] = name
        return name

    def _held(self, span: int) -> bool:
        """Whether the span is on disk (the disk cache says, nobody else): inflated, or
        compressed for a huge span; or verified and about to be written there."""
        if self.disk is None:
            return False
        if self._huge(span):
            return self.disk.has(self.ztoc.span_digests[span])
        return span in self._landing or self.disk.has(self._disk_name(span))

    def _have(self, span: int) -> bool:
        """Whether reading the (not huge) span needs no load: whole in memory, or on disk."""
        lo, hi = self._uncompressed_range(span)
        data = self.memory.peek((self.owner, span, 0))
        return (data is not None and len(data) == hi - lo) or self._held(span)

    # -- reads -------------------------------------------------------------------------

    def read(self, offset: int, size: int, ahead_to: int = 0) -> Data:
        """Uncompressed bytes [offset, offset+size) of the tar stream (short at its end).

        On a miss, the spans up to uncompressed offset ``ahead_to`` (the end of
        the file being read, say) are fetched in the same request.
        """
        self.last_access = time.monotonic()
        end = min(offset + size, self.ztoc.uncompressed_size)
        if end <= offset:
            return b""
        first, last = self.zinfo.span_of(offset), self.zinfo.span_of(end - 1)
        ahead = self._ahead(first, last, ahead_to)
        pieces: list[Data] = []
        for span in range(first, last + 1):
            lo, hi = self._uncompressed_range(span)
            want_lo, want_hi = max(offset, lo) - lo, min(end, hi) - lo
            if hi - lo > self.WHOLE_SPAN_MAX:
                pieces.append(self._windowed(span, want_lo, want_hi, ahead))
            else:
                pieces.append(self._span_bytes(span, want_lo, want_hi, ahead))
        self._read_ahead(last, ahead)
        self._advise(last, ahead)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def read_cached(self, offset: int, size: int, ahead_to: int = 0) -> Data | None:
        """The same bytes when memory, or the disk cache with its file in the page cache,
        holds them, else None: never fetches, inflates, waits for the disk or for another
        reader (a disk hit is one non-blocking pread)."""
        end = min(offset + size, self.ztoc.uncompressed_size)
        if end <= offset:
            return b""
        first, last = self.zinfo.span_of(offset), self.zinfo.span_of(end - 1)
        if first != last:
            return None
        lo, hi = self._uncompressed_range(first)
        base = 0
        if hi - lo > self.WHOLE_SPAN_MAX:
            base = (offset - lo) // self.WINDOW * self.WINDOW
            if end - lo > base + self.WINDOW:
                return None
        data = self.memory.get((self.owner, first, base))
        if data is not None and len(data) >= end - lo - base:
            got: Data | None = memoryview(data)[offset - lo - base : end - lo - base]
        elif base == 0 and hi - lo <= self.WHOLE_SPAN_MAX and self.disk is not None:
            got = self.disk.read_inflated(self._disk_name(first), hi - lo, offset - lo,
                                          end - offset, nowait=True)
        else:
            got = None
        if got is None:
            return None
        self.last_access = time.monotonic()
        if first != self._last_span:
            ahead = self._ahead(first, last, ahead_to)
            self._read_ahead(last, ahead)
            self._advise(last, ahead)
        return got

    def _advise(self, last: int, ahead: int) -> None:
        """Have the kernel read the next (at most two) cached span files of the read ahead
        from disk, so a reader crossing into them does not wait for the disk."""
        if self.disk is None:
            return
        for span in range(last + 1, min(ahead, last + 2) + 1):
            if not self._huge(span):
                self.disk.advise(self._disk_name(span))

    def _ahead(self, first: int, last: int, ahead_to: int) -> int:
        """The last span worth loading with (or ahead of) a read of spans first..last: the
        end of the file; and READ_AHEAD spans more, past the end of the file, for a reader
        that has gone through at least SCAN_SPANS spans in order (a scan of the layer, not
        a container reading a few of its files)."""
        with self._lock:
            if first not in (self._last_span, self._last_span + 1):
                self._run_start = first
            in_order = last - self._run_start >= self.SCAN_SPANS
            self._last_span = last
            self._scanning = in_order
        ahead = max(last, self.zinfo.span_of(max(min(ahead_to, self.ztoc.uncompressed_size) - 1,
                                                 0)))
        if in_order:
            ahead = max(ahead, last + self.READ_AHEAD)
        return min(ahead, last + self.MAX_AHEAD, self.spans - 1)

    def _span_bytes(self, span: int, want_lo: int, want_hi: int, ahead: int) -> Data:
        """Bytes [want_lo, want_hi) of a (not huge) span: memory, disk, or one load."""
        key = (self.owner, span, 0)
        lo, hi = self._uncompressed_range(span)
        for _ in range(8):
            data = self.memory.get(key)
            if data is not None and len(data) >= want_hi:
                return memoryview(data)[want_lo:want_hi]
            if self.disk is not None:
                got = self.disk.read_inflated(self._disk_name(span), hi - lo, want_lo,
                                              want_hi - want_lo)
                if got is not None:
                    return got
            with self._lock:
                event = self._loading.get(span)
            if event is not None:
                event.wait()  # someone loads it: wait for that load, then look again
                continue
            loaded = self._load(span, want_hi, ahead)
            if loaded is not None:
                return memoryview(loaded)[want_lo:want_hi]
        # Loads keep vanishing (evicted as soon as made): inflate for this read alone.
        comp = self._fetch_verified(span, span)[span]
        return bytes(self._inflate(span, comp, 0, hi - lo))[want_lo:want_hi]

    def _claim(self, first: int, last: int) -> list[int]:
        """Mark the spans from ``first`` on that need a load as being loaded by the caller,
        stopping at the first that does not (so the claim is one contiguous run)."""
        run: list[int] = []
        with self._lock:
            for span in range(first, last + 1):
                if span in self._loading or self._huge(span) or self._have(span):
                    break
                self._loading[span] = threading.Event()
                run.append(span)
        return run

    def _done(self, span: int) -> None:
        with self._lock:
            event = self._loading.pop(span, None)
        if event is not None:
            event.set()

    def _load(self, span: int, need: int, ahead: int) -> bytes | bytearray | None:
        """Fetch span..ahead (what of it needs a load) with one request and inflate
        ``span`` here, at least its first ``need`` bytes; the other spans are inflated on
        worker threads. None when another reader got there first."""
        run = self._claim(span, ahead)
        if not run or run[0] != span:
            for s in run:
                self._done(s)
            return None
        try:
            got = self._fetch_verified(run[0], run[-1])
        except BaseException:
            for s in run:
                self._done(s)
            raise
        self._land(run)
        for s in run[1:]:
            comp = got.pop(s)
            if not self.workers.submit(lambda s=s, comp=comp: self._finish(s, comp, True)):
                self._finish(s, comp, True)
        comp = got.pop(span)
        lo, hi = self._uncompressed_range(span)
        full = hi - lo
        try:
            if ahead == span and not isinstance(self.zinfo, TarZinfo) and (
                    need < full // 2
                    or (self._run_start == span and need <= full - self.PREFIX_STEP)):
                # A first read of a file ending in this span, in its first half or out of
                # order (a container opening one small file): inflate only what it needs
                # now, the rest of the span on a worker (readers of the rest wait for that,
                # so the span is inflated twice at most, once whole). A reader going in
                # order through the layer gets the whole span at once instead.
                length = min(full, -(-need // self.PREFIX_STEP) * self.PREFIX_STEP)
                prefix = self._inflate(span, comp, 0, length)
                self.memory.put((self.owner, span, 0), prefix)
                if self.workers.submit(lambda: self._finish(span, comp, True)):
                    return prefix
                self._finish(span, comp, True)
                return prefix
            data = self._inflate(span, comp, 0, full)
        except BaseException:
            self._landed(span)
            self._done(span)
            raise
        self.memory.put((self.owner, span, 0), data)
        if self.memory.peek((self.owner, span, 0)) is not data:
            self._store(span, data)  # waiters will find it on disk, not in memory
            self._done(span)
            return data
        self._done(span)
        self._store_later(span, data)
        return data

    def _finish(self, span: int, comp: Comp, keep: bool) -> None:
        """Inflate a verified span whole, keep it (in memory if ``keep``, on disk), and let
        its waiters go; on a worker thread."""
        try:
            lo, hi = self._uncompressed_range(span)
            data = self._inflate(span, comp, 0, hi - lo)
        except Exception as e:
            log.warning("layer %s: span %d: %s", self.key, span, e)
            self._landed(span)
            self._done(span)
            return
        if keep:
            self.memory.put((self.owner, span, 0), data)
            if self.memory.peek((self.owner, span, 0)) is data:
                # Waiters go as soon as the span is in memory; its disk write (a checksum
                # and a copy into the page cache) waits behind any inflate a reader wants.
                self._done(span)
                self._store_later(span, data)
                return
        # Not in memory (too small a memory cache): waiters find it on disk.
        self._store(span, data)
        self._done(span)

    def _store_later(self, span: int, data: bytes | bytearray) -> None:
        """Write the span to the disk cache on a worker once no fetch or inflate is
        queued (on this thread if that lane is full: the bound on inflated spans
        waiting for their write)."""
        if self.disk is None:
            self._landed(span)
        elif not self.workers.submit(lambda: self._store(span, data), urgent=False):
            self._store(span, data)

    def _store(self, span: int, data: bytes | bytearray) -> None:
        try:
            if self.disk is not None:
                self.disk.put_inflated(self._disk_name(span), data)
        finally:
            self._landed(span)

    def _land(self, spans: list[int]) -> None:
        if self.disk is not None:
            with self._lock:
                self._landing.update(spans)

    def _landed(self, span: int) -> None:
        with self._lock:
            self._landing.discard(span)

    def _read_ahead(self, last: int, ahead: int) -> None:
        """Load the spans after ``last`` up to ``ahead`` on a worker thread, in one request."""
        if ahead <= last:
            return
        first = last + 1
        while first <= ahead and (first in self._loading or self._have(first)):
            first += 1
        if first > ahead:
            return
        if self._scanning:
            # A scan refills its read-ahead in batches, up to MAX_AHEAD spans ahead in one
            # request, rather than one request per span the reader passes: what a registry
            # costs per span is mostly its answer's latency, not the bytes.
            ahead = min(max(ahead, last + self.MAX_AHEAD), self.spans - 1)
        run = self._claim(first, ahead)
        if not run:
            return

        def job() -> None:
            try:
                got = self._fetch_verified(run[0], run[-1])
            except Exception as e:
                log.info("layer %s: read-ahead of spans %d-%d: %s", self.key, run[0],
                         run[-1], e)
                for s in run:
                    self._done(s)
                return
            self.read_ahead_spans += len(run)
            self._land(run)
            for s in run[1:]:
                comp = got.pop(s)
                if not self.workers.submit(lambda s=s, comp=comp: self._finish(s, comp, True)):
                    self._finish(s, comp, True)
            self._finish(run[0], got.pop(run[0]), True)

        if not self.workers.submit(job):
            for s in run:
                self._done(s)

    def _inflate(self, span: int, comp: Comp, skip: int, length: int) -> bytes | bytearray:
        """Bytes [skip, skip+length) of a span from its verified compressed bytes: the one
        place a span is decoded (a codec plugs in here)."""
        self.inflates += 1
        if isinstance(self.zinfo, TarZinfo):
            return bytes(comp[skip : skip + length])
        if isinstance(self.zinfo, ZstdZinfo):
            # A zstd span starts on a frame start: no window or bits to prime.
            out = bytearray(length)
            got = decompress_range(comp, skip, out)
        else:
            out = inflate_new(comp, self.zinfo.bits[span], self.zinfo.window(span), skip, length)
            got = len(out)
        if got != length:
            raise LayerFormatError(f"span {span} of {self.key} decoded short")
        return out

    # -- huge spans: inflated in windows from compressed bytes kept on disk ---------------

    def _windowed(self, span: int, want_lo: int, want_hi: int, ahead: int) -> bytes:
        """Bytes [want_lo, want_hi) of a span too long to inflate whole.

        Only the WINDOW-aligned windows the read touches are produced (the inflater skips
        what comes before them without keeping it) and each is cached on its own, so a
        read holds its own size plus at most two windows, however long the span.
        """
        first = want_lo // self.WINDOW * self.WINDOW
        got: list[bytes] = []
        at = first
        while at < want_hi:
            data = self.memory.get((self.owner, span, at))
            if data is None:
                break
            got.append(data)
            at += self.WINDOW
        if at < want_hi:
            lo, hi = self._uncompressed_range(span)
            top = min(hi - lo, -(-want_hi // self.WINDOW) * self.WINDOW)
            if not self._held(span):
                self._ensure(span, span)
            fresh = memoryview(self._inflate(span, self._compressed(span), at, top - at))
            for start in range(at, top, self.WINDOW):
                piece = fresh[start - at : start - at + self.WINDOW].tobytes()
                self.memory.put((self.owner, span, start), piece)
                got.append(piece)
            del fresh
        joined = got[0] if len(got) == 1 else b"".join(got)
        return joined[want_lo - first : want_hi - first]

    def _compressed(self, span: int) -> Comp:
        with self._lock:
            fresh = self._fresh.pop(span, None)
        if fresh is not None:
            return fresh
        digest = self.ztoc.span_digests[span]
        if self.disk is not None:
            data = self.disk.get(digest)
            if data is not None:
                return data
        self._ensure(span, span, force=True)
        with self._lock:
            fresh = self._fresh.pop(span, None)
        if fresh is not None:
            return fresh
        if self.disk is not None:
            data = self.disk.get(digest)
            if data is not None:
                return data
        # No disk cache (or it refused the span): fetch and verify directly.
        return self._fetch_verified(span, span)[span]

    # -- fetching ----------------------------------------------------------------------

    def _ensure(self, first: int, last: int, force: bool = False) -> None:
        """Make huge spans first..last available on disk (compressed), one fetch per span
        across threads."""
        waits: list[threading.Event] = []
        mine: list[int] = []
        with self._lock:
            for span in range(first, last + 1):
                if not force and self._held(span):
                    continue
                event = self._inflight.get(span)
                if event is not None:
                    waits.append(event)
                else:
                    event = threading.Event()
                    self._inflight[span] = event
                    mine.append(span)
        try:
            # Contiguous runs of our spans go in one request each.
            runs: list[list[int]] = []
            for span in mine:
                if runs and runs[-1][-1] == span - 1:
                    runs[-1].append(span)
                else:
                    runs.append([span])
            for run in runs:
                if self.disk is not None:
                    missing = [s for s in run if not self._held(s)]
                    if not missing:
                        continue
                    run = list(range(missing[0], missing[-1] + 1))
                got = self._fetch_verified(run[0], run[-1])
                for span, data in got.items():
                    if self.disk is not None:
                        self.disk.put(self.ztoc.span_digests[span], data)
                with self._lock:
                    for span, data in got.items():
                        if len(self._fresh) < self.MAX_AHEAD * 2:
                            self._fresh[span] = data
        finally:
            with self._lock:
                for span in mine:
                    self._inflight.pop(span).set()
        for event in waits:
            event.wait()

    def _fetch_verified(self, first: int, last: int) -> dict[int, Comp]:
        start = self.zinfo.compressed_start(first)
        end = self.zinfo.compressed_end(last)
        for attempt in (1, 2):
            blob = self.fetch(start, end)
            self.fetches += 1
            self.bytes_fetched += len(blob)
            try:
                return split_verified(self.ztoc, self.zinfo, blob, start, first, last)
            except SpanMismatch as e:
                bad = e.span
            self.verify_failures += 1
            log.warning("layer %s: span %d failed verification (attempt %d)", self.key, bad,
                        attempt)
        raise DigestMismatchError(f"layer {self.key}: span {bad} failed verification twice")

    # -- background fetch and status ---------------------------------------------------

    def missing_spans(self) -> list[int]:
        """Spans not on disk that the background fetch has not fetched yet.

        A span it fetched once and that is gone again (evicted from a disk cache smaller
        than the layers, or refused by it) is not fetched again in the background: that
        would only churn the cache and the registry.
        """
        if self.disk is None:
            return []  # nowhere to keep what a background fetch would bring
        with self._lock:
            done = set(self._background)
        return [s for s in range(self.spans) if s not in done and not self._held(s)]

    def prefetch(self, span: int) -> None:
        """Load one span for the background fetch: onto disk, not into memory (a scan of
        the whole layer must not push out what readers use)."""
        if self._huge(span):
            self._ensure(span, span)
        elif self._claim(span, span):
            try:
                comp = self._fetch_verified(span, span)[span]
            except BaseException:
                self._done(span)
                raise
            self._land([span])
            self._finish(span, comp, keep=False)
        with self._lock:  # only once it worked: a failed fetch is tried again later
            self._background.add(span)

    @property
    def held_spans(self) -> int:
        """How many of the layer's spans the disk cache holds right now."""
        return sum(1 for s in range(self.spans) if self._held(s))

    @property
    def fetched_fraction(self) -> float:
        """The fraction of the layer's spans held on disk now (after a restart too)."""
        return self.held_spans / self.spans if self.spans else 1.0
