"""Defects an independent review of the issue-8 fixes still found: the same classes of
defect as the issue's items, in places the fixes did not reach. Each test fails on the
code it was written against and says in its docstring which item's class it belongs to.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import http.server
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from images import files_layer, write_image
from registryd import Registry, push_layout
from soci.errors import SociError, ZtocFormatError
from soci.fs.cache import MemoryCache
from soci.fs.spans import SpanManager
from soci.registry import Reference, RegistriesConf, RegistryClient, digest_of
from soci.registry.auth import Credentials
from soci.ztoc import build_ztoc, codec
from soci.ztoc.model import FileMetadata, Ztoc
from soci.ztoc.zinfo import GzipZinfo, span_limit
from storeenv import StoreDaemon
from test_registry_bounds import Answer, Seen, _Server, _tls_context, host_of, serve  # noqa: F401 (a fixture)

# -- item 8's class: bad tar input must end in one clear error ------------------------


def _header(name: bytes, size_field: bytes) -> bytes:
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"0000644\0"
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = size_field
    h[136:148] = b"14000000000\0"
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


@pytest.mark.parametrize("size_field", [
    b"0000000009\0\0",                                   # not octal
    bytes([0x80]) + ((1 << 63) + 5).to_bytes(11, "big"),  # base-256 past int64
])
def test_unparsable_tar_size_is_a_clean_layer_error(size_field: bytes) -> None:
    """A header whose size field does not parse must be refused with a SociError (one line
    from the CLI); naming the entry re-decodes the same bad header and raised ValueError."""
    tar = _header(b"f", size_field) + bytes(1024)
    with pytest.raises(SociError):
        build_ztoc(io.BytesIO(gzip.compress(tar, mtime=0)), span_size=1 << 16)


# -- item 10's class: one read must not fetch a whole layer ---------------------------


def test_a_span_cannot_cover_the_whole_compressed_layer(tmp_path: Path) -> None:
    """Spans are capped by their uncompressed length only. A zTOC whose second checkpoint
    keeps its real compressed offset near the end of the layer but claims a small
    uncompressed offset passes check(), and a 10-byte read then fetches (and holds) the
    whole compressed layer: 40 MB here, 1.5 GB for a 1.5 GB layer."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        data = os.urandom(40 << 20)
        info = tarfile.TarInfo("big")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    blob = gzip.compress(buf.getvalue(), 1, mtime=0)
    del buf, data
    real = build_ztoc(io.BytesIO(blob), span_size=1 << 20).ztoc
    zinfo = GzipZinfo(real.checkpoints, real.compressed_size)
    last = zinfo.max_span_id
    _, span_size = struct.unpack_from("<iq", real.checkpoints, 0)
    size = 17 + 32768
    first_cp = real.checkpoints[12:12 + size]
    last_cp = bytearray(real.checkpoints[12 + last * size:12 + (last + 1) * size])
    struct.pack_into("<q", last_cp, 8, 1 << 20)  # claims: span 0 is 1 MiB of output
    checkpoints = struct.pack("<iq", 2, span_size) + first_cp + bytes(last_cp)
    cut = zinfo.compressed_start(last)

    def sha(piece: bytes) -> str:
        return "sha256:" + hashlib.sha256(piece).hexdigest()

    forged = Ztoc(real.version, real.build_tool, real.compressed_size, (1 << 20) + 4096,
                  [FileMetadata("big", "reg", 512, 10, mode=0o644)], real.compression, 1,
                  [sha(blob[zinfo.compressed_start(0):cut]), sha(blob[cut:])], checkpoints)
    forged = codec.decode(codec.encode(forged))
    try:
        codec.check(forged)
    except ZtocFormatError:
        return  # refused when checked: fine
    fetched: list[int] = []

    def fetch(start: int, end: int) -> bytes:
        fetched.append(end - start)
        return blob[start:end]

    spans = SpanManager("sha256:" + "0" * 64, forged, fetch, MemoryCache(64 << 20), None,
                        "sha256:" + "1" * 64)
    try:
        spans.read(512, 10)
    except SociError:
        return  # refused when read: fine
    assert sum(fetched) <= span_limit(span_size) + (1 << 20), (
        f"a 10-byte read fetched {sum(fetched)} compressed bytes of a "
        f"{len(blob)}-byte layer")


# -- item 11's class: a hostile registry's listings must not exhaust memory -------------

