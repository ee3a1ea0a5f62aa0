"""`deepfusion-cloud simulate`: a whole federation on this machine, and the comparison that judges it.

The real services run as separate processes (edge agents, ingest, coordinator, trainer) through a real
MQTT broker (an embedded mosquitto unless `--broker` names one) and an object store (a local folder
unless `--store` names one). See `deepfusion.cloud.sim` for the parts and `configs/*.toml` for the
profiles.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

import typer
from rich.console import Console

__all__ = ["simulate"]


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM's default action ends the process at once, skipping the `finally` blocks that stop the
    # services, the agents and the embedded broker: they were left running, mosquitto still listening.
    raise SystemExit(128 + signum)


def simulate(
    profile: str | None = typer.Option(
        None,
        "--profile",
        "--preset",
        help="Profile: demo (the default: 8 devices, 2 cores), quick (for tests), real (SmolLM2, GPU) or a "
        "TOML path.",
    ),
    quick: bool = typer.Option(False, "--quick", help="Shorthand for --profile quick."),
    devices: int = typer.Option(
        None, min=2, max=64, help="Number of devices (the profile's device template is cycled)."
    ),
    broker: str = typer.Option(
        None, help="Broker as mqtt://HOST:PORT; default: start an embedded mosquitto."
    ),
    store: str = typer.Option(
        None, help="Object store (folder, file://PATH or s3://BUCKET/PREFIX); default results/<run>/store."
    ),
    out: Path = typer.Option(Path("results"), help="Results folder; the run writes results/<profile>/."),
    drop: str = typer.Option(
        None, help="Kill this device's agent mid-round (the round closes on its quorum)."
    ),
    poison: str = typer.Option(
        None,
        help="Make this device hostile: valid packets whose knowledge is pushed towards one token. The "
        "report adds the release trained without the screening that quarantines it.",
    ),
    secure: bool = typer.Option(
        False,
        help="Run the broker over TLS with one credential per device and service and ACLs "
        "(`deepfusion-cloud pki init` / `device add` into results/<run>/work/security).",
    ),
    baselines: bool = typer.Option(True, help="Train the comparison (control, centralized, KD, paper mode)."),
    workers: int = typer.Option(2, min=1, help="Processes for device builds and baselines (one core each)."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Profile override KEY=VALUE, e.g. student.steps=50."
    ),
) -> None:
    """Run a federation on this machine: devices fine-tune their models, score public text and publish
    knowledge packets over MQTT; the cloud ingests, clusters, distills, merges and releases an MoE; then
    every baseline is trained and evaluated the same way and a report is written."""
    from deepfusion.cloud.sim.profile import load_profile
    from deepfusion.cloud.sim.run import SimOptions, simulate_run
    from deepfusion.shared.config import ConfigError
    from deepfusion.shared.store import StoreError

    console = Console()
    if quick and profile not in (None, "quick"):
        console.print(
            f"[bold red]error:[/] --quick is --profile quick; it cannot run with --profile {profile}"
        )
        raise typer.Exit(2)
    try:
        chosen = load_profile("quick" if quick else profile or "demo", overrides)
    except (ConfigError, FileNotFoundError) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    options = SimOptions(
        devices=devices,
        broker=broker,
        store=store,
        out=out,
        drop=drop,
        poison=poison,
        secure=secure,
        baselines=baselines,
        workers=workers,
    )
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        simulate_run(chosen, options, console)
    except (ValueError, RuntimeError, TimeoutError, StoreError) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
