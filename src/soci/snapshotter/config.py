"""soci-snapshotter-grpc's configuration: the file ``soci-store`` reads
(``/etc/soci-snapshotter-grpc/config.toml``), with upstream's keys for what only the
snapshotter has::

    metrics_address = "127.0.0.1:8092"   # Prometheus /metrics and JSON /status ('' = off)

    [snapshotter]                        # ours: where containerd reaches us
    address = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock"

Everything ``soci-store`` takes (``root``, ``[background_fetch]``, ``[http]``, ``[blob]``,
``[fuse]``, ``[cache]``) means the same here; see ``soci.store.config``.
"""

from __future__ import annotations

from dataclasses import dataclass

from soci.config import read_config_file
from soci.errors import SociError
from soci.store.config import StoreConfig, load_store_config

DEFAULT_ADDRESS = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock"
DEFAULT_METRICS_ADDRESS = "127.0.0.1:8092"


@dataclass(slots=True)
class SnapshotterConfig:
    store: StoreConfig
    address: str = DEFAULT_ADDRESS
    metrics_address: str = DEFAULT_METRICS_ADDRESS


def load_snapshotter_config(path: str | None = None) -> SnapshotterConfig:
    doc = read_config_file(path)
    cfg = SnapshotterConfig(load_store_config(path))
    metrics = doc.get("metrics_address", cfg.metrics_address)
    section = doc.get("snapshotter", {})
    if not isinstance(section, dict):
        raise SociError("config: [snapshotter] must be a table")
    address = section.get("address", cfg.address)
    if not isinstance(metrics, str) or not isinstance(address, str):
        raise SociError("config: 'metrics_address' and [snapshotter] address must be strings")
    cfg.metrics_address, cfg.address = metrics, address
    return cfg
