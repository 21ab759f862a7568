"""``soci pull``: pull an image into containerd so a remote snapshotter can mount it lazily.

The steps are those of containerd's own client (``client.Pull`` with the unpacker), done over
its gRPC API, plus the labels a remote snapshotter reads:

1. Resolve the reference with soci's registry client; keep the index (if any), the platform's
   manifest and its config.
2. Inside a lease, write those blobs into containerd's content store with the garbage
   collector's labels (``containerd.io/gc.ref.content.*``: an index refers to its manifests, a
   manifest to its config and layers) and ``containerd.io/distribution.source.<host>``.
3. Unpack layer by layer for the snapshotter: a layer whose chain ID is already a snapshot is
   done; otherwise Prepare an ``extract-<unique> <chainID>`` snapshot carrying the layer's
   labels (``containerd.io/snapshot.ref`` and the ``cri.*`` / ``remote/soci.*`` labels a
   remote snapshotter keys on). ALREADY_EXISTS means the snapshotter mounted the layer itself
   (lazily): nothing is downloaded. Otherwise the blob is downloaded into the content store,
   applied by containerd's diff service, its uncompressed digest checked against the config,
   and the snapshot committed as the chain ID.
4. Label the config with the top snapshot (``containerd.io/gc.ref.snapshot.<snapshotter>``)
   and create or update the image record. The lease then goes; on failure it is deleted with
   a synchronous garbage collection so nothing half-made stays.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from soci.containerd.client import MAX_LABEL_SIZE, Containerd, ContainerdError
from soci.errors import DigestMismatchError, SociError
from soci.image.names import ImageName
from soci.image.resolve import MAX_CONFIG_SIZE, chain_ids, resolve_image
from soci.image.sources import RegistrySource
from soci.oci import boundedjson
from soci.oci import mediatypes as mt
from soci.oci.descriptor import Descriptor, Platform, check_digest
from soci.registry import Reference, RegistryClient
from soci.snapshotter import labels as lb

DEFAULT_SNAPSHOTTER = "soci"

# Snapshot labels a remote snapshotter reads (containerd pkg/snapshotters, soci fs/source);
# the names our snapshotter reads them by, so both sides agree by construction.
LABEL_SNAPSHOT_REF = lb.TARGET
LABEL_IMAGE_REF = lb.IMAGE_REF
LABEL_MANIFEST_DIGEST = lb.MANIFEST_DIGEST
LABEL_LAYER_DIGEST = lb.LAYER_DIGEST
LABEL_IMAGE_LAYERS = lb.IMAGE_LAYERS
LABEL_SOCI_INDEX_DIGEST = lb.INDEX_DIGEST
# Upstream's rpull also sends these two; our snapshotter does not need them.
LABEL_SOCI_SIZE = "containerd.io/snapshot/remote/soci.size"
LABEL_IMAGE_LAYERS_SIZE = "containerd.io/snapshot/remote/image.layers.size"

# Content labels.
LABEL_UNCOMPRESSED = "containerd.io/uncompressed"
LABEL_DISTRIBUTION_SOURCE = "containerd.io/distribution.source"
GC_REF_CONTENT = "containerd.io/gc.ref.content"
GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot"
#: containerd's annotation marking a referrer among an index's children.
ANN_MANIFEST_SUBJECT = "io.containerd.manifest.subject"

_KNOWN_CONFIGS = frozenset({mt.OCI_CONFIG, mt.DOCKER_CONFIG,
                            "application/vnd.containerd.container.checkpoint.config.v1+proto",
                            "application/vnd.containerd.container.criu.checkpoint.criu.tar"})
_READ_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class PullOptions:
    snapshotter: str = DEFAULT_SNAPSHOTTER
    platform: Platform | None = None        # None: this host's
    soci_index_digest: str | None = None    # passed to the snapshotter as a label

    def __post_init__(self) -> None:
        if self.soci_index_digest is not None:
            check_digest(self.soci_index_digest, "SOCI index digest")
        if not self.snapshotter:
            raise SociError("snapshotter name must not be empty")


@dataclass(slots=True)
class LayerResult:
    """What happened to one layer: ``lazy`` (the snapshotter mounted it remotely),
    ``unpacked`` (the snapshotter fetched and unpacked it itself), ``pulled`` (downloaded here,
    as far as the content store lacked it, and unpacked by containerd) or ``present`` (its
    snapshot already existed)."""

    index: int
    digest: str
    size: int
    chain_id: str
    status: str
    downloaded: int = 0


@dataclass(slots=True)
class PullResult:
    name: str
    target: Descriptor            # what the image record points at (index or manifest)
    manifest: Descriptor          # the platform's manifest
    platform: Platform
    snapshotter: str
    chain_id: str                 # the top layer's snapshot ("" for an image without layers)
    layers: list[LayerResult] = field(default_factory=list)
    image_updated: bool = False   # the image record was created or changed
    seconds: float = 0.0

    @property
    def downloaded(self) -> int:
        return sum(layer.downloaded for layer in self.layers)

    def count(self, status: str) -> int:
        return sum(1 for layer in self.layers if layer.status == status)


# -- what containerd computes, computed the same way -------------------------------------




def label_fits(key: str, value: str) -> bool:
    """containerd refuses a label whose key and value exceed 4096 bytes together."""
    return len(key.encode()) + len(value.encode()) <= MAX_LABEL_SIZE


def joined_within(key: str, items: Sequence[str]) -> str:
    """Comma-joined ``items``, as many as fit in one label (the rest are left out, as
    containerd does: skipping some only costs the snapshotter prefetching)."""
    out = ""
    for item in items:
        candidate = f"{out},{item}" if out else item
        if not label_fits(key, candidate):
            break
        out = candidate
    return out


def child_gc_labels(children: Sequence[Descriptor]) -> dict[str, str]:
    """The labels by which a blob keeps its children from garbage collection, numbered as
    containerd numbers them (``...content.m.0``, ``...content.config``, ``...content.l.3``)."""
    labels: dict[str, str] = {}
    counts: dict[str, int] = {}
    for child in children:
        if ANN_MANIFEST_SUBJECT in (child.annotations or {}):
            key = f"{GC_REF_CONTENT}.referrer.sha256."
        elif child.media_type in _KNOWN_CONFIGS:
            key = f"{GC_REF_CONTENT}.config"
        elif child.media_type in mt.MANIFESTS:
            key = f"{GC_REF_CONTENT}.m."
        elif mt.is_layer(child.media_type):
            key = f"{GC_REF_CONTENT}.l."
        else:
            key = f"{GC_REF_CONTENT}."
        n = counts.get(key, 0)
        counts[key] = n + 1
        if key.endswith(".sha256."):
            key += child.digest.split(":", 1)[-1][:12]
        elif n > 0 or key.endswith("."):
            key += str(n)
        labels[key] = child.digest
    return labels


def registry_hostname(registry: str) -> str:
    """The host part of ``host[:port]`` (``[v6]:port`` too), as containerd keys sources."""
    if registry.startswith("["):
        return registry[1:].partition("]")[0]
    host, sep, port = registry.rpartition(":")
    return host if sep and port.isdigit() else registry


def merged_sources(existing: str, repository: str) -> str:
    """A distribution source label's value: repositories, sorted, each once."""
    repos = {r for r in existing.split(",") if r}
    repos.add(repository)
    return ",".join(sorted(repos))


