"""``soci-snapshotter-grpc``: containerd's proxy snapshotter, until SIGINT/SIGTERM.

At start the root is locked (one snapshotter per root; ``soci-store`` may share the root:
it holds a lock of its own), the FUSE mount serving lazy layers is made (a stale one left
by a crash is detached first), directories no snapshot owns are removed, and the lazy
layers of existing snapshots are resolved again in the background. Then containerd's
snapshots API is served on a Unix socket only root can reach.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os

import click
import grpc
import pyfuse3

from soci import __version__
from soci.artifacts import LocalStore
from soci.artifacts.store import RootLock, secure_root
from soci.containerd.api import snapshots_pb2_grpc
from soci.errors import SociError
from soci.fsutil import PRIVATE_DIR, PRIVATE_UMASK, make_dirs
from soci.registry import CredentialStore
from soci.serve.background import BackgroundFetcher, Prefetcher
from soci.serve.core import serving_core
from soci.serve.fusefs import serve_until_signal
from soci.serve.metrics import serve_http
from soci.serve.mounts import cleanup_stale_mount
from soci.serve.process import sd_notify, setup_logging
from soci.snapshotter.config import SnapshotterConfig, load_snapshotter_config
from soci.snapshotter.local import LocalLayers
from soci.snapshotter.remote import RemoteLayers
from soci.snapshotter.service import SnapshotsService
from soci.snapshotter.snapshots import Snapshots

log = logging.getLogger("soci.snapshotter")

LOCK_NAME = "soci-snapshotter-grpc.lock"
#: containerd's own limit on a gRPC message (16 MiB), for a List of many snapshots.
MAX_MESSAGE = 16 << 20


def _listen(address: str, service: SnapshotsService, workers: int) -> grpc.Server:
    """The gRPC server on a fresh Unix socket (a file left there is ours: we hold the lock)."""
    make_dirs(os.path.dirname(os.path.abspath(address)), PRIVATE_DIR)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(address)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="soci-grpc"),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                 ("grpc.max_send_message_length", MAX_MESSAGE)])
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(service, server)
    if server.add_insecure_port(f"unix:{address}") == 0:
        raise SociError(f"cannot listen on {address}")
    os.chmod(address, 0o600)
    server.start()
    return server


def serve(config: SnapshotterConfig, debug_fuse: bool = False) -> None:
    """Serve until SIGINT/SIGTERM; whatever was set up is torn down on the way out, also when
    a later step of the start fails."""
    store_cfg = config.store
    root = store_cfg.root
    with contextlib.ExitStack() as stack:
        secure_root(root)
        stack.enter_context(RootLock(root, LOCK_NAME, "soci-snapshotter-grpc"))
        mountpoint = os.path.join(root, "snapshotter", "lazy")
        make_dirs(os.path.dirname(mountpoint), PRIVATE_DIR)
        cleanup_stale_mount(mountpoint)
        make_dirs(mountpoint, PRIVATE_DIR)
        store = stack.enter_context(LocalStore(root))
        fs, metrics = serving_core(store_cfg, store, CredentialStore())
        manager = fs.manager
        if store_cfg.prefetch.enable:  # before restore(): restored layers prefetch too
            prefetcher = Prefetcher(manager, store_cfg.prefetch.max_concurrency)
            manager.on_mount = prefetcher
            stack.callback(prefetcher.stop)
        options = {"fsname=soci-snapshotter", "subtype=soci", "allow_other",
                   "default_permissions"}
        if debug_fuse:
            options.add("debug")
        pyfuse3.init(fs, mountpoint, options)
        stack.callback(pyfuse3.close, unmount=True)
        lazy = RemoteLayers(manager, mountpoint)
        local = LocalLayers(manager, root, config.parallel)
        stack.callback(local.close)
        snapshots = Snapshots(root, lazy, local)
        stack.callback(snapshots.close)
        removed = snapshots.cleanup()
        if removed:
            log.info("removed %d directories left by an earlier run", removed)
        remotes = [s.remote for s in snapshots.remotes() if s.remote is not None]
        if remotes:
            lazy.restore(remotes)
        if not store_cfg.background_fetch.disable:
            fetcher = BackgroundFetcher(manager, store_cfg.background_fetch.silence_period_msec,
                                        store_cfg.background_fetch.fetch_period_msec)
            fetcher.start()
            stack.callback(fetcher.stopped.set)
        metrics.snapshot_counts = snapshots.counts
        server = _listen(config.address, SnapshotsService(snapshots, metrics), workers=32)
        stack.callback(server.stop, 2)
        if config.metrics_address:
            http_server = serve_http(config.metrics_address, metrics, manager, mountpoint)
            if http_server is not None:
                stack.callback(http_server.shutdown)

        def ready() -> None:
            log.info("soci-snapshotter-grpc %s serving %s (root %s, %d snapshots)", __version__,
                     config.address, root, len(snapshots.meta.all()))
            sd_notify(f"READY=1\nSTATUS=serving {config.address}")

        stack.callback(sd_notify, "STOPPING=1")

        serve_until_signal(fs, store_cfg.release_grace_sec, ready, mountpoint,
                           store_cfg.read_ahead_kb)
    log.info("soci-snapshotter-grpc stopped")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="soci-snapshotter-grpc")
@click.option("--address", default=None,
              help="Unix socket containerd connects to "
                   "[default: /run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock].")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="The local store [default: /var/lib/soci-snapshotter-grpc].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config [default: $SOCI_CONFIG or /etc/soci-snapshotter-grpc/config.toml].")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
@click.option("--log-json", is_flag=True, help="Log JSON lines instead of key=value.")
@click.option("--plain-http", is_flag=True, help="Talk plain HTTP to every registry.")
@click.option("--metrics-address", default=None,
              help="host:port for Prometheus /metrics and JSON /status ('' turns it off) "
                   "[default: 127.0.0.1:8092].")
@click.option("--debug-fuse", is_flag=True, hidden=True)
def cli(address: str | None, root: str | None, config_path: str | None, log_level: str,
        log_json: bool, plain_http: bool, metrics_address: str | None,
        debug_fuse: bool) -> None:
    """containerd's proxy snapshotter: serve layers with a SOCI index lazily."""
    setup_logging(log_level, log_json)
    try:
        config = load_snapshotter_config(config_path)
        if root is not None:
            config.store.root = root
        if address is not None:
            config.address = address
        if metrics_address is not None:
            config.metrics_address = metrics_address
        if plain_http:
            config.store.plain_http = True
        serve(config, debug_fuse)
    except SociError as e:
        raise click.ClickException(str(e)) from None
    except RuntimeError as e:  # pyfuse3.init failures (no /dev/fuse)
        raise click.ClickException(f"cannot mount the lazy layer filesystem: {e}") from None


def main() -> None:
    # As soci-store: nothing the snapshotter writes is for other users, except the snapshot
    # trees themselves, whose modes come from the layers.
    os.umask(PRIVATE_UMASK)
    cli(prog_name="soci-snapshotter-grpc")
