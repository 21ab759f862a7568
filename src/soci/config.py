"""Configuration: the one place global settings live.

Read from ``--config FILE``, else ``$SOCI_CONFIG``, else
``/etc/soci-snapshotter-grpc/config.toml`` when it exists. Only soci's own
keys are read; the file may hold the snapshotter's other sections too. Every key and section
must be one of ``KNOWN_KEYS`` (soci's, soci-store's, soci-snapshotter-grpc's, and upstream
SOCI's, accepted and ignored where we have no use for them): a misspelt ``[cahce]`` is an error
naming the likely intended one, not a setting silently dropped.

    root = "/var/lib/soci-snapshotter-grpc"   # the local store
    plain_http = false                         # allow HTTP to every registry

    [registry]
    config_path = "/etc/containerd/certs.d"    # containerd's hosts directories ("a:b" for
                                               # several); default: that one, if it exists
"""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass
from typing import Any

from soci.artifacts import DEFAULT_ROOT
from soci.errors import SociError

DEFAULT_CONFIG = "/etc/soci-snapshotter-grpc/config.toml"


@dataclass(slots=True)
class Config:
    root: str = DEFAULT_ROOT
    plain_http: bool = False
    hosts_dir: str | None = None  # None: /etc/containerd/certs.d when it exists


# The one table of what the config file may hold. A name maps to True (a plain key), to a
# nested table of the same form (a section), or to None (a section of upstream's whose content
# we ignore entirely, so any keys and subtables are accepted there).
Table = dict[str, "Table | bool | None"]
_UPSTREAM_IGNORED_TOP = (
    "http_cache_type", "filesystem_cache_type", "resolve_result_entry", "debug",
    "disable_verification", "max_concurrency", "mount_timeout_sec",
    "fuse_metrics_emit_wait_duration_sec", "metrics_network", "no_prometheus", "debug_address",
    "metadata_store", "metadata_db_no_sync", "metadata_insertion_chunk_size",
    "skip_check_snapshotter_supported",
)
KNOWN_KEYS: Table = {
    # soci, soci-store, soci-snapshotter-grpc
    "root": True,
    "plain_http": True,
    "metrics_address": True,
    **{k: True for k in _UPSTREAM_IGNORED_TOP},
    "registry": {"config_path": True, "mirrors": None, "configs": None, "headers": None,
                 "auths": None},
    "snapshotter": {"address": True, "min_layer_size": True,
                    "allow_invalid_mounts_on_restart": True},
    "pull_modes": {
        "parallel_pull_unpack": {
            "enable": True, "max_concurrent_downloads": True,
            "max_concurrent_downloads_per_image": True, "concurrent_download_chunk_size": True,
            "max_concurrent_unpacks": True, "max_concurrent_unpacks_per_image": True,
            "discard_unpacked_layers": True, "decompress_streams": None,
        },
        "soci_v1": {"enable": True},
        "soci_v2": {"enable": True},
    },
    "background_fetch": {"disable": True, "silence_period_msec": True, "fetch_period_msec": True,
                         "max_queue_size": True, "drop_policy": True,
                         "emit_metric_period_sec": True},
    "http": {"RequestTimeoutMsec": True, "MaxRetries": True, "MinWaitMsec": True,
             "MaxWaitMsec": True, "DialTimeoutMsec": True, "ResponseHeaderTimeoutMsec": True},
    "blob": {"fetching_timeout_sec": True, "max_retries": True, "min_wait_msec": True,
             "max_wait_msec": True, "valid_interval": True, "check_always": True,
             "force_single_range_mode": True, "max_span_verification_retries": True},
    "fuse": {"attr_timeout": True, "entry_timeout": True, "negative_timeout": True,
             "log_fuse_operations": True, "read_ahead_kb": True},
    "cache": {"memory_mb": True, "disk_mb": True, "release_grace_sec": True},
    "prefetch": {"enable": True, "max_concurrency": True},
    # upstream's, ignored here
    "directory_cache": None,
    "content_store": None,
    "kubeconfig_keychain": None,
    "cri_keychain": None,
    "resolver": None,
}


def _check_known(doc: dict[str, Any], known: Table, where: str, path: str) -> None:
    """Refuse names not in ``known``, suggesting the closest known one."""
    for name, value in doc.items():
        spec = known.get(name, False)
        full = f"{where}.{name}" if where else name
        if spec is False:
            is_table = isinstance(value, dict)
            # Suggest among names of the same kind first (a section for a section).
            same = [k for k, v in known.items() if (v is not True) == is_table]
            close = (difflib.get_close_matches(name, same, n=1)
                     or difflib.get_close_matches(name, list(known), n=1))
            shown = f"[{full}]" if is_table else (f"[{where}] {name}" if where else f"'{name}'")
            hint = ""
            if close:
                alt = f"{where}.{close[0]}" if where else close[0]
                hint = (f" (did you mean [{alt}]?)" if known[close[0]] is not True else
                        f" (did you mean {close[0]!r}?)")
            kind = "section" if is_table else "key"
            raise SociError(f"config file {path}: unknown {kind} {shown}{hint}")
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                raise SociError(f"config file {path}: [{full}] must be a table")
            _check_known(value, spec, full, path)


def read_config_file(path: str | None = None) -> dict[str, Any]:
    """The TOML document (empty when no file is named and the default is absent)."""
    path = path or os.environ.get("SOCI_CONFIG")
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG):
            return {}
        path = DEFAULT_CONFIG
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise SociError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise SociError(f"config file {path} is not valid TOML: {e}") from None
    _check_known(doc, KNOWN_KEYS, "", path)
    return doc


def load_config(path: str | None = None) -> Config:
    doc = read_config_file(path)
    config = Config()
    root = doc.get("root", config.root)
    plain_http = doc.get("plain_http", config.plain_http)
    if not isinstance(root, str) or not isinstance(plain_http, bool):
        raise SociError(f"config file {path}: 'root' must be a string, 'plain_http' a boolean")
    registry = doc.get("registry", {})
    hosts_dir = registry.get("config_path") if isinstance(registry, dict) else None
    if not isinstance(registry, dict) or not isinstance(hosts_dir, str | None):
        raise SociError(f"config file {path}: [registry] config_path must be a string")
    return Config(root, plain_http, hosts_dir or None)
