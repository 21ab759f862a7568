"""soci-store on a bad day and at scale.

1. Lazy start under faults: a fresh soci-store reads 20 files (~20 MB) spread over the
   382 MB /usr/lib layer, through a proxy that drops 10% of the layer's range responses
   mid-body, against the same run without faults (target <= 1.5x). Median of --repeat.
2. Scale: 20 images x 3 layers mounted, every file of every layer read by 16 concurrent
   readers; the daemon's peak RSS (VmHWM) and open file descriptors (target < 300 MB).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from bench_create import write_layout  # noqa: E402
from benchdata import data_dir, ensure_layer  # noqa: E402
from images import files_layer, write_image  # noqa: E402
from registryd import FaultProxy, Registry, push_layout  # noqa: E402
from storeenv import StoreDaemon  # noqa: E402


def proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def lazy_reads(scratch: Path, root: Path, ref: str, digest: str, paths: list[str],
               tag: str) -> float:
    fresh = scratch / f"root-{tag}"
    fresh.mkdir()
    subprocess.run(["cp", "-r", str(root / "content"), str(root / "indexes"),
                    str(root / "artifacts.sqlite3"), str(fresh)], check=True)
    with StoreDaemon(fresh, scratch / f"mnt-{tag}") as daemon:
        diff = daemon.layer_dir(ref, digest) / "diff"
        start = time.perf_counter()
        for p in paths:
            (diff / p).read_bytes()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--layer", default=str(HERE / ".data" / "usrlib.tar.gz"))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    layer = ensure_layer(args.layer)
    soci = str(Path(sys.executable).parent / "soci")
    with tarfile.open(layer) as tf:
        members = [m for m in tf.getmembers() if m.isreg() and 300_000 < m.size < 3_000_000]
    step = len(members) // 20
    paths = [members[i * step + step // 2].name for i in range(20)]

    with tempfile.TemporaryDirectory(dir=data_dir()) as scratch_dir, Registry() as reg, \
            FaultProxy(reg.host) as proxy:
        scratch = Path(scratch_dir)
        write_layout(str(scratch / "layout"), str(layer))
        subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet",
                        "--dest-tls-verify=false", f"oci:{scratch / 'layout'}:v1",
                        f"docker://{reg.host}/big:v1"], check=True)
        ref = f"{proxy.host}/big:v1"
        root = scratch / "root"
        subprocess.run([soci, "--plain-http", "--root", str(root), "create", "-q", ref],
                       check=True, stdout=subprocess.DEVNULL)
        digest = "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest()
        clean, faulty = [], []
        for i in range(args.repeat):
            clean.append(lazy_reads(scratch, root, ref, digest, paths, f"clean{i}"))
            proxy.drop_rate(0.10, match=digest)
            faulty.append(lazy_reads(scratch, root, ref, digest, paths, f"faulty{i}"))
            proxy.clear()
        total = sum(m.size for m in members if m.name in paths)
        c, f = statistics.median(clean), statistics.median(faulty)
        print(f"## Lazy start under faults: a fresh soci-store reads {len(paths)} files "
              f"({total / 1e6:.1f} "
              f"MB) of the {layer.stat().st_size / 1e6:.0f} MB layer, median of {args.repeat}")
        print(f"fault-free                             {c:7.2f} s")
        print(f"10% of range responses dropped         {f:7.2f} s "
              f"({proxy.counters.injected.get('drop', 0)} drops injected)")
        print(f"  ratio faulty / fault-free            {f / c:7.2f}x")

        # 2. Twenty images of three layers each.
        images = []
        for n in range(20):
            layers = [files_layer({f"img{n}/l{k}/dir{d}/file{j}.txt":
                                   (f"image {n} layer {k} file {d}/{j}\n" * 40).encode()
                                   for d in range(10) for j in range(30)}) for k in range(3)]
            write_image(scratch / f"img{n}", "v1", layers)
            push_layout(scratch / f"img{n}", reg.host, f"many{n}:v1", tag="v1")
            images.append(f"{reg.host}/many{n}:v1")
        many = scratch / "many-root"
        for ref_n in images:
            subprocess.run([soci, "--plain-http", "--root", str(many), "create", "-q",
                            "--min-layer-size", "0", "--span-size", "65536", ref_n],
                           check=True, stdout=subprocess.DEVNULL)
        import json

        with StoreDaemon(many, scratch / "mnt-many") as daemon:
            assert daemon.proc is not None
            work: list[Path] = []
            for ref_n in images:
                manifest = json.loads(subprocess.run(
                    ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref_n}"],
                    capture_output=True, check=True).stdout)
                for layer_desc in manifest["layers"]:
                    diff = daemon.layer_dir(ref_n, layer_desc["digest"]) / "diff"
                    for dirpath, _, files in os.walk(diff):
                        work.extend(Path(dirpath) / f for f in files)
            start = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                total_bytes = sum(pool.map(lambda p: len(p.read_bytes()), work))
            took = time.perf_counter() - start
            peak = proc_status(daemon.proc.pid, "VmHWM")
            fds = len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))
        print(f"\n## Scale: {len(images)} images x 3 layers, {len(work)} files "
              f"({total_bytes / 1e6:.0f} MB) read by 16 threads in {took:.1f} s")
        print(f"daemon peak RSS (VmHWM)                {peak / 1e6:7.1f} MB (target < 300 MB)")
        print(f"daemon open file descriptors           {fds:7d}")


if __name__ == "__main__":
    main()
