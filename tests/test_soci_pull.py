"""``soci pull`` against a real containerd (both generations) and the real docker-registry.

Everything runs with ``--snapshotter overlayfs``: containerd's own snapshotter, so no soci
snapshotter is needed and every layer takes the non-lazy path (download, Diff.Apply, Commit).
Each test works in a namespace of its own on a containerd shared by the module.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from containerdenv import GENERATIONS, Containerd, containerd_available
from images import busybox_layer, files_layer, write_image, write_multiarch
from registryd import FaultProxy, Registry, push_layout
from soci.containerd.pull import (
    LABEL_IMAGE_LAYERS,
    child_gc_labels,
    joined_within,
    merged_sources,
    registry_hostname,
)
from soci.image.resolve import chain_ids
from soci.oci.descriptor import Descriptor

HELLO = b"hello from a containerd pull\n" * 3
DATA = {"file": HELLO, "etc/app.conf": b"mode=test\n"}
OVERLAY = "overlayfs"


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with Registry() as r:
        yield r


@pytest.fixture(scope="module")
def images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """app:v1 (busybox + data), multi:m (an index: amd64 runnable, arm64 not), bad:v1 (a
    config whose diff ID does not match its layer)."""
    app = tmp_path_factory.mktemp("app")
    written = write_image(app, "v1", [busybox_layer(), files_layer(DATA)])
    push_layout(app, registry.host, "app:v1", tag="v1")
    multi = tmp_path_factory.mktemp("multi")
    write_multiarch(multi, "m", {"linux/amd64": [busybox_layer(), files_layer(DATA)],
                                 "linux/arm64": [files_layer({"arm": b"arm64 only\n"})]})
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--all",
                    "--dest-tls-verify=false", f"oci:{multi}:m",
                    f"docker://{registry.host}/multi:m"], check=True, capture_output=True)
    bad = tmp_path_factory.mktemp("bad")
    _write_lying_image(bad, files_layer({"x": b"x\n"}))
    push_layout(bad, registry.host, "bad:v1", tag="v1")
    return {"app": f"{registry.host}/app:v1", "multi": f"{registry.host}/multi:m",
            "bad": f"{registry.host}/bad:v1", "app_manifest": written.manifest_digest}


def _blob(root: Path, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = root / "blobs" / "sha256" / digest[7:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def _write_lying_image(root: Path, tar: bytes) -> None:
    """An image whose config claims another diff ID for its (uncompressed) layer."""
    import gzip
    layer = _blob(root, gzip.compress(tar, mtime=0))
    lie = "sha256:" + hashlib.sha256(b"not this layer").hexdigest()
    config = _blob(root, json.dumps({"architecture": "amd64", "os": "linux",
                                     "rootfs": {"type": "layers", "diff_ids": [lie]}}).encode())
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
    }).encode()
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **_blob(root, manifest),
            "annotations": {"org.opencontainers.image.ref.name": "v1"}}
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))


@pytest.fixture(scope="module", params=GENERATIONS)
def ctrd(request: pytest.FixtureRequest, registry: Registry) -> Iterator[Containerd]:
    why = containerd_available(request.param)
    if why is not None:
        pytest.fail(f"containerd {request.param}: {why}")
    with Containerd(request.param, registry_hosts=[registry.host], log_level="info") as c:
        yield c


@pytest.fixture
def ns() -> str:
    return f"pull-{uuid.uuid4().hex[:10]}"


def soci_pull(ctrd: Containerd | str, ns: str, *args: str, ok: bool = True,
              tmp: Path | None = None) -> subprocess.CompletedProcess[str]:
    address = ctrd if isinstance(ctrd, str) else ctrd.address
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
    proc = subprocess.run(
        [sys.executable, "-m", "soci.cli", "--plain-http", "pull", "--address", address,
         "--namespace", ns, *args], capture_output=True, text=True, timeout=300, env=env)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def content_labels(ctrd: Containerd, ns: str) -> dict[str, dict[str, str]]:
    """``ctr content ls``: digest -> labels."""
    out = ctrd.ctr("content", "ls", namespace=ns).stdout.splitlines()[1:]
    result = {}
    for line in out:
        fields = line.split("\t")
        labels = fields[-1].strip()
        result[fields[0]] = dict(kv.split("=", 1) for kv in labels.split(",")) \
            if labels and labels != "-" else {}
    return result


def snapshots(ctrd: Containerd, ns: str) -> list[list[str]]:
    """``ctr snapshots ls``: [key, parent, kind] rows (parent "" for a bottom layer)."""
    rows = ctrd.ctr("snapshots", "--snapshotter", OVERLAY, "ls", namespace=ns).stdout
    out = []
    for line in rows.splitlines()[1:]:
        parts = line.split()
        out.append(parts if len(parts) == 3 else [parts[0], "", parts[-1]])
    return out


def snapshot_labels(ctrd: Containerd, ns: str, key: str) -> dict[str, str]:
    info = json.loads(ctrd.ctr("snapshots", "--snapshotter", OVERLAY, "info", key,
                               namespace=ns).stdout)
    return info.get("Labels", {})


def diff_ids_of(ref: str) -> list[str]:
    from soci.registry import Reference, RegistryClient
    r = Reference.parse(ref)
    with RegistryClient(plain_http=True) as client:
        manifest = json.loads(client.get_manifest(r).data)
        config = client.get_blob(r, manifest["config"]["digest"],
                                 size=manifest["config"]["size"])
    return json.loads(config)["rootfs"]["diff_ids"]


# -- pure helpers, checked against what containerd computes ------------------------------


def test_label_helpers_follow_containerd() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    chain = chain_ids([a, b])
    assert chain == [a, "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()]
    layer = "application/vnd.oci.image.layer.v1.tar+gzip"
    labels = child_gc_labels([
        Descriptor("application/vnd.oci.image.config.v1+json", a, 1),
        Descriptor(layer, a, 1), Descriptor(layer, b, 1)])
    assert labels == {"containerd.io/gc.ref.content.config": a,
                      "containerd.io/gc.ref.content.l.0": a,
                      "containerd.io/gc.ref.content.l.1": b}
    # 100 layers do not fit one 4096-byte label: as many digests as fit, whole ones only.
    digests = [f"sha256:{i:064x}" for i in range(100)]
    joined = joined_within(LABEL_IMAGE_LAYERS, digests)
    assert len(LABEL_IMAGE_LAYERS) + len(joined) <= 4096
    assert joined.split(",") == digests[: len(joined.split(","))]
    assert len(LABEL_IMAGE_LAYERS) + len(joined) + 72 > 4096
    assert registry_hostname("127.0.0.1:5000") == "127.0.0.1"
    assert registry_hostname("[::1]:5000") == "::1"
    assert registry_hostname("docker.io") == "docker.io"
    assert merged_sources("b,a", "c") == "a,b,c" and merged_sources("a", "a") == "a"


# -- against containerd -------------------------------------------------------------------


def test_pull_then_run(ctrd: Containerd, images: dict[str, str], ns: str) -> None:
    ref = images["app"]
    out = soci_pull(ctrd, ns, "--snapshotter", OVERLAY, ref).stdout
    assert out.count(" pulled ") == 2, out
    assert f"{ref} {images['app_manifest']} (linux/amd64) for overlayfs" in out
    assert ref in ctrd.ctr("images", "ls", "-q", namespace=ns).stdout.split()
    ran = ctrd.run(ref, "cat", "/file", snapshotter=OVERLAY, namespace=ns)
    assert ran.stdout.encode() == HELLO

    # The snapshots are the image's chain, with the labels a remote snapshotter reads.
    chain = chain_ids(diff_ids_of(ref))
    rows = snapshots(ctrd, ns)
    assert sorted(r[0] for r in rows) == sorted(chain)
    assert all(r[2] == "Committed" for r in rows)
    top = snapshot_labels(ctrd, ns, chain[1])
    assert top["containerd.io/snapshot.ref"] == chain[1]
    assert top["containerd.io/snapshot/cri.image-ref"] == ref
    assert top["containerd.io/snapshot/cri.manifest-digest"] == images["app_manifest"]
    layers = json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        check=True, capture_output=True).stdout)["layers"]
    assert top["containerd.io/snapshot/cri.layer-digest"] == layers[1]["digest"]
    assert top["containerd.io/snapshot/cri.image-layers"] == layers[1]["digest"]
    bottom = snapshot_labels(ctrd, ns, chain[0])
    assert bottom["containerd.io/snapshot/cri.image-layers"] == ",".join(
        la["digest"] for la in layers)


def test_content_labels_match_ctr_pull(ctrd: Containerd, images: dict[str, str],
                                       ns: str) -> None:
    """What soci pull leaves in the content store is labelled exactly as containerd's own
    client labels it (garbage-collection references, sources, uncompressed digests)."""
    ref = images["multi"]
    soci_pull(ctrd, ns, "--snapshotter", OVERLAY, ref)
    theirs = f"{ns}-ctr"
    args = ["images", "pull", "--plain-http", "--snapshotter", OVERLAY]
    if ctrd.generation != "1.6":
        # containerd's client, not the transfer service; like CRI, no other platform's
        # manifests and configs (ctr 2.x fetches them by default).
        args += ["--local", "--skip-metadata"]
    ctrd.ctr(*args, ref, namespace=theirs, timeout=300)
    ours = content_labels(ctrd, ns)
    assert ours == content_labels(ctrd, theirs)
    # The index holds its platforms' manifests from the garbage collector, both of them.
    index = next(labels for labels in ours.values()
                 if "containerd.io/gc.ref.content.m.1" in labels)
    assert index["containerd.io/distribution.source.127.0.0.1"] == "multi"
    assert sorted(r[0] for r in snapshots(ctrd, ns)) == sorted(
        r[0] for r in snapshots(ctrd, theirs))
    ran = ctrd.run(ref, "cat", "/file", snapshotter=OVERLAY, namespace=ns)
    assert ran.stdout.encode() == HELLO


def test_platform_option(ctrd: Containerd, images: dict[str, str], ns: str) -> None:
    ref = images["multi"]
    out = soci_pull(ctrd, ns, "--snapshotter", OVERLAY, "--platform", "linux/arm64",
                    ref).stdout
    assert "(linux/arm64)" in out and out.count(" pulled ") == 1
    arm = [r[0] for r in snapshots(ctrd, ns)]
    assert len(arm) == 1
    listed = ctrd.ctr("images", "ls", namespace=ns).stdout
    assert ref in listed and "application/vnd.oci.image.index.v1+json" in listed
    bad = soci_pull(ctrd, ns, "--snapshotter", OVERLAY, "--platform", "linux/s390x", ref,
                    ok=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert "no manifest for platform linux/s390x" in bad.stderr


def test_pulling_twice_is_a_no_op(ctrd: Containerd, images: dict[str, str], ns: str) -> None:
    ref = images["app"]
    soci_pull(ctrd, ns, "--snapshotter", OVERLAY, ref)
    content, snaps = content_labels(ctrd, ns), snapshots(ctrd, ns)
    image = ctrd.ctr("images", "ls", namespace=ns).stdout
    out = soci_pull(ctrd, ns, "--snapshotter", OVERLAY, ref).stdout
    assert out.count("already present") == 2 and "0 B downloaded" in out, out
    assert content_labels(ctrd, ns) == content and snapshots(ctrd, ns) == snaps
    assert ctrd.ctr("images", "ls", namespace=ns).stdout == image
    assert ctrd.ctr("leases", "ls", "-q", namespace=ns).stdout.split() == []


def test_blob_already_in_content_store_is_not_downloaded(ctrd: Containerd, registry: Registry,
                                                         images: dict[str, str],
                                                         ns: str) -> None:
    """``ctr content fetch`` first: the pull unpacks from containerd's copy (0 bytes)."""
    ref = images["app"]
    ctrd.ctr("content", "fetch", "--plain-http", ref, namespace=ns, timeout=300)
    out = soci_pull(ctrd, ns, "--snapshotter", OVERLAY, ref).stdout
    assert out.count("pulled (blob was in the content store)") == 2, out
    assert "0 B downloaded" in out
    assert ctrd.run(ref, "cat", "/file", snapshotter=OVERLAY, namespace=ns).stdout.encode() \
        == HELLO


