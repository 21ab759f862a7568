"""zTOC build of a zstd layer, as ratios against baselines run side by side.

One tar of this machine's /usr/lib (``make_layer.pick_files``, --tar-mb) is compressed
twice: as multi-frame zstd (``pzstd``, one frame per few MiB, so every span is whole
frames) and as gzip -6. Each round times, in alternating order:

- ``soci`` zTOC build of the zstd layer (``build_ztoc``: frames decoded natively, tar
  headers scanned, spans hashed),
- ``soci`` zTOC build of the gzip layer of the same tar (the baseline to beat),
- plain ``zstd -dc`` of the zstd layer to /dev/null (the floor: target <= 1.3x).

Printed: per-round ratios, then their median and spread. The machine is shared and
noisy: compare the ratios, never the seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from make_layer import pick_files  # noqa: E402


def make_inputs(workdir: str, tar_mb: int) -> tuple[str, str]:
    """The tar compressed as pzstd and gzip -6 (cached in ``workdir``)."""
    os.makedirs(workdir, exist_ok=True)
    tar = os.path.join(workdir, f"layer-{tar_mb}.tar")
    zst, gz = tar + ".zst", tar + ".gz"
    if not os.path.exists(tar):
        files = pick_files("/usr/lib", tar_mb << 20)
        subprocess.run(["tar", "-C", "/", "--no-recursion", "--owner=0", "--group=0", "-cf",
                        tar + ".part", "-T", "-"], input="\n".join(files).encode() + b"\n",
                       check=False)
        os.replace(tar + ".part", tar)
    if not os.path.exists(zst):
        subprocess.run(["pzstd", "-q", "-f", "-p", "2", "-3", tar, "-o", zst + ".part"],
                       check=True)
        os.replace(zst + ".part", zst)
    if not os.path.exists(gz):
        with open(gz + ".part", "wb") as out:
            subprocess.run(["gzip", "-n", "-6", "-c", tar], stdout=out, check=True)
        os.replace(gz + ".part", gz)
    return zst, gz


def soci_build(path: str) -> None:
    from soci.ztoc import build_ztoc

    with open(path, "rb") as f:
        build_ztoc(f)


def zstd_dc(path: str) -> None:
    with open(os.devnull, "wb") as null:
        subprocess.run(["zstd", "-q", "-dc", path], stdout=null, check=True)


def spread(values: list[float]) -> str:
    return (f"median {statistics.median(values):.2f}  "
            f"(min {min(values):.2f}, max {max(values):.2f}, n={len(values)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/soci-bench-zstd")
    parser.add_argument("--tar-mb", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    zst, gz = make_inputs(args.workdir, args.tar_mb)
    print(f"tar {os.path.getsize(zst[:-4]) >> 20} MiB; zstd layer {os.path.getsize(zst) >> 20}"
          f" MiB (pzstd -3); gzip layer {os.path.getsize(gz) >> 20} MiB (gzip -6)")
    from soci._native.zstdframes import ZSTD_VERSION

    from soci.ztoc import build_ztoc

    with open(zst, "rb") as f:
        z = build_ztoc(f).ztoc
    print(f"libzstd {ZSTD_VERSION}; zstd zTOC: {z.span_count} spans, {len(z.entries)} entries")

    tasks = {
        "soci zstd build": lambda: soci_build(zst),
        "soci gzip build": lambda: soci_build(gz),
        "zstd -dc": lambda: zstd_dc(zst),
    }
    vs_gzip: list[float] = []
    vs_dc: list[float] = []
    names = list(tasks)
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        times = {}
        for name in order:
            start = time.perf_counter()
            tasks[name]()
            times[name] = time.perf_counter() - start
        vs_gzip.append(times["soci zstd build"] / times["soci gzip build"])
        vs_dc.append(times["soci zstd build"] / times["zstd -dc"])
        print(f"round {r + 1}: zstd build / gzip build {vs_gzip[-1]:.2f}; "
              f"zstd build / zstd -dc {vs_dc[-1]:.2f}", flush=True)
    print(f"soci zstd build / soci gzip build (same tar): {spread(vs_gzip)}  target < 1")
    print(f"soci zstd build / zstd -dc:                    {spread(vs_dc)}  target <= 1.3")


if __name__ == "__main__":
    main()
