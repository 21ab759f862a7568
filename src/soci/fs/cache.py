"""Span caches: uncompressed spans in memory, compressed spans on disk.

The disk cache is content-addressed by span digest (``<dir>/<hex>``), so it
is shared by every layer and survives restarts; every file is verified against
its name when read, so a torn or corrupted write is a miss, never a served
byte. A span digest names the compressed bytes completely (where a zTOC says they sit
in the layer does not change them), but what they inflate to also depends on the
checkpoint they start from, which is the zTOC's: so the memory cache of inflated bytes is
keyed by zTOC digest (with the layer's), never by layer digest alone. Both caches are
bounded and evict the least recently used spans.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

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
        self._items: OrderedDict[MemoryKey, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: MemoryKey) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: MemoryKey, data: bytes) -> None:
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


class DiskCache:
    """Compressed spans by digest, bounded in bytes; an index of sizes kept in memory."""

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
            log.warning("disk cache: span %s failed verification; dropped", digest)
            self.rejected += 1
            self._forget(name)
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).unlink()
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
        victims = []
        with self._lock:
            self._index[name] = len(data)
            self._size += len(data)
            while self._size > self.max_bytes and self._index:
                victim, size = self._index.popitem(last=False)
                self._size -= size
                victims.append(victim)
        for victim in victims:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / victim).unlink()
        return True

    def _forget(self, name: str) -> None:
        with self._lock:
            size = self._index.pop(name, None)
            if size is not None:
                self._size -= size

    @property
    def size(self) -> int:
        return self._size
