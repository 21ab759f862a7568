"""The serving core's configuration, shared by soci-store and the snapshotter: upstream's TOML
keys where they exist, plus the cache bounds.

    [background_fetch]
    disable = false
    silence_period_msec = 30000   # no reads of a layer for this long -> fetch the rest
    fetch_period_msec = 500       # one span per period per layer

    [http]                        # client-wide, as upstream spells them
    RequestTimeoutMsec = 300000
    MaxRetries = 5
    MinWaitMsec = 30
    MaxWaitMsec = 300

    [blob]                        # overrides [http] for blob fetches
    fetching_timeout_sec = 300    # per registry request
    max_retries = 5
    min_wait_msec = 30            # retry backoff: first wait ...
    max_wait_msec = 300           # ... growing to at most this

    [fuse]
    attr_timeout = 3600           # the layers are immutable: let the kernel cache
    entry_timeout = 3600
    read_ahead_kb = 4096          # ours: the kernel's read-ahead on the mount (0: leave it)

    [prefetch]                    # upstream's: spans a SOCI index's prefetch artifact names
    enable = false                # fetched as soon as their layer is mounted
    max_concurrency = 0           # layers prefetching at once (0: no limit)

    [cache]                       # ours
    memory_mb = 512               # inflated spans, shared by all layers
    disk_mb = 10240               # inflated spans (compressed for huge ones) under
                                  # <root>/cache/spans, shared by all layers
    release_grace_sec = 60        # unmount a layer this long after podman's last use
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from soci.config import load_config, read_config_file
from soci.errors import SociError


@dataclass(slots=True)
class BackgroundFetch:
    disable: bool = False
    silence_period_msec: int = 30_000
    fetch_period_msec: int = 500


@dataclass(slots=True)
class PrefetchConfig:
    enable: bool = False
    max_concurrency: int = 0


@dataclass(slots=True)
class ServeConfig:
    root: str
    plain_http: bool = False
    hosts_dir: str | None = None
    background_fetch: BackgroundFetch = field(default_factory=BackgroundFetch)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    fetching_timeout_sec: float = 300.0
    max_retries: int = 5
    min_wait_msec: int = 30
    max_wait_msec: int = 300
    attr_timeout: float = 3600.0
    entry_timeout: float = 3600.0
    read_ahead_kb: int = 4096
    memory_bytes: int = 512 << 20
    disk_bytes: int = 10 << 30
    release_grace_sec: float = 60.0


_KIND_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}


def _get(doc: dict[str, Any], section: str, key: str, kind: type, default: Any) -> Any:
    table = doc.get(section, {})
    if not isinstance(table, dict):
        raise SociError(f"config: [{section}] must be a table")
    value = table.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SociError(f"config: [{section}] {key} must be {_KIND_NAMES[kind]}")
    return value


def load_serve_config(path: str | None = None) -> ServeConfig:
    base = load_config(path)
    doc = read_config_file(path)
    cfg = ServeConfig(base.root, base.plain_http, base.hosts_dir)
    bf = cfg.background_fetch
    bf.disable = _get(doc, "background_fetch", "disable", bool, bf.disable)
    bf.silence_period_msec = _get(doc, "background_fetch", "silence_period_msec", int,
                                  bf.silence_period_msec)
    bf.fetch_period_msec = _get(doc, "background_fetch", "fetch_period_msec", int,
                                bf.fetch_period_msec)
    # Upstream's [http] section sets the client-wide values; [blob] overrides them.
    timeout_ms = _get(doc, "http", "RequestTimeoutMsec", int,
                      int(cfg.fetching_timeout_sec * 1000))
    cfg.fetching_timeout_sec = _get(doc, "blob", "fetching_timeout_sec", float,
                                    timeout_ms / 1000)
    cfg.max_retries = _get(doc, "blob", "max_retries", int,
                           _get(doc, "http", "MaxRetries", int, cfg.max_retries))
    cfg.min_wait_msec = _get(doc, "blob", "min_wait_msec", int,
                             _get(doc, "http", "MinWaitMsec", int, cfg.min_wait_msec))
    cfg.max_wait_msec = _get(doc, "blob", "max_wait_msec", int,
                             _get(doc, "http", "MaxWaitMsec", int, cfg.max_wait_msec))
    cfg.attr_timeout = _get(doc, "fuse", "attr_timeout", float, cfg.attr_timeout)
    cfg.entry_timeout = _get(doc, "fuse", "entry_timeout", float, cfg.entry_timeout)
    cfg.read_ahead_kb = _get(doc, "fuse", "read_ahead_kb", int, cfg.read_ahead_kb)
    if cfg.read_ahead_kb < 0:
        raise SociError("config: [fuse] read_ahead_kb must not be negative")
    cfg.prefetch.enable = _get(doc, "prefetch", "enable", bool, cfg.prefetch.enable)
    cfg.prefetch.max_concurrency = _get(doc, "prefetch", "max_concurrency", int,
                                        cfg.prefetch.max_concurrency)
    if cfg.prefetch.max_concurrency < 0:  # upstream: negative means no limit
        cfg.prefetch.max_concurrency = 0
    cfg.memory_bytes = _get(doc, "cache", "memory_mb", int, cfg.memory_bytes >> 20) << 20
    cfg.disk_bytes = _get(doc, "cache", "disk_mb", int, cfg.disk_bytes >> 20) << 20
    cfg.release_grace_sec = _get(doc, "cache", "release_grace_sec", float,
                                 cfg.release_grace_sec)
    return cfg
