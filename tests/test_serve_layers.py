"""soci-store serving one layer to several images: whose zTOC, whose cached bytes, what status.

Two images share a layer but were indexed differently (span sizes, or a hostile index for
one of them); each must be served through its own zTOC, and nothing one image left in the
caches may change a byte another image reads. Status figures must say what the disk cache
really holds and count every byte fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from images import big_file, files_layer, write_image
from layers import Node, tar_with_tarfile
from registryd import Registry, push_layout
from storeenv import StoreDaemon, soci

FILES = {f"data/f{i}.bin": big_file(f"shared{i}", 700_000) for i in range(8)}


def manifest(ref: str) -> dict:
    return json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        capture_output=True, check=True).stdout)


def status(daemon: StoreDaemon) -> list[dict]:
    with urllib.request.urlopen(f"http://{daemon.metrics_address}/status") as resp:
        return json.loads(resp.read())["layers"]


def wait_for(daemon: StoreDaemon, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 30
    while daemon.logs().count(text) < count:
        assert time.monotonic() < deadline, daemon.logs()[-3000:]
        time.sleep(0.05)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Images a and b: one shared layer (b has a second, small one, so another manifest)."""
    tmp = tmp_path_factory.mktemp("shared")
    nodes = [Node("data", "dir", mode=0o755)]
    nodes += [Node(name, data=data, mode=0o644) for name, data in FILES.items()]
    shared = tar_with_tarfile(nodes, tarfile.PAX_FORMAT)
    with Registry() as reg:
        write_image(tmp / "a", "v1", [shared])
        write_image(tmp / "b", "v1", [shared, files_layer({"b/only": b"b\n"})])
        push_layout(tmp / "a", reg.host, "a:v1", tag="v1")
        push_layout(tmp / "b", reg.host, "b:v1", tag="v1")
        a, b = f"{reg.host}/a:v1", f"{reg.host}/b:v1"
        layer = manifest(a)["layers"][0]
        assert manifest(b)["layers"][0] == layer
        yield {"tmp": tmp, "a": a, "b": b, "layer": layer, "tar": shared}


def index_two_ways(root: Path, env: dict) -> None:
    soci(root, "create", "--min-layer-size", "0", "--span-size", "131072", env["a"])
    soci(root, "create", "--min-layer-size", "0", "--span-size", "1048576", env["b"])


def test_a_released_layer_leaves_no_bytes_for_another_ztoc(env: dict, tmp_path: Path) -> None:
    """Issue 8.5: inflated spans were cached by (layer digest, span number); image b's zTOC
    cuts the layer into other spans, so after a's release b read a's bytes."""
    root = tmp_path / "root"
    index_two_ways(root, env)
    digest = env["layer"]["digest"]
    with StoreDaemon(root, tmp_path / "mnt",
                     extra_config="[cache]\nrelease_grace_sec = 0.2\n") as daemon:
        a_dir = daemon.layer_dir(env["a"], digest)
        for name, data in FILES.items():
            assert (a_dir / "diff" / name).read_bytes() == data
        with pytest.raises(FileNotFoundError):  # podman's "use", then its rmdir
            open(a_dir / "use", "w").close()
        with pytest.raises(FileNotFoundError):
            os.rmdir(a_dir)
        wait_for(daemon, "released after")
        assert status(daemon) == []
        with urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics") as resp:
            text = resp.read().decode()
        assert 'soci_span_cache_bytes{cache="memory"} 0\n' in text  # a's spans left memory
        b_diff = daemon.layer_dir(env["b"], digest) / "diff"
        wrong = [name for name, data in FILES.items() if (b_diff / name).read_bytes() != data]
        assert wrong == []


