"""Building a zTOC in one streaming pass over a layer blob.

The blob is read once, in chunks. The calling thread inflates each chunk in
the native core (GIL released), which records checkpoints and collects tar
headers from the same output. A second thread hashes the compressed bytes
(the blob digest and the per-span digests) and decodes the collected headers,
so on two cores hashing and TOC decoding hide behind inflation.

Nothing here needs a seekable source: a registry response body works as well
as a file.
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
from soci.cancel import CancelToken
from soci.errors import LayerFormatError
from soci.ztoc.model import DEFAULT_SPAN_SIZE, ZTOC_VERSION, Compression, Ztoc
from soci.ztoc.tarmeta import TocDecoder
from soci.ztoc.zinfo import MAX_SPAN_SIZE, TarZinfo

CHUNK_SIZE = 1 << 20
_QUEUE_DEPTH = 16
_STOP_WAIT = 0.5  # seconds a stopping build waits for its reader thread

_GZIP_MAGIC = b"\x1f\x8b"
_OTHER_MAGIC = {
    b"\x28\xb5\x2f\xfd": "zstd",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
}


@dataclass(slots=True)
class BuildResult:
    """A zTOC and what was learned about the blob while building it."""

    ztoc: Ztoc
    layer_digest: str
    layer_size: int


def detect_compression(head: bytes) -> Compression:
    """Classify a layer by its first bytes: gzip, a plain tar, or an error naming why not."""
    if not head:
        raise LayerFormatError("layer blob is empty")
    if head.startswith(_GZIP_MAGIC):
        return Compression.GZIP
    for magic, name in _OTHER_MAGIC.items():
        if head.startswith(magic):
            raise LayerFormatError(f"{name}-compressed layers cannot be indexed (gzip or tar only)")
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


def build_ztoc(
    source: BinaryIO,
    *,
    span_size: int = DEFAULT_SPAN_SIZE,
    build_tool: str = BUILD_TOOL_IDENTIFIER,
    progress: Callable[[int, int], None] | None = None,
    cancel: CancelToken | None = None,
) -> BuildResult:
    """Build the zTOC of a gzip or plain tar layer read from ``source``.

    ``progress(indexed, read)`` is called after each chunk with the compressed bytes
    indexed so far and those read from the source (which runs ahead). When ``cancel`` is
    cancelled (from any thread) the build raises ``Cancelled`` within one chunk, or within
    256 KiB of inflated output while inside the native inflater.
    Raises ``LayerFormatError`` for anything that is not a complete, valid layer.
    """
    if not 0 < span_size <= MAX_SPAN_SIZE:
        # A larger span could not be served: readers refuse spans past MAX_SPAN_BYTES.
        raise ValueError(f"span size must be between 1 and {MAX_SPAN_SIZE} bytes")
    first = _read_full(source, CHUNK_SIZE)
    compression = detect_compression(first)
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
