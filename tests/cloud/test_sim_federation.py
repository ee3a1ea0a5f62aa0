"""The simulator's federation runner (`deepfusion.cloud.sim.federation`): real services, a real broker."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from deepfusion.cloud.sim.federation import FederationPlan, FederationRunner
from deepfusion.shared.broker import EmbeddedBroker
from deepfusion.shared.store import open_store


def _plan(
    broker: EmbeddedBroker, tmp_path: Path, devices: dict[str, Path], **extra: object
) -> FederationPlan:
    mqtt = broker.config()
    cloud = tmp_path / "cloud.toml"
    cloud.write_text(
        f'federation = "fed"\n[mqtt]\nhost = "{mqtt.host}"\nport = {mqtt.port}\n'
        f'[store]\nuri = "{tmp_path / "store"}"\n'
        f"[coordinator]\nmin_devices = {len(devices) + 1}\nmax_rounds = 1\ntick_s = 0.5\n"
    )
    return FederationPlan(
        federation="fed",
        rounds=1,
        mqtt=mqtt,
        store=open_store(str(tmp_path / "store")),
        cloud_configs={s: cloud for s in ("ingest", "coordinator", "trainer")},
        device_configs=devices,
        train_args=[],
        logs=tmp_path / "logs",
        **extra,  # type: ignore[arg-type]
    )


def test_a_drop_device_that_fails_to_start_fails_the_run_at_once(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Its host is exempt from the checks only once it is killed on purpose; before, a crash there kept
    the round from ever opening and the run waited for the whole timeout (an hour and more)."""
    bad = tmp_path / "device.toml"
    bad.write_text("not toml [[[")
    # Without the check, the run ends in the plan's TimeoutError instead of naming the crash.
    plan = _plan(broker, tmp_path, {"med-00": bad}, drop="med-00", timeout_s=60.0)
    with pytest.raises(RuntimeError, match=r"devices-0 exited with status [^0](?s:.*)not valid TOML"):
        FederationRunner(plan, Console(quiet=True)).run()
