"""The prefetch artifacts in a local store, found through the SOCI indexes that list them.

Upstream keeps a row per artifact in its artifacts database; here the indexes are the
record (an artifact no index lists is nothing anyone uses), so nothing new is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from soci.artifacts import LocalStore
from soci.errors import NotFoundError, SociError
from soci.index.model import SociIndex
from soci.oci import mediatypes as mt
from soci.prefetch.model import MAX_ARTIFACT_BYTES, PrefetchArtifact, parse_artifact


@dataclass(slots=True)
class PrefetchEntry:
    digest: str
    layer_digest: str
    size: int
    #: spans named (ranges counted whole), -1 when the blob is missing or malformed
    total_spans: int
    #: when the first index listing it was created (RFC 3339, the index record's)
    created_at: str
    indexes: list[str] = field(default_factory=list)


def _read(store: LocalStore, digest: str, size: int) -> PrefetchArtifact:
    if size > MAX_ARTIFACT_BYTES:
        raise SociError(f"prefetch artifact {digest} is {size} bytes "
                        f"(at most {MAX_ARTIFACT_BYTES} accepted)")
    if not store.content.has_blob(digest):
        raise NotFoundError(f"prefetch artifact {digest} is not in {store.root}")
    return parse_artifact(store.content.read_blob(digest))


def list_prefetch_artifacts(store: LocalStore) -> list[PrefetchEntry]:
    """Every prefetch artifact the store's SOCI indexes list, in index creation order."""
    found: dict[str, PrefetchEntry] = {}
    for rec in store.db.indexes():
        if not store.content.has_blob(rec.digest):
            continue
        try:
            index = SociIndex.parse(store.content.read_blob(rec.digest))
        except SociError:
            continue
        for desc in index.prefetches():
            entry = found.get(desc.digest)
            if entry is None:
                try:
                    spans = _read(store, desc.digest, desc.size).total_spans
                except SociError:
                    spans = -1
                layer = (desc.annotations or {}).get(mt.ANN_LAYER_DIGEST, "")
                entry = found[desc.digest] = PrefetchEntry(desc.digest, layer, desc.size, spans,
                                                           rec.created_at)
            if rec.digest not in entry.indexes:
                entry.indexes.append(rec.digest)
    return list(found.values())


def prefetch_info(store: LocalStore, digest: str) -> tuple[PrefetchEntry, PrefetchArtifact]:
    """A prefetch artifact and what the indexes say of it; NotFoundError if no index in
    the store lists ``digest`` as a prefetch artifact."""
    entry = next((e for e in list_prefetch_artifacts(store) if e.digest == digest), None)
    if entry is None:
        raise NotFoundError(f"{digest} is not a prefetch artifact of any SOCI index in "
                            f"{store.root}")
    return entry, _read(store, digest, entry.size)


def listed_prefetches(store: LocalStore, index_digest: str) -> list[str]:
    """The prefetch artifacts one stored SOCI index lists (none if it is missing or
    unreadable): what removing that index may leave behind."""
    if not store.content.has_blob(index_digest):
        return []
    try:
        index = SociIndex.parse(store.content.read_blob(index_digest))
    except SociError:
        return []
    return [desc.digest for desc in index.prefetches()]


def prefetches_in_use(store: LocalStore) -> set[str]:
    """Every prefetch artifact some stored SOCI index lists (missing or unreadable indexes
    skipped, as :func:`list_prefetch_artifacts` does): each index parsed once, the
    artifacts themselves not read."""
    found: set[str] = set()
    for rec in store.db.indexes():
        found.update(listed_prefetches(store, rec.digest))
    return found


def unused_prefetches(store: LocalStore, digests: list[str]) -> list[str]:
    """Those of ``digests`` that no SOCI index in the store lists any more. Parses every
    stored index: call it once for a batch of removals, not once per index removed."""
    if not digests:
        return []
    still = prefetches_in_use(store)
    return [d for d in dict.fromkeys(digests) if d not in still]
