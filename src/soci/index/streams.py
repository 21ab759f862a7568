"""A blob stream handed to a writer (an upload, a layout): counts what is read from it, for
progress, and stops a cancelled copy at its next read."""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from soci.cancel import CancelToken


class CountingReader:
    """Wraps ``f``; ``on_read(total)`` after every read. Seeking (a retried upload starting
    again) resets the count, so progress never runs past the blob's size."""

    def __init__(self, f: BinaryIO, on_read: Callable[[int], None] | None,
                 cancel: CancelToken | None = None) -> None:
        self.f, self.on_read, self.cancel, self.sent = f, on_read, cancel, 0

    def read(self, n: int = -1) -> bytes:
        if self.cancel is not None:
            self.cancel.raise_if_cancelled()
        data = self.f.read(n)
        self.sent += len(data)
        if self.on_read is not None:
            self.on_read(self.sent)
        return data

    def seekable(self) -> bool:
        return self.f.seekable()

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        self.sent = offset
        return self.f.seek(offset, whence)

    def close(self) -> None:
        self.f.close()
