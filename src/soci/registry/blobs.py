"""Blobs: existence, whole (verified, bounded by the descriptor's size), ranged, and
streamed through :class:`BlobReader` (hashed as read, resumed after a dropped connection)."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import urllib3

from soci.errors import DigestMismatchError, RegistryError
from soci.registry.session import Session, digest_of, too_large
from soci.registry.transport import Response, Target, declared_length, one_line, short_reason


class BlobReader(io.RawIOBase):
    """A blob's body as a stream, hashed as it is read.

    At EOF the digest and the length are checked (``DigestMismatchError``); a connection
    dropped mid-body is resumed with a Range request, up to the client's retry count.
    With ``expected_size`` (the descriptor's size) no more than that many bytes (and one
    to notice) are ever read: a longer body fails as soon as it shows.
    """

    def __init__(
        self,
        session: Session,
        target: Target,
        digest: str,
        response: Response,
        verify: bool = True,
        expected_size: int | None = None,
    ) -> None:
        super().__init__()
        self._session = session
        self._target = target
        self._digest = digest
        self._response: urllib3.BaseHTTPResponse | None = response.raw
        # verify=False: the caller hashes the bytes itself (the zTOC builder does).
        self._hasher = hashlib.new(digest.split(":", 1)[0]) if verify else None
        self._bounded = expected_size is not None
        self.size: int | None = (
            expected_size if expected_size is not None else declared_length(response.headers)
        )
        self._pos = 0
        self._resumes = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._done or self.closed:
            return 0
        view = memoryview(buffer).cast("B")
        if len(view) == 0:
            return 0
        chunk = self._take(len(view))
        view[: len(chunk)] = chunk
        return len(chunk)

    def read(self, size: int | None = -1) -> bytes:
        """Like RawIOBase.read, without copying each chunk through a buffer."""
        if size is None or size < 0:
            return self.readall()
        if self._done or self.closed or size == 0:
            return b""
        return self._take(size)

    def _take(self, amount: int) -> bytes:
        """The next at most ``amount`` bytes, hashed and counted; b"" (checked) at EOF."""
        if self._bounded:
            assert self.size is not None
            # Never ask for more than the rest of the declared size and one byte beyond.
            amount = min(amount, self.size - self._pos + 1)
        chunk = self._read_some(amount)
        if not chunk:
            self._finish()
            return b""
        if self._bounded and self._pos + len(chunk) > (self.size or 0):
            self._release()  # closes the connection: the rest of the body is never read
            self._done = True
            raise too_large(self._target, f"blob {self._digest}", self.size or 0)
        if self._hasher is not None:
            self._hasher.update(chunk)
        self._pos += len(chunk)
        return chunk

    def _read_some(self, amount: int) -> bytes:
        for _ in range(self._session.transport.retries + 2):
            assert self._response is not None
            try:
                return self._response.read(amount)
            except (urllib3.exceptions.HTTPError, OSError) as e:
                self._resume(e)
        raise RegistryError(f"{self._target.label}: blob {self._digest}: too many resumes")

    def _resume(self, error: BaseException) -> None:
        """Re-request the rest of the blob from where the dropped connection left off."""
        assert self._response is not None
        self._response.close()
        self._response.release_conn()
        if self._resumes >= self._session.transport.retries:
            raise RegistryError(
                f"{self._target.label}: blob {self._digest}: connection lost after "
                f"{self._pos} bytes ({one_line(str(error), 120)})",
                transient=True,
            ) from None
        transport = self._session.transport
        transport.wait(self._target.host,
                       f"dropped the connection after {self._pos} bytes of blob "
                       f"{self._digest[:19]} ({short_reason(error)})",
                       transport.delay(self._resumes, None), self._resumes + 1)
        self._resumes += 1
        response = self._session.request(
            "GET",
            self._target,
            f"/v2/{self._target.repository}/blobs/{self._digest}",
            headers={"Range": f"bytes={self._pos}-"},
            read_body=False,
        )
        if response.status == 206:
            self._response = response.raw
            return
        if response.status == 200:
            self._response = response.raw
            # The registry ignored Range: skip what we already have, in bounded reads.
            remaining = self._pos
            while remaining > 0:
                skipped = response.raw.read(min(remaining, 1 << 20))
                if not skipped:
                    break
                remaining -= len(skipped)
            return
        self._response = None
        raise self._session.error(response, self._target, f"blob {self._digest}")

    def _finish(self) -> None:
        self._done = True
        self._release()
        if self.size is not None and self._pos != self.size:
            raise DigestMismatchError(
                f"{self._target.label}: blob {self._digest}: short read, "
                f"got {self._pos} of {self.size} bytes"
            )
        if self._hasher is None:
            return
        actual = f"{self._digest.split(':', 1)[0]}:{self._hasher.hexdigest()}"
        if actual != self._digest:
            raise DigestMismatchError(
                f"{self._target.label}: blob {self._digest}: content has digest {actual}"
            )

    def _release(self) -> None:
        if self._response is not None:
            if not self._done:
                self._response.close()
            self._response.release_conn()
            self._response = None

    def close(self) -> None:
        if not self.closed:
            self._release()
        super().close()


def blob_exists(session: Session, target: Target, digest: str, push: bool) -> bool:
    """Whether the target's repository has the blob (HEAD)."""
    resp = session.request("HEAD", target, f"/v2/{target.repository}/blobs/{digest}", push=push)
    if resp.status == 200:
        return True
    if resp.status == 404:
        return False
    raise session.error(resp, target, f"blob {digest}")


