"""``soci create``: zTOCs for an image's layers, built while each layer streams, and the index.

Each layer is read once, straight from its source (registry response body,
layout file or archive member): the zTOC builder consumes the stream, and the
stream's own digest check runs at its end, so nothing is staged on disk and a
corrupt layer never yields a zTOC.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from typing import BinaryIO

from soci import BUILD_TOOL_IDENTIFIER
from soci.artifacts import IndexRecord, LocalStore, ZtocRecord
from soci.artifacts.db import now
from soci.cancel import CancelToken, run_workers
from soci.errors import DigestMismatchError, LayerFormatError, SociError
from soci.image.resolve import PlatformImage
from soci.image.sources import ImageSource
from soci.index.model import SociIndex
from soci.oci import boundedjson
from soci.oci import mediatypes as mt
from soci.oci.descriptor import Descriptor
from soci.oci.whiteout import OPAQUE_MARKER
from soci.prefetch import MergedLayers, PrefetchArtifact, entrypoint_path, prefetch_spans
from soci.ztoc import DEFAULT_SPAN_SIZE, UnservableLayerError, Ztoc, build_ztoc, decode, encode

DEFAULT_MIN_LAYER_SIZE = 10 << 20
OPTIMIZATIONS = ("xattr",)


class EmptyIndexError(SociError):
    """Every layer was skipped, so there is no index to make."""


@dataclass(slots=True)
class CreateOptions:
    span_size: int = DEFAULT_SPAN_SIZE
    min_layer_size: int = DEFAULT_MIN_LAYER_SIZE
    force: bool = False
    optimizations: tuple[str, ...] = ()
    build_tool: str = BUILD_TOOL_IDENTIFIER
    parallel: int = 2
    #: Files whose spans a runtime should fetch as soon as their layer is mounted
    #: (upstream's --prefetch-file), and whether to add the image's entrypoint (ours).
    prefetch_files: tuple[str, ...] = ()
    prefetch_entrypoint: bool = False


@dataclass(slots=True)
class LayerOutcome:
    layer: Descriptor
    status: str                      # "built", "exists" or "skipped"
    ztoc: Descriptor | None = None
    reason: str = ""


@dataclass(slots=True)
class CreatedIndex:
    image: PlatformImage
    index: SociIndex
    desc: Descriptor
    layers: list[LayerOutcome] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LayerProgress:
    """How far one layer's zTOC build is: compressed bytes read from the source (which runs
    ahead) and indexed (inflated, checkpointed, tar headers scanned), of ``layer.size``."""

    layer: Descriptor
    read: int
    indexed: int


def _skip_reason(layer: Descriptor, opts: CreateOptions) -> str | None:
    if layer.media_type == mt.SOCI_PREFETCH:
        return "is a prefetch artifact"
    if not mt.is_layer(layer.media_type):
        return f"is not a layer ({layer.media_type})"
    if layer.size < opts.min_layer_size:
        return f"size {layer.size} is less than min-layer-size {opts.min_layer_size}"
    if layer.media_type not in mt.GZIP_LAYERS | mt.TAR_LAYERS | mt.ZSTD_LAYERS:
        return f"has an unsupported media type {layer.media_type}"
    return None


def _disable_xattrs(ztoc: Ztoc) -> bool:
    """Upstream's xattr optimisation: no xattrs and no opaque directories in the layer.

    A plain suffix test, not :func:`whiteout_kind`: upstream's (``HasSuffix``) also counts
    ``x.wh..wh..opq`` and misses ``.wh..wh..opq/``, and the annotation must match its."""
    return not any(e.xattrs or e.name.endswith(OPAQUE_MARKER) for e in ztoc.entries)


def _ztoc_descriptor(layer: Descriptor, digest: str, size: int,
                     ztoc: Callable[[], Ztoc], opts: CreateOptions) -> Descriptor:
    annotations = {
        mt.ANN_LAYER_MEDIA_TYPE: layer.media_type,
        mt.ANN_LAYER_DIGEST: layer.digest,
        mt.ANN_SPAN_SIZE: str(opts.span_size),
    }
    if "xattr" in opts.optimizations and _disable_xattrs(ztoc()):
        annotations[mt.ANN_DISABLE_XATTRS] = "true"
    return Descriptor(mt.SOCI_ZTOC, digest, size, annotations)


def build_layer(source: ImageSource, layer: Descriptor, store: LocalStore, opts: CreateOptions,
                progress: Callable[[LayerProgress], None] | None = None,
                cancel: CancelToken | None = None) -> LayerOutcome:
    """One layer's zTOC: skipped, reused from the store, or built and stored. A cancelled
    build raises ``Cancelled`` and stores nothing."""
    reason = _skip_reason(layer, opts)
    if reason is not None:
        return LayerOutcome(layer, "skipped", reason=reason)
    existing = None if opts.force else store.db.ztoc_for_layer(layer.digest, opts.span_size)
    if existing is not None and store.content.has_blob(existing.digest):
        def stored() -> Ztoc:
            return decode(store.content.read_blob(existing.digest))

        desc = _ztoc_descriptor(layer, existing.digest, existing.size, stored, opts)
        return LayerOutcome(layer, "exists", desc)

    def report(indexed: int, read: int) -> None:
        if progress is not None:
            progress(LayerProgress(layer, read, indexed))

    report(0, 0)
    stream: BinaryIO
    # The builder hashes every byte; its digest is checked against the layer's below,
    # before anything is stored, so the stream need not hash them a second time.
    with closing(source.open_blob(layer, verify=False)) as stream:
        try:
            result = build_ztoc(stream, span_size=opts.span_size, build_tool=opts.build_tool,
                                progress=report, cancel=cancel)
        except UnservableLayerError as e:
            # A zstd layer of one frame (or frames far above the span size): valid, but it
            # can only be pulled whole, so it is left out of the index like upstream's skips.
            return LayerOutcome(layer, "skipped", reason=str(e).replace("zstd layer ", "", 1))
    if result.layer_digest != layer.digest or result.layer_size != layer.size:
        raise DigestMismatchError(
            f"got {result.layer_size} bytes hashing to {result.layer_digest}, not the "
            f"{layer.size} bytes the manifest gives"
        )
    if cancel is not None:
        cancel.raise_if_cancelled()
    data = encode(result.ztoc)
    digest = store.content.write_blob(data)
    store.db.put_ztoc(ZtocRecord(digest, len(data), layer.digest, layer.media_type,
                                 opts.span_size, now()))
    desc = _ztoc_descriptor(layer, digest, len(data), lambda: result.ztoc, opts)
    return LayerOutcome(layer, "built", desc)


def create_index(source: ImageSource, image: PlatformImage, store: LocalStore,
                 opts: CreateOptions, *, version: int = 1, refs: list[str] | None = None,
                 on_layer: Callable[[LayerOutcome], None] | None = None,
                 progress: Callable[[LayerProgress], None] | None = None,
                 cancel: CancelToken | None = None,
                 warn: Callable[[str], None] | None = None) -> CreatedIndex:
    """Build (or reuse) every layer's zTOC, then write the SOCI index and its mapping.

    With ``opts.prefetch_files`` (or ``prefetch_entrypoint``), a prefetch artifact per
    layer holding any of those files follows the zTOCs in the index, in layer order, as
    upstream writes them; files found in no indexed layer are told to ``warn``.

    Layers are built ``opts.parallel`` at a time on daemon threads; ``progress`` and
    ``on_layer`` are called from them. ``KeyboardInterrupt`` in the calling thread (or
    ``cancel`` from anywhere) stops every build within a chunk; zTOCs already complete
    stay stored (they are valid, and reused by the next run), no index is written.
    """
    token = cancel if cancel is not None else CancelToken()

    image_name = f"{refs[0] if refs else image.desc.digest} ({image.platform})"

    def one(layer: Descriptor) -> LayerOutcome:
        try:
            outcome = build_layer(source, layer, store, opts, progress, token)
        except (LayerFormatError, DigestMismatchError) as e:  # name the layer and the image
            raise e.within(f"layer {layer.digest} of {image_name}") from None
        if on_layer is not None:
            on_layer(outcome)
        return outcome

    outcomes = run_workers(one, image.manifest.layers, workers=opts.parallel, cancel=token)
    token.raise_if_cancelled()
    ztocs = blobs = [o.ztoc for o in outcomes if o.ztoc is not None]
    if not blobs:
        raise EmptyIndexError(
            f"no zTOCs created for {image_name}: every layer was skipped "
            f"(smaller than --min-layer-size {opts.min_layer_size}, not gzip/zstd/tar, "
            f"or zstd frames too large to serve lazily)"
        )
    # The image manifest and config, so the store can be rebuilt (platform included).
    store.content.write_blob(image.data, image.desc.digest)
    if not store.content.has_blob(image.manifest.config.digest):
        with closing(source.open_blob(image.manifest.config)) as config:
            store.content.ingest(config, image.manifest.config.digest, image.manifest.config.size)
    if opts.prefetch_files or opts.prefetch_entrypoint:
        blobs = ztocs + _prefetch_artifacts(image, store, opts, ztocs, warn)
    subject = None
    if version == 1:
        subject = Descriptor(image.desc.media_type, image.desc.digest, image.desc.size)
    index = SociIndex(version, blobs, subject, {mt.ANN_BUILD_TOOL: opts.build_tool})
    data = index.encode()
    store.content.write_blob(mt.EMPTY_JSON)
    digest = store.content.write_blob(data)
    desc = index.descriptor(data)
    store.db.put_index(
        IndexRecord(digest, len(data), mt.OCI_MANIFEST, index.artifact_type, image.desc.digest,
                    image.top.digest, str(image.platform), now()),
        [b.digest for b in ztocs],
        refs or [],
    )
    if version == 1:
        store.mappings.put(image.desc.digest, digest)
    return CreatedIndex(image, index, desc, outcomes)


def _prefetch_artifacts(image: PlatformImage, store: LocalStore, opts: CreateOptions,
                        ztocs: list[Descriptor],
                        warn: Callable[[str], None] | None) -> list[Descriptor]:
    """Write the prefetch artifact of each layer holding a requested file; their
    descriptors in the image's layer order (upstream's position: after every zTOC)."""
    by_layer = {d.annotations[mt.ANN_LAYER_DIGEST]: d for d in ztocs if d.annotations}
    layers = [(layer.digest, decode(store.content.read_blob(by_layer[layer.digest].digest)))
              for layer in image.manifest.layers if layer.digest in by_layer]
    merged = MergedLayers(layers)
    paths = list(opts.prefetch_files)
    resolved: set[str] = set()
    if opts.prefetch_entrypoint:
        try:
            config = boundedjson.loads(store.content.read_blob(image.manifest.config.digest),
                                       "image config")
        except ValueError as e:
            raise SociError(f"image config {image.manifest.config.digest}: {e}") from None
        found = entrypoint_path(config if isinstance(config, dict) else {}, merged)
        if found is None:
            if warn is not None:
                warn("--prefetch-entrypoint: the image's entrypoint is in no indexed layer")
        else:
            paths.append(found)
            resolved.add(found)
    spans = prefetch_spans(merged, paths, warn, resolved)
    descs = []
    for layer in image.manifest.layers:
        ranges = spans.pop(layer.digest, ())
        if not ranges:
            continue
        data = PrefetchArtifact(ranges).encode()
        digest = store.content.write_blob(data)
        descs.append(Descriptor(mt.SOCI_PREFETCH, digest, len(data),
                                {mt.ANN_LAYER_DIGEST: layer.digest}))
    return descs
