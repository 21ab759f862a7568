"""Finding the SOCI index of an image manifest, in the fork's order.

1. the local mapping ``<root>/indexes/<manifest hex>``,
2. the local content store (indexes recorded for the manifest),
3. the SOCI v2 annotation ``com.amazon.soci.index-digest`` on the manifest,
4. the OCI referrers API, then 5. the referrers tag schema (both inside
   ``RegistryClient.referrers``).

Artifacts found locally are never fetched again; fetched ones are verified
(index and every zTOC against their digests, a v1 index's subject against the
manifest) and kept in the content store.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from soci.artifacts import IndexRecord, LocalStore, ZtocRecord
from soci.artifacts.db import now
from soci.errors import SociError
from soci.index.model import SociIndex, ztoc_layer
from soci.oci import mediatypes as mt
from soci.oci.descriptor import Descriptor, Manifest
from soci.registry import Reference, RegistryClient


@dataclass(slots=True)
class Discovered:
    digest: str
    index: SociIndex
    where: str  # "local mapping", "local store", "image annotation" or "referrers"


def _local(store: LocalStore, digest: str) -> SociIndex | None:
    if not store.content.has_blob(digest):
        return None
    index = SociIndex.parse(store.content.read_blob(digest))
    if all(store.content.has_blob(z.digest) for z in index.ztocs()):
        return index
    return None


def _fetch(client: RegistryClient, ref: Reference, store: LocalStore, digest: str,
           manifest_desc: Descriptor, platform: str) -> SociIndex:
    data = client.get_manifest(replace(ref, tag=None, digest=digest)).data
    index = SociIndex.parse(data)
    if index.subject is not None and index.subject.digest != manifest_desc.digest:
        raise SociError(f"SOCI index {digest} is for {index.subject.digest}, "
                        f"not {manifest_desc.digest}")
    for z in index.ztocs():
        if not store.content.has_blob(z.digest):
            store.content.write_blob(client.get_blob(ref, z.digest, size=z.size), z.digest)
        layer_digest, span = ztoc_layer(z)
        store.db.put_ztoc(ZtocRecord(z.digest, z.size, layer_digest,
                                     (z.annotations or {}).get(mt.ANN_LAYER_MEDIA_TYPE, ""),
                                     span, now()))
    store.content.write_blob(data, digest)
    store.db.put_index(IndexRecord(digest, len(data), mt.OCI_MANIFEST, index.artifact_type,
                                   manifest_desc.digest, manifest_desc.digest, platform, now()),
                       [z.digest for z in index.ztocs()])
    store.mappings.put(manifest_desc.digest, digest)
    return index


def discover_index(store: LocalStore, client: RegistryClient | None, ref: Reference | None,
                   manifest_desc: Descriptor, manifest: Manifest,
                   platform: str = "") -> Discovered | None:
    """The SOCI index for an image manifest, or None when there is none anywhere."""
    mapped = store.mappings.get(manifest_desc.digest)
    if mapped is not None and (index := _local(store, mapped)) is not None:
        return Discovered(mapped, index, "local mapping")
    for rec in reversed(store.db.indexes(manifest_digests=[manifest_desc.digest])):
        if (index := _local(store, rec.digest)) is not None:
            return Discovered(rec.digest, index, "local store")
    if client is None or ref is None:
        return None
    annotated = (manifest.annotations or {}).get(mt.ANN_INDEX_DIGEST)
    if annotated is not None:
        local = _local(store, annotated)
        if local is None:
            local = _fetch(client, ref, store, annotated, manifest_desc, platform)
        return Discovered(annotated, local, "image annotation")
    found = client.referrers(ref, manifest_desc.digest, mt.SOCI_INDEX_V1)
    if not found:
        return None
    # Several indexes may refer to one image; like upstream, take the last listed.
    digest = str(found[-1]["digest"])
    return Discovered(digest, _fetch(client, ref, store, digest, manifest_desc, platform),
                      "referrers")
