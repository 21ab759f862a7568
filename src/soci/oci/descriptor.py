"""Descriptors, platforms and manifests: parsed strictly, written in Go's field order."""

from __future__ import annotations

import platform as host_platform
import re
from dataclasses import dataclass, field, replace
from typing import Any

from soci.errors import SociError
from soci.oci import boundedjson, gojson
from soci.oci import mediatypes as mt

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")


class ManifestError(SociError):
    """A manifest, index or descriptor is malformed."""


def check_digest(value: object, what: str = "digest") -> str:
    if not isinstance(value, str) or not _DIGEST.match(value):
        raise ManifestError(f"invalid {what} {value!r} (want sha256:<64 hex digits>)")
    return value


_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm",
                 "armel": "arm", "i386": "386", "i686": "386"}


@dataclass(frozen=True, slots=True)
class Platform:
    """An OCI platform; compared after containerd's normalisation (arm64 means arm64/v8)."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``os/arch[/variant]`` as podman's ``--platform`` takes it."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise SociError(f"invalid platform {text!r} (want os/arch[/variant])")
        return cls(parts[0].lower(), parts[1].lower(), parts[2].lower() if len(parts) == 3 else "")

    @classmethod
    def host(cls) -> Platform:
        machine = host_platform.machine().lower()
        arch = _ARCH_ALIASES.get(machine, machine)
        variant = "v7" if arch == "arm" else ""
        return cls("linux", arch, variant)

    def normalized(self) -> Platform:
        arch = _ARCH_ALIASES.get(self.architecture, self.architecture)
        variant = self.variant
        if arch == "arm64" and variant in ("", "8"):
            variant = "v8"
        elif arch == "arm" and variant in ("", "7"):
            variant = "v7"
        elif arch == "amd64" and variant == "v1":
            variant = ""
        return replace(self, architecture=arch, variant=variant)

    def matches(self, other: Platform) -> bool:
        a, b = self.normalized(), other.normalized()
        return (a.os, a.architecture, a.variant) == (b.os, b.architecture, b.variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.os_features:
            out["os.features"] = list(self.os_features)
        if self.variant:
            out["variant"] = self.variant
        return out

    @classmethod
    def from_json(cls, value: object) -> Platform:
        if not isinstance(value, dict) or not isinstance(value.get("os"), str) or not isinstance(
            value.get("architecture"), str
        ):
            raise ManifestError("platform needs string 'os' and 'architecture'")
        features = value.get("os.features") or []
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise ManifestError("platform has invalid os.features")
        return cls(value["os"], value["architecture"], _string(value, "variant", "platform"),
                   _string(value, "os.version", "platform"), tuple(features))


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None = field(default=None, compare=False)
    platform: Platform | None = None
    artifact_type: str = ""
    urls: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Go's ocispec.Descriptor field order: mediaType, digest, size, urls, annotations, ..."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        annotations = gojson.sorted_map(self.annotations)
        if annotations:
            out["annotations"] = annotations
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out

    @classmethod
    def from_json(cls, value: object, what: str = "descriptor") -> Descriptor:
        if not isinstance(value, dict):
            raise ManifestError(f"{what} is not a JSON object")
        size = value.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{what} has an invalid size {size!r}")
        urls = value.get("urls") or []
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ManifestError(f"{what} has invalid urls")
        platform = value.get("platform")
        return cls(
            _string(value, "mediaType", what),
            check_digest(value.get("digest"), f"{what} digest"),
            size,
            _annotations(value, what),
            Platform.from_json(platform) if platform is not None else None,
            _string(value, "artifactType", what),
            tuple(urls),
        )


def _string(doc: dict[str, Any], key: str, what: str) -> str:
    """An optional string field ("" when absent); anything else is malformed."""
    value = doc.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ManifestError(f"{what} has a non-string {key!r}")
    return value


def _annotations(doc: dict[str, Any], what: str) -> dict[str, str] | None:
    value = doc.get("annotations")
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ManifestError(f"{what} has invalid annotations")
    return dict(value) or None


def parse_json_object(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object from bytes that may come from a registry: parsed in memory bounded
    by their size (see :mod:`soci.oci.boundedjson`)."""
    try:
        value = boundedjson.loads(data, what)
    except boundedjson.JsonLimitError as e:
        raise ManifestError(str(e)) from None
    except ValueError as e:
        raise ManifestError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ManifestError(f"{what} is not a JSON object")
    return value


