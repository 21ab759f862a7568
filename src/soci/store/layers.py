"""Resolving (image ref, layer digest) to a lazily served layer, and keeping count of users.

A layer is served only if the image's SOCI index (found in the fork's order,
see ``soci.index.discover``) holds a zTOC for it; otherwise the answer is
"not here" and containers/storage pulls the layer itself. Layers are shared by
digest across image refs, so two images with a common layer fetch it once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field

from soci.artifacts import LocalStore
from soci.errors import RegistryError, SociError
from soci.fs.cache import DiskCache, MemoryCache
from soci.fs.spans import SpanManager
from soci.fs.tree import LayerTree
from soci.image.names import ImageName
from soci.image.resolve import diff_ids, resolve_image
from soci.image.sources import RegistrySource
from soci.index.discover import discover_index
from soci.index.model import ztoc_layer
from soci.oci import mediatypes as mt
from soci.oci.descriptor import Descriptor, Manifest, Platform
from soci.registry import Reference, RegistryClient
from soci.store.metrics import Metrics
from soci.ztoc import decode
from soci.ztoc.codec import check as check_ztoc

log = logging.getLogger("soci.store")

#: Seconds a "no lazy layer here" answer or a resolved manifest is trusted.
RECHECK_SEC = 60.0

#: containers/storage's compression code for gzip (pkg/archive.Gzip).
_GZIP = 2
_UNCOMPRESSED = 0


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
                    store.content.ingest(stream, self.digest, self.size)
        with open(store.content.blob_path(self.digest), "rb") as f:
            f.seek(offset)
            return f.read(size)


class LayerManager:
    def __init__(self, store: LocalStore, client: RegistryClient, memory: MemoryCache,
                 disk: DiskCache | None, platform: Platform | None = None,
                 metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.client = client
        self.memory = memory
        self.disk = disk
        self.platform = platform or Platform.host()
        self._lock = threading.Lock()
        self._layers: dict[str, Layer] = {}
        self._resolving: dict[tuple[str, str], threading.Event] = {}
        # Negative answers and resolved manifests are remembered for RECHECK_SEC only, so an
        # index published (or a tag moved) later is noticed without a restart.
        self._absent: dict[tuple[str, str], float] = {}
        self._aliases: dict[tuple[str, str], str] = {}  # (ref, TOC digest) -> blob digest
        self._images: dict[str, tuple[float, Descriptor, Manifest, list[str]]] = {}

    def layers(self) -> list[Layer]:
        with self._lock:
            return list(self._layers.values())

    # -- resolution --------------------------------------------------------------------

    def _image(self, ref: Reference) -> tuple[Descriptor, Manifest, list[str]]:
        """The platform manifest of ``ref`` and its diff IDs (cached for RECHECK_SEC)."""
        key = str(ref)
        cached = self._images.get(key)
        if cached is not None and time.monotonic() - cached[0] < RECHECK_SEC:
            return cached[1:]
        source = RegistrySource(ImageName("registry", ref=ref), self.client)
        image = resolve_image(source, [self.platform]).images[0]
        ids = diff_ids(source, image)
        self._images[key] = (time.monotonic(), image.desc, image.manifest, ids)
        return image.desc, image.manifest, ids

    def get(self, ref_text: str, key: str) -> Layer | None:
        """The layer for a blob or TOC digest, or None when it is not served lazily."""
        lookup = (ref_text, key)
        while True:
            with self._lock:
                layer = self._layers.get(self._aliases.get(lookup, key))
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
            with self._lock:
                if layer is None:
                    self._absent[lookup] = time.monotonic()
                else:
                    layer = self._layers.setdefault(layer.digest, layer)
                    self._aliases[lookup] = layer.digest
            return layer
        finally:
            with self._lock:
                self._resolving.pop(lookup).set()

    def _resolve(self, ref_text: str, key: str) -> Layer | None:
        """The layer for a compressed-blob digest or a TOC digest (see ANN_TOC_DIGEST)."""
        try:
            ref = Reference.parse(ref_text)
        except ValueError as e:
            log.warning("image %r: not a valid reference (%s)", ref_text, e)
            return None
        desc, manifest, diff_ids = self._image(ref)
        position = next((i for i, layer in enumerate(manifest.layers) if layer.digest == key),
                        None)
        if position is None:
            position = next((i for i, layer in enumerate(manifest.layers)
                             if (layer.annotations or {}).get(mt.ANN_TOC_DIGEST) == key), None)
        found = discover_index(self.store, self.client, ref, desc, manifest, str(self.platform))
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
        with self._lock:
            shared = self._layers.get(digest)
        if shared is not None:
            return shared
        if position >= len(diff_ids):
            # containers/storage needs the layer's DiffID (it crashes without one).
            log.warning("image %s: its config has no diff ID for layer %s; pulled normally",
                        ref, digest)
            return None
        ztoc_desc = next((z for z in found.index.ztocs() if ztoc_layer(z)[0] == digest), None)
        if ztoc_desc is None:
            log.info("image %s: layer %s has no zTOC in index %s (pulled normally)", ref, digest,
                     found.digest)
            return None
        try:
            ztoc = decode(self.store.content.read_blob(ztoc_desc.digest))
            check_ztoc(ztoc)
            if ztoc.compressed_size != manifest.layers[position].size:
                raise SociError("zTOC describes a layer of another size")
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

        spans = SpanManager(digest, ztoc, fetch, self.memory, self.disk)
        layer_media_type = manifest.layers[position].media_type
        log.info("image %s: layer %s mounted lazily (SOCI index %s found in %s, %d files, "
                 "%d spans)", ref, digest, found.digest, found.where, len(tree), ztoc.span_count)
        return Layer(digest, manifest.layers[position].size, ref, tree, spans, ztoc_desc.digest,
                     diff_ids[position],
                     _UNCOMPRESSED if layer_media_type in mt.TAR_LAYERS else _GZIP)

    # -- reference counting (containers/storage's "use" and rmdir) ----------------------

    def use(self, ref_text: str, key: str) -> int:
        with self._lock:
            layer = self._layers.get(self._aliases.get((ref_text, key), key))
            if layer is None:
                return 0
            layer.users += 1
            layer.idle_since = None
            return layer.users

    def release(self, ref_text: str, key: str) -> int:
        with self._lock:
            layer = self._layers.get(self._aliases.get((ref_text, key), key))
            if layer is None:
                return 0
            layer.users = max(layer.users - 1, 0)
            if layer.users == 0:
                layer.idle_since = time.monotonic()
            return layer.users

    def evict_idle(self, grace: float) -> list[Layer]:
        """Forget layers nobody has used for ``grace`` seconds (podman removed their images).

        Their spans stay in the disk cache, so a later pull mounts them again cheaply.
        """
        now = time.monotonic()
        with self._lock:
            idle = [la for la in self._layers.values() if la.users == 0
                    and la.idle_since is not None and now - la.idle_since >= grace]
            for layer in idle:
                del self._layers[layer.digest]
                for key in [k for k, v in self._aliases.items() if v == layer.digest]:
                    del self._aliases[key]
        return idle
