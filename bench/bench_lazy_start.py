"""Lazy start: time until a container's workload finishes, soci-store against plain podman.

The image is a busybox base plus the >= 300 MB /usr/lib layer (make_layer.py).
The workload reads a few files of it and hashes them. The registry sits behind
a bandwidth-limited proxy (default 25 MB/s) so loopback does not hide the
download. Baseline: ``podman pull`` + ``podman run`` with an empty store.
soci: the SOCI index was created and pushed beforehand (as a CI pipeline
would); soci-store starts with an empty root, discovers the index through the
referrers tag, and podman pulls + runs with it as an Additional Layer Store.
Each variant runs --repeat times from cold; medians are compared.

``--prefetch`` adds a third variant, run in the same rounds: the image under another name
whose SOCI index carries prefetch artifacts for the workload's files (``soci create
--prefetch-file``), served by a soci-store with ``[prefetch] enable = true``.

``--compression zstd`` makes the big layer a zstd layer of many frames (pzstd's frames, its
skippable headers dropped so that skopeo keeps it as zstd) from the same tar.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from bench_create import diff_id  # noqa: E402
from benchdata import data_dir, ensure_layer  # noqa: E402
from images import GzipLayerFile, busybox_layer, write_image  # noqa: E402
from podmanenv import Podman  # noqa: E402
from registryd import Registry  # noqa: E402
from storeenv import StoreDaemon  # noqa: E402
from throttle import ThrottledProxy  # noqa: E402


def write_layout(root: Path, big_layer: Path, compression: str = "gzip") -> Path:
    """An OCI layout tagged v1: busybox, then the benchmark layer (copied in as is, or
    recompressed as many zstd frames); the big layer's blob."""
    if compression == "gzip":
        write_image(root, "v1", [busybox_layer(),
                                 GzipLayerFile(big_layer, diff_id(str(big_layer)))])
        return big_layer
    blob = root.parent / "layer.tar.zst"
    tar = subprocess.run(["pigz", "-dc", str(big_layer)], check=True,
                         capture_output=True).stdout
    framed = subprocess.run(["pzstd", "-q", "-3", "-p", "2", "-c"], input=tar, check=True,
                            capture_output=True).stdout
    blob.write_bytes(strip_skippable(framed))
    write_image(root, "v1", [busybox_layer(), GzipLayerFile(
        blob, diff_id(str(big_layer)), "application/vnd.oci.image.layer.v1.tar+zstd")])
    return blob


def strip_skippable(data: bytes) -> bytes:
    """pzstd's output without its skippable frames (each says how long the next frame is)."""
    out, at = [], 0
    while at < len(data):
        magic, size = struct.unpack_from("<II", data, at)
        if magic & 0xFFFFFFF0 != 0x184D2A50:
            raise ValueError("expected pzstd's skippable frame before each frame")
        (frame,) = struct.unpack_from("<I", data, at + 8)
        start = at + 8 + size
        out.append(data[start:start + frame])
        at = start + frame
    return b"".join(out)


