"""``soci-store MOUNTPOINT``: mount the store, serve until SIGINT/SIGTERM, unmount cleanly.

At start the root is locked (one daemon per root) and made private, and a stale
mount left by a crash (a FUSE mount whose daemon is gone) is detached; a live one
is refused. Files are created with umask 077. Logs are structured (``key=value`` or JSON lines); the
background fetcher fills the rest of each layer after it has been quiet.
"""

from __future__ import annotations

import contextlib
import logging
import os

import click
import pyfuse3

from soci import __version__
from soci.artifacts import LocalStore
from soci.artifacts.store import RootLock, secure_root
from soci.errors import SociError
from soci.fsutil import PRIVATE_UMASK
from soci.registry import CredentialStore
from soci.serve.background import BackgroundFetcher, Prefetcher
from soci.serve.core import serving_core
from soci.serve.fusefs import serve_until_signal
from soci.serve.metrics import serve_http
from soci.serve.mounts import cleanup_stale_mount
from soci.serve.process import sd_notify, setup_logging
from soci.store.config import StoreConfig, load_store_config
from soci.store.credentials import serve_credentials

#: Where /metrics and /status are served unless told otherwise (soci store status reads it).
DEFAULT_METRICS_ADDRESS = "127.0.0.1:8091"

log = logging.getLogger("soci.store")


def serve(mountpoint: str, config: StoreConfig, debug_fuse: bool = False,
          metrics_address: str | None = None, credentials_socket: str | None = None) -> None:
    """Mount and serve until SIGINT/SIGTERM; whatever was set up is torn down on the way out,
    also when a later step of the start fails."""
    with contextlib.ExitStack() as stack:
        # One daemon per root: the lock comes first, so a second daemon touches nothing.
        secure_root(config.root)
        stack.enter_context(RootLock(config.root))
        cleanup_stale_mount(mountpoint)
        os.makedirs(mountpoint, exist_ok=True)
        store = stack.enter_context(LocalStore(config.root))
        keychain = CredentialStore()
        socket_path = credentials_socket or os.path.join(config.root, "credentials.sock")
        stack.callback(serve_credentials(socket_path, keychain).close)
        fs, metrics = serving_core(config, store, keychain)
        manager = fs.manager
        if config.prefetch.enable:
            prefetcher = Prefetcher(manager, config.prefetch.max_concurrency)
            manager.on_mount = prefetcher
            stack.callback(prefetcher.stop)
        options = {"fsname=soci-store", "subtype=soci", "allow_other", "default_permissions"}
        if debug_fuse:
            options.add("debug")
        pyfuse3.init(fs, mountpoint, options)
        stack.callback(pyfuse3.close, unmount=True)
        if not config.background_fetch.disable:
            fetcher = BackgroundFetcher(manager, config.background_fetch.silence_period_msec,
                                        config.background_fetch.fetch_period_msec)
            fetcher.start()
            stack.callback(fetcher.stopped.set)
        if metrics_address:
            http_server = serve_http(metrics_address, metrics, manager,
                                     os.path.abspath(mountpoint))
            if http_server is not None:
                stack.callback(http_server.shutdown)

        def ready() -> None:
            log.info("soci-store %s serving %s (root %s)", __version__, mountpoint,
                     config.root)
            sd_notify(f"READY=1\nSTATUS=serving {mountpoint}")

        stack.callback(sd_notify, "STOPPING=1")

        serve_until_signal(fs, config.release_grace_sec, ready, mountpoint, config.read_ahead_kb)
    log.info("soci-store stopped after %d FUSE operations (%d reads)", fs.ops, fs.reads)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="soci-store")
# A plain string: click.Path would stat the mount point, which blocks on a hung FUSE mount
# before we could probe it with a timeout.
@click.argument("mountpoint", type=str)
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="The local store [default: /var/lib/soci-snapshotter-grpc].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config [default: $SOCI_CONFIG or /etc/soci-snapshotter-grpc/config.toml].")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
@click.option("--log-json", is_flag=True, help="Log JSON lines instead of key=value.")
@click.option("--plain-http", is_flag=True, help="Talk plain HTTP to every registry.")
@click.option("--metrics-address", default=DEFAULT_METRICS_ADDRESS, show_default=True,
              help="host:port for Prometheus /metrics and the JSON /status ('' turns it off).")
@click.option("--credentials-socket", type=click.Path(dir_okay=False), default=None,
              help="Unix socket (root only) for executors to hand over registry credentials "
                   "[default: ROOT/credentials.sock].")
@click.option("--debug-fuse", is_flag=True, hidden=True)
def cli(mountpoint: str, root: str | None, config_path: str | None, log_level: str,
        log_json: bool, plain_http: bool, metrics_address: str,
        credentials_socket: str | None, debug_fuse: bool) -> None:
    """Mount soci's FUSE Additional Layer Store at MOUNTPOINT for podman/containers-storage."""
    setup_logging(log_level, log_json)
    try:
        config = load_store_config(config_path)
        if root is not None:
            config.root = root
        if plain_http:
            config.plain_http = True
        serve(mountpoint, config, debug_fuse, metrics_address, credentials_socket)
    except SociError as e:
        raise click.ClickException(str(e)) from None
    except RuntimeError as e:  # pyfuse3.init failures (no /dev/fuse, busy mountpoint)
        raise click.ClickException(f"cannot mount {mountpoint}: {e}") from None


def main() -> None:
    # Process configuration, set by the program rather than the library: nothing the store
    # writes (decompressed spans of images, zTOCs, its database) is for other users.
    os.umask(PRIVATE_UMASK)
    cli(prog_name="soci-store")
