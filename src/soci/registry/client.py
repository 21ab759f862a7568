"""A small OCI distribution (registry v2 API) client built on urllib3.

What it is for: fetching manifests and blobs (whole, ranged or streamed) with their
digests checked, pushing blobs and manifests, listing tags, and reading/writing OCI
referrers, against registries configured the way podman configures them.

Behaviour worth knowing:

* **Verification.** Every manifest and blob fetched whole is hashed and compared with
  the digest asked for (or ``Docker-Content-Digest``); streamed blobs are checked at EOF.
  A mismatch raises :class:`~soci.errors.DigestMismatchError` and is never retried: a
  registry serving wrong bytes is not a transient fault. Ranged reads cannot be checked
  against the blob digest (callers check span digests).
* **Bounded reads.** No body is read further than the caller honestly expects: a blob's
  descriptor size (``get_blob`` requires it, ``open_blob`` and ``get_manifest`` take it),
  4 MiB for manifests and referrers pages, 1 MiB for tokens, 64 KiB for error messages,
  the range itself for a ranged read (also when the registry ignores Range and answers
  ``200``: the bytes before it are skipped, those after it never read). A body found
  too large (or declaring so in Content-Length) is refused in one line, its connection
  closed.
* **Authentication.** On a 401 the ``WWW-Authenticate`` challenge is parsed and
  remembered per host, so later requests authenticate up front. Bearer tokens are fetched
  from the realm with ``repository:<name>:pull`` (reads) or ``pull,push`` (writes) scopes,
  cached per (host, scope) until ``expires_in`` and fetched again on a later 401.
* **Retries.** Connection errors, timeouts, 429 (honouring ``Retry-After``, capped) and
  5xx other than 501/505 are retried with exponential backoff for idempotent requests,
  bounded by ``retries`` and a total time budget. Uploads restart from the beginning when
  a step fails transiently (if the data can be re-read). Streams resume with a Range
  request after a dropped connection.
* **Scheme.** HTTPS with certificate verification, unless ``plain_http=True`` (always
  plain HTTP) or the host's registries.conf entry says ``insecure = true``: then, as
  containers/image does, HTTPS without verification is tried once and the client falls
  back to plain HTTP if that fails; the choice is remembered per host. ``Authorization``
  never follows a redirect (or an upload Location) to another host, nor from HTTPS down
  to plain HTTP.
* **Errors.** Everything a user can cause ends in a one-line :class:`~soci.errors.SociError`
  subclass naming the reference, the HTTP status and the registry's error code, never a
  credential.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import urllib3

from soci import __version__
from soci.errors import (
    AuthError,
    DigestMismatchError,
    InvalidReferenceError,
    NotFoundError,
    RegistryError,
)
from soci.oci.descriptor import Descriptor
from soci.oci.mediatypes import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from soci.registry.auth import CredentialInput, Credentials, CredentialStore
from soci.registry.config import Endpoint, RegistriesConf
from soci.registry.reference import Reference, api_host_of, validate_digest

#: The manifest types we understand, in the Accept header of every manifest request.
DEFAULT_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))
DEFAULT_USER_AGENT = f"soci-py/{__version__}"
#: Uploads up to this size go in one PUT; larger ones are sent in PATCH chunks this big.
DEFAULT_CHUNK_SIZE = 8 << 20
#: The largest manifest accepted: 4 MiB, the limit of the distribution registry and of
#: containers/image (``iolimits.MaxManifestBodySize``). Referrers listings (image indexes)
#: are held to it too.
MAX_MANIFEST_SIZE = 4 << 20

_MAX_REDIRECTS = 5
#: How much of an answer whose body is only read for its message (errors, upload replies).
_MAX_ERROR_BODY = 64 << 10
#: A bearer-token answer (containers/image: ``iolimits.MaxAuthTokenBodySize``, 1 MiB).
_MAX_TOKEN_BODY = 1 << 20
#: One page of a tag list (a registry without pagination sends all tags at once).
_MAX_TAG_PAGE = 16 << 20
#: Unread body left on a connection that is still worth draining to reuse it; past this
#: the connection is closed instead.
_MAX_DRAIN = 64 << 10
#: Read size when skipping or draining a body (bounds the memory of a skip).
_SKIP_CHUNK = 1 << 20
_MAX_PAGES = 10_000
_MAX_RETRY_AFTER = 30.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: 5xx answers that say "never": retrying them only wastes time.
_PERMANENT_5XX = frozenset({501, 505})
#: Answers meaning "this registry has no referrers API" (see the OCI distribution spec).
_NO_REFERRERS_API = frozenset({400, 404, 405, 406, 501})
_T = TypeVar("_T")


@dataclass(frozen=True)
class Manifest:
    """A manifest's exact bytes with its media type and (verified) digest."""

    data: bytes
    media_type: str
    digest: str

    def json(self) -> Any:
        """The parsed document."""
        return json.loads(self.data)

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class PushedManifest:
    """The result of :meth:`RegistryClient.push_manifest`.

    ``oci_subject`` is the registry's ``OCI-Subject`` header: when set, the registry
    indexed the manifest's subject itself and no referrers tag needs updating.
    """

    digest: str
    oci_subject: str | None = None


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: scheme (lower case) and its parameters."""

    scheme: str
    params: Mapping[str, str]


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Split a ``WWW-Authenticate`` value into challenges (RFC 7235 syntax).

    Handles quoted strings with escapes and several challenges in one header; anything
    unparseable ends the scan rather than raising, since the caller reports "no usable
    challenge" anyway.
    """
    challenges: list[Challenge] = []
    i, n = 0, len(header)
    scheme: str | None = None
    params: dict[str, str] = {}

    def skip(chars: str) -> None:
        nonlocal i
        while i < n and header[i] in chars:
            i += 1

    def token() -> str:
        nonlocal i
        start = i
        while i < n and header[i] not in ' \t,="':
            i += 1
        return header[start:i]

    while i < n:
        skip(" \t,")
        word = token()
        if not word:
            break
        skip(" \t")
        if i < n and header[i] == "=" and scheme is not None:
            i += 1
            skip(" \t")
            if i < n and header[i] == '"':
                i += 1
                value: list[str] = []
                while i < n and header[i] != '"':
                    if header[i] == "\\" and i + 1 < n:
                        i += 1
                    value.append(header[i])
                    i += 1
                i += 1
                params[word.lower()] = "".join(value)
            else:
                params[word.lower()] = token()
        else:
            if scheme is not None:
                challenges.append(Challenge(scheme, params))
            scheme, params = word.lower(), {}
    if scheme is not None:
        challenges.append(Challenge(scheme, params))
    return challenges


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    """``algorithm:hex`` of ``data``."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def referrers_tag(subject_digest: str) -> str:
    """The tag of the referrers tag schema: ``<alg>-<hex>`` (at most 128 characters)."""
    validate_digest(subject_digest)
    return subject_digest.replace(":", "-", 1)[:128]


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(status: int, body: bytes) -> tuple[str, str | None]:
    """``HTTP 404 MANIFEST_UNKNOWN: manifest unknown`` and the code, from an error answer."""
    code: str | None = None
    detail = ""
    try:
        errors = json.loads(body).get("errors") or []
        first = errors[0]
        code = str(first.get("code") or "") or None
        detail = str(first.get("message") or "")
    except (ValueError, AttributeError, IndexError, TypeError):
        pass
    text = f"HTTP {status}"
    if code:
        text += f" {code}"
    if detail:
        text += f": {detail}"
    return _one_line(text), code


class _Response:
    """A registry answer: status and headers, the body once read, the raw stream if not.

    Kept separate from urllib3's response so that how much of a body is read (and whether
    the connection can go back to the pool) is decided in one place.
    """

    def __init__(self, raw: urllib3.BaseHTTPResponse, body: bytes | None = None) -> None:
        self.raw = raw
        self.status = raw.status
        self.headers = raw.headers
        self.body = body
        #: The body was larger than the reader's limit (it was not read: ``body`` is empty).
        self.oversize = False

    @property
    def data(self) -> bytes:
        """The body; for an unread (streaming) response, at most 64 KiB of it (errors)."""
        if self.body is None:
            try:
                self.body = self.raw.read(_MAX_ERROR_BODY)
            except (urllib3.exceptions.HTTPError, OSError):
                self.body = b""
            self.discard()
        return self.body

    def discard(self) -> None:
        """Give the connection back: drained if the rest is small, else closed.

        Not urllib3's ``drain_conn``: that reads the whole rest into memory, however
        large a body the server chose to send.
        """
        _drain_or_close(self.raw)


def _drain_or_close(raw: urllib3.BaseHTTPResponse) -> None:
    """Read off at most ``_MAX_DRAIN`` bytes so the connection can be reused, else close it."""
    try:
        left = _MAX_DRAIN
        while left > 0:
            chunk = raw.read(min(left, 16 << 10))
            if not chunk:
                break
            left -= len(chunk)
        else:
            raw.close()
    except (urllib3.exceptions.HTTPError, OSError):
        raw.close()
    raw.release_conn()


def _declared_length(headers: Mapping[str, str]) -> int | None:
    length = headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def _read_bounded(resp: _Response, limit: int) -> None:
    """Read the body into ``resp.body``, at most ``limit`` bytes of it.

    A body that says (Content-Length) or turns out to be larger is not kept: the
    connection is closed (nothing more is read) and ``resp.oversize`` is set, for the
    caller to refuse with its own words.
    """
    raw = resp.raw
    data = bytearray()
    declared = _declared_length(resp.headers)
    if declared is not None and declared > limit:
        resp.oversize = True
    else:
        # Until EOF (a body cut short then raises, for the retry loop) or one byte too many.
        while len(data) <= limit:
            chunk = raw.read(min(limit + 1 - len(data), _SKIP_CHUNK))
            if not chunk:
                break
            data += chunk
        if len(data) > limit:
            data = bytearray()
            resp.oversize = True
    if resp.oversize:
        raw.close()
    raw.release_conn()
    resp.body = bytes(data)


def _read_slice(resp: _Response, skip: int, amount: int) -> None:
    """Read bytes ``[skip, skip + amount)`` of the body into ``resp.body``, in bounded
    reads, then close the connection rather than read (or buffer) the rest."""
    raw = resp.raw
    while skip > 0:
        skipped = raw.read(min(skip, _SKIP_CHUNK))
        if not skipped:
            break
        skip -= len(skipped)
    parts: list[bytes] = []
    while amount > 0 and skip == 0:
        part = raw.read(min(amount, _SKIP_CHUNK))
        if not part:
            break
        parts.append(part)
        amount -= len(part)
    raw.close()
    raw.release_conn()
    resp.body = b"".join(parts)


@dataclass(frozen=True)
class _Target:
    """A reference bound to the endpoint (primary or mirror) serving it."""

    ref: Reference
    endpoint: Endpoint

    @property
    def host(self) -> str:
        return api_host_of(self.endpoint.registry)

    @property
    def repository(self) -> str:
        return self.endpoint.repository

    @property
    def label(self) -> str:
        """How errors name what was asked for."""
        if self.endpoint.name == self.ref.name:
            return str(self.ref)
        return f"{self.ref} (via {self.endpoint.name})"


class BlobReader(io.RawIOBase):
    """A blob's body as a stream, hashed as it is read.

    At EOF the digest and the length are checked (``DigestMismatchError``); a connection
    dropped mid-body is resumed with a Range request, up to the client's retry count.
    With ``expected_size`` (the descriptor's size) no more than that many bytes (and one
    to notice) are ever read: a longer body fails as soon as it shows.
    """

    def __init__(
        self,
        client: RegistryClient,
        target: _Target,
        digest: str,
        response: _Response,
        verify: bool = True,
        expected_size: int | None = None,
    ) -> None:
        super().__init__()
        self._client = client
        self._target = target
        self._digest = digest
        self._response: urllib3.BaseHTTPResponse | None = response.raw
        # verify=False: the caller hashes the bytes itself (the zTOC builder does).
        self._hasher = hashlib.new(digest.split(":", 1)[0]) if verify else None
        self._bounded = expected_size is not None
        self.size: int | None = (
            expected_size if expected_size is not None else _declared_length(response.headers)
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
            raise _too_large(self._target, f"blob {self._digest}", self.size or 0)
        if self._hasher is not None:
            self._hasher.update(chunk)
        self._pos += len(chunk)
        return chunk

    def _read_some(self, amount: int) -> bytes:
        for _ in range(self._client.retries + 2):
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
        if self._resumes >= self._client.retries:
            raise RegistryError(
                f"{self._target.label}: blob {self._digest}: connection lost after "
                f"{self._pos} bytes ({_one_line(str(error), 120)})",
                transient=True,
            ) from None
        self._client._sleep(self._client._delay(self._resumes, None))
        self._resumes += 1
        response = self._client._request(
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
        raise self._client._error(response, self._target, f"blob {self._digest}")

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


def _too_large(target: _Target, what: str, size: int) -> DigestMismatchError:
    return DigestMismatchError(
        f"{target.label}: {what} is larger than its descriptor says ({size} bytes)"
    )


class RegistryClient:
    """Talks the OCI distribution API to registries; thread-safe, pools connections.

    Use as a context manager (or call :meth:`close`) to drop pooled connections.
    """

    def __init__(
        self,
        *,
        plain_http: bool = False,
        registries_conf: RegistriesConf | str | os.PathLike[str] | None = None,
        credentials: CredentialStore | Mapping[str, CredentialInput] | None = None,
        retries: int = 5,
        backoff: float = 0.2,
        timeout: float = 30.0,
        user_agent: str = DEFAULT_USER_AGENT,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_backoff: float = 10.0,
        max_retry_time: float = 120.0,
    ) -> None:
        """
        ``registries_conf``: a parsed :class:`RegistriesConf`, a path to read, or ``None``
        to read the default file on first use. ``credentials``: a :class:`CredentialStore`,
        or a mapping of registry host to credentials consulted before the auth files.
        ``retries`` bounds attempts after the first, ``backoff`` is the first delay
        (doubling, capped at ``max_backoff``) and ``max_retry_time`` bounds the total time
        one request spends retrying.
        """
        if retries < 0 or backoff < 0 or timeout <= 0 or chunk_size <= 0:
            raise ValueError("retries and backoff must be >= 0, timeout and chunk_size > 0")
        self.plain_http = plain_http
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_time = max_retry_time
        self.chunk_size = chunk_size
        self.user_agent = user_agent
        self._conf_source = registries_conf
        self._conf: RegistriesConf | None = (
            registries_conf if isinstance(registries_conf, RegistriesConf) else None
        )
        if isinstance(credentials, CredentialStore):
            self._credentials = credentials
        else:
            self._credentials = CredentialStore(credentials)
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)
        self._pool = urllib3.PoolManager(num_pools=16, maxsize=8)
        self._insecure_pool: urllib3.PoolManager | None = None
        self._lock = threading.Lock()
        self._schemes: dict[str, str] = {}
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._no_referrers_api: set[tuple[str, str]] = set()
        self._sleep: Callable[[float], None] = time.sleep
        #: How many bearer tokens were fetched (for tests and diagnostics).
        self.token_requests = 0

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close pooled connections; the client stays usable (it reconnects)."""
        self._pool.clear()
        if self._insecure_pool is not None:
            self._insecure_pool.clear()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def registries_conf(self) -> RegistriesConf:
        """The registries.conf in force (read on first use when not given)."""
        with self._lock:
            if self._conf is None:
                source = self._conf_source
                if not isinstance(source, str | os.PathLike):
                    source = None
                self._conf = RegistriesConf.load(source)
            return self._conf

    # -- manifests -----------------------------------------------------------------------

    def get_manifest(
        self, ref: Reference, accept: str = DEFAULT_ACCEPT, *, size: int | None = None
    ) -> Manifest:
        """Fetch the manifest ``ref`` names (its digest if it has one, else its tag).

        The bytes are checked against the reference's digest, else against the
        registry's ``Docker-Content-Digest``. At most ``MAX_MANIFEST_SIZE`` bytes are
        read, and at most ``size`` (the descriptor's size, when the caller has one).
        """
        return self._on_endpoints(ref, lambda t: self._get_manifest(t, accept, size))

    def _get_manifest(self, target: _Target, accept: str, size: int | None = None) -> Manifest:
        ref = target.ref
        path = f"/v2/{target.repository}/manifests/{ref.identifier}"
        limit = MAX_MANIFEST_SIZE if size is None else min(size, MAX_MANIFEST_SIZE)
        resp = self._request("GET", target, path, headers={"Accept": accept}, limit=limit)
        if resp.status != 200:
            raise self._error(resp, target, "manifest")
        if resp.oversize:
            if size is not None and size <= MAX_MANIFEST_SIZE:
                raise _too_large(target, f"manifest {ref.identifier}", size)
            raise RegistryError(f"{target.label}: manifest larger than {MAX_MANIFEST_SIZE} bytes")
        data = resp.data
        if size is not None and len(data) != size:
            raise DigestMismatchError(
                f"{target.label}: manifest {ref.identifier}: got {len(data)} bytes, "
                f"its descriptor says {size}"
            )
        computed = digest_of(data)
        expected = ref.digest or resp.headers.get("Docker-Content-Digest")
        if expected:
            try:
                validate_digest(expected)
            except InvalidReferenceError:
                expected = None  # an unknown algorithm we cannot check; sha256 is kept
        if expected:
            algorithm = expected.split(":", 1)[0]
            actual = computed if algorithm == "sha256" else digest_of(data, algorithm)
            if actual != expected:
                raise DigestMismatchError(
                    f"{target.label}: manifest content has digest {actual}, expected {expected}"
                )
        media_type = _media_type_of(resp.headers.get("Content-Type"), data)
        return Manifest(data, media_type, ref.digest or computed)

    def head_manifest(self, ref: Reference) -> Descriptor | None:
        """The manifest's descriptor without its body, or ``None`` if it does not exist.

        Falls back to a GET when the registry leaves out the digest or the size.
        """
        return self._on_endpoints(ref, self._head_manifest)

    def _head_manifest(self, target: _Target) -> Descriptor | None:
        path = f"/v2/{target.repository}/manifests/{target.ref.identifier}"
        resp = self._request("HEAD", target, path, headers={"Accept": DEFAULT_ACCEPT})
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise self._error(resp, target, "manifest")
        digest = target.ref.digest or resp.headers.get("Docker-Content-Digest")
        length = resp.headers.get("Content-Length", "")
        media_type = resp.headers.get("Content-Type", "")
        if not digest or not length.isdigit() or not media_type or media_type == "application/json":
            try:
                manifest = self._get_manifest(target, DEFAULT_ACCEPT)
            except NotFoundError:
                return None
            return Descriptor(manifest.media_type, manifest.digest, manifest.size)
        return Descriptor(media_type.split(";", 1)[0].strip(), digest, int(length))

    def put_manifest(self, ref: Reference, data: bytes, media_type: str) -> str:
        """Push a manifest under the reference's tag (or its digest); return its digest."""
        return self.push_manifest(ref, data, media_type).digest

    def push_manifest(self, ref: Reference, data: bytes, media_type: str) -> PushedManifest:
        """Like :meth:`put_manifest`, also telling whether the registry sent ``OCI-Subject``
        (then it handles referrers itself and :meth:`add_referrer` is not needed)."""
        target = self._push_target(ref)
        computed = digest_of(data)
        if ref.digest is not None:
            algorithm = ref.digest.split(":", 1)[0]
            actual = computed if algorithm == "sha256" else digest_of(data, algorithm)
            if actual != ref.digest:
                raise DigestMismatchError(
                    f"{ref}: manifest to push has digest {actual}, not the reference's digest"
                )
        identifier = ref.tag if ref.tag is not None else (ref.digest or computed)
        path = f"/v2/{target.repository}/manifests/{identifier}"
        resp = self._request(
            "PUT", target, path, push=True, headers={"Content-Type": media_type}, body=data
        )
        if resp.status not in (200, 201, 202):
            raise self._error(resp, target, "manifest push")
        returned = resp.headers.get("Docker-Content-Digest")
        if returned and returned.startswith("sha256:") and returned != computed:
            raise DigestMismatchError(
                f"{target.label}: registry stored the manifest as {returned}, expected {computed}"
            )
        return PushedManifest(ref.digest or computed, resp.headers.get("OCI-Subject") or None)

    def list_tags(self, ref: Reference, page_size: int | None = None) -> list[str]:
        """All tags of the reference's repository, following ``Link`` pagination
        (``page_size`` asks the registry for pages of that many tags)."""
        return self._on_endpoints(ref, lambda t: self._list_tags(t, page_size))

    def _list_tags(self, target: _Target, page_size: int | None) -> list[str]:
        tags: list[str] = []
        path = f"/v2/{target.repository}/tags/list"
        if page_size is not None:
            path += f"?n={int(page_size)}"
        for page in self._pages(target, path, "tag list", limit=_MAX_TAG_PAGE):
            page_tags = page.get("tags") or []
            if not isinstance(page_tags, list):
                raise RegistryError(f"{target.label}: tag list is not a list")
            tags.extend(str(t) for t in page_tags)
        return tags

    # -- blobs ---------------------------------------------------------------------------

    def blob_exists(self, ref: Reference, digest: str) -> bool:
        """Whether the repository has the blob (HEAD)."""
        validate_digest(digest)
        return self._on_endpoints(ref, lambda t: self._blob_exists(t, digest, push=False))

    def _blob_exists(self, target: _Target, digest: str, push: bool) -> bool:
        resp = self._request("HEAD", target, f"/v2/{target.repository}/blobs/{digest}", push=push)
        if resp.status == 200:
            return True
        if resp.status == 404:
            return False
        raise self._error(resp, target, f"blob {digest}")

    def get_blob(self, ref: Reference, digest: str, *, size: int) -> bytes:
        """The whole blob, checked against ``digest`` and ``size`` (its descriptor's).

        The size is required: a blob read into memory is bounded by what its descriptor
        declares, so a registry sending more costs ``size + 1`` bytes, not the lot. (For
        blobs of unknown size, stream them with :meth:`open_blob`.)
        """
        validate_digest(digest)
        if size < 0:
            raise ValueError(f"invalid blob size {size}")
        return self._on_endpoints(ref, lambda t: self._get_blob(t, digest, size))

    def _get_blob(self, target: _Target, digest: str, size: int) -> bytes:
        resp = self._request("GET", target, f"/v2/{target.repository}/blobs/{digest}",
                             limit=size)
        if resp.status != 200:
            raise self._error(resp, target, f"blob {digest}")
        if resp.oversize:
            raise _too_large(target, f"blob {digest}", size)
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
        self, ref: Reference, digest: str, *, size: int | None = None, verify: bool = True
    ) -> BlobReader:
        """The blob as a stream (``read(n)``, ``close()``, context manager); the digest
        and length are checked when EOF is read (the digest only with ``verify``: pass
        False only when the consumer hashes every byte itself before using any).

        ``size`` is the descriptor's size: pass it whenever there is one. The stream then
        ends in ``DigestMismatchError`` as soon as the body proves longer (or says so in
        its Content-Length), instead of streaming whatever the registry sends."""
        validate_digest(digest)
        if size is not None and size < 0:
            raise ValueError(f"invalid blob size {size}")

        def open_on(target: _Target) -> BlobReader:
            path = f"/v2/{target.repository}/blobs/{digest}"
            resp = self._request("GET", target, path, read_body=False)
            if resp.status != 200:
                raise self._error(resp, target, f"blob {digest}")
            declared = _declared_length(resp.headers)
            if size is not None and declared is not None and declared > size:
                resp.raw.close()
                resp.raw.release_conn()
                raise _too_large(target, f"blob {digest}", size)
            return BlobReader(self, target, digest, resp, verify, size)

        return self._on_endpoints(ref, open_on)

    def get_blob_range(self, ref: Reference, digest: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a blob (fewer only if the blob ends before ``end``).

        A registry that ignores Range and sends the whole blob (``200``) is tolerated:
        the first ``start`` bytes are skipped in bounded reads, the ``end - start`` wanted
        are kept and the connection is closed on the rest, so memory stays bounded by the
        range whatever the blob's size. Like any ranged read, the bytes are not checked
        against the blob digest (callers check their span digests).
        """
        validate_digest(digest)
        if not 0 <= start <= end:
            raise ValueError(f"invalid byte range [{start}, {end})")
        if start == end:
            return b""
        return self._on_endpoints(ref, lambda t: self._get_blob_range(t, digest, start, end))

    def _get_blob_range(self, target: _Target, digest: str, start: int, end: int) -> bytes:
        path = f"/v2/{target.repository}/blobs/{digest}"
        resp = self._request(
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
        raise self._error(resp, target, what)

    def push_blob(
        self,
        ref: Reference,
        digest: str,
        data: bytes | bytearray | memoryview | BinaryIO,
        size: int | None = None,
    ) -> bool:
        """Upload a blob unless the repository already has it; return whether it uploaded.

        Data up to ``chunk_size`` goes in one PUT, more in PATCH chunks. The content is
        hashed on the way and a mismatch with ``digest`` aborts the upload. A transient
        failure restarts the whole upload, if the data can be re-read (bytes, or a
        seekable stream).
        """
        validate_digest(digest)
        target = self._push_target(ref)
        if self._blob_exists(target, digest, push=True):
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
        deadline = time.monotonic() + self.max_retry_time
        for attempt in range(self.retries + 1):
            try:
                self._upload(target, digest, stream, size)
                return True
            except RegistryError as e:
                if (
                    not e.transient
                    or origin is None
                    or attempt >= self.retries
                    or time.monotonic() > deadline
                ):
                    raise
                self._sleep(self._delay(attempt, None))
                stream.seek(origin)
        raise AssertionError("unreachable")  # pragma: no cover

    def _upload(self, target: _Target, digest: str, stream: BinaryIO, size: int | None) -> None:
        what = f"blob {digest} upload"
        resp = self._request(
            "POST", target, f"/v2/{target.repository}/blobs/uploads/", push=True
        )
        if resp.status != 202:
            raise self._error(resp, target, what)
        location = self._location(resp, target, what)
        hasher = hashlib.new(digest.split(":", 1)[0])
        first = stream.read(self.chunk_size)
        hasher.update(first)
        following = stream.read(self.chunk_size) if len(first) == self.chunk_size else b""
        offset = len(first)
        if following:
            # Chunked: PATCH each chunk, following the Location each answer gives.
            chunk = first
            offset = 0
            max_chunks = (size // self.chunk_size + 2) if size is not None else 1 << 20
            for _ in range(max_chunks):
                if not chunk:
                    break
                resp = self._request(
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
                    raise self._error(resp, target, what)
                location = self._location(resp, target, what)
                offset += len(chunk)
                chunk, following = following, b""
                if not chunk:
                    chunk = stream.read(self.chunk_size)
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
            self._cancel_upload(target, location)
            raise DigestMismatchError(f"{target.label}: {what}: {problem}")
        resp = self._request(
            "PUT",
            target,
            _with_query(location, "digest", digest),
            push=True,
            idempotent=False,
            headers={"Content-Type": "application/octet-stream"},
            body=final_body,
        )
        if resp.status not in (201, 204):
            raise self._error(resp, target, what)

    def _cancel_upload(self, target: _Target, location: str) -> None:
        """Best effort: tell the registry to drop an upload we will not finish."""
        with contextlib.suppress(RegistryError):
            self._request("DELETE", target, location, push=True, idempotent=False)

    # -- referrers -----------------------------------------------------------------------

    def referrers(
        self, ref: Reference, subject_digest: str, artifact_type: str | None = None
    ) -> list[dict[str, Any]]:
        """Descriptors of the manifests whose ``subject`` is ``subject_digest``.

        Uses the referrers API when the registry has it, else the referrers tag schema
        (the index tagged ``sha256-<hex>``; no tag means no referrers).
        """
        validate_digest(subject_digest)
        target = self._read_target(ref)
        found = self._referrers_api(target, subject_digest, artifact_type)
        if found is None:
            found = self._referrers_from_tag(target, subject_digest)
        if artifact_type is not None:
            found = [d for d in found if d.get("artifactType") == artifact_type]
        return found

    def add_referrer(
        self, ref: Reference, subject_digest: str, descriptor: Mapping[str, Any]
    ) -> bool:
        """Record ``descriptor`` as a referrer of ``subject_digest`` in the referrers tag.

        Needed only when the registry has no referrers API (then it returns ``False``
        without writing anything). Read-modify-write: other referrers are kept and a
        digest already listed is not added twice. Concurrent writers can still race; the
        referrers tag schema has no way to prevent that.
        """
        validate_digest(subject_digest)
        for key in ("mediaType", "digest", "size"):
            if key not in descriptor:
                raise ValueError(f"referrer descriptor lacks {key!r}")
        validate_digest(str(descriptor["digest"]))
        target = self._push_target(ref)
        if self._referrers_api(target, subject_digest, None) is not None:
            return False
        tag_ref = ref.with_tag(referrers_tag(subject_digest))
        try:
            current = self._get_manifest(_Target(tag_ref, target.endpoint), OCI_INDEX)
            index = _parse_index(current.data, target, "referrers tag")
        except NotFoundError:
            index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        manifests = index.get("manifests") or []
        if any(isinstance(m, Mapping) and m.get("digest") == descriptor["digest"]
               for m in manifests):
            return False
        index["manifests"] = [*manifests, dict(descriptor)]
        index.setdefault("schemaVersion", 2)
        index.setdefault("mediaType", OCI_INDEX)
        data = json.dumps(index, separators=(",", ":")).encode()
        self.push_manifest(tag_ref, data, OCI_INDEX)
        return True

    def _referrers_api(
        self, target: _Target, subject_digest: str, artifact_type: str | None
    ) -> list[dict[str, Any]] | None:
        """Referrers from the API, or ``None`` when the registry does not have it."""
        key = (target.host, target.repository)
        with self._lock:
            if key in self._no_referrers_api:
                return None
        path = f"/v2/{target.repository}/referrers/{subject_digest}"
        if artifact_type is not None:
            path += "?" + urllib.parse.urlencode({"artifactType": artifact_type})
        found: list[dict[str, Any]] = []
        try:
            for page in self._pages(target, path, "referrers", accept=OCI_INDEX,
                                    limit=MAX_MANIFEST_SIZE):
                found.extend(_descriptors(page))
        except _NoReferrersApi:
            with self._lock:
                self._no_referrers_api.add(key)
            return None
        return found

    def _referrers_from_tag(self, target: _Target, subject_digest: str) -> list[dict[str, Any]]:
        tag_ref = target.ref.with_tag(referrers_tag(subject_digest))
        try:
            manifest = self._get_manifest(_Target(tag_ref, target.endpoint), OCI_INDEX)
        except NotFoundError:
            return []
        return _descriptors(_parse_index(manifest.data, target, "referrers tag"))

    # -- plumbing: endpoints -------------------------------------------------------------

    def _read_target(self, ref: Reference) -> _Target:
        return _Target(ref, self.registries_conf.endpoints(ref)[-1])

    def _push_target(self, ref: Reference) -> _Target:
        return _Target(ref, self.registries_conf.endpoints(ref, for_push=True)[-1])

    def _on_endpoints(self, ref: Reference, action: Callable[[_Target], _T]) -> _T:
        """Run ``action`` on each mirror in turn, then on the primary location; mirror
        failures fall through to the next endpoint."""
        endpoints = self.registries_conf.endpoints(ref)
        for endpoint in endpoints[:-1]:
            try:
                return action(_Target(ref, endpoint))
            except (RegistryError, NotFoundError, DigestMismatchError):
                continue
        return action(_Target(ref, endpoints[-1]))

    def _pages(
        self,
        target: _Target,
        path: str,
        what: str,
        *,
        limit: int,
        accept: str = "application/json",
    ) -> list[dict[str, Any]]:
        """GET a JSON listing and every page its ``Link: <...>; rel="next"`` headers name
        (each page at most ``limit`` bytes)."""
        pages: list[dict[str, Any]] = []
        seen: set[str] = set()
        url: str | None = path
        for _ in range(_MAX_PAGES):
            if url is None or url in seen:
                break
            seen.add(url)
            resp = self._request("GET", target, url, headers={"Accept": accept}, limit=limit)
            if what == "referrers" and resp.status in _NO_REFERRERS_API:
                raise _NoReferrersApi
            if resp.status != 200:
                raise self._error(resp, target, what)
            if resp.oversize:
                raise RegistryError(f"{target.label}: {what} page larger than {limit} bytes")
            try:
                page = json.loads(resp.data)
                if not isinstance(page, dict):
                    raise ValueError
            except ValueError:
                if what == "referrers":
                    raise _NoReferrersApi from None
                raise RegistryError(f"{target.label}: {what} is not a JSON object") from None
            if what == "referrers" and not isinstance(page.get("manifests", []), list):
                raise _NoReferrersApi
            pages.append(page)
            url = _next_link(resp.headers.get("Link"))
        return pages

    # -- plumbing: HTTP ------------------------------------------------------------------

    def _base_url(self, target: _Target) -> str:
        """``scheme://host`` for the target (see the module docstring on scheme choice)."""
        host = target.host
        if self.plain_http:
            return f"http://{host}"
        if not target.endpoint.insecure:
            return f"https://{host}"
        with self._lock:
            scheme = self._schemes.get(host)
        if scheme is None:
            scheme = "https"
            try:
                probe = self._pool_for(True).request(
                    "GET",
                    f"https://{host}/v2/",
                    headers={"User-Agent": self.user_agent},
                    retries=False,
                    redirect=False,
                    preload_content=False,
                    timeout=self._timeout,
                )
                _drain_or_close(probe)
            except (urllib3.exceptions.HTTPError, OSError):
                scheme = "http"
            with self._lock:
                self._schemes[host] = scheme
        return f"{scheme}://{host}"

    def _pool_for(self, insecure: bool) -> urllib3.PoolManager:
        if not insecure:
            return self._pool
        with self._lock:
            if self._insecure_pool is None:
                self._insecure_pool = urllib3.PoolManager(
                    num_pools=16, maxsize=8, cert_reqs="CERT_NONE", assert_hostname=False
                )
                urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            return self._insecure_pool

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        if retry_after is not None:
            try:
                return min(max(float(retry_after.strip()), 0.0), _MAX_RETRY_AFTER)
            except ValueError:
                pass  # an HTTP date: fall back to our own schedule
        delay: float = min(self.backoff * (2.0**attempt), self.max_backoff)
        return delay * (0.75 + random.random() / 4)

    def _request(
        self,
        method: str,
        target: _Target,
        path_or_url: str,
        *,
        push: bool = False,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        idempotent: bool = True,
        read_body: bool = True,
        limit: int = _MAX_ERROR_BODY,
        range_start: int | None = None,
    ) -> _Response:
        """Send one API request with authentication, redirects and retries.

        Returns the response for any status the caller should judge (2xx, 404, ...);
        raises for 401/403 (:class:`AuthError`) and for transient failures that outlived
        the retries. With ``read_body`` a 2xx body is read inside the retry loop (so a
        connection dropped mid-body is retried too), at most ``limit`` bytes of it
        (``resp.oversize`` if larger; nothing beyond ``limit + 1`` is read); an error
        body is read on demand, 64 KiB at most (``resp.data``). ``range_start``: the
        request asks for a range from there; a ``200`` (Range ignored) then yields just
        ``limit`` bytes from that offset.
        """
        base = self._base_url(target)
        url = urllib.parse.urljoin(base + "/", path_or_url)
        same_host = _may_carry_credentials(base, url)
        auth_retried = False
        # At most: the first try, and one more after learning or renewing credentials.
        for _ in range(2):
            request_headers = {"User-Agent": self.user_agent, **(headers or {})}
            if same_host:
                authorization = self._authorization(target, push)
                if authorization is not None:
                    request_headers["Authorization"] = authorization
            resp = self._send_retrying(
                method,
                url,
                headers=request_headers,
                body=body,
                idempotent=idempotent,
                insecure=target.endpoint.insecure,
                read_body=read_body,
                limit=limit,
                range_start=range_start,
                label=target.label,
            )
            if resp.status == 401 and not auth_retried and same_host:
                resp.discard()
                auth_retried = True
                self._learn_challenge(resp, target, push)
                continue
            if resp.status in (401, 403):
                raise self._auth_error(resp, target, push)
            return resp
        raise self._auth_error(resp, target, push)

    def _send_retrying(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        body: bytes | None,
        idempotent: bool,
        insecure: bool,
        read_body: bool,
        label: str,
        limit: int = _MAX_ERROR_BODY,
        range_start: int | None = None,
    ) -> _Response:
        """One HTTP exchange with transport/429/5xx retries and redirects followed; the
        body is read as :meth:`_request` describes."""
        deadline = time.monotonic() + self.max_retry_time
        host = urllib.parse.urlsplit(url).netloc
        path = urllib.parse.urlsplit(url).path
        for attempt in range(self.retries + 1):
            last = attempt >= self.retries
            try:
                raw = self._send(method, url, headers, body, insecure)
                resp = _Response(raw)
                if method == "HEAD":
                    resp.body = b""
                    _drain_or_close(raw)
                elif read_body and 200 <= raw.status < 300:
                    if raw.status == 200 and range_start is not None:
                        _read_slice(resp, range_start, limit)
                    else:
                        _read_bounded(resp, limit)
                # Other answers keep their body unread: ``resp.data`` takes 64 KiB at most.
            except (urllib3.exceptions.HTTPError, OSError) as e:
                if isinstance(e, urllib3.exceptions.SSLError):
                    raise RegistryError(
                        f"{label}: TLS error talking to {host}: {_one_line(str(e), 160)}"
                    ) from None
                delay = self._delay(attempt, None)
                if idempotent and not last and time.monotonic() + delay <= deadline:
                    self._sleep(delay)
                    continue
                raise RegistryError(
                    f"{label}: cannot reach {host} after {attempt + 1} attempt(s): "
                    f"{_one_line(_reason(e), 160)}",
                    transient=True,
                ) from None
            status = resp.status
            if status == 429 or (status >= 500 and status not in _PERMANENT_5XX):
                # 429 means the request was refused before any effect: safe to resend.
                delay = self._delay(attempt, resp.headers.get("Retry-After"))
                if (
                    (idempotent or status == 429)
                    and not last
                    and time.monotonic() + delay <= deadline
                ):
                    resp.discard()
                    self._sleep(delay)
                    continue
                description, code = _describe(status, resp.data)
                raise RegistryError(
                    f"{label}: {method} {path}: {description} (after {attempt + 1} attempt(s))",
                    status=status,
                    code=code,
                    transient=True,
                )
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        insecure: bool,
    ) -> urllib3.BaseHTTPResponse:
        """Send with redirects followed; ``Authorization`` is dropped for good at the first
        redirect to another host or from HTTPS to plain HTTP (see _may_carry_credentials).
        Bodies are never decoded (we ask for ``identity``): bytes are hashed as sent, and a
        small compressed answer cannot inflate into a large one."""
        headers = dict(headers)
        for _ in range(_MAX_REDIRECTS + 1):
            pool = self._pool_for(insecure and url.startswith("https:"))
            if body is not None:
                headers["Content-Length"] = str(len(body))
            raw = pool.request(
                method,
                url,
                body=body,
                headers=headers,
                retries=False,
                redirect=False,
                preload_content=False,
                decode_content=False,
                timeout=self._timeout,
            )
            location = raw.headers.get("Location")
            if raw.status not in _REDIRECTS or not location:
                return raw
            _Response(raw).discard()
            new_url = urllib.parse.urljoin(url, location)
            if not _may_carry_credentials(url, new_url):
                headers.pop("Authorization", None)
            if raw.status == 303:
                method, body = "GET", None
                headers.pop("Content-Length", None)
            url = new_url
        raise RegistryError(f"{url}: more than {_MAX_REDIRECTS} redirects")

    def _error(self, resp: _Response, target: _Target, what: str) -> Exception:
        """The exception for an unexpected answer: NotFoundError for 404s, else RegistryError."""
        description, code = _describe(resp.status, resp.data)
        message = f"{target.label}: {what}: {description}"
        if resp.status == 404:
            return NotFoundError(message)
        if code == "DIGEST_INVALID":
            return DigestMismatchError(message)
        return RegistryError(message, status=resp.status, code=code)

    def _location(self, resp: _Response, target: _Target, what: str) -> str:
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError(f"{target.label}: {what}: registry sent no upload Location")
        return urllib.parse.urljoin(self._base_url(target) + "/", location)

    # -- plumbing: authentication --------------------------------------------------------

    def _creds(self, target: _Target) -> Credentials | None:
        return self._credentials.get(target.endpoint.registry, target.repository)

    @staticmethod
    def _scope(target: _Target, push: bool) -> str:
        return f"repository:{target.repository}:{'pull,push' if push else 'pull'}"

    def _authorization(self, target: _Target, push: bool) -> str | None:
        """The ``Authorization`` header for a request, from what the host asked for before."""
        with self._lock:
            challenge = self._challenges.get(target.host)
        if challenge is None:
            return None
        creds = self._creds(target)
        if challenge.scheme == "basic":
            if creds is None or not (creds.username or creds.password):
                return None
            return creds.basic_header()
        scope = self._scope(target, push)
        key = (target.host, scope)
        with self._lock:
            cached = self._tokens.get(key)
        if cached is not None and cached[1] > time.monotonic():
            return f"Bearer {cached[0]}"
        token, expires = self._fetch_token(target, challenge, scope, creds)
        with self._lock:
            self._tokens[key] = (token, expires)
        return f"Bearer {token}"

    def _learn_challenge(self, resp: _Response, target: _Target, push: bool) -> None:
        """Remember how the host wants to be authenticated; forget a rejected token."""
        header = resp.headers.get("WWW-Authenticate", "")
        usable = [c for c in parse_www_authenticate(header) if c.scheme in ("bearer", "basic")]
        usable.sort(key=lambda c: c.scheme != "bearer")
        if not usable or (usable[0].scheme == "bearer" and not usable[0].params.get("realm")):
            raise AuthError(
                f"{target.label}: {target.host} requires authentication "
                "but sent no usable WWW-Authenticate challenge",
                status=401,
            )
        challenge = usable[0]
        with self._lock:
            self._challenges[target.host] = challenge
            self._tokens.pop((target.host, self._scope(target, push)), None)
        if challenge.scheme == "basic" and self._creds(target) is None:
            raise AuthError(
                f"{target.label}: {target.host} requires a login and no credentials were "
                "found (auth.json or docker config)",
                status=401,
            )

    def _auth_error(
        self, resp: _Response, target: _Target, push: bool
    ) -> AuthError:
        description, code = _describe(resp.status, resp.data)
        access = "push to" if push else "pull from"
        if self._creds(target) is None:
            reason = "no credentials found; access denied to anonymous users"
        else:
            reason = f"credentials for {target.endpoint.registry} rejected or lacking access"
        return AuthError(
            f"{target.label}: cannot {access} {target.host}: {reason} ({description})",
            status=resp.status,
            code=code,
        )

    def _fetch_token(
        self,
        target: _Target,
        challenge: Challenge,
        scope: str,
        creds: Credentials | None,
    ) -> tuple[str, float]:
        """Get a bearer token from the challenge's realm; return it with its expiry time."""
        realm = challenge.params["realm"]
        params = {"scope": scope}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        headers = {"User-Agent": self.user_agent}
        body: bytes | None = None
        if creds is not None and creds.identity_token:
            method, url = "POST", realm
            form = {
                **params,
                "grant_type": "refresh_token",
                "refresh_token": creds.identity_token,
                "client_id": "soci",
            }
            body = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            method = "GET"
            separator = "&" if "?" in realm else "?"
            url = realm + separator + urllib.parse.urlencode(params)
            if creds is not None:
                headers["Authorization"] = creds.basic_header()
        realm_host = urllib.parse.urlsplit(realm).netloc or realm
        if (
            creds is not None
            and not realm.startswith("https://")
            and not (self.plain_http or target.endpoint.insecure)
        ):
            # A secure registry pointing us at a plain-HTTP realm would leak the password.
            raise AuthError(
                f"{target.label}: refusing to send credentials to non-HTTPS token realm "
                f"{realm_host}",
            )
        with self._lock:
            self.token_requests += 1
        started = time.monotonic()
        resp = self._send_retrying(
            method,
            url,
            headers=headers,
            body=body,
            idempotent=True,
            insecure=target.endpoint.insecure,
            read_body=True,
            label=target.label,
            limit=_MAX_TOKEN_BODY,
        )
        if resp.status in (401, 403):
            who = f"the credentials for {target.endpoint.registry}" if creds else "anonymous access"
            raise AuthError(
                f"{target.label}: token server {realm_host} refused {who} "
                f"(HTTP {resp.status}, scope {scope})",
                status=resp.status,
            )
        if resp.status != 200:
            description, code = _describe(resp.status, resp.data)
            raise RegistryError(
                f"{target.label}: token server {realm_host}: {description}",
                status=resp.status,
                code=code,
            )
        if resp.oversize:
            raise RegistryError(
                f"{target.label}: token server {realm_host} sent more than "
                f"{_MAX_TOKEN_BODY} bytes"
            )
        try:
            reply = json.loads(resp.data)
            token = reply.get("token") or reply.get("access_token")
            if not isinstance(token, str) or not token:
                raise ValueError
            expires_in = reply.get("expires_in", 60)
            lifetime = float(expires_in) if isinstance(expires_in, int | float) else 60.0
        except (ValueError, AttributeError):
            raise RegistryError(
                f"{target.label}: token server {realm_host} sent no token"
            ) from None
        # Renew a little early so a token never expires between check and use.
        return token, started + max(lifetime - 5.0, 1.0)


