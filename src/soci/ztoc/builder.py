"""Building a zTOC in one streaming pass over a layer blob.

The blob is read once, in chunks. The calling thread inflates each chunk in
the native core (GIL released), which records checkpoints and collects tar
headers from the same output. A second thread hashes the compressed bytes
(the blob digest and the per-span digests) and decodes the collected headers,
so on two cores hashing and TOC decoding hide behind inflation.

Nothing here needs a seekable source: a registry response body works as well
as a file.

zstd layers go through the same pass with ``ZstdIndexer`` in place of the
inflater: a checkpoint is a frame start, a span a run of whole frames.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from soci import BUILD_TOOL_IDENTIFIER
from soci._native.tarscan import TarScanner
from soci._native.zran import GzipIndexer
from soci._native.zstdframes import ZstdIndexer
from soci.cancel import CancelToken
from soci.errors import LayerFormatError, ZtocFormatError
from soci.ztoc.model import DEFAULT_SPAN_SIZE, ZTOC_VERSION, Compression, Ztoc
from soci.ztoc.tarmeta import TocDecoder
from soci.ztoc.zinfo import (
    MAX_SPAN_SIZE,
    ZSTD_SPAN_FACTOR,
    TarZinfo,
    ZstdZinfo,
    check_span_lengths,
    zstd_span_limit,
)

CHUNK_SIZE = 1 << 20
_QUEUE_DEPTH = 16
_STOP_WAIT = 0.5  # seconds a stopping build waits for its reader thread

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OTHER_MAGIC = {
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
}


class UnservableLayerError(LayerFormatError):
    """A valid layer that cannot be served span by span (a zstd layer whose frames are far
    larger than the span size): callers skip it, as upstream skips what it cannot index."""


@dataclass(slots=True)
class BuildResult:
    """A zTOC and what was learned about the blob while building it."""

    ztoc: Ztoc
    layer_digest: str
    layer_size: int


def detect_compression(head: bytes) -> Compression:
    """Classify a layer by its first bytes: gzip, zstd, a plain tar, or an error naming why not.

    A zstd layer may start with a skippable frame (magic 0x184D2A5?).
    """
    if not head:
        raise LayerFormatError("layer blob is empty")
    if head.startswith(_GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(_ZSTD_MAGIC) or (
        len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50
    ):
        return Compression.ZSTD
    for magic, name in _OTHER_MAGIC.items():
        if head.startswith(magic):
            raise LayerFormatError(
                f"{name}-compressed layers cannot be indexed (gzip, zstd or tar only)"
            )
    return Compression.UNCOMPRESSED


def _read_full(source: BinaryIO, size: int) -> bytes:
    """Read up to ``size`` bytes, looping over short reads (pipes, sockets)."""
    parts = []
    while size > 0:
        piece = source.read(size)
        if not piece:
            break
        parts.append(piece)
        size -= len(piece)
    return b"".join(parts)


class _Reader(threading.Thread):
    """Reads the source ahead of the inflater, so network or disk waits overlap inflation.

    The read errors of the source (a digest mismatch at its end, a dropped registry
    connection) are handed over in order and raised by the building thread. It is a
    daemon and never blocks on its queue for long, so a build that stops early (an
    error, a cancel) does not wait for a slow source: the thread ends after its current
    read.
    """

    def __init__(self, source: BinaryIO) -> None:
        super().__init__(name="soci-ztoc-reader", daemon=True)
        self.source = source
        self.chunks: queue.Queue[bytes | BaseException] = queue.Queue(_QUEUE_DEPTH // 2)
        self.stopped = threading.Event()
        self.read_bytes = 0  # what the source has delivered so far (for progress)

    def run(self) -> None:
        try:
            while not self.stopped.is_set():
                chunk = self._read()
                self._put(chunk)
                if not chunk:
                    return
        except BaseException as e:  # handed to the building thread
            self._put(e)

    def _read(self) -> bytes:
        """Up to CHUNK_SIZE bytes, looping over short reads (pipes, sockets) but looking at
        ``stopped`` between them."""
        parts: list[bytes] = []
        size = CHUNK_SIZE
        while size > 0 and not self.stopped.is_set():
            piece = self.source.read(size)
            if not piece:
                break
            parts.append(piece)
            size -= len(piece)
            self.read_bytes += len(piece)
        return b"".join(parts)

    def _put(self, item: bytes | BaseException) -> None:
        while not self.stopped.is_set():
            with contextlib.suppress(queue.Full):
                self.chunks.put(item, timeout=0.1)
                return

    def next(self, cancel: CancelToken | None) -> bytes:
        while True:
            if cancel is not None:
                cancel.raise_if_cancelled()
            try:
                item = self.chunks.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def stop(self) -> None:
        """Stop reading; wait a little for the thread (it may be inside a slow read)."""
        self.stopped.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.chunks.get_nowait()
        self.join(_STOP_WAIT)


class _Hasher(threading.Thread):
    """Hashes the blob and its spans, and decodes tar headers, behind the inflater.

    Span ``i`` covers compressed bytes ``[start_i, in_{i+1})`` where ``start_i``
    is ``in_i - 1`` when checkpoint ``i`` begins mid-byte, exactly as upstream's
    ``getPerSpanDigests``. Each queued item brings a chunk together with the
    checkpoints the inflater found while consuming it, which all lie at or
    before the chunk's end, so the hasher never needs to look back further than
    the previous chunk's last byte.
    """

    def __init__(self) -> None:
        super().__init__(name="soci-ztoc-hasher", daemon=True)
        self.items: queue.Queue[tuple[bytes, list[tuple[int, int]], bytes] | None] = queue.Queue(
            _QUEUE_DEPTH
        )
        self.blob = hashlib.sha256()
        self.toc = TocDecoder()
        self.span_digests: list[str] = []
        self.error: BaseException | None = None
        self._span: hashlib._Hash | None = None
        self._pos = 0
        self._last_byte = b""

    def run(self) -> None:
        try:
            while (item := self.items.get()) is not None:
                chunk, boundaries, records = item
                self._consume(chunk, boundaries)
                if records:
                    self.toc.feed(records)
        except BaseException as e:  # handed to the building thread
            self.error = e
            while self.items.get() is not None:
                pass

    def _consume(self, chunk: bytes, boundaries: list[tuple[int, int]]) -> None:
        view = memoryview(chunk)
        self.blob.update(view)
        done = 0
        for at, bits in boundaries:
            cut = at - self._pos
            if self._span is not None:
                self._span.update(view[done:cut])
                self.span_digests.append("sha256:" + self._span.hexdigest())
            self._span = hashlib.sha256()
            if bits:
                # The span starts one byte early, on the byte its first bits come from.
                self._span.update(view[cut - 1 : cut] if cut >= 1 else self._last_byte)
            done = cut
        if self._span is not None:
            self._span.update(view[done:])
        self._pos += len(chunk)
        if chunk:
            self._last_byte = chunk[-1:]

    def finish(self) -> None:
        if self._span is not None:
            self.span_digests.append("sha256:" + self._span.hexdigest())
            self._span = None


class _ZstdHasher(_Hasher):
    """The hasher for zstd layers: spans are ``[c_i, c_{i+1})`` between frame starts, and the
    last one ends just past the last data frame (trailing skippable frames, like a
    zstd:chunked TOC, belong to no span, nor do leading ones).

    The indexer reports a frame start only once its whole header has arrived, up to 17
    bytes after the frame began, maybe in an earlier chunk; so bytes are kept until the
    indexer says no checkpoint can still fall among them (``safe``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._buf = bytearray()
        self._buf_at = 0              # compressed offset of _buf[0]
        self._end_digest: str | None = None

    def run(self) -> None:
        try:
            while (item := self.items.get()) is not None:
                chunk, starts, end, safe, records = item
                self._take(chunk, starts, end, safe)
                if records:
                    self.toc.feed(records)
        except BaseException as e:  # handed to the building thread
            self.error = e
            while self.items.get() is not None:
                pass

    def _hash_to(self, at: int) -> None:
        cut = at - self._buf_at
        if self._span is not None and cut > 0:
            self._span.update(memoryview(self._buf)[:cut])
        del self._buf[:cut]
        self._buf_at = at

    def _take(self, chunk: bytes, starts: list[int], end: int, safe: int) -> None:
        self.blob.update(chunk)
        self._buf += chunk
        for at in starts:
            self._hash_to(at)
            if self._span is not None:
                self.span_digests.append("sha256:" + self._span.hexdigest())
            self._span = hashlib.sha256()
            self._end_digest = None
        if self._span is not None and end >= self._buf_at:
            self._hash_to(end)
            self._end_digest = "sha256:" + self._span.hexdigest()
        self._hash_to(max(safe, self._buf_at))

    def finish(self) -> None:
        if self._end_digest is None:
            raise LayerFormatError("zstd stream holds no complete data frame")
        self.span_digests.append(self._end_digest)
        self._span = None


def _build_zstd(first: bytes, reader: _Reader, span_size: int, build_tool: str,
                progress: Callable[[int, int], None] | None,
                cancel: CancelToken | None) -> BuildResult:
    """The zstd pass: frames decoded natively, spans hashed and headers decoded behind it."""
    scanner = TarScanner()
    indexer = ZstdIndexer(span_size, scanner)
    limit = zstd_span_limit(span_size)
    hasher = _ZstdHasher()
    hasher.start()
    points: list[tuple[int, int]] = []
    end = -1
    try:
        chunk = first
        while chunk:
            if hasher.error is not None:
                break
            if cancel is not None:
                cancel.raise_if_cancelled()
            found = indexer.feed(chunk)
            points += found
            if indexer.open_span > limit:
                raise UnservableLayerError(
                    f"zstd layer cannot be served lazily: a run of frames decodes to over "
                    f"{limit} bytes, and spans may hold at most {ZSTD_SPAN_FACTOR}x the span "
                    f"size ({span_size}); the layer is probably one zstd frame (plain `zstd`, "
                    f"`zstd -T0`, containerd, buildkit): compress it with pzstd or "
                    f"zstd:chunked, or raise --span-size"
                )
            new_end = indexer.data_end if indexer.data_end != end else -1
            end = indexer.data_end
            hasher.items.put((chunk, [at for at, _ in found], new_end, indexer.resolved,
                              scanner.take_records()))
            if progress is not None:
                progress(indexer.total_in, len(first) + reader.read_bytes)
            chunk = reader.next(cancel)
        if hasher.error is None:
            indexer.finish()
            archive_size = scanner.finish()
    finally:
        reader.stop()
        hasher.items.put(None)
        hasher.join()
    if hasher.error is not None:
        raise hasher.error
    hasher.finish()
    points.append((indexer.data_end, indexer.total_out))
    checkpoints = ZstdZinfo.encode(span_size, points)
    zinfo = ZstdZinfo(checkpoints, indexer.total_in)
    try:
        check_span_lengths(zinfo, archive_size)
    except ZtocFormatError as e:
        raise UnservableLayerError(f"zstd layer cannot be served lazily: {e}") from None
    ztoc = Ztoc(
        version=ZTOC_VERSION,
        build_tool=build_tool,
        compressed_size=indexer.total_in,
        uncompressed_size=archive_size,
        entries=hasher.toc.entries,
        compression=Compression.ZSTD,
        max_span_id=zinfo.max_span_id,
        span_digests=hasher.span_digests,
        checkpoints=checkpoints,
    )
    return BuildResult(ztoc, "sha256:" + hasher.blob.hexdigest(), indexer.total_in)


def build_ztoc(
    source: BinaryIO,
    *,
    span_size: int = DEFAULT_SPAN_SIZE,
    build_tool: str = BUILD_TOOL_IDENTIFIER,
    progress: Callable[[int, int], None] | None = None,
    cancel: CancelToken | None = None,
) -> BuildResult:
    """Build the zTOC of a gzip, zstd or plain tar layer read from ``source``.

    ``progress(indexed, read)`` is called after each chunk with the compressed bytes
    indexed so far and those read from the source (which runs ahead). When ``cancel`` is
    cancelled (from any thread) the build raises ``Cancelled`` within one chunk, or within
    256 KiB of inflated output while inside the native inflater.
    Raises ``LayerFormatError`` for anything that is not a complete, valid layer, and its
    subclass ``UnservableLayerError`` for a valid zstd layer whose frames are too large to
    serve span by span.
    """
    if not 0 < span_size <= MAX_SPAN_SIZE:
        # A larger span could not be served: readers refuse spans past MAX_SPAN_BYTES.
        raise ValueError(f"span size must be between 1 and {MAX_SPAN_SIZE} bytes")
    first = _read_full(source, CHUNK_SIZE)
    compression = detect_compression(first)
    if compression is Compression.ZSTD:
        reader = _Reader(source)
        reader.start()
        return _build_zstd(first, reader, span_size, build_tool, progress, cancel)
    scanner = TarScanner()
    indexer = GzipIndexer(span_size, scanner) if compression is Compression.GZIP else None
    unregister = (cancel.on_cancel(indexer.cancel) if cancel is not None and indexer is not None
                  else None)
    hasher = _Hasher()
    hasher.start()
    reader = _Reader(source)
    reader.start()
    total = 0
    try:
        chunk = first
        while chunk:
            if hasher.error is not None:
                break
            if cancel is not None:
                cancel.raise_if_cancelled()
            if indexer is not None:
                boundaries = indexer.feed(chunk)
            else:
                scanner.feed_bytes(chunk)
                first_span = -(-total // span_size) * span_size
                boundaries = [
                    (at, 0) for at in range(first_span, total + len(chunk), span_size)
                ]
            hasher.items.put((chunk, boundaries, scanner.take_records()))
            total += len(chunk)
            if progress is not None:
                progress(total, len(first) + reader.read_bytes)
            chunk = reader.next(cancel)
        if hasher.error is None:
            if indexer is not None:
                indexer.finish()
            archive_size = scanner.finish()
    finally:
        if unregister is not None:
            unregister()
        reader.stop()
        hasher.items.put(None)
        hasher.join()
    if hasher.error is not None:
        raise hasher.error
    hasher.finish()

    if indexer is not None:
        checkpoints = indexer.zinfo()
        max_span_id = indexer.checkpoint_count - 1
    else:
        checkpoints = TarZinfo.encode(span_size, total)
        max_span_id = TarZinfo(checkpoints).max_span_id
    ztoc = Ztoc(
        version=ZTOC_VERSION,
        build_tool=build_tool,
        compressed_size=total,
        uncompressed_size=archive_size,
        entries=hasher.toc.entries,
        compression=compression,
        max_span_id=max_span_id,
        span_digests=hasher.span_digests,
        checkpoints=checkpoints,
    )
    return BuildResult(ztoc, "sha256:" + hasher.blob.hexdigest(), total)
