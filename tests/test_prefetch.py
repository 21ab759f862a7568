"""Prefetch artifacts (upstream SOCI v0.13+): built by create/convert, listed, pushed, and
used by soci-store as soon as a layer is mounted.

Span numbers are computed here independently of soci: the layers are uncompressed tars cut
into 64 KiB spans, so a file's spans are (its data offset, from Python's tarfile) // 65536
up to (offset + size) // 65536, as upstream maps them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from images import big_file, write_image
from layers import Node, tar_with_tarfile
from registryd import FaultProxy, Registry, push_layout
from storeenv import StoreDaemon

PREFETCH = "application/vnd.amazon.soci.prefetch.v1+json"
LAYER_ANN = "com.amazon.soci.image-layer-digest"
SPAN = 65536

LOWER = [
    Node("bin", "dir", mode=0o755),
    Node("bin/sh", "symlink", target="/usr/bin/busybox"),
    Node("data", "dir", mode=0o755),
    Node("data/a.bin", data=big_file("a", 200_000)),
    Node("data/gone.bin", data=big_file("gone", 100_000)),
    Node("data/old.bin", data=big_file("old", 100_000)),
    Node("usr", "dir", mode=0o755),
    Node("usr/bin", "dir", mode=0o755),
    Node("usr/bin/busybox", data=big_file("busybox", 300_000), mode=0o755),
]
UPPER = [
    Node("data", "dir", mode=0o755),
    Node("data/.wh.gone.bin", data=b""),
    Node("data/b.bin", data=big_file("b", 250_000)),
    Node("data/old.bin", data=big_file("new", 150_000)),
]


def soci(root: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "soci.cli", "--plain-http", "--root",
                           str(root), *args], capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def spans_of(layer_tar: bytes, name: str) -> tuple[int, int]:
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as tf:
        member = tf.getmember(name)
        return member.offset_data // SPAN, (member.offset_data + member.size) // SPAN


def artifact_json(ranges: list[tuple[int, int]]) -> bytes:
    """Upstream's bytes, written out by hand: Go's field order, no spaces, priority 0 left
    out. ``ranges`` must already be sorted and merged."""
    items = ",".join(f'{{"start_span":{a},"end_span":{b}}}' for a, b in ranges)
    return f'{{"version":"1.0","prefetch_spans":[{items}]}}'.encode()


def blob(root: Path, digest: str) -> bytes:
    return (root / "content" / "blobs" / "sha256" / digest[7:]).read_bytes()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def image(tmp_path: Path) -> dict:
    lower, upper = tar_with_tarfile(LOWER, tarfile.PAX_FORMAT), tar_with_tarfile(
        UPPER, tarfile.PAX_FORMAT)
    written = write_image(tmp_path / "img", "v1", [lower, upper], compress="none")
    return {"layout": tmp_path / "img", "manifest": written.manifest_digest,
            "lower": lower, "upper": upper,
            "digests": [la.digest for la in written.layers]}


def index_of(root: Path, manifest_digest: str) -> tuple[str, bytes]:
    digest = (root / "indexes" / manifest_digest[7:]).read_text().strip()
    return digest, blob(root, digest)


# -- the artifact format ----------------------------------------------------------------


def test_artifact_bytes_and_strict_parsing() -> None:
    from soci.prefetch import (
        MAX_ARTIFACT_BYTES,
        PrefetchArtifact,
        PrefetchFormatError,
        PrefetchSpan,
        merge_spans,
        parse_artifact,
    )

    spans = merge_spans([PrefetchSpan(50, 55), PrefetchSpan(10, 12), PrefetchSpan(13, 15),
                         PrefetchSpan(11, 11), PrefetchSpan(54, 60, 3)])
    assert spans == (PrefetchSpan(10, 15), PrefetchSpan(50, 60))
    art = PrefetchArtifact((*spans, PrefetchSpan(70, 70, 2)))
    data = art.encode()
    assert data == (b'{"version":"1.0","prefetch_spans":[{"start_span":10,"end_span":15},'
                    b'{"start_span":50,"end_span":60},'
                    b'{"start_span":70,"end_span":70,"priority":2}]}')
    assert parse_artifact(data, 71) == art and art.total_spans == 18
    # Go's encoder order is what is read back too, and unknown fields are ignored as Go does.
    assert parse_artifact(b'{"prefetch_spans":[{"end_span":1,"start_span":0,"x":1}],'
                          b'"version":"1.0"}').spans == (PrefetchSpan(0, 1),)

    hostile = {
        b"not json": "not valid JSON",
        b"[]": "not a JSON object",
        b'{"version":"2.0","prefetch_spans":[{"start_span":0,"end_span":0}]}': "version",
        b'{"version":"1.0","prefetch_spans":[]}': "empty",
        b'{"version":"1.0","prefetch_spans":[{"start_span":5,"end_span":4}]}': "from 5 to 4",
        b'{"version":"1.0","prefetch_spans":[{"start_span":-1,"end_span":4}]}': "from -1",
        b'{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":71}]}': "71 spans",
        b'{"version":"1.0","prefetch_spans":[{"start_span":true,"end_span":1}]}': "integer",
        b'{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":1e3}]}': "integer",
        b'{"version":"1.0","prefetch_spans":{"start_span":0}}': "must be a list",
        b'{"version":"1.0","prefetch_spans":' + b"[" * 5000 + b"]" * 5000 + b"}": "JSON",
        b" " * (MAX_ARTIFACT_BYTES + 1): "bytes (at most",
    }
    for raw, why in hostile.items():
        with pytest.raises(PrefetchFormatError, match=why.replace("(", r"\(")):
            parse_artifact(raw, 71)


# -- soci create / convert ----------------------------------------------------------------


def test_create_writes_upstreams_artifacts_after_the_ztocs(tmp_path: Path, image: dict) -> None:
    root = tmp_path / "root"
    files = tmp_path / "files.json"
    files.write_text(json.dumps(["  /usr/bin/busybox ", "", "data/gone.bin", "/nope"]))
    out = soci(root, "create", "--min-layer-size", "0", "--span-size", str(SPAN),
               "--prefetch-file", "/data/a.bin", "--prefetch-file", "data/./old.bin",
               "--prefetch-files-json", str(files), f"oci:{image['layout']}:v1")
    # A whited-out file and a missing one are named, once each; the rest is built.
    assert "prefetch file data/gone.bin not found" in out.stderr
    assert "prefetch file nope not found" in out.stderr
    lower, upper = image["digests"]
    index_digest, raw = index_of(root, image["manifest"])
    doc = json.loads(raw)
    assert raw == json.dumps(doc, separators=(",", ":")).encode()  # Go's order, no spaces
    layers = doc["layers"]
    assert [la["mediaType"] for la in layers] == ["application/octet-stream"] * 2 + [PREFETCH] * 2
    assert [la["annotations"][LAYER_ANN] for la in layers] == [lower, upper, lower, upper]

    a, busybox = spans_of(image["lower"], "data/a.bin"), spans_of(image["lower"],
                                                                   "usr/bin/busybox")
    assert a[1] + 1 < busybox[0]  # two separate ranges
    expected = {lower: artifact_json([a, busybox]),
                upper: artifact_json([spans_of(image["upper"], "data/old.bin")])}
    for desc in layers[2:]:
        data = expected[desc["annotations"][LAYER_ANN]]
        # Exactly upstream's descriptor: media type, digest, size, the one annotation.
        assert desc == {"mediaType": PREFETCH, "digest": sha(data), "size": len(data),
                        "annotations": {LAYER_ANN: desc["annotations"][LAYER_ANN]}}
        assert blob(root, desc["digest"]) == data
    assert f"Created prefetch artifact for layer {lower}: {sha(expected[lower])}" in out.stdout

    listed = json.loads(soci(root, "prefetch", "ls", "--json").stdout)
    total = a[1] - a[0] + 1 + busybox[1] - busybox[0] + 1
    assert {(e["digest"], e["layer_digest"], e["total_spans"], tuple(e["indexes"]))
            for e in listed} == {(sha(expected[lower]), lower, total, (index_digest,)),
                                 (sha(expected[upper]), upper, 1 + spans_of(
                                     image["upper"], "data/old.bin")[1] - spans_of(
                                     image["upper"], "data/old.bin")[0], (index_digest,))}
    info = soci(root, "prefetch", "info", sha(expected[lower])).stdout
    assert f"Layer Digest:  {lower}" in info and "Span Ranges:   2" in info
    assert f"[1] StartSpan: {busybox[0]}, EndSpan: {busybox[1]}" in info
    assert f"Total spans to prefetch: {total}" in info
    bad = soci(root, "prefetch", "info", lower, ok=False)  # a layer, not an artifact
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1
    assert "not a prefetch artifact" in bad.stderr

    # Without prefetch flags the index is exactly what it was before prefetch existed.
    plain = tmp_path / "plain"
    soci(plain, "create", "--min-layer-size", "0", "--span-size", str(SPAN),
         f"oci:{image['layout']}:v1")
    _, plain_raw = index_of(plain, image["manifest"])
    plain_doc = json.loads(plain_raw)
    assert plain_doc["layers"] == layers[:2]
    assert json.loads(soci(plain, "prefetch", "ls", "--json").stdout) == []

    # Removing the index removes the artifacts no other index lists, with its zTOCs.
    rm = soci(root, "index", "rm", index_digest).stdout
    assert f"removed {index_digest} and 2 zTOCs\n" in rm
    assert "removed 2 prefetch artifacts no index lists" in rm
    for data in expected.values():
        assert not (root / "content" / "blobs" / "sha256" / sha(data)[7:]).exists()
    assert json.loads(soci(root, "prefetch", "ls", "--json").stdout) == []


def test_index_rm_keeps_shared_artifacts_and_cleans_up_once(tmp_path: Path,
                                                            image: dict) -> None:
    """Two indexes of one image share the artifact for data/a.bin. Removing one keeps it;
    removing both in one command removes it; a digest given twice is removed once; a
    missing digest after a removed one fails, yet the removed one's artifacts still go."""
    root = tmp_path / "root"
    ref = f"oci:{image['layout']}:v1"
    base = ("create", "--min-layer-size", "0", "--span-size", str(SPAN),
            "--prefetch-file", "/data/a.bin")

    def create(*more: str) -> tuple[str, set[str]]:
        soci(root, *base, *more, ref)
        digest, raw = index_of(root, image["manifest"])
        return digest, {la["digest"] for la in json.loads(raw)["layers"]
                        if la["mediaType"] == PREFETCH}

    def present(digest: str) -> bool:
        return (root / "content" / "blobs" / "sha256" / digest[7:]).exists()

    a, a_arts = create()
    b, b_arts = create("--prefetch-file", "/data/old.bin")
    shared = sha(artifact_json([spans_of(image["lower"], "data/a.bin")]))
    assert a != b and a_arts == {shared} and shared in b_arts and len(b_arts) == 2

    # One of the two removed: the shared artifact stays, listed by the other alone.
    rm = soci(root, "index", "rm", a[:19]).stdout
    assert rm == f"removed {a}\n"  # zTOCs and artifact still used by b
    assert present(shared)
    listed = json.loads(soci(root, "prefetch", "ls", "--json").stdout)
    assert {e["digest"]: e["indexes"] for e in listed} == {d: [b] for d in b_arts}

    # Both in one command (the first given twice): every artifact goes.
    assert create() == (a, a_arts)
    rm = soci(root, "index", "rm", a, b, a[7:19]).stdout
    assert rm.splitlines() == [f"removed {a}", f"removed {b} and 2 zTOCs",
                               "removed 2 prefetch artifacts no index lists"]
    assert not any(present(d) for d in a_arts | b_arts)
    assert json.loads(soci(root, "prefetch", "ls", "--json").stdout) == []

    # A missing digest after a removed one: one-line error, the first's artifact gone.
    assert create() == (a, a_arts)
    missing = "sha256:" + "0" * 64
    out = soci(root, "index", "rm", a, missing, ok=False)
    assert out.returncode != 0 and out.stderr.count("\n") == 1
    assert f"no SOCI index {missing}" in out.stderr
    assert out.stdout.splitlines() == [f"removed {a} and 2 zTOCs",
                                       "removed 1 prefetch artifacts no index lists"]
    assert not present(shared) and not present(a)


