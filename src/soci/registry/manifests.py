"""Manifests and tags: fetching (verified, bounded), HEAD, pushing, listing tags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from soci.errors import DigestMismatchError, InvalidReferenceError, NotFoundError, RegistryError
from soci.oci import boundedjson
from soci.oci.descriptor import Descriptor
from soci.oci.mediatypes import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from soci.registry.reference import Reference, validate_digest
from soci.registry.session import Session, digest_of, too_large
from soci.registry.transport import Target

#: The manifest types we understand, in the Accept header of every manifest request.
DEFAULT_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))
#: The largest manifest accepted: 4 MiB, the limit of the distribution registry and of
#: containers/image (``iolimits.MaxManifestBodySize``). Referrers listings (image indexes)
#: are held to it too.
MAX_MANIFEST_SIZE = 4 << 20
#: One page of a tag list (a registry without pagination sends all tags at once), and all
#: pages of one together: ~1M tags, each held as a Python str (~20x its text at worst).
_MAX_TAG_PAGE = _MAX_TAG_LIST = 16 << 20


@dataclass(frozen=True)
class Manifest:
    """A manifest's exact bytes with its media type and (verified) digest."""

    data: bytes
    media_type: str
    digest: str

    def json(self) -> Any:
        """The parsed document (in memory bounded by its size: it came from a registry)."""
        return boundedjson.loads(self.data, f"manifest {self.digest}")

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


def get_manifest(
    session: Session, target: Target, accept: str, size: int | None = None
) -> Manifest:
    """The manifest's bytes, read at most to ``size`` and ``MAX_MANIFEST_SIZE``, checked
    against the reference's digest or ``Docker-Content-Digest``."""
    ref = target.ref
    path = f"/v2/{target.repository}/manifests/{ref.identifier}"
    limit = MAX_MANIFEST_SIZE if size is None else min(size, MAX_MANIFEST_SIZE)
    resp = session.request("GET", target, path, headers={"Accept": accept}, limit=limit)
    if resp.status != 200:
        raise session.error(resp, target, "manifest")
    if resp.oversize:
        if size is not None and size <= MAX_MANIFEST_SIZE:
            raise too_large(target, f"manifest {ref.identifier}", size)
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


def head_manifest(session: Session, target: Target) -> Descriptor | None:
    """The manifest's descriptor (HEAD, or GET when the answer lacks a field), or None."""
    path = f"/v2/{target.repository}/manifests/{target.ref.identifier}"
    resp = session.request("HEAD", target, path, headers={"Accept": DEFAULT_ACCEPT})
    if resp.status == 404:
        return None
    if resp.status != 200:
        raise session.error(resp, target, "manifest")
    digest = target.ref.digest or resp.headers.get("Docker-Content-Digest")
    length = resp.headers.get("Content-Length", "")
    media_type = resp.headers.get("Content-Type", "")
    if not digest or not length.isdigit() or not media_type or media_type == "application/json":
        try:
            manifest = get_manifest(session, target, DEFAULT_ACCEPT)
        except NotFoundError:
            return None
        return Descriptor(manifest.media_type, manifest.digest, manifest.size)
    return Descriptor(media_type.split(";", 1)[0].strip(), digest, int(length))


def push_manifest(
    session: Session, ref: Reference, data: bytes, media_type: str
) -> PushedManifest:
    """Push a manifest under the reference's tag (or its digest); its digest and the
    registry's ``OCI-Subject`` (see :meth:`RegistryClient.push_manifest`)."""
    target = session.push_target(ref)
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
    resp = session.request(
        "PUT", target, path, push=True, headers={"Content-Type": media_type}, body=data
    )
    if resp.status not in (200, 201, 202):
        raise session.error(resp, target, "manifest push")
    returned = resp.headers.get("Docker-Content-Digest")
    if returned and returned.startswith("sha256:") and returned != computed:
        raise DigestMismatchError(
            f"{target.label}: registry stored the manifest as {returned}, expected {computed}"
        )
    return PushedManifest(ref.digest or computed, resp.headers.get("OCI-Subject") or None)


def list_tags(session: Session, target: Target, page_size: int | None) -> list[str]:
    """All tags of the target's repository, every ``Link`` page followed."""
    tags: list[str] = []
    path = f"/v2/{target.repository}/tags/list"
    if page_size is not None:
        path += f"?n={int(page_size)}"
    for page in session.pages(target, path, "tag list", limit=_MAX_TAG_PAGE,
                              total=_MAX_TAG_LIST):
        page_tags = page.get("tags") or []
        if not isinstance(page_tags, list):
            raise RegistryError(f"{target.label}: tag list is not a list")
        tags.extend(str(t) for t in page_tags)
    return tags


def _media_type_of(content_type: str | None, data: bytes) -> str:
    """The manifest's media type: the Content-Type, or the document's own ``mediaType``."""
    media_type = (content_type or "").split(";", 1)[0].strip()
    if media_type and media_type not in ("application/json", "text/plain",
                                         "application/octet-stream"):
        return media_type
    try:
        doc = boundedjson.loads(data, "manifest")
        declared = doc.get("mediaType")
        if isinstance(declared, str) and declared:
            return declared
        return OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    except (ValueError, AttributeError):
        return media_type or "application/octet-stream"
