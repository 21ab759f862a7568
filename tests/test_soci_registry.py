"""create / push / convert / discovery / ztoc get-file against a real docker-registry."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from images import big_file, files_layer, write_image, write_multiarch
from registryd import FaultProxy, Registry, push_layout
from soci.artifacts import LocalStore
from soci.index.discover import discover_index
from soci.oci import mediatypes as mt
from soci.oci.descriptor import Descriptor, Manifest
from soci.registry import Reference, RegistryClient

BIG = {f"opt/app/data{i}.bin": big_file(f"r{i}", 3_000_000) for i in range(5)}
SMALL = {"etc/os-release": b"NAME=registry-test\n"}


def soci(root: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "soci.cli", "--plain-http", "--root", str(root),
                           *args], capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with Registry() as r:
        yield r


@pytest.fixture(scope="module")
def app_image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = tmp_path_factory.mktemp("app")
    write_image(layout, "v1", [files_layer(SMALL), files_layer(BIG)])
    push_layout(layout, registry.host, "app:v1", tag="v1")
    push_layout(layout, registry.host, "dockerapp:v1", tag="v1", format="v2s2")
    multi = tmp_path_factory.mktemp("multi")
    write_multiarch(multi, "m", {"linux/amd64": [files_layer(BIG)],
                                 "linux/arm64": [files_layer({"a": big_file("arm", 16 << 20)})]})
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--all",
                    "--dest-tls-verify=false", f"oci:{multi}:m",
                    f"docker://{registry.host}/multi:m"], check=True, capture_output=True)
    return f"{registry.host}/app:v1"


def client() -> RegistryClient:
    return RegistryClient(plain_http=True, retries=2, backoff=0.05)


def manifest_of(ref: str) -> tuple[Reference, Descriptor, Manifest]:
    r = Reference.parse(ref)
    got = client().get_manifest(r)
    return r, Descriptor(got.media_type, got.digest, len(got.data)), Manifest.parse(got.data)


def test_create_push_and_discover_through_the_referrers_tag(tmp_path: Path, app_image: str) -> None:
    root = tmp_path / "root"
    out = soci(root, "create", app_image).stdout
    index_digest = out.strip().splitlines()[-1].split()[0]
    ref, desc, manifest = manifest_of(app_image)
    assert f"SOCI index for {desc.digest}" in out

    out = soci(root, "push", app_image).stdout
    assert f"{index_digest}  pushed for {desc.digest}" in out
    # docker-registry has no referrers API: the index went into the sha256-<hex> tag.
    assert f"sha256-{desc.digest[7:]}" in client().list_tags(ref)
    found = client().referrers(ref, desc.digest, mt.SOCI_INDEX_V1)
    assert [d["digest"] for d in found] == [index_digest]
    assert found[0]["artifactType"] == mt.SOCI_INDEX_V1

    # A second index (another span size) joins the first; neither is dropped.
    other = tmp_path / "other"
    soci(other, "create", "--span-size", "1048576", app_image)
    soci(other, "push", "-q", app_image)
    found = client().referrers(ref, desc.digest, mt.SOCI_INDEX_V1)
    assert len(found) == 2 and found[0]["digest"] == index_digest
    soci(other, "push", "-q", app_image)  # idempotent: no duplicate entry
    assert len(client().referrers(ref, desc.digest, mt.SOCI_INDEX_V1)) == 2

    # A machine with an empty store discovers it remotely, then locally (as this
    # repository's index: fetched ones are not trusted for other repositories).
    with LocalStore(tmp_path / "fresh") as store:
        got = discover_index(store, client(), ref, desc, manifest, "linux/amd64")
        assert got is not None and got.where == "referrers"
        assert all(store.content.has_blob(z.digest) for z in got.index.ztocs())
        again = discover_index(store, client(), ref, desc, manifest)
        assert again is not None and again.where == "earlier fetch"
        assert again.digest == got.digest


def test_local_only_flow_needs_no_registry_writes(tmp_path: Path, app_image: str) -> None:
    """An executor without push rights: artifacts and mapping only in the local store."""
    root = tmp_path / "root"
    index_digest = soci(root, "create", app_image).stdout.strip().splitlines()[-1].split()[0]
    _, desc, manifest = manifest_of(app_image)
    with LocalStore(root) as store:
        got = discover_index(store, None, None, desc, manifest)
        assert got is not None and got.where == "local mapping" and got.digest == index_digest
        store.mappings.remove(desc.digest)
        got = discover_index(store, None, None, desc, manifest)
        assert got is not None and got.where == "local store"


def test_docker_schema2_and_platforms(tmp_path: Path, registry: Registry, app_image: str) -> None:
    root = tmp_path / "root"
    out = soci(root, "create", f"{registry.host}/dockerapp:v1").stdout
    assert "SOCI index for" in out
    out = soci(root, "create", "--all-platforms", f"{registry.host}/multi:m").stdout
    assert "(linux/amd64)" in out and "(linux/arm64)" in out
    proc = soci(root, "create", "--platform", "windows/amd64", f"{registry.host}/multi:m",
                ok=False)
    assert "no manifest for platform windows/amd64" in proc.stderr


def test_convert_registry_to_registry(tmp_path: Path, registry: Registry, app_image: str) -> None:
    root = tmp_path / "root"
    for dst in (f"{registry.host}/app:v1-soci", f"{registry.host}/elsewhere:soci"):
        top = soci(root, "convert", app_image, dst).stdout.strip().splitlines()[-1].split()[0]
        raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                              f"docker://{dst}"], capture_output=True, check=True).stdout
        index = json.loads(raw)
        assert index["mediaType"] == mt.OCI_INDEX
        image_entry, soci_entry = index["manifests"]
        assert soci_entry["artifactType"] == mt.SOCI_INDEX_V2
        # Every blob is there: skopeo copies the whole SOCI-enabled image out again.
        out = tmp_path / dst.rsplit("/", 1)[1].replace(":", "-")
        subprocess.run(["skopeo", "copy", "--quiet", "--all", "--src-tls-verify=false",
                        f"docker://{dst}", f"oci:{out}:x"], check=True, capture_output=True)
        assert top.startswith("sha256:")

    # A fresh machine finds the v2 index through the image's annotation.
    ref = Reference.parse(f"{registry.host}/elsewhere:soci")
    child = client().get_manifest(ref.with_digest(image_entry["digest"]))
    desc = Descriptor(child.media_type, child.digest, len(child.data))
    with LocalStore(tmp_path / "fresh") as store:
        got = discover_index(store, client(), ref, desc, Manifest.parse(child.data))
        assert got is not None and got.where == "image annotation"
        assert got.digest == soci_entry["digest"] and got.index.version == 2


def test_get_file_lazily_from_the_registry(tmp_path: Path, registry: Registry,
                                           app_image: str) -> None:
    root = tmp_path / "root"
    soci(root, "create", "--span-size", "1048576", app_image)
    ztoc = soci(root, "ztoc", "ls", "-q").stdout.split()[0]
    with FaultProxy(registry.host) as proxy:
        via = f"{proxy.host}/app:v1"
        got = subprocess.run([sys.executable, "-m", "soci.cli", "--plain-http", "--root",
                              str(root), "ztoc", "get-file", ztoc, "opt/app/data2.bin", "--ref",
                              via], capture_output=True, check=True).stdout
        assert got == BIG["opt/app/data2.bin"]
        blob_gets = [s for s in proxy.counters.seen if s.startswith("GET") and "/blobs/" in s]
        assert 1 <= len(blob_gets) <= 2  # one ranged GET (two if redirected), not the layer


def test_registry_faults(tmp_path: Path, registry: Registry, app_image: str) -> None:
    root = tmp_path / "root"
    with FaultProxy(registry.host) as proxy:
        via = f"{proxy.host}/app:v1"
        proxy.corrupt(1, match="/blobs/")
        proc = soci(root, "create", "--min-layer-size", "0", via, ok=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1
        assert "sha256" in proc.stderr
        assert soci(root, "ztoc", "ls", "-q").stdout == ""

        proxy.fail(2, 503)
        soci(root, "create", via)  # retried

        proxy.fail(100, 500, match="PUT")
        proc = soci(root, "push", via, ok=False)
        assert proc.returncode == 1 and "500" in proc.stderr
        proxy.clear()
        soci(root, "push", via)

    for args, message in [
        (["create", f"{registry.host}/nosuch:v1"], "manifest unknown"),
        (["push", f"{registry.host}/dockerapp:v1"], "run soci create"),
        (["push", "oci:/tmp/x:y"], "needs a registry reference"),
    ]:
        proc = soci(tmp_path / "empty", *args, ok=False)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1
