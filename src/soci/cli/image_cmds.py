"""``soci create``, ``soci push`` and ``soci convert``."""

from __future__ import annotations

import click

from soci.cli.context import App, one_line_errors, pass_app
from soci.cli.index_cmds import earlier_indexes_note
from soci.cli.output import Bars, exit_on_interrupt, human_size, short
from soci.cli.prefetch_cmds import load_prefetch_files
from soci.errors import NotFoundError, SociError
from soci.image.destinations import open_destination
from soci.image.names import parse_image_name
from soci.image.resolve import PlatformImage, resolve_image
from soci.image.sources import open_source
from soci.index.convert import convert_image
from soci.index.create import (
    DEFAULT_MIN_LAYER_SIZE,
    OPTIMIZATIONS,
    CreateOptions,
    EmptyIndexError,
    LayerOutcome,
    LayerProgress,
    create_index,
)
from soci.index.model import SociIndex
from soci.index.push import push_index
from soci.oci import mediatypes as mt
from soci.oci.descriptor import Descriptor, Platform
from soci.ztoc import DEFAULT_SPAN_SIZE, MAX_SPAN_SIZE


def _platforms(values: tuple[str, ...]) -> list[Platform] | None:
    return [Platform.parse(v) for v in values] or None


def build_options(f):
    for option in reversed([
        click.option("--span-size", type=click.IntRange(min=1, max=MAX_SPAN_SIZE),
                     default=DEFAULT_SPAN_SIZE, show_default=True,
                     help="Uncompressed bytes between checkpoints."),
        click.option("--min-layer-size", type=click.IntRange(min=0),
                     default=DEFAULT_MIN_LAYER_SIZE, show_default=True,
                     help="Skip layers smaller than this (0 indexes every layer)."),
        click.option("--force", "-f", is_flag=True,
                     help="Rebuild zTOCs that already exist for the same span size."),
        click.option("--optimizations", multiple=True, type=click.Choice(OPTIMIZATIONS),
                     help="Upstream's optional optimizations (xattr)."),
        click.option("--platform", "platforms", multiple=True,
                     help="os/arch[/variant] to index [default: this host's]; repeatable."),
        click.option("--all-platforms", is_flag=True, help="Index every platform of the image."),
        click.option("-q", "--quiet", is_flag=True, help="Only print errors and the result."),
        click.option("--prefetch-file", "prefetch_file", multiple=True, metavar="PATH",
                     help="A file whose spans runtimes fetch as soon as its layer is mounted "
                          "(upstream's prefetch artifact); repeatable."),
        click.option("--prefetch-files-json", type=click.Path(dir_okay=False),
                     help="A JSON file holding a list of such paths."),
        click.option("--prefetch-entrypoint", is_flag=True,
                     help="Also prefetch the file the image's Entrypoint (or Cmd) runs, "
                          "looked up in its PATH."),
    ]):
        f = option(f)
    return f


def _options(span_size: int, min_layer_size: int, force: bool, optimizations: tuple[str, ...],
             prefetch: dict) -> CreateOptions:
    files = list(load_prefetch_files(prefetch["prefetch_file"],
                                     prefetch["prefetch_files_json"]))
    return CreateOptions(span_size, min_layer_size, force, optimizations,
                         prefetch_files=tuple(files),
                         prefetch_entrypoint=prefetch["prefetch_entrypoint"])


def _prefetch_report(quiet: bool, index: SociIndex, echo) -> None:
    if quiet:
        return
    for p in index.prefetches():
        echo(f"Created prefetch artifact for layer {p.annotations[mt.ANN_LAYER_DIGEST]}: "
             f"{p.digest}")


def _reporter(quiet: bool, bars: Bars):
    def on_layer(o: LayerOutcome) -> None:
        bars.remove(o.layer.digest)
        bars.advance()
        if quiet:
            return
        if o.status == "skipped":
            bars.echo(f"ztoc skipped - layer {o.layer.digest} ({o.layer.media_type}) {o.reason}")
        elif o.status == "exists":
            bars.echo(f"layer {o.layer.digest} -> ztoc {o.ztoc.digest} (already exists)")
        else:
            bars.echo(f"layer {o.layer.digest} -> ztoc {o.ztoc.digest}")
    return on_layer


def _indexing(bars: Bars):
    """The per-layer bar of a zTOC build: compressed bytes indexed (the bar) and read."""
    if not bars.enabled:
        return None

    def progress(p: LayerProgress) -> None:
        size = p.layer.size
        bars.update(p.layer.digest, f"layer {short(p.layer.digest)}", p.indexed, size,
                    f"{human_size(p.indexed)}/{human_size(size)} indexed, "
                    f"{human_size(p.read)} read")
    return progress


