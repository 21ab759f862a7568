"""The registry client against misbehaving registries: every body it reads is bounded by
what the caller honestly expects, and credentials never follow a redirect to plain HTTP.

The servers here are real HTTP(S) servers on loopback (``http.server``) that misbehave on
purpose: a 600 MB body where the descriptor says 2 bytes (streamed from a generator, never
allocated), a ``200`` with the whole blob for a 4 KiB range, an HTTPS answer redirecting
to plain HTTP. Memory is measured as the peak RSS (VmHWM) of a client subprocess.
"""

from __future__ import annotations

import datetime
import hashlib
import http.server
import ipaddress
import json
import random
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from soci.errors import DigestMismatchError
from soci.registry import OCI_MANIFEST, Reference, RegistriesConf, RegistryClient, digest_of

LOOPBACK = "127.0.0.1"
HUGE = 600 << 20          # what the hostile server sends
BLOCK = random.Random(8).randbytes(1 << 20)  # the huge body is this block, repeated
#: Peak RSS allowed for one bounded operation; the unbounded code needed > 600 MiB.
RSS_LIMIT_MIB = 150

CONFIG = b"{}"
CONFIG_DIGEST = digest_of(CONFIG)
ZTOC_DIGEST = digest_of(b"zt")        # declared as 2 bytes in the SOCI index
BIG_DIGEST = digest_of(b"the real 600 MB layer")  # ranged reads do not check it
MISSING_DIGEST = digest_of(b"not there")  # a 404 with a 600 MB body
REPO = "hostile/img"


def huge_body(total: int = HUGE) -> Iterator[bytes]:
    """``total`` bytes of BLOCK repeated, produced lazily."""
    sent = 0
    while sent < total:
        chunk = BLOCK[: min(len(BLOCK), total - sent)]
        sent += len(chunk)
        yield chunk


def huge_slice(start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of what huge_body() produces (a range shorter than BLOCK)."""
    assert end - start <= len(BLOCK)
    offset = start % len(BLOCK)
    return (BLOCK + BLOCK)[offset: offset + end - start]


# -- a misbehaving server --------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | Callable[[], Iterator[bytes]] = b""


@dataclass
class Seen:
    method: str
    path: str
    tls: bool
    headers: dict[str, str]


class _Server(http.server.ThreadingHTTPServer):
    """Serves ``routes`` on one port, over TLS or plain HTTP alike: the first byte of a
    connection says which (0x16 starts a TLS handshake). So ``https://h:p`` may redirect
    to ``http://h:p``, the same host and port: only the scheme changes."""

    daemon_threads = True

    def __init__(self, routes: Callable[[Seen], Answer], tls: ssl.SSLContext | None) -> None:
        super().__init__((LOOPBACK, 0), _Handler)
        self.routes = routes
        self.tls = tls
        self.seen: list[Seen] = []

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is not None:
            try:
                first = request.recv(1, socket.MSG_PEEK)
                if first == b"\x16":
                    request = self.tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
        try:
            super().finish_request(request, client_address)
        finally:
            request.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def _answer(self) -> None:
        seen = Seen(self.command, self.path, isinstance(self.connection, ssl.SSLSocket),
                    {k.lower(): v for k, v in self.headers.items()})
        self.server.seen.append(seen)
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        answer = self.server.routes(seen)
        self.send_response(answer.status)
        for key, value in answer.headers.items():
            self.send_header(key, value)
        if isinstance(answer.body, bytes) and "Content-Length" not in answer.headers:
            self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            if isinstance(answer.body, bytes):
                self.wfile.write(answer.body)
            else:
                for chunk in answer.body():
                    self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the client stopped reading: what a bounded client does

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[..., _Server]]:
    started: list[tuple[_Server, threading.Thread]] = []

    def start(routes: Callable[[Seen], Answer], tls: ssl.SSLContext | None = None) -> _Server:
        server = _Server(routes, tls)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def host_of(server: _Server) -> str:
    return f"{LOOPBACK}:{server.server_address[1]}"


