"""``soci push``: publish a v1 SOCI index and its zTOCs, and register it as a referrer.

Blobs go first (the empty config and each zTOC, skipping those the registry
already has), then the index manifest by digest, then the referrer entry: with
no referrers API the image index tagged ``sha256-<subject hex>`` is updated,
keeping whatever else refers to the image. Nothing is recorded locally as
pushed, so a push that dies half way is simply run again.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from soci.artifacts import LocalStore
from soci.errors import SociError
from soci.index.model import SociIndex
from soci.oci import mediatypes as mt
from soci.oci.descriptor import Descriptor
from soci.registry import Reference, RegistryClient


def push_index(client: RegistryClient, ref: Reference, store: LocalStore, index_digest: str,
               *, max_concurrent_uploads: int = 3,
               report: Callable[[str], None] | None = None) -> Descriptor:
    data = store.content.read_blob(index_digest)
    index = SociIndex.parse(data)
    if index.version != 1 or index.subject is None:
        raise SociError(f"{index_digest} is a SOCI v2 index: publish it with soci convert")
    blobs = [Descriptor(index.artifact_type, mt.EMPTY_JSON_DIGEST, len(mt.EMPTY_JSON)),
             *index.blobs]

    def upload(desc: Descriptor) -> None:
        if client.blob_exists(ref, desc.digest):
            if report:
                report(f"{desc.digest}: already in {ref.registry}/{ref.repository}")
            return
        client.push_blob(ref, desc.digest, store.content.read_blob(desc.digest), desc.size)
        if report:
            report(f"{desc.digest}: pushed ({desc.size} bytes)")

    with ThreadPoolExecutor(max_workers=max(1, max_concurrent_uploads)) as pool:
        for future in [pool.submit(upload, b) for b in blobs]:
            future.result()
    desc = index.descriptor(data)
    client.put_manifest(replace(ref, tag=None, digest=index_digest), data, mt.OCI_MANIFEST)
    referrer = Descriptor(mt.OCI_MANIFEST, desc.digest, desc.size, index.annotations or None,
                          artifact_type=index.artifact_type)
    client.add_referrer(ref, index.subject.digest, referrer.to_json())
    if report:
        report(f"{desc.digest}: SOCI index pushed and registered for {index.subject.digest}")
    return desc
