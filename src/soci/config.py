"""Configuration: the one place global settings live.

Read from ``--config FILE``, else ``$SOCI_CONFIG``, else
``/etc/soci-snapshotter-grpc/config.toml`` when it exists. Only soci's own
keys are read; the file may hold the snapshotter's other sections too.

    root = "/var/lib/soci-snapshotter-grpc"   # the local store
    plain_http = false                         # allow HTTP to every registry

    [registry]
    config_path = "/etc/containerd/certs.d"    # containerd's hosts directories ("a:b" for
                                               # several); default: that one, if it exists
"""

from __future__ import annotations

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


def read_config_file(path: str | None = None) -> dict[str, Any]:
    """The TOML document (empty when no file is named and the default is absent)."""
    path = path or os.environ.get("SOCI_CONFIG")
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG):
            return {}
        path = DEFAULT_CONFIG
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise SociError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise SociError(f"config file {path} is not valid TOML: {e}") from None


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
