"""containerd with soci-snapshotter-grpc against containerd alone, side by side in one run.

``lazy``: time until a workload reading a few files of a ~380 MB layer (make_layer.py) has
printed its result. The registry sits behind a bandwidth-limited proxy (default 25 MB/s).
Baseline: ``ctr image pull`` + ``ctr run`` with containerd's overlayfs snapshotter. soci:
``soci pull`` + ``ctr run --snapshotter soci``; the SOCI index was built and pushed
beforehand (as a CI pipeline would), and the snapshotter starts with an empty root and finds
it through the registry.

``unpack``: pulling an image of several layers without a SOCI index (loopback, no limit, so
fetching costs little and unpacking decides): ``ctr image pull`` (containerd fetches and
unpacks, overlayfs) against ``soci pull`` with the snapshotter's parallel pull-and-unpack
(ISA-L, several layers at once).

Every variant starts from a fresh containerd (and snapshotter) each round; rounds alternate
the variants, and medians are compared: these machines are noisy, read the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from bench_create import diff_id  # noqa: E402
from bench_unpack import make_layers  # noqa: E402
from benchdata import data_dir, ensure_layer  # noqa: E402
from containerdenv import Containerd  # noqa: E402
from images import GzipLayerFile, busybox_layer, write_image  # noqa: E402
from registryd import Registry  # noqa: E402
from snapshotterenv import SnapshotterDaemon  # noqa: E402
from throttle import ThrottledProxy  # noqa: E402

SOCI = str(Path(sys.executable).parent / "soci")


def push(layout: Path, host: str, name: str) -> None:
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                    f"oci:{layout}:v1", f"docker://{host}/{name}"], check=True)


def timed_until_output(ctrd: Containerd, pull: Callable[[], None], image: str,
                       snapshotter: str, command: list[str]) -> tuple[float, str]:
    """Seconds for ``pull`` and then a container's first line of output."""
    start = time.perf_counter()
    pull()
    out = ctrd.run(image, *command, snapshotter=snapshotter, timeout=1800).stdout
    return time.perf_counter() - start, out


def soci_pull(ctrd: Containerd, image: str) -> None:
    subprocess.run([SOCI, "--plain-http", "pull", "-q", "--address", ctrd.address,
                    "--namespace", ctrd.namespace, "--snapshotter", "soci", image],
                   check=True, stdout=subprocess.DEVNULL)


def ctr_pull(ctrd: Containerd, image: str) -> None:
    args = ["images", "pull", "--plain-http"]
    if ctrd.generation != "1.6":
        args.append("--local")  # 2.x's transfer service otherwise; same unpacker either way
    ctrd.ctr(*args, image, timeout=1800)


