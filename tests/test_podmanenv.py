"""The isolated podman harness (tests/podmanenv.py) against a real registry.

* podman pulls a small image from a loopback ``docker-registry`` and runs it;
* with a plain directory as Additional Layer Store (laid out as containers/storage 1.43
  expects: ``<store>/<base64(ref)>/<compressed digest>/{diff/,info,blob}``) podman takes
  that layer from the store without ever fetching its blob, and the container sees the
  store's ``diff/`` tree.

The test image has two layers: ``/bin/cat`` with the shared libraries it needs, copied from
this host (no busybox needed), and a data layer the store provides.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import podmanenv
import registryd
from images import WrittenImage, WrittenLayer, files_layer, write_image


def _cat_layer_files() -> dict[str, tuple[bytes, int]]:
    """``/bin/cat`` and what ``ldd`` says it loads, at the paths the loader looks them up."""
    cat = shutil.which("cat") or "/bin/cat"
    files = {"bin/cat": (Path(cat).read_bytes(), 0o755)}
    out = subprocess.run(["ldd", cat], capture_output=True, timeout=30, check=True).stdout
    for line in out.decode().splitlines():
        words = line.split()
        paths = [w for w in words if w.startswith("/")]
        if paths:  # "libc.so.6 => /lib/.../libc.so.6 (0x..)" or "/lib64/ld-linux... (0x..)"
            files[paths[0].lstrip("/")] = (Path(paths[0]).read_bytes(), 0o755)
    return files


def write_test_image(path: Path, data_files: dict[str, bytes], *, tag: str = "v1") -> WrittenImage:
    """An OCI layout: layer 0 = cat + libraries, layer 1 = ``data_files`` (mode 0644)."""
    return write_image(path, tag, [files_layer(_cat_layer_files()), files_layer(data_files)])


def als_layer_dir(store: Path, image_ref: str, layer_digest: str) -> Path:
    """Where containers/storage 1.43 (store option ``:ref``) looks for a layer."""
    return store / base64.b64encode(image_ref.encode()).decode() / layer_digest


def populate_als_layer(
    store: Path, image_ref: str, layer: WrittenLayer, *, diff_size: int = 0,
) -> Path:
    """A plain-directory store entry: ``diff/`` (the extracted tar), ``info``, ``blob``."""
    digest, diff_id, _, blob, tar = layer
    assert blob is not None and tar is not None
    target = als_layer_dir(store, image_ref, digest)
    (target / "diff").mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        tf.extractall(target / "diff", filter="tar")
    info = {
        "compressed-diff-digest": digest,
        "compressed-size": len(blob),
        "diff-digest": diff_id,
        "diff-size": diff_size or len(tar),
        "compression": 2,
    }
    (target / "info").write_text(json.dumps(info))
    (target / "blob").write_bytes(blob)
    return target


@pytest.fixture(scope="module")
def podman_ok() -> None:
    reason = podmanenv.podman_available()
    if reason is not None:
        pytest.fail(f"podman cannot run here: {reason}")


class LoggingRegistry(registryd.Registry):
    """A :class:`registryd.Registry` that writes an access log we can read requests from."""

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        config["log"] = {"level": "info", "accesslog": {"disabled": False}}
        return config

    def _log_lines(self) -> list[str]:
        return (self.dir / "registry.log").read_text(errors="replace").splitlines()

    def requests_seen(self) -> int:
        """A mark for :meth:`blob_gets` (the log's current length)."""
        return len(self._log_lines())

    def blob_gets(self, *, since: int = 0) -> list[str]:
        """Digests of ``GET /v2/.../blobs/<digest>`` requests logged after ``since``."""
        found = []
        for line in self._log_lines()[since:]:
            match = re.search(r'"GET /v2/\S+/blobs/(sha256:[0-9a-f]{64}) HTTP', line)
            if match:
                found.append(match.group(1))
        return found


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggingRegistry]:
    with LoggingRegistry(workdir=tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def image(registry: LoggingRegistry, tmp_path_factory: pytest.TempPathFactory) -> WrittenImage:
    image = write_test_image(
        tmp_path_factory.mktemp("layout"),
        {"etc/hello.txt": b"hello from the registry\n", "data/big": os.urandom(4096) * 8},
    )
    registryd.push_layout(image.path, registry.host, "soci/podmanenv:v1", tag=image.tag)
    return image


@pytest.mark.parametrize("flavor", ["host", "podman5"])
def test_pull_and_run(
    podman_ok: None, registry: LoggingRegistry, image: WrittenImage, tmp_path: Path, flavor: str,
) -> None:
    """The host's podman, and podman 5 chrooted into ci/podman5-root.sh's root: pull, run,
    rmi; then nothing is left: no directories, no mounts on the host, no namespace."""
    ref = f"{registry.host}/soci/podmanenv:v1"
    chroot, workdir = None, tmp_path
    if flavor == "podman5":
        reason = podmanenv.podman5_available()
        assert reason is None, reason
        chroot, workdir = podmanenv.PODMAN5_ROOT, podmanenv.chroot_scratch()
    try:
        with podmanenv.Podman(workdir, insecure_registries=[registry.host], chroot=chroot) as pm:
            version = pm.command("version", "--format", "{{.Client.Version}}").stdout.decode()
            assert version.startswith("5." if chroot else "4."), version
            image_id = pm.pull(ref)
            assert len(image_id) == 64
            assert any(img["Id"] == image_id for img in pm.images())
            started = time.monotonic()
            assert pm.run(ref, "/bin/cat", "/etc/hello.txt") == b"hello from the registry\n"
            # A failing conmon exit command shows up as a 20 s wait after the container exits.
            assert time.monotonic() - started < 15
            pm.rmi(ref)
            assert pm.images() == []
            dirs = (pm.dir, pm.runroot)
            holder = pm.chroot.holder if pm.chroot else None
            assert (holder is not None) == (flavor == "podman5")
        for d in dirs:
            assert not d.exists()
        assert podmanenv.mounts_under(*dirs) == []
        if holder is not None:  # the namespace's holder is gone, and the root is unmounted
            assert holder.poll() is not None
            assert podmanenv.mounts_under(podmanenv.PODMAN5_ROOT) == []
    finally:
        if chroot is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def test_additional_layer_store_supplies_layer(
    podman_ok: None, registry: LoggingRegistry, tmp_path: Path,
) -> None:
    image = write_test_image(
        tmp_path / "layout", {"etc/hello.txt": b"hello from the registry\n", "data/x": b"x" * 999},
    )
    registryd.push_layout(image.path, registry.host, "soci/als:v1", tag=image.tag)
    ref = f"{registry.host}/soci/als:v1"
    digest = image.data_layer.digest
    store = tmp_path / "store"
    layer_dir = populate_als_layer(store, ref, image.data_layer)
    # The store's tree differs from the registry's blob: a run proves where files come from.
    (layer_dir / "diff" / "etc" / "hello.txt").write_bytes(b"hello from the store\n")
    with podmanenv.Podman(
        tmp_path / "podman", additional_layer_store=store, insecure_registries=[registry.host],
    ) as pm:
        mark = registry.requests_seen()
        proc = pm.command("pull", "--tls-verify=false", ref, log_level="debug")
        log = proc.stderr.decode(errors="replace")
        assert f"Skipping blob {digest} (already present)" in log, log[-3000:]
        fetched = registry.blob_gets(since=mark)
        assert image.layers[0].digest in fetched  # the other layer came from the registry
        assert digest not in fetched, fetched
        assert pm.run(ref, "/bin/cat", "/etc/hello.txt") == b"hello from the store\n"
        assert pm.run(ref, "/bin/cat", "/data/x") == b"x" * 999
        assert digest not in registry.blob_gets(since=mark)
        # containers/storage made a layer whose diff is a symlink into the store.
        layers = json.loads((pm.graphroot / "overlay-layers" / "layers.json").read_text())
        [layer] = [x for x in layers if x.get("compressed-diff-digest") == digest]
        assert layer["diff-digest"] == image.data_layer.diff_id
        layer_home = pm.graphroot / "overlay" / layer["id"]
        assert os.readlink(layer_home / "diff") == str(layer_dir / "diff")
        assert (layer_home / "additionallayer").read_text() == str(layer_dir)
        pm.rmi(ref)
    # podman's "use" file came and went; the (plain, non-GC-aware) layer dir stays.
    assert sorted(p.name for p in layer_dir.iterdir()) == ["blob", "diff", "info"]


def test_chroot_mounts_stay_in_their_namespace_and_die_with_the_test(tmp_path: Path) -> None:
    """A mount made in the chroot is never seen on the host, and SIGKILLing the test process
    that made the namespace takes the namespace (and the mount) with it."""
    reason = podmanenv.podman5_available()
    assert reason is None, reason
    root = podmanenv.PODMAN5_ROOT
    script = (
        "import subprocess, sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import podmanenv\n"
        "c = podmanenv.Chroot(podmanenv.PODMAN5_ROOT)\n"
        "argv = c.argv(['sh', '-c', 'mount -t tmpfs soci-probe /mnt && grep -c soci-probe "
        "/proc/self/mounts'])\n"
        "print(c.holder.pid, subprocess.run(argv, capture_output=True).stdout.decode().strip(),"
        " flush=True)\n"
        "time.sleep(600)\n"
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE) as child:
        try:
            assert child.stdout is not None
            holder, seen_inside = child.stdout.readline().split()
            assert seen_inside == b"1"
            assert podmanenv.mounts_under(root) == []  # the host never sees it
            assert Path(f"/proc/{int(holder)}").exists()
        finally:
            child.kill()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{int(holder)}").exists():  # PR_SET_PDEATHSIG: the holder follows
        assert time.monotonic() < deadline, "the namespace holder outlived its test process"
        time.sleep(0.05)
    assert podmanenv.mounts_under(root) == []
