"""What a front end (soci-store, the snapshotter) exposes about itself: Prometheus metrics
and a JSON status, over HTTP.

    GET /metrics   Prometheus text format
    GET /status    JSON: every mounted layer, its image, files, spans, fetched fraction

Counters are plain integers behind one lock; the per-layer and cache figures are read
from the live objects when scraped, so nothing is counted twice.
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from soci.serve.layers import LayerManager

log = logging.getLogger("soci.metrics")

#: FUSE latency histogram bucket bounds, in seconds.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0, 10.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fuse_ops: dict[str, int] = {}
        self.fuse_errors: dict[str, int] = {}
        self._hist: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        self.registry_errors: dict[str, int] = {}

    @contextmanager
    def fuse_op(self, op: str) -> Iterator[None]:
        start = time.perf_counter()
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            took = time.perf_counter() - start
            with self._lock:
                self.fuse_ops[op] = self.fuse_ops.get(op, 0) + 1
                if failed:
                    self.fuse_errors[op] = self.fuse_errors.get(op, 0) + 1
                hist = self._hist.setdefault(op, [0] * (len(BUCKETS) + 1))
                hist[bisect_left(BUCKETS, took)] += 1
                self._sums[op] = self._sums.get(op, 0.0) + took

    def registry_error(self, status: int | str) -> None:
        with self._lock:
            key = str(status)
            self.registry_errors[key] = self.registry_errors.get(key, 0) + 1

    def render(self, manager: LayerManager) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{labels} {value}")

        layers = manager.layers()

        def lab(**kv: str) -> str:
            return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in kv.items()) + "}"

        # One layer may be mounted once per zTOC (images indexed differently): label both.
        metric("soci_layer_fetched_bytes_total", "counter",
               "Compressed bytes fetched from registries, per layer (spans and whole blob).",
               [(lab(layer=la.digest, ztoc=la.ztoc_digest), la.fetched_bytes) for la in layers])
        metric("soci_layer_fetched_ratio", "gauge",
               "Fraction of a layer's spans held in the disk cache now.",
               [(lab(layer=la.digest, ztoc=la.ztoc_digest), round(la.spans.fetched_fraction, 6))
                for la in layers])
        metric("soci_layer_spans", "gauge", "Spans per layer.",
               [(lab(layer=la.digest, ztoc=la.ztoc_digest), la.spans.spans) for la in layers])
        metric("soci_span_verification_failures_total", "counter",
               "Fetched spans that did not match their digest (refetched, then EIO).",
               [(lab(layer=la.digest, ztoc=la.ztoc_digest), la.spans.verify_failures)
                for la in layers])
        metric("soci_span_cache_hits_total", "counter", "Span cache hits.",
               [(lab(cache="memory"), manager.memory.hits),
                (lab(cache="disk"), manager.disk.hits if manager.disk else 0)])
        metric("soci_span_cache_misses_total", "counter", "Span cache misses.",
               [(lab(cache="memory"), manager.memory.misses),
                (lab(cache="disk"), manager.disk.misses if manager.disk else 0)])
        metric("soci_span_cache_bytes", "gauge", "Bytes held by the span caches.",
               [(lab(cache="memory"), manager.memory.size),
                (lab(cache="disk"), manager.disk.size if manager.disk else 0)])
        with self._lock:
            ops = dict(self.fuse_ops)
            errors = dict(self.fuse_errors)
            hists = {k: list(v) for k, v in self._hist.items()}
            sums = dict(self._sums)
            registry = dict(self.registry_errors)
        metric("soci_fuse_operations_total", "counter", "FUSE operations served.",
               [(lab(op=op), n) for op, n in sorted(ops.items())])
        metric("soci_fuse_errors_total", "counter", "FUSE operations answered with an error.",
               [(lab(op=op), n) for op, n in sorted(errors.items())])
        out.append("# HELP soci_fuse_operation_seconds FUSE operation latency.")
        out.append("# TYPE soci_fuse_operation_seconds histogram")
        for op, hist in sorted(hists.items()):
            total = 0
            for bound, count in zip((*BUCKETS, float("inf")), hist, strict=True):
                total += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(f'soci_fuse_operation_seconds_bucket{{op="{op}",le="{le}"}} {total}')
            out.append(f'soci_fuse_operation_seconds_sum{{op="{op}"}} {sums[op]:.6f}')
            out.append(f'soci_fuse_operation_seconds_count{{op="{op}"}} {total}')
        metric("soci_registry_errors_total", "counter",
               "Registry requests that failed, by HTTP status (or 'connection').",
               [(lab(status=s), n) for s, n in sorted(registry.items())])
        return "\n".join(out) + "\n"


def status(manager: LayerManager, mountpoint: str) -> dict[str, Any]:
    return {
        "mountpoint": mountpoint,
        "layers": [{
            "image": str(la.ref),
            "layer": la.digest,
            "ztoc": la.ztoc_digest,
            "files": len(la.tree),
            "spans": la.spans.spans,
            "spans_held": la.spans.held_spans,
            "fetched_fraction": round(la.spans.fetched_fraction, 4),
            "fetched_bytes": la.fetched_bytes,
            "size": la.size,
            "users": la.users,
        } for la in manager.layers()],
    }


def serve_http(address: str, metrics: Metrics, manager: LayerManager,
               mountpoint: str) -> http.server.ThreadingHTTPServer | None:
    host, _, port = address.rpartition(":")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body = metrics.render(manager).encode()
                kind = "text/plain; version=0.0.4"
            elif self.path == "/status":
                body = json.dumps(status(manager, mountpoint)).encode()
                kind = "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    try:
        server = http.server.ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
    except (OSError, ValueError) as e:
        log.warning("metrics: cannot listen on %s (%s); metrics and status are off", address, e)
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="soci-metrics", daemon=True).start()
    log.info("metrics and status on http://%s:%d/", *server.server_address[:2])
    return server
