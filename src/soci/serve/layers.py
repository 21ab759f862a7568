"""Resolving (image ref, layer digest) to a lazily served layer, and keeping count of users.

A layer is served only if the image's SOCI index (found in the fork's order,
see ``soci.index.discover``) holds a zTOC for it; otherwise the answer is
"not here" and containers/storage pulls the layer itself.

What a mounted layer serves is decided by its zTOC (the tree, the spans) and by the
image's manifest and config (size, compression, diff ID). Two images share one mounted
layer only when all of these are the same (``Layer.key``): one image's index must never
decide what another image's containers see. Images whose zTOCs differ still share the
fetched spans wherever the span digests agree (the disk cache is by span digest).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, cast

from soci.artifacts import LocalStore
from soci.errors import DigestMismatchError, RegistryError, SociError
from soci.fs.cache import DiskCache, MemoryCache
from soci.fs.spans import SpanManager
from soci.fs.tree import LayerTree
from soci.image.names import ImageName
from soci.image.resolve import diff_ids, resolve_image
from soci.image.sources import RegistrySource
from soci.index.discover import DiscoveryFlights, discover_index
from soci.index.model import ztoc_layer
from soci.oci import mediatypes as mt
from soci.oci.descriptor import Descriptor, Manifest, Platform
from soci.prefetch import (
    MAX_ARTIFACT_BYTES,
    EmptyPrefetchError,
    PrefetchArtifact,
    PrefetchFormatError,
    parse_artifact,
)
from soci.registry import Reference, RegistryClient
from soci.registry.reference import validate_digest
from soci.ztoc import Compression, decode
from soci.ztoc.codec import check as check_ztoc

log = logging.getLogger("soci.store")  # the logger name operators already filter on

#: Seconds a "no lazy layer here" answer or a resolved manifest is trusted.
RECHECK_SEC = 60.0

#: containers/storage's compression code for gzip (pkg/archive.Gzip).
_GZIP = 2
_UNCOMPRESSED = 0
_ZSTD = 4

#: What a mounted layer serves: (layer digest, zTOC digest, diff ID, compression, size).
LayerKey = tuple[str, str, str, int, int]


#: Separates an image reference from the SOCI index a client named for it in a lookup name
#: (a newline never occurs in a reference).
_NAMED_INDEX = "\n"


def lookup_name(ref: str, index_digest: str | None = None) -> str:
    """What ``LayerManager.get`` takes as the image: the reference, and the SOCI index a
    client named for it (containerd's ``soci.index.digest`` label), if any."""
    return ref if not index_digest else f"{ref}{_NAMED_INDEX}{index_digest}"


class ErrorCounter(Protocol):
    """Where the core reports failed registry requests (``soci.serve.metrics.Metrics`` is
    one); a protocol, so the core needs nothing from the front ends' metrics."""

    def registry_error(self, status: int | str) -> None: ...


class _Counted:
    """A stream that adds the length of everything read from it to a callback."""

    def __init__(self, stream: BinaryIO, add: Callable[[int], None]) -> None:
        self._stream = stream
        self._add = add

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        self._add(len(data))
        return data


@dataclass(slots=True)
class Layer:
    """One lazily served layer: its tree, its span manager, its containers/storage info."""

    digest: str
    size: int
    ref: Reference
    tree: LayerTree
    spans: SpanManager
    ztoc_digest: str
    diff_id: str
    compression: int
    users: int = 0
    idle_since: float | None = None  # when the last user let go (None: in use, or never used)
    blob_lock: threading.Lock = field(default_factory=threading.Lock)
    blob_bytes_fetched: int = 0  # the whole-blob download behind ``blob`` (podman push)
    #: the prefetch artifact the image's SOCI index has for this layer (upstream v0.13+)
    prefetch: Descriptor | None = None
    prefetched_spans: int = 0  # spans loaded because the prefetch artifact named them

    @property
    def key(self) -> LayerKey:
        """Everything that decides what this layer serves; layers are shared only by it."""
        return (self.digest, self.ztoc_digest, self.diff_id, self.compression, self.size)

    @property
    def fetched_bytes(self) -> int:
        """Compressed bytes fetched from the registry for this layer: spans and blob."""
        return self.spans.bytes_fetched + self.blob_bytes_fetched

    def info(self, key: str) -> bytes:
        """containers/storage's Layer JSON, for a lookup by blob digest or by TOC digest.

        Newer containers/storage asks by TOC digest and then wants ``toc-digest`` and the
        expected diff ID in ``flags`` (``diff-size`` -1: unknown); older versions ask by
        compressed digest and read the compressed and uncompressed digests.
        """
        doc: dict[str, object] = {
            "compressed-diff-digest": self.digest,
            "compressed-size": self.size,
            "diff-digest": self.diff_id,
            "compression": self.compression,
        }
        if key != self.digest:
            doc.update({"diff-size": -1, "toc-digest": key,
                        "flags": {"expected-layer-diffid": self.diff_id}})
        return json.dumps(doc).encode() + b"\n"

    def read_blob(self, client: RegistryClient, store: LocalStore, offset: int, size: int) -> bytes:
        """Bytes of the compressed blob: downloaded whole and verified once, then local."""
        with self.blob_lock:
            if not store.content.has_blob(self.digest):
                log.info("layer %s: blob requested, downloading it whole to verify it",
                         self.digest)
                with client.open_blob(self.ref, self.digest, size=self.size) as stream:
                    counted = cast(BinaryIO, _Counted(stream, self._count_blob))
                    store.content.ingest(counted, self.digest, self.size)
        with open(store.content.blob_path(self.digest), "rb") as f:
            f.seek(offset)
            return f.read(size)

    def _count_blob(self, n: int) -> None:
        self.blob_bytes_fetched += n


@dataclass(frozen=True, slots=True)
class ImageLayers:
    ref: Reference
    manifest_desc: Descriptor
    manifest: Manifest
    diff_ids: list[str]
    #: digests of the layers with a zTOC in the image's SOCI index; None: no index at all
    lazy: set[str] | None


class LayerManager:
    def __init__(self, store: LocalStore, client: RegistryClient, memory: MemoryCache,
                 disk: DiskCache | None, platform: Platform | None = None,
                 metrics: ErrorCounter | None = None) -> None:
        self.store = store
        self._discoveries = DiscoveryFlights()  # podman looks up an image's layers at once
        self.metrics = metrics
        self.client = client
        self.memory = memory
        self.disk = disk
        self.platform = platform or Platform.host()
        self._lock = threading.Lock()
        self._layers: dict[LayerKey, Layer] = {}
        self._resolving: dict[tuple[str, str], threading.Event] = {}
        # Negative answers and resolved manifests are remembered for RECHECK_SEC only, so an
        # index published (or a tag moved) later is noticed without a restart.
        self._absent: dict[tuple[str, str], float] = {}
        # (ref, blob or TOC digest) -> the layer that image was resolved to. Only this: a
        # layer mounted for one image is never found by digest for another image.
        self._aliases: dict[tuple[str, str], LayerKey] = {}
        self._images: dict[str, tuple[float, Descriptor, Manifest, list[str]]] = {}
        self._image_layers: dict[str, tuple[float, ImageLayers]] = {}
        #: Told of each layer when it is first mounted (not when a mounted one is shared):
        #: where the prefetch of its artifact's spans starts (``soci.serve.background``).
        self.on_mount: Callable[[Layer], None] | None = None

    def layers(self) -> list[Layer]:
        with self._lock:
            return list(self._layers.values())

    # -- resolution --------------------------------------------------------------------

    def _image(self, ref: Reference) -> tuple[Descriptor, Manifest, list[str]]:
        """The platform manifest of ``ref`` and its diff IDs (cached for RECHECK_SEC)."""
        key = str(ref)
        with self._lock:
            cached = self._images.get(key)
        if cached is not None and time.monotonic() - cached[0] < RECHECK_SEC:
            return cached[1:]
        source = RegistrySource(ImageName("registry", ref=ref), self.client)
        image = resolve_image(source, [self.platform]).images[0]
        ids = diff_ids(source, image)
        now = time.monotonic()
        with self._lock:
            # Expired answers are dropped here, so neither table grows with every ref seen.
            for old in [k for k, v in self._images.items() if now - v[0] >= RECHECK_SEC]:
                del self._images[old]
            for old in [k for k, t in self._absent.items() if now - t >= RECHECK_SEC]:
                del self._absent[old]
            self._images[key] = (now, image.desc, image.manifest, ids)
        return image.desc, image.manifest, ids

    def image(self, ref_text: str) -> ImageLayers:
        """The manifest, diff IDs and lazily servable layers of the image ``ref_text`` (a
        ``lookup_name``) names: what a front end needs to handle its other layers itself."""
        with self._lock:
            cached = self._image_layers.get(ref_text)
        if cached is not None and time.monotonic() - cached[0] < RECHECK_SEC:
            return cached[1]
        ref_part, _, named = ref_text.partition(_NAMED_INDEX)
        ref = Reference.parse(ref_part)
        if named:
            validate_digest(named)
        desc, manifest, ids = self._image(ref)
        found = discover_index(self.store, self.client, ref, desc, manifest, str(self.platform),
                               self._discoveries, named or None)
        lazy = None if found is None else {ztoc_layer(z)[0] for z in found.index.ztocs()}
        answer = ImageLayers(ref, desc, manifest, ids, lazy)
        now = time.monotonic()
        with self._lock:
            for old in [k for k, v in self._image_layers.items() if now - v[0] >= RECHECK_SEC]:
                del self._image_layers[old]
            self._image_layers[ref_text] = (now, answer)
        return answer

    def get(self, ref_text: str, key: str) -> Layer | None:
        """The layer for a blob or TOC digest, or None when it is not served lazily."""
        lookup = (ref_text, key)
        while True:
            with self._lock:
                layer = self._aliased(lookup)
                if layer is not None:
                    return layer
                if time.monotonic() - self._absent.get(lookup, -RECHECK_SEC) < RECHECK_SEC:
                    return None
                event = self._resolving.get(lookup)
                if event is None:
                    event = self._resolving[lookup] = threading.Event()
                    break
            event.wait()
        try:
            layer = self._resolve(ref_text, key)
            new = False
            with self._lock:
                if layer is None:
                    self._absent[lookup] = time.monotonic()
                else:
                    new = layer.key not in self._layers
                    layer = self._layers.setdefault(layer.key, layer)
                    self._aliases[lookup] = layer.key
            if new and self.on_mount is not None:
                try:  # best effort: never fails the mount
                    self.on_mount(cast(Layer, layer))
                except Exception:
                    log.exception("layer %s: mount hook failed", key)
            return layer
        finally:
            with self._lock:
                self._resolving.pop(lookup).set()

    def _aliased(self, lookup: tuple[str, str]) -> Layer | None:
        """The layer ``(ref, digest)`` was resolved to, if still mounted (caller locks)."""
        key = self._aliases.get(lookup)
        return None if key is None else self._layers.get(key)

    def _resolve(self, ref_text: str, key: str) -> Layer | None:
        """The layer for a compressed-blob digest or a TOC digest (see ANN_TOC_DIGEST)."""
        ref_part, _, named = ref_text.partition(_NAMED_INDEX)
        try:
            ref = Reference.parse(ref_part)
            if named:
                validate_digest(named)
        except ValueError as e:
            log.warning("image %r: not a valid reference (%s)", ref_text, e)
            return None
        desc, manifest, diff_ids = self._image(ref)
        position = next((i for i, layer in enumerate(manifest.layers) if layer.digest == key),
                        None)
        if position is None:
            position = next((i for i, layer in enumerate(manifest.layers)
                             if (layer.annotations or {}).get(mt.ANN_TOC_DIGEST) == key), None)
        found = discover_index(self.store, self.client, ref, desc, manifest, str(self.platform),
                               self._discoveries, named or None)
        if found is None:
            log.info("image %s: no SOCI index found; layer %s will be pulled normally", ref, key)
            return None
        if position is None:  # a TOC digest that only the index knows: the zTOC's own digest
            layer_digest = next((ztoc_layer(z)[0] for z in found.index.ztocs()
                                 if z.digest == key), None)
            position = next((i for i, layer in enumerate(manifest.layers)
                             if layer.digest == layer_digest), None)
        if position is None:
            log.info("image %s: %s is not a layer of its %s manifest", ref, key, self.platform)
            return None
        digest = manifest.layers[position].digest
        if position >= len(diff_ids):
            # containers/storage needs the layer's DiffID (it crashes without one).
            log.warning("image %s: its config has no diff ID for layer %s; pulled normally",
                        ref, digest)
            return None
        # Asked by a zTOC's digest: serve that zTOC (info() names it), not another one the
        # index may also hold for the layer.
        candidates = [z for z in found.index.ztocs() if ztoc_layer(z)[0] == digest]
        ztoc_desc = next((z for z in candidates if z.digest == key),
                         candidates[0] if candidates else None)
        if ztoc_desc is None:
            log.info("image %s: layer %s has no zTOC in index %s (pulled normally)", ref, digest,
                     found.digest)
            return None
        size = manifest.layers[position].size
        media_type = manifest.layers[position].media_type
        kind = (Compression.UNCOMPRESSED if media_type in mt.TAR_LAYERS
                else Compression.ZSTD if media_type in mt.ZSTD_LAYERS else Compression.GZIP)
        compression = {Compression.UNCOMPRESSED: _UNCOMPRESSED, Compression.ZSTD: _ZSTD,
                       Compression.GZIP: _GZIP}[kind]
        wanted: LayerKey = (digest, ztoc_desc.digest, diff_ids[position], compression, size)
        with self._lock:
            shared = self._layers.get(wanted)
        if shared is not None:  # another image mounted this very layer with this very zTOC
            return shared
        try:
            try:
                stored = self.store.content.blob_path(ztoc_desc.digest).stat().st_size
            except FileNotFoundError:
                raise SociError("it is not in the local store") from None
            if stored != ztoc_desc.size:  # before reading, let alone decoding, any of it
                raise SociError(f"it is {stored} bytes but its index says {ztoc_desc.size}")
            ztoc = decode(self.store.content.read_blob(ztoc_desc.digest))
            check_ztoc(ztoc)
            if ztoc.compressed_size != size:
                raise SociError("zTOC describes a layer of another size")
            if ztoc.compression is not kind:
                # The manifest says how the layer is compressed; a zTOC that disagrees
                # describes some other blob.
                raise SociError(f"zTOC is for a {ztoc.compression.name.lower()} layer, the "
                                f"manifest says {media_type}")
            tree = LayerTree(ztoc)
            ztoc.entries = []  # the tree holds what the entries said; spans need the rest
        except SociError as e:
            log.warning("image %s: zTOC %s for layer %s refused: %s", ref, ztoc_desc.digest,
                        digest, e)
            return None

        def fetch(start: int, end: int) -> bytes:
            try:
                return self.client.get_blob_range(ref, digest, start, end)
            except RegistryError as e:
                if self.metrics is not None:
                    self.metrics.registry_error(e.status or "connection")
                raise

        spans = SpanManager(digest, ztoc, fetch, self.memory, self.disk, ztoc_desc.digest)
        log.info("image %s: layer %s mounted lazily (SOCI index %s found in %s, zTOC %s, "
                 "%d files, %d spans)", ref, digest, found.digest, found.where, ztoc_desc.digest,
                 len(tree), ztoc.span_count)
        return Layer(digest, size, ref, tree, spans, ztoc_desc.digest, diff_ids[position],
                     compression, prefetch=found.index.prefetch_for(digest))

    def load_prefetch(self, layer: Layer) -> PrefetchArtifact:
        """The layer's prefetch artifact: from the local store, else fetched from the
        layer's repository (and kept); bounded in size, verified against its digest, and
        checked against the layer's zTOC. Raises ``SociError`` (``EmptyPrefetchError`` for
        one naming no spans) when it cannot be used."""
        desc = layer.prefetch
        if desc is None:
            raise EmptyPrefetchError("the layer has no prefetch artifact")
        validate_digest(desc.digest)
        if not 0 < desc.size <= MAX_ARTIFACT_BYTES:
            raise PrefetchFormatError(f"its index says it is {desc.size} bytes (at most "
                                      f"{MAX_ARTIFACT_BYTES} accepted)")
        path = self.store.content.blob_path(desc.digest)
        if path.exists():
            if path.stat().st_size != desc.size:  # before reading any of it
                raise DigestMismatchError("the local copy is not the size its index gives")
            data = self.store.content.read_blob(desc.digest)  # verified against its digest
        else:
            try:
                data = self.client.get_blob(layer.ref, desc.digest, size=desc.size)
            except RegistryError as e:
                if self.metrics is not None:
                    self.metrics.registry_error(e.status or "connection")
                raise
            artifact = parse_artifact(data, layer.spans.spans)  # before keeping any of it
            self.store.content.write_blob(data, desc.digest)
            return artifact
        return parse_artifact(data, layer.spans.spans)

    # -- reference counting (containers/storage's "use" and rmdir) ----------------------

    def use(self, ref_text: str, key: str) -> int:
        with self._lock:
            layer = self._aliased((ref_text, key))
            if layer is None:
                return 0
            layer.users += 1
            layer.idle_since = None
            return layer.users

    def release(self, ref_text: str, key: str) -> int:
        with self._lock:
            layer = self._aliased((ref_text, key))
            if layer is None:
                return 0
            layer.users = max(layer.users - 1, 0)
            if layer.users == 0:
                layer.idle_since = time.monotonic()
            return layer.users

    def evict_idle(self, grace: float) -> list[Layer]:
        """Forget layers nobody has used for ``grace`` seconds (podman removed their images).

        Their spans stay in the disk cache, so a later pull mounts them again cheaply; their
        inflated spans leave the memory cache unless a layer still mounted has the same zTOC.
        """
        now = time.monotonic()
        with self._lock:
            idle = [la for la in self._layers.values() if la.users == 0
                    and la.idle_since is not None and now - la.idle_since >= grace]
            for layer in idle:
                del self._layers[layer.key]
                for key in [k for k, v in self._aliases.items() if v == layer.key]:
                    del self._aliases[key]
            kept = {la.spans.owner for la in self._layers.values()}
        for owner in {la.spans.owner for la in idle} - kept:
            self.memory.drop(owner)
        return idle
