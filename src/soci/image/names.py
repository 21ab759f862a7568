"""Image names in the transport syntax podman and skopeo use.

``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]``, ``docker://REF`` or a bare
registry reference (normalised like podman: ``alpine`` is
``docker.io/library/alpine:latest``).
"""

from __future__ import annotations

import os
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
    explicit = text.startswith("docker://")
    if explicit:
        text = text[len("docker://"):]
    try:
        ref = Reference.parse(text)
    except ValueError as e:
        if hint := _path_hint(text):
            raise SociError(f"{text!r}{hint}") from None
        raise SociError(f"invalid image reference {text!r}: {e}") from None
    # A bare name that is also a file or directory here is far more likely a local image
    # than a registry one (``soci create image.tar``): say how to mean either.
    if not explicit and not _names_host(text) and (hint := _path_hint(text)):
        raise SociError(f"{text!r}{hint} (or docker://{text} for the registry image {ref})")
    return ImageName("registry", ref=ref)


def _names_host(text: str) -> bool:
    first, sep, _ = text.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def _path_hint(text: str) -> str:
    """How to name ``text`` as a local image, when it is a file or directory here."""
    if os.path.isfile(text):
        return f" is a file here: write oci-archive:{text} for an image archive"
    if os.path.isdir(text):
        return f" is a directory here: write oci:{text} for an OCI layout"
    return ""
