"""Layers served lazily to containerd: from a Prepare's labels to a tree in the FUSE mount.

The snapshotter mounts the same filesystem as ``soci-store`` (``soci.serve.fusefs``), privately
under its root; a lazy layer's tree is ``<mount>/<image>/<layer digest>/diff`` there, where
``<image>`` (URL-safe base64) names the image by repository and manifest digest, so the
manifest containerd resolved is the one served whatever its tag points at later, plus the
SOCI index a client named. Whatever keeps a layer from being served lazily (labels missing
or unparsable, no index, no zTOC for the layer, registry errors) means "not here":
containerd then pulls and unpacks the layer itself.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from dataclasses import replace

from soci.errors import SociError
from soci.registry import Reference, validate_digest
from soci.serve.layers import LayerManager, lookup_name
from soci.snapshotter import labels as lb
from soci.snapshotter.metadata import Remote

log = logging.getLogger("soci.snapshotter.remote")


def image_name(labels: dict[str, str]) -> tuple[str, str] | None:
    """(lookup name, layer digest) for the layer ``labels`` describe, or None when they do
    not describe one completely and validly (never an exception: labels are the client's)."""
    ref_text = labels.get(lb.IMAGE_REF)
    manifest = labels.get(lb.MANIFEST_DIGEST)
    layer = labels.get(lb.LAYER_DIGEST)
    if not ref_text or not manifest or not layer:
        return None
    named = labels.get(lb.INDEX_DIGEST) or None
    try:
        ref = Reference.parse(ref_text)
        validate_digest(manifest)
        validate_digest(layer)
        if named is not None:
            validate_digest(named)
    except ValueError as e:
        log.warning("snapshot labels refused, layer pulled normally: %s", e)
        return None
    if ref.digest is not None and ref.digest != manifest:
        log.warning("image %s: labels name manifest %s; layer pulled normally", ref, manifest)
        return None
    # By digest alone: the tag adds nothing once the manifest is pinned, and the name must
    # fit in one path component.
    name = lookup_name(str(replace(ref, tag=None, digest=manifest)), named)
    if len(_encode(name)) > _NAME_MAX:
        log.warning("image %s: its name is too long for a lazy mount; layer pulled normally",
                    ref)
        return None
    return name, layer


#: The longest file name Linux takes.
_NAME_MAX = 255


def _encode(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


class RemoteLayers:
    """``LazyLayers`` for ``soci.snapshotter.snapshots`` over a ``LayerManager``."""

    def __init__(self, manager: LayerManager, mountpoint: str) -> None:
        self.manager = manager
        self.mountpoint = mountpoint

    def mount(self, labels: dict[str, str]) -> Remote | None:
        named = image_name(labels)
        if named is None:
            return None
        name, digest = named
        try:
            layer = self.manager.get(name, digest)
        except SociError as e:
            log.warning("layer %s: cannot be served lazily (pulled normally): %s", digest, e)
            return None
        except Exception:
            log.exception("layer %s: unexpected error resolving it (pulled normally)", digest)
            return None
        if layer is None:
            return None
        self.manager.use(name, digest)
        return Remote(name, digest)

    def path(self, remote: Remote) -> str:
        return os.path.join(self.mountpoint, _encode(remote.name), remote.digest, "diff")

    def release(self, remote: Remote) -> None:
        self.manager.release(remote.name, remote.digest)

    def restore(self, remotes: list[Remote]) -> threading.Thread:
        """Resolve the lazy layers snapshots hold after a restart, in the background, so
        they count as in use again (a layer resolved later, on first access, is simply
        never released)."""

        def run() -> None:
            for remote in remotes:
                try:
                    if self.manager.get(remote.name, remote.digest) is not None:
                        self.manager.use(remote.name, remote.digest)
                except Exception as e:  # the registry may be down: the FUSE lookup retries
                    log.warning("layer %s: not restored yet: %s", remote.digest, e)

        thread = threading.Thread(target=run, name="soci-restore-layers", daemon=True)
        thread.start()
        return thread
