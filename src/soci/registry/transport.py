"""HTTP for the registry client: connection pools, scheme choice, retries with backoff,
redirects, and body reads bounded by what the caller expects.

Nothing here knows the distribution API or credentials beyond the one rule that nothing
that may hold them, the ``Authorization`` header or a request body (a token request's
refresh token), follows a redirect to another host or down to plain HTTP
(:func:`may_carry_credentials`); :mod:`soci.registry.session` adds authentication on top.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import urllib3

from soci.errors import RegistryError
from soci.registry.config import Endpoint
from soci.registry.reference import Reference, api_host_of

if TYPE_CHECKING:
    from soci.registry.hosts import TLSConfig

_MAX_REDIRECTS = 5
#: How much of an answer whose body is only read for its message (errors, upload replies).
MAX_ERROR_BODY = 64 << 10
#: Unread body left on a connection that is still worth draining to reuse it; past this
#: the connection is closed instead.
_MAX_DRAIN = 64 << 10
#: Read size when skipping or draining a body (bounds the memory of a skip).
SKIP_CHUNK = 1 << 20
_MAX_RETRY_AFTER = 30.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: 5xx answers that say "never": retrying them only wastes time.
_PERMANENT_5XX = frozenset({501, 505})
# What OpenSSL says when the other end answers a TLS hello in plain HTTP.
_PLAIN_HTTP_SIGNS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG")


log = logging.getLogger("soci.registry")


@dataclass(frozen=True, slots=True)
class RetryNotice:
    """One wait before trying a registry again, so a long silent pause can say what it
    waits for: the CLI prints it, the daemons log it (see ``Transport.on_retry``)."""

    host: str
    reason: str   # "unreachable (connection refused)", "answered HTTP 503", ...
    delay: float  # seconds about to be waited
    retry: int    # which retry comes after the wait (1-based)
    retries: int  # how many retries there may be at most

    def __str__(self) -> str:
        return (f"registry {self.host} {self.reason}, retrying in {self.delay:.1f} s "
                f"({self.retry}/{self.retries})")


def log_retry(notice: RetryNotice) -> None:
    """The default ``on_retry``: a warning on the ``soci.registry`` logger."""
    log.warning("%s", notice)


def one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(status: int, body: bytes) -> tuple[str, str | None]:
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
    return one_line(text), code


class Response:
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
                self.body = self.raw.read(MAX_ERROR_BODY)
            except (urllib3.exceptions.HTTPError, OSError):
                self.body = b""
            self.discard()
        return self.body

    def discard(self) -> None:
        """Give the connection back: drained if the rest is small, else closed.

        Not urllib3's ``drain_conn``: that reads the whole rest into memory, however
        large a body the server chose to send.
        """
        drain_or_close(self.raw)


def drain_or_close(raw: urllib3.BaseHTTPResponse) -> None:
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


def declared_length(headers: Mapping[str, str]) -> int | None:
    length = headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def read_bounded(resp: Response, limit: int) -> None:
    """Read the body into ``resp.body``, at most ``limit`` bytes of it.

    A body that says (Content-Length) or turns out to be larger is not kept: the
    connection is closed (nothing more is read) and ``resp.oversize`` is set, for the
    caller to refuse with its own words.
    """
    raw = resp.raw
    body = b""
    declared = declared_length(resp.headers)
    if declared is not None and declared > limit:
        resp.oversize = True
    elif declared is not None:
        # One read: the length is known and allowed, and the HTTP layer stops at it (and
        # raises if the body is cut short, for the retry loop). Reading in pieces here
        # halved the throughput of span fetches.
        body = raw.read()
    else:
        # No length: pieces until EOF, or until one byte too many.
        parts: list[bytes] = []
        have = 0
        while have <= limit:
            chunk = raw.read(min(limit + 1 - have, SKIP_CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        if have > limit:
            resp.oversize = True
        else:
            body = b"".join(parts)
    if resp.oversize:
        raw.close()
    raw.release_conn()
    resp.body = body


def read_slice(resp: Response, skip: int, amount: int) -> None:
    """Read bytes ``[skip, skip + amount)`` of the body into ``resp.body``, in bounded
    reads, then close the connection rather than read (or buffer) the rest."""
    raw = resp.raw
    while skip > 0:
        skipped = raw.read(min(skip, SKIP_CHUNK))
        if not skipped:
            break
        skip -= len(skipped)
    parts: list[bytes] = []
    while amount > 0 and skip == 0:
        part = raw.read(min(amount, SKIP_CHUNK))
        if not part:
            break
        parts.append(part)
        amount -= len(part)
    raw.close()
    raw.release_conn()
    resp.body = b"".join(parts)


@dataclass(frozen=True)
class Target:
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


class Transport:
    """Sends requests for one client: pooled connections (one pool for verified TLS and
    plain HTTP, one for unverified TLS, one per host-directory TLS setting), the scheme per
    host, retries within a budget.

    Thread-safe; ``sleep`` is how it waits between retries.
    """

    def __init__(
        self,
        *,
        plain_http: bool,
        retries: int,
        backoff: float,
        max_backoff: float,
        max_retry_time: float,
        timeout: float,
        user_agent: str,
    ) -> None:
        self.plain_http = plain_http
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_time = max_retry_time
        self.user_agent = user_agent
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)
        self._pool = urllib3.PoolManager(num_pools=16, maxsize=8)
        self._insecure_pool: urllib3.PoolManager | None = None
        #: Pools for hosts with TLS settings, by (settings, verify).
        self._tls_pools: dict[tuple[TLSConfig, bool], urllib3.PoolManager] = {}
        self._lock = threading.Lock()
        self._schemes: dict[str, str] = {}
        self.sleep: Callable[[float], None] = time.sleep
        #: Told of every wait before a retry (or a resumed download), before it starts.
        self.on_retry: Callable[[RetryNotice], None] = log_retry

    def wait(self, host: str, reason: str, delay: float, retry: int) -> None:
        """Say what is awaited (one notice per wait), then wait ``delay`` seconds."""
        try:
            self.on_retry(RetryNotice(host, reason, delay, retry, self.retries))
        except Exception:  # a broken reporter must not turn a retry into a failure
            log.exception("retry reporter failed")
        self.sleep(delay)

    def close(self) -> None:
        """Close pooled connections; the transport stays usable (it reconnects)."""
        self._pool.clear()
        if self._insecure_pool is not None:
            self._insecure_pool.clear()
        with self._lock:
            pools = list(self._tls_pools.values())
        for pool in pools:
            pool.clear()

    def base_url(self, target: Target) -> str:
        """``scheme://host`` for the target: plain HTTP with ``plain_http``; else the
        scheme a host directory states (``http`` with TLS settings, on a port other than
        80, probes HTTPS first as containerd does); else HTTPS, probed with a fallback to
        plain HTTP when registries.conf says ``insecure`` (see the client's docstring)."""
        host = target.host
        endpoint = target.endpoint
        if self.plain_http:
            return f"http://{host}"
        if endpoint.scheme == "https":
            return f"https://{host}"
        if endpoint.scheme == "http":
            port = "" if host.endswith("]") else host.rpartition(":")[2]
            if endpoint.tls is None or port == "80":
                return f"http://{host}"
        elif not endpoint.insecure:
            return f"https://{host}"
        with self._lock:
            scheme = self._schemes.get(host)
        if scheme is None:
            scheme = "https"
            try:
                probe = self.pool_for(endpoint.insecure, endpoint.tls).request(
                    "GET",
                    f"https://{host}{endpoint.api_root}/",
                    headers={"User-Agent": self.user_agent},
                    retries=False,
                    redirect=False,
                    preload_content=False,
                    timeout=self._timeout,
                )
                drain_or_close(probe)
            except (urllib3.exceptions.HTTPError, OSError):
                scheme = "http"
            with self._lock:
                self._schemes[host] = scheme
        return f"{scheme}://{host}"

    def pool_for(self, insecure: bool, tls: TLSConfig | None = None) -> urllib3.PoolManager:
        """The pool for HTTPS to a host: its TLS settings (verification off when
        ``insecure`` or ``skip_verify``), else the shared verified or unverified pool."""
        if tls is not None:
            verify = tls.verifies and not insecure
            with self._lock:
                pool = self._tls_pools.get((tls, verify))
            if pool is None:
                context = tls.ssl_context(verify=verify)  # HostsConfigError: bad files
                options: dict[str, object] = {"ssl_context": context}
                if not verify:
                    options.update(cert_reqs="CERT_NONE", assert_hostname=False)
                    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
                with self._lock:
                    pool = self._tls_pools.setdefault(
                        (tls, verify), urllib3.PoolManager(num_pools=16, maxsize=8, **options)
                    )
            return pool
        if not insecure:
            return self._pool
        with self._lock:
            if self._insecure_pool is None:
                self._insecure_pool = urllib3.PoolManager(
                    num_pools=16, maxsize=8, cert_reqs="CERT_NONE", assert_hostname=False
                )
                urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            return self._insecure_pool

    def delay(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        if retry_after is not None:
            try:
                return min(max(float(retry_after.strip()), 0.0), _MAX_RETRY_AFTER)
            except ValueError:
                pass  # an HTTP date: fall back to our own schedule
        delay: float = min(self.backoff * (2.0**attempt), self.max_backoff)
        return delay * (0.75 + random.random() / 4)

    def send_retrying(
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
        limit: int = MAX_ERROR_BODY,
        range_start: int | None = None,
        https_only: bool = False,
        tls: TLSConfig | None = None,
    ) -> Response:
        """One HTTP exchange with transport/429/5xx retries and redirects followed; the
        body is read as :meth:`soci.registry.session.Session.request` describes.

        ``https_only``: refuse a redirect from HTTPS down to plain HTTP whatever the
        request (token requests: what comes back is a credential too). ``tls``: the
        host's TLS settings (from a host directory), used for every HTTPS leg."""
        deadline = time.monotonic() + self.max_retry_time
        host = urllib.parse.urlsplit(url).netloc
        path = urllib.parse.urlsplit(url).path
        for attempt in range(self.retries + 1):
            last = attempt >= self.retries
            try:
                raw = self._send(method, url, headers, body, insecure, label, https_only, tls)
                resp = Response(raw)
                if method == "HEAD":
                    resp.body = b""
                    drain_or_close(raw)
                elif read_body and 200 <= raw.status < 300:
                    if raw.status == 200 and range_start is not None:
                        read_slice(resp, range_start, limit)
                    else:
                        read_bounded(resp, limit)
                # Other answers keep their body unread: ``resp.data`` takes 64 KiB at most.
            except (urllib3.exceptions.HTTPError, OSError) as e:
                if isinstance(e, urllib3.exceptions.SSLError):
                    hint = ""
                    if "CERTIFICATE_VERIFY_FAILED" in str(e):
                        hint = (" (to trust a private CA: `ca` in the host's hosts.toml, or a"
                                " *.crt in its certs.d directory)")
                    elif any(m in str(e) for m in _PLAIN_HTTP_SIGNS):
                        hint = (" (the registry seems to speak plain HTTP: use --plain-http, or"
                                " `insecure = true` for it in registries.conf)")
                    elif "BAD_CERTIFICATE" in str(e) or "CERTIFICATE_REQUIRED" in str(e):
                        hint = (" (does it want a client certificate? `client` in the host's"
                                " hosts.toml, or *.cert + *.key in its certs.d directory)")
                    raise RegistryError(
                        f"{label}: TLS error talking to {host}: {one_line(str(e), 160)}{hint}"
                    ) from None
                delay = self.delay(attempt, None)
                if idempotent and not last and time.monotonic() + delay <= deadline:
                    self.wait(host, f"unreachable ({short_reason(e)})", delay, attempt + 1)
                    continue
                raise RegistryError(
                    f"{label}: cannot reach {host} after {attempt + 1} attempt(s): "
                    f"{one_line(_reason(e), 160)}",
                    transient=True,
                ) from None
            status = resp.status
            if status == 429 or (status >= 500 and status not in _PERMANENT_5XX):
                # 429 means the request was refused before any effect: safe to resend.
                delay = self.delay(attempt, resp.headers.get("Retry-After"))
                if (
                    (idempotent or status == 429)
                    and not last
                    and time.monotonic() + delay <= deadline
                ):
                    resp.discard()
                    self.wait(host, f"answered HTTP {status}", delay, attempt + 1)
                    continue
                description, code = describe(status, resp.data)
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
        label: str,
        https_only: bool,
        tls: TLSConfig | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """Send with redirects followed; ``Authorization`` is dropped for good at the first
        redirect to another host or from HTTPS to plain HTTP (see may_carry_credentials).
        A redirect there that would re-send the request body (307/308) is refused rather
        than followed: the body may hold a credential (a refresh token) and, unlike a
        header, cannot be dropped without changing the request.
        Bodies are never decoded (we ask for ``identity``): bytes are hashed as sent, and a
        small compressed answer cannot inflate into a large one."""
        headers = dict(headers)
        for _ in range(_MAX_REDIRECTS + 1):
            https = url.startswith("https:")
            pool = self.pool_for(insecure and https, tls if https else None)
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
            Response(raw).discard()
            new_url = urllib.parse.urljoin(url, location)
            if raw.status == 303:
                method, body = "GET", None
                headers.pop("Content-Length", None)
            if https_only and _downgrades(url, new_url):
                raise RegistryError(
                    f"{label}: refusing a redirect from HTTPS down to plain HTTP "
                    f"({_origin(url)} -> {_origin(new_url)})"
                )
            if not may_carry_credentials(url, new_url):
                headers.pop("Authorization", None)
                if body is not None:
                    raise RegistryError(
                        f"{label}: refusing to re-send a {method} request's body on a "
                        f"redirect from {_origin(url)} to {_origin(new_url)}"
                    )
            url = new_url
        raise RegistryError(f"{url}: more than {_MAX_REDIRECTS} redirects")


def may_carry_credentials(from_url: str, to_url: str) -> bool:
    """Whether an ``Authorization`` meant for ``from_url`` may go to ``to_url``.

    Only to the same host and port (compared case-insensitively), and never from HTTPS
    down to plain HTTP, where anyone on the path could read it. HTTP to HTTPS is fine.
    """
    old, new = urllib.parse.urlsplit(from_url), urllib.parse.urlsplit(to_url)
    if old.netloc.lower() != new.netloc.lower():
        return False
    return not _downgrades(from_url, to_url)


def _downgrades(from_url: str, to_url: str) -> bool:
    """Whether a redirect goes from HTTPS to anything else."""
    old, new = urllib.parse.urlsplit(from_url), urllib.parse.urlsplit(to_url)
    return old.scheme.lower() == "https" and new.scheme.lower() != "https"


def _origin(url: str) -> str:
    """``scheme://host`` of a URL: how errors name a redirect's ends (never the path or
    query, which may carry a signed token)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def short_reason(error: BaseException) -> str:
    """A few words for a transport error ("connection refused", "timed out"), for notices:
    the first errno along the chain of causes, else whether it timed out."""
    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in chain and len(chain) < 10:
        chain.append(e)
        inner = getattr(e, "reason", None)
        e = inner if isinstance(inner, BaseException) else (e.__cause__ or e.__context__)
    for e in chain:
        if isinstance(e, OSError) and e.errno in errno.errorcode:
            return os.strerror(e.errno).lower()
    if any(isinstance(e, TimeoutError | urllib3.exceptions.TimeoutError) for e in chain):
        return "timed out"
    return one_line(_reason(error), 80)


def _reason(error: BaseException) -> str:
    """The innermost useful description of a urllib3 transport error."""
    reason = getattr(error, "reason", None)
    if isinstance(reason, BaseException):
        return _reason(reason) if getattr(reason, "reason", None) else str(reason)
    return str(error) or type(error).__name__