# -- memory: a client subprocess and its peak RSS --------------------------------------

_CLIENT = r"""
import hashlib, json, sys
from soci.image.names import ImageName
from soci.image.resolve import resolve_image
from soci.image.sources import RegistrySource
from soci.registry import Reference, RegistriesConf, RegistryClient

op, host, *args = sys.argv[1:]
client = RegistryClient(plain_http=True, registries_conf=RegistriesConf(), retries=0)
ref = Reference.parse(f"{host}/hostile/img:v1")
out = {}
try:
    if op == "config":
        resolve_image(RegistrySource(ImageName("registry", ref=ref), client))
    elif op == "get_blob":
        client.get_blob(ref, args[0], size=int(args[1]))
    elif op == "open_blob":
        with client.open_blob(ref, args[0], size=int(args[1])) as stream:
            while stream.read(1 << 20):
                pass
    elif op == "range":
        data = client.get_blob_range(ref, args[0], int(args[1]), int(args[2]))
        out["sha256"] = hashlib.sha256(data).hexdigest()
        out["length"] = len(data)
    elif op == "manifest":
        client.get_manifest(ref.with_tag(args[0]))
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would count the test
# runner's memory at fork time; the high-water mark starts afresh with the new image.
with open("/proc/self/status") as status:
    hwm = next(line for line in status if line.startswith("VmHWM:"))
out["maxrss_mib"] = int(hwm.split()[1]) / 1024
print(json.dumps(out))
"""


def run_client(op: str, server: _Server, *args: object) -> dict[str, Any]:
    """Run one client operation in a fresh interpreter; its result and peak RSS (MiB)."""
    done = subprocess.run([sys.executable, "-c", _CLIENT, op, host_of(server),
                           *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    print(f"{op}: peak RSS {result['maxrss_mib']:.1f} MiB: {result.get('error', 'ok')}")
    return result


def hostile_routes(declare_length: bool) -> Callable[[Seen], Answer]:
    """A registry whose manifest is honest (config: 2 bytes) and whose blobs are not."""
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": CONFIG_DIGEST, "size": len(CONFIG)},
        "layers": [],
    }).encode()
    huge_headers = {"Content-Length": str(HUGE)} if declare_length else {}

    def routes(seen: Seen) -> Answer:
        if seen.path == "/v2/":
            return Answer(200, body=b"{}")
        if seen.path == f"/v2/{REPO}/manifests/v1":
            return Answer(200, {"Content-Type": OCI_MANIFEST,
                                "Docker-Content-Digest": digest_of(manifest)}, manifest)
        if seen.path.startswith(f"/v2/{REPO}/manifests/"):  # a 600 MB "manifest" or error
            return Answer(200, {"Content-Type": OCI_MANIFEST, **huge_headers}, huge_body)
        if seen.path == f"/v2/{REPO}/blobs/{MISSING_DIGEST}":
            return Answer(404, huge_headers, huge_body)
        if seen.path.startswith(f"/v2/{REPO}/blobs/"):
            # Range or not, the whole (huge) blob, as a registry ignoring Range would.
            return Answer(200, {"Content-Type": "application/octet-stream", **huge_headers},
                          huge_body)
        return Answer(404, body=b'{"errors":[{"code":"NOT_FOUND","message":"no"}]}')

    return routes


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "no-length"])
def test_config_larger_than_its_descriptor_is_refused(serve: Callable[..., _Server],
                                                      declare_length: bool) -> None:
    """An image config declared as 2 bytes and sent as 600 MB: one line, bounded memory."""
    server = serve(hostile_routes(declare_length))
    result = run_client("config", server)
    assert result["error"] == (
        f"DigestMismatchError: {host_of(server)}/{REPO}:v1: blob {CONFIG_DIGEST} is larger "
        "than its descriptor says (2 bytes)")
    assert result["maxrss_mib"] < RSS_LIMIT_MIB


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "no-length"])
def test_ztoc_blob_larger_than_its_descriptor_is_refused(serve: Callable[..., _Server],
                                                         declare_length: bool) -> None:
    """A zTOC (fetched whole with get_blob, as index discovery does) declared as 2 bytes."""
    server = serve(hostile_routes(declare_length))
    result = run_client("get_blob", server, ZTOC_DIGEST, 2)
    assert result["error"] == (
        f"DigestMismatchError: {host_of(server)}/{REPO}:v1: blob {ZTOC_DIGEST} is larger "
        "than its descriptor says (2 bytes)")
    assert result["maxrss_mib"] < RSS_LIMIT_MIB


