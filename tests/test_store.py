"""soci-store as a real FUSE daemon: the layer tree, lazy reads, faults, restarts, overlay."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from images import big_file, files_layer, write_image
from layers import Node, tar_with_tarfile
from registryd import FaultProxy, Registry, push_layout
from storeenv import StoreDaemon, is_mounted, soci

BIG = {f"data/big{i}.bin": big_file(f"s{i}", 2_500_000) for i in range(8)}


def rich_layer() -> bytes:
    nodes = [Node("data", "dir", mode=0o755), Node("etc", "dir", mode=0o750)]
    nodes += [Node(name, data=data, mode=0o644) for name, data in BIG.items()]
    nodes += [
        Node("etc/config", data=b"key=value\n", mode=0o600, mtime=1_700_000_000.25,
             pax={"SCHILY.xattr.user.color": "blue", "mtime": "1700000000.25"}),
        Node("etc/hard", "hardlink", target="etc/config"),
        Node("etc/link", "symlink", target="../data/big1.bin"),
        Node("etc/pipe", "fifo"),
        Node("etc/null", "char"),
        Node("bin", "dir"),
        Node("bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755),
        Node("etc/.wh.gone", data=b""),
        Node("opq", "dir"),
        Node("opq/.wh..wh..opq", data=b""),
        Node("opq/kept", data=b"kept\n"),
    ]
    return tar_with_tarfile(nodes, tarfile.PAX_FORMAT)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("store")
    tar = rich_layer()
    with Registry() as reg:
        write_image(tmp / "img", "v1", [files_layer({"small/file": b"small\n"}), tar])
        push_layout(tmp / "img", reg.host, "rich:v1", tag="v1")
        ref = f"{reg.host}/rich:v1"
        root = tmp / "root"
        soci(root, "create", "--span-size", "1048576", ref)  # the small layer gets no zTOC
        manifest = json.loads(subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
            capture_output=True, check=True).stdout)
        yield {"tmp": tmp, "registry": reg, "ref": ref, "root": root, "tar": tar,
               "small": manifest["layers"][0], "layer": manifest["layers"][1]}


@pytest.fixture(scope="module")
def store(env: dict) -> Iterator[StoreDaemon]:
    with StoreDaemon(env["root"], env["tmp"] / "mnt") as daemon:
        yield daemon


def test_tree_matches_the_layer(env: dict, store: StoreDaemon) -> None:
    diff = store.layer_dir(env["ref"], env["layer"]["digest"]) / "diff"
    with tarfile.open(fileobj=__import__("io").BytesIO(env["tar"])) as tf:
        members = {m.name: m for m in tf.getmembers()}
    for name in ("etc/config", "bin/tool", "data/big3.bin"):
        st, m = os.lstat(diff / name), members[name]
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == m.mode
        assert (st.st_uid, st.st_gid, st.st_size) == (m.uid, m.gid, m.size)
    assert os.lstat(diff / "etc/config").st_mtime_ns == 1_700_000_000_250_000_000
    assert os.lstat(diff / "etc").st_mode & 0o7777 == 0o750
    # hard links share the inode; symlinks, fifos and devices are what they say
    assert os.lstat(diff / "etc/hard").st_ino == os.lstat(diff / "etc/config").st_ino
    assert os.lstat(diff / "etc/config").st_nlink == 2
    assert os.readlink(diff / "etc/link") == "../data/big1.bin"
    assert (diff / "etc/link").read_bytes() == BIG["data/big1.bin"]
    assert stat.S_ISFIFO(os.lstat(diff / "etc/pipe").st_mode)
    null = os.lstat(diff / "etc/null")
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1
    # PAX xattrs, whiteouts and opaque directories as overlayfs wants them
    assert os.getxattr(diff / "etc/config", "user.color") == b"blue"
    assert "user.color" in os.listxattr(diff / "etc/config")
    gone = os.lstat(diff / "etc/gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert not os.path.lexists(diff / "etc/.wh.gone")
    assert os.getxattr(diff / "opq", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(diff / "opq")) == ["kept"]
    assert sorted(os.listdir(diff)) == ["bin", "data", "etc", "opq"]
    assert sorted(os.listdir(diff / "etc")) == ["config", "gone", "hard", "link", "null", "pipe"]
    with pytest.raises(OSError) as e:
        os.getxattr(diff / "etc/hard", "user.nope")
    assert e.value.errno == errno.ENODATA


def test_reads_fetch_only_what_they_need(env: dict, store: StoreDaemon) -> None:
    diff = store.layer_dir(env["ref"], env["layer"]["digest"]) / "diff"
    assert (diff / "etc/config").read_bytes() == b"key=value\n"
    store.wait_for_span_jobs()  # the disk cache is written after the read returns
    cached = sum(p.stat().st_size for p in (env["root"] / "cache" / "spans").iterdir())
    assert 0 < cached < len(env["tar"]) / 3  # the disk cache holds inflated spans
    for name, data in BIG.items():
        assert (diff / name).read_bytes() == data
    assert (diff / "bin/tool").read_bytes() == b"#!/bin/sh\necho tool\n"


def test_concurrent_readers(env: dict, store: StoreDaemon) -> None:
    diff = store.layer_dir(env["ref"], env["layer"]["digest"]) / "diff"
    rng = random.Random(7)
    jobs = [(name, rng.randrange(0, 2_400_000), rng.choice([1, 4096, 65536, 300_000]))
            for name in BIG for _ in range(8)]

    def read(job: tuple[str, int, int]) -> bool:
        name, off, size = job
        fd = os.open(diff / name, os.O_RDONLY)
        try:
            return os.pread(fd, size, off) == BIG[name][off : off + size]
        finally:
            os.close(fd)

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(read, jobs))


def test_info_blob_use_release_and_missing_ztoc(env: dict, store: StoreDaemon) -> None:
    layer_dir = store.layer_dir(env["ref"], env["layer"]["digest"])
    info = json.loads((layer_dir / "info").read_text())
    assert info["compressed-diff-digest"] == env["layer"]["digest"]
    assert info["compressed-size"] == env["layer"]["size"]
    assert info["diff-digest"] == "sha256:" + hashlib.sha256(env["tar"]).hexdigest()
    assert info["compression"] == 2
    blob = (layer_dir / "blob").read_bytes()
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == env["layer"]["digest"]
    with pytest.raises(FileNotFoundError):
        open(layer_dir / "use", "w").close()
    with pytest.raises(FileNotFoundError):
        os.rmdir(layer_dir)
    assert "in use (users=1)" in store.logs() and "released (users=0)" in store.logs()
    # A layer without a zTOC, and a digest that is not in the image: not here.
    for digest in (env["small"]["digest"], "sha256:" + "1" * 64):
        with pytest.raises(FileNotFoundError):
            os.stat(store.layer_dir(env["ref"], digest) / "diff")
    with pytest.raises(OSError):
        open(layer_dir / "diff" / "etc" / "config", "w").close()


def test_overlay_sees_whiteouts_and_opaque_dirs(env: dict, store: StoreDaemon,
                                                 tmp_path: Path) -> None:
    diff = store.layer_dir(env["ref"], env["layer"]["digest"]) / "diff"
    lower = tmp_path / "lower"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "gone").write_text("should be hidden")
    (lower / "opq").mkdir()
    (lower / "opq" / "old").write_text("hidden by the opaque dir")
    (lower / "keep").write_text("visible")
    upper, work, merged = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    # containers/storage reaches the store through a symlink (digests hold ':', overlay's
    # lowerdir separator); so do we.
    link = tmp_path / "layer"
    link.symlink_to(diff)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={link}:{lower},upperdir={upper},workdir={work}", str(merged)],
                   check=True, capture_output=True)
    try:
        assert not (merged / "etc" / "gone").exists()
        assert sorted(os.listdir(merged / "opq")) == ["kept"]
        assert (merged / "keep").read_text() == "visible"
        assert (merged / "data" / "big5.bin").read_bytes() == BIG["data/big5.bin"]
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_faults_never_serve_wrong_bytes(env: dict, tmp_path: Path) -> None:
    with FaultProxy(env["registry"].host) as proxy:
        ref = f"{proxy.host}/rich:v1"
        root = tmp_path / "root"
        soci(root, "create", "--span-size", "1048576", ref)
        with StoreDaemon(root, tmp_path / "mnt") as daemon:
            diff = daemon.layer_dir(ref, env["layer"]["digest"]) / "diff"
            assert sorted(os.listdir(diff)) == ["bin", "data", "etc", "opq"]
            proxy.corrupt(1, match="/blobs/")
            assert (diff / "data/big0.bin").read_bytes() == BIG["data/big0.bin"]
            proxy.drop(1, match="/blobs/")
            assert (diff / "data/big2.bin").read_bytes() == BIG["data/big2.bin"]
            proxy.corrupt(10, match="/blobs/")
            with pytest.raises(OSError) as e:
                (diff / "data/big6.bin").read_bytes()
            assert e.value.errno == errno.EIO
            proxy.clear()
            assert (diff / "data/big6.bin").read_bytes() == BIG["data/big6.bin"]
            assert "failed verification" in daemon.logs()
            assert daemon.proc is not None and daemon.proc.poll() is None


def test_restart_after_sigkill_reuses_the_disk_cache(env: dict, tmp_path: Path) -> None:
    with FaultProxy(env["registry"].host) as proxy:
        ref = f"{proxy.host}/rich:v1"
        root = tmp_path / "root"
        soci(root, "create", "--span-size", "1048576", ref)
        with StoreDaemon(root, tmp_path / "mnt") as first:
            diff = first.layer_dir(ref, env["layer"]["digest"]) / "diff"
            for name, data in BIG.items():
                assert (diff / name).read_bytes() == data
            first.wait_for_span_jobs()  # the disk cache is written after the reads return
            first.stop(signal.SIGKILL)
            assert is_mounted(tmp_path / "mnt")  # left stale by the crash
            # A torn write in the cache (the crash could have caused one) is never served.
            victim = sorted((root / "cache" / "spans").iterdir())[0]
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
            with pytest.raises(OSError):
                os.listdir(tmp_path / "mnt")
            before = len(proxy.counters.seen)
            with StoreDaemon(root, tmp_path / "mnt") as second:
                diff = second.layer_dir(ref, env["layer"]["digest"]) / "diff"
                for name, data in BIG.items():
                    assert (diff / name).read_bytes() == data
                assert "stale mount" in second.logs()
                assert "failed verification; dropped" in second.logs()
        layer_gets = [s for s in proxy.counters.seen[before:]
                      if env["layer"]["digest"] in s and s.startswith("GET")]
        assert len(layer_gets) == 1  # only the torn span was fetched again
    assert not is_mounted(tmp_path / "mnt")


def test_background_fetch_fills_the_layer(env: dict, tmp_path: Path) -> None:
    root = tmp_path / "root"
    soci(root, "create", "--span-size", "1048576", env["ref"])
    with StoreDaemon(root, tmp_path / "mnt", background=True) as daemon:
        diff = daemon.layer_dir(env["ref"], env["layer"]["digest"]) / "diff"
        assert (diff / "etc/config").read_bytes() == b"key=value\n"
        spans = root / "cache" / "spans"
        deadline = __import__("time").monotonic() + 30
        while "fully fetched in the background" not in daemon.logs():
            assert __import__("time").monotonic() < deadline, daemon.logs()[-2000:]
            __import__("time").sleep(0.1)
        daemon.wait_for_span_jobs()  # the last spans' disk writes
        total = sum(p.stat().st_size for p in spans.iterdir())
        assert total >= env["layer"]["size"] * 0.9


def test_layers_are_found_by_toc_digest_too(env: dict, store: StoreDaemon) -> None:
    """Newer containers/storage asks by TOC digest (the zTOC's digest for a SOCI layer)."""
    ztoc = json.loads(subprocess.run(
        [sys.executable, "-m", "soci.cli", "--root", str(env["root"]), "ztoc", "ls", "--json"],
        capture_output=True, check=True).stdout)
    ztoc_digest = next(z["digest"] for z in ztoc if z["layer_digest"] == env["layer"]["digest"])
    by_toc = store.layer_dir(env["ref"], ztoc_digest)
    by_blob = store.layer_dir(env["ref"], env["layer"]["digest"])
    assert (by_toc / "diff" / "etc" / "config").read_bytes() == b"key=value\n"
    assert os.stat(by_toc / "diff").st_ino == os.stat(by_blob / "diff").st_ino  # one layer
    info = json.loads((by_toc / "info").read_text())
    diff_id = "sha256:" + hashlib.sha256(env["tar"]).hexdigest()
    assert info["toc-digest"] == ztoc_digest and info["diff-size"] == -1
    assert info["flags"] == {"expected-layer-diffid": diff_id}
    assert info["compressed-diff-digest"] == env["layer"]["digest"]
    assert "toc-digest" not in json.loads((by_blob / "info").read_text())
    with pytest.raises(FileNotFoundError):
        open(by_toc / "use", "w").close()


def test_metrics_and_status(env: dict, store: StoreDaemon) -> None:
    diff = store.layer_dir(env["ref"], env["layer"]["digest"]) / "diff"
    assert (diff / "data/big7.bin").read_bytes() == BIG["data/big7.bin"]
    import urllib.request

    text = urllib.request.urlopen(f"http://{store.metrics_address}/metrics").read().decode()
    digest = env["layer"]["digest"]
    fetched = [line for line in text.splitlines()
               if line.startswith(f'soci_layer_fetched_bytes_total{{layer="{digest}",')]
    assert fetched and float(fetched[0].split()[-1]) > 0
    assert 'soci_fuse_operations_total{op="read"}' in text
    assert 'soci_fuse_operation_seconds_bucket{op="read",le="+Inf"}' in text
    assert 'soci_span_cache_hits_total{cache="memory"}' in text
    assert "soci_span_verification_failures_total" in text
    out = subprocess.run([sys.executable, "-m", "soci.cli", "store", "status", "--address",
                          store.metrics_address], capture_output=True, text=True, check=True)
    assert env["ref"] in out.stdout and digest[7:19] in out.stdout
    doc = json.loads(subprocess.run(
        [sys.executable, "-m", "soci.cli", "store", "status", "--json", "--address",
         store.metrics_address], capture_output=True, check=True).stdout)
    layer = next(la for la in doc["layers"] if la["layer"] == digest)
    assert 0 < layer["fetched_fraction"] <= 1 and layer["files"] > 10
    proc = subprocess.run([sys.executable, "-m", "soci.cli", "store", "status", "--address",
                           "127.0.0.1:1"], capture_output=True, text=True)
    assert proc.returncode == 1 and "no soci-store status" in proc.stderr


def test_hostile_ztoc_is_refused_and_others_keep_serving(env: dict, tmp_path: Path) -> None:
    from soci.artifacts import LocalStore
    from soci.index.model import SociIndex
    from soci.oci.descriptor import Descriptor
    from soci.ztoc import decode, encode

    root = tmp_path / "root"
    soci(root, "create", "--span-size", "1048576", env["ref"])
    other_layout = tmp_path / "other"
    write_image(other_layout, "v1", [files_layer({"ok/file": b"still serving\n" * 1000})])
    push_layout(other_layout, env["registry"].host, "other:v1", tag="v1")
    other_ref = f"{env['registry'].host}/other:v1"
    soci(root, "create", "--min-layer-size", "0", other_ref)
    other_layer = json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{other_ref}"],
        capture_output=True, check=True).stdout)["layers"][0]["digest"]

    # Rewrite the rich image's index so its zTOC claims a file beyond the end of the layer.
    with LocalStore(root) as store:
        manifest_digest, index_digest = next(
            (m, i) for m, i in store.mappings.items()
            if SociIndex.parse(store.content.read_blob(i)).ztocs()[0].annotations[
                "com.amazon.soci.image-layer-digest"] == env["layer"]["digest"])
        index = SociIndex.parse(store.content.read_blob(index_digest))
        good = index.blobs[0]
        z = decode(store.content.read_blob(good.digest))
        z.entries[3].offset = z.uncompressed_size + 4096
        bad = encode(z)
        bad_digest = store.content.write_blob(bad)
        index.blobs = [Descriptor(good.media_type, bad_digest, len(bad), good.annotations)]
        store.mappings.put(manifest_digest, store.content.write_blob(index.encode()))

    with StoreDaemon(root, tmp_path / "mnt") as daemon:
        with pytest.raises(FileNotFoundError):
            os.listdir(daemon.layer_dir(env["ref"], env["layer"]["digest"]) / "diff")
        assert "refused" in daemon.logs() and "outside the layer" in daemon.logs()
        diff = daemon.layer_dir(other_ref, other_layer) / "diff"
        assert (diff / "ok" / "file").read_bytes() == b"still serving\n" * 1000
        assert daemon.proc is not None and daemon.proc.poll() is None


def test_systemd_readiness_notification(env: dict, tmp_path: Path) -> None:
    import socket as socketlib

    path = str(tmp_path / "notify.sock")
    listener = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(20)
    # A root of its own: the module's store holds env["root"] (one daemon per root).
    root = tmp_path / "root"
    soci(root, "create", "--span-size", "1048576", env["ref"])
    daemon = StoreDaemon(root, tmp_path / "mnt", env={**os.environ, "NOTIFY_SOCKET": path})
    with daemon, listener:
        message = listener.recv(4096).decode()
        assert message.startswith("READY=1")
        daemon.stop()
        assert listener.recv(4096).decode() == "STOPPING=1"
    unit = (Path(__file__).parent.parent / "packaging" / "soci-store.service").read_text()
    assert "Type=notify" in unit and "soci-store" in unit