def test_prefetch_entrypoint_follows_path_and_links(tmp_path: Path, image: dict) -> None:
    """The test image's config runs ``/bin/sh`` (PATH /usr/bin:/bin); /bin/sh is a symlink
    to /usr/bin/busybox, whose spans are what the artifact names."""
    root = tmp_path / "root"
    soci(root, "create", "--min-layer-size", "0", "--span-size", str(SPAN),
         "--prefetch-entrypoint", f"oci:{image['layout']}:v1")
    _, raw = index_of(root, image["manifest"])
    prefetches = [la for la in json.loads(raw)["layers"] if la["mediaType"] == PREFETCH]
    data = artifact_json([spans_of(image["lower"], "usr/bin/busybox")])
    assert prefetches == [{"mediaType": PREFETCH, "digest": sha(data), "size": len(data),
                           "annotations": {LAYER_ANN: image["digests"][0]}}]


def test_entrypoint_lookup() -> None:
    from soci.prefetch import MergedLayers, entrypoint_path
    from soci.ztoc import build_ztoc

    def ztoc(nodes: list[Node]):
        return build_ztoc(io.BytesIO(tar_with_tarfile(nodes, tarfile.PAX_FORMAT)),
                          span_size=SPAN).ztoc

    merged = MergedLayers([
        ("l0", ztoc([Node("usr", "dir"), Node("usr/bin", "dir"),
                     Node("usr/bin/app", data=b"x" * 10), Node("bin", "symlink", target="usr/bin"),
                     Node("opt", "dir"), Node("opt/run", data=b"y"),
                     Node("loop", "symlink", target="loop")])),
        ("l1", ztoc([Node("opt", "dir"), Node("opt/.wh..wh..opq"), Node("opt/other", data=b"z"),
                     Node("srv", "dir"), Node("srv/link", "hardlink", target="usr/bin/app")])),
    ])

    def run(**config):
        return entrypoint_path({"config": config}, merged)

    assert run(Entrypoint=["app", "-x"], Env=["PATH=/nope:/bin"]) == "/usr/bin/app"
    assert run(Cmd=["app"]) == "/usr/bin/app"  # the default PATH
    assert run(Entrypoint=["./link"], WorkingDir="/srv") == "/usr/bin/app"
    assert run(Entrypoint=["/opt/run"]) is None  # hidden by the opaque directory above
    assert run(Entrypoint=["/loop"]) is None
    assert run(Entrypoint=[], Cmd=[]) is None
    assert entrypoint_path({"config": None}, merged) is None


