"""soci-snapshotter-grpc's configuration: the file ``soci-store`` reads
(``/etc/soci-snapshotter-grpc/config.toml``), with upstream's keys for what only the
snapshotter has::

    metrics_address = "127.0.0.1:8092"   # Prometheus /metrics and JSON /status ('' = off)

    [snapshotter]                        # ours: where containerd reaches us
    address = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock"

    [pull_modes.parallel_pull_unpack]    # layers not served lazily: fetched and unpacked
    enable = false                       # here, several at once (soci.unpack)
    max_concurrent_downloads = -1        # negative: unbounded
    max_concurrent_downloads_per_image = 3
    max_concurrent_unpacks = -1
    max_concurrent_unpacks_per_image = 2

Layers of an image *with* a SOCI index that have no zTOC are always fetched and unpacked
here (as upstream does), whatever ``enable`` says: see ``soci.snapshotter.local``.

Everything ``soci-store`` takes (``root``, ``[background_fetch]``, ``[http]``, ``[blob]``,
``[fuse]``, ``[cache]``) means the same here; see ``soci.serve.config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from soci.config import read_config_file
from soci.errors import SociError
from soci.serve.config import ServeConfig, load_serve_config
from soci.unpack import ParallelPullConfig

DEFAULT_ADDRESS = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock"
DEFAULT_METRICS_ADDRESS = "127.0.0.1:8092"


@dataclass(slots=True)
class SnapshotterConfig:
    store: ServeConfig
    address: str = DEFAULT_ADDRESS
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    parallel: ParallelPullConfig = field(default_factory=ParallelPullConfig)


def load_snapshotter_config(path: str | None = None) -> SnapshotterConfig:
    doc = read_config_file(path)
    cfg = SnapshotterConfig(load_serve_config(path))
    metrics = doc.get("metrics_address", cfg.metrics_address)
    section = doc.get("snapshotter", {})
    if not isinstance(section, dict):
        raise SociError("config: [snapshotter] must be a table")
    address = section.get("address", cfg.address)
    if not isinstance(metrics, str) or not isinstance(address, str):
        raise SociError("config: 'metrics_address' and [snapshotter] address must be strings")
    cfg.metrics_address, cfg.address = metrics, address
    modes = doc.get("pull_modes", {})
    table = modes.get("parallel_pull_unpack", {}) if isinstance(modes, dict) else None
    if not isinstance(table, dict):
        raise SociError("config: [pull_modes.parallel_pull_unpack] must be a table")
    cfg.parallel = ParallelPullConfig.from_toml(table)
    return cfg