def pull_and_run(podman: Podman, ref: str, command: list[str]) -> tuple[float, bytes]:
    """Seconds until the workload has printed its result.

    podman's own exit, which can lag by conmon's 20 s timeout on this host, is waited
    for but not counted.
    """
    start = time.perf_counter()
    podman.pull(ref)
    proc = subprocess.Popen(["podman", "run", "--rm", "--network=none", "--tls-verify=false",
                             ref, *command], env=podman.env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - start
    proc.stdout.close()
    proc.wait(timeout=120)
    return elapsed, line


def fetched_bytes(address: str) -> int:
    """The layer bytes the store fetched from the registry (its own counter: the disk cache
    holds inflated spans, so its size says nothing about the network)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("soci_layer_fetched_bytes_total{")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--layer", default=str(HERE / ".data" / "usrlib.tar.gz"))
    parser.add_argument("--bandwidth", type=float, default=25.0, help="MB/s")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--compression", choices=("gzip", "zstd"), default="gzip")
    parser.add_argument("--prefetch", action="store_true",
                        help="also time an index whose prefetch artifacts name the workload")
    args = parser.parse_args()
    layer = Path(args.layer)
    layer = ensure_layer(layer)
    with tarfile.open(layer) as tf:
        members = [m for m in tf.getmembers() if m.isreg() and 300_000 < m.size < 3_000_000]
    # The workload: a handful of files spread over the layer, a few MB in all.
    step = len(members) // 5
    workload = [members[i * step + step // 2] for i in range(5)]
    paths = " ".join("/" + m.name for m in workload)
    command = ["sh", "-c", f"cat {paths} | sha256sum"]
    soci = str(Path(sys.executable).parent / "soci")

    with tempfile.TemporaryDirectory(dir=data_dir()) as scratch_dir, Registry() as reg, \
            ThrottledProxy(reg.host, args.bandwidth * 1e6) as slow:
        scratch = Path(scratch_dir)
        blob = write_layout(scratch / "layout", layer, args.compression)
        subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet",
                        "--dest-tls-verify=false", f"oci:{scratch / 'layout'}:v1",
                        f"docker://{reg.host}/big:v1"], check=True)
        build = scratch / "build"
        names = ["big"] + (["big-prefetch"] if args.prefetch else [])
        wanted = [a for m in workload for a in ("--prefetch-file", "/" + m.name)]
        for name in names:
            if name != "big":
                subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet",
                                "--dest-tls-verify=false", f"oci:{scratch / 'layout'}:v1",
                                f"docker://{reg.host}/{name}:v1"], check=True)
            extra = wanted if name != "big" else []
            for step_args in (["create", "-q", *extra], ["push", "-q"]):
                subprocess.run([soci, "--plain-http", "--root", str(build), *step_args,
                                f"{reg.host}/{name}:v1"], check=True, stdout=subprocess.DEVNULL)
        ref = f"{slow.host}/big:v1"
        expected = None
        plain, lazy, early = [], [], []
        early_fetched = 0
        for i in range(args.repeat):
            with Podman(scratch / f"plain{i}", insecure_registries=[slow.host],
                        timeout=900) as podman:
                elapsed, out = pull_and_run(podman, ref, command)
                plain.append(elapsed)
            expected = expected or out
            assert out == expected
            with StoreDaemon(scratch / f"root{i}", scratch / f"mnt{i}") as store, Podman(
                scratch / f"lazy{i}", additional_layer_store=str(store.mountpoint),
                insecure_registries=[slow.host], timeout=900,
            ) as podman:
                elapsed, out = pull_and_run(podman, ref, command)
                lazy.append(elapsed)
                assert "mounted lazily" in store.logs()
                fetched = fetched_bytes(store.metrics_address)
            assert out == expected
            if not args.prefetch:
                continue
            with StoreDaemon(scratch / f"proot{i}", scratch / f"pmnt{i}",
                             extra_config="[prefetch]\nenable = true\n") as store, Podman(
                scratch / f"prefetch{i}", additional_layer_store=str(store.mountpoint),
                insecure_registries=[slow.host], timeout=900,
            ) as podman:
                elapsed, out = pull_and_run(podman, f"{slow.host}/big-prefetch:v1", command)
                early.append(elapsed)
                assert "prefetched" in store.logs()
                early_fetched = fetched_bytes(store.metrics_address)
            assert out == expected
        size = blob.stat().st_size
        total = sum(m.size for m in workload)
        print(f"## Lazy start: pull + run reading {len(workload)} files ({total / 1e6:.1f} MB) of "
              f"a {size / 1e6:.0f} MB layer, registry at {args.bandwidth:.0f} MB/s, "
              f"median of {args.repeat}")
        p, s = statistics.median(plain), statistics.median(lazy)
        print(f"podman pull + run (plain)                {p:7.2f} s")
        print(f"podman pull + run with soci-store        {s:7.2f} s")
        print(f"  ratio soci / plain                     {s / p:7.2f}x")
        print(f"layer bytes fetched by soci-store        {fetched / 1e6:7.1f} MB of "
              f"{size / 1e6:.0f} MB ({fetched / size:.1%})")
        if early:
            e = statistics.median(early)
            print(f"  with prefetch of the workload's files  {e:7.2f} s")
            rounds = ", ".join(f"{a / b:.2f}" for a, b in zip(early, lazy, strict=True))
            print(f"  ratio prefetch / soci-store            {e / s:7.2f}x  (rounds: {rounds})")
            print(f"  bytes fetched with prefetch            {early_fetched / 1e6:7.1f} MB")


if __name__ == "__main__":
    main()