def test_streamed_blob_stops_at_its_declared_size(serve: Callable[..., _Server]) -> None:
    """open_blob with the descriptor's size: a longer (unannounced) body fails as soon as
    it shows, instead of streaming 600 MB through the hasher."""
    server = serve(hostile_routes(declare_length=False))
    result = run_client("open_blob", server, BIG_DIGEST, 5 << 20)
    assert "is larger than its descriptor says (5242880 bytes)" in result["error"]
    assert result["maxrss_mib"] < RSS_LIMIT_MIB
    seen = [s for s in server.seen if "/blobs/" in s.path]
    assert len(seen) == 1  # refused, not retried


def test_range_answered_with_whole_blob_returns_just_the_range(
        serve: Callable[..., _Server]) -> None:
    """A 4 KiB range answered with ``200`` and the whole 600 MB blob: exactly the bytes
    asked for come back, read by skipping (not buffering) what comes before them."""
    server = serve(hostile_routes(declare_length=True))
    start = (300 << 20) + 12345
    end = start + 4096
    result = run_client("range", server, BIG_DIGEST, start, end)
    assert "error" not in result, result
    assert result["length"] == 4096
    assert result["sha256"] == hashlib.sha256(huge_slice(start, end)).hexdigest()
    assert result["maxrss_mib"] < RSS_LIMIT_MIB
    seen = [s for s in server.seen if "/blobs/" in s.path]
    assert [s.headers.get("range") for s in seen] == [f"bytes={start}-{end - 1}"]


def test_huge_error_body_is_not_read(serve: Callable[..., _Server]) -> None:
    """A 404 whose body is 600 MB: the error is reported from the first 64 KiB at most."""
    server = serve(hostile_routes(declare_length=False))
    result = run_client("get_blob", server, MISSING_DIGEST, 10)
    assert result["error"] == (
        f"NotFoundError: {host_of(server)}/{REPO}:v1: blob {MISSING_DIGEST}: HTTP 404")
    assert result["maxrss_mib"] < RSS_LIMIT_MIB


def test_manifest_over_4_mib_is_refused(serve: Callable[..., _Server]) -> None:
    """Manifests are capped at 4 MiB (containers/image's and distribution's limit)."""
    server = serve(hostile_routes(declare_length=False))
    result = run_client("manifest", server, "huge")
    assert result["error"] == (
        f"RegistryError: {host_of(server)}/{REPO}:huge: manifest larger than 4194304 bytes")
    assert result["maxrss_mib"] < RSS_LIMIT_MIB


def test_blob_with_huge_error_and_redirect_bodies(serve: Callable[..., _Server]) -> None:
    """In-process: a 404 with a 600 MB body (get_blob) and a redirect carrying 600 MB
    before the real blob are both handled without reading those bodies."""
    blob = b"the blob"

    def routes(seen: Seen) -> Answer:
        if seen.path == f"/v2/{REPO}/blobs/{digest_of(blob)}":
            return Answer(307, {"Location": "/real", "Content-Length": str(HUGE)}, huge_body)
        if seen.path == "/real":
            return Answer(200, body=blob)
        return Answer(404, {"Content-Length": str(HUGE)}, huge_body)

    server = serve(routes)
    ref = Reference.parse(f"{host_of(server)}/{REPO}:v1")
    with RegistryClient(plain_http=True, registries_conf=RegistriesConf(), retries=0) as client:
        assert client.get_blob(ref, digest_of(blob), size=len(blob)) == blob
        with client.open_blob(ref, digest_of(blob), size=len(blob)) as stream:
            assert stream.read() == blob
        with pytest.raises(Exception, match="HTTP 404"):
            client.get_blob(ref, digest_of(b"other"), size=5)


