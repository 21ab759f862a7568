"""``soci prefetch`` (ls, info), and reading ``--prefetch-file`` / ``--prefetch-files-json``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import click

from soci.cli.context import App, no_trunc_option, one_line_errors, pass_app, short_digest
from soci.cli.output import emit_json, listing
from soci.errors import NotFoundError, SociError
from soci.oci import boundedjson
from soci.prefetch.local import list_prefetch_artifacts, prefetch_info
from soci.registry.reference import validate_digest

#: A list of paths is small; refuse anything that is not (before reading it whole).
MAX_FILES_JSON = 16 << 20


def load_prefetch_files(files: Iterable[str], json_path: str | None) -> list[str]:
    """The paths of ``--prefetch-file`` and then those of ``--prefetch-files-json`` (a JSON
    array of strings), trimmed, empty ones dropped, as upstream reads them."""
    paths = [f.strip() for f in files if f.strip()]
    if json_path:
        path = Path(json_path)
        try:
            if path.stat().st_size > MAX_FILES_JSON:
                raise SociError(f"--prefetch-files-json {json_path}: larger than "
                                f"{MAX_FILES_JSON} bytes")
            data = path.read_bytes()
        except OSError as e:
            raise SociError(f"--prefetch-files-json {json_path}: {e.strerror}") from None
        try:
            doc = boundedjson.loads(data, f"--prefetch-files-json {json_path}")
        except ValueError as e:
            raise SociError(f"--prefetch-files-json {json_path}: not valid JSON ({e})") from None
        if not isinstance(doc, list) or not all(isinstance(p, str) for p in doc):
            raise SociError(f"--prefetch-files-json {json_path}: must be a JSON array of "
                            "strings")
        paths += [p.strip() for p in doc if p.strip()]
    return paths


@click.group()
def prefetch() -> None:
    """List and inspect prefetch artifacts in the local store."""


@prefetch.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print digests only.")
@no_trunc_option
@pass_app
@one_line_errors
def prefetch_list(app: App, as_json: bool, quiet: bool, no_trunc: bool) -> None:
    """List the prefetch artifacts of the SOCI indexes in the local store."""
    store = app.existing_store()
    entries = list_prefetch_artifacts(store) if store is not None else []
    listing(entries, quiet=quiet, as_json=as_json,
            headers=["DIGEST", "LAYER DIGEST", "SPANS", "CREATED"],
            row=lambda e: (short_digest(e.digest, no_trunc), short_digest(e.layer_digest,
                                                                          no_trunc),
                           "N/A" if e.total_spans < 0 else e.total_spans, e.created_at))


prefetch.add_command(prefetch_list, "ls")


@prefetch.command("info")
@click.argument("digest")
@click.option("--json", "as_json", is_flag=True, help="Also print the artifact's JSON.")
@pass_app
@one_line_errors
def prefetch_info_cmd(app: App, digest: str, as_json: bool) -> None:
    """Show a prefetch artifact: its layer, size and span ranges."""
    validate_digest(digest)
    store = app.existing_store()
    if store is None:
        raise NotFoundError(f"{digest} is not in {app.config.root} (no store there)")
    entry, artifact = prefetch_info(store, digest)
    click.echo(f"Digest:        {entry.digest}")
    click.echo(f"Version:       {artifact.version}")
    click.echo(f"Span Ranges:   {len(artifact.spans)}")
    click.echo(f"Layer Digest:  {entry.layer_digest}")
    click.echo(f"Size:          {entry.size} bytes")
    click.echo(f"Created:       {entry.created_at}")
    click.echo("")
    click.echo("Prefetch Spans:")
    for i, s in enumerate(artifact.spans):
        click.echo(f"  [{i}] StartSpan: {s.start}, EndSpan: {s.end} (covers {s.count} spans)")
        if s.priority:
            click.echo(f"      Priority: {s.priority}")
    click.echo(f"\nTotal spans to prefetch: {artifact.total_spans}")
    if as_json:
        click.echo("\nRaw JSON:")
        emit_json(artifact.to_json())
