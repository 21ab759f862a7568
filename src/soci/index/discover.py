"""Finding the SOCI index of an image manifest, in the fork's order.

1. the local mapping ``<root>/indexes/<manifest hex>``,
2. the local content store (indexes the operator recorded for the manifest),
3. an index fetched before from this image's own repository,
4. the SOCI v2 annotation ``com.amazon.soci.index-digest`` on the manifest,
5. the OCI referrers API, then 6. the referrers tag schema (both inside
   ``RegistryClient.referrers``).

Whom each answer is trusted for: 1 and 2 are the local operator's choice (``soci
create``, ``soci convert``, files dropped by hand) and hold for the manifest from any
repository. 4 is pinned by the manifest itself, so it holds wherever that manifest is.
5 and 6 are whatever the repository's owner published next to the image: like
upstream, which asks the image's own repository, such an index is trusted for that
repository only, and remembered per (repository, manifest) (step 3), never by
manifest digest alone: otherwise a copy of a public image pushed elsewhere with a
hostile index would decide what the original repository's containers see.

Artifacts found locally are never fetched again; fetched ones are verified
(index and every zTOC against their digests, a v1 index's subject against the
manifest) and kept in the content store. zTOCs are content-addressed and shared.

Discoveries of one manifest run one at a time per local store: soci-store is asked
for every layer of an image at once (podman looks them up in parallel), and all of
those lookups need the same index; the first one discovers it, the others wait for
its answer instead of fetching and storing the same artifacts again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from soci.artifacts import FetchedIndexes, IndexRecord, LocalStore, ZtocRecord
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
    # "local mapping", "local store", "earlier fetch" (from this image's repository),
    # "image annotation" or "referrers"
    where: str


def _local(store: LocalStore, digest: str) -> SociIndex | None:
    if not store.content.has_blob(digest):
        return None
    index = SociIndex.parse(store.content.read_blob(digest))
    if all(store.content.has_blob(z.digest) for z in index.ztocs()):
        return index
    return None


#: Marks the provenance of an index fetched because a client named it (see ``_fetch``).
NAMED_SOURCE_SUFFIX = "#named"


def _source(ref: Reference) -> str:
    return FetchedIndexes.source_of(ref.registry, ref.repository)


def _fetch(client: RegistryClient, ref: Reference, store: LocalStore, digest: str,
           manifest_desc: Descriptor, platform: str, remember: bool = True) -> SociIndex:
    """Fetch, verify and keep an index (and its zTOCs) found in ``ref``'s repository.

    ``remember=False`` for an index a client named: its provenance is recorded under
    ``<repository>#named``, a source no reference can name, so one client's choice never
    becomes what later pulls that name no index find (nor, after ``rebuild-db``, a local
    index)."""
    data = client.get_manifest(replace(ref, tag=None, digest=digest)).data
    index = SociIndex.parse(data)
    if index.subject is not None and index.subject.digest != manifest_desc.digest:
        raise SociError(f"SOCI index {digest} is for {index.subject.digest}, "
                        f"not {manifest_desc.digest}")
    source = _source(ref) + ("" if remember else NAMED_SOURCE_SUFFIX)
    # Provenance first: the index never sits in content/ without it, so neither a crash
    # here nor a later rebuild-db can turn it into a local index (trusted everywhere).
    store.fetched.put(source, manifest_desc.digest, digest)
    for z in index.ztocs():
        if not store.content.has_blob(z.digest):
            store.content.write_blob(client.get_blob(ref, z.digest, size=z.size), z.digest)
        layer_digest, span = ztoc_layer(z)
        store.db.put_ztoc(ZtocRecord(z.digest, z.size, layer_digest,
                                     (z.annotations or {}).get(mt.ANN_LAYER_MEDIA_TYPE, ""),
                                     span, now()))
    store.content.write_blob(data, digest)
    known = store.db.index(digest)
    if known is None or known.source != "":  # never demote the operator's own record
        store.db.put_index(IndexRecord(digest, len(data), mt.OCI_MANIFEST, index.artifact_type,
                                       manifest_desc.digest, manifest_desc.digest, platform,
                                       now(), source),
                           [z.digest for z in index.ztocs()])
    return index


@dataclass(slots=True)
class _Flight:
    done: threading.Event = field(default_factory=threading.Event)
    result: Discovered | None = None
    error: Exception | None = None
    finished: bool = False  # False once done: the leader was interrupted; try again


class DiscoveryFlights:
    """The discoveries running for one local store, at most one per (manifest, repository).

    Keyed by the repository too: the same manifest pushed to two repositories may have
    an index in one of them only.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[tuple[str, ...], _Flight] = {}

    def run(self, key: tuple[str, ...],
            discover: Callable[[], Discovered | None]) -> Discovered | None:
        """``discover()``'s answer, computed once for all callers that overlap in time."""
        while True:
            with self._lock:
                flight = self._running.get(key)
                leading = flight is None
                if flight is None:
                    flight = self._running[key] = _Flight()
            if leading:
                break
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.finished:
                return flight.result
        try:
            flight.result = discover()
            flight.finished = True
        except Exception as e:
            flight.error = e  # the same failure for every waiter (one registry round)
            raise
        finally:
            with self._lock:
                del self._running[key]
            flight.done.set()
        return flight.result



