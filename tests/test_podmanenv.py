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
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import podmanenv
import registryd

_MTIME = 1_700_000_000
OCI_MANIFEST = registryd.OCI_MANIFEST


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def _tar(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A reproducible tar of ``path -> (content, mode)`` with parent directories."""
    dirs: set[str] = set()
    for name in files:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(dirs | set(files)):
            info = tarfile.TarInfo(name)
            info.mtime = _MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if name in files:
                data, info.mode = files[name]
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tf.addfile(info)
    return buf.getvalue()


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


@dataclass
class BuiltImage:
    layout: Path
    tag: str
    layers: list[tuple[str, str, bytes, bytes]]  # (digest, diff_id, gzip blob, tar)
    manifest_digest: str

    @property
    def data_layer(self) -> tuple[str, str, bytes, bytes]:
        return self.layers[-1]


def write_test_image(path: Path, data_files: dict[str, bytes], *, tag: str = "v1") -> BuiltImage:
    """An OCI layout: layer 0 = cat + libraries, layer 1 = ``data_files`` (mode 0644)."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = _sha256(data)
        (blobs / digest.split(":", 1)[1]).write_bytes(data)
        return digest

    layers = []
    tars = [_tar(_cat_layer_files()), _tar({k: (v, 0o644) for k, v in data_files.items()})]
    for tar in tars:
        blob = _gzip(tar)
        layers.append((put(blob), _sha256(tar), blob, tar))
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id, _, _ in layers]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": registryd.OCI_CONFIG, "digest": put(config), "size": len(config)},
        "layers": [
            {"mediaType": registryd.OCI_LAYER_GZIP, "digest": d, "size": len(b)}
            for d, _, b, _ in layers
        ],
    }).encode()
    manifest_digest = put(manifest)
    index = {"schemaVersion": 2, "mediaType": registryd.OCI_INDEX, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }]}
    (path / "index.json").write_text(json.dumps(index))
    (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return BuiltImage(path, tag, layers, manifest_digest)


def als_layer_dir(store: Path, image_ref: str, layer_digest: str) -> Path:
    """Where containers/storage 1.43 (store option ``:ref``) looks for a layer."""
    return store / base64.b64encode(image_ref.encode()).decode() / layer_digest


def populate_als_layer(
    store: Path, image_ref: str, layer: tuple[str, str, bytes, bytes], *, diff_size: int = 0,
) -> Path:
    """A plain-directory store entry: ``diff/`` (the extracted tar), ``info``, ``blob``."""
    digest, diff_id, blob, tar = layer
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
def image(registry: LoggingRegistry, tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    image = write_test_image(
        tmp_path_factory.mktemp("layout"),
        {"etc/hello.txt": b"hello from the registry\n", "data/big": os.urandom(4096) * 8},
    )
    registryd.push_layout(image.layout, registry.host, "soci/podmanenv:v1", tag=image.tag)
    return image


def test_pull_and_run(
    podman_ok: None, registry: LoggingRegistry, image: BuiltImage, tmp_path: Path,
) -> None:
    ref = f"{registry.host}/soci/podmanenv:v1"
    with podmanenv.Podman(tmp_path, insecure_registries=[registry.host]) as pm:
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
    for d in dirs:
        assert not d.exists()
    assert podmanenv.mounts_under(*dirs) == []


def test_additional_layer_store_supplies_layer(
    podman_ok: None, registry: LoggingRegistry, tmp_path: Path,
) -> None:
    image = write_test_image(
        tmp_path / "layout", {"etc/hello.txt": b"hello from the registry\n", "data/x": b"x" * 999},
    )
    registryd.push_layout(image.layout, registry.host, "soci/als:v1", tag=image.tag)
    ref = f"{registry.host}/soci/als:v1"
    digest = image.data_layer[0]
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
        assert image.layers[0][0] in fetched  # the other layer came from the registry
        assert digest not in fetched, fetched
        assert pm.run(ref, "/bin/cat", "/etc/hello.txt") == b"hello from the store\n"
        assert pm.run(ref, "/bin/cat", "/data/x") == b"x" * 999
        assert digest not in registry.blob_gets(since=mark)
        # containers/storage made a layer whose diff is a symlink into the store.
        layers = json.loads((pm.graphroot / "overlay-layers" / "layers.json").read_text())
        [layer] = [x for x in layers if x.get("compressed-diff-digest") == digest]
        assert layer["diff-digest"] == image.data_layer[1]
        layer_home = pm.graphroot / "overlay" / layer["id"]
        assert os.readlink(layer_home / "diff") == str(layer_dir / "diff")
        assert (layer_home / "additionallayer").read_text() == str(layer_dir)
        pm.rmi(ref)
    # podman's "use" file came and went; the (plain, non-GC-aware) layer dir stays.
    assert sorted(p.name for p in layer_dir.iterdir()) == ["blob", "diff", "info"]
