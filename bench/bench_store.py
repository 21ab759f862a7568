"""soci-store read benchmarks, as ratios against baselines run in the same process.

1. Reads served by the daemon with its span cache warm and the kernel page cache
   dropped, against reading the same files from local disk with the page cache
   dropped (target >= 0.5x the throughput). Then re-reads with the page cache
   warm, which must run at page-cache speed (the layer is immutable, so the
   kernel keeps what it has read).
2. A cold read of one small file through a fresh daemon: registry requests and
   time, against the floor of one ranged GET of its span plus one inflate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from soci._native.zran import inflate_range  # noqa: E402

from bench_create import write_layout  # noqa: E402
from benchdata import data_dir, ensure_layer  # noqa: E402
from registryd import FaultProxy, Registry  # noqa: E402
from soci.registry import Reference, RegistryClient  # noqa: E402
from soci.ztoc import decode, zinfo_of  # noqa: E402
from storeenv import StoreDaemon  # noqa: E402


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_all(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total


def timed_read(paths: list[Path]) -> tuple[float, int]:
    start = time.perf_counter()
    n = read_all(paths)
    return time.perf_counter() - start, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--layer", default=str(HERE / ".data" / "usrlib.tar.gz"))
    parser.add_argument("--min-file", type=int, default=256 << 10)
    args = parser.parse_args()
    layer = Path(args.layer)
    layer = ensure_layer(layer)
    extracted = data_dir() / "usrlib-extracted"
    if not extracted.exists():
        tmp = Path(str(extracted) + ".part")
        tmp.mkdir(exist_ok=True)
        subprocess.run(["tar", "-xzf", str(layer), "-C", str(tmp)], check=True)
        tmp.rename(extracted)
    with tarfile.open(layer) as tf:
        names = [m.name for m in tf.getmembers() if m.isreg() and m.size >= args.min_file]
    soci = str(Path(sys.executable).parent / "soci")

    with tempfile.TemporaryDirectory(dir=data_dir()) as scratch_dir, Registry() as reg:
        scratch = Path(scratch_dir)
        write_layout(str(scratch / "layout"), str(layer))
        ref = f"{reg.host}/big:v1"
        subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet",
                        "--dest-tls-verify=false", f"oci:{scratch / 'layout'}:v1",
                        f"docker://{ref}"], check=True)
        root = scratch / "root"
        subprocess.run([soci, "--plain-http", "--root", str(root), "create", "-q", ref],
                       check=True, stdout=subprocess.DEVNULL)
        manifest = json.loads((scratch / "layout" / "blobs" / "sha256" / json.loads(
            (scratch / "layout" / "index.json").read_text())["manifests"][0]["digest"][7:]
        ).read_text())
        digest = manifest["layers"][1]["digest"]

        cache = "[cache]\nmemory_mb = 3072\n"
        with StoreDaemon(root, scratch / "mnt", extra_config=cache) as daemon:
            diff = daemon.layer_dir(ref, digest) / "diff"
            fuse_paths = [diff / n for n in names]
            local_paths = [extracted / n for n in names]
            t_fill, n = timed_read(fuse_paths)  # fetch every span, fill the daemon's cache
            drop_caches()
            t_fuse, n2 = timed_read(fuse_paths)
            drop_caches()
            t_disk, n3 = timed_read(local_paths)
            assert n == n2 == n3
            read_all(fuse_paths)  # into the page cache
            t_fuse_hot, _ = timed_read(fuse_paths)
            read_all(local_paths)
            t_disk_hot, _ = timed_read(local_paths)
        mb = n / 1e6
        print(f"## Reads of {len(names)} files >= {args.min_file >> 10} KiB ({mb:.0f} MB) of a "
              f"{manifest['layers'][1]['size'] / 1e6:.0f} MB layer")
        print(f"first read through soci-store (fetch+verify+inflate) {mb / t_fill:8.0f} MB/s")
        print(f"soci-store, spans cached, page cache dropped         {mb / t_fuse:8.0f} MB/s")
        print(f"local disk, page cache dropped                       {mb / t_disk:8.0f} MB/s")
        print(f"  ratio soci-store / local disk                      {t_disk / t_fuse:8.2f}x")
        print(f"soci-store, page cache warm                          {mb / t_fuse_hot:8.0f} MB/s")
        print(f"local disk, page cache warm                          {mb / t_disk_hot:8.0f} MB/s")
        hot = t_disk_hot / t_fuse_hot
        print(f"  ratio soci-store / local disk                      {hot:8.2f}x")

        # 2. Cold reads of small files, each in a span no earlier read touched.
        with tarfile.open(layer) as tf:
            candidates = [m for m in tf.getmembers() if m.isreg() and 2000 < m.size < 16000]
        z = decode(next(p for p in (root / "content" / "blobs" / "sha256").iterdir()
                        if p.stat().st_size > 1 << 20 and p.name != digest[7:]).read_bytes())
        zinfo = zinfo_of(z)
        picked, used = [], set()
        for m in candidates:
            span = zinfo.span_of(m.offset_data)
            if span not in used and zinfo.span_of(m.offset_data + m.size) == span:
                used.add(span)
                picked.append(m)
            if len(picked) == 10:
                break
        with FaultProxy(reg.host) as proxy:
            pref = f"{proxy.host}/big:v1"
            cold_root = scratch / "cold"
            cold_root.mkdir()
            subprocess.run(["cp", "-r", str(root / "content"), str(root / "indexes"),
                            str(root / "artifacts.sqlite3"), str(cold_root)], check=True)
            store_times, counts = [], []
            with StoreDaemon(cold_root, scratch / "mnt2") as daemon:
                layer_dir = daemon.layer_dir(pref, digest)
                os.listdir(layer_dir / "diff")  # resolve the image first (manifest, config)
                for m in picked:
                    seen = len(proxy.counters.seen)
                    start = time.perf_counter()
                    (layer_dir / "diff" / m.name).read_bytes()
                    store_times.append(time.perf_counter() - start)
                    counts.append(sum(1 for s in proxy.counters.seen[seen:] if "/blobs/" in s))
            client = RegistryClient(plain_http=True)
            r = Reference.parse(pref)
            client.head_manifest(r)  # a warm connection, as the daemon has
            floor_times = []
            for m in picked:
                span = zinfo.span_of(m.offset_data)
                start = time.perf_counter()
                comp = client.get_blob_range(r, digest, zinfo.compressed_start(span),
                                             zinfo.compressed_end(span))
                out = bytearray(m.offset_data - zinfo.uncompressed_start(span) + m.size)
                inflate_range(comp, zinfo.bits[span], zinfo.window(span), 0, out)
                floor_times.append(time.perf_counter() - start)
        med = statistics.median
        print(f"\n## Cold reads of {len(picked)} small files (2-16 KB), each in its own span")
        print(f"soci-store: {med(counts):.0f} registry request(s) per file, "
              f"median {med(store_times) * 1e3:.1f} ms")
        print(f"floor (one ranged GET of the span + inflate up to the file): "
              f"median {med(floor_times) * 1e3:.1f} ms")
        print(f"  ratio soci-store / floor  {med(store_times) / med(floor_times):.2f}x")


if __name__ == "__main__":
    main()
