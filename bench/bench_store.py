"""soci-store read benchmarks: four rows, each a ratio against a baseline run in the same run.

The layer is a gzip tar of this machine's /usr/lib (made once under bench/.data, by
make_layer.py, and extracted next to it for the local-disk baselines); it is pushed to a
loopback registry, indexed, and served by a fresh soci-store per run (default config unless
--config adds keys). Rows, for the files of at least --min-file bytes read in layer order:

1. first read through soci-store (fetch + verify + inflate, nothing cached), against ISA-L
   inflating the whole layer on one core (MB/s of tar bytes);
2. read again with the daemon's span caches filled and the page cache dropped, against the
   same files on local disk with the page cache dropped;
3. read again with the page cache warm, against the local files with the page cache warm;
4. cold reads of small (2-16 KB) files, each in a span no earlier read touched, through a
   fresh daemon, against the floor of one ranged GET of the span plus one inflate.

Each row is measured --runs times, the two sides alternating which goes first; the report
gives the median ratio and its spread (min-max). After each run every file read is checked
against the sha256 of the local copy (untimed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from isal import isal_zlib  # noqa: E402
from soci._native.zran import inflate_range  # noqa: E402

from bench_create import write_layout  # noqa: E402
from benchdata import data_dir, ensure_layer  # noqa: E402
from registryd import FaultProxy, Registry  # noqa: E402
from soci.registry import Reference, RegistryClient  # noqa: E402
from soci.ztoc import decode, zinfo_of  # noqa: E402
from storeenv import StoreDaemon  # noqa: E402

CHUNK = 1 << 20


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_all(paths: list[Path]) -> int:
    total = 0
    buf = bytearray(CHUNK)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fuse_counts(daemon: StoreDaemon) -> dict[str, float]:
    """FUSE operations served and spans inflated so far, from the daemon's metrics."""
    text = urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics").read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("soci_fuse_operations_total{"):
            op = line.split('op="')[1].split('"')[0]
            out[op] = out.get(op, 0) + float(line.split()[-1])
        elif line.startswith("soci_span_inflates_total{"):
            out["inflates"] = out.get("inflates", 0) + float(line.split()[-1])
    return out


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (its threads included),
    or by the whole machine when ``pid`` is None: how busy the two cores were."""
    tick = os.sysconf("SC_CLK_TCK")
    if pid is None:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        return (sum(map(int, fields)) - int(fields[3]) - int(fields[4])) / tick  # not idle
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def isal_inflate(layer: Path) -> int:
    """Inflate the whole layer on one core with ISA-L; the tar bytes produced."""
    d = isal_zlib.decompressobj(wbits=31)
    total = 0
    with open(layer, "rb", buffering=0) as f:
        while chunk := f.read(4 * CHUNK):
            total += len(d.decompress(chunk))
    return total + len(d.flush())


def both(first: Callable[[], float], second: Callable[[], float], swap: bool
         ) -> tuple[float, float]:
    """Time two sides, in the order the run says; returns (first's time, second's time)."""
    if swap:
        b = second()
        return first(), b
    a = first()
    return a, second()


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    med = statistics.median(values)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def fresh_root(src: Path, dst: Path) -> Path:
    """A root with src's index and zTOCs but no span cache: a daemon that fetched nothing."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir()
    subprocess.run(["cp", "-r", str(src / "content"), str(src / "indexes"),
                    str(src / "artifacts.sqlite3"), str(dst)], check=True)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--layer", default=str(HERE / ".data" / "usrlib.tar.gz"))
    parser.add_argument("--min-file", type=int, default=256 << 10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--config", default="", help="extra soci-store TOML (e.g. a [cache])")
    parser.add_argument("--rows", default="1234", help="which rows to run")
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
        members = tf.getmembers()
    names = [m.name for m in members if m.isreg() and m.size >= args.min_file]
    local_paths = [extracted / n for n in names]
    expected = {n: sha256_of(p) for n, p in zip(names, local_paths, strict=True)}
    soci = str(Path(sys.executable).parent / "soci")
    rows: dict[str, list[float]] = {k: [] for k in
                                    ("r1", "r1_soci", "r1_base", "r2", "r2_soci", "r2_base",
                                     "r3", "r3_soci", "r3_base", "r4", "r4_soci", "r4_base",
                                     "r4_requests")}
    profile: dict[str, list[dict[str, float]]] = {}

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
        layer_mb = manifest["layers"][1]["size"] / 1e6
        z = decode(next(p for p in (root / "content" / "blobs" / "sha256").iterdir()
                        if p.stat().st_size > 1 << 20 and p.name != digest[7:]).read_bytes())
        zinfo = zinfo_of(z)
        tar_mb = z.uncompressed_size / 1e6

        for run in range(args.runs):
            swap = run % 2 == 1
            if {"1", "2", "3"} & set(args.rows):
                big_run(rows, profile, root, scratch, ref, digest, run, swap, args.config, names,
                        local_paths, expected, layer, tar_mb, reg.pid)
            if "4" in args.rows:
                small_run(rows, members, zinfo, root, scratch, reg, digest, run, swap,
                          args.config)

    print(f"## soci-store reads: {len(names)} files >= {args.min_file >> 10} KiB "
          f"({sum(p.stat().st_size for p in local_paths) / 1e6:.0f} MB) of a {layer_mb:.0f} MB "
          f"gzip layer ({tar_mb:.0f} MB of tar); median (min-max) of {args.runs} alternating "
          f"runs" + (f"; config: {args.config!r}" if args.config else ""))
    print("| reads | soci-store | baseline, same run | ratio |")
    print("|---|---|---|---|")
    mbs = "{:.0f}"
    if rows["r1"]:
        print(f"| first read (fetch + verify + inflate) | {spread(rows['r1_soci'], mbs)} MB/s | "
              f"ISA-L inflating the layer, one core: {spread(rows['r1_base'], mbs)} MB/s | "
              f"{spread(rows['r1'])}x |")
        print(f"| again, spans cached by the daemon, page cache dropped | "
              f"{spread(rows['r2_soci'], mbs)} MB/s | local disk, page cache dropped: "
              f"{spread(rows['r2_base'], mbs)} MB/s | {spread(rows['r2'])}x |")
        print(f"| page cache warm | {spread(rows['r3_soci'], mbs)} MB/s | local page cache: "
              f"{spread(rows['r3_base'], mbs)} MB/s | {spread(rows['r3'])}x |")
    for row, counts in sorted(profile.items()):
        last = counts[-1]
        print(f"row {row}, daemon side (last run): " + ", ".join(
            f"{k} {v:.0f}" for k, v in sorted(last.items()) if v))
    if rows["r4"]:
        ms = "{:.1f}"
        print(f"| cold 2-16 KB file, one span each ({statistics.median(rows['r4_requests']):.0f}"
              f" registry request(s) per file) | {spread(rows['r4_soci'], ms)} ms | one ranged "
              f"GET + inflate up to the file: {spread(rows['r4_base'], ms)} ms | "
              f"{spread(rows['r4'])}x |")


def big_run(rows: dict[str, list[float]], profile: dict[str, list[dict[str, float]]],
            root: Path, scratch: Path, ref: str, digest: str, run: int, swap: bool,
            config: str, names: list[str], local_paths: list[Path],
            expected: dict[str, str], layer: Path, tar_mb: float,
            registry_pid: int | None) -> None:
    """Rows 1-3 for one run, through one fresh daemon."""
    run_root = fresh_root(root, scratch / f"run{run}")
    with StoreDaemon(run_root, scratch / f"mnt{run}", extra_config=config,
                     log_level="info") as daemon:
        diff = daemon.layer_dir(ref, digest) / "diff"
        os.listdir(diff)  # resolve the image first (manifest, config, zTOC)
        fuse_paths = [diff / n for n in names]
        mb = sum(p.stat().st_size for p in local_paths) / 1e6

        pids = {"daemon": daemon.proc.pid if daemon.proc else None,
                "registry": registry_pid}

        def counted(row: str, fn: Callable[[], float]) -> Callable[[], float]:
            def run() -> float:
                before = fuse_counts(daemon)
                cpu = {k: cpu_seconds(pid) for k, pid in pids.items() if pid}
                machine = cpu_seconds()
                t = fn()
                machine = cpu_seconds() - machine
                after = fuse_counts(daemon)
                counts = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                # How many cores were busy on average while this side ran, and whose.
                counts["cores busy x100"] = 100 * machine / t
                for k, pid in pids.items():
                    if pid:
                        counts[f"{k} cores x100"] = 100 * (cpu_seconds(pid) - cpu[k]) / t
                profile.setdefault(row, []).append(counts)
                return t
            return run

        read_all([layer])  # the baseline inflates from the page cache
        t_soci, t_base = both(counted("1", lambda: timed(lambda: read_all(fuse_paths))),
                              lambda: timed(lambda: isal_inflate(layer)), swap)
        rows["r1_soci"].append(mb / t_soci)
        rows["r1_base"].append(tar_mb / t_base)
        rows["r1"].append((mb / t_soci) / (tar_mb / t_base))

        def cold(paths: list[Path]) -> float:
            drop_caches()
            return timed(lambda: read_all(paths))

        t_soci, t_base = both(counted("2", lambda: cold(fuse_paths)),
                              lambda: cold(local_paths), swap)
        rows["r2_soci"].append(mb / t_soci)
        rows["r2_base"].append(mb / t_base)
        rows["r2"].append(t_base / t_soci)
        read_all(fuse_paths)
        read_all(local_paths)
        t_soci, t_base = both(counted("3", lambda: timed(lambda: read_all(fuse_paths))),
                              lambda: timed(lambda: read_all(local_paths)), swap)
        rows["r3_soci"].append(mb / t_soci)
        rows["r3_base"].append(mb / t_base)
        rows["r3"].append(t_base / t_soci)
        drop_caches()  # check what the daemon serves, not what the kernel kept
        bad = [n for n, p in zip(names, fuse_paths, strict=True)
               if sha256_of(p) != expected[n]]
        if bad:
            raise SystemExit(f"soci-store served wrong bytes for {bad[:3]}")
    shutil.rmtree(run_root)


def small_run(rows: dict[str, list[float]], members: list[tarfile.TarInfo], zinfo, root: Path,
              scratch: Path, reg: Registry, digest: str, run: int, swap: bool,
              config: str) -> None:
    """Row 4 for one run: ten small files, each alone in its span, soci-store vs the floor."""
    candidates = [m for m in members if m.isreg() and 2000 < m.size < 16000]
    picked, used = [], set()
    for m in candidates:
        span = zinfo.span_of(m.offset_data)
        if span not in used and zinfo.span_of(m.offset_data + m.size) == span:
            used.add(span)
            picked.append(m)
        if len(picked) == 10:
            break
    med = statistics.median
    with FaultProxy(reg.host) as proxy:
        pref = f"{proxy.host}/big:v1"
        cold_root = fresh_root(root, scratch / f"cold{run}")
        store_times, floor_times, counts = [], [], []
        client = RegistryClient(plain_http=True)
        r = Reference.parse(pref)
        client.head_manifest(r)  # a warm connection, as the daemon has
        with StoreDaemon(cold_root, scratch / f"mnt-cold{run}", extra_config=config,
                         log_level="info") as daemon:
            layer_dir = daemon.layer_dir(pref, digest)
            os.listdir(layer_dir / "diff")  # resolve the image first (manifest, config)

            def store(m: tarfile.TarInfo) -> float:
                seen = len(proxy.counters.seen)
                t = timed(lambda: (layer_dir / "diff" / m.name).read_bytes())
                counts.append(sum(1 for s in proxy.counters.seen[seen:] if "/blobs/" in s))
                return t

            def floor(m: tarfile.TarInfo) -> float:
                span = zinfo.span_of(m.offset_data)
                start = time.perf_counter()
                comp = client.get_blob_range(r, digest, zinfo.compressed_start(span),
                                             zinfo.compressed_end(span))
                out = bytearray(m.offset_data - zinfo.uncompressed_start(span) + m.size)
                inflate_range(comp, zinfo.bits[span], zinfo.window(span), 0, out)
                return time.perf_counter() - start

            for m in picked:
                a, b = both(lambda m=m: store(m), lambda m=m: floor(m), swap)
                store_times.append(a)
                floor_times.append(b)
        shutil.rmtree(cold_root)
    rows["r4_soci"].append(med(store_times) * 1e3)
    rows["r4_base"].append(med(floor_times) * 1e3)
    rows["r4"].append(med(store_times) / med(floor_times))
    rows["r4_requests"].append(med(counts))


if __name__ == "__main__":
    main()
