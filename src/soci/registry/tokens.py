"""Registry authentication on the wire: ``WWW-Authenticate`` challenges and bearer tokens.

Credentials themselves (auth files, helpers) are :mod:`soci.registry.auth`'s; this module
decides what ``Authorization`` a request carries. On a 401 the challenge is parsed and
remembered per host, so later requests authenticate up front. Bearer tokens are fetched
from the realm with ``repository:<name>:pull`` (reads) or ``pull,push`` (writes) scopes,
cached per (host, scope) until ``expires_in`` and fetched again on a later 401.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from soci.errors import AuthError, RegistryError
from soci.oci import boundedjson
from soci.registry.auth import Credentials, CredentialStore
from soci.registry.transport import Response, Target, Transport, describe

#: A bearer-token answer (containers/image: ``iolimits.MaxAuthTokenBodySize``, 1 MiB).
_MAX_TOKEN_BODY = 1 << 20


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


class Authenticator:
    """The ``Authorization`` of one client's requests: challenges learnt per host, bearer
    tokens cached per (host, scope); thread-safe."""

    def __init__(self, transport: Transport, credentials: CredentialStore) -> None:
        self._transport = transport
        self._credentials = credentials
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        #: How many bearer tokens were fetched (for tests and diagnostics).
        self.token_requests = 0

    def _creds(self, target: Target) -> Credentials | None:
        return self._credentials.get(target.endpoint.registry, target.repository)

    @staticmethod
    def _scope(target: Target, push: bool) -> str:
        return f"repository:{target.repository}:{'pull,push' if push else 'pull'}"

    def authorization(self, target: Target, push: bool) -> str | None:
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

    def learn_challenge(self, resp: Response, target: Target, push: bool) -> None:
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

    def auth_error(self, resp: Response, target: Target, push: bool) -> AuthError:
        """The one-line error for a 401/403 that authenticating did not get past."""
        description, code = describe(resp.status, resp.data)
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
        target: Target,
        challenge: Challenge,
        scope: str,
        creds: Credentials | None,
    ) -> tuple[str, float]:
        """Get a bearer token from the challenge's realm; return it with its expiry time."""
        realm = challenge.params["realm"]
        params = {"scope": scope}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        headers = {"User-Agent": self._transport.user_agent}
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
            and not (
                self._transport.plain_http
                or target.endpoint.insecure
                or target.endpoint.scheme == "http"
            )
        ):
            # A secure registry pointing us at a plain-HTTP realm would leak the password.
            raise AuthError(
                f"{target.label}: refusing to send credentials to non-HTTPS token realm "
                f"{realm_host}",
            )
        with self._lock:
            self.token_requests += 1
        started = time.monotonic()
        resp = self._transport.send_retrying(
            method,
            url,
            headers=headers,
            body=body,
            idempotent=True,
            insecure=target.endpoint.insecure,
            read_body=True,
            label=target.label,
            limit=_MAX_TOKEN_BODY,
            https_only=True,
            tls=target.endpoint.tls,
        )
        if resp.status in (401, 403):
            who = f"the credentials for {target.endpoint.registry}" if creds else "anonymous access"
            raise AuthError(
                f"{target.label}: token server {realm_host} refused {who} "
                f"(HTTP {resp.status}, scope {scope})",
                status=resp.status,
            )
        if resp.status != 200:
            description, code = describe(resp.status, resp.data)
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
            reply = boundedjson.loads(resp.data, "token answer")
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
