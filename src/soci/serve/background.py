"""Filling in lazily served layers: when nobody is reading them (background fetch), and
the spans an image's prefetch artifact names as soon as a layer is mounted (prefetch)."""

from __future__ import annotations

import logging
import threading
import time

from soci.errors import SociError
from soci.prefetch import EmptyPrefetchError
from soci.serve.layers import Layer, LayerManager

log = logging.getLogger("soci.serve")


class BackgroundFetcher(threading.Thread):
    """Fetches the spans no one has read yet, one at a time, in layers that have gone quiet."""

    def __init__(self, manager: LayerManager, silence_msec: int, period_msec: int) -> None:
        super().__init__(name="soci-background-fetch", daemon=True)
        self.manager = manager
        self.silence = silence_msec / 1000
        self.period = period_msec / 1000
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            for layer in self.manager.layers():
                if time.monotonic() - layer.spans.last_access < self.silence:
                    continue
                missing = layer.spans.missing_spans()
                if not missing:
                    continue
                try:
                    layer.spans.prefetch(missing[0])
                except SociError as e:
                    log.warning("background fetch of layer %s: %s", layer.digest, e)
                except Exception:
                    log.exception("background fetch of layer %s failed", layer.digest)
                if len(missing) == 1:
                    log.info("layer %s: fully fetched in the background", layer.digest)
                break


class Prefetcher:
    """Fetches the spans a layer's prefetch artifact names as soon as the layer is mounted
    (upstream's ``[prefetch]``), on a thread of its own: best effort, never delaying or
    failing the mount. Spans go through the verified span path onto the disk cache, like
    the background fetch's, a few requests at a time per layer; at most
    ``max_concurrency`` layers prefetch at once (0: no limit).
    """

    #: Span requests in flight per prefetching layer.
    WORKERS = 2

    def __init__(self, manager: LayerManager, max_concurrency: int = 0) -> None:
        self.manager = manager
        self._slots = threading.BoundedSemaphore(max_concurrency) if max_concurrency > 0 else None
        self.stopped = threading.Event()
        self._count_lock = threading.Lock()

    def __call__(self, layer: Layer) -> None:
        """``LayerManager.on_mount``: start prefetching ``layer`` if its index says what."""
        if layer.prefetch is None or self.stopped.is_set():
            return
        threading.Thread(target=self._run, args=(layer,), daemon=True,
                         name=f"soci-prefetch-{layer.digest[7:19]}").start()

    def stop(self) -> None:
        self.stopped.set()

    def _run(self, layer: Layer) -> None:
        if self._slots is not None:
            while not self._slots.acquire(timeout=0.5):
                if self.stopped.is_set():
                    return
        try:
            self._prefetch(layer)
        except Exception:
            log.exception("prefetch of layer %s failed", layer.digest)
        finally:
            if self._slots is not None:
                self._slots.release()

    def _prefetch(self, layer: Layer) -> None:
        desc = layer.prefetch
        assert desc is not None
        if layer.spans.disk is None:
            log.info("layer %s: prefetch skipped (no disk cache to keep spans in)", layer.digest)
            return
        try:
            artifact = self.manager.load_prefetch(layer)
        except EmptyPrefetchError:
            log.info("layer %s: prefetch artifact %s names no spans", layer.digest, desc.digest)
            return
        except SociError as e:
            log.warning("layer %s: prefetch artifact %s refused: %s", layer.digest,
                        desc.digest, e)
            return
        todo = artifact.span_ids()
        pending = iter(todo)
        take = threading.Lock()
        failed: list[str] = []

        def work() -> None:
            while not self.stopped.is_set():
                with take:
                    span = next(pending, None)
                if span is None:
                    return
                try:
                    layer.spans.prefetch(span)
                except SociError as e:
                    failed.append(f"span {span}: {e}")
                    continue
                with self._count_lock:
                    layer.prefetched_spans += 1

        threads = [threading.Thread(target=work, daemon=True)
                   for _ in range(min(self.WORKERS, len(todo)) - 1)]
        for t in threads:
            t.start()
        work()
        for t in threads:
            t.join()
        if failed:
            log.warning("layer %s: %d of %d prefetch spans failed (read lazily instead); "
                        "first: %s", layer.digest, len(failed), len(todo), failed[0])
        log.info("layer %s: prefetched %d spans named by %s", layer.digest,
                 len(todo) - len(failed), desc.digest)
