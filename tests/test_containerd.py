"""containerd (1.6 and 2.x, real daemons) with soci-snapshotter-grpc as its proxy snapshotter:
images pulled through CRI (as kubelet pulls) and with ``soci pull``, run with ``ctr run``,
read lazily from a real registry behind a counting proxy."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from containerdenv import CRI_NAMESPACE, GENERATIONS, Containerd, containerd_available
from images import big_file, busybox_layer, files_layer, write_image
from registryd import FaultProxy, Registry, push_layout
from snapshotterenv import SnapshotterDaemon
from storeenv import soci

FILES = {f"opt/data/blob{i}.bin": big_file(f"c{i}", 4_000_000) for i in range(6)}
FILES["opt/data/motd"] = b"lazily loaded under containerd\n"
SMALL = {"etc/small.conf": b"small layer, pulled normally\n"}
READ = ("opt/data/motd", "opt/data/blob4.bin", "etc/small.conf")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


EXPECTED = "".join(f"{sha({**FILES, **SMALL}[p])}  /{p}\n" for p in READ)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("containerd")
    write_image(tmp / "img", "v1", [busybox_layer(), files_layer(SMALL), files_layer(FILES)])
    write_image(tmp / "zimg", "v1", [busybox_layer(), files_layer(FILES)], compress="zstd")
    # The app's layers again, zstd-compressed in many frames: lazy once indexed.
    write_image(tmp / "zfimg", "v1", [busybox_layer(), files_layer(SMALL), files_layer(FILES)],
                compress="zstd-frames")
    with Registry() as reg, FaultProxy(reg.host) as proxy:
        for name in ("app:v1", "noindex:v1"):
            push_layout(tmp / "img", reg.host, name, tag="v1")
        push_layout(tmp / "zimg", reg.host, "zstd:v1", tag="v1")
        push_layout(tmp / "zfimg", reg.host, "zapp:v1", tag="v1")
        # The index is built and pushed beforehand, as a CI pipeline would: the snapshotter
        # finds it through the registry (referrers tag), with an empty root of its own.
        soci(tmp / "build", "create", f"{reg.host}/app:v1")
        soci(tmp / "build", "push", f"{reg.host}/app:v1")
        soci(tmp / "build", "create", f"{reg.host}/zapp:v1")
        soci(tmp / "build", "push", f"{reg.host}/zapp:v1")
        zraw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                               f"docker://{reg.host}/zapp:v1"], capture_output=True,
                              check=True).stdout
        raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                              f"docker://{reg.host}/app:v1"], capture_output=True,
                             check=True).stdout
        yield {"tmp": tmp, "host": proxy.host, "proxy": proxy,
               "big": json.loads(raw)["layers"][2], "zbig": json.loads(zraw)["layers"][2]}


def served(world: dict, layer: str = "big") -> int:
    digest = world[layer]["digest"]
    return sum(n for path, n in world["proxy"].counters.sent.items() if digest in path)


def run_reads(ctrd: Containerd, image: str, namespace: str | None = None) -> str:
    return ctrd.run(image, "sha256sum", *(f"/{p}" for p in READ), snapshotter="soci",
                    namespace=namespace).stdout


def reconnected(ctrd: Containerd) -> str:
    """``ctr snapshots ls`` once containerd's proxy connection is back (it redials the
    restarted snapshotter with gRPC's backoff)."""
    deadline = time.monotonic() + 60
    while True:
        listed = ctrd.ctr("snapshots", "--snapshotter", "soci", "ls",
                          namespace=CRI_NAMESPACE, check=False)
        if listed.returncode == 0 or time.monotonic() > deadline:
            assert listed.returncode == 0, listed.stderr
            return listed.stdout
        time.sleep(0.5)


@pytest.fixture(params=GENERATIONS)
def generation(request: pytest.FixtureRequest) -> str:
    reason = containerd_available(request.param)
    assert reason is None, reason
    return request.param


def test_cri_pull_is_lazy_and_runs(world: dict, generation: str, tmp_path: Path) -> None:
    image = f"{world['host']}/app:v1"
    # The snapshotter reaches the plain-HTTP registry as containerd users configure it: a
    # hosts.toml in a certs.d directory ([registry] config_path), not --plain-http.
    hosts = tmp_path / "certs.d" / world["host"]
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(f'server = "http://{world["host"]}"\n')
    config = f'[registry]\nconfig_path = "{tmp_path / "certs.d"}"\n'
    with SnapshotterDaemon(tmp_path / "root", plain_http=False, extra_config=config) as sn, \
            Containerd(
            generation, soci_socket=sn.address, registry_hosts=[world["host"]]) as ctrd:
        before = served(world)
        ctrd.cri_pull(image)
        assert f"layer {world['big']['digest']} mounted lazily" in sn.logs()
        assert run_reads(ctrd, image, CRI_NAMESPACE) == EXPECTED
        fetched = served(world) - before
        assert 0 < fetched < world["big"]["size"] / 2, fetched
        listed = ctrd.ctr("snapshots", "--snapshotter", "soci", "ls",
                          namespace=CRI_NAMESPACE).stdout
        assert listed.count("Committed") == 3, listed


def test_cri_pull_of_a_zstd_image_is_lazy(world: dict, generation: str,
                                          tmp_path: Path) -> None:
    """A zstd layer of many frames with a zTOC is served lazily, as a gzip one is."""
    image = f"{world['host']}/zapp:v1"
    with SnapshotterDaemon(tmp_path / "root") as sn, Containerd(
            generation, soci_socket=sn.address, registry_hosts=[world["host"]]) as ctrd:
        before = served(world, "zbig")
        ctrd.cri_pull(image)
        assert f"layer {world['zbig']['digest']} mounted lazily" in sn.logs()
        assert run_reads(ctrd, image, CRI_NAMESPACE) == EXPECTED
        fetched = served(world, "zbig") - before
        assert 0 < fetched < world["zbig"]["size"] / 2, fetched


