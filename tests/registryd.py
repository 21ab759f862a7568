"""Real registries for tests: CNCF distribution on loopback, a token server, a fault proxy.

Everything here listens on 127.0.0.1 only and talks only to 127.0.0.1. Every wait and
every loop has a bound, so a broken registry fails a test instead of hanging it.

* :class:`Registry` runs ``docker-registry serve`` (Debian's distribution 2.8) with a
  temporary storage root (or a shared one), optionally behind htpasswd Basic auth or token
  auth, optionally over TLS (and then optionally requiring client certificates).
* :class:`TokenServer` issues RS256 JWTs the registry trusts, checking Basic credentials.
* :class:`FaultProxy` sits in front of a registry and fails, drops or corrupts the next
  N matching requests, counting what it did.
* :func:`write_oci_layout` makes a tiny reproducible OCI image layout in pure Python;
  :func:`push_layout` copies one into a registry with skopeo.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import http.server
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from images import WrittenImage, files_layer, write_image

LOOPBACK = "127.0.0.1"
REGISTRY_BINARY = "docker-registry"
_START_TIMEOUT = 15.0


def free_port() -> int:
    """A TCP port nobody listens on right now (the registry binds it just after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes] | None, log: Path | None) -> None:
    """Poll ``url`` until any HTTP answer (401 counts: the server is up) or time runs out."""
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log else ""
            raise RuntimeError(f"registry exited with status {proc.returncode}: {tail}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {_START_TIMEOUT}s")


