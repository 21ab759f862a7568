"""The serving core both daemons build the same way from their shared configuration: the
registry client, the span caches, the layer manager and the FUSE filesystem over them."""

from __future__ import annotations

import os

from soci.artifacts import LocalStore
from soci.fs.cache import DiskCache, MemoryCache
from soci.registry import CredentialStore, RegistryClient
from soci.serve.config import ServeConfig
from soci.serve.fusefs import LayerFS
from soci.serve.layers import LayerManager
from soci.serve.metrics import Metrics


def serving_core(config: ServeConfig, store: LocalStore,
                 credentials: CredentialStore) -> tuple[LayerFS, Metrics]:
    """The layer filesystem (its ``manager`` resolves and holds the layers) and the metrics
    it reports to, for ``config`` over ``store``."""
    client = RegistryClient(plain_http=config.plain_http, hosts_dir=config.hosts_dir,
                            retries=config.max_retries, timeout=config.fetching_timeout_sec,
                            credentials=credentials, backoff=config.min_wait_msec / 1000,
                            max_backoff=config.max_wait_msec / 1000)
    memory = MemoryCache(config.memory_bytes)
    disk = DiskCache(os.path.join(config.root, "cache", "spans"), config.disk_bytes)
    metrics = Metrics()
    manager = LayerManager(store, client, memory, disk, metrics=metrics)
    return LayerFS(manager, metrics, config.attr_timeout), metrics
