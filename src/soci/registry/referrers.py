"""OCI referrers: the referrers API when the registry has it, else the referrers tag
schema (an image index tagged ``<alg>-<hex>``), read and, for pushes, updated."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from typing import Any

from soci.errors import NotFoundError, RegistryError
from soci.oci.mediatypes import OCI_INDEX
from soci.registry.manifests import MAX_MANIFEST_SIZE, get_manifest, push_manifest
from soci.registry.reference import Reference, validate_digest
from soci.registry.session import NoReferrersApi, Session
from soci.registry.transport import Target


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
    target = session.read_target(ref)
    found = _referrers_api(session, target, subject_digest, artifact_type)
    if found is None:
        found = _referrers_from_tag(session, target, subject_digest)
    if artifact_type is not None:
        found = [d for d in found if d.get("artifactType") == artifact_type]
    return found


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
    try:
        for page in session.pages(target, path, "referrers", accept=OCI_INDEX,
                                  limit=MAX_MANIFEST_SIZE):
            found.extend(_descriptors(page))
    except NoReferrersApi:
        session.note_no_referrers_api(target)
        return None
    return found


def _referrers_from_tag(
    session: Session, target: Target, subject_digest: str
) -> list[dict[str, Any]]:
    """Referrers from the referrers tag schema (no tag: none)."""
    tag_ref = target.ref.with_tag(referrers_tag(subject_digest))
    try:
        manifest = get_manifest(session, Target(tag_ref, target.endpoint), OCI_INDEX)
    except NotFoundError:
        return []
    return _descriptors(_parse_index(manifest.data, target, "referrers tag"))


def _parse_index(data: bytes, target: Target, what: str) -> dict[str, Any]:
    try:
        index = json.loads(data)
        if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
            raise ValueError
    except ValueError:
        raise RegistryError(f"{target.label}: {what} is not an image index") from None
    return index


def _descriptors(index: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The index's manifest descriptors (entries that are not objects are skipped)."""
    return [dict(m) for m in index.get("manifests") or [] if isinstance(m, Mapping)]
