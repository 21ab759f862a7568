"""Layers the snapshotter fetches and unpacks itself, when containerd should not.

Two cases, as upstream SOCI has them:

* an image *with* a SOCI index whose layer has no zTOC (small layers, which the index
  leaves out): containerd, once one layer of an image needs fetching, fetches every later
  layer too, the big lazy ones included; so such layers are unpacked here and containerd
  is told they exist, and it never downloads anything of the image;
* with ``[pull_modes.parallel_pull_unpack] enable = true``, every layer that is not served
  lazily, also of images without an index.

On the first layer of an image, all its layers that will be asked for are started at once
(containerd asks for them one at a time, in order), several downloads and unpacks in
parallel (``soci.unpack``). Unpacked trees wait under ``<root>/snapshotter/unpacked`` until
containerd asks for them, and are dropped if it never does.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
import time

from soci.errors import SociError
from soci.fsutil import PRIVATE_DIR, make_dirs
from soci.image.resolve import chain_ids
from soci.serve.layers import ImageLayers, LayerManager
from soci.snapshotter import labels as lb
from soci.snapshotter.remote import image_name
from soci.unpack import LayerSpec, ParallelPullConfig, ParallelUnpacker, UnsupportedLayerError

log = logging.getLogger("soci.snapshotter.local")

#: Seconds an unpacked layer nobody asked for is kept.
UNCLAIMED_SEC = 600.0


class LocalLayers:
    """``LayerUnpacker`` for ``soci.snapshotter.snapshots``."""

    def __init__(self, manager: LayerManager, root: str, config: ParallelPullConfig) -> None:
        self.manager = manager
        self.config = config
        self.dir = os.path.join(root, "snapshotter", "unpacked")
        shutil.rmtree(self.dir, ignore_errors=True)  # an earlier run's leftovers
        make_dirs(self.dir, PRIVATE_DIR)
        self.unpacker = ParallelUnpacker.from_config(config)
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}  # layer digest -> when its job was submitted

    def close(self) -> None:
        self.unpacker.close()

    def unpack(self, labels: dict[str, str], dest: str) -> bool:
        named = image_name(labels)
        if named is None:
            return False
        name, digest = named
        try:
            image = self.manager.image(name)
        except SociError as e:
            log.warning("layer %s: image not resolved (pulled by containerd): %s", digest, e)
            return False
        if image.lazy is None and not self.config.enable:
            return False  # no index and no parallel pulls: containerd's job
        try:
            position = [la.digest for la in image.manifest.layers].index(digest)
        except ValueError:
            log.warning("image %s: %s is not one of its layers", image.ref, digest)
            return False
        if position >= len(image.diff_ids):
            return False
        self._start(name, image, labels.get(lb.TARGET, ""), position)
        try:
            result = self.unpacker.wait(digest)
        except UnsupportedLayerError as e:
            log.info("layer %s: %s; pulled by containerd", digest, e)
            return False
        except SociError as e:
            log.warning("layer %s: fetch and unpack failed, pulled by containerd: %s", digest, e)
            return False
        finally:
            with self._lock:
                self._started.pop(digest, None)
            self.unpacker.forget(digest)
        os.rename(result.path, dest)
        log.info("layer %s: fetched and unpacked (%d bytes, %d entries)", digest,
                 result.compressed_bytes, result.entries)
        return True

    def _start(self, name: str, image: ImageLayers, target: str, position: int) -> None:
        """Submit this layer and the image's later ones that will be asked for too."""
        chains = chain_ids(image.diff_ids)
        # containerd asks for layers in order: from the one asked now, as long as the chain
        # matches what containerd named (a mismatch: the config lies; take this one only).
        last = position if chains[position] != target and target else len(image.diff_ids) - 1
        now = time.monotonic()
        self._sweep(now)
        for i in range(position, last + 1):
            desc = image.manifest.layers[i]
            if i != position and image.lazy is not None and desc.digest in image.lazy:
                continue  # served lazily: never downloaded
            with self._lock:
                if desc.digest in self._started:
                    continue
                self._started[desc.digest] = now
            spec = LayerSpec(desc.digest, desc.size, desc.media_type, image.diff_ids[i],
                             os.path.join(self.dir, desc.digest.replace(":", "-")),
                             functools.partial(self.manager.client.open_blob, image.ref,
                                               desc.digest, size=desc.size),
                             image=name,
                             # used when concurrent_download_chunk_size is set
                             fetch_range=functools.partial(self.manager.client.get_blob_range,
                                                           image.ref, desc.digest))
            try:
                self.unpacker.submit(spec)
            except SociError as e:
                log.warning("layer %s: not started: %s", desc.digest, e)

    def _sweep(self, now: float) -> None:
        """Drop layers started long ago that containerd never asked for (it had them)."""
        with self._lock:
            stale = [d for d, t in self._started.items() if now - t > UNCLAIMED_SEC
                     and self.unpacker.done(d)]
            for d in stale:
                del self._started[d]
        for d in stale:
            self.unpacker.forget(d)
            shutil.rmtree(os.path.join(self.dir, d.replace(":", "-")), ignore_errors=True)
