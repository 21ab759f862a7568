"""``soci push``: publish a v1 SOCI index and its zTOCs, and register it as a referrer.

Blobs go first (the empty config and each zTOC, skipping those the registry
already has), then the index manifest by digest, then the referrer entry: with
no referrers API the image index tagged ``sha256-<subject hex>`` is updated,
keeping whatever else refers to the image. Nothing is recorded locally as
pushed, so a push that dies half way is simply run again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from soci.artifacts import LocalStore
from soci.cancel import CancelToken, run_workers
from soci.errors import SociError
from soci.index.model import SociIndex
from soci.index.streams import CountingReader
from soci.oci import mediatypes as mt
from soci.oci.descriptor import Descriptor
from soci.registry import Reference, RegistryClient


def push_index(client: RegistryClient, ref: Reference, store: LocalStore, index_digest: str,
               *, max_concurrent_uploads: int = 3,
               report: Callable[[str], None] | None = None,
               progress: Callable[[Descriptor, int], None] | None = None,
               cancel: CancelToken | None = None) -> Descriptor:
    """Push the v1 index ``index_digest`` and its blobs; ``progress(blob, bytes_sent)`` as
    each blob goes. ``KeyboardInterrupt`` (or ``cancel``) stops the uploads at their next
    read and cancels their upload sessions; nothing is registered then."""
    token = cancel if cancel is not None else CancelToken()
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
        if progress is not None:
            progress(desc, 0)
        on_read = None if progress is None else (lambda n: progress(desc, n))
        with store.content.blob_path(desc.digest).open("rb") as f:
            client.push_blob(ref, desc.digest, CountingReader(f, on_read, token),  # type: ignore[arg-type]
                             desc.size)
        if report:
            report(f"{desc.digest}: pushed ({desc.size} bytes)")

    run_workers(upload, blobs, workers=max_concurrent_uploads, cancel=token)
    desc = index.descriptor(data)
    client.put_manifest(replace(ref, tag=None, digest=index_digest), data, mt.OCI_MANIFEST)
    referrer = Descriptor(mt.OCI_MANIFEST, desc.digest, desc.size, index.annotations or None,
                          artifact_type=index.artifact_type)
    client.add_referrer(ref, index.subject.digest, referrer.to_json())
    if report:
        report(f"{desc.digest}: SOCI index pushed and registered for {index.subject.digest}")
    return desc