@pytest.mark.parametrize("name", ["noindex:v1", "zstd:v1"])
def test_images_without_a_ztoc_are_pulled_normally(world: dict, generation: str,
                                                   tmp_path: Path, name: str) -> None:
    image = f"{world['host']}/{name}"
    with SnapshotterDaemon(tmp_path / "root") as sn, Containerd(
            generation, soci_socket=sn.address, registry_hosts=[world["host"]]) as ctrd:
        ctrd.cri_pull(image)
        assert "served lazily as snapshot" not in sn.logs()
        out = ctrd.run(image, "sha256sum", "/opt/data/motd", "/opt/data/blob4.bin",
                       snapshotter="soci", namespace=CRI_NAMESPACE).stdout
        assert out == "".join(f"{sha(FILES[p])}  /{p}\n"
                              for p in ("opt/data/motd", "opt/data/blob4.bin"))


def test_snapshotter_restart_keeps_snapshots(world: dict, generation: str,
                                             tmp_path: Path) -> None:
    image = f"{world['host']}/app:v1"
    sn = SnapshotterDaemon(tmp_path / "root").start()
    try:
        with Containerd(generation, soci_socket=sn.address,
                        registry_hosts=[world["host"]]) as ctrd:
            ctrd.cri_pull(image)
            # A container's snapshot stays while the snapshotter restarts (it was killed).
            ctrd.ctr("containers", "create", "--snapshotter", "soci", image, "kept", "true",
                     namespace=CRI_NAMESPACE)
            sn.stop(9)
            sn.start()
            listed = reconnected(ctrd)
            assert "kept" in listed and listed.count("Committed") == 3, listed
            assert run_reads(ctrd, image, CRI_NAMESPACE) == EXPECTED
            ctrd.ctr("containers", "rm", "kept", namespace=CRI_NAMESPACE)
            ctrd.cri_remove(image)
            ctrd.ctr("snapshots", "--snapshotter", "soci", "rm", "kept",
                     namespace=CRI_NAMESPACE, check=False)
    finally:
        sn.close()


def test_parallel_pull_unpack_of_an_image_without_index(world: dict, generation: str,
                                                         tmp_path: Path) -> None:
    image = f"{world['host']}/noindex:v1"
    config = "[pull_modes.parallel_pull_unpack]\nenable = true\n"
    with SnapshotterDaemon(tmp_path / "root", extra_config=config) as sn, Containerd(
            generation, soci_socket=sn.address, registry_hosts=[world["host"]]) as ctrd:
        ctrd.cri_pull(image)
        assert sn.logs().count("fetched and unpacked") == 3, sn.logs()
        # containerd downloaded none of the layers: the snapshotter had them all.
        content = ctrd.ctr("content", "ls", namespace=CRI_NAMESPACE).stdout
        assert not [line for line in content.splitlines()
                    if line.startswith(world["big"]["digest"])], content
        out = ctrd.run(image, "sha256sum", *(f"/{p}" for p in READ), snapshotter="soci",
                       namespace=CRI_NAMESPACE).stdout
        assert out == EXPECTED


def soci_pull(ctrd: Containerd, image: str, *args: str,
              command: tuple[str, ...] = ("pull",)) -> str:
    return subprocess.run([sys.executable, "-m", "soci.cli", "--plain-http", *command,
                           "--address", ctrd.address, "--namespace", ctrd.namespace, *args,
                           image], capture_output=True, text=True, check=True).stdout


def test_soci_pull_is_lazy_and_runs(world: dict, generation: str, tmp_path: Path) -> None:
    image = f"{world['host']}/app:v1"
    with SnapshotterDaemon(tmp_path / "root") as sn, Containerd(
            generation, soci_socket=sn.address, registry_hosts=[world["host"]]) as ctrd:
        before = served(world)
        out = soci_pull(ctrd, image)
        # The big layer lazily; the two small ones (no zTOC) fetched by the snapshotter, so
        # containerd downloads nothing.
        assert "1 lazy, 2 unpacked, 0 B downloaded" in out, out
        assert run_reads(ctrd, image) == EXPECTED
        fetched = served(world) - before
        assert 0 < fetched < world["big"]["size"] / 2, fetched
        assert "mounted lazily" in sn.logs()
        # Removing the image and its snapshots releases the lazy layer.
        ctrd.ctr("images", "rm", "--sync", image)
        snapshots = ctrd.ctr("snapshots", "--snapshotter", "soci", "ls").stdout
        assert "Committed" not in snapshots, snapshots


def test_soci_pull_with_a_named_index(world: dict, generation: str, tmp_path: Path) -> None:
    image = f"{world['host']}/app:v1"
    index = soci(world["tmp"] / "build", "index", "list", "-q").split()[0]
    with SnapshotterDaemon(tmp_path / "root") as sn, Containerd(
            generation, soci_socket=sn.address, registry_hosts=[world["host"]]) as ctrd:
        soci_pull(ctrd, image, "--soci-index-digest", index)
        assert f"SOCI index {index} found in named by the client" in sn.logs()
        assert run_reads(ctrd, image) == EXPECTED
    # An index that is not there: the image is still pulled, normally.
    with SnapshotterDaemon(tmp_path / "root2") as sn, Containerd(
            generation, soci_socket=sn.address, registry_hosts=[world["host"]]) as ctrd:
        # (upstream's spelling of the command)
        soci_pull(ctrd, image, "--soci-index-digest", "sha256:" + "0" * 64,
                  command=("image", "rpull"))
        assert "mounted lazily" not in sn.logs()
        assert run_reads(ctrd, image) == EXPECTED
