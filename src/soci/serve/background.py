"""Filling in lazily served layers: when nobody is reading them (background fetch), and
the spans an image's prefetch artifact names as soon as a layer is mounted (prefetch)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from collections import deque

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


class _Job:
    """One mounted layer's prefetch: admitted (holding one of ``max_concurrency`` places)
    from its artifact's load until its last span is done."""

    __slots__ = ("aborted", "failed", "in_flight", "layer", "todo", "total")

    def __init__(self, layer: Layer) -> None:
        self.layer = layer
        self.todo: deque[int] | None = None  # None while the artifact is being loaded
        self.total = 0
        self.in_flight = 0
        self.failed: list[str] = []
        self.aborted = False


def _name_os_thread(name: str) -> None:
    """Show ``name`` (first 15 bytes) for the calling thread in ps -L, top -H and
    /proc/<pid>/task/*/comm: Python 3.11 names its threads for Python only. Best effort."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


class Prefetcher:
    """Fetches the spans a layer's prefetch artifact names as soon as the layer is mounted
    (upstream's ``[prefetch]``): best effort, never delaying or failing the mount. Spans go
    through the verified span path onto the disk cache, like the background fetch's.

    The work runs on one small pool of daemon threads, started with the first layer that
    has an artifact, fed in mount order (a layer's artifact, then its spans), so the number
    of threads does not grow with the number of layers mounted. At most ``max_concurrency``
    layers prefetch at once (0: no limit); a layer holds its place from its artifact's load
    to its last span.
    """

    #: Span requests in flight per prefetching layer (when layers are limited).
    WORKERS = 2
    #: Pool size without a layer limit: two layers' worth, so one layer's artifact load (a
    #: registry round trip) overlaps another's span fetches, yet few threads contend for the
    #: GIL with the FUSE requests being served meanwhile.
    UNLIMITED_THREADS = 2 * WORKERS
    #: Upper bound on the pool, however large ``max_concurrency`` is.
    MAX_THREADS = 16

    def __init__(self, manager: LayerManager, max_concurrency: int = 0) -> None:
        self.manager = manager
        self.max_concurrency = max(max_concurrency, 0)
        #: Threads in the pool: enough for every admitted layer to keep WORKERS requests in
        #: flight, as when each layer had threads of its own.
        self.threads = min(self.WORKERS * self.max_concurrency or self.UNLIMITED_THREADS,
                           self.MAX_THREADS)
        self.stopped = threading.Event()
        self._cond = threading.Condition()
        self._waiting: deque[Layer] = deque()  # mounted, not yet admitted (mount order)
        self._active: list[_Job] = []          # admitted (mount order)
        self._pool: list[threading.Thread] = []

    def __call__(self, layer: Layer) -> None:
        """``LayerManager.on_mount``: queue ``layer`` for prefetch if its index says what."""
        if layer.prefetch is None or self.stopped.is_set():
            return
        with self._cond:
            self._waiting.append(layer)
            if not self._pool:
                for i in range(self.threads):
                    t = threading.Thread(target=self._work, daemon=True,
                                         name=f"soci-prefetch-{i}")
                    self._pool.append(t)
                    t.start()
            self._cond.notify()

    def stop(self) -> None:
        """Let the pool go: threads waiting for work end now, busy ones after their span."""
        self.stopped.set()
        with self._cond:
            self._waiting.clear()
            self._cond.notify_all()

    def _next(self) -> tuple[_Job, int | None] | None:
        """The next thing to do (caller holds ``_cond``): a span of the earliest admitted
        layer with spans left, else the artifact of the next layer if one may start
        (span None), else nothing."""
        for job in self._active:
            if job.todo:
                job.in_flight += 1
                return job, job.todo.popleft()
        if self._waiting and (not self.max_concurrency
                              or len(self._active) < self.max_concurrency):
            job = _Job(self._waiting.popleft())
            job.in_flight = 1
            self._active.append(job)
            return job, None
        return None

    def _work(self) -> None:
        _name_os_thread(threading.current_thread().name)
        while True:
            with self._cond:
                while True:
                    if self.stopped.is_set():
                        return
                    item = self._next()
                    if item is not None:
                        break
                    self._cond.wait()
            job, span = item
            spans: list[int] | None = None
            error: str | None = None
            broken = False
            try:
                if span is None:
                    spans = self._load(job.layer)
                else:
                    job.layer.spans.prefetch(span)
            except SociError as e:
                error = f"span {span}: {e}"
            except Exception:
                log.exception("prefetch of layer %s failed", job.layer.digest)
                broken = True
            with self._cond:
                job.in_flight -= 1
                if broken:
                    job.aborted = True
                elif span is None:
                    job.todo = deque(spans or ())
                    job.total = len(job.todo)
                    if spans is None:
                        job.aborted = True  # skipped or refused: _load said why
                elif error is not None:
                    job.failed.append(error)
                else:
                    job.layer.prefetched_spans += 1
                if job.aborted and job.todo:
                    job.todo.clear()
                done = not job.todo and job.in_flight == 0
                if done:
                    self._active.remove(job)
                    self._cond.notify_all()  # a place is free, or new spans are queued
                elif span is None:
                    self._cond.notify_all()
            if done and not job.aborted:
                self._finished(job)

    def _load(self, layer: Layer) -> list[int] | None:
        """The spans ``layer``'s artifact names, or None (logged) when there are none to
        prefetch: no disk cache to keep them in, an empty artifact, a refused one."""
        desc = layer.prefetch
        assert desc is not None
        if layer.spans.disk is None:
            log.info("layer %s: prefetch skipped (no disk cache to keep spans in)", layer.digest)
            return None
        try:
            artifact = self.manager.load_prefetch(layer)
        except EmptyPrefetchError:
            log.info("layer %s: prefetch artifact %s names no spans", layer.digest, desc.digest)
            return None
        except SociError as e:
            log.warning("layer %s: prefetch artifact %s refused: %s", layer.digest,
                        desc.digest, e)
            return None
        return list(artifact.span_ids())

    def _finished(self, job: _Job) -> None:
        layer, desc = job.layer, job.layer.prefetch
        assert desc is not None
        if job.failed:
            log.warning("layer %s: %d of %d prefetch spans failed (read lazily instead); "
                        "first: %s", layer.digest, len(job.failed), job.total, job.failed[0])
        log.info("layer %s: prefetched %d spans named by %s", layer.digest,
                 job.total - len(job.failed), desc.digest)