def ingest_ref(desc: Descriptor) -> str:
    """The content store's ingest key for a blob (containerd's remotes.MakeRefKey), so a
    concurrent ``ctr pull`` of the same blob waits on the same lock instead of racing."""
    if desc.media_type in mt.MANIFESTS:
        kind = "manifest"
    elif desc.media_type in mt.INDEXES:
        kind = "index"
    elif mt.is_layer(desc.media_type):
        kind = "layer"
    elif desc.media_type in _KNOWN_CONFIGS:
        kind = "config"
    else:
        kind = "unknown"
    return f"{kind}-{desc.digest}"


def _unique() -> str:
    return f"{time.time_ns() % 1_000_000_000}-{secrets.token_urlsafe(3)}"


# -- the pull ------------------------------------------------------------------------------


class _Puller:
    def __init__(self, containerd: Containerd, registry: RegistryClient, ref: Reference,
                 options: PullOptions, on_layer: Callable[[LayerResult], None] | None,
                 progress: Callable[[int], None] | None) -> None:
        self.cd = containerd
        self.registry = registry
        self.ref = ref
        self.name = str(ref)
        self.options = options
        self.on_layer = on_layer
        self.progress = progress
        self.source_key = f"{LABEL_DISTRIBUTION_SOURCE}.{registry_hostname(ref.registry)}"
        self.downloaded_total = 0

    # content ------------------------------------------------------------------------------

    def _source_label(self, info_labels: Mapping[str, str] | None) -> dict[str, str]:
        value = merged_sources((info_labels or {}).get(self.source_key, ""),
                               self.ref.repository)
        return {self.source_key: value} if label_fits(self.source_key, value) else {}

    def put_blob(self, desc: Descriptor, data: bytes, labels: Mapping[str, str]) -> None:
        """Write a small blob we hold (index, manifest, config), or label the one present."""
        info = self.cd.content_info(desc.digest)
        if info is None:
            wanted = {**labels, **self._source_label(None)}
            if self.cd.write_content(ingest_ref(desc), desc, [data], wanted):
                return
            info = self.cd.content_info(desc.digest)  # raced with another writer
            if info is None:
                raise ContainerdError(f"containerd: blob {desc.digest} vanished after writing")
        self.relabel(desc.digest, info.labels, {**labels, **self._source_label(info.labels)})

    def relabel(self, digest: str, have: Mapping[str, str], want: Mapping[str, str]) -> None:
        changed = {k: v for k, v in want.items() if have.get(k) != v}
        self.cd.update_content_labels(digest, changed)

    def fetch_layer(self, desc: Descriptor) -> int:
        """Make sure the layer blob is in the content store; returns bytes downloaded."""
        info = self.cd.content_info(desc.digest)
        if info is not None:
            self.relabel(desc.digest, info.labels, self._source_label(info.labels))
            return 0
        count = 0

        def chunks() -> Iterator[bytes]:
            nonlocal count
            # The reader checks size and digest before its last read returns: a wrong blob
            # raises there, before the COMMIT is sent.
            with self.registry.open_blob(self.ref, desc.digest, size=desc.size) as blob:
                while chunk := blob.read(_READ_CHUNK):
                    count += len(chunk)
                    self.downloaded_total += len(chunk)
                    if self.progress is not None:
                        self.progress(self.downloaded_total)
                    yield chunk

        if not self.cd.write_content(ingest_ref(desc), desc, chunks(),
                                     self._source_label(None)):
            info = self.cd.content_info(desc.digest)
            if info is not None:
                self.relabel(desc.digest, info.labels, self._source_label(info.labels))
        return count

    # snapshots ----------------------------------------------------------------------------

    def layer_labels(self, i: int, layers: Sequence[Descriptor], chain_id: str,
                     manifest_digest: str) -> dict[str, str]:
        layer = layers[i]
        rest = [d.digest for d in layers[i:]]
        labels = {
            LABEL_SNAPSHOT_REF: chain_id,
            LABEL_IMAGE_REF: self.name,
            LABEL_MANIFEST_DIGEST: manifest_digest,
            LABEL_LAYER_DIGEST: layer.digest,
            LABEL_IMAGE_LAYERS: joined_within(LABEL_IMAGE_LAYERS, rest),
            LABEL_SOCI_SIZE: str(layer.size),
        }
        # Sizes for as many layers as the digest list holds, no more (upstream's rule).
        count = labels[LABEL_IMAGE_LAYERS].count(",") + 1
        labels[LABEL_IMAGE_LAYERS_SIZE] = joined_within(
            LABEL_IMAGE_LAYERS_SIZE, [str(d.size) for d in layers[i:i + count]])
        if self.options.soci_index_digest:
            labels[LABEL_SOCI_INDEX_DIGEST] = self.options.soci_index_digest
        if not label_fits(LABEL_IMAGE_REF, self.name):
            raise SociError(f"image reference {self.name!r} is too long for a containerd label")
        return labels

    def unpack_layer(self, i: int, layer: Descriptor, diff_id: str, chain: list[str],
                     labels: Mapping[str, str]) -> LayerResult:
        sn = self.options.snapshotter
        chain_id = chain[i]
        parent = chain[i - 1] if i else ""
        result = LayerResult(i, layer.digest, layer.size, chain_id, "present")
        if self.cd.stat_snapshot(sn, chain_id) is not None:
            return result
        key = ""
        mounts = None
        for _ in range(3):
            key = f"extract-{_unique()} {chain_id}"
            try:
                mounts = self.cd.prepare_snapshot(sn, key, parent, labels)
                break
            except ContainerdError as e:
                if e.code != grpc.StatusCode.ALREADY_EXISTS:
                    raise
            # The snapshotter has the target: a remote snapshotter mounted the layer (or a
            # concurrent pull just committed it). If the chain ID is not there, try again.
            info = self.cd.stat_snapshot(sn, chain_id)
            if info is not None:
                # A lazily served layer carries the remote mark; one the snapshotter fetched
                # and unpacked itself (a layer without a zTOC) does not.
                result.status = "lazy" if lb.REMOTE in info.labels else "unpacked"
                return result
        if mounts is None:
            raise ContainerdError(f"containerd: {sn}: cannot prepare a snapshot for layer "
                                  f"{layer.digest} (ALREADY_EXISTS, yet no {chain_id})")
        committed = False
        try:
            result.downloaded = self.fetch_layer(layer)
            applied = self.cd.apply(layer, mounts)
            if applied.digest != diff_id:
                raise DigestMismatchError(
                    f"layer {layer.digest} unpacks to {applied.digest}, but the image config "
                    f"says {diff_id}")
            try:
                self.cd.commit_snapshot(sn, chain_id, key, labels)
            except ContainerdError as e:
                if e.code != grpc.StatusCode.ALREADY_EXISTS:
                    raise
                # Committed meanwhile by a concurrent pull: ours is dropped below.
            else:
                committed = True
        finally:
            if not committed:
                # Best effort: the lease's garbage collection takes it otherwise.
                with contextlib.suppress(ContainerdError):
                    self.cd.remove_snapshot(sn, key)
        # Set once the uncompressed digest has been verified by the apply (as containerd).
        self.cd.update_content_labels(layer.digest, {LABEL_UNCOMPRESSED: diff_id})
        result.status = "pulled"
        return result

    # the whole -----------------------------------------------------------------------------

    def run(self) -> PullResult:
        start = time.monotonic()
        opts = self.options
        source = RegistrySource(ImageName("registry", ref=self.ref), self.registry)
        platforms = [opts.platform] if opts.platform is not None else None
        resolved = resolve_image(source, platforms)
        image = resolved.images[0]
        manifest = image.manifest
        config_desc = manifest.config
        if config_desc.size > MAX_CONFIG_SIZE:
            raise SociError(f"{self.name}: image config {config_desc.digest} is "
                            f"{config_desc.size} bytes, more than the {MAX_CONFIG_SIZE} accepted")
        config_data = self.registry.get_blob(self.ref, config_desc.digest, size=config_desc.size)
        diff_ids = _diff_ids(config_data, config_desc.digest)
        layers = list(manifest.layers)
        for layer in layers:
            if not mt.is_layer(layer.media_type):
                raise SociError(f"{self.name}: {layer.digest} has media type "
                                f"{layer.media_type!r}, not a layer")
        if len(layers) != len(diff_ids):
            raise SociError(f"{self.name}: the manifest has {len(layers)} layers but the "
                            f"config lists {len(diff_ids)} diff IDs")
        chain = chain_ids(diff_ids)
        result = PullResult(self.name, resolved.top, image.desc, image.platform,
                            opts.snapshotter, chain[-1] if chain else "")

        with self.cd.lease():
            if chain:
                # Fails early, in one line, for a snapshotter containerd does not have.
                self.cd.stat_snapshot(opts.snapshotter, chain[-1])
            if resolved.index is not None:
                self.put_blob(resolved.top, resolved.top_data,
                              child_gc_labels(resolved.index.manifests))
            self.put_blob(image.desc, image.data, child_gc_labels([config_desc, *layers]))
            self.put_blob(config_desc, config_data, {})
            for i, layer in enumerate(layers):
                labels = self.layer_labels(i, layers, chain[i], image.desc.digest)
                done = self.unpack_layer(i, layer, diff_ids[i], chain, labels)
                result.layers.append(done)
                if self.on_layer is not None:
                    self.on_layer(done)
            if chain:
                key = f"{GC_REF_SNAPSHOT}.{opts.snapshotter}"
                info = self.cd.content_info(config_desc.digest)
                self.relabel(config_desc.digest, info.labels if info else {}, {key: chain[-1]})
            top = resolved.top
            target = Descriptor(top.media_type, top.digest, top.size)
            current = self.cd.get_image(self.name)
            if current is None or _key(current.target) != _key(target):
                self.cd.put_image(self.name, target)
                result.image_updated = True
        result.seconds = time.monotonic() - start
        return result


def _key(desc: Descriptor) -> tuple[str, str, int]:
    return desc.media_type, desc.digest, desc.size


def _diff_ids(config_data: bytes, digest: str) -> list[str]:
    try:
        config = boundedjson.loads(config_data, f"image config {digest}")
    except ValueError as e:
        raise SociError(f"image config {digest} is not valid JSON ({e})") from None
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list):
        raise SociError(f"image config {digest} has no rootfs.diff_ids")
    return [check_digest(d, f"image config {digest} diff ID") for d in ids]


def pull_image(containerd: Containerd, registry: RegistryClient, ref: Reference,
               options: PullOptions | None = None, *,
               on_layer: Callable[[LayerResult], None] | None = None,
               progress: Callable[[int], None] | None = None) -> PullResult:
    """Pull ``ref`` into containerd (namespace and socket: ``containerd``'s) for
    ``options.snapshotter``; see the module docstring for the steps.

    ``on_layer`` is told each layer's outcome as it is settled, ``progress`` the bytes
    downloaded so far. Raises a ``SociError`` (one line) on any failure; the image record is
    only written once every layer is unpacked.
    """
    options = options or PullOptions()
    return _Puller(containerd, registry, ref, options, on_layer, progress).run()