def _with_subject_and_annotations(out: dict[str, Any], subject: Descriptor | None,
                                  annotations: dict[str, str] | None) -> dict[str, Any]:
    """The two trailing fields Go's Manifest and Index structs share, in their order."""
    if subject is not None:
        out["subject"] = subject.to_json()
    ordered = gojson.sorted_map(annotations)
    if ordered:
        out["annotations"] = ordered
    return out


@dataclass(slots=True)
class Manifest:
    """An image manifest (OCI or Docker schema 2); ``raw`` keeps unknown fields."""

    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None
    artifact_type: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def parse(cls, data: bytes, media_type: str = "") -> Manifest:
        doc = parse_json_object(data, "manifest")
        declared = _string(doc, "mediaType", "manifest") or media_type or mt.OCI_MANIFEST
        if declared not in mt.MANIFESTS:
            raise ManifestError(f"not an image manifest (mediaType {declared!r})")
        if doc.get("schemaVersion") != 2:
            raise ManifestError(f"unsupported manifest schemaVersion {doc.get('schemaVersion')!r}")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ManifestError("manifest has no layers list")
        subject = doc.get("subject")
        return cls(
            declared,
            Descriptor.from_json(doc.get("config"), "manifest config"),
            [Descriptor.from_json(layer, f"layer {i}") for i, layer in enumerate(layers)],
            Descriptor.from_json(subject, "subject") if subject is not None else None,
            _annotations(doc, "manifest"),
            _string(doc, "artifactType", "manifest"),
            doc,
        )

    def to_json(self) -> dict[str, Any]:
        """Go's ocispec.Manifest: schemaVersion, mediaType, artifactType, config, layers, ..."""
        out: dict[str, Any] = {"schemaVersion": 2, "mediaType": self.media_type}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        out["config"] = self.config.to_json()
        out["layers"] = [layer.to_json() for layer in self.layers]
        return _with_subject_and_annotations(out, self.subject, self.annotations)

    def encode(self) -> bytes:
        return gojson.dumps(self.to_json())


@dataclass(slots=True)
class Index:
    """An image index (OCI) or manifest list (Docker)."""

    media_type: str
    manifests: list[Descriptor]
    annotations: dict[str, str] | None = None
    subject: Descriptor | None = None
    artifact_type: str = ""

    @classmethod
    def parse(cls, data: bytes, media_type: str = "") -> Index:
        doc = parse_json_object(data, "image index")
        declared = _string(doc, "mediaType", "image index") or media_type or mt.OCI_INDEX
        if declared not in mt.INDEXES:
            raise ManifestError(f"not an image index (mediaType {declared!r})")
        manifests = doc.get("manifests")
        if not isinstance(manifests, list):
            raise ManifestError("image index has no manifests list")
        subject = doc.get("subject")
        return cls(
            declared,
            [Descriptor.from_json(m, f"index entry {i}") for i, m in enumerate(manifests)],
            _annotations(doc, "image index"),
            Descriptor.from_json(subject, "subject") if subject is not None else None,
            _string(doc, "artifactType", "image index"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schemaVersion": 2, "mediaType": self.media_type}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        out["manifests"] = [m.to_json() for m in self.manifests]
        return _with_subject_and_annotations(out, self.subject, self.annotations)

    def encode(self) -> bytes:
        return gojson.dumps(self.to_json())


def media_type_of(data: bytes, fallback: str = "") -> str:
    """The mediaType a manifest or index declares, or what its shape implies."""
    doc = parse_json_object(data, "manifest")
    declared = _string(doc, "mediaType", "manifest")
    if declared:
        return declared
    if fallback:
        return fallback
    return mt.OCI_INDEX if "manifests" in doc else mt.OCI_MANIFEST
