"""soci-snapshotter-grpc's snapshots API, called as containerd calls it, on a real daemon
with real overlay and FUSE mounts and a real registry (no containerd here: see
test_containerd.py for that)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from images import big_file, busybox_layer, files_layer, write_image
from registryd import FaultProxy, Registry, push_layout
from snapshotterenv import SnapshotterDaemon, mounted
from soci.containerd.api import snapshots_pb2 as pb
from soci.image.resolve import chain_ids
from storeenv import is_mounted, soci

FILES = {f"opt/data/blob{i}.bin": big_file(f"s{i}", 4_000_000) for i in range(6)}
FILES["opt/data/motd"] = b"served lazily to containerd\n"
TARGET = "containerd.io/snapshot.ref"


def code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("snapshotter")
    layout = tmp / "img"
    write_image(layout, "v1", [busybox_layer(), files_layer(FILES)])
    with Registry() as reg, FaultProxy(reg.host) as proxy:
        push_layout(layout, reg.host, "app:v1", tag="v1")
        push_layout(layout, reg.host, "other:v1", tag="v1")
        raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                              f"docker://{reg.host}/app:v1"], capture_output=True,
                             check=True).stdout
        config = json.loads(subprocess.run(
            ["skopeo", "inspect", "--config", "--raw", "--tls-verify=false",
             f"docker://{reg.host}/app:v1"], capture_output=True, check=True).stdout)
        manifest = json.loads(raw)
        yield {"tmp": tmp, "host": proxy.host, "proxy": proxy,
               "manifest_digest": "sha256:" + hashlib.sha256(raw).hexdigest(),
               "layers": manifest["layers"], "diff_ids": config["rootfs"]["diff_ids"]}


def layer_labels(world: dict, i: int, repo: str = "app:v1") -> dict[str, str]:
    return {TARGET: chain_ids(world["diff_ids"])[i],
            "containerd.io/snapshot/cri.image-ref": f"{world['host']}/{repo}",
            "containerd.io/snapshot/cri.manifest-digest": world["manifest_digest"],
            "containerd.io/snapshot/cri.layer-digest": world["layers"][i]["digest"]}


def served(world: dict) -> int:
    digest = world["layers"][1]["digest"]
    return sum(n for path, n in world["proxy"].counters.sent.items() if digest in path)


def test_lifecycle_on_real_overlay_mounts(tmp_path: Path) -> None:
    with SnapshotterDaemon(tmp_path / "root") as sn:
        (m,) = sn.prepare("ns/1/base")
        assert m.type == "bind" and "rw" in m.options
        with mounted([m], tmp_path / "a") as a:
            (a / "hello").write_text("base\n")
        sn.commit("base", "ns/1/base", {"keep": "me"})
        info = sn.stat("base")
        assert info.kind == 3 and info.labels["keep"] == "me"
        (m,) = sn.prepare("ns/2/top", "base")
        assert m.type == "overlay"
        with mounted([m], tmp_path / "b") as b:
            assert (b / "hello").read_text() == "base\n"
            (b / "hello").unlink()
            (b / "new").write_text("top\n")
        sn.commit("top", "ns/2/top")
        (v,) = sn.view("ns/3/view", "top")
        assert v.type == "overlay" and "ro" not in v.options  # two lowers, no upper
        with mounted([v], tmp_path / "c") as c:
            assert sorted(os.listdir(c)) == ["new"]
        assert {i.name for i in sn.list("kind==committed")} == {"base", "top"}
        assert [i.name for i in sn.list('labels."keep"==me')] == ["base"]
        assert [i.name for i in sn.list("parent==base", "name==ns/3/view")] == [
            "top", "ns/3/view"]
        usage = sn.stub.Usage(pb.UsageRequest(key="base"))
        assert usage.size > 0 and usage.inodes >= 2
        sn.stub.Update(pb.UpdateSnapshotRequest(
            info=pb.Info(name="base", labels={"new": "1"}),
            update_mask=field_mask(["labels.new"])))
        assert dict(sn.stat("base").labels) == {"keep": "me", "new": "1"}
        sn.remove("ns/3/view")
        sn.remove("top")
        sn.remove("base")
        assert sn.list() == []
        assert os.listdir(tmp_path / "root" / "snapshotter" / "snapshots") == []


def field_mask(paths: list[str]) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=paths)


def test_bad_requests_are_clear_grpc_errors(tmp_path: Path) -> None:
    with SnapshotterDaemon(tmp_path / "root") as sn:
        sn.prepare("a")
        assert code(lambda: sn.prepare("a")) == grpc.StatusCode.ALREADY_EXISTS
        assert code(lambda: sn.prepare("b", "missing")) == grpc.StatusCode.NOT_FOUND
        assert code(lambda: sn.prepare("b", "a")) == grpc.StatusCode.FAILED_PRECONDITION
        assert code(lambda: sn.prepare("")) == grpc.StatusCode.INVALID_ARGUMENT
        assert code(lambda: sn.prepare("x" * 5000)) == grpc.StatusCode.INVALID_ARGUMENT
        assert code(lambda: sn.prepare("c", labels={"k": "v" * 5000})) == \
            grpc.StatusCode.INVALID_ARGUMENT
        assert code(lambda: sn.list('labels."unterminated')) == grpc.StatusCode.INVALID_ARGUMENT
        assert code(lambda: sn.list("name~=(")) == grpc.StatusCode.INVALID_ARGUMENT
        assert code(lambda: sn.stat("nope")) == grpc.StatusCode.NOT_FOUND
        assert code(lambda: sn.commit("a", "a")) == grpc.StatusCode.ALREADY_EXISTS
        sn.view("v")
        assert code(lambda: sn.commit("vc", "v")) == grpc.StatusCode.FAILED_PRECONDITION
        sn.commit("ac", "a")
        sn.prepare("child", "ac")
        assert code(lambda: sn.remove("ac")) == grpc.StatusCode.FAILED_PRECONDITION
        assert code(lambda: sn.remove("nope")) == grpc.StatusCode.NOT_FOUND
        # Nothing was half-made by the refusals.
        assert {i.name for i in sn.list()} == {"ac", "v", "child"}
        assert len(os.listdir(tmp_path / "root" / "snapshotter" / "snapshots")) == 3
        with urllib.request.urlopen(f"http://{sn.metrics_address}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'soci_snapshotter_requests_total{method="prepare",code="ALREADY_EXISTS"} 1' \
            in text, text
        assert 'soci_snapshotter_requests_total{method="prepare",code="NOT_FOUND"} 1' in text
        assert 'soci_snapshots{kind="active"} 1' in text
        assert 'soci_snapshots{kind="committed"} 1' in text


def test_layer_with_an_index_is_committed_lazily(world: dict, tmp_path: Path) -> None:
    root = tmp_path / "root"
    ref = f"{world['host']}/app:v1"
    soci(root, "create", ref)
    chains = chain_ids(world["diff_ids"])
    with SnapshotterDaemon(root) as sn:
        # The small base layer has no zTOC: the snapshotter fetches and unpacks it itself
        # (containerd would otherwise fetch every later layer too, the lazy one included).
        assert code(lambda: sn.prepare("extract-0", "", layer_labels(world, 0))) == \
            grpc.StatusCode.ALREADY_EXISTS
        base = sn.stat(chains[0])
        assert base.kind == 3 and "containerd.io/snapshot/remote" not in base.labels
        assert "fetched and unpacked" in sn.logs()
        before = served(world)
        assert code(lambda: sn.prepare("extract-1", chains[0], layer_labels(world, 1))) == \
            grpc.StatusCode.ALREADY_EXISTS
        # containerd then finds the target by this very filter.
        (found,) = sn.list(f'labels."{TARGET}"=={chains[1]},parent=="{chains[0]}"')
        assert found.kind == 3 and found.labels["containerd.io/snapshot/remote"] == "soci"
        with pytest.raises(grpc.RpcError):
            sn.stat("extract-1")  # nothing left under the extract key
        (m,) = sn.prepare("container", chains[1])
        with mounted([m], tmp_path / "ctr") as ctr:
            assert (ctr / "opt/data/motd").read_bytes() == FILES["opt/data/motd"]
            assert (ctr / "opt/data/blob3.bin").read_bytes()[:4096] == \
                FILES["opt/data/blob3.bin"][:4096]
            assert (ctr / "bin/busybox").exists()
        assert 0 < served(world) - before < world["layers"][1]["size"] / 2
        # Preparing the same layer again (another namespace) finds it at once.
        assert code(lambda: sn.prepare("extract-1b", chains[0], layer_labels(world, 1))) == \
            grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("bad", [
    {"containerd.io/snapshot/cri.image-ref": "../../etc/passwd"},
    {"containerd.io/snapshot/cri.image-ref": "a ref/with spaces:v1"},
    {"containerd.io/snapshot/cri.layer-digest": "sha256:../../../../etc"},
    {"containerd.io/snapshot/cri.manifest-digest": "md5:abc"},
    {"containerd.io/snapshot/remote/soci.index.digest": "sha256:" + "0" * 64},
    {"containerd.io/snapshot/cri.layer-digest": "sha256:" + "1" * 64},
])
def test_hostile_labels_leave_the_layer_to_containerd(world: dict, tmp_path: Path,
                                                      bad: dict[str, str]) -> None:
    root = tmp_path / "root"
    soci(root, "create", f"{world['host']}/app:v1")
    with SnapshotterDaemon(root) as sn:
        sn.prepare("base")
        sn.commit("base0", "base")
        labels = {**layer_labels(world, 1), **bad}
        (m,) = sn.prepare("extract", "base0", labels)  # an ordinary snapshot: no error
        assert m.type == "overlay"
        assert sn.stat("extract").kind == 2
        assert "served lazily as snapshot" not in sn.logs()
        assert not (tmp_path / "etc").exists()


def test_restart_after_sigkill_keeps_snapshots_and_lazy_layers(world: dict,
                                                               tmp_path: Path) -> None:
    root = tmp_path / "root"
    soci(root, "create", f"{world['host']}/app:v1")
    chains = chain_ids(world["diff_ids"])
    sn = SnapshotterDaemon(root).start()
    try:
        sn.prepare("b")
        sn.commit(chains[0], "b")
        code(lambda: sn.prepare("extract-1", chains[0], layer_labels(world, 1)))
        sn.prepare("container", chains[1])
        assert sn.stop(signal.SIGKILL) == -signal.SIGKILL
        # A crash mid-prepare leaves a directory no snapshot owns.
        (root / "snapshotter" / "snapshots" / "99").mkdir()
        sn.start()
        assert {i.name for i in sn.list()} == {chains[0], chains[1], "container"}
        assert not (root / "snapshotter" / "snapshots" / "99").exists()
        assert "cleaning up a stale mount" in sn.logs()
        (m,) = sn.stub.Mounts(pb.MountsRequest(key="container")).mounts
        with mounted([m], tmp_path / "ctr") as ctr:
            assert (ctr / "opt/data/motd").read_bytes() == FILES["opt/data/motd"]
    finally:
        sn.close()
    assert not is_mounted(root / "snapshotter" / "lazy")


def test_second_daemon_on_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with SnapshotterDaemon(root) as first:
        out = SnapshotterDaemon(root).start_refused()
        assert f"another soci-snapshotter-grpc (pid {first.proc.pid})" in out, out


def test_a_named_index_is_used_for_that_pull_only(world: dict, tmp_path: Path) -> None:
    """An index a client names (soci.index.digest) serves the layer, but is not remembered
    as the repository's index: a later pull naming none finds what the registry lists."""
    registry = world["host"]
    push_layout(world["tmp"] / "img", world["host"], "named:v1", tag="v1")
    ref = f"{world['host']}/named:v1"
    build = tmp_path / "build"
    soci(build, "create", ref)
    soci(build, "push", ref)
    index = soci(build, "index", "list", "-q").split()[0]
    # The registry keeps the index but stops listing it (its referrers tag is deleted).
    tag_url = (f"http://{registry}/v2/named/manifests/"
               f"sha256-{world['manifest_digest'][7:]}")
    head = urllib.request.Request(tag_url, method="HEAD", headers={
        "Accept": "application/vnd.oci.image.index.v1+json"})
    with urllib.request.urlopen(head, timeout=10) as r:
        listing = r.headers["Docker-Content-Digest"]
    urllib.request.urlopen(urllib.request.Request(
        f"http://{registry}/v2/named/manifests/{listing}", method="DELETE"), timeout=10)
    chains = chain_ids(world["diff_ids"])
    with SnapshotterDaemon(tmp_path / "root") as sn:
        sn.prepare("b")
        sn.commit(chains[0], "b")
        named = {**layer_labels(world, 1, "named:v1"),
                 "containerd.io/snapshot/remote/soci.index.digest": index}
        assert code(lambda: sn.prepare("x1", chains[0], named)) == \
            grpc.StatusCode.ALREADY_EXISTS
        sn.remove(chains[1])
        (m,) = sn.prepare("x2", chains[0], layer_labels(world, 1, "named:v1"))
        assert m.type == "overlay" and sn.stat("x2").kind == 2  # pulled by containerd
