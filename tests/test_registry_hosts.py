"""Host directories (containerd's hosts.toml and certs.d layouts, podman's certs.d) against
real registries serving real TLS on loopback: a private CA made here, server and client
certificates it signed, docker-registry with ``http.tls`` (and ``clientcas``)."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from registryd import Layout, Registry, free_port, push_layout, write_oci_layout
from soci.errors import AuthError, RegistryError
from soci.registry import (
    OCI_MANIFEST,
    Endpoint,
    HostsConfigError,
    Reference,
    RegistriesConf,
    RegistryClient,
    RegistryHosts,
)
from soci.registry.hosts import load_cert_files, parse_hosts_toml
from soci.registry.session import Session

USER, PASSWORD = "mirror-user", "mirror-Passw0rd"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No auth file or registries.conf of this machine leaks into a test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG",
                 "CONTAINERS_REGISTRIES_CONF"):
        monkeypatch.delenv(name, raising=False)


# -- a private PKI -------------------------------------------------------------------------


class Pki:
    """PEM files: a server CA and the server certificate it signed (for 127.0.0.1), a
    client CA and a client certificate, and an unrelated CA that trusts nothing here."""

    def __init__(self, root: Path) -> None:
        self.root = root
        server_ca = self._ca("soci test server CA", "ca.pem")
        client_ca = self._ca("soci test client CA", "client-ca.pem")
        self._ca("soci test unrelated CA", "other-ca.pem")
        self._leaf(server_ca, "server", server=True)
        self._leaf(client_ca, "client", server=False)
        self.ca = root / "ca.pem"
        self.client_ca = root / "client-ca.pem"
        self.other_ca = root / "other-ca.pem"
        self.server_cert, self.server_key = root / "server.pem", root / "server.key"
        self.client_cert, self.client_key = root / "client.pem", root / "client.key"

    def _ca(self, name: str, file: str) -> tuple[object, object]:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        self._write(file, cert)
        return cert, key

    def _leaf(self, issuer: tuple[object, object], stem: str, *, server: bool) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        ca_cert, ca_key = issuer
        assert isinstance(ca_cert, x509.Certificate)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"soci {stem}")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
            ]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        self._write(f"{stem}.pem", cert)
        (self.root / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    def _write(self, file: str, cert: object) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        assert isinstance(cert, x509.Certificate)
        (self.root / file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


# -- registries ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return write_oci_layout(tmp_path_factory.mktemp("layout") / "img")


@pytest.fixture(scope="module")
def plain(layout: Layout) -> Iterator[Registry]:
    """A plain-HTTP registry holding ``test/img:v1``; the TLS ones serve its storage."""
    with Registry() as reg:
        push_layout(layout.path, reg.host, "test/img:v1")
        yield reg


@pytest.fixture(scope="module")
def tls(pki: Pki, plain: Registry) -> Iterator[Registry]:
    with Registry(tls=(pki.server_cert, pki.server_key), storage=plain.root) as reg:
        yield reg


@pytest.fixture(scope="module")
def mtls(pki: Pki, plain: Registry) -> Iterator[Registry]:
    """HTTPS demanding a client certificate the client CA signed."""
    with Registry(tls=(pki.server_cert, pki.server_key), client_cas=[pki.client_ca],
                  storage=plain.root) as reg:
        yield reg


def client(hosts_dir: Path | None = None, *, certs_dirs: list[Path] | None = None,
           registries_conf: RegistriesConf | None = None,
           credentials: dict[str, tuple[str, str]] | None = None) -> RegistryClient:
    """A client reading only the directories given (never this machine's)."""
    return RegistryClient(
        registries_conf=registries_conf or RegistriesConf(),
        hosts_dir=[hosts_dir] if hosts_dir is not None else [],
        certs_dirs=certs_dirs or [],
        credentials=credentials or {},
        retries=1,
        backoff=0.01,
    )


def hosts_toml(root: Path, host: str, text: str, *, dir_name: str | None = None) -> Path:
    """Write ``<root>/<host>/hosts.toml`` (or under ``dir_name``); return the directory."""
    directory = root / (dir_name or host)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.toml").write_text(text)
    return directory


def pull(c: RegistryClient, ref: Reference, layout: Layout) -> None:
    """Resolve the tag, fetch the manifest and the data layer, and check them."""
    manifest = c.get_manifest(ref)
    assert manifest.digest == layout.manifest_digest
    assert manifest.media_type == OCI_MANIFEST
    layer = layout.data_layer
    assert c.get_blob(ref, layer.digest, size=layer.size) == layer.blob


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text
    return text


# -- TLS settings from hosts.toml ----------------------------------------------------------


def test_hosts_toml_ca_trusts_private_registry(
    tmp_path: Path, pki: Pki, tls: Registry, layout: Layout
) -> None:
    ref = Reference.parse(f"{tls.host}/test/img:v1")
    with client(tmp_path) as c, pytest.raises(RegistryError) as caught:
        c.get_manifest(ref)
    message = one_line(caught.value)
    assert f"TLS error talking to {tls.host}" in message
    assert "CERTIFICATE_VERIFY_FAILED" in message

    # containerd's directory name for host:port is host_port_; ca relative to it.
    directory = hosts_toml(tmp_path, tls.host, 'ca = "ca.pem"\n',
                           dir_name=tls.host.replace(":", "_") + "_")
    (directory / "ca.pem").write_bytes(pki.ca.read_bytes())
    with client(tmp_path) as c:
        pull(c, ref, layout)


def test_hosts_toml_wrong_ca_fails(tmp_path: Path, pki: Pki, tls: Registry) -> None:
    hosts_toml(tmp_path, tls.host, f'server = "https://{tls.host}"\nca = ["{pki.other_ca}"]\n')
    with client(tmp_path) as c, pytest.raises(RegistryError, match="TLS error talking to"):
        c.get_manifest(Reference.parse(f"{tls.host}/test/img:v1"))


def test_skip_verify(tmp_path: Path, tls: Registry, layout: Layout) -> None:
    hosts_toml(tmp_path, tls.host, "skip_verify = true\n")
    with client(tmp_path) as c:
        pull(c, Reference.parse(f"{tls.host}/test/img:v1"), layout)


def test_client_certificate_required_and_supplied(
    tmp_path: Path, pki: Pki, mtls: Registry, layout: Layout
) -> None:
    ref = Reference.parse(f"{mtls.host}/test/img:v1")
    hosts_toml(tmp_path / "without", mtls.host, f'ca = "{pki.ca}"\n')
    with client(tmp_path / "without") as c, pytest.raises(RegistryError) as caught:
        c.get_manifest(ref)
    message = one_line(caught.value)
    assert mtls.host in message and "client certificate" in message

    hosts_toml(tmp_path / "with", mtls.host,
               f'ca = "{pki.ca}"\nclient = [["{pki.client_cert}", "{pki.client_key}"]]\n')
    with client(tmp_path / "with") as c:
        pull(c, ref, layout)


def test_client_certificate_and_key_in_one_file(
    tmp_path: Path, pki: Pki, mtls: Registry, layout: Layout
) -> None:
    directory = hosts_toml(tmp_path, mtls.host, f'ca = "{pki.ca}"\nclient = "both.pem"\n')
    (directory / "both.pem").write_bytes(pki.client_cert.read_bytes() + pki.client_key.read_bytes())
    with client(tmp_path) as c:
        pull(c, Reference.parse(f"{mtls.host}/test/img:v1"), layout)


def test_missing_client_key_is_one_line_naming_the_file(
    tmp_path: Path, pki: Pki, mtls: Registry
) -> None:
    directory = hosts_toml(tmp_path, mtls.host,
                           f'ca = "{pki.ca}"\nclient = [["{pki.client_cert}", "gone.key"]]\n')
    with client(tmp_path) as c, pytest.raises(HostsConfigError) as caught:
        c.get_manifest(Reference.parse(f"{mtls.host}/test/img:v1"))
    message = one_line(caught.value)
    assert str(directory / "hosts.toml") in message and str(directory / "gone.key") in message


# -- endpoints: server, mirrors, capabilities ----------------------------------------------


def test_mirror_serves_pull_when_origin_is_down(
    tmp_path: Path, pki: Pki, tls: Registry, layout: Layout
) -> None:
    origin = f"127.0.0.1:{free_port()}"  # nothing listens there
    hosts_toml(tmp_path, origin, f"""
server = "https://{origin}"

[host."https://{tls.host}"]
  capabilities = ["pull", "resolve", "referrers"]
  ca = "{pki.ca}"
""")
    ref = Reference.parse(f"{origin}/test/img:v1")
    with client(tmp_path) as c:
        pull(c, ref, layout)
        assert c.referrers(ref, layout.manifest_digest) == []


def test_mirror_without_resolve_is_not_asked_for_tags(
    tmp_path: Path, pki: Pki, tls: Registry, layout: Layout
) -> None:
    origin = f"127.0.0.1:{free_port()}"
    directory = hosts_toml(tmp_path, origin, f"""
server = "https://{origin}"
capabilities = ["push"]

[host."https://{tls.host}"]
  capabilities = ["pull"]
  ca = "{pki.ca}"
""")
    by_tag = Reference.parse(f"{origin}/test/img:v1")
    with client(tmp_path) as c:
        with pytest.raises(RegistryError) as caught:
            c.get_manifest(by_tag)
        message = one_line(caught.value)
        assert "'resolve'" in message and str(directory / "hosts.toml") in message
        # By digest the mirror may serve it (pull), and blobs too.
        pinned = by_tag.with_digest(layout.manifest_digest)
        assert c.get_manifest(pinned).digest == layout.manifest_digest
        layer = layout.data_layer
        assert c.get_blob(by_tag, layer.digest, size=layer.size) == layer.blob


def test_origin_credentials_never_go_to_a_mirror(
    tmp_path: Path, pki: Pki, plain: Registry, layout: Layout
) -> None:
    """The mirror accepts exactly the origin's credentials: only the mirror's own entry
    may make it authenticate."""
    origin = f"127.0.0.1:{free_port()}"
    with Registry(tls=(pki.server_cert, pki.server_key), storage=plain.root,
                  htpasswd={USER: PASSWORD}) as mirror:
        hosts_toml(tmp_path, origin, f"""
[host."https://{mirror.host}"]
  capabilities = ["pull", "resolve"]
  ca = "{pki.ca}"
""")
        hosts_toml(tmp_path, mirror.host, f'ca = "{pki.ca}"\n')
        ref = Reference.parse(f"{origin}/test/img:v1")
        with client(tmp_path, credentials={origin: (USER, PASSWORD)}) as c:
            # The mirror refuses (it got no credentials), then the origin is down.
            target = Reference.parse(f"{mirror.host}/test/img:v1")
            with pytest.raises(AuthError, match=mirror.host):
                c.get_manifest(target)
            with pytest.raises(RegistryError, match=f"cannot reach {origin}"):
                c.get_manifest(ref)
        with client(tmp_path, credentials={mirror.host: (USER, PASSWORD)}) as c:
            pull(c, ref, layout)


def test_http_server_for_plain_registry(tmp_path: Path, plain: Registry, layout: Layout) -> None:
    ref = Reference.parse(f"{plain.host}/test/img:v1")
    with client(tmp_path) as c, pytest.raises(RegistryError, match=plain.host):
        c.get_manifest(ref)  # HTTPS by default: a plain registry cannot answer
    hosts_toml(tmp_path, plain.host, f'server = "http://{plain.host}"\n')
    with client(tmp_path) as c:
        pull(c, ref, layout)


def test_server_elsewhere_and_default_dir(tmp_path: Path, plain: Registry, layout: Layout) -> None:
    """``_default`` applies to any host without its own directory; ``server`` sends the
    registry's traffic to another host altogether."""
    hosts_toml(tmp_path, "_default", f'server = "http://{plain.host}"\n')
    with client(tmp_path) as c:
        pull(c, Reference.parse("registry.invalid/test/img:v1"), layout)


def test_http_server_with_tls_settings_tries_https_first(
    tmp_path: Path, pki: Pki, tls: Registry, layout: Layout
) -> None:
    hosts_toml(tmp_path, tls.host, f'server = "http://{tls.host}"\nca = "{pki.ca}"\n')
    with client(tmp_path) as c:
        pull(c, Reference.parse(f"{tls.host}/test/img:v1"), layout)


def test_hosts_toml_wins_over_registries_conf_insecure(
    tmp_path: Path, pki: Pki, tls: Registry, layout: Layout
) -> None:
    """registries.conf ``insecure`` alone reaches the TLS registry unverified; a hosts.toml
    CA for the same host makes it verified (a wrong CA then fails)."""
    conf = RegistriesConf.from_text(f'[[registry]]\nlocation = "{tls.host}"\ninsecure = true\n')
    ref = Reference.parse(f"{tls.host}/test/img:v1")
    with client(tmp_path, registries_conf=conf) as c:
        pull(c, ref, layout)
    hosts_toml(tmp_path, tls.host, f'ca = "{pki.other_ca}"\n')
    with client(tmp_path, registries_conf=conf) as c, \
            pytest.raises(RegistryError, match="CERTIFICATE_VERIFY_FAILED"):
        c.get_manifest(ref)


def test_registries_conf_mirror_reached_with_its_hosts_toml(
    tmp_path: Path, pki: Pki, tls: Registry, layout: Layout
) -> None:
    """registries.conf names the mirror; the mirror host's hosts.toml says how to trust it."""
    origin = f"127.0.0.1:{free_port()}"
    conf = RegistriesConf.from_text(
        f'[[registry]]\nlocation = "{origin}"\n[[registry.mirror]]\nlocation = "{tls.host}"\n'
    )
    hosts_toml(tmp_path, tls.host, f'ca = "{pki.ca}"\n')
    with client(tmp_path, registries_conf=conf) as c:
        pull(c, Reference.parse(f"{origin}/test/img:v1"), layout)


# -- certificate-only directories ----------------------------------------------------------


def test_legacy_certs_dir_without_hosts_toml(
    tmp_path: Path, pki: Pki, mtls: Registry, layout: Layout
) -> None:
    directory = tmp_path / mtls.host
    directory.mkdir()
    (directory / "ca.crt").write_bytes(pki.ca.read_bytes())
    (directory / "client.cert").write_bytes(pki.client_cert.read_bytes())
    (directory / "client.key").write_bytes(pki.client_key.read_bytes())
    with client(tmp_path) as c:
        pull(c, Reference.parse(f"{mtls.host}/test/img:v1"), layout)


def test_containers_certs_dir(tmp_path: Path, pki: Pki, mtls: Registry, layout: Layout) -> None:
    certs = tmp_path / "containers-certs.d"
    directory = certs / mtls.host  # podman's name: host:port
    directory.mkdir(parents=True)
    (directory / "ca.crt").write_bytes(pki.ca.read_bytes())
    (directory / "client.cert").write_bytes(pki.client_cert.read_bytes())
    (directory / "client.key").write_bytes(pki.client_key.read_bytes())
    with client(certs_dirs=[tmp_path / "empty", certs]) as c:
        pull(c, Reference.parse(f"{mtls.host}/test/img:v1"), layout)


def test_containers_certs_dir_key_without_cert(tmp_path: Path) -> None:
    (tmp_path / "client.key").write_text("x")
    with pytest.raises(HostsConfigError, match=r"client\.key has no client certificate"):
        load_cert_files(tmp_path, need_keys=True)


# -- parsing -------------------------------------------------------------------------------


def test_junk_hosts_toml_is_one_line_naming_the_file(tmp_path: Path, tls: Registry) -> None:
    directory = hosts_toml(tmp_path, tls.host, 'server = "https://x\n[host\n')
    with client(tmp_path) as c, pytest.raises(HostsConfigError) as caught:
        c.get_manifest(Reference.parse(f"{tls.host}/test/img:v1"))
    message = one_line(caught.value)
    assert message.startswith(f"{directory / 'hosts.toml'}: invalid TOML")


@pytest.mark.parametrize("text, expected", [
    ('capabilities = ["pull", "fly"]', "unknown capability 'fly'"),
    ("ca = 3", "ca must be a string or a list of strings"),
    ('client = [["a", "b", "c"]]', "client entries must be"),
    ("skip_verify = 'yes'", "skip_verify must be a boolean"),
    ('server = "ftp://x"', "not an http(s)://host"),
    ('[host."https://m"]\nheader = { "Bad Name" = "v" }', "invalid header"),
    ("host = 1", "host must be a table"),
])
def test_bad_hosts_toml_values(text: str, expected: str) -> None:
    with pytest.raises(HostsConfigError) as caught:
        parse_hosts_toml(text, "/etc/containerd/certs.d/r.example")
    assert expected in one_line(caught.value)
    assert "/etc/containerd/certs.d/r.example/hosts.toml" in str(caught.value)


def test_parse_order_paths_and_defaults() -> None:
    plan = parse_hosts_toml("""
server = "r.example"
ca = "/abs/ca.pem"

[host."http://b.example:5000/prefix"]
  capabilities = ["pull"]
  client = ["one.pem", ["c.cert", "c.key"]]
  [host."http://b.example:5000/prefix".header]
    X-A = ["1", "2"]

[host."https://a.example/v2/ns"]
  override_path = true
  skip_verify = true
""", "/d")
    b, a, server = plan.hosts
    assert (b.scheme, b.host, b.path) == ("http", "b.example:5000", "/prefix/v2")
    assert b.capabilities == {"pull"}
    assert b.tls is not None and b.tls.client_pairs == (("/d/one.pem", None),
                                                      ("/d/c.cert", "/d/c.key"))
    assert b.headers == (("X-A", "1, 2"),)
    assert (a.scheme, a.host, a.path) == ("https", "a.example", "/v2/ns")
    assert a.tls is not None and a.tls.skip_verify
    assert (server.scheme, server.host, server.path) == ("https", "r.example", "/v2")
    assert server.tls is not None and server.tls.ca_files == ("/abs/ca.pem",)
    assert server.capabilities == {"pull", "resolve", "push", "referrers"}


def test_expand_keeps_registries_conf_limits(tmp_path: Path) -> None:
    """A registries.conf mirror expanded by its hosts.toml keeps only what both allow, and
    the mirror gets ``ns`` and its own name (hence its own credentials)."""
    hosts_toml(tmp_path, "m.example", '[host."https://n.example"]\n')
    hosts = RegistryHosts([tmp_path], [])
    mirror = Endpoint("m.example", "lib/x", mirror=True,
                      capabilities=frozenset({"pull", "resolve"}))
    first, last = hosts.expand(mirror)
    assert (first.registry, first.namespace, first.capabilities) == (
        "n.example", "m.example", {"pull", "resolve"})
    assert (last.registry, last.namespace) == ("m.example", None)
    assert Session._api_path(first, "/v2/lib/x/manifests/v1?n=1") == (
        "/v2/lib/x/manifests/v1?n=1&ns=m.example")
    prefixed = Endpoint("p.example", "x", api_root="/v2/ns")  # override_path = true
    assert Session._api_path(prefixed, "/v2/x/blobs/sha256:ab") == "/v2/ns/x/blobs/sha256:ab"
    assert Session._api_path(prefixed, "https://p.example/v2/x?last=1") == (
        "https://p.example/v2/x?last=1")  # a registry's own link: as written
    assert hosts.expand(Endpoint("other.example", "x")) == [Endpoint("other.example", "x")]
    assert hosts.plan("../etc") is None
