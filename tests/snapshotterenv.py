"""``soci-snapshotter-grpc`` in tests: a daemon with its own root, socket and config, and a
gRPC client of its snapshots API (what containerd's proxy plugin speaks)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import grpc

from daemonenv import Daemon
from soci.containerd.api import snapshots_pb2 as pb
from soci.containerd.api import snapshots_pb2_grpc as pb_grpc


class SnapshotterDaemon(Daemon):
    """The snapshotter on ``root`` listening on ``<root>.sock``; stopped with SIGTERM."""

    what = "the snapshotter"
    ready_timeout = 30.0

    def __init__(self, root: Path, *, extra_config: str = "", plain_http: bool = True,
                 extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(root.parent / f"{root.name}-snapshotter.log",
                         root / "snapshotter" / "lazy")
        self.root, self.extra_args = root, extra_args
        self.address = str(root.parent / f"{root.name}-snapshotter.sock")
        self.config = root.parent / f"{root.name}-snapshotter.toml"
        self.config.write_text(
            f'root = "{root}"\nplain_http = {str(plain_http).lower()}\n'
            "[background_fetch]\ndisable = true\n" + extra_config)
        self._channel: grpc.Channel | None = None

    def argv(self) -> list[str]:
        return [sys.executable, "-c", "from soci.snapshotter.daemon import main; main()",
                "--config", str(self.config), "--log-level", "debug", "--address",
                self.address, "--metrics-address", self.metrics_address, *self.extra_args]

    def ready(self, output: bytes) -> bool:
        return b"soci-snapshotter-grpc " in output and b"serving" in output

    def before_stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    @property
    def stub(self) -> pb_grpc.SnapshotsStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix:{self.address}")
        return pb_grpc.SnapshotsStub(self._channel)

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