def test_each_image_is_served_its_own_ztoc(env: dict, tmp_path: Path) -> None:
    """Issue 8.6: layers were shared by digest alone, so the first image to mount a layer
    decided every other image's tree: here a's index says a file is setuid and renames
    another; b, mounted second, must see the layer as b's own zTOC describes it."""
    from soci.artifacts import LocalStore
    from soci.index.model import SociIndex
    from soci.oci.descriptor import Descriptor
    from soci.ztoc import decode, encode

    root = tmp_path / "root"
    index_two_ways(root, env)
    digest = env["layer"]["digest"]
    a_manifest = "sha256:" + hashlib.sha256(
        subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                        f"docker://{env['a']}"], capture_output=True, check=True).stdout
    ).hexdigest()
    with LocalStore(root) as store:
        index = SociIndex.parse(store.content.read_blob(store.mappings.get(a_manifest)))
        genuine = index.blobs[0]
        z = decode(store.content.read_blob(genuine.digest))
        by_name = {e.name: e for e in z.entries}
        by_name["data/f1.bin"].mode |= stat.S_ISUID | 0o111
        by_name["data/f2.bin"].name = "data/evil.bin"
        lie = encode(z)
        index.blobs = [Descriptor(genuine.media_type, store.content.write_blob(lie), len(lie),
                                  genuine.annotations)]
        store.mappings.put(a_manifest, store.content.write_blob(index.encode()))

    with StoreDaemon(root, tmp_path / "mnt") as daemon:
        a_diff = daemon.layer_dir(env["a"], digest) / "diff"
        assert os.stat(a_diff / "data/f1.bin").st_mode & stat.S_ISUID  # a's index, a's tree
        b_diff = daemon.layer_dir(env["b"], digest) / "diff"
        assert stat.S_IMODE(os.stat(b_diff / "data/f1.bin").st_mode) == 0o644
        assert sorted(os.listdir(b_diff / "data")) == sorted(n[5:] for n in FILES)
        for name, data in FILES.items():
            assert (b_diff / name).read_bytes() == data
        assert os.stat(a_diff).st_ino != os.stat(b_diff).st_ino
        served = {(la["image"], la["ztoc"]) for la in status(daemon)}
        assert len(served) == 2 and {image for image, _ in served} == {env["a"], env["b"]}
        b_info = json.loads((daemon.layer_dir(env["b"], digest) / "info").read_text())
        assert b_info["diff-digest"] == "sha256:" + hashlib.sha256(env["tar"]).hexdigest()


def test_a_ztoc_of_another_size_than_its_descriptor_is_refused(env: dict,
                                                               tmp_path: Path) -> None:
    """Issue 8.6: the zTOC blob must be as long as its descriptor in the index says."""
    from soci.artifacts import LocalStore
    from soci.index.model import SociIndex
    from soci.oci.descriptor import Descriptor

    root = tmp_path / "root"
    soci(root, "create", "--min-layer-size", "0", "--span-size", "131072", env["a"])
    a_manifest = "sha256:" + hashlib.sha256(
        subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                        f"docker://{env['a']}"], capture_output=True, check=True).stdout
    ).hexdigest()
    with LocalStore(root) as store:
        index = SociIndex.parse(store.content.read_blob(store.mappings.get(a_manifest)))
        z = index.blobs[0]
        index.blobs = [Descriptor(z.media_type, z.digest, z.size - 1, z.annotations)]
        store.mappings.put(a_manifest, store.content.write_blob(index.encode()))
    with StoreDaemon(root, tmp_path / "mnt") as daemon:
        with pytest.raises(FileNotFoundError):
            os.listdir(daemon.layer_dir(env["a"], env["layer"]["digest"]) / "diff")
        assert "refused" in daemon.logs() and "its index says" in daemon.logs()


def test_status_says_what_the_disk_cache_holds(env: dict, tmp_path: Path) -> None:
    """Issue 8.17: after a restart the status said almost nothing was fetched although the
    disk cache held every span; the whole-blob download was not counted at all; and spans
    evicted from a small disk cache were still reported as held."""
    root = tmp_path / "root"
    soci(root, "create", "--min-layer-size", "0", "--span-size", "131072", env["a"])
    digest, size = env["layer"]["digest"], env["layer"]["size"]
    with StoreDaemon(root, tmp_path / "mnt") as daemon:
        diff = daemon.layer_dir(env["a"], digest) / "diff"
        for name, data in FILES.items():
            assert (diff / name).read_bytes() == data
        first = status(daemon)[0]
        assert first["fetched_fraction"] > 0.9 and first["fetched_bytes"] > 0.9 * size
    with StoreDaemon(root, tmp_path / "mnt") as daemon:
        layer_dir = daemon.layer_dir(env["a"], digest)
        os.listdir(layer_dir / "diff")
        after = status(daemon)[0]
        assert after["fetched_fraction"] == first["fetched_fraction"]
        assert after["fetched_bytes"] == 0
        assert after["spans_held"] == first["spans_held"]
        blob = (layer_dir / "blob").read_bytes()
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == digest
        assert status(daemon)[0]["fetched_bytes"] == size
        with urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics") as resp:
            text = resp.read().decode()
        line = next(x for x in text.splitlines()
                    if x.startswith("soci_layer_fetched_bytes_total{") and digest in x)
        assert float(line.split()[-1]) == size

    small = tmp_path / "small"
    soci(small, "create", "--min-layer-size", "0", "--span-size", "131072", env["a"])
    with StoreDaemon(small, tmp_path / "mnt2", extra_config="[cache]\ndisk_mb = 1\n") as daemon:
        diff = daemon.layer_dir(env["a"], digest) / "diff"
        for name, data in FILES.items():
            assert (diff / name).read_bytes() == data
        daemon.wait_for_span_jobs()  # the disk cache is written after the reads return
        held = sum(p.stat().st_size for p in (small / "cache" / "spans").iterdir())
        layer = status(daemon)[0]
        assert held <= 1 << 20 and layer["fetched_bytes"] > 0.99 * size  # all but the header
        assert layer["fetched_fraction"] <= (1 << 20) / size + 0.05


