"""Filesystem helpers shared by every writer: nothing is ever left half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

#: What ``soci`` and ``soci-store`` run with: nothing they create is readable by others.
PRIVATE_UMASK = 0o077


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be swapped, and a
    swap races with threads creating files meanwhile)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(PRIVATE_UMASK)  # no /proc: swap twice (briefly the stricter mask)
    os.umask(mask)
    return mask


def masked(mode: int) -> int:
    """``mode`` as ``open``/``mkdir`` would apply it: an explicit chmod must not undo the
    umask (a 0644 request under umask 077 gives 0600)."""
    return mode & ~current_umask()


#: Modes of what is written under the store root: it holds image contents (zTOCs, spans).
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def make_dirs(path: str | os.PathLike[str], mode: int = 0o777) -> None:
    """``mkdir -p`` where every directory created gets ``mode`` (``os.makedirs`` gives it to
    the last one only), so a private tree has no readable level in between."""
    missing = []
    current = os.path.abspath(path)
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, mode)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: int = 0o644,
                  durable: bool = True) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` that replaces it only on success.

    Readers see either the old file or the complete new one; an exception
    inside the block removes the temporary file and leaves ``path`` untouched.
    ``mode`` is filtered through the umask, as a plain ``open`` would do.
    ``durable=False`` skips the fsync, for caches that verify what they read.
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    except OSError as e:  # name the file the caller asked for, not our temporary one
        raise type(e)(e.errno, e.strerror, target) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, masked(mode))
        try:
            os.replace(tmp, target)
        except OSError as e:
            raise type(e)(e.errno, e.strerror, target) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
