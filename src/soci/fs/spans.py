"""Serving a layer's uncompressed bytes span by span, fetching only what is missing.

A read maps to spans; each span comes from memory, else from the disk cache,
else from the registry: the missing spans of a read are fetched with one
ranged request, each verified against its span digest (a failure is fetched
once more, then the read fails: never a wrong byte), kept on disk, and
inflated from its checkpoint in the native core. Concurrent readers of a span
that is being fetched wait for that one fetch.
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

    def __init__(self, key: str, ztoc: Ztoc, fetch: RangeFetcher, memory: MemoryCache,
                 disk: DiskCache | None) -> None:
        self.key = key
        self.ztoc = ztoc
        self.zinfo: GzipZinfo | TarZinfo = zinfo_of(ztoc)
        self.fetch = fetch
        self.memory = memory
        self.disk = disk
        self.spans = ztoc.span_count
        self._lock = threading.Lock()
        self._inflight: dict[int, threading.Event] = {}
        self._have: set[int] = set()  # spans known to be on disk (or fetched)
        self._fresh: dict[int, bytes] = {}  # verified compressed spans not yet inflated
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
            need = min(end, hi) - lo
            data = self.memory.get((self.key, span))
            if data is None or len(data) < need:
                if data is None:
                    self._ensure(span, ahead)
                data = self._inflate(span, need, data)
            pieces.append(data[max(offset - lo, 0) : end - lo])
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def read_cached(self, offset: int, size: int) -> bytes | None:
        """The same bytes when every span is already in memory, else None (never blocks)."""
        end = min(offset + size, self.ztoc.uncompressed_size)
        if end <= offset:
            return b""
        first, last = self.zinfo.span_of(offset), self.zinfo.span_of(end - 1)
        if first != last:
            return None
        data = self.memory.get((self.key, first))
        lo, _ = self._uncompressed_range(first)
        if data is None or len(data) < end - lo:
            return None
        self.last_access = time.monotonic()
        return data[offset - lo : end - lo]

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
        self.memory.put((self.key, span), data)
        return data

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
                if span in self._have and not force:
                    continue
                if (self.memory.get((self.key, span)) is not None) and not force:
                    continue
                event = self._inflight.get(span)
                if event is not None:
                    waits.append(event)
                elif span not in self._have or force:
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
                    missing = [s for s in run if not self.disk.has(self.ztoc.span_digests[s])]
                    if not missing:
                        with self._lock:
                            self._have.update(run)
                        continue
                    run = list(range(missing[0], missing[-1] + 1))
                got = self._fetch_verified(run[0], run[-1])
                for span, data in got.items():
                    if self.disk is not None:
                        self.disk.put(self.ztoc.span_digests[span], data)
                with self._lock:
                    self._have.update(got)
                    if len(self._fresh) < self.MAX_AHEAD * 2:
                        self._fresh.update(got)
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

    # -- background fetch --------------------------------------------------------------

    def missing_spans(self) -> list[int]:
        with self._lock:
            have = set(self._have)
        return [s for s in range(self.spans) if s not in have]

    def prefetch(self, span: int) -> None:
        self._ensure(span, span)

    @property
    def fetched_fraction(self) -> float:
        with self._lock:
            return len(self._have) / self.spans if self.spans else 1.0
