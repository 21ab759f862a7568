"""Test images written as OCI layouts with plain Python (no internet, reproducible)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
from pathlib import Path

from layers import Node, tar_with_tarfile

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _blob(root: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = root / "blobs" / "sha256" / digest[7:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def files_layer(files: dict[str, bytes]) -> bytes:
    """A tar (uncompressed) of regular files, directories implied."""
    nodes: list[Node] = []
    dirs: set[str] = set()
    for name in sorted(files):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                nodes.append(Node(d, "dir", mode=0o755))
        nodes.append(Node(name, data=files[name]))
    return tar_with_tarfile(nodes, tarfile.PAX_FORMAT)


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


def write_image(root: str | os.PathLike[str], tag: str, layers: list[bytes], *,
                os_name: str = "linux", arch: str = "amd64", variant: str = "",
                compress: str = "gzip", add_to_index: bool = True) -> tuple[str, int]:
    """Write one platform's image into an OCI layout; return (manifest digest, size)."""
    root = Path(root)
    layer_descs, diff_ids = [], []
    for tar in layers:
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        if compress == "gzip":
            data, mt = gzip.compress(tar, 6, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
        else:
            data, mt = tar, "application/vnd.oci.image.layer.v1.tar"
        layer_descs.append({"mediaType": mt, "digest": _blob(root, data), "size": len(data)})
    config = {"architecture": arch, "os": os_name,
              "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "config": {"Cmd": ["/bin/sh"]}}
    if variant:
        config["variant"] = variant
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _blob(root, config_bytes), "size": len(config_bytes)},
        "layers": layer_descs,
    }
    data = json.dumps(manifest).encode()
    digest = _blob(root, data)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    if add_to_index:
        _tag(root, {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(data)}, tag)
    return digest, len(data)


def write_multiarch(root: str | os.PathLike[str], tag: str,
                    per_platform: dict[str, list[bytes]]) -> str:
    """An image index over several platforms ("os/arch[/variant]" -> layers)."""
    root = Path(root)
    entries = []
    for platform, layers in per_platform.items():
        os_name, arch, *variant = platform.split("/")
        digest, size = write_image(root, tag, layers, os_name=os_name, arch=arch,
                                   variant=variant[0] if variant else "", add_to_index=False)
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
