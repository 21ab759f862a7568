"""Registry JSON parsed in memory bounded by its size, and listings bounded in all.

A hostile registry's bodies are already capped in bytes; these pin that what they parse
into (Python objects) and how many pages of them are followed are capped too.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable, Iterator

import pytest

from registryd import QuietServer
from soci.errors import RegistryError
from soci.oci import boundedjson
from soci.oci.descriptor import Manifest, ManifestError
from soci.registry import Reference, RegistryClient

_FLOOD = b'{"manifests":[' + b",".join([b"{}"] * 100_000) + b"]}"


def test_a_flood_of_empty_objects_is_refused_before_parsing() -> None:
    with pytest.raises(boundedjson.JsonLimitError, match="JSON objects/arrays"):
        boundedjson.loads(_FLOOD, "referrers page")
    with pytest.raises(boundedjson.JsonLimitError):
        boundedjson.loads(b"[" + b",".join([b"[]"] * 100_000) + b"]", "tags")


def test_brackets_inside_strings_are_not_counted() -> None:
    doc = {"annotations": {"k": "{[" * 50_000}}
    assert boundedjson.loads(json.dumps(doc).encode(), "x") == doc


def test_deep_nesting_is_a_limit_error_not_a_recursion_error() -> None:
    with pytest.raises(boundedjson.JsonLimitError, match="nests"):
        # Few enough brackets for the body's size (padded), but 5,000 deep.
        boundedjson.loads(b"[" * 5000 + b"]" * 5000 + b" " * 200_000, "manifest")


def test_manifest_flood_is_one_line_manifest_error() -> None:
    with pytest.raises(ManifestError) as raised:
        Manifest.parse(b'{"schemaVersion":2,"layers":[' + b",".join([b"{}"] * 50_000) + b"]}")
    assert "\n" not in str(raised.value) and "objects/arrays" in str(raised.value)


def test_honest_index_parses() -> None:
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": "sha256:" + "a" * 64, "size": 1234,
            "platform": {"architecture": "amd64", "os": "linux"}}
    doc = {"schemaVersion": 2, "manifests": [desc] * 5000}
    assert boundedjson.loads(json.dumps(doc).encode(), "index") == doc


@pytest.fixture
def listing() -> Iterator[Callable[[Callable[[int], bytes], int], str]]:
    """A registry whose listing (referrers and tags) is ``pages`` pages from ``body(n)``."""
    servers: list[QuietServer] = []

    def start(body: Callable[[int], bytes], pages: int) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                page = int(self.path.split("page=")[1]) if "page=" in self.path else 0
                data = body(page)
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.oci.image.index.v1+json")
                self.send_header("Content-Length", str(len(data)))
                if page + 1 < pages:
                    base = self.path.split("?")[0]
                    self.send_header("Link", f'<{base}?page={page + 1}>; rel="next"')
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        server = QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"127.0.0.1:{server.server_port}/r/img:v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _descriptor(i: int) -> dict[str, object]:
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.amazon.soci.index.v1+json",
            "digest": f"sha256:{i:064x}", "size": 1000}


def test_referrers_listing_is_bounded_in_all(
        listing: Callable[[Callable[[int], bytes], int], str]) -> None:
    """Each page is under the 4 MiB page limit (and the entries under the count limit),
    but three of them together are not: refused."""
    pad = {"org.example.note": "x" * 600}
    page = json.dumps({"manifests": [{**_descriptor(i), "annotations": pad}
                                     for i in range(2000)]}).encode()
    assert (1 << 20) < len(page) < (2 << 20)
    ref = Reference.parse(listing(lambda n: page, 3))
    with RegistryClient(plain_http=True, retries=0) as client, \
            pytest.raises(RegistryError, match="larger than 4194304 bytes in all"):
        client.referrers(ref, "sha256:" + "a" * 64)


def test_referrers_listing_has_a_count_limit(
        listing: Callable[[Callable[[int], bytes], int], str]) -> None:
    entry = b'{"artifactType":"application/x"}'  # 32 bytes: passes the JSON bound
    page = b'{"manifests":[' + b",".join([entry] * 6000) + b"]}"
    ref = Reference.parse(listing(lambda n: page, 2))
    with RegistryClient(plain_http=True, retries=0) as client, \
            pytest.raises(RegistryError, match="more than 10000 entries"):
        client.referrers(ref, "sha256:" + "a" * 64)


def test_referrers_kept_are_the_asked_type_across_pages(
        listing: Callable[[Callable[[int], bytes], int], str]) -> None:
    def body(n: int) -> bytes:
        other = {**_descriptor(n), "artifactType": "application/other"}
        return json.dumps({"manifests": [_descriptor(n), other, "junk"]}).encode()

    ref = Reference.parse(listing(body, 3))
    with RegistryClient(plain_http=True, retries=0) as client:
        found = client.referrers(ref, "sha256:" + "a" * 64,
                                 "application/vnd.amazon.soci.index.v1+json")
    assert [d["digest"] for d in found] == [_descriptor(n)["digest"] for n in range(3)]


def test_tag_list_is_bounded_in_all(
        listing: Callable[[Callable[[int], bytes], int], str]) -> None:
    page = json.dumps({"tags": [f"tag-{i:010d}" for i in range(600_000)]}).encode()
    assert (4 << 20) < len(page) < (16 << 20)
    ref = Reference.parse(listing(lambda n: page, 3))
    with RegistryClient(plain_http=True, retries=0) as client, \
            pytest.raises(RegistryError, match="tag list listing larger than"):
        client.list_tags(ref)


def test_a_body_is_not_resent_to_another_host_on_a_redirect() -> None:
    """A 307 keeps method and body; to another host (or down to HTTP) the body may be a
    credential the header rule cannot drop, so the redirect is refused."""
    received: list[tuple[str, int]] = []

    class Thief(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_PUT(self) -> None:
            received.append((self.path, int(self.headers.get("Content-Length") or 0)))
            self.send_response(201)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    thief = QuietServer(("127.0.0.1", 0), Thief)

    class Redirector(Thief):
        def do_PUT(self) -> None:
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.1:{thief.server_port}/stolen")
            self.send_header("Content-Length", "0")
            self.end_headers()

    origin = QuietServer(("127.0.0.1", 0), Redirector)
    for server in (thief, origin):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ref = Reference.parse(f"127.0.0.1:{origin.server_port}/r/img:v1")
        with RegistryClient(plain_http=True, retries=0) as client, \
                pytest.raises(RegistryError, match="refusing to re-send a PUT request's body"):
            client.push_manifest(ref, b'{"schemaVersion":2}',
                                 "application/vnd.oci.image.manifest.v1+json")
    finally:
        for server in (thief, origin):
            server.shutdown()
            server.server_close()
    assert received == []
