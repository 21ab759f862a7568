"""containers-registries.conf(5): where a reference is really pulled from, and how.

We read the same file podman reads so that ``insecure``, ``blocked``, mirrors and
location rewrites configured for podman apply to soci too. Supported:

* version 2 ``[[registry]]`` tables with ``prefix`` (defaults to ``location``; may be a
  ``*.example.com`` wildcard), ``location``, ``insecure``, ``blocked``,
  ``mirror-by-digest-only`` and ``[[registry.mirror]]`` (``location``, ``insecure``);
  the entry with the longest matching prefix wins, and a prefix matches only at a
  path-component boundary (``example.com/foo`` matches ``example.com/foo/bar`` but not
  ``example.com/foobar``, and ``example.com`` does not match ``example.com:5000``);
* the version 1 ``[registries.insecure]`` / ``[registries.block]`` lists;
* drop-in files ``registries.conf.d/*.conf`` beside the main file, read in name order,
  whose entries replace earlier entries with the same prefix.

Everything else (search registries, short-name aliases, ...) is ignored: soci only
takes fully qualified references after :class:`~soci.registry.reference.Reference`
normalisation.

How each registry host named here is then reached (CAs, client certificates, schemes,
containerd ``hosts.toml`` mirrors) is up to the host directories of
:mod:`soci.registry.hosts`, which also says which wins where both speak of one host.

Where the file comes from: ``$CONTAINERS_REGISTRIES_CONF``, else the rootless user's
``~/.config/containers/registries.conf`` if it exists, else
``/etc/containers/registries.conf``. A missing file means "no configuration".
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from soci.errors import RegistryError, SociError, kind_name
from soci.registry.reference import Reference, normalize_registry

if TYPE_CHECKING:
    from soci.registry.hosts import TLSConfig

SYSTEM_REGISTRIES_CONF = Path("/etc/containers/registries.conf")
#: What a registry host may be asked for (containerd's host capabilities, see
#: :mod:`soci.registry.hosts`): blobs and manifests by digest, manifests by tag, pushes,
#: referrers listings.
ALL_CAPABILITIES = frozenset({"pull", "resolve", "push", "referrers"})
#: A registries.conf mirror: read from, never pushed to nor asked for referrers (which
#: stay with the primary location, as before host directories existed).
MIRROR_CAPABILITIES = frozenset({"pull", "resolve"})


class RegistriesConfError(SociError):
    """registries.conf is not valid TOML or has values of the wrong type."""


@dataclass(frozen=True)
class Mirror:
    """One ``[[registry.mirror]]``: another place holding the same content (pulls only)."""

    location: str
    insecure: bool = False


@dataclass(frozen=True)
class RegistryEntry:
    """One ``[[registry]]`` table after defaults are applied."""

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: tuple[Mirror, ...] = ()

    def matches(self, name: str) -> bool:
        """Whether ``name`` (``registry/repository``) falls under this entry's prefix."""
        if self.prefix.startswith("*."):
            host = name.split("/", 1)[0]
            return host.endswith(self.prefix[1:])
        return name == self.prefix or name.startswith(self.prefix + "/")

    def rewrite(self, name: str, location: str) -> str:
        """``name`` with this entry's prefix replaced by ``location``."""
        if self.prefix.startswith("*.") or not location:
            return name
        return location + name[len(self.prefix) :]


@dataclass(frozen=True)
class Endpoint:
    """A concrete place to talk to: the registry host, the repository there, and whether
    plain HTTP / unverified TLS is allowed for it.

    The fields after ``mirror`` come from a host directory (:mod:`soci.registry.hosts`):
    ``scheme`` (``None``: HTTPS, or probed when ``insecure``), ``tls`` (CA files, client
    certificate, ``skip_verify``), ``api_root`` (what ``/v2`` becomes), extra ``headers``,
    the ``capabilities`` of the host, ``namespace`` (the registry a mirror stands in for,
    sent as ``?ns=``) and the ``source`` file that said so."""

    registry: str
    repository: str
    insecure: bool = False
    mirror: bool = False
    scheme: str | None = None
    tls: TLSConfig | None = None
    api_root: str = "/v2"
    headers: tuple[tuple[str, str], ...] = ()
    capabilities: frozenset[str] = ALL_CAPABILITIES
    namespace: str | None = None
    source: str | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"


def _split_name(name: str) -> tuple[str, str]:
    registry, _, repository = name.partition("/")
    return normalize_registry(registry), repository


