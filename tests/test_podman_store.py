"""podman running containers from soci-store, end to end, with real parts only.

docker-registry on loopback (behind a counting proxy), an image pushed with
skopeo, SOCI artifacts from ``soci create`` (+ ``soci push`` or local only, or
``soci convert``), soci-store mounted, and podman (runc) pulling and running a
container that reads files.

Two podmans: the host's (4.3.1: asks the layer store for every layer, by blob digest) and
podman 5 from the Debian trixie root ``ci/podman5-root.sh`` builds (>= 5.1: asks only for
layers whose descriptor carries a TOC digest annotation, by that digest). Which SOCI index
is lazy on which, as the README's compatibility table says:

=========  =========================  ====================
podman     v1 (``create`` + ``push``)  v2 (``convert``)
=========  =========================  ====================
4.x        lazy                       lazy
5.x        full pull (works)          lazy
=========  =========================  ====================
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from images import big_file, busybox_layer, files_layer, write_image
from podmanenv import (
    PODMAN5_ROOT,
    Podman,
    chroot_scratch,
    podman5_available,
    podman_available,
)
from registryd import FaultProxy, Registry, push_layout
from storeenv import StoreDaemon, soci

FILES = {f"opt/data/blob{i}.bin": big_file(f"p{i}", 4_000_000) for i in range(6)}
FILES["opt/data/motd"] = b"hello from a lazily loaded layer\n"
SMALL = {"etc/small.conf": b"small layer, pulled normally\n"}
#: (podman, index version) -> whether the big layer is served lazily (see the module doc).
LAZY = {("host", "v1"): True, ("host", "v2"): True,
        ("podman5", "v1"): False, ("podman5", "v2"): True}
#: What the container reads first (two small files and the head of a big one: a lazy layer
#: is then served only in part); then every big file is hashed (:func:`check_all_files`).
CHECK = "cat /opt/data/motd /etc/small.conf && head -c 100000 /opt/data/blob2.bin | sha256sum"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    reason = podman_available()
    assert reason is None, reason
    tmp = tmp_path_factory.mktemp("podman")
    layout = tmp / "img"
    write_image(layout, "v1", [busybox_layer(), files_layer(SMALL), files_layer(FILES)])
    with Registry() as reg, FaultProxy(reg.host) as proxy:
        for name in ("app:v1", "local:v1", "conv:v1"):
            push_layout(layout, reg.host, name, tag="v1")
        # The same files in a zstd layer of many frames (as zstd:chunked and pzstd write).
        zlayout = tmp / "zimg"
        write_image(zlayout, "v1", [busybox_layer(), files_layer(SMALL), files_layer(FILES)],
                    compress="zstd-frames")
        push_layout(zlayout, reg.host, "zapp:v1", tag="v1")
        push_layout(zlayout, reg.host, "zconv:v1", tag="v1")
        zmanifest = json.loads(subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{reg.host}/zapp:v1"],
            capture_output=True, check=True).stdout)
        manifest = json.loads(subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{reg.host}/app:v1"],
            capture_output=True, check=True).stdout)
        yield {"tmp": tmp, "registry": reg, "proxy": proxy, "host": proxy.host,
               "big": manifest["layers"][2], "small": manifest["layers"][1],
               "zbig": zmanifest["layers"][2]}


@pytest.fixture(scope="module")
def indexed(world: dict) -> dict[str, str]:
    """The image names with each SOCI index: v1 (``create`` + ``push``), v2 (``convert``)."""
    ref = f"{world['host']}/app:v1"
    soci(world["tmp"] / "root-v1", "create", ref)
    soci(world["tmp"] / "root-v1", "push", ref)
    soci(world["tmp"] / "root-convert", "convert", f"{world['host']}/conv:v1",
         f"{world['host']}/conv:soci")
    return {"v1": "app:v1", "v2": "conv:soci"}


def _layer_bytes(proxy: FaultProxy, digest: str) -> int:
    return sum(n for path, n in proxy.counters.sent.items() if digest in path)


def run_lazily(world: dict, name: str, root: Path, tag: str, *,
               flavor: str = "host", big: str | None = None) -> tuple[bytes, int, str]:
    """Pull and run NAME with soci-store as podman's layer store; return the output, the
    big layer's bytes (``big``: that layer's digest) the registry served meanwhile and the
    store's log.

    ``flavor`` "podman5" runs podman 5 chrooted into :data:`PODMAN5_ROOT`; soci-store runs
    on the host with its mountpoint inside that root."""
    tmp = world["tmp"]
    ref = f"{world['host']}/{name}"
    chroot = None
    if flavor == "podman5":
        reason = podman5_available()
        assert reason is None, reason
        chroot = PODMAN5_ROOT
        scratch = chroot_scratch(PODMAN5_ROOT)
    else:
        scratch = tmp / f"scratch-{tag}"
    try:
        with StoreDaemon(root, scratch / "mnt") as store, Podman(
            scratch / "podman", additional_layer_store=str(store.mountpoint),
            insecure_registries=[world["host"]], chroot=chroot,
        ) as podman:
            digest = big or world["big"]["digest"]
            before = _layer_bytes(world["proxy"], digest)
            podman.pull(ref)
            out = podman.run(ref, "sh", "-c", CHECK)
            served = _layer_bytes(world["proxy"], digest) - before
            check_all_files(podman, ref)
            return out, served, store.logs()
    finally:
        if chroot is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def expected_output() -> bytes:
    head = hashlib.sha256(FILES["opt/data/blob2.bin"][:100000]).hexdigest()
    return FILES["opt/data/motd"] + SMALL["etc/small.conf"] + f"{head}  -\n".encode()


def check_all_files(podman: Podman, ref: str) -> None:
    """Every file of the big layer, read whole in a container, has the right sha256."""
    names = sorted(FILES)
    out = podman.run(ref, "sha256sum", *(f"/{n}" for n in names)).decode().split()
    assert out[0::2] == [hashlib.sha256(FILES[n]).hexdigest() for n in names]
    assert out[1::2] == [f"/{n}" for n in names]


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("flavor", ["host", "podman5"])
def test_podman_runs_an_indexed_image(world: dict, indexed: dict[str, str], flavor: str,
                                      version: str) -> None:
    """Each podman x each SOCI index: the container's files are right, and the big layer is
    lazy exactly where the module doc's table says (background fetch is off, so a lazy
    layer is served only in part until every file is hashed)."""
    root = world["tmp"] / f"root-{flavor}-{version}"  # fresh: the index is found remotely
    out, served, logs = run_lazily(world, indexed[version], root, f"{flavor}-{version}",
                                   flavor=flavor)
    assert out == expected_output()
    size = world["big"]["size"]
    print(f"{flavor} {version}: {served} of {size} bytes of the big layer served at start "
          f"({served / size:.2f})")
    lazily = f"layer {world['big']['digest']} mounted lazily"
    if LAZY[(flavor, version)]:
        assert lazily in logs
        assert 0 < served < size / 2, (served, size)
    else:
        # podman 5 never asks the store for a layer without a TOC digest annotation: it
        # pulls the whole layer from the registry, and the container still runs.
        assert lazily not in logs
        assert served >= size, (served, size)


@pytest.mark.parametrize(("flavor", "version"), [("host", "v1"), ("podman5", "v2")])
def test_podman_runs_a_zstd_image_lazily(world: dict, flavor: str, version: str) -> None:
    """A zstd layer of many frames is served lazily like a gzip one: each span a run of whole
    frames, fetched and decoded only when read (podman 4 with a v1 index, podman 5 with a
    converted image)."""
    host, big = world["host"], world["zbig"]
    assert big["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
    if version == "v1":
        soci(world["tmp"] / "root-zv1", "create", f"{host}/zapp:v1")
        soci(world["tmp"] / "root-zv1", "push", f"{host}/zapp:v1")
        name = "zapp:v1"
    else:
        soci(world["tmp"] / "root-zconv", "convert", f"{host}/zconv:v1", f"{host}/zconv:soci")
        name = "zconv:soci"
    out, served, logs = run_lazily(world, name, world["tmp"] / f"root-z-{flavor}",
                                   f"z-{flavor}", flavor=flavor, big=big["digest"])
    assert out == expected_output()  # and check_all_files hashed every file of the layer
    assert f"layer {big['digest']} mounted lazily" in logs
    print(f"zstd {flavor} {version}: {served} of {big['size']} bytes of the big layer served "
          f"at start ({served / big['size']:.2f})")
    assert 0 < served < big["size"] / 2, (served, big["size"])


def test_local_only_artifacts(world: dict) -> None:
    """No push: the index and mapping exist only in the store's root (an executor's case)."""
    root = world["tmp"] / "root-local"
    soci(root, "create", f"{world['host']}/local:v1")
    out, served, logs = run_lazily(world, "local:v1", root, "local")
    assert out == expected_output()
    assert f"layer {world['big']['digest']} mounted lazily" in logs
    assert 0 < served < world["big"]["size"] / 2


def test_image_without_soci_index_is_pulled_normally(world: dict) -> None:
    root = world["tmp"] / "root-none"
    ref = f"{world['host']}/app:v1"
    with StoreDaemon(root, world["tmp"] / "mnt-none") as store, Podman(
        world["tmp"] / "podman-none", additional_layer_store=str(store.mountpoint),
        insecure_registries=[world["host"]],
    ) as podman:
        # a fresh root, and the referrers tag points at an index this root has never seen:
        # discovery fetches it, so use an image with no index at all instead
        plain = f"{world['host']}/local:v1"
        podman.pull(plain)
        assert podman.run(plain, "cat", "/opt/data/motd") == FILES["opt/data/motd"]
        assert "no SOCI index found" in store.logs()
    del ref


def test_store_killed_while_a_container_runs(world: dict) -> None:
    """SIGKILL soci-store under a running container; a restarted store serves new ones
    from its disk cache, without fetching verified spans again."""
    import signal

    root = world["tmp"] / "root-kill"
    ref = f"{world['host']}/app:v1"
    soci(root, "create", ref)
    mnt = world["tmp"] / "mnt-kill"
    with StoreDaemon(root, mnt) as first, Podman(
        world["tmp"] / "podman-kill", additional_layer_store=str(mnt),
        insecure_registries=[world["host"]],
    ) as podman:
        podman.pull(ref)
        podman.command("run", "-d", "--name", "long", "--network=none", "--tls-verify=false",
                       ref, "sh", "-c", "cat /opt/data/blob1.bin > /dev/null && echo read-done; "
                       "sleep 300")
        # `run -d` returns once the container started, not once it has read blob1: wait for
        # the read to finish, or the kill below races it (and blob1's spans are fetched
        # again after the restart).
        deadline = time.monotonic() + 120
        while b"read-done" not in podman.command("logs", "long").stdout:
            assert time.monotonic() < deadline, first.logs()[-2000:]
            time.sleep(0.2)
        podman.command("exec", "long", "cat", "/opt/data/motd")
        first.stop(signal.SIGKILL)
        spans_before = set((root / "cache" / "spans").iterdir())
        before = _layer_bytes(world["proxy"], world["big"]["digest"])
        with StoreDaemon(root, mnt) as second:
            assert "stale mount" in second.logs()
            out = podman.run(ref, "cat", "/opt/data/motd", "/opt/data/blob1.bin")
            assert out == FILES["opt/data/motd"] + FILES["opt/data/blob1.bin"]
            # blob1 was read before the crash: its spans came from the disk cache
            assert _layer_bytes(world["proxy"], world["big"]["digest"]) == before
            assert set((root / "cache" / "spans").iterdir()) == spans_before
            podman.command("rm", "-f", "-t", "0", "long", check=False)


def test_layers_are_released_after_rmi_and_mount_again(world: dict) -> None:
    import urllib.request

    root = world["tmp"] / "root-release"
    ref = f"{world['host']}/app:v1"
    soci(root, "create", ref)
    grace = "[cache]\nrelease_grace_sec = 1\n"
    with StoreDaemon(root, world["tmp"] / "mnt-release", extra_config=grace) as store, Podman(
        world["tmp"] / "podman-release", additional_layer_store=str(store.mountpoint),
        insecure_registries=[world["host"]],
    ) as podman:

        def mounted() -> list[dict]:
            with urllib.request.urlopen(f"http://{store.metrics_address}/status") as resp:
                return json.loads(resp.read())["layers"]

        podman.pull(ref)
        assert podman.run(ref, "cat", "/opt/data/motd") == FILES["opt/data/motd"]
        assert [la["users"] for la in mounted()] == [1]
        podman.rmi(ref)
        deadline = time.monotonic() + 20
        while mounted():
            assert time.monotonic() < deadline, store.logs()[-2000:]
            time.sleep(0.2)
        assert "released after" in store.logs()
        podman.pull(ref)
        assert podman.run(ref, "cat", "/opt/data/motd") == FILES["opt/data/motd"]
        assert [la["users"] for la in mounted()] == [1]