def test_blob_shorter_than_its_descriptor_is_refused(serve: Callable[..., _Server]) -> None:
    blob = b"abc"

    def routes(seen: Seen) -> Answer:
        return Answer(200, body=blob)

    server = serve(routes)
    ref = Reference.parse(f"{host_of(server)}/{REPO}:v1")
    with RegistryClient(plain_http=True, registries_conf=RegistriesConf(), retries=0) as client:
        with pytest.raises(DigestMismatchError, match="short read, got 3 of 4 bytes"):
            client.get_blob(ref, digest_of(blob), size=4)
        with pytest.raises(DigestMismatchError, match=r"larger than its descriptor says \(2"):
            client.get_blob(ref, digest_of(blob), size=2)
        with pytest.raises(DigestMismatchError, match=r"larger than its descriptor says \(2"):
            client.open_blob(ref, digest_of(blob), size=2)


# -- credentials and redirects ---------------------------------------------------------


def _tls_context(tmp_path: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context


USER, PASSWORD = "alice", "s3cret-Passw0rd"


def _downgrading_routes(port_holder: list[int], blob: bytes) -> Callable[[Seen], Answer]:
    """Over TLS: Basic auth required, then blobs and upload locations that point at the
    same host and port over plain HTTP (which needs no auth, so a leak is the only way
    an Authorization header can reach it)."""
    challenge = {"WWW-Authenticate": 'Basic realm="hostile"'}

    def routes(seen: Seen) -> Answer:
        plain_base = f"http://{LOOPBACK}:{port_holder[0]}"
        if not seen.tls:
            if seen.path.startswith("/plain/blob"):
                return Answer(200, body=blob)
            if seen.path.startswith("/plain/upload"):
                return Answer(201, {"Docker-Content-Digest": digest_of(blob)})
            return Answer(404)
        if seen.path == "/v2/":
            return Answer(200, body=b"{}")
        if "authorization" not in seen.headers:
            return Answer(401, challenge)
        if seen.method == "HEAD" and "/blobs/" in seen.path:
            return Answer(404)
        if seen.method == "GET" and "/blobs/" in seen.path:
            return Answer(307, {"Location": f"{plain_base}/plain/blob"})
        if seen.method == "POST" and "/blobs/uploads/" in seen.path:
            return Answer(202, {"Location": f"{plain_base}/plain/upload/1"})
        return Answer(404)

    return routes


def test_https_to_http_redirect_drops_authorization(serve: Callable[..., _Server],
                                                    tmp_path: Path) -> None:
    """A redirect from HTTPS to plain HTTP on the same host and port must not carry the
    registry password in clear text; neither may an upload Location on plain HTTP."""
    blob = b"blob behind a downgrade"
    port: list[int] = []
    server = serve(_downgrading_routes(port, blob), tls=_tls_context(tmp_path))
    port.append(int(server.server_address[1]))
    host = host_of(server)
    conf = RegistriesConf.from_text(f'[[registry]]\nlocation = "{host}"\ninsecure = true\n')
    ref = Reference.parse(f"{host}/{REPO}:v1")
    with RegistryClient(registries_conf=conf, credentials={host: (USER, PASSWORD)},
                        retries=0) as client:
        assert client.get_blob(ref, digest_of(blob), size=len(blob)) == blob
        assert client.push_blob(ref, digest_of(blob), blob) is True

    tls_with_auth = [s for s in server.seen if s.tls and "authorization" in s.headers]
    assert any("/blobs/" in s.path for s in tls_with_auth)  # credentials went over TLS
    plain = [s for s in server.seen if not s.tls]
    assert [(s.method, s.path.partition("?")[0]) for s in plain] == [
        ("GET", "/plain/blob"), ("PUT", "/plain/upload/1")]
    assert [s.headers.get("authorization") for s in plain] == [None, None]
