"""Rebuilding the artifacts database from what is actually in the content store.

Executors may drop indexes, zTOCs and mapping files into the root by hand;
this pass finds every SOCI index in ``content/``, what it indexes (its subject,
or the mapping files for v2 indexes), its zTOCs and, where the image manifest
and config are present, the platform.

Where an index came from survives a rebuild: one recorded under ``fetched/`` (and
not also mapped by the operator under ``indexes/``) was fetched from a registry and
is registered as that repository's, never as a local index, which discovery would
trust for its manifest from every repository.
"""

from __future__ import annotations

import json

from soci.artifacts.db import IndexRecord, ZtocRecord, timestamp
from soci.artifacts.store import LocalStore
from soci.errors import SociError
from soci.index.model import SociIndex, ztoc_layer
from soci.oci import mediatypes as mt
from soci.oci.descriptor import Manifest

_MAX_INDEX_SIZE = 4 << 20


def _mtime(store: LocalStore, digest: str) -> str:
    return timestamp(store.content.blob_path(digest).stat().st_mtime)


def _platform(store: LocalStore, manifest_digest: str) -> str:
    try:
        manifest = Manifest.parse(store.content.read_blob(manifest_digest))
        config = json.loads(store.content.read_blob(manifest.config.digest))
        return "/".join(p for p in (config["os"], config["architecture"],
                                    config.get("variant", "")) if p)
    except (SociError, ValueError, KeyError, TypeError):
        return ""


def rebuild_db(store: LocalStore) -> tuple[int, int]:
    """Replace the database's contents; return (indexes, zTOCs) found."""
    mapped: dict[str, list[str]] = {}
    for manifest_digest, index_digest in store.mappings.items():
        mapped.setdefault(index_digest, []).append(manifest_digest)
    fetched: dict[str, list[tuple[str, str]]] = {}  # index -> [(source, manifest)]
    for source, manifest_digest, index_digest in store.fetched.items():
        fetched.setdefault(index_digest, []).append((source, manifest_digest))
    indexes: list[tuple[IndexRecord, list[str]]] = []
    ztocs: dict[str, ZtocRecord] = {}
    for digest in store.content.blobs():
        path = store.content.blob_path(digest)
        if path.stat().st_size > _MAX_INDEX_SIZE:
            continue
        head = path.read_bytes()[:1]
        if head != b"{":
            continue
        try:
            index = SociIndex.parse(store.content.read_blob(digest))
        except SociError:
            continue
        if digest in mapped or digest not in fetched:  # the operator's (or dropped by hand)
            source = ""
            targets = [index.subject.digest] if index.subject else mapped.get(digest, [""])
        else:
            source, manifest_digest = fetched[digest][-1]
            targets = [index.subject.digest if index.subject else manifest_digest]
        members = []
        for desc in index.ztocs():
            try:
                layer_digest, span = ztoc_layer(desc)
            except SociError:
                continue
            if store.content.has_blob(desc.digest):
                ztocs[desc.digest] = ZtocRecord(
                    desc.digest, desc.size, layer_digest,
                    (desc.annotations or {}).get(mt.ANN_LAYER_MEDIA_TYPE, ""), span,
                    _mtime(store, desc.digest))
            members.append(desc.digest)
        size = path.stat().st_size
        for target in targets:
            indexes.append((IndexRecord(digest, size, mt.OCI_MANIFEST, index.artifact_type,
                                        target, target, _platform(store, target) if target else "",
                                        _mtime(store, digest), source), members))
    with store.db.transaction():  # readers see the old records or the new, never a mix
        store.db.clear()
        for rec in ztocs.values():
            store.db.put_ztoc(rec)
        for rec, members in indexes:
            store.db.put_index(rec, members)
    return len({rec.digest for rec, _ in indexes}), len(ztocs)