class _Repeating:
    """A file-like ``size`` bytes long that repeats ``block`` (a big layer without the RAM)."""

    def __init__(self, block: bytes, size: int) -> None:
        self.block, self.size, self.at = block, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.at if n < 0 else min(n, self.size - self.at)
        start = self.at % len(self.block)
        out = (self.block * (2 + n // len(self.block)))[start : start + n]
        self.at += n
        return out


_MEASURE = """
import json, os, sys
from soci.fs.cache import DiskCache, MemoryCache
from soci.fs.spans import SpanManager
from soci.ztoc import decode


def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


layer, ztoc, cache = sys.argv[1:4]
z = decode(open(ztoc, "rb").read())
fd = os.open(layer, os.O_RDONLY)
spans = SpanManager("sha256:" + "0" * 64, z, lambda s, e: os.pread(fd, e - s, s),
                    MemoryCache(512 << 20), DiskCache(cache, 1 << 30), "sha256:" + "1" * 64)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the resident size now
before = kib("VmRSS")
got = [spans.read(int(at), 10).hex() for at in sys.argv[4:]]
print(json.dumps({"spans": spans.spans, "grew_kib": kib("VmHWM") - before, "got": got,
                  "memory_cache": spans.memory.size, "compressed": z.compressed_size}))
"""


def test_a_read_in_a_huge_span_holds_only_what_it_reads(tmp_path: Path) -> None:
    """Issue 8.10: a zTOC with one checkpoint for a whole 200 MB layer made a 10-byte read
    inflate (and copy) most of the span. zTOC checks now cap spans (MAX_SPAN_BYTES), and
    within the cap a span past WHOLE_SPAN_MAX is never held whole: only windows around the
    read are inflated."""
    import gzip

    from soci.fs.spans import SpanManager
    from soci.ztoc import MAX_SPAN_SIZE, build_ztoc, encode

    block = hashlib.shake_256(b"huge span").digest(16 << 10)  # deflate shrinks repeats well
    size = 44 << 20  # one span under the largest span size, well past WHOLE_SPAN_MAX
    layer = tmp_path / "layer.tar.gz"
    with open(layer, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1,
                                                 mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("big.bin")
        info.size = size
        tf.addfile(info, _Repeating(block, size))  # type: ignore[arg-type]
    with open(layer, "rb") as f:
        ztoc = build_ztoc(f, span_size=MAX_SPAN_SIZE).ztoc  # one checkpoint: one huge span
    (tmp_path / "ztoc").write_bytes(encode(ztoc))
    start = next(e.offset for e in ztoc.entries if e.name == "big.bin")
    offsets = [start + 40_000_003, start + 7, start + size - 10]
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(layer), str(tmp_path / "ztoc"),
         str(tmp_path / "cache"), *map(str, offsets)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    print(f"huge span: peak RSS grew {result['grew_kib']} KiB for three 10-byte reads "
          f"({result['compressed']} compressed bytes)")
    assert result["spans"] == 1
    want = [(block * 2)[(at - start) % len(block) :][:10].hex() for at in offsets]
    assert result["got"] == want
    assert result["grew_kib"] < 16 << 10  # the span is 44 MiB; the old code held it twice
    assert result["memory_cache"] <= 3 * SpanManager.WINDOW  # three windows, cached
