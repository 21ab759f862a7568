"""Registry credentials: where podman and docker keep them, read the same way.

Looked up per registry host (and repository, for containers-style namespaced keys), in
this order, first match wins:

1. an explicit mapping given to :class:`CredentialStore` (host -> credentials);
2. ``$REGISTRY_AUTH_FILE``;
3. ``$XDG_RUNTIME_DIR/containers/auth.json``;
4. ``~/.config/containers/auth.json``;
5. ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``).

Inside one file: a ``credHelpers`` entry for the host, then an ``auths`` entry (base64
``auth`` of ``user:password``, or ``username``/``password``, or ``identitytoken``), then
the ``credsStore`` helper. Helpers are run as ``docker-credential-<name> get`` with the
server on stdin, per the docker credential-helper protocol.

Secrets never reach a log line, an exception message or a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soci.errors import AuthError
from soci.registry.reference import DOCKER_HUB, normalize_registry

#: What docker calls Docker Hub in its config files and credential helpers.
DOCKER_HUB_SERVER_URL = "https://index.docker.io/v1/"
#: Bound on how long a credential helper may take (a keychain prompt should not hang us).
HELPER_TIMEOUT = 30.0


@dataclass(frozen=True)
class Credentials:
    """A user name with a password, or an OAuth2 refresh ("identity") token."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    def __bool__(self) -> bool:
        return bool(self.username or self.password or self.identity_token)

    def basic_header(self) -> str:
        """The ``Authorization`` value for HTTP Basic authentication."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


CredentialInput = Credentials | tuple[str, str]


def default_auth_files() -> list[Path]:
    """The auth files to consult, in order (see the module docstring)."""
    files: list[Path] = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    home = Path.home()
    files.append(home / ".config" / "containers" / "auth.json")
    docker_dir = Path(os.environ["DOCKER_CONFIG"]) if os.environ.get("DOCKER_CONFIG") else (
        home / ".docker"
    )
    files.append(docker_dir / "config.json")
    return files


def normalize_key(key: str) -> str:
    """Reduce the many spellings of a registry key (``https://host/v1/``, ``host``) to
    ``host[/namespace]`` with Docker Hub as ``docker.io``."""
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme) :]
    key = key.rstrip("/")
    for suffix in ("/v1", "/v2"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    host, sep, rest = key.partition("/")
    return normalize_registry(host) + sep + rest


def _candidates(registry: str, repository: str | None) -> list[str]:
    """Keys to try, most specific first: ``host/a/b``, ``host/a``, ``host``."""
    keys = []
    if repository:
        parts = repository.split("/")
        for i in range(len(parts), 0, -1):
            keys.append(f"{registry}/{'/'.join(parts[:i])}")
    keys.append(registry)
    return keys


def run_credential_helper(helper: str, registry: str) -> Credentials | None:
    """Ask ``docker-credential-<helper>`` for ``registry``'s credentials.

    Returns ``None`` when the helper knows nothing for the host. Its output is never put
    in an error message because it may hold the secret.
    """
    program = shutil.which(f"docker-credential-{helper}")
    if program is None:
        raise AuthError(
            f"{registry}: credential helper docker-credential-{helper} not found on PATH"
        )
    server = DOCKER_HUB_SERVER_URL if registry == DOCKER_HUB else registry
    try:
        proc = subprocess.run(
            [program, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AuthError(
            f"{registry}: credential helper docker-credential-{helper} timed out"
        ) from None
    except OSError as e:
        raise AuthError(
            f"{registry}: cannot run docker-credential-{helper}: {e.strerror}"
        ) from None
    if proc.returncode != 0:
        if b"credentials not found" in proc.stdout.lower() + proc.stderr.lower():
            return None
        raise AuthError(
            f"{registry}: credential helper docker-credential-{helper} failed "
            f"(exit status {proc.returncode})"
        )
    try:
        reply = json.loads(proc.stdout)
        username, secret = reply.get("Username", ""), reply.get("Secret", "")
        if not isinstance(username, str) or not isinstance(secret, str):
            raise TypeError
    except (ValueError, TypeError, AttributeError):
        raise AuthError(
            f"{registry}: credential helper docker-credential-{helper} returned invalid JSON"
        ) from None
    if not secret:
        return None
    if username == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(username=username, password=secret)


def _entry_credentials(entry: Any, source: Path, key: str) -> Credentials | None:
    if not isinstance(entry, Mapping):
        raise AuthError(f"{source}: auths entry for {key} is not an object")
    token = entry.get("identitytoken") or ""
    username = entry.get("username") or ""
    password = entry.get("password") or ""
    auth = entry.get("auth") or ""
    if auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError(f"{source}: auths entry for {key} has an invalid auth field") from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise AuthError(f"{source}: auths entry for {key} is not base64 user:password")
    creds = Credentials(str(username), str(password), str(token))
    return creds or None


class CredentialStore:
    """Finds credentials for a registry; results are cached for the store's lifetime so a
    slow credential helper runs once per host."""

    def __init__(
        self,
        explicit: Mapping[str, CredentialInput] | None = None,
        *,
        auth_files: Sequence[str | os.PathLike[str]] | None = None,
    ) -> None:
        """``explicit`` maps registry keys (``host`` or ``host/namespace``) to credentials
        (a :class:`Credentials` or a ``(user, password)`` pair); ``auth_files`` replaces
        the default file list (``None``: :func:`default_auth_files` at lookup time)."""
        self._explicit: dict[str, Credentials] = {}
        for key, value in (explicit or {}).items():
            creds = value if isinstance(value, Credentials) else Credentials(*value)
            self._explicit[normalize_key(key)] = creds
        self._auth_files = None if auth_files is None else [Path(p) for p in auth_files]
        self._cache: dict[tuple[str, str | None], Credentials | None] = {}
        self._lock = threading.Lock()

    def get(self, registry: str, repository: str | None = None) -> Credentials | None:
        """Credentials for ``registry`` (a host, ``docker.io`` for Hub) and ``repository``,
        or ``None`` to go anonymous."""
        registry = normalize_registry(registry)
        with self._lock:
            key = (registry, repository)
            if key not in self._cache:
                self._cache[key] = self._lookup(registry, repository)
            return self._cache[key]

    def put(self, key: str, credentials: Credentials) -> None:
        """Use ``credentials`` for ``key`` (``host`` or ``host/repository``) from now on, before
        any auth file (the store's credentials socket calls this)."""
        normalized = normalize_key(key)
        with self._lock:
            self._explicit[normalized] = credentials
            registry = normalized.split("/", 1)[0]
            for cached in [k for k in self._cache if k[0] == registry]:
                del self._cache[cached]

    def forget(self, registry: str) -> None:
        """Drop cached answers for ``registry`` (after they were rejected, say)."""
        with self._lock:
            for key in [k for k in self._cache if k[0] == registry]:
                del self._cache[key]

    def _lookup(self, registry: str, repository: str | None) -> Credentials | None:
        candidates = _candidates(registry, repository)
        for key in candidates:
            if key in self._explicit:
                return self._explicit[key]
        files = self._auth_files if self._auth_files is not None else default_auth_files()
        for path in files:
            found = self._from_file(path, registry, candidates)
            if found is not None:
                return found
        return None

    @staticmethod
    def _from_file(path: Path, registry: str, candidates: list[str]) -> Credentials | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise AuthError(f"cannot read auth file {path}: {e.strerror}") from None
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError
        except ValueError:
            raise AuthError(f"auth file {path} is not a JSON object") from None
        helpers = doc.get("credHelpers") or {}
        if isinstance(helpers, Mapping):
            normalized = {normalize_key(k): v for k, v in helpers.items()}
            if isinstance(normalized.get(registry), str):
                return run_credential_helper(normalized[registry], registry)
        auths = doc.get("auths") or {}
        if isinstance(auths, Mapping):
            entries = {normalize_key(k): (k, v) for k, v in auths.items()}
            for key in candidates:
                if key in entries:
                    creds = _entry_credentials(entries[key][1], path, entries[key][0])
                    if creds is not None:
                        return creds
        store = doc.get("credsStore")
        if isinstance(store, str) and store:
            return run_credential_helper(store, registry)
        return None
