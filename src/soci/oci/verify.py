"""Reading content while checking it against its digest: nothing unverified is ever used."""

from __future__ import annotations

import hashlib
from typing import BinaryIO

from soci.errors import DigestMismatchError


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify(data: bytes, digest: str, what: str = "content") -> bytes:
    actual = sha256_digest(data)
    if actual != digest:
        raise DigestMismatchError(f"{what}: expected {digest}, got {actual}")
    return data


class VerifyingReader:
    """A stream that hashes what passes through and fails at the end if it was not ``digest``.

    The last read (the one that returns b"") raises instead, so a consumer that
    reads to the end can never mistake corrupt or truncated content for good.
    """

    def __init__(self, raw: BinaryIO, digest: str, size: int | None, what: str) -> None:
        self._raw = raw
        self._digest = digest
        self._size = size
        self._what = what
        self._hash = hashlib.sha256()
        self._seen = 0
        self._checked = False

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if data:
            self._hash.update(data)
            self._seen += len(data)
            if self._size is not None and self._seen > self._size:
                raise DigestMismatchError(f"{self._what}: longer than its {self._size} bytes")
            return data
        if not self._checked:
            self._checked = True
            actual = "sha256:" + self._hash.hexdigest()
            if self._size is not None and self._seen != self._size:
                raise DigestMismatchError(
                    f"{self._what}: got {self._seen} bytes, expected {self._size}"
                )
            if actual != self._digest:
                raise DigestMismatchError(f"{self._what}: expected {self._digest}, got {actual}")
        return b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> VerifyingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
