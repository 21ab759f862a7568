"""``soci store status``: what a running soci-store has mounted, from its status endpoint."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import click

from soci.cli.context import one_line_errors
from soci.cli.output import emit_json, human_size, table
from soci.errors import SociError
from soci.store.daemon import DEFAULT_METRICS_ADDRESS


@click.group()
def store() -> None:
    """Talk to a running soci-store."""


@store.command("status")
@click.option("--address", default=DEFAULT_METRICS_ADDRESS, show_default=True,
              help="The store's --metrics-address.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
@one_line_errors
def status(address: str, as_json: bool) -> None:
    """List mounted layers with their images and how much of each is fetched."""
    try:
        with urllib.request.urlopen(f"http://{address}/status", timeout=10) as resp:
            doc = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise SociError(f"no soci-store status at {address}: {e}") from None
    if as_json:
        emit_json(doc)
        return
    click.echo(f"mounted at {doc['mountpoint']}: {len(doc['layers'])} layers")
    table(["IMAGE", "LAYER", "FILES", "SPANS", "FETCHED", "BYTES FETCHED", "USERS"],
          [(la["image"], la["layer"][:19], la["files"], la["spans"],
            f"{la['fetched_fraction']:.0%}", human_size(la["fetched_bytes"]), la["users"])
           for la in doc["layers"]])
