"""Small real gzip layers for the span-manager tests, and reading them as FUSE would."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

from soci.fs.spans import SpanManager

#: Where each file's bytes sit in a layer's tar: name -> (offset, size).
Where = dict[str, tuple[int, int]]


def gzip_layer(path: Path, sizes: list[int], line: bytes = b"text line\n"
               ) -> tuple[bytes, Where]:
    """Write a gzip layer of files ``f0``, ``f1``, ... of ``sizes`` bytes (half noise, half
    text, so gzip shrinks them a little) to ``path``; its tar and where each file sits."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i, size in enumerate(sizes):
            noise = hashlib.shake_256(f"file{i}".encode()).digest(size // 2)
            data = (noise + line * size)[:size]
            info = tarfile.TarInfo(f"f{i}")
            info.size = size
            tf.addfile(info, io.BytesIO(data))
    tar = buf.getvalue()
    path.write_bytes(gzip.compress(tar, compresslevel=6, mtime=0))
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        where = {m.name: (m.offset_data, m.size) for m in tf.getmembers()}
    return tar, where


def read_in_order(spans: SpanManager, tar: bytes, where: Where) -> None:
    """Read every file in layer order in 128 KiB reads, as FUSE would, checking each."""
    for name, (offset, size) in where.items():
        at = 0
        while at < size:
            n = min(128 << 10, size - at)
            got = spans.read_cached(offset + at, n, offset + size)
            if got is None:
                got = spans.read(offset + at, n, offset + size)
            assert got == tar[offset + at : offset + at + n], name
            at += n