def _wait_tcp(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll until something accepts on ``port`` (a TLS registry demanding client
    certificates cannot be asked over HTTP without one)."""
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"registry exited with status {proc.returncode}: {tail}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not accept within {_START_TIMEOUT}s")


# -- token server --------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class QuietServer(http.server.ThreadingHTTPServer):
    """Clients that hang up mid-request (a killed CLI, a cancelled read) are part of the
    tests, not errors worth a traceback in their output."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def _serve_in_thread(
    handler: type[http.server.BaseHTTPRequestHandler],
) -> tuple[http.server.ThreadingHTTPServer, threading.Thread, int]:
    """A threaded HTTP server on a free loopback port, serving until _stop_server."""
    server = QuietServer((LOOPBACK, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread, int(server.server_address[1])


def _stop_server(server: http.server.ThreadingHTTPServer | None,
                 thread: threading.Thread | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()
    if thread is not None:
        thread.join(timeout=5)


class TokenServer:
    """A minimal docker token server: GET /token?service=...&scope=... with optional Basic.

    Known users get every action they ask for; anonymous callers get ``pull`` only when
    ``anonymous_pull`` is set and are refused (401) otherwise, as are wrong passwords.
    ``requests`` counts token requests; ``expires_in`` is what tokens advertise.
    """

    service = "soci-test-registry"
    issuer = "soci-test-issuer"

    def __init__(
        self,
        users: dict[str, str],
        *,
        anonymous_pull: bool = False,
        expires_in: int = 300,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users = dict(users)
        self.anonymous_pull = anonymous_pull
        self.expires_in = expires_in
        self.requests = 0
        self.scopes: list[str] = []
        self._lock = threading.Lock()
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "soci test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self._cert_der = cert.public_bytes(serialization.Encoding.DER)
        self._tmp = tempfile.TemporaryDirectory(prefix="soci-token-", dir=workdir)
        self.cert_path = Path(self._tmp.name) / "signer.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def realm(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/token"

    def issue(self, subject: str, access: list[dict[str, Any]]) -> str:
        """A signed JWT granting ``access`` (the registry checks x5c against its bundle)."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self._cert_der).decode()]}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    def _answer(self, handler: http.server.BaseHTTPRequestHandler) -> tuple[int, dict[str, Any]]:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
        with self._lock:
            self.requests += 1
            self.scopes.extend(query.get("scope", []))
        user = None
        header = handler.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except ValueError:
                return 400, {"details": "bad Authorization header"}
            if self.users.get(name) != password:
                return 401, {"details": "invalid username or password"}
            user = name
        elif not self.anonymous_pull:
            return 401, {"details": "authentication required"}
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            repo, _, actions = rest.rpartition(":")
            wanted = actions.split(",")
            granted = wanted if user else [a for a in wanted if a == "pull"]
            access.append({"type": kind, "name": repo, "actions": granted})
        token = self.issue(user or "anonymous", access)
        issued = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return 200, {"token": token, "expires_in": self.expires_in, "issued_at": issued}

    def __enter__(self) -> TokenServer:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = owner._answer(self)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server, self._thread, self.port = _serve_in_thread(Handler)
        return self

    def __exit__(self, *exc: object) -> None:
        _stop_server(self._server, self._thread)
        self._tmp.cleanup()


# -- the registry --------------------------------------------------------------------


def htpasswd_line(user: str, password: str) -> str:
    """``user:$2b$...`` with a cheap bcrypt cost (the registry only accepts bcrypt)."""
    import bcrypt

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"{user}:{hashed}"


class Registry:
    """``docker-registry serve`` on a free loopback port with its own storage root.

    ``htpasswd`` (user -> password) turns on Basic auth; ``token`` (a running
    :class:`TokenServer`) turns on token auth. ``tls`` (certificate and key PEM files)
    serves HTTPS, and ``client_cas`` (CA PEM files) then requires client certificates
    they signed. ``storage`` serves an existing storage root (another registry's
    ``root``: same content, another port) and leaves it in place. Stopped (and its own
    storage removed) on exit.
    """

    def __init__(
        self,
        *,
        htpasswd: dict[str, str] | None = None,
        token: TokenServer | None = None,
        workdir: str | os.PathLike[str] | None = None,
        tls: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
        client_cas: list[str | os.PathLike[str]] | None = None,
        storage: str | os.PathLike[str] | None = None,
    ) -> None:
        if shutil.which(REGISTRY_BINARY) is None:
            raise RuntimeError(f"{REGISTRY_BINARY} not found (Debian package docker-registry)")
        if client_cas and tls is None:
            raise ValueError("client_cas needs tls")
        self._htpasswd = htpasswd
        self._token = token
        self._tls = tls
        self._client_cas = client_cas
        self._tmp = tempfile.TemporaryDirectory(prefix="soci-registry-", dir=workdir)
        self.dir = Path(self._tmp.name)
        self.root = Path(storage) if storage is not None else self.dir / "storage"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self.host}"

    @property
    def pid(self) -> int | None:
        """The registry process's pid while it runs (benchmarks count its CPU time)."""
        return self._proc.pid if self._proc is not None else None

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.root)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": "soci-test-secret"},
        }
        if self._tls is not None:
            tls: dict[str, Any] = {
                "certificate": os.fspath(self._tls[0]),
                "key": os.fspath(self._tls[1]),
            }
            if self._client_cas:
                tls["clientcas"] = [os.fspath(p) for p in self._client_cas]
            config["http"]["tls"] = tls
        if self._htpasswd is not None:
            path = self.dir / "htpasswd"
            lines = [htpasswd_line(u, p) for u, p in self._htpasswd.items()]
            path.write_text("\n".join(lines) + "\n")
            config["auth"] = {"htpasswd": {"realm": "soci-test", "path": str(path)}}
        elif self._token is not None:
            config["auth"] = {
                "token": {
                    "realm": self._token.realm,
                    "service": self._token.service,
                    "issuer": self._token.issuer,
                    "rootcertbundle": str(self._token.cert_path),
                }
            }
        return config

    def __enter__(self) -> Registry:
        last_error: Exception | None = None
        for _ in range(3):  # a port taken between choosing and binding: try another
            self.port = free_port()
            config_path = self.dir / "config.yml"
            # JSON is YAML: no YAML library needed.
            config_path.write_text(json.dumps(self._config(), indent=1))
            log = self.dir / "registry.log"
            with open(log, "wb") as out:
                self._proc = subprocess.Popen(
                    [REGISTRY_BINARY, "serve", str(config_path)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            try:
                if self._tls is not None:
                    _wait_tcp(self.port, self._proc, log)
                else:
                    _wait_http(f"{self.url}/v2/", self._proc, log)
                return self
            except RuntimeError as e:
                last_error = e
                self._stop()
        self._tmp.cleanup()
        raise RuntimeError(f"could not start {REGISTRY_BINARY}: {last_error}")

    def _stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None

    def __exit__(self, *exc: object) -> None:
        self._stop()
        self._tmp.cleanup()


# -- fault injection -----------------------------------------------------------------


@dataclass
class Fault:
    """What to do to the next ``count`` requests whose ``METHOD path`` contains ``match``."""

    kind: str  # "status", "drop", "corrupt" or "stall"
    count: int
    match: str = ""
    status: int = 503
    retry_after: str | None = None
    seconds: float = 0.0


@dataclass
class FaultCounters:
    requests: int = 0
    forwarded: int = 0
    injected: dict[str, int] = field(default_factory=dict)
    #: ``METHOD path`` of every request, in order (the last 10,000).
    seen: list[str] = field(default_factory=list)
    #: Response body bytes sent, by request path.
    sent: dict[str, int] = field(default_factory=dict)
    #: Requests held by a ``stall`` now, and the most held at once.
    stalled: int = 0
    most_stalled: int = 0


_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
     "upgrade", "proxy-authorization", "proxy-authenticate", "content-length"}
)
_MAX_BODY = 256 << 20
_MAX_CHUNKS = 1 << 20


class FaultProxy:
    """An HTTP reverse proxy on loopback in front of ``upstream`` (``127.0.0.1:PORT``).

    Forwards requests unchanged (keeping the Host header, so the registry's absolute
    Location URLs point back at the proxy) unless a queued :class:`Fault` matches:

    * ``fail(n, status, retry_after)``: answer with that status without forwarding;
    * ``drop(n)``: forward, send the headers and half the body, then cut the connection;
    * ``corrupt(n)``: forward, flip one byte in the middle of the body.
    """

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        if host != LOOPBACK:
            raise ValueError("FaultProxy only forwards to 127.0.0.1")
        self._upstream_port = int(port)
        self._faults: list[Fault] = []
        self._drop_rate = 0.0
        self._drop_match = ""
        self._random = random.Random(0)
        self._lock = threading.Lock()
        self.counters = FaultCounters()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    # -- the test-facing API -------------------------------------------------------------

    def fail(self, count: int, status: int = 503, *, retry_after: str | None = None,
             match: str = "") -> None:
        self._add(Fault("status", count, match, status, retry_after))

    def drop(self, count: int, *, match: str = "") -> None:
        self._add(Fault("drop", count, match))

    def corrupt(self, count: int, *, match: str = "") -> None:
        self._add(Fault("corrupt", count, match))

    def stall(self, count: int, seconds: float, *, match: str = "") -> None:
        """Hold the next ``count`` matching requests for ``seconds`` before answering."""
        self._add(Fault("stall", count, match, seconds=seconds))

    def drop_rate(self, probability: float, *, match: str = "") -> None:
        """From now on drop each matching response mid-body with this probability."""
        with self._lock:
            self._drop_rate, self._drop_match = probability, match

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self._drop_rate = 0.0

    def injected(self, kind: str) -> int:
        with self._lock:
            return self.counters.injected.get(kind, 0)

    def _add(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _take(self, request_line: str, kinds: tuple[str, ...]) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.count > 0 and fault.kind in kinds and fault.match in request_line:
                    fault.count -= 1
                    self.counters.injected[fault.kind] = (
                        self.counters.injected.get(fault.kind, 0) + 1
                    )
                    return fault
        return None

    # -- serving ---------------------------------------------------------------------------

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        request_line = f"{handler.command} {handler.path}"
        with self._lock:
            self.counters.requests += 1
            self.counters.seen.append(request_line)
            del self.counters.seen[:-10_000]
        body = _read_request_body(handler)
        stall = self._take(request_line, ("stall",))
        if stall is not None:
            with self._lock:
                self.counters.stalled += 1
                self.counters.most_stalled = max(self.counters.most_stalled,
                                                 self.counters.stalled)
            try:
                time.sleep(min(stall.seconds, 30.0))
            finally:
                with self._lock:
                    self.counters.stalled -= 1
        fault = self._take(request_line, ("status",))
        if fault is not None:
            payload = json.dumps(
                {"errors": [{"code": "UNAVAILABLE", "message": "injected fault"}]}
            ).encode()
            handler.send_response(fault.status)
            if fault.retry_after is not None:
                handler.send_header("Retry-After", fault.retry_after)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection(LOOPBACK, self._upstream_port, timeout=30)
        try:
            # Repeated headers (podman sends one Accept per media type) are joined, not lost.
            headers = {k: ", ".join(handler.headers.get_all(k) or [])
                       for k in dict.fromkeys(handler.headers.keys())
                       if k.lower() not in _HOP_BY_HOP}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            upstream.request(handler.command, handler.path, body=body, headers=headers)
            resp = upstream.getresponse()
            data = resp.read() if handler.command != "HEAD" else b""
            length = resp.getheader("Content-Length") if handler.command == "HEAD" else None
            with self._lock:
                self.counters.forwarded += 1
        finally:
            upstream.close()
        damage = self._take(request_line, ("drop", "corrupt")) if data else None
        if damage is None and data and self._drop_match in request_line:
            with self._lock:
                if self._random.random() < self._drop_rate:
                    damage = Fault("drop", 0)
                    self.counters.injected["drop"] = self.counters.injected.get("drop", 0) + 1
        if damage is not None and damage.kind == "corrupt":
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        handler.send_response(resp.status, resp.reason)
        for key, value in resp.getheaders():
            if key.lower() not in _HOP_BY_HOP:
                handler.send_header(key, value)
        handler.send_header("Content-Length", length or str(len(data)))
        handler.end_headers()
        if damage is not None and damage.kind == "drop":
            handler.wfile.write(data[: len(data) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
            return
        handler.wfile.write(data)
        with self._lock:
            self.counters.sent[handler.path] = self.counters.sent.get(handler.path, 0) + len(data)

    def __enter__(self) -> FaultProxy:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                owner._handle(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _any

            def log_message(self, *args: Any) -> None:
                pass

        self._server, self._thread, self.port = _serve_in_thread(Handler)
        return self

    def __exit__(self, *exc: object) -> None:
        _stop_server(self._server, self._thread)


def _read_request_body(handler: http.server.BaseHTTPRequestHandler) -> bytes | None:
    """The request body by Content-Length or chunked encoding (bounded), or ``None``."""
    length = handler.headers.get("Content-Length")
    if length is not None:
        size = int(length)
        if size > _MAX_BODY:
            raise ValueError("request body too large for the fault proxy")
        return handler.rfile.read(size)
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        out = io.BytesIO()
        for _ in range(_MAX_CHUNKS):
            size = int(handler.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                handler.rfile.readline(1024)
                break
            out.write(handler.rfile.read(size))
            handler.rfile.readline(1024)
            if out.tell() > _MAX_BODY:
                raise ValueError("request body too large for the fault proxy")
        return out.getvalue()
    return None


# -- images --------------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

#: What write_oci_layout wrote (tests/images.py writes every test layout).
Layout = WrittenImage


def write_oci_layout(
    path: str | os.PathLike[str],
    *,
    tag: str = "latest",
    layers: list[dict[str, bytes]] | None = None,
) -> Layout:
    """An OCI image layout at ``path`` holding one image: ``layers`` (file maps; default two
    small layers) as gzip tar layers, an OCI config and manifest, tagged ``tag``."""
    if layers is None:
        layers = [
            {"etc/hello.txt": b"hello from soci\n", "bin/tool": bytes(range(256)) * 64},
            {"var/data/readme": b"second layer\n" * 100},
        ]
    return write_image(path, tag, [files_layer(files) for files in layers])


def push_layout(
    layout_dir: str | os.PathLike[str],
    registry_host: str,
    name_tag: str,
    *,
    tag: str = "latest",
    format: str | None = None,
    creds: tuple[str, str] | None = None,
) -> None:
    """``skopeo copy oci:DIR:TAG docker://HOST/NAME:TAG`` over plain HTTP.

    ``format="v2s2"`` converts to a Docker schema 2 manifest on the way.
    """
    if not registry_host.startswith(LOOPBACK + ":"):
        raise ValueError("push_layout only pushes to 127.0.0.1")
    command = [
        "skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
    ]
    if format is not None:
        command += ["--format", format]
    if creds is not None:
        command += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
    command += [f"oci:{layout_dir}:{tag}", f"docker://{registry_host}/{name_tag}"]
    proc = subprocess.run(command, capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo copy failed: {proc.stderr.decode(errors='replace')[-2000:]}")


@contextlib.contextmanager
def started(*managers: Any) -> Iterator[tuple[Any, ...]]:
    """Enter several of the context managers above in order; exit them in reverse."""
    with contextlib.ExitStack() as stack:
        yield tuple(stack.enter_context(m) for m in managers)
