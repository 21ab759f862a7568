"""Filesystem helpers shared by every writer: nothing is ever left half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: int = 0o644,
                  durable: bool = True) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` that replaces it only on success.

    Readers see either the old file or the complete new one; an exception
    inside the block removes the temporary file and leaves ``path`` untouched.
    ``durable=False`` skips the fsync, for caches that verify what they read.
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
