"""`deepfusion-cloud`: the cloud side of a DeepFusion federation."""

from __future__ import annotations

import typer

from deepfusion.cloud import __version__
from deepfusion.cloud.assets_cli import data_app, models_app
from deepfusion.cloud.security_cli import device_app, pki_app
from deepfusion.cloud.services_cli import coordinator, ingest, shards_app, status
from deepfusion.cloud.simulate import simulate
from deepfusion.cloud.train_cli import train

app = typer.Typer(
    name="deepfusion-cloud",
    help=(
        "DeepFusion cloud: ingest knowledge packets from edge devices over MQTT into object storage, "
        "cluster devices into knowledge domains, distill and merge them into a Mixture-of-Experts "
        "model, and push releases back to the fleet."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"deepfusion-cloud {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """DeepFusion cloud services and tools."""


app.command()(simulate)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.command()(ingest)
app.command()(coordinator)
app.command()(status)
app.add_typer(shards_app, name="shards")
app.command()(train)
app.add_typer(pki_app, name="pki")
app.add_typer(device_app, name="device")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
