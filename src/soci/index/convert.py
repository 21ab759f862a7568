"""``soci convert``: a SOCI-enabled image (SOCI index manifest v2), layers untouched.

The result is an OCI image index holding each image manifest, re-serialized
as an OCI manifest and annotated with ``com.amazon.soci.index-digest``, plus
one SOCI v2 index descriptor per converted platform (artifactType, platform,
``com.amazon.soci.image-manifest-digest``), as upstream's convert builds it.
Layers and configs are shared with the source image and copied only when the
destination does not have them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import BinaryIO

from soci.artifacts import LocalStore
from soci.errors import NotFoundError
from soci.image.destinations import ImageDestination
from soci.image.resolve import PlatformImage, resolve_image
from soci.image.sources import ImageSource
from soci.index.create import (
    CreatedIndex,
    CreateOptions,
    EmptyIndexError,
    LayerOutcome,
    LayerProgress,
    create_index,
)
from soci.index.model import ztoc_layer
from soci.index.streams import CountingReader
from soci.oci import mediatypes as mt
from soci.oci.descriptor import Descriptor, Index, Manifest, Platform
from soci.oci.verify import sha256_digest


@dataclass(slots=True)
class Converted:
    top: Descriptor
    created: list[CreatedIndex]


def convert_image(source: ImageSource, dest: ImageDestination, store: LocalStore,
                  opts: CreateOptions, *, platforms: list[Platform] | None = None,
                  all_platforms: bool = False,
                  on_layer: Callable[[LayerOutcome], None] | None = None,
                  progress: Callable[[LayerProgress], None] | None = None,
                  on_image: Callable[[PlatformImage], None] | None = None,
                  copying: Callable[[Descriptor, int], None] | None = None,
                  warn: Callable[[str], None] | None = None) -> Converted:
    """Index each platform's layers (``on_image`` is told of each platform first, then
    ``progress``/``on_layer`` as in :func:`create_index`), then write the converted image;
    ``copying(blob, bytes)`` follows each blob copied to the destination."""
    resolved = resolve_image(source, platforms, all_platforms)
    created = []
    for image in resolved.images:
        if on_image is not None:
            on_image(image)
        try:
            created.append(create_index(source, image, store, opts, version=2,
                                        refs=[str(source.name)], on_layer=on_layer,
                                        progress=progress, warn=warn))
        except EmptyIndexError:
            if len(resolved.images) == 1:
                raise
    if not created:
        raise EmptyIndexError("no SOCI index created: every layer of every platform was skipped")
    by_manifest = {c.image.desc.digest: c for c in created}

    if resolved.index is not None:
        index = Index(mt.OCI_INDEX, list(resolved.index.manifests), resolved.index.annotations,
                      resolved.index.subject, resolved.index.artifact_type)
    else:
        only = resolved.images[0]
        index = Index(mt.OCI_INDEX, [replace(only.desc, platform=only.platform)])

    uploads: list[tuple[Descriptor, bytes]] = []  # manifests to write, children first
    for i, entry in enumerate(index.manifests):
        if entry.media_type not in mt.MANIFESTS:
            continue
        done = by_manifest.get(entry.digest)
        original = done.image.data if done else source.manifest(entry)
        manifest = Manifest.parse(original, entry.media_type)
        _copy_image_blobs(source, dest, manifest, copying)
        manifest.media_type = mt.OCI_MANIFEST
        manifest.config = replace(manifest.config, media_type=mt.OCI_CONFIG)
        if done is not None:
            manifest.annotations = {**(manifest.annotations or {}),
                                    mt.ANN_INDEX_DIGEST: done.desc.digest}
            # Newer containers/storage asks the layer store by TOC digest: name each
            # indexed layer's zTOC (the layer bytes stay the same blobs).
            ztocs = {ztoc_layer(z)[0]: z.digest for z in done.index.ztocs()}
            manifest.layers = [
                replace(layer, annotations={**(layer.annotations or {}),
                                            mt.ANN_TOC_DIGEST: ztocs[layer.digest]})
                if layer.digest in ztocs else layer
                for layer in manifest.layers
            ]
        data = manifest.encode()
        new = replace(entry, media_type=mt.OCI_MANIFEST, digest=sha256_digest(data),
                      size=len(data), annotations=manifest.annotations)
        index.manifests[i] = new
        uploads.append((new, data))
        if done is not None:
            done.desc = replace(done.desc, annotations={mt.ANN_IMAGE_MANIFEST_DIGEST: new.digest},
                                platform=done.image.platform)

    for c in created:
        _copy_soci_index(store, dest, c)
        same = [i for i, m in enumerate(index.manifests)
                if m.artifact_type == mt.SOCI_INDEX_V2 and m.platform is not None
                and m.platform.matches(c.image.platform)]
        if same:
            index.manifests[same[0]] = c.desc
        else:
            index.manifests.append(c.desc)

    for desc, data in uploads:
        dest.put_manifest(desc, data)
    data = index.encode()
    top = Descriptor(mt.OCI_INDEX, sha256_digest(data), len(data))
    dest.commit(top, data)

    for c in created:
        # The converted manifest is what runtimes will pull: map it for local-first lookup.
        manifest_digest = (c.desc.annotations or {})[mt.ANN_IMAGE_MANIFEST_DIGEST]
        store.mappings.put(manifest_digest, c.desc.digest)
    return Converted(top, created)


def _copy_image_blobs(source: ImageSource, dest: ImageDestination, manifest: Manifest,
                      copying: Callable[[Descriptor, int], None] | None) -> None:
    for blob in [manifest.config, *manifest.layers]:
        def open_blob(blob: Descriptor = blob) -> BinaryIO:
            stream = source.open_blob(blob)
            if copying is None:
                return stream
            return CountingReader(stream, lambda n: copying(blob, n))  # type: ignore[return-value]

        dest.put_blob(blob, open_blob)


def _copy_soci_index(store: LocalStore, dest: ImageDestination, created: CreatedIndex) -> None:
    config = Descriptor(mt.SOCI_INDEX_V2, mt.EMPTY_JSON_DIGEST, len(mt.EMPTY_JSON))
    for blob in [config, *created.index.blobs]:
        if not store.content.has_blob(blob.digest):
            raise NotFoundError(f"{blob.digest} is missing from the local content store")
        # Verified when stored; a seekable file lets an upload be retried from the start.
        dest.put_blob(blob, lambda blob=blob: store.content.blob_path(blob.digest).open("rb"))
    data = store.content.read_blob(created.desc.digest)
    dest.put_manifest(created.desc, data)