@click.command()
@click.argument("ref")
@build_options
@pass_app
@exit_on_interrupt
@one_line_errors
def create(app: App, ref: str, span_size: int, min_layer_size: int, force: bool,
           optimizations: tuple[str, ...], platforms: tuple[str, ...], all_platforms: bool,
           quiet: bool, **prefetch) -> None:
    """Create SOCI indexes (manifest v1) for an image: REF is a registry reference,
    oci:DIR[:TAG] or oci-archive:FILE[:TAG]."""
    name = parse_image_name(ref)
    opts = _options(span_size, min_layer_size, force, optimizations, prefetch)
    source = open_source(name, app.client)
    try:
        resolved = resolve_image(source, _platforms(platforms), all_platforms)
        made = 0
        with Bars(quiet) as bars:
            for image in resolved.images:
                bars.overall(f"indexing {image.platform}", len(image.manifest.layers), "layers")
                try:
                    created = create_index(source, image, app.store, opts, refs=[str(name)],
                                           on_layer=_reporter(quiet, bars),
                                           progress=_indexing(bars),
                                           warn=lambda m: bars.echo(f"warning: {m}", err=True))
                except EmptyIndexError as e:
                    if len(resolved.images) == 1:
                        raise
                    bars.echo(f"skipped {image.platform}: {e}")
                    continue
                made += 1
                _prefetch_report(quiet, created.index, bars.echo)
                bars.echo(f"{created.desc.digest}  SOCI index for {image.desc.digest} "
                          f"({image.platform})")
                note = earlier_indexes_note(app.store, image.desc.digest, created.desc.digest)
                if note and not quiet:
                    bars.echo(note, err=True)
        if not made:
            raise EmptyIndexError("no SOCI index created: every layer of every platform was "
                                  "skipped")
    finally:
        source.close()


@click.command()
@click.argument("ref")
@click.option("--platform", "platforms", multiple=True,
              help="os/arch[/variant] whose index to push [default: this host's]; repeatable.")
@click.option("--all-platforms", is_flag=True, help="Push the indexes of every platform.")
@click.option("--max-concurrent-uploads", type=click.IntRange(min=1), default=3,
              show_default=True, help="Blob uploads in flight at once.")
@click.option("-q", "--quiet", is_flag=True, help="Only print errors and the result.")
@pass_app
@exit_on_interrupt
@one_line_errors
def push(app: App, ref: str, platforms: tuple[str, ...], all_platforms: bool,
         max_concurrent_uploads: int, quiet: bool) -> None:
    """Push the SOCI indexes created for REF to its repository and register them as referrers."""
    name = parse_image_name(ref)
    if name.ref is None:
        raise SociError("soci push needs a registry reference")
    source = open_source(name, app.client)
    resolved = resolve_image(source, _platforms(platforms), all_platforms)
    for image in resolved.images:
        index_digest = app.store.mappings.get(image.desc.digest)
        if index_digest is None or not app.store.content.has_blob(index_digest):
            raise NotFoundError(f"no SOCI index for {image.desc.digest} ({image.platform}) in "
                                f"{app.store.root}: run soci create {ref} first")
        blobs = 1 + len(SociIndex.parse(app.store.content.read_blob(index_digest)).blobs)
        with Bars(quiet) as bars:
            bars.overall(f"pushing {image.platform}", blobs, "blobs")

            def report(line: str) -> None:
                bars.advance()
                if not quiet:
                    bars.echo(line)

            def uploading(blob: Descriptor, sent: int) -> None:
                kind = "prefetch" if blob.media_type == mt.SOCI_PREFETCH else "ztoc"
                what = (f"{kind} of {short(blob.annotations[mt.ANN_LAYER_DIGEST])}"
                        if blob.annotations and mt.ANN_LAYER_DIGEST in blob.annotations
                        else short(blob.digest))
                bars.update(blob.digest, what, sent, blob.size,
                            f"{human_size(sent)}/{human_size(blob.size)} uploaded")

            desc = push_index(app.client, name.ref, app.store, index_digest,
                              max_concurrent_uploads=max_concurrent_uploads, report=report,
                              progress=uploading if bars.enabled else None)
            bars.echo(f"{desc.digest}  pushed for {image.desc.digest} ({image.platform})")


@click.command()
@click.argument("src")
@click.argument("dst")
@build_options
@pass_app
@exit_on_interrupt
@one_line_errors
def convert(app: App, src: str, dst: str, span_size: int, min_layer_size: int, force: bool,
            optimizations: tuple[str, ...], platforms: tuple[str, ...], all_platforms: bool,
            quiet: bool, **prefetch) -> None:
    """Make a SOCI-enabled image (SOCI index manifest v2) of SRC at DST.

    Each may be a registry reference, oci:DIR[:TAG] or oci-archive:FILE[:TAG].
    """
    src_name, dst_name = parse_image_name(src), parse_image_name(dst)
    opts = _options(span_size, min_layer_size, force, optimizations, prefetch)
    source = open_source(src_name, app.client)
    dest = open_destination(dst_name, app.client)
    try:
        with Bars(quiet) as bars:
            def on_image(image: PlatformImage) -> None:
                bars.overall(f"indexing {image.platform}", len(image.manifest.layers), "layers")

            def copying(blob: Descriptor, sent: int) -> None:
                bars.update(f"copy {blob.digest}", f"copy {short(blob.digest)}", sent,
                            blob.size, f"{human_size(sent)}/{human_size(blob.size)} copied")

            result = convert_image(source, dest, app.store, opts,
                                   platforms=_platforms(platforms), all_platforms=all_platforms,
                                   on_layer=_reporter(quiet, bars), progress=_indexing(bars),
                                   on_image=on_image,
                                   copying=copying if bars.enabled else None,
                                   warn=lambda m: bars.echo(f"warning: {m}", err=True))
    except BaseException:
        dest.abort()
        raise
    finally:
        source.close()
    for c in result.created:
        _prefetch_report(quiet, c.index, click.echo)
        click.echo(f"{c.desc.digest}  SOCI v2 index for {c.image.platform}")
    click.echo(f"{result.top.digest}  {dst_name}")