@dataclass(frozen=True)
class RegistriesConf:
    """The parsed configuration; an empty one means "HTTPS to where the reference says"."""

    entries: tuple[RegistryEntry, ...] = ()
    sources: tuple[str, ...] = field(default=(), compare=False)

    # -- loading -------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> RegistriesConf:
        """Read ``path`` (or the default file) plus its ``registries.conf.d`` drop-ins."""
        main = Path(path) if path is not None else default_registries_conf_path()
        files: list[Path] = []
        if main.is_file():
            files.append(main)
        dropin = main.parent / "registries.conf.d"
        if dropin.is_dir():
            files.extend(sorted(p for p in dropin.glob("*.conf") if p.is_file()))
        merged: dict[str, RegistryEntry] = {}
        for file in files:
            try:
                text = file.read_text(encoding="utf-8")
            except OSError as e:
                raise RegistriesConfError(f"cannot read {file}: {e.strerror}") from None
            for entry in cls._parse(text, str(file)):
                merged[entry.prefix] = entry
        return cls(tuple(merged.values()), tuple(str(f) for f in files))

    @classmethod
    def from_text(cls, text: str, source: str = "<string>") -> RegistriesConf:
        """Parse one file's contents (no drop-ins); handy for tests and embedding."""
        merged = {e.prefix: e for e in cls._parse(text, source)}
        return cls(tuple(merged.values()), (source,))

    @classmethod
    def _parse(cls, text: str, source: str) -> list[RegistryEntry]:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RegistriesConfError(f"{source}: invalid TOML: {e}") from None
        entries: list[RegistryEntry] = []
        v1 = doc.get("registries")
        if isinstance(v1, Mapping):
            entries.extend(cls._parse_v1(v1, source))
        tables = doc.get("registry", [])
        if not isinstance(tables, list):
            raise RegistriesConfError(f"{source}: [[registry]] must be an array of tables")
        for table in tables:
            entries.append(cls._parse_entry(table, source))
        return entries

    @staticmethod
    def _parse_v1(v1: Mapping[str, Any], source: str) -> Iterable[RegistryEntry]:
        flags: dict[str, dict[str, bool]] = {}
        for key, attr in (("insecure", "insecure"), ("block", "blocked")):
            section = v1.get(key, {})
            hosts = section.get("registries", []) if isinstance(section, Mapping) else None
            if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
                raise RegistriesConfError(
                    f"{source}: [registries.{key}] registries must be a list of strings"
                )
            for host in hosts:
                flags.setdefault(host, {})[attr] = True
        for host, values in flags.items():
            yield RegistryEntry(
                prefix=host,
                location=host,
                insecure=values.get("insecure", False),
                blocked=values.get("blocked", False),
            )

    @staticmethod
    def _parse_entry(table: Any, source: str) -> RegistryEntry:
        if not isinstance(table, Mapping):
            raise RegistriesConfError(f"{source}: [[registry]] entries must be tables")

        def get(t: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
            value = t.get(key, default)
            if not isinstance(value, kind):
                raise RegistriesConfError(
                    f"{source}: registry {t.get('location', t.get('prefix', '?'))!r}: "
                    f"{key} must be {kind_name(kind)}"
                )
            return value

        location = get(table, "location", str, "").rstrip("/")
        prefix = get(table, "prefix", str, "").rstrip("/") or location
        if not prefix:
            raise RegistriesConfError(f"{source}: a [[registry]] needs a location or a prefix")
        if prefix.startswith("*.") and location:
            # A wildcard names many registries, so there is no single place to rewrite to.
            raise RegistriesConfError(
                f"{source}: registry prefix {prefix!r} is a wildcard and cannot have a location"
            )
        mirrors = []
        for m in get(table, "mirror", list, []):
            if not isinstance(m, Mapping) or not isinstance(m.get("location"), str):
                raise RegistriesConfError(f"{source}: [[registry.mirror]] needs a location")
            mirrors.append(Mirror(m["location"].rstrip("/"), get(m, "insecure", bool, False)))
        return RegistryEntry(
            prefix=prefix,
            location=location,
            insecure=get(table, "insecure", bool, False),
            blocked=get(table, "blocked", bool, False),
            mirror_by_digest_only=get(table, "mirror-by-digest-only", bool, False),
            mirrors=tuple(mirrors),
        )

    # -- lookups -------------------------------------------------------------------------

    def find(self, name: str) -> RegistryEntry | None:
        """The entry whose prefix matches ``name`` (``registry/repository``) most closely."""
        best: RegistryEntry | None = None
        for entry in self.entries:
            if entry.matches(name) and (best is None or len(entry.prefix) > len(best.prefix)):
                best = entry
        return best

    def endpoints(self, ref: Reference, *, for_push: bool = False) -> list[Endpoint]:
        """Where to talk to for ``ref``: mirrors first (pulls only), the primary last.

        Raises :class:`RegistryError` if the configuration blocks the reference.
        """
        entry = self.find(ref.name)
        if entry is None:
            return [Endpoint(ref.registry, ref.repository)]
        if entry.blocked:
            raise RegistryError(f"{ref}: registry blocked by registries.conf ({entry.prefix})")
        result: list[Endpoint] = []
        use_mirrors = not for_push and (not entry.mirror_by_digest_only or ref.digest is not None)
        if use_mirrors:
            for mirror in entry.mirrors:
                registry, repository = _split_name(entry.rewrite(ref.name, mirror.location))
                caps = frozenset({"pull"}) if entry.mirror_by_digest_only else MIRROR_CAPABILITIES
                result.append(
                    Endpoint(registry, repository, mirror.insecure, mirror=True, capabilities=caps)
                )
        registry, repository = _split_name(entry.rewrite(ref.name, entry.location))
        result.append(Endpoint(registry, repository, entry.insecure))
        return result


def default_registries_conf_path() -> Path:
    """The file podman would read (see the module docstring for the order)."""
    env = os.environ.get("CONTAINERS_REGISTRIES_CONF")
    if env:
        return Path(env)
    user = Path.home() / ".config" / "containers" / "registries.conf"
    if os.geteuid() != 0 and user.is_file():
        return user
    return SYSTEM_REGISTRIES_CONF
