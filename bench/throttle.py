"""A bandwidth-limited TCP proxy on loopback, so benchmarks see a network, not memcpy.

All connections share one token bucket for the registry-to-client direction
(what a pull is bound by); requests go upstream unthrottled.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

LOOPBACK = "127.0.0.1"


class _Bucket:
    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.next_free = time.monotonic()

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + n / self.rate
            wait = self.next_free - now
        if wait > 0:
            time.sleep(wait)


class ThrottledProxy:
    """``with ThrottledProxy("127.0.0.1:5000", 25e6) as p: p.host`` -> throttled endpoint."""

    def __init__(self, upstream: str, bytes_per_second: float) -> None:
        host, _, port = upstream.rpartition(":")
        if host != LOOPBACK:
            raise ValueError("ThrottledProxy only forwards to 127.0.0.1")
        self.upstream = (host, int(port))
        self.bucket = _Bucket(bytes_per_second)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.closed = threading.Event()

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def __enter__(self) -> ThrottledProxy:
        self.listener.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, throttled: bool) -> None:
        try:
            while not self.closed.is_set():
                data = src.recv(256 << 10)
                if not data:
                    break
                if throttled:
                    self.bucket.take(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
