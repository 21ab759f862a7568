"""What every part of the registry client shares: a :class:`Session` binds a reference to
the endpoint (mirror or primary) serving it, sends API requests with authentication over
the transport, turns unexpected answers into one-line errors and follows paginated
listings. The API modules (:mod:`~soci.registry.manifests`, :mod:`~soci.registry.blobs`,
:mod:`~soci.registry.uploads`, :mod:`~soci.registry.referrers`) are functions over it.
"""

from __future__ import annotations

import hashlib
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from soci.errors import DigestMismatchError, NotFoundError, RegistryError
from soci.oci import boundedjson
from soci.registry.config import Endpoint, RegistriesConf
from soci.registry.hosts import RegistryHosts
from soci.registry.reference import Reference
from soci.registry.tokens import Authenticator
from soci.registry.transport import (
    MAX_ERROR_BODY,
    Response,
    Target,
    Transport,
    describe,
    may_carry_credentials,
)

_MAX_PAGES = 10_000

#: Answers meaning "this registry has no referrers API" (see the OCI distribution spec).
_NO_REFERRERS_API = frozenset({400, 404, 405, 406, 501})
_T = TypeVar("_T")


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    """``algorithm:hex`` of ``data``."""
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def too_large(target: Target, what: str, size: int) -> DigestMismatchError:
    return DigestMismatchError(
        f"{target.label}: {what} is larger than its descriptor says ({size} bytes)"
    )


