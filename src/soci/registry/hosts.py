"""Per-host registry settings the way containerd and podman read them: which HTTP hosts
serve a registry (mirrors, then the server), over which scheme, trusting which CA,
presenting which client certificate.

Two layouts are read, for the registry host named in a reference (after registries.conf
has rewritten it, see "Precedence" below):

**containerd's hosts directory** (``hosts_dir``; default ``/etc/containerd/certs.d`` when
it exists; several roots may be given, or one string with ``:`` between them, as in
containerd's CRI ``config_path``). For registry ``host[:port]`` the first existing
directory of ``<root>/host_port_``, ``<root>/host:port`` and ``<root>/_default`` is used
(roots in order). In it, ``hosts.toml``::

    server = "https://registry.example.com"      # the registry itself when left out
    ca = "ca.pem"                                 # or a list; relative to the directory
    client = [["client.cert", "client.key"]]      # or "both.pem", or a list of either
    skip_verify = false
    capabilities = ["pull", "resolve", "push"]    # of the server

    [host."https://mirror.example.com:5000"]      # tried in file order, before server
      capabilities = ["pull", "resolve"]          # default: pull, resolve, push, referrers
      ca = "/etc/certs/mirror-ca.pem"
      skip_verify = false
      override_path = false                       # true: the URL path is the API root
      [host."https://mirror.example.com:5000".header]
        X-Custom = "value"                        # or a list of values

A URL without a scheme means ``https://``; ``http://`` means plain HTTP, except that a host
with TLS settings on a port other than 80 tries HTTPS first, as containerd does. A URL path
(``https://mirror/prefix``) is the API root with ``/v2`` appended unless ``override_path``.
Capabilities decide what a host is asked for: ``pull`` (blobs, manifests by digest),
``resolve`` (manifests by tag, tag listings), ``push`` (the first such host receives
pushes) and ``referrers`` (the referrers API and the referrers tag). A directory without
``hosts.toml`` (or with an empty one) is docker's legacy layout: ``*.crt`` CA files and
``*.cert`` client certificates with the ``*.key`` of the same name (without one the key is
expected in the ``.cert`` file). Mirrors of another host get ``?ns=<registry>`` on their
requests, so a mirror serving several upstream registries knows which one is meant.

**containers' certs.d directories** (``certs_dirs``; default, as podman: the rootless
user's ``~/.config/containers/certs.d``, then ``/etc/containers/certs.d`` and
``/etc/docker/certs.d``): the first ``<dir>/host:port/`` that exists gives ``*.crt`` CA
files and ``*.cert``/``*.key`` client pairs (each needs the other, as containers/image
requires). They are consulted only for hosts the containerd hosts directory says nothing
about (no matching directory, not even ``_default``).

CA files are trusted *in addition to* the system's CAs. Python's TLS stack presents one
client certificate per connection: the first pair listed (files in name order) is used.
``dial_timeout`` is accepted and ignored (the client's own ``timeout`` applies).

Differences from containerd worth knowing: a ``hosts.toml`` that is not valid TOML, or has
a value of the wrong type or an unknown capability, is an error (one line naming the file)
rather than logged and replaced by the directory's certificate files; and a registry
without any configuration keeps soci's rule (HTTPS, verified) even on ``localhost``,
where containerd would fall back to plain HTTP.

Precedence with registries.conf (see :mod:`soci.registry.config`): registries.conf decides
*which registries* a reference is read from (``blocked``, ``location`` rewrites, its
``[[registry.mirror]]`` list, ``mirror-by-digest-only``); the host directories decide *how
each of those registry hosts is reached*. Every endpoint registries.conf yields is
expanded into the hosts its ``hosts.toml`` lists (keeping the capabilities both allow: a
registries.conf mirror is never asked to push or for referrers). Where both set the
transport of the same host, ``hosts.toml`` wins: a host it names with a scheme or TLS
settings ignores registries.conf's ``insecure`` (a CA or ``skip_verify`` written for that
host is the more specific statement). Certificate-only directories (docker's legacy
layout, containers' certs.d) add their CA and client certificate and keep ``insecure``,
as podman does. For the snapshotter, containerd reads the same ``hosts.toml`` for its own
pulls, so pointing ``hosts_dir`` at containerd's ``config_path`` keeps both in agreement.

Credentials stay per host: a mirror host gets the credentials stored for *its* name,
never those of the registry it mirrors.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import ssl
import threading
import tomllib
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soci.errors import SociError, kind_name
from soci.registry.config import ALL_CAPABILITIES, Endpoint
from soci.registry.reference import api_host_of

#: containerd's conventional hosts directory (``config_path`` in its CRI configuration).
DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")
#: Where podman looks for per-host certificates (after the rootless user's directory).
SYSTEM_CERTS_DIRS = (Path("/etc/containers/certs.d"), Path("/etc/docker/certs.d"))

_MAX_HOSTS_TOML = 1 << 20
_MAX_HOSTS = 64
_CAPABILITIES = ("pull", "resolve", "push", "referrers")

PathInput = str | os.PathLike[str]


class HostsConfigError(SociError):
    """A hosts.toml or a certificate directory is unreadable or invalid."""


@dataclass(frozen=True)
class TLSConfig:
    """TLS settings for one host: extra CA files, client certificate pairs (key ``None``:
    in the certificate file) and ``skip_verify`` (``None``: not set)."""

    ca_files: tuple[str, ...] = ()
    client_pairs: tuple[tuple[str, str | None], ...] = ()
    skip_verify: bool | None = None
    #: The file or directory these came from (for error messages).
    source: str = field(default="", compare=False)

    def ssl_context(self, *, verify: bool = True) -> ssl.SSLContext:
        """A client context: the system CAs plus ``ca_files``, the first client pair, and
        no verification with ``skip_verify`` (or ``verify=False``: registries.conf
        ``insecure``). Raises :class:`HostsConfigError` naming a file that will not load."""
        context = ssl.create_default_context()
        for ca in self.ca_files:
            try:
                context.load_verify_locations(cafile=ca)
            except (OSError, ssl.SSLError, ValueError) as e:
                raise HostsConfigError(
                    f"{self.source}: cannot load CA certificate {ca}: {_reason(e)}"
                ) from None
        if self.client_pairs:
            cert, key = self.client_pairs[0]
            try:
                context.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError, ValueError) as e:
                raise HostsConfigError(
                    f"{self.source}: cannot load client certificate {cert}"
                    f"{f' with key {key}' if key else ''}: {_reason(e)}"
                ) from None
        if self.skip_verify or not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    @property
    def verifies(self) -> bool:
        return not self.skip_verify


@dataclass(frozen=True)
class HostEntry:
    """One host of a host directory after defaults: ``host`` empty means the registry
    itself; ``scheme`` ``None`` means "not stated" (the endpoint's own rule applies)."""

    host: str
    scheme: str | None
    path: str
    capabilities: frozenset[str]
    tls: TLSConfig | None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class HostPlan:
    """What the directories say about one registry host."""

    source: str
    hosts: tuple[HostEntry, ...]
    #: Only certificates (legacy or containers layout): ``insecure`` keeps its meaning.
    certs_only: bool = False


# -- parsing -------------------------------------------------------------------------------


def parse_hosts_toml(text: str, directory: PathInput, source: str | None = None) -> HostPlan:
    """Parse a ``hosts.toml`` (relative file names resolve against ``directory``)."""
    directory = os.fspath(directory)
    source = source or os.path.join(directory, "hosts.toml")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise HostsConfigError(f"{source}: invalid TOML: {_one_line(str(e))}") from None
    tables = doc.get("host", {})
    if not isinstance(tables, Mapping):
        raise HostsConfigError(f"{source}: host must be a table of [host.\"URL\"] tables")
    if len(tables) > _MAX_HOSTS:
        raise HostsConfigError(f"{source}: more than {_MAX_HOSTS} hosts")
    hosts = []
    for url, table in tables.items():
        if not isinstance(table, Mapping):
            raise HostsConfigError(f"{source}: host {url!r} must be a table")
        hosts.append(_host_entry(url, table, directory, source))
    server = doc.get("server", "")
    if not isinstance(server, str):
        raise HostsConfigError(f"{source}: server must be a string")
    hosts.append(_host_entry(server, doc, directory, source))
    return HostPlan(source, tuple(hosts))


def _host_entry(url: str, table: Mapping[str, Any], directory: str, source: str) -> HostEntry:
    where = f"{source}: host {url!r}" if url else source

    def get(key: str, kind: type, default: Any) -> Any:
        value = table.get(key, default)
        if not isinstance(value, kind):
            raise HostsConfigError(f"{where}: {key} must be {kind_name(kind)}")
        return value

    override_path = get("override_path", bool, False)
    scheme: str | None = None
    host = ""
    path = "/v2"
    if url:
        full = url if "://" in url else "https://" + url
        parts = urllib.parse.urlsplit(full)
        if (parts.scheme not in ("http", "https") or not parts.hostname
                or "@" in parts.netloc or parts.query or parts.fragment):
            raise HostsConfigError(f"{where}: not an http(s)://host[:port][/path] URL")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise HostsConfigError(f"{where}: bad port") from None
        scheme, host = parts.scheme, parts.netloc.lower()
        clean = posixpath.normpath(parts.path) if parts.path.strip("/") else ""
        if clean.startswith("//"):
            clean = "/" + clean.lstrip("/")
        if override_path:
            path = clean or "/v2"
        else:
            path = clean if clean.endswith("/v2") else clean + "/v2"
    capabilities = ALL_CAPABILITIES
    if "capabilities" in table:
        names = get("capabilities", list, [])
        wanted = set()
        for name in names:
            if not isinstance(name, str) or name.lower() not in _CAPABILITIES:
                raise HostsConfigError(
                    f"{where}: unknown capability {name!r} (known: {', '.join(_CAPABILITIES)})"
                )
            wanted.add(name.lower())
        capabilities = frozenset(wanted)
    ca = _strings(table.get("ca"), "ca", where)
    client = _client_pairs(table.get("client"), where)
    skip_verify = table.get("skip_verify")
    if skip_verify is not None and not isinstance(skip_verify, bool):
        raise HostsConfigError(f"{where}: skip_verify must be a boolean")
    if "dial_timeout" in table:
        get("dial_timeout", str, "")
    tls = None
    if ca is not None or client is not None or skip_verify is not None:
        tls = TLSConfig(
            tuple(_absolute(p, directory) for p in ca or ()),
            tuple(
                (_absolute(c, directory), _absolute(k, directory) if k else None)
                for c, k in client or ()
            ),
            skip_verify,
            source,
        )
    headers = _headers(table.get("header"), where)
    return HostEntry(host, scheme, path, capabilities, tls, headers)


def _strings(value: Any, key: str, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise HostsConfigError(f"{where}: {key} must be a string or a list of strings")


def _client_pairs(value: Any, where: str) -> list[tuple[str, str | None]] | None:
    """``client``: "file", ["file", ...] or [["cert", "key"], ...] (mixed is fine)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise HostsConfigError(f"{where}: client must be a string or a list")
    pairs: list[tuple[str, str | None]] = []
    for item in items:
        if isinstance(item, str):
            pairs.append((item, None))
        elif (isinstance(item, list) and len(item) == 2
              and all(isinstance(v, str) for v in item)):
            pairs.append((item[0], item[1] or None))
        else:
            raise HostsConfigError(
                f"{where}: client entries must be a file name or a [cert, key] pair"
            )
    return pairs


def _headers(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise HostsConfigError(f"{where}: header must be a table")
    result = []
    for name, raw in value.items():
        values = _strings(raw, f"header {name!r}", where) or []
        text = ", ".join(values)
        if not _token(name) or any(c in text for c in "\r\n\0"):
            raise HostsConfigError(f"{where}: invalid header {name!r}")
        result.append((name, text))
    return tuple(result)


def _token(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "!#$%&'*+-.^_`|~" for c in name) and (
        name.isascii()
    )


def _absolute(path: str, directory: str) -> str:
    return path if os.path.isabs(path) else os.path.join(directory, path)


def load_host_dir(directory: PathInput) -> HostPlan:
    """Read one host directory: its ``hosts.toml``, else its certificate files."""
    directory = os.fspath(directory)
    file = os.path.join(directory, "hosts.toml")
    try:
        with open(file, "rb") as f:
            data = f.read(_MAX_HOSTS_TOML + 1)
    except FileNotFoundError:
        data = b""
    except OSError as e:
        raise HostsConfigError(f"cannot read {file}: {e.strerror}") from None
    if len(data) > _MAX_HOSTS_TOML:
        raise HostsConfigError(f"{file}: larger than {_MAX_HOSTS_TOML} bytes")
    if not data.strip():
        return load_cert_files(directory, need_keys=False)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise HostsConfigError(f"{file}: not UTF-8 text") from None
    return parse_hosts_toml(text, directory, file)


def load_cert_files(directory: PathInput, *, need_keys: bool) -> HostPlan:
    """docker's certificate layout: ``*.crt`` CAs, ``*.cert`` + ``*.key`` client pairs.

    ``need_keys`` (containers' rule): every ``.cert`` needs its ``.key`` and the reverse;
    without it (containerd's rule) a ``.cert`` without a key holds its own key."""
    directory = os.fspath(directory)
    try:
        names = sorted(e.name for e in os.scandir(directory) if not e.is_dir())
    except OSError as e:
        raise HostsConfigError(f"cannot read {directory}: {e.strerror}") from None
    cas, pairs = [], []
    present = set(names)
    for name in names:
        path = os.path.join(directory, name)
        if name.endswith(".crt"):
            cas.append(path)
        elif name.endswith(".cert"):
            key = name[: -len(".cert")] + ".key"
            if key in present:
                pairs.append((path, os.path.join(directory, key)))
            elif need_keys:
                raise HostsConfigError(f"{directory}: client certificate {name} has no {key}")
            else:
                pairs.append((path, None))
        elif (name.endswith(".key") and need_keys
              and name[: -len(".key")] + ".cert" not in present):
            raise HostsConfigError(
                f"{directory}: key {name} has no client certificate "
                f"{name[: -len('.key')]}.cert (CA certificates end in .crt)"
            )
    tls = TLSConfig(tuple(cas), tuple(pairs), None, directory) if cas or pairs else None
    return HostPlan(directory, (HostEntry("", None, "/v2", ALL_CAPABILITIES, tls),),
                    certs_only=True)


# -- lookup --------------------------------------------------------------------------------


def default_certs_dirs() -> list[Path]:
    """podman's certificate directories, the rootless user's first."""
    dirs = []
    if os.geteuid() != 0:
        dirs.append(Path.home() / ".config" / "containers" / "certs.d")
    dirs.extend(SYSTEM_CERTS_DIRS)
    return dirs


def _split_dirs(value: PathInput | Iterable[PathInput] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(p for p in value.split(os.pathsep) if p)
    if isinstance(value, os.PathLike):
        return (os.fspath(value),)
    return tuple(os.fspath(p) for p in value)


def _safe_host(host: str) -> bool:
    """Whether ``host`` can name a directory (never a path escape)."""
    return bool(host) and "/" not in host and "\0" not in host and host not in (".", "..")


class RegistryHosts:
    """The host directories of one client, read on first use per registry host and kept
    for the client's lifetime; thread-safe.

    ``hosts_dir``: containerd host directory root(s) (``None``: ``/etc/containerd/certs.d``
    if it exists; an empty sequence: none). ``certs_dirs``: containers certs.d roots
    (``None``: podman's defaults; empty: none).
    """

    def __init__(
        self,
        hosts_dir: PathInput | Sequence[PathInput] | None = None,
        certs_dirs: Sequence[PathInput] | None = None,
    ) -> None:
        roots = _split_dirs(hosts_dir)
        if roots is None:
            roots = (str(DEFAULT_HOSTS_DIR),) if DEFAULT_HOSTS_DIR.is_dir() else ()
        self.hosts_dirs: tuple[str, ...] = roots
        certs = _split_dirs(certs_dirs)
        self.certs_dirs: tuple[str, ...] = (
            certs if certs is not None else tuple(str(p) for p in default_certs_dirs())
        )
        self._lock = threading.Lock()
        self._plans: dict[str, HostPlan | None] = {}

    def plan(self, registry: str) -> HostPlan | None:
        """What the directories say about ``registry`` (``host[:port]``), or ``None``."""
        with self._lock:
            if registry in self._plans:
                return self._plans[registry]
        plan = self._find(registry)
        with self._lock:
            self._plans[registry] = plan
        return plan

    def _find(self, registry: str) -> HostPlan | None:
        if not _safe_host(registry):
            return None
        host, sep, port = registry.rpartition(":")
        candidates = ([f"{host}_{port}_"] if sep and host else []) + [registry, "_default"]
        for root in self.hosts_dirs:
            for name in candidates:
                path = os.path.join(root, name)
                if os.path.isdir(path):
                    return load_host_dir(path)
        for root in self.certs_dirs:
            path = os.path.join(root, registry)
            if os.path.isdir(path):
                return load_cert_files(path, need_keys=True)
        return None

    def expand(self, endpoint: Endpoint) -> list[Endpoint]:
        """The endpoints that serve ``endpoint``'s registry, in the order to try them."""
        plan = self.plan(endpoint.registry)
        if plan is None:
            return [endpoint]
        result = []
        own_host = api_host_of(endpoint.registry).lower()
        for entry in plan.hosts:
            capabilities = entry.capabilities & endpoint.capabilities
            if not capabilities:
                continue
            is_self = not entry.host or entry.host == own_host
            registry = endpoint.registry if is_self else entry.host
            states_transport = entry.scheme is not None or entry.tls is not None
            result.append(
                dataclasses.replace(
                    endpoint,
                    registry=registry,
                    insecure=endpoint.insecure and (plan.certs_only or not states_transport),
                    mirror=endpoint.mirror or not is_self,
                    scheme=entry.scheme or endpoint.scheme,
                    tls=entry.tls or endpoint.tls,
                    api_root=entry.path,
                    headers=entry.headers,
                    capabilities=capabilities,
                    namespace=None if is_self else endpoint.registry,
                    source=plan.source,
                )
            )
        return result


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and not isinstance(error, ssl.SSLError):
        return error.strerror
    return _one_line(str(error) or type(error).__name__)


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
