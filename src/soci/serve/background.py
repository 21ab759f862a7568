"""Filling in lazily served layers when nobody is reading them."""

from __future__ import annotations

import logging
import threading
import time

from soci.errors import SociError
from soci.serve.layers import LayerManager

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