def test_blobs_of_another_namespace_are_shared_not_downloaded(
        ctrd: Containerd, images: dict[str, str], ns: str) -> None:
    """containerd shares blobs across namespaces: the second namespace's pull commits them
    without sending (or downloading) a byte, as containerd's own client does."""
    ref = images["app"]
    soci_pull(ctrd, f"{ns}-first", "--snapshotter", OVERLAY, ref)
    out = soci_pull(ctrd, ns, "--snapshotter", OVERLAY, ref).stdout
    assert out.count("pulled (blob was in the content store)") == 2, out
    assert "0 B downloaded" in out
    assert content_labels(ctrd, ns) == content_labels(ctrd, f"{ns}-first")
    assert ctrd.run(ref, "cat", "/file", snapshotter=OVERLAY, namespace=ns).stdout.encode() \
        == HELLO


def fresh_image(registry: Registry, tmp_path: Path) -> tuple[str, list[dict]]:
    """An image no namespace has pulled yet (containerd shares blobs across namespaces, so a
    test that needs the registry's bytes must not reuse another's): (repo:tag, layers)."""
    name = f"fresh{uuid.uuid4().hex[:8]}"
    written = write_image(tmp_path / name, "v1", [
        busybox_layer(), files_layer({**DATA, "nonce": name.encode()})])
    push_layout(tmp_path / name, registry.host, f"{name}:v1", tag="v1")
    return f"{name}:v1", [{"digest": la.digest} for la in written.layers]


