"""Media types, artifact types and annotations, spelled as OCI, Docker and upstream SOCI do."""

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
#: Not in Docker's spec: containerd's name for zstd layers under Docker manifests, which
#: BuildKit writes when asked for zstd without oci-mediatypes (Docker itself cannot pull it).
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"

MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEXES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])

#: Layer media types by the compression their blobs use.
GZIP_LAYERS = frozenset({OCI_LAYER_GZIP, OCI_LAYER_NONDIST_GZIP, DOCKER_LAYER_GZIP,
                         DOCKER_FOREIGN_LAYER_GZIP})
TAR_LAYERS = frozenset({OCI_LAYER, OCI_LAYER_NONDIST, DOCKER_LAYER})
ZSTD_LAYERS = frozenset(
    {OCI_LAYER_ZSTD, "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
     DOCKER_LAYER_ZSTD}
)


def is_layer(media_type: str) -> bool:
    """Whether a descriptor is an image layer (containerd's images.IsLayerType)."""
    return media_type.startswith(("application/vnd.oci.image.layer.",
                                  "application/vnd.docker.image.rootfs."))


# -- SOCI (soci/soci_index.go upstream) ----------------------------------------

SOCI_INDEX_V1 = "application/vnd.amazon.soci.index.v1+json"
SOCI_INDEX_V2 = "application/vnd.amazon.soci.index.v2+json"
SOCI_ZTOC = "application/octet-stream"
SOCI_PREFETCH = "application/vnd.amazon.soci.prefetch.v1+json"

ANN_LAYER_MEDIA_TYPE = "com.amazon.soci.image-layer-mediaType"
ANN_LAYER_DIGEST = "com.amazon.soci.image-layer-digest"
ANN_SPAN_SIZE = "com.amazon.soci.span-size"
ANN_BUILD_TOOL = "com.amazon.soci.build-tool-identifier"
ANN_DISABLE_XATTRS = "com.amazon.soci.disable-xattrs"
ANN_IMAGE_MANIFEST_DIGEST = "com.amazon.soci.image-manifest-digest"
ANN_INDEX_DIGEST = "com.amazon.soci.index-digest"

#: The config of every SOCI index: the two bytes "{}".
EMPTY_JSON = b"{}"
EMPTY_JSON_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"

#: On an image layer descriptor: the digest of the layer's TOC, by which newer
#: containers/storage (Podman >= 5.1, CRI-O >= 1.31) asks an additional layer store
#: for the layer. eStargz's key, which upstream SOCI's CRI-O/Podman work reuses; for a
#: SOCI layer the value is its zTOC's digest.
ANN_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"

#: OCI layouts name their images with this annotation.
ANN_REF_NAME = "org.opencontainers.image.ref.name"
