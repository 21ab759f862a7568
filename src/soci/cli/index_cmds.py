"""``soci index`` (list, info, rm) and ``soci rebuild-db``."""

from __future__ import annotations

import json

import click

from soci.artifacts import LocalStore
from soci.artifacts.rebuild import rebuild_db as rebuild
from soci.cli.context import App, no_trunc_option, one_line_errors, pass_app, short_digest
from soci.cli.output import listing
from soci.errors import NotFoundError
from soci.image.names import parse_image_name
from soci.oci.descriptor import Platform
from soci.prefetch.local import listed_prefetches, unused_prefetches


@click.group()
def index() -> None:
    """List, inspect and remove SOCI indexes in the local store."""


@index.command("list")
@click.option("--ref", help="Only indexes created for this image reference.")
@click.option("--platform", help="Only indexes for this platform (os/arch[/variant]).")
@click.option("-q", "--quiet", is_flag=True, help="Print digests only.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@no_trunc_option
@pass_app
@one_line_errors
def index_list(app: App, ref: str | None, platform: str | None, quiet: bool,
               as_json: bool, no_trunc: bool) -> None:
    """List the SOCI indexes in the local store.

    SOURCE is "local" for indexes made or placed here (used for their image manifest from
    any repository), or the repository an index was fetched from (used for that one only).
    """
    manifests = None
    store = app.existing_store()
    if ref is not None:
        name = str(parse_image_name(ref))
        manifests = store.db.manifests_for_ref(name) if store else []
    records = store.db.indexes(manifest_digests=manifests) if store else []
    if platform is not None:
        want = Platform.parse(platform)
        records = [r for r in records if r.platform and Platform.parse(r.platform).matches(want)]
    listing(records, quiet=quiet, as_json=as_json,
            headers=["DIGEST", "SIZE", "IMAGE MANIFEST", "PLATFORM", "ARTIFACT TYPE", "CREATED",
                     "SOURCE"],
            row=lambda r: (short_digest(r.digest, no_trunc), r.size,
                           short_digest(r.manifest_digest, no_trunc), r.platform,
                           r.artifact_type, r.created_at, r.source or "local"))
    if not records and store is not None:
        _hint_empty(store, ref)


def _hint_empty(store: LocalStore, ref: str | None) -> None:
    """Why an empty listing may be wrong, on stderr: a database that lost what the content
    store holds, or a --ref that names the image otherwise than ``create`` did."""
    if not store.db.indexes() and (store.mappings.items() or store.fetched.items()):
        click.echo(f"Hint: the database of {store.root} lists no SOCI index, but its content "
                   "store has some: run soci rebuild-db", err=True)
    elif ref is not None:
        name = str(parse_image_name(ref))
        tail = name.rpartition("/")[2]
        similar = [r for r in store.db.refs() if r.rpartition("/")[2] == tail]
        if similar:
            click.echo(f"Hint: no index for {name}; there are some for "
                       f"{', '.join(similar[:3])}", err=True)


index.add_command(index_list, "ls")


def earlier_indexes_note(store: LocalStore, manifest_digest: str, new_digest: str) -> str | None:
    """What a second ``create`` of one image did with the first index, in one line. As
    upstream soci does, both are kept (the database is keyed by index digest); this image's
    mapping now names the new one, so push and the daemons use it."""
    older = [r.digest for r in store.db.indexes(manifest_digests=[manifest_digest])
             if r.digest != new_digest and not r.source]
    if not older:
        return None
    shown = " ".join(short_digest(d) for d in older)
    return (f"Note: kept {len(older)} earlier SOCI index(es) of this image ({shown}); push "
            f"and soci-store use the new one; soci index rm {shown} removes the old")


@index.command("info")
@click.argument("digest")
@pass_app
@one_line_errors
def index_info(app: App, digest: str) -> None:
    """Print a SOCI index manifest (DIGEST may be a unique prefix, as 7e98a66a)."""
    digest = app.resolve_digest(digest, "SOCI index")
    store = app.existing_store()
    if store is None:
        raise NotFoundError(f"SOCI index {digest} is not in {app.config.root} (no store there)")
    if store.db.ztoc(digest) is not None:
        raise NotFoundError(f"{digest} is a zTOC: use soci ztoc info")
    click.echo(json.dumps(json.loads(store.content.read_blob(digest)), indent=2))


@index.command("rm")
@click.argument("digests", nargs=-1, required=True)
@pass_app
@one_line_errors
def index_rm(app: App, digests: tuple[str, ...]) -> None:
    """Remove SOCI indexes (and the zTOCs and prefetch artifacts no remaining index uses);
    digests may be unique prefixes."""
    store = app.store
    # Two spellings (or prefixes) of one digest remove it once, not fail the second time.
    wanted = list(dict.fromkeys(app.resolve_digest(d, "SOCI index") for d in digests))
    # Prefetch artifacts may be shared between indexes, so which ones nothing lists any more
    # is only known once every removal is done: found then with one pass over the indexes
    # left, and done even when a later digest fails, so an earlier one leaves nothing behind.
    candidates: list[str] = []
    try:
        for digest in wanted:
            if store.db.index(digest) is None and not store.content.has_blob(digest):
                raise NotFoundError(f"no SOCI index {digest} in {store.root}")
            candidates += listed_prefetches(store, digest)
            orphans = store.db.remove_index(digest)
            for manifest_digest, index_digest in store.mappings.items():
                if index_digest == digest:
                    store.mappings.remove(manifest_digest)
            store.fetched.remove_index(digest)
            store.content.delete_blob(digest)
            for z in orphans:
                store.content.delete_blob(z)
            click.echo(f"removed {digest}" + (f" and {len(orphans)} zTOCs" if orphans else ""))
    finally:
        unused = unused_prefetches(store, candidates)
        for p in unused:
            store.content.delete_blob(p)
        if unused:
            click.echo(f"removed {len(unused)} prefetch artifacts no index lists")


@click.command("rebuild-db")
@pass_app
@one_line_errors
def rebuild_db(app: App) -> None:
    """Rebuild the artifacts database from the content store and the mapping files."""
    indexes, ztocs = rebuild(app.store)
    click.echo(f"found {indexes} SOCI indexes and {ztocs} zTOCs in {app.store.root}")
