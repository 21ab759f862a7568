"""zTOC benchmarks, printed as ratios against baselines run side by side.

1. Build: ``soci`` zTOC build of a >= 300 MB gzip layer against, in the same
   run, plain zlib inflate of the blob, indexed_gzip ``build_full_index`` with
   4 MiB spacing, rapidgzip index export with 2 threads, ISA-L inflate and a
   sha256 of the blob.
2. Ranged extraction: random reads through soci's checkpoints against
   indexed_gzip seek+read on the same layer with the same index spacing.
3. Opening a zTOC of 100,000 entries: soci's native decoder against walking
   the same buffer with flatc-generated accessors on the FlatBuffers runtime.

Each measurement is the median of --repeat runs; the machines are noisy, so
compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))

from benchdata import ensure_layer, require_modules  # noqa: E402

SPAN = 4 << 20
CHUNK = 1 << 20


def timed(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def zlib_inflate(path: str) -> None:
    d = zlib.decompressobj(31)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            while chunk:
                d.decompress(chunk, CHUNK)
                chunk = d.unconsumed_tail
            if d.eof and d.unused_data:
                rest = d.unused_data
                d = zlib.decompressobj(31)
                d.decompress(rest)


def isal_inflate(path: str) -> None:
    from isal import (
        igzip,
        igzip_threaded,  # noqa: F401  (import check)
    )

    with igzip.open(path, "rb") as f:
        while f.read(CHUNK):
            pass


def sha256_blob(path: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)


def indexed_gzip_index(path: str) -> None:
    import indexed_gzip

    with indexed_gzip.IndexedGzipFile(path, spacing=SPAN) as f:
        f.build_full_index()


def rapidgzip_index(path: str) -> None:
    import rapidgzip

    with tempfile.NamedTemporaryFile() as out, rapidgzip.open(path, parallelization=2) as f:
        f.export_index(out.name)


def soci_build(path: str) -> None:
    from soci.ztoc import build_ztoc, encode

    with open(path, "rb") as f:
        encode(build_ztoc(f, span_size=SPAN).ztoc)


def bench_build(path: str, repeat: int) -> None:
    size = os.path.getsize(path)
    print(f"\n## zTOC build: {path} ({size / 1e6:.0f} MB compressed), span 4 MiB, "
          f"median of {repeat}")
    sha256_blob(path)  # warm the page cache for everyone alike
    rows = [
        ("soci ztoc build (one pass: checkpoints, TOC, span digests, blob digest)", soci_build),
        ("zlib inflate (Python zlib, no index)", zlib_inflate),
        ("indexed_gzip build_full_index, 4 MiB spacing", indexed_gzip_index),
        ("rapidgzip export_index, 2 threads", rapidgzip_index),
        ("ISA-L inflate (python-isal igzip, no index)", isal_inflate),
        ("sha256 of the blob", sha256_blob),
    ]
    results = {}
    for name, fn in rows:
        results[name] = timed(lambda fn=fn: fn(path), repeat)
    ours = results[rows[0][0]]
    print(f"{'':72} {'seconds':>8} {'soci/this':>10}")
    for name, _ in rows:
        print(f"{name:72} {results[name]:8.2f} {ours / results[name]:10.2f}x")


def bench_extract(path: str, reads: int) -> None:
    import indexed_gzip

    from soci.ztoc import FileBlob, LayerReader, build_ztoc

    with open(path, "rb") as f:
        z = build_ztoc(f, span_size=SPAN).ztoc
    rng = random.Random(42)
    total = z.uncompressed_size
    sizes = [4096, 65536, 1 << 20]
    requests = [(rng.randrange(0, total - max(sizes)), rng.choice(sizes)) for _ in range(reads)]
    print(f"\n## Ranged extraction: {reads} random reads of 4 KiB / 64 KiB / 1 MiB, "
          "index spacing 4 MiB")
    with FileBlob(path) as blob:
        reader = LayerReader(z, blob)
        start = time.perf_counter()
        ours = [reader.read(off, n) for off, n in requests]
        t_soci = time.perf_counter() - start
    with indexed_gzip.IndexedGzipFile(path, spacing=SPAN) as f:
        f.build_full_index()
        start = time.perf_counter()
        theirs = []
        for off, n in requests:
            f.seek(off)
            theirs.append(f.read(n))
        t_ig = time.perf_counter() - start
    assert ours == theirs, "soci and indexed_gzip disagree"
    print(f"soci LayerReader.read         {t_soci / reads * 1e3:8.2f} ms/read")
    print(f"indexed_gzip seek+read        {t_ig / reads * 1e3:8.2f} ms/read")
    print(f"ratio soci/indexed_gzip       {t_soci / t_ig:8.2f}x")


def bench_open(repeat: int) -> None:
    from soci.ztoc import build_ztoc, decode, encode

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(100_000):
            ti = tarfile.TarInfo(f"usr/share/pkg{i // 1000}/file-{i}.txt")
            ti.size = 0
            ti.uname = ti.gname = "root"
            tf.addfile(ti)
    z = build_ztoc(io.BytesIO(buf.getvalue())).ztoc
    data = encode(z)
    print(f"\n## Opening a zTOC of {len(z.entries)} entries ({len(data) / 1e6:.1f} MB), "
          f"median of {repeat}")
    t_soci = timed(lambda: decode(data), repeat)
    reader = _flatc_reader()
    t_fb = timed(lambda: reader(data), repeat) if reader else float("nan")
    print(f"soci decode (native)                        {t_soci * 1e3:8.1f} ms")
    print(f"flatc-generated accessors, all fields       {t_fb * 1e3:8.1f} ms")
    print(f"ratio soci/flatbuffers-runtime              {t_soci / t_fb:8.2f}x")


def _flatc_reader() -> Callable[[bytes], object] | None:
    import soci.ztoc

    out = tempfile.mkdtemp()
    schema = os.path.join(os.path.dirname(soci.ztoc.__file__), "ztoc.fbs")
    try:
        subprocess.run(["flatc", "--python", "-o", out, schema], check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    sys.path.insert(0, out)
    from ztoc.Ztoc import Ztoc  # type: ignore[import-not-found]

    def read(data: bytes) -> object:
        root = Ztoc.GetRootAs(data, 0)
        toc = root.Toc()
        out = []
        for i in range(toc.MetadataLength()):
            m = toc.Metadata(i)
            out.append((m.Name(), m.Type(), m.UncompressedOffset(), m.UncompressedSize(),
                        m.Linkname(), m.Mode(), m.Uid(), m.Gid(), m.Uname(), m.Gname(),
                        m.ModTime(), m.Devmajor(), m.Devminor(),
                        [(m.Xattrs(j).Key(), m.Xattrs(j).Value())
                         for j in range(m.XattrsLength())]))
        return out

    return read


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--layer", default=os.path.join(HERE, ".data", "usrlib.tar.gz"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--reads", type=int, default=300)
    args = parser.parse_args()
    require_modules("indexed_gzip", "rapidgzip")
    args.layer = str(ensure_layer(args.layer))
    bench_build(args.layer, args.repeat)
    bench_extract(args.layer, args.reads)
    bench_open(args.repeat)


if __name__ == "__main__":
    main()
