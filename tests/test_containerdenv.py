"""The private containerd harness (tests/containerdenv.py), against both generations.

* containerd starts with the soci proxy snapshotter registered (no snapshotter serves the
  socket yet: containerd connects lazily), imports an OCI archive written here (static
  busybox plus a data file) and runs it with runc; a detached container left running is
  killed, and everything unmounted and removed, by ``stop()``;
* ``ctr images pull --plain-http`` from a loopback ``docker-registry`` with the default
  overlayfs snapshotter, then a kubelet-style CRI ``PullImage`` (snapshotter overlayfs,
  hosts from the certs.d directory) of the same image: its snapshots carry the
  ``containerd.io/snapshot/cri.*`` labels a remote snapshotter relies on; its status, and
  its removal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import registryd
from containerdenv import CRI_NAMESPACE, GENERATIONS, Containerd, containerd_available
from images import WrittenImage, busybox_layer, files_layer, write_image

HELLO = b"hello from a containerd test image\n"


@pytest.fixture(params=GENERATIONS, ids=[f"containerd-{g}" for g in GENERATIONS])
def generation(request: pytest.FixtureRequest) -> str:
    reason = containerd_available(request.param)
    assert reason is None, reason
    return str(request.param)


@pytest.fixture(scope="module")
def test_image(tmp_path_factory: pytest.TempPathFactory) -> WrittenImage:
    """busybox (a shell, cat, sha256sum) and ``/etc/hello.txt``, tagged ``v1``."""
    layout = tmp_path_factory.mktemp("ctrd-image") / "layout"
    return write_image(layout, "v1", [busybox_layer(), files_layer({"etc/hello.txt": HELLO})])


@pytest.fixture(scope="module")
def registry(test_image: WrittenImage) -> Iterator[registryd.Registry]:
    with registryd.Registry() as reg:
        registryd.push_layout(test_image.path, reg.host, "ctrd/busybox:v1", tag="v1")
        yield reg


def test_import_run_and_cleanup(generation: str, test_image: WrittenImage,
                                tmp_path: Path) -> None:
    soci_socket = tmp_path / "soci.sock"
    ctrd = Containerd(generation, soci_socket=soci_socket)
    with ctrd:
        config = ctrd.config_path.read_text()
        assert f'address = "{soci_socket}"' in config
        plugins = ctrd.ctr("plugins", "ls").stdout.splitlines()
        assert any(line.split()[:2] == ["io.containerd.snapshotter.v1", "soci"]
                   and line.split()[-1] == "ok" for line in plugins), plugins

        name = ctrd.import_layout(test_image.path, "localhost/soci-test/busybox",
                                  snapshotter="overlayfs")
        assert name == "localhost/soci-test/busybox:v1"
        out = ctrd.run(name, "sh", "-c", "cat /etc/hello.txt; echo gen=$0", generation,
                       snapshotter="overlayfs").stdout
        assert out == HELLO.decode() + f"gen={generation}\n"

        # Left running on purpose: stop() must kill it, its shim and its rootfs mount.
        ctrd.run(name, "sleep", "600", snapshotter="overlayfs", detach=True,
                 container_id="left-running")
        tasks = ctrd.ctr("tasks", "ls").stdout
        assert "left-running" in tasks and "RUNNING" in tasks
    assert not ctrd.dir.exists()
    assert not _processes_mentioning(str(ctrd.dir))


def test_registry_pull_ctr_and_cri(generation: str, test_image: WrittenImage,
                                   registry: registryd.Registry) -> None:
    ref = f"{registry.host}/ctrd/busybox:v1"
    with Containerd(generation, registry_hosts=[registry.host]) as ctrd:
        assert ctrd.snapshotter == "overlayfs"
        ctrd.ctr("images", "pull", "--plain-http", ref)
        assert ctrd.run(ref, "cat", "/etc/hello.txt").stdout == HELLO.decode()

        image_id = ctrd.cri_pull(ref)
        assert image_id == test_image.config_digest
        status = ctrd.cri_status(ref)
        assert status is not None and ref in status.repo_tags
        assert any(d.endswith(test_image.manifest_digest) for d in status.repo_digests)
        assert ref in ctrd.ctr("images", "ls", "-q", namespace=CRI_NAMESPACE).stdout.split()
        # Unpacked by CRI's snapshotter: one committed snapshot per layer, each labelled with
        # what a remote snapshotter needs (disable_snapshot_annotations = false works).
        snapshots = ctrd.ctr("snapshots", "--snapshotter", "overlayfs", "ls",
                             namespace=CRI_NAMESPACE).stdout.splitlines()[1:]
        assert len(snapshots) == len(test_image.layers)
        assert all(line.split()[-1] == "Committed" for line in snapshots)
        labels = [json.loads(ctrd.ctr("snapshots", "--snapshotter", "overlayfs", "info",
                                      line.split()[0], namespace=CRI_NAMESPACE).stdout)["Labels"]
                  for line in snapshots]
        assert sorted(la["containerd.io/snapshot/cri.layer-digest"] for la in labels) == sorted(
            layer.digest for layer in test_image.layers)
        for la in labels:
            assert la["containerd.io/snapshot/cri.image-ref"] == ref
            assert la["containerd.io/snapshot/cri.manifest-digest"] == test_image.manifest_digest
        ids = [image.id for image in ctrd.cri_list()]
        assert image_id in ids

        ctrd.cri_remove(ref)
        assert ctrd.cri_status(ref) is None
        ctrd.cri_remove(ref)  # idempotent


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes containing ``text`` (leaked daemons or shims)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(json.dumps(cmdline))
    return found