def test_convert_carries_the_artifact(tmp_path: Path, image: dict) -> None:
    root = tmp_path / "root"
    out_layout = tmp_path / "out"
    soci(root, "convert", "--min-layer-size", "0", "--span-size", str(SPAN),
         "--prefetch-file", "/data/b.bin", f"oci:{image['layout']}:v1", f"oci:{out_layout}:v2")
    top = json.loads((out_layout / "index.json").read_text())
    index_list = json.loads(blob_in(out_layout, top["manifests"][0]["digest"]))
    soci_desc = next(m for m in index_list["manifests"]
                     if m.get("artifactType") == "application/vnd.amazon.soci.index.v2+json")
    index = json.loads(blob_in(out_layout, soci_desc["digest"]))
    data = artifact_json([spans_of(image["upper"], "data/b.bin")])
    assert index["layers"][2:] == [{"mediaType": PREFETCH, "digest": sha(data),
                                    "size": len(data),
                                    "annotations": {LAYER_ANN: image["digests"][1]}}]
    assert blob_in(out_layout, sha(data)) == data


def blob_in(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest[7:]).read_bytes()


def test_bad_prefetch_files_json(tmp_path: Path, image: dict) -> None:
    for text, why in [("{", "not valid JSON"), ('{"a":1}', "array of strings"),
                      ("[1]", "array of strings")]:
        files = tmp_path / "f.json"
        files.write_text(text)
        proc = soci(tmp_path / "root", "create", "--prefetch-files-json", str(files),
                    f"oci:{image['layout']}:v1", ok=False)
        assert proc.returncode != 0 and why in proc.stderr and proc.stderr.count("\n") == 1
    proc = soci(tmp_path / "root", "create", "--prefetch-files-json", str(tmp_path / "none"),
                f"oci:{image['layout']}:v1", ok=False)
    assert proc.returncode != 0 and "No such file" in proc.stderr