def _nothing_left(ctrd: Containerd, ns: str) -> None:
    assert ctrd.ctr("images", "ls", "-q", namespace=ns).stdout.split() == []
    assert snapshots(ctrd, ns) == []
    assert content_labels(ctrd, ns) == {}


def test_wrong_bytes_from_the_registry_are_refused(ctrd: Containerd, registry: Registry,
                                                   tmp_path: Path, ns: str) -> None:
    name, layers = fresh_image(registry, tmp_path)
    with FaultProxy(registry.host) as proxy:
        proxy.corrupt(1, match=f"/blobs/{layers[1]['digest']}")
        bad = soci_pull(ctrd, ns, "--snapshotter", OVERLAY, f"{proxy.host}/{name}", ok=False)
        assert proxy.injected("corrupt") == 1
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
    assert "content has digest" in bad.stderr and layers[1]["digest"] in bad.stderr
    # The lease went with a synchronous garbage collection: not even the good layer stays.
    _nothing_left(ctrd, ns)
    assert ctrd.ctr("leases", "ls", "-q", namespace=ns).stdout.split() == []


def test_config_lying_about_the_diff_id_is_refused(ctrd: Containerd, images: dict[str, str],
                                                   ns: str) -> None:
    bad = soci_pull(ctrd, ns, "--snapshotter", OVERLAY, images["bad"], ok=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
    assert "unpacks to sha256:" in bad.stderr and "but the image config says" in bad.stderr
    _nothing_left(ctrd, ns)


def test_interrupted_pull_leaves_no_snapshot(ctrd: Containerd, registry: Registry,
                                             tmp_path: Path, ns: str) -> None:
    """Ctrl-C while a layer downloads: the extract snapshot and the ingest are dropped."""
    name, layers = fresh_image(registry, tmp_path)
    blob = f"/blobs/{layers[1]['digest']}"
    with FaultProxy(registry.host) as proxy:
        proxy.stall(1, 20, match=blob)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "soci.cli", "--plain-http", "pull", "--address",
             ctrd.address, "--namespace", ns, "--snapshotter", OVERLAY,
             f"{proxy.host}/{name}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env,
            # As typed in a terminal: a test run started in the background (a non-interactive
            # shell's `&`) ignores SIGINT, and children inherit that.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 60
            while not any(blob in s for s in proxy.counters.seen):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the pull never asked for the layer"
                time.sleep(0.05)
            # The extract snapshot for the layer is prepared before its blob is fetched.
            active = [r for r in snapshots(ctrd, ns) if r[2] == "Active"]
            assert len(active) == 1 and active[0][0].startswith("extract-")
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    assert [r for r in snapshots(ctrd, ns) if r[2] == "Active"] == []
    assert ctrd.ctr("images", "ls", "-q", namespace=ns).stdout.split() == []


def test_unknown_snapshotter_is_one_line(ctrd: Containerd, images: dict[str, str],
                                         ns: str) -> None:
    bad = soci_pull(ctrd, ns, images["app"], ok=False)  # default: soci, not configured here
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
    assert "containerd has no snapshotter 'soci'" in bad.stderr
    _nothing_left(ctrd, ns)


def test_unreachable_containerd_is_one_line(tmp_path: Path, images: dict[str, str]) -> None:
    missing = soci_pull(str(tmp_path / "nothing.sock"), "default", images["app"], ok=False)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1, missing.stderr
    assert f"cannot reach containerd at {tmp_path / 'nothing.sock'}" in missing.stderr
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("")
    refused = soci_pull(str(not_a_socket), "default", images["app"], ok=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr


def test_bad_arguments_are_one_line(tmp_path: Path, images: dict[str, str]) -> None:
    sock = str(tmp_path / "none.sock")
    for args, words in [(["--soci-index-digest", "sha256:abc", images["app"]],
                         "invalid SOCI index digest"),
                        (["--platform", "linux", images["app"]], "invalid platform"),
                        (["UPPER/Case"], "invalid reference")]:
        bad = soci_pull(sock, "default", *args, ok=False)
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
        assert words in bad.stderr
