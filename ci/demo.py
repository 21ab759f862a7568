"""The main job, end to end: a lazily started podman container on this machine.

Starts a docker-registry on loopback, builds an image (busybox + a ~100 MB layer
of this machine's /usr/lib), pushes it with skopeo, creates and pushes its SOCI
index with ``soci``, mounts ``soci-store``, runs a podman container that reads a
few files, and prints how many bytes of the image were fetched; then the same image
through containerd with ``soci-snapshotter-grpc``, ``soci pull`` and ``ctr run``.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent / "bench")]

from bench_lazy_start import fetched_bytes, write_layout  # noqa: E402
from containerdenv import Containerd  # noqa: E402
from podmanenv import Podman  # noqa: E402
from registryd import Registry  # noqa: E402
from snapshotterenv import SnapshotterDaemon  # noqa: E402
from storeenv import StoreDaemon  # noqa: E402


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def main() -> None:
    bin_dir = Path(sys.executable).parent
    soci = str(bin_dir / "soci")
    with tempfile.TemporaryDirectory(prefix="soci-demo-") as tmp_dir, Registry() as reg:
        tmp = Path(tmp_dir)
        step(f"a docker-registry is serving on {reg.host}")
        layer = tmp / "usrlib.tar.gz"
        subprocess.run([sys.executable, str(HERE.parent / "bench" / "make_layer.py"), str(layer),
                        "--tar-bytes", str(300 << 20)], check=True)
        write_layout(tmp / "layout", layer)
        ref = f"{reg.host}/demo:v1"
        subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet",
                        "--dest-tls-verify=false", f"oci:{tmp / 'layout'}:v1", f"docker://{ref}"],
                       check=True)
        step(f"pushed {ref} (busybox + a {layer.stat().st_size / 1e6:.0f} MB layer)")

        step("soci create + soci push: zTOCs built while the layers stream, index published")
        build = tmp / "build-root"
        for args in (["create", ref], ["push", "-q", ref]):
            subprocess.run([soci, "--plain-http", "--root", str(build), *args], check=True)

        with tarfile.open(layer) as tf:
            files = [m for m in tf.getmembers() if m.isreg() and 100_000 < m.size < 2_000_000][:4]
        paths = " ".join("/" + m.name for m in files)
        step(f"soci-store mounted; podman runs: sh -c 'cat {paths} | sha256sum'")
        with StoreDaemon(tmp / "store-root", tmp / "store") as store, Podman(
            tmp / "podman", additional_layer_store=str(store.mountpoint),
            insecure_registries=[reg.host], timeout=600,
        ) as podman:
            start = time.perf_counter()
            podman.pull(ref)
            out = podman.run(ref, "sh", "-c", f"cat {paths} | sha256sum")
            took = time.perf_counter() - start
            print(out.decode().strip())
            mounted = [line for line in store.logs().splitlines() if "mounted lazily" in line]
            print("\n".join(line.split("msg=", 1)[-1] for line in mounted))
            fetched = fetched_bytes(store.metrics_address)  # from the registry, by soci-store
            manifest = json.loads(subprocess.run(
                ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                capture_output=True, check=True).stdout)
            total = sum(layer["size"] for layer in manifest["layers"])
            encoded = base64.b64encode(ref.encode()).decode()
            print(f"\nlayer store path used by podman: {store.mountpoint}/{encoded}/<digest>/diff")
        step(f"podman done in {took:.1f} s: fetched {fetched / 1e6:.1f} MB of the image's "
             f"{total / 1e6:.0f} MB ({fetched / total:.1%}) to run the container")

        step("containerd: soci-snapshotter-grpc as its proxy snapshotter; soci pull + ctr run")
        with SnapshotterDaemon(tmp / "snapshotter-root") as sn, Containerd(
                "1.6", soci_socket=sn.address, registry_hosts=[reg.host]) as ctrd:
            start = time.perf_counter()
            subprocess.run([soci, "--plain-http", "pull", "--address", ctrd.address,
                            "--namespace", ctrd.namespace, ref], check=True)
            out = ctrd.run(ref, "sh", "-c", f"cat {paths} | sha256sum", snapshotter="soci",
                           timeout=600).stdout
            took = time.perf_counter() - start
            print(out.strip())
            fetched = fetched_bytes(sn.metrics_address)
        step(f"containerd done in {took:.1f} s: fetched {fetched / 1e6:.1f} MB of the lazy "
             f"layer to run the container")


if __name__ == "__main__":
    main()
