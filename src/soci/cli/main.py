"""The ``soci`` command line: a thin layer over the library.

Every failure the user can cause ends as one line on stderr and a non-zero
exit status; tracebacks are reserved for bugs.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

import click

from soci import __version__
from soci._native.zran import ZLIB_VERSION
from soci.errors import SociError
from soci.fsutil import atomic_writer
from soci.ztoc import (
    DEFAULT_SPAN_SIZE,
    FileBlob,
    LayerReader,
    Ztoc,
    build_ztoc,
    decode,
    digest_of,
    encode,
    find_file,
    zinfo_of,
)

F = TypeVar("F", bound=Callable[..., Any])


def _one_line_errors(func: F) -> F:
    """Turn expected failures into ``soci: error: ...`` and exit status 1."""

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


def _size(value: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def _read_ztoc(path: str) -> tuple[Ztoc, bytes]:
    with open(path, "rb") as f:
        data = f.read()
    return decode(data), data


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(f"{__version__} (zlib {ZLIB_VERSION})", prog_name="soci")
def cli() -> None:
    """SOCI: lazily loaded, unmodified OCI images."""


@cli.group()
def ztoc() -> None:
    """Build and inspect zTOCs (per-layer tables of contents with gzip checkpoints)."""


@ztoc.command("build")
@click.argument("layer", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--span-size", type=click.IntRange(min=1), default=DEFAULT_SPAN_SIZE,
              show_default=True, help="Uncompressed bytes between checkpoints.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Where to write the zTOC [default: LAYER.ztoc, or ztoc for stdin].")
@click.option("-q", "--quiet", is_flag=True, help="Print only the zTOC digest.")
@_one_line_errors
def ztoc_build(layer: str, span_size: int, output: str | None, quiet: bool) -> None:
    """Build the zTOC of a gzip or tar LAYER blob ('-' reads standard input)."""
    if output is None:
        output = "ztoc" if layer == "-" else os.path.basename(layer) + ".ztoc"
    source: BinaryIO
    if layer == "-":
        result = build_ztoc(sys.stdin.buffer, span_size=span_size)
    else:
        with open(layer, "rb") as source:
            result = build_ztoc(source, span_size=span_size)
    data = encode(result.ztoc)
    with atomic_writer(output) as f:
        f.write(data)
    z = result.ztoc
    click.echo(digest_of(data))
    if not quiet:
        click.echo(f"  written to     {output} ({_size(len(data))})")
        click.echo(f"  layer          {result.layer_digest}")
        click.echo(f"  compression    {z.compression.label}, {_size(z.compressed_size)} "
                   f"-> {_size(z.uncompressed_size)} of tar")
        click.echo(f"  entries        {len(z.entries)}")
        click.echo(f"  spans          {z.span_count} of {_size(span_size)}")


@ztoc.command("info")
@click.argument("ztoc_path", metavar="ZTOC", type=click.Path(dir_okay=False))
@_one_line_errors
def ztoc_info(ztoc_path: str) -> None:
    """Print a zTOC as JSON, with upstream's fields."""
    z, data = _read_ztoc(ztoc_path)
    zinfo = zinfo_of(z)
    files = []
    multi = 0
    for e in z.entries:
        start, end = zinfo.span_of(e.offset), zinfo.span_of(e.offset + e.size)
        multi += start != end
        files.append({"filename": e.name, "offset": e.offset, "size": e.size, "type": e.type,
                      "start_span": start, "end_span": end})
    info = {
        "version": z.version,
        "build_tool": z.build_tool,
        "size": len(data),
        "span_size": zinfo.span_size,
        "num_spans": z.span_count,
        "num_files": len(z.entries),
        "num_multi_span_files": multi,
        "files": files,
    }
    click.echo(json.dumps(info, indent=2, ensure_ascii=False))


@ztoc.command("get-file")
@click.argument("ztoc_path", metavar="ZTOC", type=click.Path(dir_okay=False))
@click.argument("path")
@click.option("--layer", required=True, type=click.Path(dir_okay=False),
              help="The layer blob the zTOC describes.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the file here instead of standard output.")
@_one_line_errors
def ztoc_get_file(ztoc_path: str, path: str, layer: str, output: str | None) -> None:
    """Print the contents of PATH in a layer, read through the zTOC's checkpoints."""
    z, _ = _read_ztoc(ztoc_path)
    entry = find_file(z, path)
    with FileBlob(layer) as blob:
        if blob.size != z.compressed_size:
            raise SociError(
                f"{layer} is {blob.size} bytes but the zTOC describes a "
                f"{z.compressed_size}-byte layer"
            )
        data = LayerReader(z, blob).read_file(entry)
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        with atomic_writer(output) as f:
            f.write(data)


def main() -> None:
    cli(prog_name="soci")
