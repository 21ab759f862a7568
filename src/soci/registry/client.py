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
* **Host directories.** containerd's ``hosts.toml`` directories (``hosts_dir``) and
  podman's ``certs.d`` directories (``certs_dirs``) add per-host CAs, client
  certificates, ``skip_verify``, schemes, headers and mirrors with capabilities; see
  :mod:`soci.registry.hosts` for the layouts and the precedence over registries.conf.
* **Errors.** Everything a user can cause ends in a one-line :class:`~soci.errors.SociError`
  subclass naming the reference, the HTTP status and the registry's error code, never a
  credential.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO

from soci import __version__
from soci.oci.descriptor import Descriptor
from soci.oci.mediatypes import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from soci.registry import blobs, manifests, uploads
from soci.registry import referrers as refs
from soci.registry.auth import CredentialInput, CredentialStore
from soci.registry.blobs import BlobReader
from soci.registry.config import RegistriesConf
from soci.registry.hosts import RegistryHosts
from soci.registry.manifests import (
    DEFAULT_ACCEPT,
    MAX_MANIFEST_SIZE,
    Manifest,
    PushedManifest,
)
from soci.registry.reference import Reference, validate_digest
from soci.registry.referrers import referrers_tag
from soci.registry.session import Session, digest_of
from soci.registry.tokens import Authenticator, Challenge, parse_www_authenticate
from soci.registry.transport import RetryNotice, Transport
from soci.registry.uploads import DEFAULT_CHUNK_SIZE

__all__ = [
    "DEFAULT_ACCEPT",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_USER_AGENT",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MAX_MANIFEST_SIZE",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "BlobReader",
    "Challenge",
    "Descriptor",
    "Manifest",
    "PushedManifest",
    "RegistryClient",
    "digest_of",
    "parse_www_authenticate",
    "referrers_tag",
]

DEFAULT_USER_AGENT = f"soci-py/{__version__}"


