"""``soci-snapshotter-grpc`` in tests: a daemon with its own root, socket and config, and a
gRPC client of its snapshots API (what containerd's proxy plugin speaks)."""

from __future__ import annotations

import atexit
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from registryd import free_port
from soci.containerd.api import snapshots_pb2 as pb
from soci.containerd.api import snapshots_pb2_grpc as pb_grpc
from storeenv import is_mounted, unmount

_live: set[SnapshotterDaemon] = set()


class SnapshotterDaemon:
    """The snapshotter on ``root`` listening on ``<root>.sock``; stopped with SIGTERM."""

    def __init__(self, root: Path, *, extra_config: str = "", plain_http: bool = True,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.address = str(root.parent / f"{root.name}-snapshotter.sock")
        self.mountpoint = root / "snapshotter" / "lazy"
        self.config = root.parent / f"{root.name}-snapshotter.toml"
        self.config.write_text(
            f'root = "{root}"\nplain_http = {str(plain_http).lower()}\n'
            "[background_fetch]\ndisable = true\n" + extra_config)
        self.log = root.parent / f"{root.name}-snapshotter.log"
        self.metrics_address = f"127.0.0.1:{free_port()}"
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None

    def _spawn(self) -> int:
        start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from soci.snapshotter.daemon import main; main()",
                 "--config", str(self.config), "--log-level", "debug", "--address",
                 self.address, "--metrics-address", self.metrics_address, *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _live.add(self)
        return start

    def start(self) -> SnapshotterDaemon:
        try:
            start = self._spawn()
            assert self.proc is not None
            deadline = time.monotonic() + 30
            while b"soci-snapshotter-grpc " not in self.log.read_bytes()[start:] \
                    or b"serving" not in self.log.read_bytes()[start:]:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"snapshotter did not start: {self.logs()[-3000:]}")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise
        return self

    def start_refused(self, timeout: float = 60) -> str:
        try:
            start = self._spawn()
            assert self.proc is not None
            code = self.proc.wait(timeout=timeout)
            out = self.log.read_bytes()[start:].decode(errors="replace")
            assert code != 0, f"the snapshotter ran instead of refusing: {out[-3000:]}"
            return out
        finally:
            self.close(keep_mount=True)

    @property
    def stub(self) -> pb_grpc.SnapshotsStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix:{self.address}")
        return pb_grpc.SnapshotsStub(self._channel)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)

    def close(self, keep_mount: bool = False) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.stop()
        finally:
            if not keep_mount and is_mounted(self.mountpoint):
                unmount(self.mountpoint)
            _live.discard(self)

    def __enter__(self) -> SnapshotterDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    # -- the API, as containerd calls it ------------------------------------------------

    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None,
                ) -> list:
        return list(self.stub.Prepare(pb.PrepareSnapshotRequest(
            snapshotter="soci", key=key, parent=parent, labels=labels or {})).mounts)

    def view(self, key: str, parent: str = "") -> list:
        return list(self.stub.View(pb.ViewSnapshotRequest(key=key, parent=parent)).mounts)

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        self.stub.Commit(pb.CommitSnapshotRequest(name=name, key=key, labels=labels or {}))

    def remove(self, key: str) -> None:
        self.stub.Remove(pb.RemoveSnapshotRequest(key=key))

    def stat(self, key: str) -> pb.Info:
        return self.stub.Stat(pb.StatSnapshotRequest(key=key)).info

    def list(self, *filters: str) -> list[pb.Info]:
        return [i for r in self.stub.List(pb.ListSnapshotsRequest(filters=list(filters)))
                for i in r.info]


def mount_command(mounts: list, target: Path) -> list[str]:
    """The mount(8) command that mounts what the snapshotter answered at ``target``."""
    (m,) = mounts
    return ["mount", "-t", m.type, m.source, str(target), "-o", ",".join(m.options)]


@contextlib.contextmanager
def mounted(mounts: list, target: Path):
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(mount_command(mounts, target), check=True, capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False, capture_output=True)


@atexit.register
def _close_forgotten() -> None:
    for daemon in list(_live):
        with contextlib.suppress(Exception):
            daemon.close()