class _NoReferrersApi(Exception):
    """Internal signal: the registry answered the referrers API as one without it."""


def _may_carry_credentials(from_url: str, to_url: str) -> bool:
    """Whether an ``Authorization`` meant for ``from_url`` may go to ``to_url``.

    Only to the same host and port (compared case-insensitively), and never from HTTPS
    down to plain HTTP, where anyone on the path could read it. HTTP to HTTPS is fine.
    """
    old, new = urllib.parse.urlsplit(from_url), urllib.parse.urlsplit(to_url)
    if old.netloc.lower() != new.netloc.lower():
        return False
    return not (old.scheme.lower() == "https" and new.scheme.lower() != "https")


def _reason(error: BaseException) -> str:
    """The innermost useful description of a urllib3 transport error."""
    reason = getattr(error, "reason", None)
    if isinstance(reason, BaseException):
        return _reason(reason) if getattr(reason, "reason", None) else str(reason)
    return str(error) or type(error).__name__


def _media_type_of(content_type: str | None, data: bytes) -> str:
    """The manifest's media type: the Content-Type, or the document's own ``mediaType``."""
    media_type = (content_type or "").split(";", 1)[0].strip()
    if media_type and media_type not in ("application/json", "text/plain",
                                         "application/octet-stream"):
        return media_type
    try:
        doc = json.loads(data)
        declared = doc.get("mediaType")
        if isinstance(declared, str) and declared:
            return declared
        return OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    except (ValueError, AttributeError):
        return media_type or "application/octet-stream"


def _parse_index(data: bytes, target: _Target, what: str) -> dict[str, Any]:
    try:
        index = json.loads(data)
        if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
            raise ValueError
    except ValueError:
        raise RegistryError(f"{target.label}: {what} is not an image index") from None
    return index


def _descriptors(index: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The index's manifest descriptors (entries that are not objects are skipped)."""
    return [dict(m) for m in index.get("manifests") or [] if isinstance(m, Mapping)]


def _next_link(header: str | None) -> str | None:
    """The target of ``rel="next"`` in a ``Link`` header."""
    if not header:
        return None
    for part in header.split(","):
        url, _, rest = part.partition(";")
        url = url.strip()
        if url.startswith("<") and url.endswith(">") and 'rel="next"' in rest.replace(" ", ""):
            return url[1:-1]
    return None


def _with_query(url: str, key: str, value: str) -> str:
    """``url`` with ``key=value`` added to its query, whether or not it already has one."""
    parts = urllib.parse.urlsplit(url)
    query = parts.query + ("&" if parts.query else "") + urllib.parse.urlencode({key: value})
    return urllib.parse.urlunsplit(parts._replace(query=query))