class RegistryClient:
    """Talks the OCI distribution API to registries; thread-safe, pools connections.

    Use as a context manager (or call :meth:`close`) to drop pooled connections.

    The facade of the package: the work is done by :mod:`~soci.registry.transport` (HTTP,
    retries, bounded reads), :mod:`~soci.registry.tokens` (challenges, bearer tokens),
    :mod:`~soci.registry.session` (endpoints, authenticated requests, errors, paging) and
    the API modules :mod:`~soci.registry.manifests`, :mod:`~soci.registry.blobs`,
    :mod:`~soci.registry.uploads` and :mod:`~soci.registry.referrers`.
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
        hosts_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        certs_dirs: Sequence[str | os.PathLike[str]] | None = None,
        on_retry: Callable[[RetryNotice], None] | None = None,
    ) -> None:
        """
        ``registries_conf``: a parsed :class:`RegistriesConf`, a path to read, or ``None``
        to read the default file on first use. ``credentials``: a :class:`CredentialStore`,
        or a mapping of registry host to credentials consulted before the auth files.
        ``hosts_dir``: containerd host directory root(s) (``hosts.toml`` per registry
        host; a string may list several separated by ``:``, like containerd's
        ``config_path``); ``None`` reads ``/etc/containerd/certs.d`` if it exists, an
        empty list none. ``certs_dirs``: containers ``certs.d`` roots; ``None`` means
        podman's defaults, an empty list none (see :mod:`soci.registry.hosts`).
        ``retries`` bounds attempts after the first, ``backoff`` is the first delay
        (doubling, capped at ``max_backoff``) and ``max_retry_time`` bounds the total time
        one request spends retrying. ``on_retry`` is told of every wait before a retry
        (what is awaited, how long); the default logs a warning on ``soci.registry``.
        """
        if retries < 0 or backoff < 0 or timeout <= 0 or chunk_size <= 0:
            raise ValueError("retries and backoff must be >= 0, timeout and chunk_size > 0")
        self._transport = Transport(
            plain_http=plain_http,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            max_retry_time=max_retry_time,
            timeout=timeout,
            user_agent=user_agent,
        )
        if on_retry is not None:
            self._transport.on_retry = on_retry
        if not isinstance(credentials, CredentialStore):
            credentials = CredentialStore(credentials)
        self._auth = Authenticator(self._transport, credentials)
        self._session = Session(
            self._transport,
            self._auth,
            registries_conf,
            chunk_size,
            RegistryHosts(hosts_dir, certs_dirs),
        )

    # -- settings (read-only: fixed at construction) -------------------------------------

    @property
    def plain_http(self) -> bool:
        return self._transport.plain_http

    @property
    def retries(self) -> int:
        return self._transport.retries

    @property
    def backoff(self) -> float:
        return self._transport.backoff

    @property
    def max_backoff(self) -> float:
        return self._transport.max_backoff

    @property
    def max_retry_time(self) -> float:
        return self._transport.max_retry_time

    @property
    def user_agent(self) -> str:
        return self._transport.user_agent

    @property
    def chunk_size(self) -> int:
        return self._session.chunk_size

    @property
    def token_requests(self) -> int:
        """How many bearer tokens were fetched (for tests and diagnostics)."""
        return self._auth.token_requests

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close pooled connections; the client stays usable (it reconnects)."""
        self._transport.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def registries_conf(self) -> RegistriesConf:
        """The registries.conf in force (read on first use when not given)."""
        return self._session.registries_conf

    @property
    def hosts(self) -> RegistryHosts:
        """The host directories in force (each host's read on first use)."""
        assert self._session.hosts is not None
        return self._session.hosts

    # -- manifests -----------------------------------------------------------------------

    def get_manifest(
        self, ref: Reference, accept: str = DEFAULT_ACCEPT, *, size: int | None = None
    ) -> Manifest:
        """Fetch the manifest ``ref`` names (its digest if it has one, else its tag).

        The bytes are checked against the reference's digest, else against the
        registry's ``Docker-Content-Digest``. At most ``MAX_MANIFEST_SIZE`` bytes are
        read, and at most ``size`` (the descriptor's size, when the caller has one).
        """
        session = self._session
        return session.on_endpoints(ref, lambda t: manifests.get_manifest(session, t, accept, size))

    def head_manifest(self, ref: Reference) -> Descriptor | None:
        """The manifest's descriptor without its body, or ``None`` if it does not exist.

        Falls back to a GET when the registry leaves out the digest or the size.
        """
        session = self._session
        return session.on_endpoints(ref, lambda t: manifests.head_manifest(session, t))

    def put_manifest(self, ref: Reference, data: bytes, media_type: str) -> str:
        """Push a manifest under the reference's tag (or its digest); return its digest."""
        return self.push_manifest(ref, data, media_type).digest

    def push_manifest(self, ref: Reference, data: bytes, media_type: str) -> PushedManifest:
        """Like :meth:`put_manifest`, also telling whether the registry sent ``OCI-Subject``
        (then it handles referrers itself and :meth:`add_referrer` is not needed)."""
        return manifests.push_manifest(self._session, ref, data, media_type)

    def list_tags(self, ref: Reference, page_size: int | None = None) -> list[str]:
        """All tags of the reference's repository, following ``Link`` pagination
        (``page_size`` asks the registry for pages of that many tags)."""
        session = self._session
        return session.on_endpoints(
            ref, lambda t: manifests.list_tags(session, t, page_size), "resolve"
        )

    # -- blobs ---------------------------------------------------------------------------

    def blob_exists(self, ref: Reference, digest: str) -> bool:
        """Whether the repository has the blob (HEAD)."""
        validate_digest(digest)
        session = self._session
        return session.on_endpoints(
            ref, lambda t: blobs.blob_exists(session, t, digest, push=False), "pull"
        )

    def get_blob(self, ref: Reference, digest: str, *, size: int) -> bytes:
        """The whole blob, checked against ``digest`` and ``size`` (its descriptor's).

        The size is required: a blob read into memory is bounded by what its descriptor
        declares, so a registry sending more costs ``size + 1`` bytes, not the lot. (For
        blobs of unknown size, stream them with :meth:`open_blob`.)
        """
        validate_digest(digest)
        if size < 0:
            raise ValueError(f"invalid blob size {size}")
        session = self._session
        return session.on_endpoints(
            ref, lambda t: blobs.get_blob(session, t, digest, size), "pull"
        )

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
        session = self._session
        return session.on_endpoints(
            ref, lambda t: blobs.open_blob(session, t, digest, size, verify), "pull"
        )

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
        session = self._session
        return session.on_endpoints(
            ref, lambda t: blobs.get_blob_range(session, t, digest, start, end), "pull"
        )

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
        return uploads.push_blob(self._session, ref, digest, data, size)

    # -- referrers -----------------------------------------------------------------------

    def referrers(
        self, ref: Reference, subject_digest: str, artifact_type: str | None = None
    ) -> list[dict[str, Any]]:
        """Descriptors of the manifests whose ``subject`` is ``subject_digest``.

        Uses the referrers API when the registry has it, else the referrers tag schema
        (the index tagged ``sha256-<hex>``; no tag means no referrers).
        """
        return refs.referrers(self._session, ref, subject_digest, artifact_type)

    def add_referrer(
        self, ref: Reference, subject_digest: str, descriptor: Mapping[str, Any]
    ) -> bool:
        """Record ``descriptor`` as a referrer of ``subject_digest`` in the referrers tag.

        Needed only when the registry has no referrers API (then it returns ``False``
        without writing anything). Read-modify-write: other referrers are kept and a
        digest already listed is not added twice. Concurrent writers can still race; the
        referrers tag schema has no way to prevent that.
        """
        return refs.add_referrer(self._session, ref, subject_digest, descriptor)
