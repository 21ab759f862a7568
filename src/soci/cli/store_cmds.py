"""``soci store status``: what a running soci-store has mounted, from its status endpoint."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import click

from soci.cli.context import App, one_line_errors, pass_app, short_digest
from soci.cli.output import emit_json, human_size, table
from soci.errors import SociError
from soci.store.credentials import send_credentials
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
          [(la["image"], short_digest(la["layer"]), la["files"], la["spans"],
            f"{la['fetched_fraction']:.0%}", human_size(la["fetched_bytes"]), la["users"])
           for la in doc["layers"]])


@store.command("credentials")
@click.argument("ref")
@click.option("-u", "--username", required=True)
@click.option("--password-stdin", is_flag=True, required=True,
              help="Read the password (or token) from standard input.")
@click.option("--socket", "socket_path", default=None,
              help="The store's credentials socket [default: ROOT/credentials.sock].")
@pass_app
@one_line_errors
def credentials(app: App, ref: str, username: str, password_stdin: bool,
                socket_path: str | None) -> None:
    """Hand registry credentials for REF's repository to a running soci-store."""
    password = click.get_text_stream("stdin").read().rstrip("\n")
    path = socket_path or os.path.join(app.config.root, "credentials.sock")
    try:
        send_credentials(path, ref, username, password)
    except (OSError, ValueError) as e:
        raise SociError(f"soci-store did not take the credentials ({path}): {e}") from None
    click.echo(f"credentials for {ref} handed to soci-store")
