"""Span caches: inflated spans in memory and on disk (compressed ones too, for huge spans).

The disk cache keeps two kinds of files under ``<dir>/<64 hex>``, one bound of ``disk_mb``
for both, evicting the least recently used:

* **inflated spans** (the common case), named by :func:`inflated_name`: the sha256 of the
  layer digest, the zTOC digest, the span number and the span digest, so one image's
  cache entry can never answer for another layer, another zTOC or another span. They are
  written (atomically, 0600 in a 0700 directory only root can enter) only from
  compressed bytes that matched their span digest, and a hit reads just the range it
  needs with one ``pread``: a cached span is never fetched, verified or inflated again.
  Each file starts with a checksum of the bytes that follow (a tagged CRC-32, computed at
  memory speed: a sha256 here cost as much CPU as the inflate on a first read); the daemon
  checks it the first time it uses a file it did not write itself (after a restart, say),
  and checks the length on every use, so a torn or corrupted file is a miss, never a
  served byte.
  Past that, the bytes are trusted because only root can write the cache directory.
* **compressed spans** named by span digest (spans too long to inflate whole), verified
  against their name on every read.

What inflated bytes are depends on the zTOC's checkpoints, not only on the compressed
bytes: so the memory cache, too, is keyed by zTOC digest (with the layer's), never by
layer digest alone. Both caches are bounded and evict the least recently used spans.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from soci._native.zran import crc32
from soci.fsutil import PRIVATE_DIR, PRIVATE_FILE, atomic_writer, make_dirs

log = logging.getLogger("soci.cache")


#: A memory cache key: (owner, span, start). The owner must name everything the inflated
#: bytes depend on: the zTOC digest does (its checkpoints say how a span inflates, its span
#: digests which compressed bytes go in), the layer digest alone does not (two zTOCs of one
#: layer may cut it into different spans). ``start`` is where in the span the bytes begin.
MemoryKey = tuple[str, int, int]


class MemoryCache:
    """Uncompressed span bytes by (layer and zTOC, span, start), bounded in bytes, shared."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        # Values are never changed once put (a bytearray straight from the inflater, too).
        self._items: OrderedDict[MemoryKey, bytes | bytearray] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def peek(self, key: MemoryKey) -> bytes | bytearray | None:
        """The entry, if held, without counting a hit or refreshing it."""
        with self._lock:
            return self._items.get(key)

    def get(self, key: MemoryKey) -> bytes | bytearray | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: MemoryKey, data: bytes | bytearray) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._size -= len(evicted)

    def __contains__(self, key: MemoryKey) -> bool:
        """Whether ``key`` is held, without counting a hit or a miss."""
        with self._lock:
            return key in self._items

    def drop(self, owner: str) -> int:
        """Forget every entry of ``owner`` (a released layer); returns the bytes freed."""
        with self._lock:
            keys = [k for k in self._items if k[0] == owner]
            freed = 0
            for k in keys:
                freed += len(self._items.pop(k))
            self._size -= freed
            return freed

    @property
    def size(self) -> int:
        return self._size


def _checksum_header(crc: int) -> bytes:
    """An inflated span file's 32-byte header: a tag (files of an older format never
    match it, so they are misses) and the CRC-32 of the bytes after the header."""
    return b"soci inflated span crc32 v1\n" + crc.to_bytes(4, "big")


def inflated_name(layer: str, ztoc_digest: str, span: int, span_digest: str) -> str:
    """The disk cache name of a span's inflated bytes: binds the layer, the zTOC (whose
    checkpoint decides what the span inflates to), the span and its compressed digest."""
    key = f"soci inflated span\n{layer}\n{ztoc_digest}\n{span}\n{span_digest}\n"
    return hashlib.sha256(key.encode()).hexdigest()


