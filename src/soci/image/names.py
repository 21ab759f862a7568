"""Image names in the transport syntax podman and skopeo use.

``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]``, ``docker://REF`` or a bare
registry reference (normalised like podman: ``alpine`` is
``docker.io/library/alpine:latest``).
"""

from __future__ import annotations

from dataclasses import dataclass

from soci.errors import SociError
from soci.registry import Reference


@dataclass(frozen=True, slots=True)
class ImageName:
    transport: str  # "registry", "oci" or "oci-archive"
    path: str = ""
    tag: str | None = None
    ref: Reference | None = None

    def __str__(self) -> str:
        if self.ref is not None:
            return str(self.ref)
        return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")


def parse_image_name(text: str) -> ImageName:
    for transport in ("oci-archive", "oci"):
        prefix = transport + ":"
        if text.startswith(prefix):
            rest = text[len(prefix):]
            path, sep, tag = rest.rpartition(":")
            if not sep or "/" in tag:
                path, tag = rest, ""
            if not path:
                raise SociError(f"invalid image name {text!r}: missing path")
            return ImageName(transport, path, tag or None)
    if text.startswith("docker://"):
        text = text[len("docker://"):]
    try:
        return ImageName("registry", ref=Reference.parse(text))
    except ValueError as e:
        raise SociError(f"invalid image reference {text!r}: {e}") from None
