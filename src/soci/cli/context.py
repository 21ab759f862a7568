"""What every command shares: configuration, the local store and a registry client.

Built lazily, so ``soci ztoc info FILE`` never touches the store or the network.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import click

from soci.artifacts import LocalStore
from soci.config import Config, load_config
from soci.errors import NotFoundError, SociError
from soci.oci.descriptor import check_digest
from soci.registry import RegistryClient, RetryNotice

F = TypeVar("F", bound=Callable[..., Any])
_FULL_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_DIGEST_PREFIX = re.compile(r"(?:sha256:)?([0-9a-f]{1,64})\Z")


class App:
    """Per-invocation state. The global options may appear before or after any subcommand
    (``soci --plain-http create REF`` and ``soci create --plain-http REF``), so the config file
    is read only when a command first asks for it, once every option has been parsed."""

    def __init__(self) -> None:
        self.config_path: str | None = None
        self.root: str | None = None
        self.plain_http = False
        self._config: Config | None = None
        self._store: LocalStore | None = None
        self._client: RegistryClient | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            config = load_config(self.config_path)
            if self.root is not None:
                config.root = self.root
            if self.plain_http:
                config.plain_http = True
            self._config = config
        return self._config

    @property
    def store(self) -> LocalStore:
        if self._store is None:
            self._store = LocalStore(self.config.root)
        return self._store

    def existing_store(self) -> LocalStore | None:
        """The store for commands that only read: None when its root does not exist, so
        ``index list`` or ``ztoc info`` never create one as a side effect."""
        if self._store is None and not os.path.isdir(self.config.root):
            return None
        return self.store

    def resolve_digest(self, text: str, what: str) -> str:
        """A full digest for ``text``: itself when complete, else the one SOCI index or zTOC
        in the store whose hex digits start with it (``7e98a66a`` or ``sha256:7e98a66a``).

        Both kinds are searched whatever ``what`` names, so giving a zTOC's prefix to an
        index command still gets that command's "is a zTOC" answer."""
        if _FULL_DIGEST.match(text):
            return text
        m = _DIGEST_PREFIX.match(text)
        if m is None:
            return check_digest(text)  # raises: says what a digest looks like
        prefix = "sha256:" + m.group(1)
        store = self.existing_store()
        found: set[str] = set()
        if store is not None:
            found = {r.digest for r in store.db.indexes() if r.digest.startswith(prefix)}
            found |= {r.digest for r in store.db.ztocs() if r.digest.startswith(prefix)}
        if not found:
            raise NotFoundError(f"no {what} digest starts with {text} in {self.config.root}")
        if len(found) > 1:
            shown = ", ".join(sorted(d[7:19] for d in found))
            raise SociError(f"{text} is ambiguous: {len(found)} digests start with it "
                            f"({shown}); give more digits")
        return found.pop()

    @property
    def client(self) -> RegistryClient:
        if self._client is None:
            self._client = RegistryClient(plain_http=self.config.plain_http,
                                          hosts_dir=self.config.hosts_dir,
                                          on_retry=_show_retry)
        return self._client

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def short_digest(digest: str | None, no_trunc: bool = False) -> str:
    """A digest as tables show it: 12 hex digits without ``sha256:`` (``podman images``'
    IMAGE ID), or whole with ``--no-trunc``. JSON and ``-q`` always print it whole."""
    if not digest:
        return ""
    if no_trunc:
        return digest
    return digest.partition(":")[2][:12] or digest[:12]


no_trunc_option = click.option("--no-trunc", is_flag=True,
                               help="Print whole digests (tables show the first 12 digits).")


def _show_retry(notice: RetryNotice) -> None:
    """Say why the command is waiting, on stderr (never mixed into --json or -q output on
    stdout). Shown with -q too: it is a warning about a stall, not progress."""
    click.echo(f"Warning: {notice}", err=True)


pass_app = click.make_pass_decorator(App)


def _set_global(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Record a global option on the invocation's App, wherever on the line it was given."""
    if value is None or value is False:
        return
    app = ctx.ensure_object(App)
    if app._config is not None:  # pragma: no cover - commands read the config after parsing
        raise click.UsageError(f"{param.opts[0]} given too late")
    setattr(app, param.name or "", value)


def _global_options() -> list[click.Parameter]:
    """Fresh copies of the options every command takes (click binds a parameter to one command)."""
    return [
        click.Option(["--root"], type=click.Path(file_okay=False), default=None,
                     expose_value=False, callback=_set_global,
                     help="The local store [default: /var/lib/soci-snapshotter-grpc, or 'root' in "
                          "the config file]."),
        click.Option(["--config", "config_path"], type=click.Path(dir_okay=False), default=None,
                     expose_value=False, callback=_set_global,
                     help="Config file [default: $SOCI_CONFIG or /etc/soci-snapshotter-grpc/"
                          "config.toml]."),
        click.Option(["--plain-http"], is_flag=True, default=False, expose_value=False,
                     callback=_set_global,
                     help="Talk plain HTTP to every registry (registries.conf 'insecure' does it "
                          "per registry)."),
    ]


def add_global_options(cmd: click.Command) -> None:
    """Give ``cmd`` and every command under it the global options (once each)."""
    names = {p.name for p in cmd.params}
    cmd.params.extend(p for p in _global_options() if p.name not in names)
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            add_global_options(sub)


class SociGroup(click.Group):
    """A group whose commands, and their commands, all accept the global options."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        add_global_options(cmd)
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        # Every command, not only the long ones, ends Ctrl-C as a shell expects: status 130.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("soci: interrupted", err=True)
            raise click.exceptions.Exit(130) from None


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
