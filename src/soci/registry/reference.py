"""Image references: parse, normalise and print ``registry/repository[:tag][@digest]``.

Normalisation follows what podman and docker do with the names users type, so a
reference given to soci means the same image it means to podman:

* ``alpine`` is ``docker.io/library/alpine:latest``;
* ``user/app`` is ``docker.io/user/app:latest``;
* the first path component is a registry host when it contains ``.`` or ``:``, is
  ``localhost``, or has upper-case letters (repositories never do);
* a reference with a digest and no tag keeps no tag (``latest`` is only the default
  when nothing else says which manifest is meant).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from soci.errors import InvalidReferenceError

#: The registry name images without a host belong to, as podman spells it.
DOCKER_HUB = "docker.io"
#: The host that actually serves the Docker Hub registry API.
DOCKER_HUB_API_HOST = "registry-1.docker.io"
#: Other spellings of Docker Hub found in old configuration and references.
_DOCKER_HUB_ALIASES = frozenset(
    {"index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
DEFAULT_TAG = "latest"

# The grammar of the distribution project's reference package, written out again.
_HOST_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(
    rf"^(?:{_HOST_COMPONENT}(?:\.{_HOST_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?$"
)
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
#: Digest algorithms we can verify, with the length of their lower-case hex encoding.
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_MAX_NAME_LENGTH = 255


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is ``sha256:<64 hex>`` or ``sha512:<128 hex>``, else raise.

    Only algorithms we can recompute are accepted: a digest we cannot check would
    make every later "verified" read a lie.
    """
    algorithm, sep, encoded = digest.partition(":")
    length = DIGEST_HEX_LENGTHS.get(algorithm)
    if not sep or length is None:
        raise InvalidReferenceError(
            f"invalid digest {digest!r}: expected sha256:<64 hex digits> or sha512:<128 hex digits>"
        )
    if len(encoded) != length or not re.fullmatch(r"[0-9a-f]+", encoded):
        raise InvalidReferenceError(
            f"invalid digest {digest!r}: {algorithm} needs {length} lower-case hex digits"
        )
    return digest


def normalize_registry(host: str) -> str:
    """Map Docker Hub's alternative host names onto ``docker.io``; leave others alone."""
    lowered = host.lower()
    return DOCKER_HUB if lowered in _DOCKER_HUB_ALIASES else host


def api_host_of(registry: str) -> str:
    """The host (and port) that serves the registry API for ``registry``."""
    return DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry


@dataclass(frozen=True)
class Reference:
    """A fully qualified image reference; build one with :meth:`parse`.

    ``tag`` and ``digest`` may both be set (``repo:tag@sha256:...``); the digest then
    decides which manifest is fetched, the tag is only informative.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse and normalise a reference as podman would (see the module docstring)."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidReferenceError("invalid reference: empty")
        if text != text.strip() or any(c.isspace() for c in text):
            raise InvalidReferenceError(f"invalid reference {text!r}: contains whitespace")
        rest = text
        digest: str | None = None
        if "@" in rest:
            rest, _, digest = rest.partition("@")
            try:
                validate_digest(digest)
            except InvalidReferenceError as e:
                raise InvalidReferenceError(f"invalid reference {text!r}: {e}") from None
        tag: str | None = None
        # A ':' after the last '/' starts the tag; one before it belongs to a host:port.
        last_slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > last_slash:
            rest, tag = rest[:colon], rest[colon + 1 :]
            if not _TAG_RE.match(tag):
                raise InvalidReferenceError(f"invalid reference {text!r}: bad tag {tag!r}")
        first, sep, remainder = rest.partition("/")
        if sep and (
            "." in first or ":" in first or first == "localhost" or first.lower() != first
        ):
            registry, repository = first, remainder
            if not _HOST_RE.match(registry):
                raise InvalidReferenceError(
                    f"invalid reference {text!r}: bad registry host {registry!r}"
                )
        else:
            registry, repository = DOCKER_HUB, rest
        registry = normalize_registry(registry)
        if registry == DOCKER_HUB and "/" not in repository:
            repository = f"library/{repository}"
        cls._check_repository(text, repository)
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry, repository, tag, digest)

    @staticmethod
    def _check_repository(text: str, repository: str) -> None:
        if not repository:
            raise InvalidReferenceError(f"invalid reference {text!r}: no repository name")
        if repository.lower() != repository:
            raise InvalidReferenceError(
                f"invalid reference {text!r}: repository name must be lowercase"
            )
        for component in repository.split("/"):
            if not _PATH_COMPONENT_RE.match(component):
                raise InvalidReferenceError(
                    f"invalid reference {text!r}: bad repository component {component!r}"
                )
        if len(repository) > _MAX_NAME_LENGTH:
            raise InvalidReferenceError(
                f"invalid reference {text!r}: repository name longer than {_MAX_NAME_LENGTH}"
            )

    @property
    def name(self) -> str:
        """``registry/repository``: the reference without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host that serves this registry's API (``registry-1.docker.io`` for Hub)."""
        return api_host_of(self.registry)

    @property
    def identifier(self) -> str:
        """What goes after ``/manifests/``: the digest when there is one, else the tag."""
        if self.digest is not None:
            return self.digest
        return self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        """The same repository and tag, pinned to ``digest``."""
        return dataclasses.replace(self, digest=validate_digest(digest))

    def with_tag(self, tag: str) -> Reference:
        """The same repository at ``tag``; the digest is dropped since it named another tag's
        manifest."""
        if not _TAG_RE.match(tag):
            raise InvalidReferenceError(f"invalid tag {tag!r}")
        return dataclasses.replace(self, tag=tag, digest=None)

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text
