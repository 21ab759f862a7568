"""``soci ztoc``: build, list, inspect zTOCs and read files through them."""

from __future__ import annotations

import os
import re
import sys
from typing import BinaryIO

import click

from soci.cancel import CancelToken, run_workers
from soci.cli.context import App, no_trunc_option, one_line_errors, pass_app, short_digest
from soci.cli.output import Bars, emit_json, exit_on_interrupt, human_size, listing
from soci.errors import NotFoundError, SociError
from soci.fsutil import atomic_writer
from soci.image.names import parse_image_name
from soci.oci.verify import sha256_digest
from soci.registry import Reference, RegistryClient
from soci.ztoc import (
    DEFAULT_SPAN_SIZE,
    MAX_SPAN_SIZE,
    BuildResult,
    FileBlob,
    LayerReader,
    Ztoc,
    build_ztoc,
    decode,
    encode,
    find_file,
    zinfo_of,
)

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_HEXISH = re.compile(r"(?:sha256:)?[0-9a-f]+\Z")


class RegistryBlob:
    """A layer read lazily from a registry with ranged GETs (verified per span by the reader)."""

    def __init__(self, client: RegistryClient, ref: Reference, digest: str) -> None:
        self.client, self.ref, self.digest = client, ref, digest

    def read_at(self, offset: int, size: int) -> bytes:
        return self.client.get_blob_range(self.ref, self.digest, offset, offset + size)


def _load(app: App, what: str) -> tuple[Ztoc, bytes, str | None]:
    """A zTOC by digest or unique digest prefix (from the local store) or by file path, and
    its full digest when it came from the store."""
    if not _DIGEST.match(what) and not os.path.exists(what) and _HEXISH.match(what):
        what = app.resolve_digest(what, "zTOC")
    if _DIGEST.match(what):
        store = app.existing_store()
        if store is None:
            raise NotFoundError(f"zTOC {what} is not in {app.config.root} (no store there)")
        if store.db.index(what) is not None:
            raise SociError(f"{what} is a SOCI index: use soci index info")
        return decode(data := store.content.read_blob(what)), data, what
    with open(what, "rb") as f:
        data = f.read()
    return decode(data), data, None


@click.group()
def ztoc() -> None:
    """Build and inspect zTOCs (per-layer tables of contents with gzip or zstd checkpoints)."""


@ztoc.command("build")
@click.argument("layer", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--span-size", type=click.IntRange(min=1, max=MAX_SPAN_SIZE),
              default=DEFAULT_SPAN_SIZE,
              show_default=True, help="Uncompressed bytes between checkpoints.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Where to write the zTOC [default: LAYER.ztoc, or ztoc for stdin].")
