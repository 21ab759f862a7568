"""soci.registry against a real registry (CNCF distribution), a real token server and a
fault-injecting proxy, all on loopback; no HTTP is mocked."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from registryd import FaultProxy, Layout, Registry, TokenServer, push_layout, write_oci_layout
from soci.errors import AuthError, DigestMismatchError, NotFoundError, RegistryError
from soci.registry import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    CredentialStore,
    Descriptor,
    Reference,
    RegistriesConf,
    RegistryClient,
    digest_of,
    parse_www_authenticate,
    referrers_tag,
)

USER, PASSWORD = "alice", "s3cret-Passw0rd"
EMPTY_CONFIG = b"{}"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No auth file, docker config or registries.conf of this machine leaks into a test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG",
                 "CONTAINERS_REGISTRIES_CONF"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return write_oci_layout(tmp_path_factory.mktemp("layout") / "img")


@pytest.fixture(scope="module")
def registry(layout: Layout) -> Iterator[Registry]:
    with Registry() as reg:
        push_layout(layout.path, reg.host, "test/img:v1")
        push_layout(layout.path, reg.host, "test/docker:v1", format="v2s2")
        yield reg


def make_client(**kwargs: object) -> RegistryClient:
    options: dict[str, object] = {
        "plain_http": True,
        "registries_conf": RegistriesConf(),
        "backoff": 0.01,
        "retries": 3,
    }
    options.update(kwargs)
    return RegistryClient(**options)  # type: ignore[arg-type]


@pytest.fixture
def client() -> Iterator[RegistryClient]:
    with make_client() as c:
        yield c


def ref_of(host: str, name: str) -> Reference:
    return Reference.parse(f"{host}/{name}")


# -- references ----------------------------------------------------------------------

HEX = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest", "canonical"),
    [
        ("alpine", "docker.io", "library/alpine", "latest", None,
         "docker.io/library/alpine:latest"),
        ("alpine:3.19", "docker.io", "library/alpine", "3.19", None,
         "docker.io/library/alpine:3.19"),
        ("user/app", "docker.io", "user/app", "latest", None, "docker.io/user/app:latest"),
        ("docker.io/alpine", "docker.io", "library/alpine", "latest", None,
         "docker.io/library/alpine:latest"),
        ("index.docker.io/user/app:1", "docker.io", "user/app", "1", None,
         "docker.io/user/app:1"),
        ("localhost/x", "localhost", "x", "latest", None, "localhost/x:latest"),
        ("localhost:5000/x:1", "localhost:5000", "x", "1", None, "localhost:5000/x:1"),
        ("quay.io/org/sub/app:v1.2_3", "quay.io", "org/sub/app", "v1.2_3", None,
         "quay.io/org/sub/app:v1.2_3"),
        (f"127.0.0.1:5000/a/b@sha256:{HEX}", "127.0.0.1:5000", "a/b", None, f"sha256:{HEX}",
         f"127.0.0.1:5000/a/b@sha256:{HEX}"),
        (f"reg.example/a:t@sha256:{HEX}", "reg.example", "a", "t", f"sha256:{HEX}",
         f"reg.example/a:t@sha256:{HEX}"),
        ("my-reg.example:443/a.b/c__d/e-f", "my-reg.example:443", "a.b/c__d/e-f", "latest", None,
         "my-reg.example:443/a.b/c__d/e-f:latest"),
    ],
)
def test_reference_parse(text: str, registry: str, repository: str, tag: str | None,
                         digest: str | None, canonical: str) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry, repository, tag, digest)
    assert str(ref) == canonical
    assert Reference.parse(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("Alpine", "lowercase"),
        ("quay.io/Org/app", "lowercase"),
        ("alpine@sha256:abc", "64 lower-case hex"),
        (f"alpine@sha256:{HEX.upper()}", "hex"),
        (f"alpine@md5:{HEX[:32]}", "sha256"),
        ("alpine:", "bad tag"),
        ("alpine:-x", "bad tag"),
        ("a//b", "bad repository component"),
        ("quay.io/", "no repository"),
        ("a/b c", "whitespace"),
        ("bad_host.example/x", "bad registry host"),
    ],
)
def test_reference_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        Reference.parse(text)
    assert "\n" not in str(info.value)


def test_reference_helpers() -> None:
    ref = Reference.parse("alpine:3")
    assert ref.api_host == "registry-1.docker.io"
    assert Reference.parse("quay.io/a/b").api_host == "quay.io"
    pinned = ref.with_digest(f"sha256:{HEX}")
    assert (pinned.tag, pinned.digest, pinned.identifier) == ("3", f"sha256:{HEX}", f"sha256:{HEX}")
    retagged = pinned.with_tag("edge")
    assert (retagged.tag, retagged.digest, str(retagged)) == (
        "edge", None, "docker.io/library/alpine:edge")
    with pytest.raises(ValueError):
        ref.with_digest("sha256:nothex")
    with pytest.raises(ValueError):
        ref.with_tag("no/slash")
    assert referrers_tag(f"sha256:{HEX}") == f"sha256-{HEX}"


def test_www_authenticate_parsing() -> None:
    challenges = parse_www_authenticate(
        'Bearer realm="https://auth.example/token",service="reg",'
        'scope="repository:a/b:pull,push", Basic realm="x \\"quoted\\""'
    )
    assert [c.scheme for c in challenges] == ["bearer", "basic"]
    assert challenges[0].params == {
        "realm": "https://auth.example/token", "service": "reg",
        "scope": "repository:a/b:pull,push"}
    assert challenges[1].params == {"realm": 'x "quoted"'}
    assert parse_www_authenticate("") == []


# -- manifests -----------------------------------------------------------------------


def test_get_manifest_oci(registry: Registry, layout: Layout, client: RegistryClient) -> None:
    ref = ref_of(registry.host, "test/img:v1")
    manifest = client.get_manifest(ref)
    assert manifest.data == layout.manifest
    assert manifest.digest == layout.manifest_digest
    assert manifest.media_type == OCI_MANIFEST
    by_digest = client.get_manifest(ref.with_digest(layout.manifest_digest))
    assert by_digest.data == layout.manifest
    head = client.head_manifest(ref)
    assert head == Descriptor(OCI_MANIFEST, layout.manifest_digest, len(layout.manifest))
    assert client.head_manifest(ref.with_tag("nope")) is None


def test_get_manifest_docker_schema2(registry: Registry, layout: Layout,
                                     client: RegistryClient) -> None:
    ref = ref_of(registry.host, "test/docker:v1")
    manifest = client.get_manifest(ref)
    assert manifest.media_type == DOCKER_MANIFEST
    assert manifest.digest == digest_of(manifest.data)
    doc = manifest.json()
    assert doc["schemaVersion"] == 2
    assert len(doc["layers"]) == len(layout.layers)
    config = client.get_blob(ref, doc["config"]["digest"], size=doc["config"]["size"])
    assert json.loads(config)["rootfs"]["type"] == "layers"
    head = client.head_manifest(ref)
    assert head is not None and head.media_type == DOCKER_MANIFEST
    assert head.digest == manifest.digest and head.size == len(manifest.data)


def test_missing_things_are_not_found(registry: Registry, client: RegistryClient) -> None:
    missing = ref_of(registry.host, "test/img:missing")
    with pytest.raises(NotFoundError) as info:
        client.get_manifest(missing)
    message = str(info.value)
    assert str(missing) in message and "404" in message and "MANIFEST_UNKNOWN" in message
    assert "\n" not in message
    with pytest.raises(NotFoundError, match="test/nothing"):
        client.get_manifest(ref_of(registry.host, "test/nothing:v1"))
    with pytest.raises(NotFoundError, match="BLOB_UNKNOWN"):
        client.get_blob(ref_of(registry.host, "test/img:v1"), f"sha256:{HEX}", size=1)
    with pytest.raises(NotFoundError, match="404"):
        client.open_blob(ref_of(registry.host, "test/img:v1"), f"sha256:{HEX}")
    assert not client.blob_exists(ref_of(registry.host, "test/img:v1"), f"sha256:{HEX}")
    with pytest.raises(NotFoundError, match="NAME_UNKNOWN"):
        client.list_tags(ref_of(registry.host, "test/nothing"))


# -- blobs ---------------------------------------------------------------------------


def test_blobs_whole_ranged_streamed(registry: Registry, layout: Layout,
                                     client: RegistryClient) -> None:
    ref = ref_of(registry.host, "test/img:v1")
    for digest, blob in ((la.digest, la.blob) for la in layout.layers):
        assert client.blob_exists(ref, digest)
        assert client.get_blob(ref, digest, size=len(blob)) == blob
        assert client.get_blob_range(ref, digest, 0, 10) == blob[:10]
        assert client.get_blob_range(ref, digest, 5, len(blob)) == blob[5:]
        assert client.get_blob_range(ref, digest, len(blob) - 3, len(blob) + 100) == blob[-3:]
        assert client.get_blob_range(ref, digest, 7, 7) == b""
        with client.open_blob(ref, digest) as stream:
            assert stream.size == len(blob)
            parts = []
            for _ in range(len(blob) + 1):
                part = stream.read(37)
                if not part:
                    break
                parts.append(part)
        assert b"".join(parts) == blob
    with pytest.raises(ValueError):
        client.get_blob_range(ref, layout.layers[0].digest, 10, 5)


def test_push_small_and_large_blobs(registry: Registry) -> None:
    with FaultProxy(registry.host) as proxy, make_client(chunk_size=4 << 20) as client:
        ref = ref_of(proxy.host, "test/pushed:v1")
        small = b"small blob " * 100
        assert client.push_blob(ref, digest_of(small), small) is True
        assert client.push_blob(ref, digest_of(small), small) is False  # already there
        assert client.get_blob(ref, digest_of(small), size=len(small)) == small
        assert not any(line.startswith("PATCH") for line in proxy.counters.seen)

        large = os.urandom(20 << 20)
        digest = digest_of(large)
        assert client.push_blob(ref, digest, io.BytesIO(large), size=len(large)) is True
        patches = [line for line in proxy.counters.seen if line.startswith("PATCH")]
        assert len(patches) == 5
        assert client.get_blob(ref, digest, size=len(large)) == large
        with client.open_blob(ref, digest) as stream:
            assert stream.read() == large


def test_push_blob_refuses_wrong_content(registry: Registry, client: RegistryClient) -> None:
    ref = ref_of(registry.host, "test/pushed-bad:v1")
    data = b"some content"
    wrong = digest_of(b"other content")
    with pytest.raises(DigestMismatchError, match="digest"):
        client.push_blob(ref, wrong, data)
    small_chunks = make_client(chunk_size=1024)
    with pytest.raises(DigestMismatchError):
        small_chunks.push_blob(ref, wrong, io.BytesIO(os.urandom(5000)))
    with pytest.raises(DigestMismatchError, match="expected 99"):
        small_chunks.push_blob(ref, digest_of(data), io.BytesIO(data), size=99)
    assert not client.blob_exists(ref, wrong)


# -- manifests: push, tags -----------------------------------------------------------


def _artifact(subject: Descriptor | None, artifact_type: str, payload: bytes) -> bytes:
    doc: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": digest_of(EMPTY_CONFIG),
                   "size": len(EMPTY_CONFIG)},
        "layers": [{"mediaType": "application/octet-stream", "digest": digest_of(payload),
                    "size": len(payload)}],
    }
    if subject is not None:
        doc["subject"] = subject.to_json()
    return json.dumps(doc, separators=(",", ":")).encode()


def test_put_manifest_and_list_tags(registry: Registry, layout: Layout,
                                    client: RegistryClient) -> None:
    ref = ref_of(registry.host, "test/img:copy1")
    assert client.put_manifest(ref, layout.manifest, OCI_MANIFEST) == layout.manifest_digest
    assert client.get_manifest(ref).data == layout.manifest
    for i in range(2, 6):
        client.put_manifest(ref.with_tag(f"copy{i}"), layout.manifest, OCI_MANIFEST)
    tags = client.list_tags(ref)
    assert {"v1", "copy1", "copy2", "copy3", "copy4", "copy5"} <= set(tags)
    assert client.list_tags(ref, page_size=2) == tags  # several pages through Link

    # By digest, no tag: the manifest is stored under its digest only.
    payload = b"untagged payload"
    client.push_blob(ref, digest_of(payload), payload)
    client.push_blob(ref, digest_of(EMPTY_CONFIG), EMPTY_CONFIG)
    data = _artifact(None, "application/vnd.example.thing", payload)
    by_digest = Reference(ref.registry, ref.repository, None, digest_of(data))
    pushed = client.push_manifest(by_digest, data, OCI_MANIFEST)
    assert pushed.digest == digest_of(data)
    assert client.get_manifest(by_digest).data == data
    with pytest.raises(DigestMismatchError):
        client.put_manifest(by_digest, data + b" ", OCI_MANIFEST)


# -- referrers (tag schema: distribution 2.8 has no referrers API) -----------------------


def test_referrers_fall_back_to_tag_schema(registry: Registry, layout: Layout,
                                           client: RegistryClient) -> None:
    ref = ref_of(registry.host, "test/img:v1")
    subject = client.head_manifest(ref)
    assert subject is not None
    assert client.referrers(ref, subject.digest) == []

    client.push_blob(ref, digest_of(EMPTY_CONFIG), EMPTY_CONFIG)
    descriptors = []
    for kind in ("application/vnd.example.sig", "application/vnd.example.sbom"):
        payload = f"{kind} payload".encode()
        client.push_blob(ref, digest_of(payload), payload)
        data = _artifact(subject, kind, payload)
        pushed = client.push_manifest(
            Reference(ref.registry, ref.repository, None, digest_of(data)), data, OCI_MANIFEST)
        assert pushed.oci_subject is None  # so the caller must maintain the tag
        descriptor = {"mediaType": OCI_MANIFEST, "digest": pushed.digest, "size": len(data),
                      "artifactType": kind}
        assert client.add_referrer(ref, subject.digest, descriptor) is True
        descriptors.append(descriptor)
    assert client.add_referrer(ref, subject.digest, descriptors[0]) is False  # no duplicate

    assert client.referrers(ref, subject.digest) == descriptors
    assert client.referrers(ref, subject.digest, "application/vnd.example.sbom") == [
        descriptors[1]]
    assert client.referrers(ref, subject.digest, "application/vnd.example.none") == []
    tag = referrers_tag(subject.digest)
    assert tag in client.list_tags(ref)
    index = client.get_manifest(ref.with_tag(tag))
    assert index.media_type == OCI_INDEX
    assert index.json()["schemaVersion"] == 2
    # A fresh client (no cached knowledge of the API) sees the same.
    assert make_client().referrers(ref, subject.digest) == descriptors


# -- authentication ------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_registry(layout: Layout) -> Iterator[Registry]:
    with Registry(htpasswd={USER: PASSWORD}) as reg:
        push_layout(layout.path, reg.host, "private/img:v1", creds=(USER, PASSWORD))
        yield reg


def _auth_file(path: Path, host: str, user: str, password: str) -> Path:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path


def test_basic_auth_with_auth_file(basic_registry: Registry, layout: Layout, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ref = ref_of(basic_registry.host, "private/img:v1")
    with pytest.raises(AuthError) as info:
        make_client().get_manifest(ref)
    assert "no credentials" in str(info.value) and basic_registry.host in str(info.value)

    auth = _auth_file(tmp_path / "auth.json", basic_registry.host, USER, PASSWORD)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    client = make_client()
    assert client.get_manifest(ref).digest == layout.manifest_digest
    assert client.get_blob(ref, layout.layers[0].digest,
                           size=len(layout.layers[0].blob)) == layout.layers[0].blob
    pushed = b"pushed with basic auth"
    assert client.push_blob(ref, digest_of(pushed), pushed)

    wrong_password = "WRONG-secret-value"
    _auth_file(auth, basic_registry.host, USER, wrong_password)
    with pytest.raises(AuthError) as info:
        make_client().get_manifest(ref)
    message = str(info.value)
    assert str(ref) in message and "rejected" in message and "401" in message
    assert wrong_password not in message and PASSWORD not in message
    assert wrong_password not in repr(info.value.args)
    assert "\n" not in message


def test_basic_auth_with_explicit_credentials_and_docker_config(
        basic_registry: Registry, layout: Layout, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ref = ref_of(basic_registry.host, "private/img:v1")
    explicit = make_client(credentials={basic_registry.host: (USER, PASSWORD)})
    assert explicit.get_manifest(ref).digest == layout.manifest_digest
    store = CredentialStore({basic_registry.host: (USER, PASSWORD)})
    assert PASSWORD not in repr(store.get(basic_registry.host))

    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (docker_dir / "config.json").write_text(
        json.dumps({"auths": {f"http://{basic_registry.host}/v1/": {"auth": token}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_dir))
    assert make_client().get_manifest(ref).digest == layout.manifest_digest

    # REGISTRY_AUTH_FILE comes first: its wrong password wins over docker's right one.
    bad = _auth_file(tmp_path / "bad.json", f"{basic_registry.host}/private", USER, "nope")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(bad))
    with pytest.raises(AuthError):
        make_client().get_manifest(ref)


def test_credential_helper(basic_registry: Registry, layout: Layout, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    asked = tmp_path / "asked"
    helper = bindir / "docker-credential-socitest"
    helper.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = get ] || exit 2\n'
        f"cat > {asked}\n"
        f"printf '%s' '{{\"ServerURL\":\"x\",\"Username\":\"{USER}\","
        f"\"Secret\":\"{PASSWORD}\"}}'\n"
    )
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    (docker_dir / "config.json").write_text(
        json.dumps({"credHelpers": {basic_registry.host: "socitest"}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_dir))
    ref = ref_of(basic_registry.host, "private/img:v1")
    assert make_client().get_manifest(ref).digest == layout.manifest_digest
    assert asked.read_text() == basic_registry.host

    (docker_dir / "config.json").write_text(json.dumps({"credsStore": "missinghelper"}))
    with pytest.raises(AuthError, match="docker-credential-missinghelper not found"):
        make_client().get_manifest(ref)


@pytest.fixture(scope="module")
def token_setup(layout: Layout) -> Iterator[tuple[TokenServer, Registry]]:
    with TokenServer({USER: PASSWORD}) as tokens, Registry(token=tokens) as reg:
        push_layout(layout.path, reg.host, "private/img:v1", creds=(USER, PASSWORD))
        yield tokens, reg


def test_token_auth(token_setup: tuple[TokenServer, Registry], layout: Layout) -> None:
    tokens, reg = token_setup
    ref = ref_of(reg.host, "private/img:v1")
    tokens.anonymous_pull = False
    with pytest.raises(AuthError) as info:
        make_client().get_manifest(ref)
    assert "refused anonymous access" in str(info.value) and str(ref) in str(info.value)

    client = make_client(credentials={reg.host: (USER, PASSWORD)})
    before = tokens.requests
    assert client.get_manifest(ref).digest == layout.manifest_digest
    for digest, blob in ((la.digest, la.blob) for la in layout.layers):
        assert client.get_blob(ref, digest, size=len(blob)) == blob
        assert client.get_blob_range(ref, digest, 1, 4) == blob[1:4]
    client.head_manifest(ref)
    assert tokens.requests - before == 1  # one pull token, cached
    assert tokens.scopes[-1] == "repository:private/img:pull"

    data = b"pushed with a token"
    assert client.push_blob(ref, digest_of(data), data)
    assert tokens.requests - before == 2  # a pull,push token for the writes
    assert tokens.scopes[-1] == "repository:private/img:pull,push"

    # A token the registry rejects (revoked, expired early) is replaced after its 401.
    auth = client._auth
    with auth._lock:
        for key in auth._tokens:
            auth._tokens[key] = ("not-a-valid-token", auth._tokens[key][1])
    assert client.get_blob(ref, digest_of(data), size=len(data)) == data
    assert tokens.requests - before == 3

    wrong = make_client(credentials={reg.host: (USER, "WRONG-password")})
    with pytest.raises(AuthError) as info:
        wrong.get_manifest(ref)
    assert "WRONG-password" not in str(info.value) and "refused" in str(info.value)


def test_token_auth_anonymous_pull_only(token_setup: tuple[TokenServer, Registry],
                                        layout: Layout) -> None:
    tokens, reg = token_setup
    ref = ref_of(reg.host, "private/img:v1")
    tokens.anonymous_pull = True
    try:
        anonymous = make_client()
        assert anonymous.get_manifest(ref).digest == layout.manifest_digest
        data = b"anonymous may not push"
        with pytest.raises(AuthError, match="cannot push"):
            anonymous.push_blob(ref, digest_of(data), data)
    finally:
        tokens.anonymous_pull = False


# -- faults and retries --------------------------------------------------------------


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host) as p:
        yield p


def test_retries_transient_statuses(proxy: FaultProxy, layout: Layout) -> None:
    client = make_client()
    ref = ref_of(proxy.host, "test/img:v1")
    proxy.fail(2, 503)
    assert client.get_manifest(ref).digest == layout.manifest_digest
    assert proxy.injected("status") == 2

    proxy.fail(1, 429, retry_after="1")
    started = time.monotonic()
    assert client.get_blob(ref, layout.layers[0].digest,
                           size=len(layout.layers[0].blob)) == layout.layers[0].blob
    assert time.monotonic() - started >= 0.9  # Retry-After was honoured
    assert proxy.injected("status") == 3

    proxy.fail(100, 500)
    started = time.monotonic()
    with pytest.raises(RegistryError) as info:
        client.get_manifest(ref)
    assert time.monotonic() - started < 10
    assert proxy.injected("status") == 3 + 4  # first try + 3 retries
    message = str(info.value)
    assert "HTTP 500" in message and "UNAVAILABLE" in message and str(ref) in message
    proxy.clear()

    proxy.fail(1, 404)  # a 4xx is an answer, not a fault: no retry
    with pytest.raises(NotFoundError):
        client.get_manifest(ref)


def test_retries_dropped_connections(proxy: FaultProxy, layout: Layout) -> None:
    client = make_client()
    ref = ref_of(proxy.host, "test/img:v1")
    digest, blob = layout.layers[0].digest, layout.layers[0].blob
    proxy.drop(1, match="/blobs/")
    assert client.get_blob(ref, digest, size=len(blob)) == blob
    proxy.drop(1, match="/blobs/")
    with client.open_blob(ref, digest) as stream:
        assert stream.read() == blob
    assert proxy.injected("drop") == 2
    assert any("/blobs/" in line for line in proxy.counters.seen)


def test_corruption_is_detected(proxy: FaultProxy, layout: Layout) -> None:
    client = make_client()
    ref = ref_of(proxy.host, "test/img:v1")
    digest = layout.layers[0].digest
    proxy.corrupt(1, match="/blobs/")
    with pytest.raises(DigestMismatchError, match=digest):
        client.get_blob(ref, digest, size=len(layout.layers[0].blob))
    proxy.corrupt(1, match="/blobs/")
    with pytest.raises(DigestMismatchError), client.open_blob(ref, digest) as stream:
        stream.read()
    # Junk manifest JSON under the registry's Docker-Content-Digest, and by digest.
    proxy.corrupt(1, match="/manifests/")
    with pytest.raises(DigestMismatchError, match="manifest"):
        client.get_manifest(ref)
    proxy.corrupt(1, match="/manifests/")
    with pytest.raises(DigestMismatchError):
        client.get_manifest(ref.with_digest(layout.manifest_digest))
    assert proxy.injected("corrupt") == 4


def test_upload_restarts_after_transient_failure(proxy: FaultProxy) -> None:
    client = make_client(chunk_size=64 << 10)
    ref = ref_of(proxy.host, "test/restarted:v1")
    small = b"monolithic " * 50
    proxy.fail(1, 503, match="PUT /v2/test/restarted/blobs/uploads/")
    assert client.push_blob(ref, digest_of(small), small)
    assert client.get_blob(ref, digest_of(small), size=len(small)) == small

    large = os.urandom(300 << 10)
    proxy.fail(1, 502, match="PATCH /v2/test/restarted/blobs/uploads/")
    assert client.push_blob(ref, digest_of(large), io.BytesIO(large))
    assert client.get_blob(ref, digest_of(large), size=len(large)) == large
    assert proxy.injected("status") == 2
    posts = [line for line in proxy.counters.seen if line.startswith("POST")]
    assert len(posts) == 4  # each upload started twice


def test_unreachable_registry_fails_quickly() -> None:
    from registryd import free_port

    client = make_client(retries=2)
    ref = Reference.parse(f"127.0.0.1:{free_port()}/test/img:v1")
    started = time.monotonic()
    with pytest.raises(RegistryError, match="cannot reach") as info:
        client.get_manifest(ref)
    assert time.monotonic() - started < 5
    assert info.value.transient


# -- registries.conf -----------------------------------------------------------------


def test_registries_conf_insecure_allows_http(registry: Registry, layout: Layout,
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ref = ref_of(registry.host, "test/img:v1")
    with pytest.raises(RegistryError, match="TLS"):
        RegistryClient(registries_conf=RegistriesConf(), retries=0).get_manifest(ref)

    conf = tmp_path / "registries.conf"
    conf.write_text(
        'unqualified-search-registries = ["docker.io"]\n'
        f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n'
    )
    client = RegistryClient(registries_conf=str(conf), backoff=0.01)
    assert client.get_manifest(ref).digest == layout.manifest_digest
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
    assert RegistryClient().get_manifest(ref).digest == layout.manifest_digest


def test_registries_conf_rewrites_mirrors_and_blocks(registry: Registry, layout: Layout,
                                                     tmp_path: Path) -> None:
    from registryd import free_port

    dead = f"127.0.0.1:{free_port()}"
    text = (
        '[[registry]]\nprefix = "images.example/team"\n'
        f'location = "{registry.host}/test"\ninsecure = true\n'
        '[[registry]]\nprefix = "mirrored.example"\n'
        f'location = "{dead}"\ninsecure = true\n'
        f'[[registry.mirror]]\nlocation = "{registry.host}"\ninsecure = true\n'
        '[[registry]]\nlocation = "blocked.example"\nblocked = true\n'
    )
    client = RegistryClient(registries_conf=RegistriesConf.from_text(text), backoff=0.01,
                            retries=1)
    rewritten = Reference.parse("images.example/team/img:v1")
    assert client.get_manifest(rewritten).digest == layout.manifest_digest
    mirrored = Reference.parse("mirrored.example/test/img:v1")
    assert client.get_manifest(mirrored).digest == layout.manifest_digest
    with pytest.raises(RegistryError, match="cannot reach"):  # pushes skip mirrors
        client.put_manifest(mirrored, layout.manifest, OCI_MANIFEST)
    with pytest.raises(RegistryError, match="blocked"):
        client.get_manifest(Reference.parse("blocked.example/a/b:c"))


def test_registries_conf_matching(tmp_path: Path) -> None:
    conf_dir = tmp_path / "containers"
    (conf_dir / "registries.conf.d").mkdir(parents=True)
    (conf_dir / "registries.conf").write_text(
        '[[registry]]\nlocation = "reg.example"\n'
        '[[registry]]\nprefix = "reg.example/team"\nlocation = "mirror.example/t"\n'
        '[[registry]]\nprefix = "*.corp.example"\ninsecure = true\n'
        "[registries.insecure]\nregistries = ['old.example:5000']\n"
    )
    (conf_dir / "registries.conf.d" / "50-override.conf").write_text(
        '[[registry]]\nlocation = "reg.example"\nblocked = true\n')
    conf = RegistriesConf.load(conf_dir / "registries.conf")
    assert len(conf.sources) == 2
    assert conf.find("reg.example/team/app").prefix == "reg.example/team"  # type: ignore[union-attr]
    assert conf.find("reg.example/teamx/app").prefix == "reg.example"  # type: ignore[union-attr]
    assert conf.find("reg.example:5000/a") is None
    endpoint = conf.endpoints(Reference.parse("reg.example/team/app/x:1"))[-1]
    assert (endpoint.registry, endpoint.repository) == ("mirror.example", "t/app/x")
    assert conf.endpoints(Reference.parse("a.corp.example/x"))[-1].insecure
    assert conf.endpoints(Reference.parse("old.example:5000/x"))[-1].insecure
    with pytest.raises(RegistryError, match="blocked"):
        conf.endpoints(Reference.parse("reg.example/other"))
    with pytest.raises(Exception, match="invalid TOML"):
        RegistriesConf.from_text("[[registry]\n")