def get_blob(session: Session, target: Target, digest: str, size: int) -> bytes:
    """The whole blob, at most ``size`` bytes read, checked against ``digest`` and ``size``."""
    resp = session.request("GET", target, f"/v2/{target.repository}/blobs/{digest}",
                         limit=size)
    if resp.status != 200:
        raise session.error(resp, target, f"blob {digest}")
    if resp.oversize:
        raise too_large(target, f"blob {digest}", size)
    data = resp.data
    if len(data) != size:
        raise DigestMismatchError(
            f"{target.label}: blob {digest}: short read, got {len(data)} of {size} bytes"
        )
    actual = digest_of(data, digest.split(":", 1)[0])
    if actual != digest:
        raise DigestMismatchError(
            f"{target.label}: blob {digest}: content has digest {actual}"
        )
    return data


def open_blob(
    session: Session, target: Target, digest: str, size: int | None, verify: bool
) -> BlobReader:
    """The blob as a :class:`BlobReader`, refused at once if its Content-Length says it is
    larger than ``size`` (see :meth:`RegistryClient.open_blob`)."""
    path = f"/v2/{target.repository}/blobs/{digest}"
    resp = session.request("GET", target, path, read_body=False)
    if resp.status != 200:
        raise session.error(resp, target, f"blob {digest}")
    declared = declared_length(resp.headers)
    if size is not None and declared is not None and declared > size:
        resp.raw.close()
        resp.raw.release_conn()
        raise too_large(target, f"blob {digest}", size)
    return BlobReader(session, target, digest, resp, verify, size)


def get_blob_range(
    session: Session, target: Target, digest: str, start: int, end: int
) -> bytes:
    """Bytes ``[start, end)`` of the blob (see :meth:`RegistryClient.get_blob_range`)."""
    path = f"/v2/{target.repository}/blobs/{digest}"
    resp = session.request(
        "GET",
        target,
        path,
        headers={"Range": f"bytes={start}-{end - 1}"},
        limit=end - start,
        range_start=start,
    )
    what = f"blob {digest}"
    if resp.status == 206:
        if resp.oversize:
            raise RegistryError(
                f"{target.label}: {what}: range [{start}, {end}) answered with more than "
                f"{end - start} bytes"
            )
        first = resp.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
        if first.strip().isdigit() and int(first) != start:
            raise RegistryError(
                f"{target.label}: {what}: range [{start}, {end}) answered from offset "
                f"{int(first)}"
            )
        data = resp.data
        if len(data) != end - start:
            total = resp.headers.get("Content-Range", "").rpartition("/")[2]
            if not (total.isdigit() and start + len(data) == int(total) < end):
                raise RegistryError(
                    f"{target.label}: {what}: range [{start}, {end}) answered with "
                    f"{len(data)} bytes",
                    transient=True,
                )
        return data
    if resp.status == 200:
        # The registry ignored Range: the request read only [start, end) of the body.
        return resp.data
    if resp.status == 416:
        raise RegistryError(
            f"{target.label}: {what}: range [{start}, {end}) is past the end of the blob",
            status=416,
        )
    raise session.error(resp, target, what)