def discover_index(store: LocalStore, client: RegistryClient | None, ref: Reference | None,
                   manifest_desc: Descriptor, manifest: Manifest,
                   platform: str = "", flights: DiscoveryFlights | None = None,
                   named: str | None = None) -> Discovered | None:
    """The SOCI index for an image manifest, or None when there is none anywhere.

    With ``flights`` (a long-lived server keeps one per store), concurrent calls for the
    same manifest and repository share one discovery and its answer or error. ``named``
    is an index digest the client chose (upstream's ``soci.index.digest`` snapshot label):
    it is used instead of the search, local or fetched from the image's repository, and
    refused if it is an index of another manifest.
    """
    def discover() -> Discovered | None:
        if named is not None:
            return _named(store, client, ref, manifest_desc, platform, named)
        return _discover(store, client, ref, manifest_desc, manifest, platform)

    if flights is None:
        return discover()
    source = "" if client is None or ref is None else _source(ref)
    return flights.run((manifest_desc.digest, source, named or ""), discover)


def _named(store: LocalStore, client: RegistryClient | None, ref: Reference | None,
           manifest_desc: Descriptor, platform: str, digest: str) -> Discovered:
    index = _local(store, digest)
    if index is not None:
        if index.subject is not None and index.subject.digest != manifest_desc.digest:
            raise SociError(f"SOCI index {digest} is for {index.subject.digest}, "
                            f"not {manifest_desc.digest}")
        return Discovered(digest, index, "named by the client (local store)")
    if client is None or ref is None:
        raise SociError(f"SOCI index {digest} is not in the local store")
    return Discovered(digest, _fetch(client, ref, store, digest, manifest_desc, platform,
                                     remember=False), "named by the client")


def _discover(store: LocalStore, client: RegistryClient | None, ref: Reference | None,
              manifest_desc: Descriptor, manifest: Manifest, platform: str) -> Discovered | None:
    mapped = store.mappings.get(manifest_desc.digest)
    if mapped is not None and (index := _local(store, mapped)) is not None:
        return Discovered(mapped, index, "local mapping")
    for rec in reversed(store.db.indexes(manifest_digests=[manifest_desc.digest], local=True)):
        if (index := _local(store, rec.digest)) is not None:
            return Discovered(rec.digest, index, "local store")
    if client is None or ref is None:
        return None
    fetched = store.fetched.get(_source(ref), manifest_desc.digest)
    if fetched is not None and (index := _local(store, fetched)) is not None:
        return Discovered(fetched, index, "earlier fetch")
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
