"""What a front end (soci-store, the snapshotter) exposes about itself: Prometheus metrics
and a JSON status, over HTTP.

    GET /metrics   Prometheus text format
    GET /status    JSON: every mounted layer, its image, files, spans, fetched fraction

Counters are plain integers behind one lock; the per-layer and cache figures are read
from the live objects when scraped, so nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
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
        self.requests: dict[tuple[str, str], int] = {}  # the snapshotter's gRPC calls
        #: the snapshotter's snapshots by kind (and "lazy"), read when scraped
        self.snapshot_counts: Callable[[], dict[str, int]] | None = None

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

    def request(self, method: str, code: str) -> None:
        with self._lock:
            key = (method, code)
            self.requests[key] = self.requests.get(key, 0) + 1

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
        metric("soci_span_inflates_total", "counter",
               "Spans (or parts of spans) inflated from verified compressed bytes; a span "
               "read again from the caches is not inflated again.",
               [(lab(layer=la.digest, ztoc=la.ztoc_digest), la.spans.inflates)
                for la in layers])
        metric("soci_span_read_ahead_total", "counter",
               "Spans fetched and inflated ahead of a reader, on worker threads.",
               [(lab(layer=la.digest, ztoc=la.ztoc_digest), la.spans.read_ahead_spans)
                for la in layers])
        metric("soci_layer_prefetched_spans_total", "counter",
               "Spans named by a layer's prefetch artifact, loaded after its mount.",
               [(lab(layer=la.digest, ztoc=la.ztoc_digest), la.prefetched_spans)
                for la in layers])
        metric("soci_span_jobs_pending", "gauge",
               "Span jobs (read-ahead, inflates, disk-cache writes) queued or running.",
               [("", sum(w.pending for w in {id(la.spans.workers): la.spans.workers
                                             for la in layers}.values()))])
        metric("soci_span_cache_hits_total", "counter",
               "Span cache hits (disk: reads answered from inflated span files, and "
               "compressed spans read back).",
               [(lab(cache="memory"), manager.memory.hits),
                (lab(cache="disk"), manager.disk.hits + manager.disk.inflated_hits
                 if manager.disk else 0)])
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
        with self._lock:
            requests = dict(self.requests)
        if requests or self.snapshot_counts is not None:
            metric("soci_snapshotter_requests_total", "counter",
                   "containerd's snapshots API calls, by method and gRPC status.",
                   [(lab(method=m, code=c), n) for (m, c), n in sorted(requests.items())])
        if self.snapshot_counts is not None:
            metric("soci_snapshots", "gauge", "Snapshots held, by kind ('lazy': served lazily).",
                   [(lab(kind=k), n) for k, n in sorted(self.snapshot_counts().items())])
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


#: Seconds one connection may take from accept to the last byte of the answer.
CONNECTION_TIMEOUT = 10.0
#: Connections open at once (each costs a socket, not a thread); see MetricsServer.
MAX_CONNECTIONS = 128
#: A request head longer than this is refused (we serve two GETs without bodies).
_MAX_HEAD = 16 << 10
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error"}


class MetricsServer:
    """A tiny HTTP/1.1 server for /metrics and /status on one thread (an asyncio loop).

    Every connection, however slow or idle, costs a socket and a coroutine, never a
    thread; each one gets :data:`CONNECTION_TIMEOUT` seconds in all (a peer trickling a
    header byte at a time is cut off too) and at most :data:`MAX_CONNECTIONS` are open at
    once: at the cap a newcomer evicts the oldest connection still sending its request, so
    idle peers can neither pile up threads nor lock a scrape out.
    """

    def __init__(self, sock: socket.socket, metrics: Metrics, manager: LayerManager,
                 mountpoint: str) -> None:
        self.sock = sock
        self.server_address: tuple[str, int] = sock.getsockname()[:2]
        self.metrics, self.manager, self.mountpoint = metrics, manager, mountpoint
        #: open connections, oldest first -> still reading the request head
        self._conns: dict[asyncio.StreamWriter, bool] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soci-metrics", daemon=True)

    def start(self) -> MetricsServer:
        self.thread.start()
        self._ready.wait()
        return self

    def shutdown(self) -> None:
        """Stop serving, drop open connections and wait for the thread."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=5)
        self.sock.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:
            log.exception("metrics server failed; metrics and status are off")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._client, sock=self.sock, limit=_MAX_HEAD)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for writer in list(self._conns):
                writer.transport.abort()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= MAX_CONNECTIONS:
            idle = next((w for w, reading in self._conns.items() if reading), None)
            if idle is None:  # all of them are being answered: refuse the newcomer
                writer.transport.abort()
                return
            del self._conns[idle]
            idle.transport.abort()
        self._conns[writer] = True
        try:
            async with asyncio.timeout(CONNECTION_TIMEOUT):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    head = b""
                self._conns[writer] = False
                code, kind, body = self._answer(head)
                writer.write(f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {kind}\r\n"
                             f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                             .encode() + body)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, OSError):
            pass  # idle, half-sent or gone: nothing to answer
        finally:
            self._conns.pop(writer, None)
            writer.transport.abort()

    def _answer(self, head: bytes) -> tuple[int, str, bytes]:
        words = head.split(b"\r\n", 1)[0].split()
        if len(words) != 3 or not words[2].startswith(b"HTTP/"):
            return 400, "text/plain", b"bad request\n"
        if words[0] != b"GET":
            return 405, "text/plain", b"only GET\n"
        path = words[1].split(b"?", 1)[0]
        try:
            if path == b"/metrics":
                return (200, "text/plain; version=0.0.4",
                        self.metrics.render(self.manager).encode())
            if path == b"/status":
                return (200, "application/json",
                        json.dumps(status(self.manager, self.mountpoint)).encode())
        except Exception:
            log.exception("metrics: answering %s failed", path.decode(errors="replace"))
            return 500, "text/plain", b"internal error\n"
        return 404, "text/plain", b"not found\n"


def serve_http(address: str, metrics: Metrics, manager: LayerManager,
               mountpoint: str) -> MetricsServer | None:
    """Serve /metrics and /status on ``host:port``; ``None`` (and a warning) when we cannot
    listen there: the store serves layers without its metrics rather than not at all."""
    host, _, port = address.rpartition(":")
    try:
        sock = socket.create_server((host.strip("[]") or "127.0.0.1", int(port)),
                                    family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=64)
    except (OSError, ValueError, OverflowError) as e:
        log.warning("metrics: cannot listen on %s (%s); metrics and status are off", address, e)
        return None
    server = MetricsServer(sock, metrics, manager, mountpoint).start()
    log.info("metrics and status on http://%s:%d/", *server.server_address)
    return server
