"""Commands of the long-running cloud services: `ingest`, `coordinator`, `status` and `shards`.

Every command reads one config (`--config FILE`, TOML) with dotted overrides (`--set mqtt.port=1884`,
repeatable); see `deepfusion.cloud.settings`. SIGTERM and Ctrl-C stop a service cleanly: ingest stores
and acks what it has received, and both write their state before they exit.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from deepfusion.cloud.settings import CloudConfig, load_cloud_config
from deepfusion.shared.config import ConfigError
from deepfusion.shared.mqtt import MqttError
from deepfusion.shared.store import StoreError
from deepfusion.shared.topics import InvalidTopic, validate_id

__all__ = ["coordinator", "ingest", "shards_app", "status"]

ConfigOption = typer.Option(None, "--config", "-c", help="TOML config file.", exists=True, dir_okay=False)
SetOption = typer.Option(None, "--set", "-s", help="Override one key: KEY=VALUE (dotted, repeatable).")


def _config(path: Path | None, overrides: list[str] | None) -> CloudConfig:
    try:
        return load_cloud_config(path, overrides)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(code=2) from None


F = TypeVar("F", bound=Callable[..., Any])


def _clear_errors(command: F) -> F:
    """A broker that cannot be reached or a store that fails ends the command with its one-line reason
    (which says where and why) and exit status 1, not a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (MqttError, StoreError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


@_clear_errors
def ingest(
    config: Path | None = ConfigOption,
    overrides: list[str] | None = SetOption,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every packet."),
) -> None:
    """Ingest knowledge packets: MQTT shared subscription -> checks -> object store -> Ack."""
    from deepfusion.cloud.ingest_service import IngestService

    cfg = _config(config, overrides)
    _logging(verbose)
    IngestService(cfg).run(_stop_on_signals())


@_clear_errors
def coordinator(
    config: Path | None = ConfigOption,
    overrides: list[str] | None = SetOption,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every step."),
) -> None:
    """Coordinate the federation: registry, phase I clusters, rounds, coverage, releases."""
    from deepfusion.cloud.coordinator import Coordinator

    cfg = _config(config, overrides)
    _logging(verbose)
    Coordinator(cfg).run(_stop_on_signals())


@_clear_errors
def status(
    config: Path | None = ConfigOption,
    overrides: list[str] | None = SetOption,
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh live until Ctrl-C."),
) -> None:
    """Show devices, the current round's coverage and the latest release."""
    from deepfusion.cloud.registry import FederationView
    from deepfusion.cloud.status import StatusWatch, collect_status, render_status
    from deepfusion.shared.mqtt import MqttClient
    from deepfusion.shared.store import open_store

    cfg = _config(config, overrides)
    store = open_store(cfg.store)
    view = FederationView(cfg.federation)
    console = Console()
    with MqttClient(cfg.mqtt, f"status-{cfg.federation}-{time.monotonic_ns() % 10**9}") as client:
        view.subscribe(client)
        view.wait_settled(cfg.status.settle_s)
        if not watch:
            console.print(render_status(collect_status(view, store, cfg.federation)))
            return
        stop = _stop_on_signals()
        screens = StatusWatch(view, store, cfg.federation, lambda: client.connected)
        with Live(screens.screen(), console=console) as live:
            while not stop.wait(cfg.status.refresh_s):
                live.update(screens.screen())


def _shard_name(name: str) -> str:
    """Checked as the first shard's id, before any text is read or published."""
    try:
        validate_id(f"{name}-0000", "shard name")
    except InvalidTopic as exc:
        raise typer.BadParameter(str(exc)) from None
    return name


def _check_source(source: Path, limit: int | None) -> None:
    """Read the whole file once before publishing: a bad line found halfway would leave the first shards
    published and the rest not, and an empty file would publish nothing and still exit 0."""
    from itertools import islice

    from deepfusion.cloud.shards import read_texts
    from deepfusion.shared.textfiles import TextFileError

    found = False
    try:
        for text in islice(read_texts(source), limit):
            found = found or bool(text.strip())
    except TextFileError as exc:
        raise typer.BadParameter(str(exc), param_hint="source") from None
    if not found:
        raise typer.BadParameter(f"{source} holds no text", param_hint="source")


shards_app = typer.Typer(help="Public text shards in the object store.", no_args_is_help=True)


@shards_app.command("publish")
@_clear_errors
def shards_publish(
    source: Path = typer.Argument(..., exists=True, dir_okay=False, help='.jsonl (a "text" field) or text.'),
    name: str = typer.Option(
        ..., "--name", callback=_shard_name, help="Shard name prefix: NAME-0000, NAME-0001, ..."
    ),
    per_shard: int = typer.Option(1000, min=1, help="Sequences per shard."),
    limit: int | None = typer.Option(None, min=1, help="Publish at most this many texts."),
    config: Path | None = ConfigOption,
    overrides: list[str] | None = SetOption,
) -> None:
    """Publish public text from a local file as shards `{fed}/shards/{name}-NNNN.jsonl.zst`."""
    from itertools import islice

    from deepfusion.cloud.shards import publish_texts, read_texts
    from deepfusion.shared.store import open_store

    cfg = _config(config, overrides)
    _check_source(source, limit)
    refs = publish_texts(
        open_store(cfg.store),
        cfg.federation,
        islice(read_texts(source), limit),
        name=name,
        per_shard=per_shard,
    )
    for ref in refs:
        typer.echo(f"{ref.shard}\t{ref.sequences}\t{ref.sha256}")


@shards_app.command("list")
@_clear_errors
def shards_list(config: Path | None = ConfigOption, overrides: list[str] | None = SetOption) -> None:
    """List the shards rounds are planned on."""
    from deepfusion.cloud.shards import list_shards
    from deepfusion.shared.store import open_store

    cfg = _config(config, overrides)
    table = Table("shard", "sequences", "sha256")
    for ref in list_shards(open_store(cfg.store), cfg.federation):
        table.add_row(ref.shard, str(ref.sequences), ref.sha256[:16])
    Console().print(table)