# -- soci-store ---------------------------------------------------------------------------

FILES = {f"app/f{i}.bin": big_file(f"pf{i}", 300_000) for i in range(6)}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A one-layer gzip image in a registry, indexed with 64 KiB spans and a prefetch
    artifact for app/f4.bin, pushed."""
    tmp = tmp_path_factory.mktemp("prefetch")
    nodes = [Node("app", "dir", mode=0o755)]
    nodes += [Node(name, data=data) for name, data in FILES.items()]
    with Registry() as reg:
        written = write_image(tmp / "img", "v1", [tar_with_tarfile(nodes, tarfile.PAX_FORMAT)])
        push_layout(tmp / "img", reg.host, "pf:v1", tag="v1")
        ref = f"{reg.host}/pf:v1"
        builder = tmp / "builder"
        soci(builder, "create", "--min-layer-size", "0", "--span-size", str(SPAN),
             "--prefetch-file", "/app/f4.bin", ref)
        soci(builder, "push", ref)
        index_digest = (builder / "indexes" / written.manifest_digest[7:]).read_text().strip()
        index = json.loads(blob(builder, index_digest))
        artifact = json.loads(blob(builder, index["layers"][1]["digest"]))
        ranges = artifact["prefetch_spans"]
        yield {"ref": ref, "layer": written.layers[0].digest, "builder": builder,
               "diff_id": written.layers[0].diff_id,
               "manifest": written.manifest_digest, "index": index,
               "count": sum(r["end_span"] - r["start_span"] + 1 for r in ranges)}


def layer_status(daemon) -> dict:
    with urllib.request.urlopen(f"http://{daemon.metrics_address}/status") as resp:
        layers = json.loads(resp.read())["layers"]
    assert len(layers) == 1
    return layers[0]


def prefetched(daemon) -> int:
    with urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics") as resp:
        text = resp.read().decode()
    line = next(x for x in text.splitlines()
                if x.startswith("soci_layer_prefetched_spans_total{"))
    return int(float(line.split()[-1]))


def wait_until(check, daemon) -> None:
    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, daemon.logs()[-3000:]
        time.sleep(0.05)


def test_enabled_prefetch_fetches_the_files_spans_at_mount(served: dict, tmp_path: Path) -> None:
    """A fresh store: the index comes from the registry (referrers), the artifact too, and
    the spans of app/f4.bin are on disk before anything is read."""
    assert served["count"] >= 3  # a 300 KB file over gzip spans of 64 KiB and more
    with StoreDaemon(tmp_path / "root", tmp_path / "mnt",
                     extra_config="[prefetch]\nenable = true\nmax_concurrency = 1\n") as daemon:
        diff = daemon.layer_dir(served["ref"], served["layer"]) / "diff"
        assert sorted(p.name for p in (diff / "app").iterdir()) == sorted(
            n.split("/")[1] for n in FILES)  # a lookup mounts the layer; nothing is read
        wait_until(lambda: prefetched(daemon) == served["count"], daemon)
        status = layer_status(daemon)
        assert status["spans_held"] == served["count"]
        fetched = status["fetched_bytes"]
        assert (diff / "app/f4.bin").read_bytes() == FILES["app/f4.bin"]
        assert layer_status(daemon)["fetched_bytes"] == fetched  # served from the prefetch
        assert f"prefetched {served['count']} spans" in daemon.logs()


def test_disabled_prefetch_fetches_nothing(served: dict, tmp_path: Path) -> None:
    with StoreDaemon(tmp_path / "root", tmp_path / "mnt") as daemon:
        diff = daemon.layer_dir(served["ref"], served["layer"]) / "diff"
        assert len(list((diff / "app").iterdir())) == len(FILES)
        assert prefetched(daemon) == 0 and layer_status(daemon)["spans_held"] == 0
        assert (diff / "app/f4.bin").read_bytes() == FILES["app/f4.bin"]
        assert "prefetched" not in daemon.logs() and "prefetch artifact" not in daemon.logs()


def test_the_snapshotter_prefetches_too(served: dict, tmp_path: Path) -> None:
    """soci-snapshotter-grpc (containerd's side) shares the serving core: preparing the
    layer mounts it lazily, and its artifact's spans follow before any read."""
    import grpc

    from snapshotterenv import SnapshotterDaemon
    from soci.image.resolve import chain_ids

    labels = {"containerd.io/snapshot.ref": chain_ids([served["diff_id"]])[0],
              "containerd.io/snapshot/cri.image-ref": served["ref"],
              "containerd.io/snapshot/cri.manifest-digest": served["manifest"],
              "containerd.io/snapshot/cri.layer-digest": served["layer"]}
    with SnapshotterDaemon(tmp_path / "root",
                           extra_config="[prefetch]\nenable = true\n") as sn:
        with pytest.raises(grpc.RpcError) as e:
            sn.prepare("extract-0", "", labels)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS  # committed lazily
        wait_until(lambda: prefetched(sn) == served["count"], sn)
        assert layer_status(sn)["spans_held"] == served["count"]


MANY = 6  # layers mounted at once: the old thread per layer (and one more) made 12 threads


def prefetched_by_layer(daemon) -> dict[str, int]:
    with urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics") as resp:
        text = resp.read().decode()
    return {line.split('layer="', 1)[1].split('"', 1)[0]: int(float(line.split()[-1]))
            for line in text.splitlines()
            if line.startswith("soci_layer_prefetched_spans_total{")}


def layers_with_artifacts(tmp_path: Path, reg: Registry, proxy: FaultProxy,
                          count: int) -> tuple[str, dict[str, int]]:
    """An image of ``count`` gzip layers (l<i>/p.bin, 1 MB each) pushed to ``reg`` and
    indexed with an artifact naming each layer's file: the ref through ``proxy``, and the
    number of spans each layer's artifact names."""
    tars = [tar_with_tarfile([Node(f"l{i}", "dir", mode=0o755),
                              Node(f"l{i}/p.bin", data=big_file(f"many{i}", 1_000_000))],
                             tarfile.PAX_FORMAT) for i in range(count)]
    written = write_image(tmp_path / "img", "v1", tars)
    push_layout(tmp_path / "img", reg.host, "many:v1", tag="v1")
    ref = f"{proxy.host}/many:v1"
    builder = tmp_path / "builder"
    files = [arg for i in range(count) for arg in ("--prefetch-file", f"/l{i}/p.bin")]
    soci(builder, "create", "--min-layer-size", "0", "--span-size", str(SPAN), *files, ref)
    soci(builder, "push", ref)
    index_digest = (builder / "indexes" / written.manifest_digest[7:]).read_text().strip()
    expected = {}
    for desc in json.loads(blob(builder, index_digest))["layers"]:
        if desc["mediaType"] == PREFETCH:
            ranges = json.loads(blob(builder, desc["digest"]))["prefetch_spans"]
            expected[desc["annotations"][LAYER_ANN]] = sum(
                r["end_span"] - r["start_span"] + 1 for r in ranges)
    assert list(expected) == [la.digest for la in written.layers]
    return ref, expected


def test_many_layers_prefetch_on_a_bounded_pool(tmp_path: Path) -> None:
    """Six layers, each with an artifact, mounted at once: every named span is prefetched,
    by a pool of Prefetcher.UNLIMITED_THREADS threads (default max_concurrency, no limit),
    not by threads that grow with the layers."""
    from soci.serve.background import Prefetcher

    bound = Prefetcher.UNLIMITED_THREADS
    assert bound < 2 * MANY
    with Registry() as reg, FaultProxy(reg.host) as proxy:
        ref, expected = layers_with_artifacts(tmp_path, reg, proxy, MANY)
        with StoreDaemon(tmp_path / "root", tmp_path / "mnt",
                         extra_config="[prefetch]\nenable = true\n") as daemon:
            assert daemon.proc is not None
            tasks = Path(f"/proc/{daemon.proc.pid}/task")

            def pool_threads() -> int:
                """The daemon's threads named soci-prefetch-N by the pool."""
                names = []
                for task in tasks.iterdir():
                    with contextlib.suppress(OSError):  # a thread that just ended
                        names.append((task / "comm").read_text())
                return sum(n.startswith("soci-prefetch-") for n in names)

            assert pool_threads() == 0  # no pool before a layer has an artifact
            most = 0
            done = threading.Event()

            def watch() -> None:
                nonlocal most
                while not done.is_set():
                    most = max(most, pool_threads())
                    time.sleep(0.005)

            # The first two span requests of each layer are held a while, so that layers
            # are prefetching together: the old thread per layer (and its helper) had all
            # 2 * MANY requests held at once; the pool holds at most ``bound``.
            for digest in expected:
                proxy.stall(2, 1.5, match=f"GET /v2/many/blobs/{digest}")
            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                with ThreadPoolExecutor(MANY) as pool:  # all mounted at once
                    listed = list(pool.map(
                        lambda d: sorted(p.name for p in (daemon.layer_dir(ref, d) / "diff")
                                         .iterdir()), expected))
                assert listed == [[f"l{i}"] for i in range(MANY)]
                wait_until(lambda: prefetched_by_layer(daemon) == expected, daemon)
            finally:
                done.set()
                watcher.join()
            assert proxy.injected("stall") == 2 * MANY
            assert proxy.counters.most_stalled <= bound, proxy.counters.most_stalled
            assert most == bound == pool_threads()  # the pool stays, waiting for work
            logs = daemon.logs()
            for digest, count in expected.items():
                assert f"layer {digest}: prefetched {count} spans named by" in logs
            assert "prefetch spans failed" not in logs



def test_failed_spans_are_counted_once_per_layer(tmp_path: Path) -> None:
    """Two layers; two span requests of the first answered 404: that layer logs one line
    for both (the rest prefetched, the two read lazily later), the second is whole."""
    with Registry() as reg, FaultProxy(reg.host) as proxy:
        ref, expected = layers_with_artifacts(tmp_path, reg, proxy, 2)
        first, second = expected
        with StoreDaemon(tmp_path / "root", tmp_path / "mnt",
                         extra_config="[prefetch]\nenable = true\n") as daemon:
            proxy.fail(2, 404, match=f"GET /v2/many/blobs/{first}")
            for i, digest in enumerate(expected):  # mounts the layers, reads nothing
                assert (daemon.layer_dir(ref, digest) / "diff" / f"l{i}").is_dir()
            wait_until(lambda: prefetched_by_layer(daemon) == {
                first: expected[first] - 2, second: expected[second]}, daemon)
            wait_until(lambda: f"layer {first}: prefetched" in daemon.logs(), daemon)
            assert proxy.injected("status") == 2
            logs = daemon.logs()
            failed = [x for x in logs.splitlines() if "prefetch spans failed" in x]
            assert len(failed) == 1 and f"layer {first}: 2 of {expected[first]} " in failed[0]
            assert "first: span " in failed[0]
            assert f"layer {first}: prefetched {expected[first] - 2} spans named by" in logs
            assert f"layer {second}: prefetched {expected[second]} spans named by" in logs
            data = (daemon.layer_dir(ref, first) / "diff" / "l0" / "p.bin").read_bytes()
            assert data == big_file("many0", 1_000_000)

def _tamper(served: dict, root: Path, desc: dict, data: bytes | None) -> None:
    """Copy the builder's store to ``root`` with the index's prefetch descriptor replaced by
    ``desc`` (and ``data`` stored at its digest's path, right or wrong)."""
    from soci.artifacts import LocalStore

    subprocess.run(["cp", "-a", str(served["builder"]), str(root)], check=True)
    index = dict(served["index"])
    index["layers"] = [served["index"]["layers"][0], desc]
    raw = json.dumps(index, separators=(",", ":")).encode()
    with LocalStore(root) as store:
        digest = store.content.write_blob(raw)
        store.mappings.put(served["manifest"], digest)
        if data is not None:
            path = store.content.blob_path(desc["digest"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def _desc(data: bytes, layer: str, **over) -> dict:
    return {"mediaType": PREFETCH, "digest": sha(data), "size": len(data),
            "annotations": {LAYER_ANN: layer}, **over}


@pytest.mark.parametrize("case", ["junk", "out-of-range", "huge", "wrong-digest"])
def test_hostile_artifacts_are_refused_and_the_layer_served(served: dict, tmp_path: Path,
                                                            case: str) -> None:
    layer = served["layer"]
    junk = b"this is not json at all"
    far = b'{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":99999}]}'
    good = blob(served["builder"], served["index"]["layers"][1]["digest"])
    desc, data, why = {
        "junk": (_desc(junk, layer), junk, "not valid JSON"),
        "out-of-range": (_desc(far, layer), far, "ends at span 99999"),
        "huge": (_desc(good, layer, size=1 << 30), None, "bytes (at most"),
        "wrong-digest": (_desc(good, layer), b"x" * len(good), ", got sha256:"),
    }[case]
    root = tmp_path / "root"
    _tamper(served, root, desc, data)
    with StoreDaemon(root, tmp_path / "mnt",
                     extra_config="[prefetch]\nenable = true\n") as daemon:
        diff = daemon.layer_dir(served["ref"], layer) / "diff"
        assert len(list((diff / "app").iterdir())) == len(FILES)
        wait_until(lambda: "refused" in daemon.logs(), daemon)
        line = next(x for x in daemon.logs().splitlines() if "refused" in x)
        assert f"prefetch artifact {desc['digest']} refused" in line and why in line, line
        for name, content in FILES.items():  # lazily, all of it
            assert (diff / name).read_bytes() == content
        assert prefetched(daemon) == 0


# -- configuration (both daemons read soci.serve.config) -----------------------------------


def test_prefetch_config(tmp_path: Path) -> None:
    from soci.errors import SociError
    from soci.serve.config import load_serve_config
    from soci.snapshotter.config import load_snapshotter_config

    path = tmp_path / "config.toml"
    path.write_text("")
    cfg = load_serve_config(str(path))
    assert (cfg.prefetch.enable, cfg.prefetch.max_concurrency) == (False, 0)  # upstream's
    path.write_text("[prefetch]\nenable = true\nmax_concurrency = 10\n")
    assert load_serve_config(str(path)).prefetch.max_concurrency == 10
    assert load_snapshotter_config(str(path)).store.prefetch.enable
    path.write_text("[prefetch]\nenable = true\nmax_concurrency = -1\n")  # upstream: no limit
    assert load_serve_config(str(path)).prefetch.max_concurrency == 0
    for text, why in [("[prefetch]\nenable = 'yes'\n", "enable must be a boolean"),
                      ("[prefetch]\nenabel = true\n", "enable")]:
        path.write_text(text)
        with pytest.raises(SociError, match=why):
            load_serve_config(str(path))
