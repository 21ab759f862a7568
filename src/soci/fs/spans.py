"""Serving a layer's uncompressed bytes span by span, fetching only what is missing.

A read maps to spans; each span comes from memory, else from the disk cache,
else from the registry: the missing spans of a read are fetched with one
ranged request, each verified against its span digest (a failure is fetched
once more, then the read fails: never a wrong byte), kept on disk, and
inflated from its checkpoint in the native core. Concurrent readers of a span
that is being fetched wait for that one fetch.

Inflated bytes are cached in memory under the zTOC's digest (what they depend on), and a
span too long to hold whole (a zTOC may have few checkpoints) is inflated only in aligned
windows around each read, so memory stays bounded by the read, not by the span. What is
"held" locally is whatever the disk cache holds: it is the one record of fetched spans.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from soci._native.zran import inflate_range
from soci.errors import DigestMismatchError, LayerFormatError
from soci.fs.cache import DiskCache, MemoryCache
from soci.ztoc import GzipZinfo, TarZinfo, Ztoc, zinfo_of
from soci.ztoc.extract import SpanMismatch, split_verified

log = logging.getLogger("soci.spans")

#: Fetches compressed bytes [start, end) of the layer blob.
RangeFetcher = Callable[[int, int], bytes]


class SpanManager:
    #: At most this many spans are fetched ahead of a read, in one request.
    MAX_AHEAD = 8
    #: A first read inflates a span's prefix in steps of this many bytes.
    PREFIX_STEP = 256 << 10
    #: Spans longer than this (uncompressed) are never inflated or cached whole ...
    WHOLE_SPAN_MAX = 16 << 20
    #: ... but in aligned windows of this many bytes, only those a read touches.
    WINDOW = 1 << 20

    def __init__(self, key: str, ztoc: Ztoc, fetch: RangeFetcher, memory: MemoryCache,
                 disk: DiskCache | None, ztoc_digest: str) -> None:
        self.key = key  # the layer digest
        self.ztoc_digest = ztoc_digest
        # Memory cache entries belong to (layer, zTOC): the zTOC decides what a span inflates
        # to, and naming the layer too keeps one layer's bytes from ever serving another.
        self.owner = f"{key} {ztoc_digest}"
        self.ztoc = ztoc
        self.zinfo: GzipZinfo | TarZinfo = zinfo_of(ztoc)
        self.fetch = fetch
        self.memory = memory
        self.disk = disk
        self.spans = ztoc.span_count
        self._lock = threading.Lock()
        self._inflight: dict[int, threading.Event] = {}
        self._fresh: dict[int, bytes] = {}  # verified compressed spans not yet inflated
        self._background: set[int] = set()  # spans the background fetch already fetched once
        self.bytes_fetched = 0
        self.fetches = 0
        self.verify_failures = 0
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

    def _held(self, span: int) -> bool:
        """Whether the span's compressed bytes are on disk (the disk cache says, nobody else)."""
        return self.disk is not None and self.disk.has(self.ztoc.span_digests[span])

    # -- reads -------------------------------------------------------------------------

    def read(self, offset: int, size: int, ahead_to: int = 0) -> bytes:
        """Uncompressed bytes [offset, offset+size) of the tar stream (short at its end).

        On a miss, the spans up to uncompressed offset ``ahead_to`` (the end of
        the file being read, say) are fetched in the same request.
        """
        self.last_access = time.monotonic()
        end = min(offset + size, self.ztoc.uncompressed_size)
        if end <= offset:
            return b""
        first, last = self.zinfo.span_of(offset), self.zinfo.span_of(end - 1)
        ahead = max(last, self.zinfo.span_of(max(min(ahead_to, self.ztoc.uncompressed_size) - 1,
                                                 0)))
        ahead = min(ahead, last + self.MAX_AHEAD)
        pieces = []
        for span in range(first, last + 1):
            lo, hi = self._uncompressed_range(span)
            want_lo, want_hi = max(offset, lo) - lo, min(end, hi) - lo
            if hi - lo > self.WHOLE_SPAN_MAX:
                pieces.append(self._windowed(span, want_lo, want_hi, ahead))
                continue
            data = self.memory.get((self.owner, span, 0))
            if data is None or len(data) < want_hi:
                if data is None:
                    self._ensure(span, ahead)
                data = self._inflate(span, want_hi, data)
            pieces.append(data[want_lo:want_hi])
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def read_cached(self, offset: int, size: int) -> bytes | None:
        """The same bytes when they are already in memory, else None (never blocks)."""
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
        if data is None or len(data) < end - lo - base:
            return None
        self.last_access = time.monotonic()
        return data[offset - lo - base : end - lo - base]

    def _inflate(self, span: int, need: int, partial: bytes | None) -> bytes:
        """A span's bytes inflated from its verified compressed bytes.

        A first small read inflates only a prefix of at least ``need`` bytes (rounded up);
        a later read beyond it inflates the whole span, so a span is inflated at most twice.
        """
        lo, hi = self._uncompressed_range(span)
        full = hi - lo
        comp = self._compressed(span)
        if isinstance(self.zinfo, TarZinfo):
            data = comp[:full]
        else:
            length = full
            if partial is None and need < full // 2:
                length = min(full, -(-need // self.PREFIX_STEP) * self.PREFIX_STEP)
            out = bytearray(length)
            got = inflate_range(comp, self.zinfo.bits[span], self.zinfo.window(span), 0, out)
            if got != len(out):
                raise LayerFormatError(f"span {span} of {self.key} inflated short")
            data = bytes(out)
            if length < full:
                with self._lock:  # keep the compressed bytes (bounded) for a full inflate
                    if len(self._fresh) < self.MAX_AHEAD * 2:
                        self._fresh.setdefault(span, comp)
        self.memory.put((self.owner, span, 0), data)
        return data

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
                self._ensure(span, ahead)
            fresh = memoryview(self._inflate_part(span, at, top))
            for start in range(at, top, self.WINDOW):
                piece = fresh[start - at : start - at + self.WINDOW].tobytes()
                self.memory.put((self.owner, span, start), piece)
                got.append(piece)
            del fresh
        joined = got[0] if len(got) == 1 else b"".join(got)
        return joined[want_lo - first : want_hi - first]

    def _inflate_part(self, span: int, skip: int, top: int) -> bytes | bytearray:
        """Bytes [skip, top) of a span, inflating (and dropping) everything before ``skip``."""
        comp = self._compressed(span)
        if isinstance(self.zinfo, TarZinfo):
            return comp[skip:top]
        out = bytearray(top - skip)
        got = inflate_range(comp, self.zinfo.bits[span], self.zinfo.window(span), skip, out)
        if got != len(out):
            raise LayerFormatError(f"span {span} of {self.key} inflated short")
        return out

    def _compressed(self, span: int) -> bytes:
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
        """Make spans first..last available on disk, one fetch per span across threads."""
        waits: list[threading.Event] = []
        mine: list[int] = []
        with self._lock:
            for span in range(first, last + 1):
                if not force and (self._held(span) or (
                        not self._huge(span) and (self.owner, span, 0) in self.memory)):
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

    def _fetch_verified(self, first: int, last: int) -> dict[int, bytes]:
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
        self._ensure(span, span)
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
