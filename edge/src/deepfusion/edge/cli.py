"""`deepfusion-edge`: what runs on a device of a DeepFusion federation."""

from __future__ import annotations

import typer

from deepfusion.edge import __version__
from deepfusion.edge.agent import run
from deepfusion.edge.inspect_packets import inspect
from deepfusion.edge.model_cli import export, finetune, info, score

app = typer.Typer(
    name="deepfusion-edge",
    help=(
        "DeepFusion edge device: fine-tune, quantize and export a local LLM, score the public text the "
        "cloud hands out, and publish compact knowledge packets over MQTT. Private text never leaves "
        "the device, and neither do the model's weights."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"deepfusion-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """DeepFusion edge device tools."""


app.command()(inspect)
app.command()(finetune)
app.command()(export)
app.command()(score)
app.command()(info)
app.command()(run)


def main() -> None:
    app()
