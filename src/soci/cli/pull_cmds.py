"""``soci pull``: pull an image into containerd for the SOCI snapshotter (upstream's
``soci image rpull``)."""

from __future__ import annotations

import click

from soci.cli.context import App, one_line_errors, pass_app
from soci.cli.output import Bars, human_size
from soci.containerd.client import DEFAULT_ADDRESS, DEFAULT_NAMESPACE, Containerd
from soci.containerd.pull import DEFAULT_SNAPSHOTTER, LayerResult, PullOptions, pull_image
from soci.errors import SociError
from soci.oci.descriptor import Platform
from soci.registry import Reference


@click.command()
@click.argument("ref")
@click.option("--soci-index-digest", default=None, metavar="DIGEST",
              help="The SOCI index to use (passed to the snapshotter as a label); by default "
                   "the snapshotter finds one itself.")
@click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
              help="The platform to pull [default: this host's].")
@click.option("-n", "--namespace", default=DEFAULT_NAMESPACE, show_default=True,
              envvar="CONTAINERD_NAMESPACE", help="containerd namespace.")
@click.option("-a", "--address", default=DEFAULT_ADDRESS, show_default=True,
              envvar="CONTAINERD_ADDRESS", help="containerd's gRPC socket.")
@click.option("--snapshotter", default=DEFAULT_SNAPSHOTTER, show_default=True,
              envvar="CONTAINERD_SNAPSHOTTER", help="The snapshotter to unpack for.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and the final line.")
@pass_app
@one_line_errors
def pull(app: App, ref: str, soci_index_digest: str | None, platform: str | None,
         namespace: str, address: str, snapshotter: str, quiet: bool) -> None:
    """Pull REF (a registry reference) into containerd through its API, so that the SOCI
    snapshotter mounts layers lazily; ``ctr run --snapshotter soci REF ...`` then starts it.

    Registry options (``--plain-http``, registries.conf, credentials) are soci's global ones.
    """
    try:
        reference = Reference.parse(ref.removeprefix("docker://"))
    except ValueError as e:
        raise SociError(str(e)) from None
    options = PullOptions(snapshotter=snapshotter,
                          platform=Platform.parse(platform) if platform else None,
                          soci_index_digest=soci_index_digest)

    bars = Bars(quiet)

    def progress(downloaded: int) -> None:
        bars.update("pull", f"pulling {reference}", downloaded, None,
                    f"{human_size(downloaded)} downloaded")

    def on_layer(layer: LayerResult) -> None:
        if quiet:
            return
        what = {"lazy": f"lazy (mounted by {snapshotter})",
                "unpacked": f"fetched and unpacked by {snapshotter}",
                "pulled": f"pulled {human_size(layer.downloaded)}",
                "present": "already present"}[layer.status]
        if layer.status == "pulled" and layer.downloaded == 0:
            what = "pulled (blob was in the content store)"
        bars.echo(f"layer {layer.index} {layer.digest} {what}")

    with Containerd(address, namespace) as containerd, bars:
        result = pull_image(containerd, app.client, reference, options,
                            on_layer=on_layer, progress=progress if bars.enabled else None)
    summary = ", ".join(f"{result.count(s)} {s}"
                        for s in ("lazy", "unpacked", "pulled", "present")
                        if result.count(s))
    click.echo(f"{result.name} {result.target.digest} ({result.platform}) "
               f"for {snapshotter} in {result.seconds:.1f}s: {summary or 'no layers'}, "
               f"{human_size(result.downloaded)} downloaded")