@click.option("-q", "--quiet", is_flag=True, help="Print only the zTOC digest.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@exit_on_interrupt
@one_line_errors
def ztoc_build(layer: str, span_size: int, output: str | None, quiet: bool,
               as_json: bool) -> None:
    """Build the zTOC of a gzip, zstd or tar LAYER blob ('-' reads standard input)."""
    if output is None:
        output = "ztoc" if layer == "-" else os.path.basename(layer) + ".ztoc"
    size = None if layer == "-" else os.path.getsize(layer)
    name = "standard input" if layer == "-" else os.path.basename(layer)
    cancel = CancelToken()
    with Bars(quiet) as bars:
        def progress(indexed: int, read: int) -> None:
            of = f"/{human_size(size)}" if size is not None else ""
            bars.update("layer", f"zTOC of {name}", indexed, size,
                        f"{human_size(indexed)}{of} indexed, {human_size(read)} read")

        def build(_: None) -> BuildResult:
            source: BinaryIO
            # Unbuffered stdin: a read returns what the pipe has (no lock held while it
            # waits), so an interrupted build leaves nothing blocked on it.
            with (open(sys.stdin.fileno(), "rb", buffering=0, closefd=False) if layer == "-"
                  else open(layer, "rb")) as source:
                return build_ztoc(source, span_size=span_size, cancel=cancel,
                                  progress=progress if bars.enabled else None)

        # On a worker thread, so Ctrl-C is noticed at once and stops the build promptly.
        [result] = run_workers(build, [None], workers=1, cancel=cancel)
    data = encode(result.ztoc)
    with atomic_writer(output) as f:
        f.write(data)
    z = result.ztoc
    digest = sha256_digest(data)
    if as_json:
        emit_json({"digest": digest, "output": output, "size": len(data),
                   "layer_digest": result.layer_digest, "compression": z.compression.label,
                   "compressed_size": z.compressed_size,
                   "uncompressed_size": z.uncompressed_size, "entries": len(z.entries),
                   "spans": z.span_count, "span_size": span_size})
        return
    click.echo(digest)
    if not quiet:
        click.echo(f"  written to     {output} ({human_size(len(data))})")
        click.echo(f"  layer          {result.layer_digest}")
        click.echo(f"  compression    {z.compression.label}, {human_size(z.compressed_size)} "
                   f"-> {human_size(z.uncompressed_size)} of tar")
        click.echo(f"  entries        {len(z.entries)}")
        click.echo(f"  spans          {z.span_count} of {human_size(span_size)}")


@ztoc.command("info")
@click.argument("what", metavar="DIGEST|PREFIX|FILE")
@pass_app
@one_line_errors
def ztoc_info(app: App, what: str) -> None:
    """Print a zTOC (from the local store by digest, or a file) as JSON, with upstream's fields."""
    z, data, _ = _load(app, what)
    zinfo = zinfo_of(z)
    files = []
    multi = 0
    for e in z.entries:
        start, end = zinfo.span_of(e.offset), zinfo.span_of(e.offset + e.size)
        multi += start != end
        files.append({"filename": e.name, "offset": e.offset, "size": e.size, "type": e.type,
                      "start_span": start, "end_span": end})
    emit_json({
        "version": z.version,
        "build_tool": z.build_tool,
        "size": len(data),
        "span_size": zinfo.span_size,
        "num_spans": z.span_count,
        "num_files": len(z.entries),
        "num_multi_span_files": multi,
        "files": files,
    })


@ztoc.command("get-file")
@click.argument("what", metavar="DIGEST|PREFIX|FILE")
@click.argument("path")
@click.option("--layer", type=click.Path(dir_okay=False), help="The layer blob, as a file.")
@click.option("--ref", help="Read the layer lazily from this image's repository.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write the file here instead of standard output.")
@pass_app
@one_line_errors
def ztoc_get_file(app: App, what: str, path: str, layer: str | None, ref: str | None,
                  output: str | None) -> None:
    """Print the contents of PATH in a layer, read through the zTOC's checkpoints.

    The layer comes from --layer FILE, from the registry with --ref (only the
    spans holding the file are fetched), or from the local content store.
    """
    z, _, digest = _load(app, what)
    entry = find_file(z, path)
    layer_digest = None
    if digest is not None:
        rec = app.store.db.ztoc(digest)
        layer_digest = rec.layer_digest if rec else None
    if layer is not None:
        with FileBlob(layer) as blob:
            if blob.size != z.compressed_size:
                raise SociError(f"{layer} is {blob.size} bytes but the zTOC describes a "
                                f"{z.compressed_size}-byte layer")
            data = LayerReader(z, blob).read_file(entry)
    elif ref is not None:
        name = parse_image_name(ref)
        if name.ref is None or layer_digest is None:
            raise SociError("--ref needs a registry reference and a zTOC digest from the store")
        data = LayerReader(z, RegistryBlob(app.client, name.ref, layer_digest)).read_file(entry)
    elif layer_digest is not None and app.store.content.has_blob(layer_digest):
        with FileBlob(app.store.content.blob_path(layer_digest)) as blob:
            data = LayerReader(z, blob).read_file(entry)
    else:
        raise NotFoundError("the layer is not in the local store: give --layer FILE or --ref REF")
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        with atomic_writer(output) as f:
            f.write(data)


@ztoc.command("list")
@click.option("--ztoc-digest", help="Only this zTOC (a digest or its first digits).")
@click.option("--image-ref", help="Only zTOCs of indexes created for this image reference.")
@click.option("-q", "--quiet", is_flag=True, help="Print digests only.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@no_trunc_option
@pass_app
@one_line_errors
def ztoc_list(app: App, ztoc_digest: str | None, image_ref: str | None, quiet: bool,
              as_json: bool, no_trunc: bool) -> None:
    """List the zTOCs in the local store."""
    store = app.existing_store()
    records = store.db.ztocs() if store else []
    if ztoc_digest:  # a full digest or a prefix of one
        want = ztoc_digest if ztoc_digest.startswith("sha256:") else "sha256:" + ztoc_digest
        records = [r for r in records if r.digest.startswith(want)]
    if image_ref:
        name = str(parse_image_name(image_ref))
        wanted: set[str] = set()
        if store is not None:
            manifests = store.db.manifests_for_ref(name)
            wanted = {z for i in store.db.indexes(manifest_digests=manifests)
                      for z in store.db.ztocs_of_index(i.digest)}
        records = [r for r in records if r.digest in wanted]
    listing(records, quiet=quiet, as_json=as_json,
            headers=["DIGEST", "SIZE", "LAYER DIGEST", "SPAN SIZE"],
            row=lambda r: (short_digest(r.digest, no_trunc), r.size,
                           short_digest(r.layer_digest, no_trunc), r.span_size))


ztoc.add_command(ztoc_list, "ls")
