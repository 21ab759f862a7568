"""OCI referrers: the referrers API when the registry has it, else the referrers tag
schema (an image index tagged ``<alg>-<hex>``), read and, for pushes, updated."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from typing import Any

from soci.errors import NotFoundError, RegistryError
from soci.oci import boundedjson
from soci.oci.mediatypes import OCI_INDEX
from soci.registry.manifests import MAX_MANIFEST_SIZE, get_manifest, push_manifest
from soci.registry.reference import Reference, validate_digest
from soci.registry.session import NoReferrersApi, Session
from soci.registry.transport import Target

#: All pages of a referrers listing together: the size of one manifest (an image index),
#: which is all the referrers tag schema can list either.
MAX_REFERRERS_BYTES = MAX_MANIFEST_SIZE
#: Descriptors a listing may hold. A subject honestly has a handful of referrers
#: (signatures, SBOMs, attestations, a SOCI index per span size); 10,000 is far past any
#: real image yet keeps what a listing of tiny entries (``{}``, 3 bytes each) can leave
#: held in memory to a few MiB, whatever 4 MiB of them a registry sends.
MAX_REFERRERS = 10_000


def referrers_tag(subject_digest: str) -> str:
    """The tag of the referrers tag schema: ``<alg>-<hex>`` (at most 128 characters)."""
    validate_digest(subject_digest)
    return subject_digest.replace(":", "-", 1)[:128]


def referrers(
    session: Session, ref: Reference, subject_digest: str, artifact_type: str | None = None
) -> list[dict[str, Any]]:
    """Descriptors of the manifests whose ``subject`` is ``subject_digest``, from the
    API or else the referrers tag (see :meth:`RegistryClient.referrers`)."""
    validate_digest(subject_digest)

    def from_target(target: Target) -> list[dict[str, Any]]:
        found = _referrers_api(session, target, subject_digest, artifact_type)
        if found is None:
            found = _referrers_from_tag(session, target, subject_digest, artifact_type)
        return found

    # Hosts with the ``referrers`` capability: hosts.toml mirrors allowing it, then the
    # primary (registries.conf mirrors never have it: see soci.registry.config).
    return session.on_endpoints(ref, from_target, "referrers")


def add_referrer(
    session: Session, ref: Reference, subject_digest: str, descriptor: Mapping[str, Any]
) -> bool:
    """Add ``descriptor`` to the referrers tag of ``subject_digest``, unless the registry
    has a referrers API or the tag lists it already (see :meth:`RegistryClient.add_referrer`)."""
    validate_digest(subject_digest)
    for key in ("mediaType", "digest", "size"):
        if key not in descriptor:
            raise ValueError(f"referrer descriptor lacks {key!r}")
    validate_digest(str(descriptor["digest"]))
    target = session.push_target(ref)
    if _referrers_api(session, target, subject_digest, None) is not None:
        return False
    tag_ref = ref.with_tag(referrers_tag(subject_digest))
    try:
        current = get_manifest(session, Target(tag_ref, target.endpoint), OCI_INDEX)
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
    push_manifest(session, tag_ref, data, OCI_INDEX)
    return True


def _referrers_api(
    session: Session, target: Target, subject_digest: str, artifact_type: str | None
) -> list[dict[str, Any]] | None:
    """Referrers from the API, or ``None`` when the registry does not have it."""
    if session.lacks_referrers_api(target):
        return None
    path = f"/v2/{target.repository}/referrers/{subject_digest}"
    if artifact_type is not None:
        path += "?" + urllib.parse.urlencode({"artifactType": artifact_type})
    found: list[dict[str, Any]] = []
    listed = 0
    try:
        for page in session.pages(target, path, "referrers", accept=OCI_INDEX,
                                  limit=MAX_MANIFEST_SIZE, total=MAX_REFERRERS_BYTES):
            entries = page.get("manifests") or []
            listed += len(entries)
            _check_count(listed, target)
            # Only what the caller asked for is kept (a registry may ignore the filter).
            found.extend(_descriptors(entries, artifact_type))
    except NoReferrersApi:
        session.note_no_referrers_api(target)
        return None
    return found


def _referrers_from_tag(
    session: Session, target: Target, subject_digest: str, artifact_type: str | None
) -> list[dict[str, Any]]:
    """Referrers from the referrers tag schema (no tag: none)."""
    tag_ref = target.ref.with_tag(referrers_tag(subject_digest))
    try:
        manifest = get_manifest(session, Target(tag_ref, target.endpoint), OCI_INDEX)
    except NotFoundError:
        return []
    entries = _parse_index(manifest.data, target, "referrers tag").get("manifests") or []
    _check_count(len(entries), target)
    return _descriptors(entries, artifact_type)


def _parse_index(data: bytes, target: Target, what: str) -> dict[str, Any]:
    """An image index read from the registry (parsed in memory bounded by its size)."""
    try:
        index = boundedjson.loads(data, what)
        if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
            raise ValueError
    except boundedjson.JsonLimitError as e:
        raise RegistryError(f"{target.label}: {e}") from None
    except ValueError:
        raise RegistryError(f"{target.label}: {what} is not an image index") from None
    return index


def _check_count(listed: int, target: Target) -> None:
    if listed > MAX_REFERRERS:
        raise RegistryError(
            f"{target.label}: referrers listing has more than {MAX_REFERRERS} entries"
        )


def _descriptors(entries: list[Any], artifact_type: str | None) -> list[dict[str, Any]]:
    """The manifest descriptors among an index's entries (entries that are not objects
    are skipped), only those of ``artifact_type`` if given."""
    return [m for m in entries if isinstance(m, dict)
            and (artifact_type is None or m.get("artifactType") == artifact_type)]
