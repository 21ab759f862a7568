"""soci-store's life as a daemon: restarts, refusing to share a mount or a root, bounded
metrics connections and a private store root. Real daemons, real FUSE mounts."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from images import big_file, files_layer, write_image
from registryd import Registry, push_layout
from storeenv import StoreDaemon, is_mounted, soci

SHADOW = b"root:$6$secret-hash-of-the-image:19000:0:99999:7:::\n"
FILES = {"etc/shadow": (SHADOW, 0o600), "data/big.bin": big_file("daemon", 1_500_000),
         "data/motd": b"served\n"}
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("daemon")
    with Registry() as reg:
        write_image(tmp / "img", "v1", [files_layer(FILES)])
        push_layout(tmp / "img", reg.host, "daemon:v1", tag="v1")
        ref = f"{reg.host}/daemon:v1"
        manifest = json.loads(subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
            capture_output=True, check=True).stdout)
        yield {"ref": ref, "layer": manifest["layers"][0]["digest"]}


def new_root(image: dict, root: Path) -> Path:
    soci(root, "create", "--min-layer-size", "0", "--span-size", "262144", image["ref"])
    return root


def motd(daemon: StoreDaemon, image: dict) -> bytes:
    return (daemon.layer_dir(image["ref"], image["layer"]) / "diff/data/motd").read_bytes()


def error_line(output: str) -> str:
    """The one ``Error: ...`` line a refusing daemon prints (and no traceback)."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, output
    return errors[0]


def test_restart_after_sigkill_with_nothing_holding_the_mount(image: dict,
                                                              tmp_path: Path) -> None:
    """The plain crash: no container, nothing open. Once the kernel no longer answers for
    the dead mount from its caches (stat gives ENOTCONN), a restart must still mount."""
    root = new_root(image, tmp_path / "root")
    mnt = tmp_path / "mnt"
    with StoreDaemon(root, mnt) as first:
        assert motd(first, image) == FILES["data/motd"]
        first.stop(signal.SIGKILL)
        assert is_mounted(mnt)
        deadline = time.monotonic() + 60
        while True:  # until the attribute cache of the mount's root has expired
            try:
                os.stat(mnt)
            except OSError as e:
                assert e.errno == errno.ENOTCONN, e
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with StoreDaemon(root, mnt) as second:
            assert "stale mount" in second.logs()
            assert motd(second, image) == FILES["data/motd"]
    assert not is_mounted(mnt)


