"""Unpacking a set of non-lazy gzip layers: soci's ParallelUnpacker against baselines.

The layer set (default ~320 MB uncompressed in 4 layers: a fixed-seed sample of this
machine's /usr files, so many files of the system's mixed sizes, gzip -6) is unpacked,
in the same run and interleaved round by round, by:

- ``tar -xzf``: GNU tar with gzip, one layer after another (no verification);
- ``sequential-zlib``: soci's extractor with the standard library's gzip, one by one;
- ``sequential-isal``: soci's extractor with ISA-L, one by one;
- ``parallel-local``: ``ParallelUnpacker`` with the blobs as local files (content store);
- ``parallel-spooled``: ``ParallelUnpacker`` with the blobs as non-file streams, so each
  goes through the download stage (spool file + digest) as one from a registry would;
- any ``extra`` contender the caller passes (containerd's own unpack is added that way).

soci's variants check both digests (blob and diff ID); tar checks none. The machines are
noisy: compare the ratios to ``tar -xzf`` (printed), not the seconds. ``bench_unpack`` is
importable; ``main`` is the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from soci.unpack import LayerSpec, ParallelUnpacker, unpack_file

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class BenchLayer:
    path: str  # the .tar.gz blob
    digest: str
    diff_id: str
    size: int
    files: int
    tar_bytes: int


def _pick(roots: list[str], limit: int) -> list[tuple[str, int]]:
    """A reproducible sample of files under ``roots`` (shuffled with a fixed seed, so the
    sizes are the system's own mix, mostly small) until ``limit`` tar bytes."""
    candidates = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if st.st_size <= 32 << 20:
                    candidates.append((os.path.relpath(path, "/"), st.st_size + 1024))
    random.Random(0).shuffle(candidates)
    chosen, total = [], 0
    for name, cost in candidates:
        chosen.append((name, cost))
        total += cost
        if total >= limit:
            break
    return sorted(chosen)


def make_layers(workdir: str, tar_bytes: int = 320 << 20, layers: int = 4,
                roots: tuple[str, ...] = ("/usr/lib", "/usr/share", "/usr/bin")
                ) -> list[BenchLayer]:
    """The layer set, built once and cached in ``workdir`` (reproducible: sorted files)."""
    os.makedirs(workdir, exist_ok=True)
    meta = os.path.join(workdir, f"layers-v2-{tar_bytes}-{layers}.json")
    if os.path.exists(meta):
        with open(meta) as f:
            return [BenchLayer(**d) for d in json.load(f)]
    files = _pick(list(roots), tar_bytes)
    per = sum(c for _, c in files) / layers
    groups: list[list[str]] = [[] for _ in range(layers)]
    acc = 0
    for name, cost in files:
        groups[min(int(acc / per), layers - 1)].append(name)
        acc += cost
    out = []
    for i, group in enumerate(groups):
        tar_path = os.path.join(workdir, f"layer{i}.tar")
        subprocess.run(["tar", "-C", "/", "--no-recursion", "--format=posix", "-cf", tar_path,
                        "-T", "-"], input="\n".join(group).encode() + b"\n", check=True)
        blob = tar_path + ".gz"
        with open(blob, "wb") as gz_out:
            subprocess.run(["gzip", "-n", "-6", "-c", tar_path], stdout=gz_out, check=True)
        out.append(BenchLayer(blob, _sha256(blob), _sha256(tar_path), os.path.getsize(blob),
                              len(group), os.path.getsize(tar_path)))
        os.unlink(tar_path)
    with open(meta, "w") as f:
        json.dump([vars(layer) for layer in out], f)
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class _RemoteLike:
    """A blob stream without ``fileno`` (as from HTTP): ParallelUnpacker spools it."""

    def __init__(self, path: str) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def close(self) -> None:
        self._f.close()


def run_tar(layers: list[BenchLayer], out: str) -> None:
    for i, layer in enumerate(layers):
        dest = os.path.join(out, f"l{i}")
        os.mkdir(dest)
        subprocess.run(["tar", "-xzf", layer.path, "-C", dest], check=True)


def _sequential(inflater: str) -> Callable[[list[BenchLayer], str], None]:
    def run(layers: list[BenchLayer], out: str) -> None:
        for i, layer in enumerate(layers):
            unpack_file(layer.path, os.path.join(out, f"l{i}"), media_type=GZ,
                        digest=layer.digest, diff_id=layer.diff_id, size=layer.size,
                        inflater=inflater)
    return run


def _parallel(remote: bool, unpacks_per_image: int) -> Callable[[list[BenchLayer], str], None]:
    def run(layers: list[BenchLayer], out: str) -> None:
        def opener(path: str) -> Callable[[], BinaryIO]:
            if remote:
                return lambda: _RemoteLike(path)  # type: ignore[return-value]
            return lambda: open(path, "rb")  # the unpacker closes it

        specs = [LayerSpec(layer.digest, layer.size, GZ, layer.diff_id,
                           os.path.join(out, f"l{i}"), opener(layer.path), image="bench")
                 for i, layer in enumerate(layers)]
        with ParallelUnpacker(max_concurrent_unpacks_per_image=unpacks_per_image) as unpacker:
            unpacker.submit_all(specs)
            for spec in specs:  # in order, as containerd's Prepare calls come
                unpacker.wait(spec.digest)
    return run


def bench_unpack(
    workdir: str,
    *,
    tar_bytes: int = 320 << 20,
    layers: int = 4,
    repeat: int = 3,
    unpacks_per_image: int = 2,
    extra: dict[str, Callable[[list[BenchLayer], str], None]] | None = None,
    baseline: str = "tar -xzf",
    out_root: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Median seconds of each contender (``extra`` ones included), printed with their
    ratio to ``baseline``. A contender is ``fn(layers, out_dir)`` and must leave the
    unpacked layers under ``out_dir`` (which exists and is empty). ``out_root`` is where
    the layers are unpacked (default ``workdir``; a tmpfs there measures CPU, not disk)."""
    layer_set = make_layers(workdir, tar_bytes, layers)
    total = sum(layer.tar_bytes for layer in layer_set)
    log(f"{len(layer_set)} layers, {total / 1e6:.0f} MB tar, "
        f"{sum(la.size for la in layer_set) / 1e6:.0f} MB gzip, "
        f"{sum(la.files for la in layer_set)} entries; {os.cpu_count()} CPUs")
    contenders: dict[str, Callable[[list[BenchLayer], str], None]] = {
        "tar -xzf": run_tar,
        "sequential-zlib": _sequential("zlib"),
        "sequential-isal": _sequential("isal-threaded"),
        "parallel-local": _parallel(False, unpacks_per_image),
        "parallel-spooled": _parallel(True, unpacks_per_image),
    }
    contenders.update(extra or {})
    times: dict[str, list[float]] = {name: [] for name in contenders}
    # Outputs are removed only at the end: deleting a tree on a filesystem mounted with
    # ``discard`` (as here) slows the journal for a while and would tax the next run.
    outs = os.path.join(out_root or workdir, "soci-bench-unpack-out")
    shutil.rmtree(outs, ignore_errors=True)
    os.mkdir(outs)
    try:
        for r in range(repeat):
            for n, (name, fn) in enumerate(contenders.items()):  # interleaved: shared noise
                out = os.path.join(outs, f"{r}-{n}")
                os.mkdir(out)
                os.sync()
                start = time.perf_counter()
                fn(layer_set, out)
                times[name].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(outs, ignore_errors=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians[baseline]
    for name, seconds in medians.items():
        log(f"{name:20s} {seconds:7.2f} s  {total / seconds / 1e6:7.1f} MB/s  "
            f"{seconds / base:5.2f}x {baseline}")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/var/tmp/soci-bench-unpack")
    parser.add_argument("--tar-bytes", type=int, default=320 << 20)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--unpacks-per-image", type=int, default=2)
    parser.add_argument("--out-root", help="unpack under this directory (default: workdir)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (owners and devices are restored)")
    bench_unpack(args.workdir, tar_bytes=args.tar_bytes, layers=args.layers,
                 repeat=args.repeat, unpacks_per_image=args.unpacks_per_image,
                 out_root=args.out_root)


if __name__ == "__main__":
    main()
