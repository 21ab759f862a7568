"""What every command shares: configuration, the local store and a registry client.

Built lazily, so ``soci ztoc info FILE`` never touches the store or the network.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from soci.artifacts import LocalStore
from soci.config import Config
from soci.errors import SociError
from soci.registry import RegistryClient

F = TypeVar("F", bound=Callable[..., Any])


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._store: LocalStore | None = None
        self._client: RegistryClient | None = None

    @property
    def store(self) -> LocalStore:
        if self._store is None:
            self._store = LocalStore(self.config.root)
        return self._store

    @property
    def client(self) -> RegistryClient:
        if self._client is None:
            self._client = RegistryClient(plain_http=self.config.plain_http,
                                          hosts_dir=self.config.hosts_dir)
        return self._client

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


pass_app = click.make_pass_decorator(App)


def one_line_errors(func: F) -> F:
    """Turn expected failures into ``Error: ...`` and exit status 1 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SociError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from None

    return wrapper  # type: ignore[return-value]