class DiskCache:
    """Spans on disk, bounded in bytes; an index of sizes kept in memory."""

    #: An inflated span file starts with a checksum of the inflated bytes that follow.
    HEADER = 32
    #: How many files' read-ahead advice is remembered (advice is given once per file).
    _ADVISED = 64

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int) -> None:
        self.directory = Path(directory)
        make_dirs(self.directory, PRIVATE_DIR)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()
        self._size = 0
        entries = []
        for p in self.directory.iterdir():
            if len(p.name) == 64 and not p.name.startswith("."):
                st = p.stat()
                entries.append((st.st_atime, p.name, st.st_size))
            elif p.name.startswith(".tmp-"):
                p.unlink(missing_ok=True)  # a write interrupted by a crash
        for _, name, size in sorted(entries):
            self._index[name] = size
            self._size += size
        self.hits = self.misses = self.rejected = 0
        self.inflated_hits = 0  # reads answered from inflated span files
        self._trusted: set[str] = set()  # inflated files written or checked by this process
        self._writing: set[str] = set()  # inflated files being written
        self._advised: OrderedDict[str, None] = OrderedDict()

    def has(self, digest: str) -> bool:
        with self._lock:
            return digest.removeprefix("sha256:") in self._index

    def get(self, digest: str) -> bytes | None:
        name = digest.removeprefix("sha256:")
        with self._lock:
            known = name in self._index
            if known:
                self._index.move_to_end(name)
        if not known:
            self.misses += 1
            return None
        try:
            data = (self.directory / name).read_bytes()
        except FileNotFoundError:
            self._forget(name)
            self.misses += 1
            return None
        if hashlib.sha256(data).hexdigest() != name:
            self._reject(name, "digest")
            return None
        self.hits += 1
        return data

    def put(self, digest: str, data: bytes) -> bool:
        """Keep a verified span; False when it cannot be kept (too big, or a write error)."""
        name = digest.removeprefix("sha256:")
        if len(data) > self.max_bytes:
            return False
        with self._lock:
            if name in self._index:
                return True
        try:
            with atomic_writer(self.directory / name, PRIVATE_FILE, durable=False) as f:
                f.write(data)
        except OSError as e:
            log.warning("disk cache: cannot store span %s: %s", digest, e)
            return False
        self._admit(name, len(data))
        return True

    def _forget(self, name: str) -> None:
        with self._lock:
            size = self._index.pop(name, None)
            if size is not None:
                self._size -= size
            self._trusted.discard(name)

    def _reject(self, name: str, why: str) -> None:
        log.warning("disk cache: span file %s failed verification; dropped (%s)", name, why)
        self.rejected += 1
        self._forget(name)
        with contextlib.suppress(FileNotFoundError):
            (self.directory / name).unlink()

    # -- inflated spans ----------------------------------------------------------------

    def put_inflated(self, name: str, data: bytes | bytearray | memoryview) -> bool:
        """Keep a span's inflated bytes (inflated from verified compressed bytes only: the
        caller's duty) under ``name`` (see :func:`inflated_name`); False if not kept."""
        size = self.HEADER + len(data)
        if size > self.max_bytes:
            return False
        with self._lock:
            if name in self._index or name in self._writing:
                return True
            self._writing.add(name)
        # Room is made before the file is written, so the directory never holds more
        # than the bound, not even while a write is under way.
        self._admit(f".reserved {name}", size)
        try:
            with atomic_writer(self.directory / name, PRIVATE_FILE, durable=False) as f:
                f.write(_checksum_header(crc32(data)))
                f.write(data)
        except OSError as e:
            log.warning("disk cache: cannot store span file %s: %s", name, e)
            self._forget(f".reserved {name}")
            return False
        finally:
            with self._lock:
                self._writing.discard(name)
        with self._lock:  # the reservation becomes the entry, in its place in the LRU order
            if self._index.pop(f".reserved {name}", None) is not None:
                self._index[name] = size
                self._trusted.add(name)
                return True
        self._admit(name, size, trusted=True)  # the reservation was evicted meanwhile
        return True

    def read_inflated(self, name: str, length: int, offset: int, size: int,
                      nowait: bool = False) -> bytes | bytearray | None:
        """Bytes [offset, offset+size) of an inflated span ``length`` bytes long, or None.

        Reads only that range (one pread). The file's length is checked every time, its
        checksum the first time this process uses it; the first read of a file asks the
        kernel to read the rest of it ahead. ``nowait``: answer only from the page cache
        (RWF_NOWAIT), never wait for the disk nor check a checksum: None otherwise, for
        the caller to ask again where it may block.
        """
        with self._lock:
            known = name in self._index
            if known:
                self._index.move_to_end(name)
            trusted = name in self._trusted
        if not known:
            self.misses += 1
            return None
        if nowait:
            if not trusted:
                return None
            return self._read_nowait(name, length, offset, size)
        try:
            fd = os.open(self.directory / name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget(name)
            self.misses += 1
            return None
        try:
            if os.fstat(fd).st_size != self.HEADER + length:
                self._reject(name, "wrong length")
                return None
            if not trusted:
                header = os.pread(fd, self.HEADER, 0)
                crc = 0
                at = self.HEADER
                while chunk := os.pread(fd, 1 << 20, at):
                    crc = crc32(chunk, crc)
                    at += len(chunk)
                if _checksum_header(crc) != header:
                    self._reject(name, "checksum")
                    return None
                with self._lock:
                    if name in self._index:
                        self._trusted.add(name)
            else:
                self.advise(name, fd)
            data = os.pread(fd, size, self.HEADER + offset)
        finally:
            os.close(fd)
        if len(data) != size:
            self._reject(name, "short read")
            return None
        self.inflated_hits += 1
        return data

    def _read_nowait(self, name: str, length: int, offset: int, size: int
                     ) -> bytearray | None:
        try:
            fd = os.open(self.directory / name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._forget(name)
            return None
        try:
            if os.fstat(fd).st_size != self.HEADER + length:
                self._reject(name, "wrong length")
                return None
            self.advise(name, fd)
            out = bytearray(size)
            try:
                got = os.preadv(fd, [out], self.HEADER + offset, os.RWF_NOWAIT)
            except (BlockingIOError, OSError):
                return None  # not in the page cache (or no RWF_NOWAIT here): ask again
        finally:
            os.close(fd)
        if got != size:
            return None
        self.inflated_hits += 1
        return out

    def advise(self, name: str, fd: int | None = None) -> None:
        """Ask the kernel to read an inflated span file ahead, once per file (cheap)."""
        with self._lock:
            if name in self._advised or name not in self._index:
                return
            self._advised[name] = None
            if len(self._advised) > self._ADVISED:
                self._advised.popitem(last=False)
        own = fd is None
        try:
            if own:
                fd = os.open(self.directory / name, os.O_RDONLY | os.O_CLOEXEC)
            assert fd is not None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            if own and fd is not None:
                os.close(fd)

    def _admit(self, name: str, size: int, trusted: bool = False) -> None:
        victims = []
        with self._lock:
            if name not in self._index:
                self._index[name] = size
                self._size += size
            if trusted:
                self._trusted.add(name)
            while self._size > self.max_bytes and self._index:
                victim, vsize = self._index.popitem(last=False)
                self._size -= vsize
                self._trusted.discard(victim)
                victims.append(victim)
        for victim in victims:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / victim).unlink()

    @property
    def size(self) -> int:
        return self._size
