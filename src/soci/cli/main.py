"""The ``soci`` command line: a thin layer over the library.

Every failure the user can cause ends as one line on stderr and a non-zero
exit status; tracebacks are reserved for bugs.
"""

from __future__ import annotations

import click

from soci import __version__
from soci._native.zran import ZLIB_VERSION
from soci.cli.context import App, one_line_errors
from soci.cli.image_cmds import convert, create, push
from soci.cli.index_cmds import index, rebuild_db
from soci.cli.pull_cmds import pull
from soci.cli.store_cmds import store
from soci.cli.ztoc_cmds import ztoc
from soci.config import load_config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(f"{__version__} (zlib {ZLIB_VERSION})", prog_name="soci")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="The local store [default: /var/lib/soci-snapshotter-grpc, or 'root' in the "
                   "config file].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Config file [default: $SOCI_CONFIG or /etc/soci-snapshotter-grpc/"
                   "config.toml].")
@click.option("--plain-http", is_flag=True, default=None,
              help="Talk plain HTTP to every registry (registries.conf 'insecure' does it per "
                   "registry).")
@click.pass_context
@one_line_errors
def cli(ctx: click.Context, root: str | None, config_path: str | None,
        plain_http: bool | None) -> None:
    """SOCI: lazily loaded, unmodified OCI images."""
    config = load_config(config_path)
    if root is not None:
        config.root = root
    if plain_http:
        config.plain_http = True
    app = App(config)
    ctx.obj = app
    ctx.call_on_close(app.close)


cli.add_command(ztoc)
cli.add_command(index)
cli.add_command(create)
cli.add_command(push)
cli.add_command(convert)
cli.add_command(rebuild_db)
cli.add_command(store)
cli.add_command(pull)


@click.group("image")
def image() -> None:
    """Upstream SOCI's spelling of image commands (``soci image rpull`` is ``soci pull``)."""


image.add_command(pull, name="rpull")
cli.add_command(image)


def main() -> None:
    cli(prog_name="soci")
