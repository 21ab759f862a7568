"""From an image name to the platform-specific manifests to work on."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from soci.errors import NotFoundError, SociError
from soci.image.sources import ImageSource
from soci.oci import boundedjson
from soci.oci import mediatypes as mt
from soci.oci.descriptor import Descriptor, Index, Manifest, Platform


@dataclass(slots=True)
class PlatformImage:
    """One platform's manifest of an image, with where it was found."""

    top: Descriptor          # what the name points at: this manifest, or the index holding it
    desc: Descriptor         # the manifest itself
    manifest: Manifest
    data: bytes
    platform: Platform
    config: dict[str, Any] | None = None  # the image config, once something has read it


@dataclass(slots=True)
class ResolvedImage:
    top: Descriptor
    top_data: bytes
    index: Index | None
    images: list[PlatformImage]


#: The largest image config read (into memory): 4 MiB, as containers/image
#: (``iolimits.MaxConfigBodySize``); podman cannot pull an image with a larger one anyway.
MAX_CONFIG_SIZE = 4 << 20


def _read_config(source: ImageSource, manifest: Manifest) -> dict[str, Any]:
    """The config, read no further than its descriptor's size (sources stop a longer body)."""
    if manifest.config.size > MAX_CONFIG_SIZE:
        raise SociError(f"image config {manifest.config.digest} is {manifest.config.size} "
                        f"bytes, more than the {MAX_CONFIG_SIZE} accepted")
    with source.open_blob(manifest.config) as f:
        data = b"".join(iter(lambda: f.read(1 << 20), b""))
    try:
        config = boundedjson.loads(data, f"image config {manifest.config.digest}")
    except boundedjson.JsonLimitError as e:
        raise SociError(str(e)) from None
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise SociError(f"image config {manifest.config.digest} is not a JSON object")
    return config


def load_config(source: ImageSource, image: PlatformImage) -> dict[str, Any]:
    """The image's config (verified against its digest), read once."""
    if image.config is None:
        image.config = _read_config(source, image.manifest)
    return image.config


def diff_ids(source: ImageSource, image: PlatformImage) -> list[str]:
    """The uncompressed digests of the image's layers, from its config."""
    rootfs = load_config(source, image).get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    return [str(d) for d in ids] if isinstance(ids, list) else []


def _config_platform(config: dict[str, Any], digest: str) -> Platform:
    """A single-manifest image's platform, from its config (os/architecture/variant)."""
    try:
        return Platform(str(config["os"]), str(config["architecture"]),
                        str(config.get("variant") or ""), str(config.get("os.version") or ""))
    except KeyError:
        raise SociError(f"image config {digest} has no os/architecture") from None


def _is_image_entry(desc: Descriptor) -> bool:
    if desc.media_type not in mt.MANIFESTS or desc.artifact_type:
        return False
    p = desc.platform
    return p is None or (p.os, p.architecture) != ("unknown", "unknown")  # attestations


def resolve_image(source: ImageSource, platforms: list[Platform] | None = None,
                  all_platforms: bool = False) -> ResolvedImage:
    """Select manifests like upstream: the host platform by default, or those asked for.

    A single-manifest image is taken whatever the platform; an index must hold
    a manifest for every requested platform.
    """
    top, data = source.top()
    if top.media_type in mt.MANIFESTS:
        manifest = Manifest.parse(data, top.media_type)
        config = _read_config(source, manifest)
        platform = _config_platform(config, manifest.config.digest)
        return ResolvedImage(top, data, None,
                             [PlatformImage(top, top, manifest, data, platform, config)])
    if top.media_type not in mt.INDEXES:
        raise SociError(f"{source.name}: unsupported media type {top.media_type!r}")
    index = Index.parse(data, top.media_type)
    entries = [m for m in index.manifests if _is_image_entry(m)]
    chosen: list[Descriptor] = []
    if all_platforms:
        chosen = entries
    else:
        for want in platforms or [Platform.host()]:
            match = next((m for m in entries if m.platform and m.platform.matches(want)), None)
            if match is None:
                raise NotFoundError(f"{source.name}: no manifest for platform {want}")
            if match not in chosen:
                chosen.append(match)
    images = []
    for desc in chosen:
        child = source.manifest(desc)
        images.append(PlatformImage(top, desc, Manifest.parse(child, desc.media_type), child,
                                    desc.platform or Platform("", "")))
    return ResolvedImage(top, data, index, images)


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The OCI chain IDs: the first diff ID, then sha256 of "<parent chain ID> <diff ID>"."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            text = f"{out[-1]} {diff_id}".encode()
            out.append("sha256:" + hashlib.sha256(text).hexdigest())
    return out