_PAGE = b'{"manifests":[' + b",".join([b"{}"] * ((4 << 20) // 3 - 10)) + b"]}"

_CHILD = """
import sys
from soci.registry import Reference, RegistryClient
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) // 1024
client = RegistryClient(plain_http=True, retries=0)
before = hwm()
try:
    client.referrers(Reference.parse(sys.argv[1]), "sha256:" + "a" * 64,
                     "application/vnd.amazon.soci.index.v1+json")
except Exception:
    pass
print(hwm() - before)
"""


def test_referrers_pages_are_bounded_in_memory() -> None:
    """Each referrers page is limited to 4 MiB, but every page is kept (parsed) and up to
    10,000 pages are followed: 4 pages of ``{}`` descriptors took ~700 MiB, 12 took 2.3 GB."""
    pages = 4

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if "/referrers/" not in self.path:
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                return
            page = int(self.path.split("page=")[1]) if "page=" in self.path else 0
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.oci.image.index.v1+json")
            self.send_header("Content-Length", str(len(_PAGE)))
            if page + 1 < pages:
                self.send_header("Link",
                                 f'<{self.path.split("?")[0]}?page={page + 1}>; rel="next"')
            self.end_headers()
            self.wfile.write(_PAGE)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        ref = f"127.0.0.1:{server.server_port}/hostile/img:v1"
        out = subprocess.run([sys.executable, "-c", _CHILD, ref], capture_output=True,
                             text=True, timeout=120, check=True).stdout
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    grown = int(out.strip().splitlines()[-1])
    assert grown < 300, f"referrers listing of {pages} x 4 MiB pages took {grown} MiB"


# -- item 14's class: credentials must not cross a scheme downgrade ----------------------


def test_token_refresh_is_not_resent_over_plain_http(
        serve: Callable[..., _Server], tmp_path: Path) -> None:  # noqa: F811 (the fixture)
    """With an identity (refresh) token the realm is asked by POST with the token in the
    body. A 307 from the HTTPS realm to plain HTTP on the same host drops Authorization
    but re-sends that body, so the refresh token crosses the network in clear text."""
    port: list[int] = []

    def routes(seen: Seen) -> Answer:
        base = f"127.0.0.1:{port[0]}"
        if not seen.tls:
            return Answer(200, body=b'{"token":"t"}')
        if seen.path.startswith("/token"):
            return Answer(307, {"Location": f"http://{base}/plain-token"})
        if not seen.headers.get("authorization", "").startswith("Bearer"):
            return Answer(401, {"WWW-Authenticate": f'Bearer realm="https://{base}/token"'})
        return Answer(200, body=b"x")

    server = serve(routes, _tls_context(tmp_path))
    port.append(int(server.server_address[1]))
    host = host_of(server)
    conf = RegistriesConf.from_text(f'[[registry]]\nlocation = "{host}"\ninsecure = true\n')
    creds = Credentials(identity_token="REFRESH-TOKEN-SECRET")
    with (RegistryClient(registries_conf=conf, credentials={host: creds}, retries=0) as client,
          contextlib.suppress(SociError)):  # refusing the downgrade is fine
        client.get_blob(Reference.parse(f"{host}/r/img:v1"), digest_of(b"x"), size=1)
    leaked = [(s.method, s.path) for s in server.seen if not s.tls and (
        int(s.headers.get("content-length") or 0) > 0 or "authorization" in s.headers)]
    assert leaked == [], f"credentials sent over plain HTTP: {leaked}"


# -- item 6's class: one image's artifacts must not decide what another serves ----------


@pytest.fixture
def two_repos(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """One image pushed to good/img (no SOCI index) and evil/img (an index pushed there)."""
    with Registry() as reg:
        write_image(tmp_path / "img", "v1", [files_layer({"etc/motd": b"hello\n"})])
        push_layout(tmp_path / "img", reg.host, "good/img:v1", tag="v1")
        push_layout(tmp_path / "img", reg.host, "evil/img:v1", tag="v1")
        good, evil = f"{reg.host}/good/img:v1", f"{reg.host}/evil/img:v1"
        for args in (["create", "--min-layer-size", "0", evil], ["push", evil]):
            subprocess.run([sys.executable, "-m", "soci.cli", "--plain-http", "--root",
                            str(tmp_path / "maker"), *args], check=True, capture_output=True,
                           timeout=120)
        manifest = json.loads(subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{good}"],
            capture_output=True, check=True).stdout)
        yield good, evil, manifest["layers"][0]["digest"]


def test_index_found_in_one_repository_is_not_used_for_another(
        two_repos: tuple[str, str, str], tmp_path: Path) -> None:
    """The store remembers a fetched index by manifest digest alone (``indexes/<hex>``),
    so once evil/img was pulled, good/img (whose repository has no index) is served
    through the index evil/img's owner published: whoever publishes an index for a copy
    of an image decides the files of every other repository's copy."""
    good, evil, layer = two_repos
    with StoreDaemon(tmp_path / "root", tmp_path / "mnt") as daemon:
        assert os.listdir(daemon.layer_dir(evil, layer) / "diff") == ["etc"]
        with pytest.raises(FileNotFoundError) as raised:
            os.listdir(daemon.layer_dir(good, layer) / "diff")
        assert raised.value.errno == errno.ENOENT