def bench_lazy(scratch: Path, layer: Path, bandwidth: float, repeat: int,
               generation: str) -> None:
    with tarfile.open(layer) as tf:
        members = [m for m in tf.getmembers() if m.isreg() and 300_000 < m.size < 3_000_000]
    step = len(members) // 5
    workload = [members[i * step + step // 2] for i in range(5)]
    command = ["sh", "-c", "cat " + " ".join("/" + m.name for m in workload) + " | sha256sum"]
    write_image(scratch / "lazy", "v1", [busybox_layer(),
                                          GzipLayerFile(layer, diff_id(str(layer)))])
    with Registry() as reg, ThrottledProxy(reg.host, bandwidth * 1e6) as slow:
        push(scratch / "lazy", reg.host, "big:v1")
        for step_args in (["create", "-q"], ["push", "-q"]):
            subprocess.run([SOCI, "--plain-http", "--root", str(scratch / "build"), *step_args,
                            f"{reg.host}/big:v1"], check=True, stdout=subprocess.DEVNULL)
        image = f"{slow.host}/big:v1"
        plain, lazy, outs = [], [], set()
        for i in range(repeat):
            with Containerd(generation, registry_hosts=[slow.host]) as ctrd:
                t, out = timed_until_output(ctrd, lambda c=ctrd: ctr_pull(c, image), image,
                                            "overlayfs", command)
                plain.append(t)
                outs.add(out)
            with SnapshotterDaemon(scratch / f"root{i}") as sn, Containerd(
                    generation, soci_socket=sn.address, registry_hosts=[slow.host]) as ctrd:
                t, out = timed_until_output(ctrd, lambda c=ctrd: soci_pull(c, image), image,
                                            "soci", command)
                lazy.append(t)
                outs.add(out)
                assert "mounted lazily" in sn.logs()
            fetched = sum(p.stat().st_size
                          for p in (scratch / f"root{i}" / "cache" / "spans").iterdir())
        assert len(outs) == 1, outs
    size = layer.stat().st_size
    total = sum(m.size for m in workload)
    p, s = statistics.median(plain), statistics.median(lazy)
    print(f"## containerd {generation} lazy start: pull + run reading {len(workload)} files "
          f"({total / 1e6:.1f} MB) of a {size / 1e6:.0f} MB layer, registry at "
          f"{bandwidth:.0f} MB/s, median of {repeat}")
    print(f"ctr image pull + ctr run (overlayfs)         {p:7.2f} s")
    print(f"soci pull + ctr run --snapshotter soci       {s:7.2f} s")
    print(f"  ratio soci / containerd                    {s / p:7.2f}x")
    print(f"layer bytes fetched by the snapshotter       {fetched / 1e6:7.1f} MB of "
          f"{size / 1e6:.0f} MB ({fetched / size:.1%})")


def bench_parallel_unpack(scratch: Path, tar_bytes: int, layers: int, repeat: int,
                          generation: str) -> None:
    made = make_layers(str(scratch / "layers"), tar_bytes=tar_bytes, layers=layers)
    write_image(scratch / "many", "v1",
                [GzipLayerFile(Path(la.path), la.diff_id) for la in made])
    config = "[pull_modes.parallel_pull_unpack]\nenable = true\n"
    with Registry() as reg:
        push(scratch / "many", reg.host, "many:v1")
        image = f"{reg.host}/many:v1"
        plain, soci = [], []
        for i in range(repeat):
            with Containerd(generation, registry_hosts=[reg.host]) as ctrd:
                start = time.perf_counter()
                ctr_pull(ctrd, image)
                plain.append(time.perf_counter() - start)
            with SnapshotterDaemon(scratch / f"proot{i}", extra_config=config) as sn, \
                    Containerd(generation, soci_socket=sn.address,
                               registry_hosts=[reg.host]) as ctrd:
                start = time.perf_counter()
                soci_pull(ctrd, image)
                soci.append(time.perf_counter() - start)
                assert sn.logs().count("fetched and unpacked") == len(made), sn.logs()
    compressed = sum(la.size for la in made)
    p, s = statistics.median(plain), statistics.median(soci)
    print(f"## containerd {generation} pull of {len(made)} layers without index "
          f"({compressed / 1e6:.0f} MB gzip, {tar_bytes / 1e6:.0f} MB tar, "
          f"{sum(la.files for la in made)} files), loopback, median of {repeat}")
    print(f"ctr image pull (containerd fetch + unpack)   {p:7.2f} s")
    print(f"soci pull, parallel pull-and-unpack          {s:7.2f} s")
    print(f"  ratio soci / containerd                    {s / p:7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("which", nargs="*", default=["lazy", "unpack"],
                        choices=["lazy", "unpack"])
    parser.add_argument("--layer", default=str(HERE / ".data" / "usrlib.tar.gz"))
    parser.add_argument("--bandwidth", type=float, default=25.0, help="MB/s")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--generation", default="1.6", choices=["1.6", "2"])
    parser.add_argument("--unpack-mb", type=int, default=320)
    parser.add_argument("--unpack-layers", type=int, default=4)
    args = parser.parse_args()
    layer = Path(args.layer)
    if "lazy" in args.which:
        layer = ensure_layer(layer)
    with tempfile.TemporaryDirectory(dir=data_dir()) as scratch_dir:
        scratch = Path(scratch_dir)
        if "lazy" in args.which:
            bench_lazy(scratch, layer, args.bandwidth, args.repeat, args.generation)
        if "unpack" in args.which:
            bench_parallel_unpack(scratch, args.unpack_mb << 20, args.unpack_layers,
                                  args.repeat, args.generation)


if __name__ == "__main__":
    main()
