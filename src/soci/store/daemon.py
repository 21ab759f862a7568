"""``soci-store MOUNTPOINT``: mount the store, serve until SIGINT/SIGTERM, unmount cleanly.

At start a stale mount left by a crash (a FUSE mount whose daemon is gone) is
detached first. Logs are structured (``key=value`` or JSON lines); the
background fetcher fills the rest of each layer after it has been quiet.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import click
import pyfuse3
import trio

from soci import __version__
from soci.artifacts import LocalStore
from soci.errors import SociError
from soci.fs.cache import DiskCache, MemoryCache
from soci.registry import CredentialStore, RegistryClient
from soci.serve.layers import LayerManager
from soci.serve.metrics import Metrics, serve_http
from soci.store.config import StoreConfig, load_store_config
from soci.store.credentials import serve_credentials
from soci.store.fs import StoreFS

#: Where /metrics and /status are served unless told otherwise (soci store status reads it).
DEFAULT_METRICS_ADDRESS = "127.0.0.1:8091"

log = logging.getLogger("soci.store")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": self.formatTime(record), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if as_json else logging.Formatter(
        "time=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state, when started by it; otherwise nothing."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as e:
        log.warning("sd_notify %s failed: %s", state, e)


def cleanup_stale_mount(mountpoint: str) -> None:
    """Detach whatever is mounted at ``mountpoint`` (a crashed daemon leaves ENOTCONN)."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mounts") as f:
        mounted = any(line.split()[1] == target for line in f if len(line.split()) > 1)
    if not mounted:
        try:
            os.stat(target)
            return
        except OSError:
            pass  # ENOTCONN: a dead FUSE mount not listed by path
    log.warning("cleaning up a stale mount at %s", target)
    for command in (["fusermount3", "-u", "-z", target], ["umount", "-l", target]):
        try:
            if subprocess.run(command, capture_output=True, timeout=30).returncode == 0:
                return
        except (OSError, subprocess.TimeoutExpired):
            continue
    raise SociError(f"cannot clean up the stale mount at {target}")


class BackgroundFetcher(threading.Thread):
    """Fetches the spans no one has read yet, one at a time, in layers that have gone quiet."""

    def __init__(self, manager: LayerManager, config: StoreConfig) -> None:
        super().__init__(name="soci-background-fetch", daemon=True)
        self.manager = manager
        self.silence = config.background_fetch.silence_period_msec / 1000
        self.period = config.background_fetch.fetch_period_msec / 1000
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.period):
            for layer in self.manager.layers():
                if time.monotonic() - layer.spans.last_access < self.silence:
                    continue
                missing = layer.spans.missing_spans()
                if not missing:
                    continue
                try:
                    layer.spans.prefetch(missing[0])
                except SociError as e:
                    log.warning("background fetch of layer %s: %s", layer.digest, e)
                except Exception:
                    log.exception("background fetch of layer %s failed", layer.digest)
                if len(missing) == 1:
                    log.info("layer %s: fully fetched in the background", layer.digest)
                break


def serve(mountpoint: str, config: StoreConfig, debug_fuse: bool = False,
          metrics_address: str | None = None, credentials_socket: str | None = None) -> None:
    os.makedirs(mountpoint, exist_ok=True)
    cleanup_stale_mount(mountpoint)
    store = LocalStore(config.root)
    keychain = CredentialStore()
    client = RegistryClient(plain_http=config.plain_http, retries=config.max_retries,
                            timeout=config.fetching_timeout_sec, credentials=keychain,
                            backoff=config.min_wait_msec / 1000,
                            max_backoff=config.max_wait_msec / 1000)
    socket_path = credentials_socket or os.path.join(config.root, "credentials.sock")
    credentials_server = serve_credentials(socket_path, keychain)
    memory = MemoryCache(config.memory_bytes)
    disk = DiskCache(os.path.join(config.root, "cache", "spans"), config.disk_bytes)
    metrics = Metrics()
    manager = LayerManager(store, client, memory, disk, metrics=metrics)
    fs = StoreFS(manager, config, metrics)
    options = {"fsname=soci-store", "subtype=soci", "allow_other", "default_permissions"}
    if debug_fuse:
        options.add("debug")
    pyfuse3.init(fs, mountpoint, options)
    fetcher = None
    if not config.background_fetch.disable:
        fetcher = BackgroundFetcher(manager, config)
        fetcher.start()
    http_server = None
    if metrics_address:
        http_server = serve_http(metrics_address, metrics, manager, os.path.abspath(mountpoint))
    log.info("soci-store %s serving %s (root %s)", __version__, mountpoint, config.root)
    sd_notify(f"READY=1\nSTATUS=serving {mountpoint}")

    async def release_idle_layers() -> None:
        while True:
            await trio.sleep(max(config.release_grace_sec / 4, 0.25))
            fs.release_idle(config.release_grace_sec)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            nursery.start_soon(release_idle_layers)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("signal %d: unmounting", signum)
                    nursery.cancel_scope.cancel()
                    return

    try:
        trio.run(main)
    finally:
        sd_notify("STOPPING=1")
        if fetcher is not None:
            fetcher.stopped.set()
        if http_server is not None:
            http_server.shutdown()
        credentials_server.close()
        pyfuse3.close(unmount=True)
        store.close()
        log.info("soci-store stopped after %d FUSE operations (%d reads)", fs.ops, fs.reads)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="soci-store")
@click.argument("mountpoint", type=click.Path(file_okay=False))
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
    cli(prog_name="soci-store")
