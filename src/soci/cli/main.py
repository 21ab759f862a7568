"""The ``soci`` command line: a thin layer over the library.

Every failure the user can cause ends as one line on stderr and a non-zero
exit status; tracebacks are reserved for bugs.
"""

from __future__ import annotations

import click

from soci import __version__
from soci._native.zran import ZLIB_VERSION
from soci.cli.context import App, SociGroup, add_global_options, one_line_errors
from soci.cli.image_cmds import convert, create, push
from soci.cli.index_cmds import index, rebuild_db
from soci.cli.prefetch_cmds import prefetch
from soci.cli.pull_cmds import pull
from soci.cli.store_cmds import store
from soci.cli.ztoc_cmds import ztoc


@click.group(cls=SociGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(f"{__version__} (zlib {ZLIB_VERSION})", prog_name="soci")
@click.pass_context
@one_line_errors
def cli(ctx: click.Context) -> None:
    """SOCI: lazily loaded, unmodified OCI images.

    The global options (--root, --config, --plain-http) may also follow any subcommand.
    """
    app = ctx.ensure_object(App)
    ctx.call_on_close(app.close)


add_global_options(cli)
cli.add_command(ztoc)
cli.add_command(index)
cli.add_command(create)
cli.add_command(push)
cli.add_command(convert)
cli.add_command(rebuild_db)
cli.add_command(store)
cli.add_command(pull)
cli.add_command(prefetch)


@click.group("image")
def image() -> None:
    """Upstream SOCI's spelling of image commands (``soci image rpull`` is ``soci pull``)."""


image.add_command(pull, name="rpull")
cli.add_command(image)


def main() -> None:
    cli(prog_name="soci")