class Session:
    """One client's transport, authentication, registries.conf, host directories and the
    facts learnt about registries; thread-safe."""

    def __init__(
        self,
        transport: Transport,
        auth: Authenticator,
        registries_conf: RegistriesConf | str | os.PathLike[str] | None,
        chunk_size: int,
        hosts: RegistryHosts | None = None,
    ) -> None:
        self.transport = transport
        self.auth = auth
        self.chunk_size = chunk_size
        #: Host directories (hosts.toml, certs.d); ``None``: none are read.
        self.hosts = hosts
        self._conf_source = registries_conf
        self._conf: RegistriesConf | None = (
            registries_conf if isinstance(registries_conf, RegistriesConf) else None
        )
        self._lock = threading.Lock()
        # (host, repository) pairs whose registry answered as one without a referrers API.
        self._no_referrers_api: set[tuple[str, str]] = set()

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

    def lacks_referrers_api(self, target: Target) -> bool:
        """Whether the target's registry was found to have no referrers API."""
        with self._lock:
            return (target.host, target.repository) in self._no_referrers_api

    def note_no_referrers_api(self, target: Target) -> None:
        with self._lock:
            self._no_referrers_api.add((target.host, target.repository))

    def endpoints(
        self, ref: Reference, capability: str, *, for_push: bool = False
    ) -> list[Endpoint]:
        """Where to go for ``ref``, in order: registries.conf's endpoints (mirrors, then
        the primary), each expanded by its host directory, keeping those with
        ``capability`` (``pull``, ``resolve``, ``push`` or ``referrers``).

        Raises :class:`RegistryError` when none is left (a hosts.toml allowing nobody
        to resolve tags, say)."""
        endpoints = self.registries_conf.endpoints(ref, for_push=for_push)
        if self.hosts is not None:
            endpoints = [e for endpoint in endpoints for e in self.hosts.expand(endpoint)]
        usable = [e for e in endpoints if capability in e.capabilities]
        if not usable:
            sources = sorted({e.source for e in endpoints if e.source})
            where = f" (see {', '.join(sources)})" if sources else ""
            raise RegistryError(
                f"{ref}: no host configured for {ref.registry} has the "
                f"{capability!r} capability{where}"
            )
        return usable

    def read_target(self, ref: Reference, capability: str = "pull") -> Target:
        """The primary endpoint for reads (the last one able to)."""
        return Target(ref, self.endpoints(ref, capability)[-1])

    def push_target(self, ref: Reference) -> Target:
        """Where pushes go: the first endpoint with the ``push`` capability (containerd's
        rule; without host directories, registries.conf's primary location)."""
        return Target(ref, self.endpoints(ref, "push", for_push=True)[0])

    def on_endpoints(
        self, ref: Reference, action: Callable[[Target], _T], capability: str | None = None
    ) -> _T:
        """Run ``action`` on each mirror in turn, then on the primary location; mirror
        failures fall through to the next endpoint. Only endpoints with ``capability``
        are used (default: ``resolve`` for a reference without digest, else ``pull``)."""
        if capability is None:
            capability = "pull" if ref.digest is not None else "resolve"
        endpoints = self.endpoints(ref, capability)
        for endpoint in endpoints[:-1]:
            try:
                return action(Target(ref, endpoint))
            except (RegistryError, NotFoundError, DigestMismatchError):
                continue
        return action(Target(ref, endpoints[-1]))

    def request(
        self,
        method: str,
        target: Target,
        path_or_url: str,
        *,
        push: bool = False,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        idempotent: bool = True,
        read_body: bool = True,
        limit: int = MAX_ERROR_BODY,
        range_start: int | None = None,
    ) -> Response:
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
        base = self.transport.base_url(target)
        url = urllib.parse.urljoin(base + "/", self._api_path(target.endpoint, path_or_url))
        same_host = may_carry_credentials(base, url)
        auth_retried = False
        # At most: the first try, and one more after learning or renewing credentials.
        for _ in range(2):
            request_headers = {
                "User-Agent": self.transport.user_agent,
                **dict(target.endpoint.headers),
                **(headers or {}),
            }
            if same_host:
                authorization = self.auth.authorization(target, push)
                if authorization is not None:
                    request_headers["Authorization"] = authorization
            resp = self.transport.send_retrying(
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
                tls=target.endpoint.tls,
            )
            if resp.status == 401 and not auth_retried and same_host:
                resp.discard()
                auth_retried = True
                self.auth.learn_challenge(resp, target, push)
                continue
            if resp.status in (401, 403):
                raise self.auth.auth_error(resp, target, push)
            return resp
        raise self.auth.auth_error(resp, target, push)

    @staticmethod
    def _api_path(endpoint: Endpoint, path_or_url: str) -> str:
        """An API path (``/v2/...``) as the endpoint serves it: under its API root (a
        host directory's path or ``override_path``) and, for a mirror of another
        registry, with ``ns=<registry>`` (containerd's hint for multi-registry mirrors).
        URLs (links, upload locations) are left alone: the registry wrote them."""
        if not path_or_url.startswith("/v2/"):
            return path_or_url
        path = endpoint.api_root.rstrip("/") + path_or_url[len("/v2") :]
        if endpoint.namespace:
            separator = "&" if "?" in path else "?"
            path += separator + urllib.parse.urlencode({"ns": endpoint.namespace})
        return path

    def error(self, resp: Response, target: Target, what: str) -> Exception:
        """The exception for an unexpected answer: NotFoundError for 404s, else RegistryError."""
        description, code = describe(resp.status, resp.data)
        message = f"{target.label}: {what}: {description}"
        if resp.status == 404:
            return NotFoundError(message)
        if code == "DIGEST_INVALID":
            return DigestMismatchError(message)
        return RegistryError(message, status=resp.status, code=code)

    def location(self, resp: Response, target: Target, what: str) -> str:
        location = resp.headers.get("Location")
        if not location:
            raise RegistryError(f"{target.label}: {what}: registry sent no upload Location")
        return urllib.parse.urljoin(self.transport.base_url(target) + "/", location)

    def pages(
        self,
        target: Target,
        path: str,
        what: str,
        *,
        limit: int,
        total: int,
        accept: str = "application/json",
    ) -> Iterator[dict[str, Any]]:
        """GET a JSON listing and every page its ``Link: <...>; rel="next"`` headers name,
        yielding each parsed page in turn (the caller keeps what it needs, not the pages).

        Each page is at most ``limit`` bytes and all pages together at most ``total``: a
        registry naming page after page cannot make a listing cost more than that (and
        each page is parsed in memory bounded by its size, see :mod:`soci.oci.boundedjson`).
        """
        seen: set[str] = set()
        used = 0
        url: str | None = path
        for _ in range(_MAX_PAGES):
            if url is None or url in seen:
                break
            seen.add(url)
            budget = min(limit, total - used)
            resp = self.request("GET", target, url, headers={"Accept": accept}, limit=budget)
            if what == "referrers" and resp.status in _NO_REFERRERS_API:
                raise NoReferrersApi
            if resp.status != 200:
                raise self.error(resp, target, what)
            if resp.oversize:
                if budget < limit:
                    raise RegistryError(
                        f"{target.label}: {what} listing larger than {total} bytes in all"
                    )
                raise RegistryError(f"{target.label}: {what} page larger than {limit} bytes")
            used += len(resp.data)
            try:
                page = boundedjson.loads(resp.data, f"{what} page")
                if not isinstance(page, dict):
                    raise ValueError
            except boundedjson.JsonLimitError as e:
                raise RegistryError(f"{target.label}: {e}") from None
            except ValueError:
                if what == "referrers":
                    raise NoReferrersApi from None
                raise RegistryError(f"{target.label}: {what} is not a JSON object") from None
            if what == "referrers" and not isinstance(page.get("manifests", []), list):
                raise NoReferrersApi
            url = _next_link(resp.headers.get("Link"))
            if url is not None:
                # Resolved here so the link is used as the registry wrote it (see _api_path).
                url = urllib.parse.urljoin(self.transport.base_url(target) + "/", url)
            yield page
            del page  # not held while the next page is fetched


class NoReferrersApi(Exception):
    """Internal signal: the registry answered the referrers API as one without it."""


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
