"""Test images written as OCI layouts with plain Python (no internet, reproducible)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from layers import Node, tar_with_tarfile

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _blob(root: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = root / "blobs" / "sha256" / digest[7:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def files_layer(files: dict[str, bytes | tuple[bytes, int]]) -> bytes:
    """A tar (uncompressed) of regular files (data, or (data, mode)), directories implied."""
    nodes: list[Node] = []
    dirs: set[str] = set()
    for name in sorted(files):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                nodes.append(Node(d, "dir", mode=0o755))
        data, mode = files[name] if isinstance(files[name], tuple) else (files[name], 0o644)
        nodes.append(Node(name, data=data, mode=mode))
    return tar_with_tarfile(nodes, tarfile.PAX_FORMAT)


@dataclass(frozen=True)
class GzipLayerFile:
    """A layer that already exists as a compressed blob on disk (copied in, never loaded
    whole); gzip unless ``media_type`` says otherwise."""

    path: Path
    diff_id: str
    media_type: str = "application/vnd.oci.image.layer.v1.tar+gzip"


class WrittenLayer(NamedTuple):
    digest: str
    diff_id: str
    size: int
    blob: bytes | None  # None for a GzipLayerFile
    tar: bytes | None


@dataclass(frozen=True)
class WrittenImage:
    """What :func:`write_image` wrote, for tests that check what they pull."""

    path: Path
    tag: str
    manifest: bytes
    manifest_digest: str
    config: bytes
    config_digest: str
    layers: list[WrittenLayer]

    @property
    def data_layer(self) -> WrittenLayer:
        return self.layers[-1]

    def blob(self, digest: str) -> bytes:
        return (self.path / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


BUSYBOX = "/bin/busybox"
BUSYBOX_TOOLS = ("sh", "cat", "head", "od", "sha256sum", "wc", "ls", "sleep")


def busybox_layer() -> bytes:
    """A base layer with the host's static busybox as /bin/sh, cat, head, od, sha256sum..."""
    nodes = [Node("bin", "dir", mode=0o755),
             Node("bin/busybox", data=Path(BUSYBOX).read_bytes(), mode=0o755)]
    nodes += [Node(f"bin/{tool}", "symlink", target="busybox") for tool in BUSYBOX_TOOLS]
    return tar_with_tarfile(nodes, tarfile.PAX_FORMAT)


def big_file(seed: str, size: int) -> bytes:
    """Deterministic content that gzip shrinks only by a quarter (so layers stay large)."""
    noise = hashlib.shake_256(seed.encode()).digest(size * 3 // 4)
    text = (f"{seed} line of text\n" * (size // 8)).encode()
    return (noise + text)[:size]


def zstd_frames(data: bytes, piece: int = 1 << 20) -> bytes:
    """A multi-frame zstd stream (one frame per ``piece`` bytes), as zstd:chunked and pzstd
    write them but starting with a data frame, so that skopeo sees zstd and keeps it."""
    return b"".join(subprocess.run(["zstd", "-q", "-c"], input=data[at:at + piece],
                                   check=True, capture_output=True).stdout
                    for at in range(0, len(data), piece))


def write_image(root: str | os.PathLike[str], tag: str,
                layers: list[bytes | GzipLayerFile], *, os_name: str = "linux",
                arch: str = "amd64", variant: str = "", compress: str = "gzip",
                add_to_index: bool = True) -> WrittenImage:
    """Write one platform's image into an OCI layout (layers given as tars, or gzip files)."""
    root = Path(root)
    written: list[WrittenLayer] = []
    layer_descs = []
    for layer in layers:
        mt = "application/vnd.oci.image.layer.v1.tar+gzip"
        if isinstance(layer, GzipLayerFile):
            with open(layer.path, "rb") as f:
                digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
            target = root / "blobs" / "sha256" / digest[7:]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(layer.path, target)
            item = WrittenLayer(digest, layer.diff_id, target.stat().st_size, None, None)
            mt = layer.media_type
        else:
            diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
            if compress == "gzip":
                data = gzip.compress(layer, 6, mtime=0)
            elif compress == "zstd":
                data = subprocess.run(["zstd", "-q", "-c"], input=layer, check=True,
                                      capture_output=True).stdout
                mt = "application/vnd.oci.image.layer.v1.tar+zstd"
            elif compress == "zstd-frames":
                data = zstd_frames(layer)
                mt = "application/vnd.oci.image.layer.v1.tar+zstd"
            else:
                data, mt = layer, "application/vnd.oci.image.layer.v1.tar"
            item = WrittenLayer(_blob(root, data), diff_id, len(data), data, layer)
        written.append(item)
        layer_descs.append({"mediaType": mt, "digest": item.digest, "size": item.size})
    config = {"architecture": arch, "os": os_name,
              "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in written]},
              "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]}}
    if variant:
        config["variant"] = variant
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest = _blob(root, config_bytes)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(config_bytes)},
        "layers": layer_descs,
    }).encode()
    digest = _blob(root, manifest)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    if add_to_index:
        _tag(root, {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest)}, tag)
    return WrittenImage(root, tag, manifest, digest, config_bytes, config_digest, written)


def write_multiarch(root: str | os.PathLike[str], tag: str,
                    per_platform: dict[str, list[bytes]]) -> str:
    """An image index over several platforms ("os/arch[/variant]" -> layers)."""
    root = Path(root)
    entries = []
    for platform, layers in per_platform.items():
        os_name, arch, *variant = platform.split("/")
        image = write_image(root, tag, layers, os_name=os_name, arch=arch,
                            variant=variant[0] if variant else "", add_to_index=False)
        digest, size = image.manifest_digest, len(image.manifest)
        p = {"architecture": arch, "os": os_name}
        if variant:
            p["variant"] = variant[0]
        entries.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size, "platform": p})
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    digest = _blob(root, index)
    _tag(root, {"mediaType": OCI_INDEX, "digest": digest, "size": len(index)}, tag)
    return digest


def _tag(root: Path, desc: dict, tag: str) -> None:
    path = root / "index.json"
    index = json.loads(path.read_text()) if path.exists() else {"schemaVersion": 2,
                                                               "manifests": []}
    desc = dict(desc, annotations={"org.opencontainers.image.ref.name": tag})
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name")
                          != tag] + [desc]
    path.write_text(json.dumps(index))
