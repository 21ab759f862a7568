"""soci-store's configuration: the serving core's (``soci.serve.config``), under the names
the podman front end has always used."""

from soci.serve.config import ServeConfig as StoreConfig
from soci.serve.config import load_serve_config as load_store_config

__all__ = ["StoreConfig", "load_store_config"]