def test_a_live_mount_is_refused_not_unmounted(image: dict, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with StoreDaemon(new_root(image, tmp_path / "root1"), mnt) as first:
        assert motd(first, image) == FILES["data/motd"]
        out = StoreDaemon(new_root(image, tmp_path / "root2"), mnt).start_refused()
        line = error_line(out)
        assert "already mounted" in line and str(mnt) in line, line
        assert "cleaning up" not in out
        # the first daemon still serves its mount
        assert is_mounted(mnt) and first.proc is not None and first.proc.poll() is None
        assert (first.layer_dir(image["ref"], image["layer"]) / "diff/data/big.bin"
                ).read_bytes() == FILES["data/big.bin"]


def test_a_hung_mount_is_refused_not_unmounted(image: dict, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with StoreDaemon(new_root(image, tmp_path / "root1"), mnt) as first:
        assert first.proc is not None
        assert motd(first, image) == FILES["data/motd"]
        os.kill(first.proc.pid, signal.SIGSTOP)
        try:
            out = StoreDaemon(new_root(image, tmp_path / "root2"), mnt).start_refused()
        finally:
            os.kill(first.proc.pid, signal.SIGCONT)
        line = error_line(out)
        assert "does not answer" in line, line
        assert is_mounted(mnt)
        assert motd(first, image) == FILES["data/motd"]


def test_one_daemon_per_root(image: dict, tmp_path: Path) -> None:
    root = new_root(image, tmp_path / "root")
    with StoreDaemon(root, tmp_path / "mnt1") as first:
        assert first.proc is not None
        sock = root / "credentials.sock"
        inode = os.stat(sock).st_ino
        out = StoreDaemon(root, tmp_path / "mnt2").start_refused()
        line = error_line(out)
        assert f"another soci-store (pid {first.proc.pid}) is using the root" in line, line
        assert not is_mounted(tmp_path / "mnt2")
        # nothing of the first daemon was taken over: its socket answers, its mount serves
        assert os.stat(sock).st_ino == inode
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(30)
            conn.connect(str(sock))
            conn.sendall(b"{not json")
            conn.shutdown(socket.SHUT_WR)
            assert "error" in json.loads(conn.recv(4096))
        assert motd(first, image) == FILES["data/motd"]
        lock = root / "soci-store.lock"
        assert lock.read_text().strip() == str(first.proc.pid)
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
        # the soci CLI still uses the root while the daemon runs
        assert image["layer"] in soci(root, "ztoc", "ls", "--no-trunc")


def test_a_live_credentials_socket_is_not_taken_over(image: dict, tmp_path: Path) -> None:
    root1 = new_root(image, tmp_path / "root1")
    sock = root1 / "credentials.sock"
    with StoreDaemon(root1, tmp_path / "mnt1") as first:
        inode = os.stat(sock).st_ino
        second = StoreDaemon(new_root(image, tmp_path / "root2"), tmp_path / "mnt2",
                             extra_args=("--credentials-socket", str(sock)))
        line = error_line(second.start_refused())
        assert f"another soci-store serves credentials at {sock}" in line, line
        assert not is_mounted(tmp_path / "mnt2")
        assert os.stat(sock).st_ino == inode
        assert motd(first, image) == FILES["data/motd"]


def test_idle_metrics_connections_hold_no_threads(image: dict, tmp_path: Path) -> None:
    with StoreDaemon(new_root(image, tmp_path / "root"), tmp_path / "mnt") as daemon:
        assert daemon.proc is not None
        tasks = Path(f"/proc/{daemon.proc.pid}/task")
        url = f"http://{daemon.metrics_address}/metrics"
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200
        before = len(list(tasks.iterdir()))
        host, port = daemon.metrics_address.rsplit(":", 1)
        idle = []
        try:
            for _ in range(200):  # more than the server keeps open at once
                conn = socket.create_connection((host, int(port)), timeout=30)
                idle.append(conn)
                conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
            # answered while all of them are open (and, being later, after they were taken)
            with urllib.request.urlopen(url, timeout=30) as resp:
                assert b"soci_fuse_operations_total" in resp.read()
            held = len(list(tasks.iterdir()))
            assert held <= before + 4, (before, held)
            # an idle connection is cut off by the server (evicted or timed out), not kept
            with contextlib.suppress(ConnectionResetError):
                assert idle[0].recv(4096) == b""
        finally:
            for conn in idle:
                conn.close()
        with urllib.request.urlopen(f"http://{daemon.metrics_address}/status",
                                    timeout=30) as resp:
            assert json.loads(resp.read())["mountpoint"] == str(tmp_path / "mnt")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory anyone may enter (pytest's tmp_path is private to root already, which
    would hide what the store root itself lets others do)."""
    base = Path(tempfile.mkdtemp(prefix="soci-perm-"))
    try:
        base.chmod(0o755)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*NOBODY, *argv], capture_output=True, timeout=60, check=False)


def _loose(root: Path) -> list[tuple[str, str]]:
    """Paths under ``root`` (itself included) that group or others may use, with their
    modes. A running daemon renames its disk-cache files into place as the walk goes, so a
    path that is gone by the time it is looked at is skipped."""
    loose = []
    for p in [root, *root.rglob("*")]:
        try:
            mode = p.lstat().st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISLNK(mode) and mode & 0o077:
            loose.append((str(p), oct(stat.S_IMODE(mode))))
    return loose


def test_store_root_is_private_to_its_owner(image: dict, open_dir: Path) -> None:
    root = new_root(image, open_dir / "root")
    with StoreDaemon(root, open_dir / "mnt") as daemon:
        diff = daemon.layer_dir(image["ref"], image["layer"]) / "diff"
        assert (diff / "etc/shadow").read_bytes() == SHADOW
        assert (diff / "data/big.bin").read_bytes() == FILES["data/big.bin"]
        # while it runs: the lock and the socket are there too
        assert _loose(root) == []
    spans = root / "cache" / "spans"
    assert any(spans.iterdir())
    assert _loose(root) == []
    assert as_nobody("true").returncode == 0  # the probe itself works
    assert as_nobody("ls", str(spans)).returncode != 0
    assert as_nobody("cat", str(root / "content" / "oci-layout")).returncode != 0
    blob = next((root / "content" / "blobs" / "sha256").iterdir())
    assert as_nobody("cat", str(blob)).returncode != 0


def test_loose_root_is_tightened_and_foreign_root_refused(image: dict, open_dir: Path) -> None:
    root = new_root(image, open_dir / "root")
    root.chmod(0o755)  # as an older soci left it
    with StoreDaemon(root, open_dir / "mnt") as daemon:
        assert "accessible to group/others" in daemon.logs()
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert motd(daemon, image) == FILES["data/motd"]
    os.chown(root, 65534, 65534)
    try:
        line = error_line(StoreDaemon(root, open_dir / "mnt").start_refused())
        assert "owned by uid 65534" in line, line
        assert not is_mounted(open_dir / "mnt")
    finally:
        os.chown(root, 0, 0)


def test_systemd_unit_restarts_and_keeps_the_root_private() -> None:
    unit = (Path(__file__).parent.parent / "packaging" / "soci-store.service").read_text()
    settings = [line.strip() for line in unit.splitlines() if not line.startswith("#")]
    assert "UMask=0077" in settings
    assert "Restart=on-failure" in settings
    # `mkdir -p` fails on the dead mount a crash leaves: the daemon makes the mount point
    assert not [line for line in settings if line.startswith("ExecStartPre=") and "mkdir" in line]
