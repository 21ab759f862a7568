"""Blob uploads: one PUT for small blobs, PATCH chunks for large ones, hashed on the way
and restarted from the beginning after a transient failure when the data can be re-read."""

from __future__ import annotations

import contextlib
import hashlib
import io
import time
import urllib.parse
from typing import BinaryIO

from soci.errors import DigestMismatchError, RegistryError
from soci.registry.blobs import blob_exists
from soci.registry.reference import Reference, validate_digest
from soci.registry.session import Session, digest_of
from soci.registry.transport import Target, one_line

#: Uploads up to this size go in one PUT; larger ones are sent in PATCH chunks this big.
DEFAULT_CHUNK_SIZE = 8 << 20


def push_blob(
    session: Session,
    ref: Reference,
    digest: str,
    data: bytes | bytearray | memoryview | BinaryIO,
    size: int | None = None,
) -> bool:
    """Upload a blob unless the repository has it; whether it uploaded. A transient
    failure restarts the upload when the data can be re-read (see
    :meth:`RegistryClient.push_blob`)."""
    validate_digest(digest)
    target = session.push_target(ref)
    if blob_exists(session, target, digest, push=True):
        return False
    if isinstance(data, bytes | bytearray | memoryview):
        body = bytes(data)
        if size is not None and size != len(body):
            raise ValueError(f"size {size} does not match the {len(body)} bytes given")
        actual = digest_of(body, digest.split(":", 1)[0])
        if actual != digest:
            raise DigestMismatchError(f"{ref}: blob to push has digest {actual}, not {digest}")
        stream: BinaryIO = io.BytesIO(body)
    else:
        stream = data
    try:
        origin: int | None = stream.tell() if stream.seekable() else None
    except OSError:
        origin = None
    deadline = time.monotonic() + session.transport.max_retry_time
    for attempt in range(session.transport.retries + 1):
        try:
            _upload(session, target, digest, stream, size)
            return True
        except RegistryError as e:
            if (
                not e.transient
                or origin is None
                or attempt >= session.transport.retries
                or time.monotonic() > deadline
            ):
                raise
            session.transport.wait(target.host,
                                   f"failed to take blob {digest[:19]} ({one_line(str(e), 100)})",
                                   session.transport.delay(attempt, None), attempt + 1)
            stream.seek(origin)
    raise AssertionError("unreachable")  # pragma: no cover


def _upload(
    session: Session, target: Target, digest: str, stream: BinaryIO, size: int | None
) -> None:
    """One attempt: POST, then one PUT or PATCH chunks and a closing PUT, hashing as sent."""
    what = f"blob {digest} upload"
    resp = session.request(
        "POST", target, f"/v2/{target.repository}/blobs/uploads/", push=True
    )
    if resp.status != 202:
        raise session.error(resp, target, what)
    location = session.location(resp, target, what)
    try:
        _send(session, target, digest, stream, size, location, what)
    except (RegistryError, DigestMismatchError):
        raise
    except BaseException:
        # Interrupted (Ctrl-C, a cancelled push) or the data source failed half way: drop
        # the upload session rather than leave it to expire on the registry.
        _cancel_upload(session, target, location)
        raise


def _send(session: Session, target: Target, digest: str, stream: BinaryIO, size: int | None,
          location: str, what: str) -> None:
    hasher = hashlib.new(digest.split(":", 1)[0])
    first = stream.read(session.chunk_size)
    hasher.update(first)
    following = stream.read(session.chunk_size) if len(first) == session.chunk_size else b""
    offset = len(first)
    if following:
        # Chunked: PATCH each chunk, following the Location each answer gives.
        chunk = first
        offset = 0
        max_chunks = (size // session.chunk_size + 2) if size is not None else 1 << 20
        for _ in range(max_chunks):
            if not chunk:
                break
            resp = session.request(
                "PATCH",
                target,
                location,
                push=True,
                idempotent=False,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                },
                body=chunk,
            )
            if resp.status != 202:
                raise session.error(resp, target, what)
            location = session.location(resp, target, what)
            offset += len(chunk)
            chunk, following = following, b""
            if not chunk:
                chunk = stream.read(session.chunk_size)
            hasher.update(chunk)
        final_body = b""
    else:
        final_body = first
    actual = f"{digest.split(':', 1)[0]}:{hasher.hexdigest()}"
    problem = None
    if size is not None and offset != size:
        problem = f"stream gave {offset} bytes, expected {size}"
    elif actual != digest:
        problem = f"content has digest {actual}"
    if problem:
        _cancel_upload(session, target, location)
        raise DigestMismatchError(f"{target.label}: {what}: {problem}")
    resp = session.request(
        "PUT",
        target,
        _with_query(location, "digest", digest),
        push=True,
        idempotent=False,
        headers={"Content-Type": "application/octet-stream"},
        body=final_body,
    )
    if resp.status not in (201, 204):
        raise session.error(resp, target, what)


def _cancel_upload(session: Session, target: Target, location: str) -> None:
    """Best effort: tell the registry to drop an upload we will not finish."""
    with contextlib.suppress(RegistryError):
        session.request("DELETE", target, location, push=True, idempotent=False)


def _with_query(url: str, key: str, value: str) -> str:
    """``url`` with ``key=value`` added to its query, whether or not it already has one."""
    parts = urllib.parse.urlsplit(url)
    query = parts.query + ("&" if parts.query else "") + urllib.parse.urlencode({key: value})
    return urllib.parse.urlunsplit(parts._replace(query=query))
