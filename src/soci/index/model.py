"""The SOCI index: an OCI image manifest whose layers are zTOCs.

Serialized exactly as upstream's ``MarshalIndex`` (Go's json.Marshal of an
ocispec.Manifest): the artifact type is carried by the config's media type,
the config is the two-byte empty JSON object, v1 indexes name the image
manifest as ``subject`` and v2 indexes have none.
"""

from __future__ import annotations

from dataclasses import dataclass

from soci.oci import mediatypes as mt
from soci.oci.descriptor import Descriptor, Manifest, ManifestError
from soci.oci.verify import sha256_digest

VERSIONS = {1: mt.SOCI_INDEX_V1, 2: mt.SOCI_INDEX_V2}


@dataclass(slots=True)
class SociIndex:
    version: int
    blobs: list[Descriptor]
    subject: Descriptor | None
    annotations: dict[str, str]

    @property
    def artifact_type(self) -> str:
        return VERSIONS[self.version]

    def to_manifest(self) -> Manifest:
        config = Descriptor(self.artifact_type, mt.EMPTY_JSON_DIGEST, len(mt.EMPTY_JSON))
        return Manifest(mt.OCI_MANIFEST, config, self.blobs, self.subject, self.annotations)

    def encode(self) -> bytes:
        return self.to_manifest().encode()

    def descriptor(self, data: bytes | None = None) -> Descriptor:
        """How registries and image indexes refer to this index."""
        data = self.encode() if data is None else data
        return Descriptor(mt.OCI_MANIFEST, sha256_digest(data), len(data),
                          artifact_type=self.artifact_type)

    def ztocs(self) -> list[Descriptor]:
        """The zTOC descriptors (prefetch artifacts left out)."""
        return [b for b in self.blobs if b.media_type == mt.SOCI_ZTOC]

    def prefetches(self) -> list[Descriptor]:
        """The prefetch artifact descriptors (upstream v0.13+), after the zTOCs."""
        return [b for b in self.blobs if b.media_type == mt.SOCI_PREFETCH]

    def prefetch_for(self, layer_digest: str) -> Descriptor | None:
        """The prefetch artifact for a layer, if the index has one (the first, as upstream)."""
        return next((b for b in self.prefetches()
                     if (b.annotations or {}).get(mt.ANN_LAYER_DIGEST) == layer_digest), None)

    @classmethod
    def parse(cls, data: bytes) -> SociIndex:
        manifest = Manifest.parse(data, mt.OCI_MANIFEST)
        version = {v: k for k, v in VERSIONS.items()}.get(manifest.config.media_type)
        if version is None:
            raise ManifestError(
                f"not a SOCI index (config mediaType {manifest.config.media_type!r})"
            )
        return cls(version, manifest.layers, manifest.subject, manifest.annotations or {})


def ztoc_layer(desc: Descriptor) -> tuple[str, int]:
    """(layer digest, span size) a zTOC descriptor's annotations name."""
    ann = desc.annotations or {}
    try:
        return ann[mt.ANN_LAYER_DIGEST], int(ann.get(mt.ANN_SPAN_SIZE, "0"))
    except (KeyError, ValueError):
        raise ManifestError(f"zTOC {desc.digest} lacks its layer annotations") from None
