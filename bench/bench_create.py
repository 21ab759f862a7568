"""``soci create`` against ``skopeo copy`` of the same image from a local registry.

The image has one >= 300 MB gzip layer (bench/.data/usrlib.tar.gz, made by
make_layer.py) plus a small one, pushed to a docker-registry on loopback.
skopeo copy to an OCI layout is the cost of just moving the bytes; soci
create streams each layer from the registry and builds its zTOC on the way,
so the target is at most 1.2x skopeo's time. Each run uses a fresh
destination / store; the median of --repeat runs is reported.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

from benchdata import data_dir, ensure_layer  # noqa: E402
from images import GzipLayerFile, files_layer, write_image  # noqa: E402
from registryd import Registry  # noqa: E402
from throttle import ThrottledProxy  # noqa: E402


def diff_id(path: str) -> str:
    h = hashlib.sha256()
    d = zlib.decompressobj(31)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(d.decompress(chunk))
    return "sha256:" + h.hexdigest()


def write_layout(root: str, layer_path: str) -> None:
    """An OCI layout tagged v1: a small layer plus the benchmark layer (copied in as is)."""
    big = GzipLayerFile(Path(layer_path), diff_id(layer_path))
    write_image(root, "v1", [files_layer({"etc/bench": b"bench\n"}), big])


def timed(command: list[str], repeat: int, scratch: str) -> float:
    times = []
    for i in range(repeat):
        work = os.path.join(scratch, f"run{i}")
        cmd = [c.replace("{work}", work) for c in command]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
        shutil.rmtree(work, ignore_errors=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--layer", default=os.path.join(HERE, ".data", "usrlib.tar.gz"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bandwidth", type=float, action="append", default=None,
                        help="also run through a proxy limited to this many MB/s (repeatable)")
    args = parser.parse_args()
    args.layer = str(ensure_layer(args.layer))
    soci = os.path.join(os.path.dirname(sys.executable), "soci")
    with tempfile.TemporaryDirectory(dir=data_dir()) as scratch, Registry() as reg:
        layout = os.path.join(scratch, "layout")
        write_layout(layout, args.layer)
        ref = f"{reg.host}/big:v1"
        subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet",
                        "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{ref}"],
                       check=True)
        size = os.path.getsize(args.layer)
        print(f"## soci create vs skopeo copy: image with a {size / 1e6:.0f} MB gzip layer in "
              f"a local docker-registry, median of {args.repeat}")
        print(f"{'link':>22} {'skopeo copy':>12} {'soci create':>12} {'soci/skopeo':>12}")
        for bandwidth in [None, *(args.bandwidth or [100.0])]:
            if bandwidth is None:
                row = _compare(reg.host, soci, args.repeat, scratch)
                label = "loopback (unlimited)"
            else:
                with ThrottledProxy(reg.host, bandwidth * 1e6) as proxy:
                    row = _compare(proxy.host, soci, args.repeat, scratch)
                label = f"{bandwidth:.0f} MB/s proxy"
            print(f"{label:>22} {row[0]:11.2f}s {row[1]:11.2f}s {row[1] / row[0]:11.2f}x")


def _compare(host: str, soci: str, repeat: int, scratch: str) -> tuple[float, float]:
    ref = f"{host}/big:v1"
    t_skopeo = timed(["skopeo", "--insecure-policy", "copy", "--quiet",
                      "--src-tls-verify=false", f"docker://{ref}", "oci:{work}:v1"],
                     repeat, scratch)
    t_soci = timed([soci, "--plain-http", "--root", "{work}", "create", "-q", ref],
                   repeat, scratch)
    return t_skopeo, t_soci


if __name__ == "__main__":
    main()
