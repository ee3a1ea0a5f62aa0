"""The simulator's federation runner (`deepfusion.cloud.sim.federation`): real services, a real broker."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from deepfusion.cloud.sim.federation import FederationPlan, FederationRunner, _Watcher
from deepfusion.shared.broker import EmbeddedBroker
from deepfusion.shared.config import MqttConfig
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


def _trainer_runner(tmp_path: Path, timeout_s: float) -> FederationRunner:
    """A runner of no devices or services, for starting trainers by hand; logs in `tmp_path`."""
    plan = FederationPlan(
        federation="fed",
        rounds=1,
        mqtt=MqttConfig(),
        store=open_store(str(tmp_path / "store")),
        cloud_configs={},
        device_configs={},
        train_args=[],
        logs=tmp_path,
        timeout_s=timeout_s,
    )
    return FederationRunner(plan, Console(quiet=True))


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


@pytest.mark.parametrize(
    ("script", "error"),
    [
        ("import time; print('phase II', flush=True); time.sleep(60)", TimeoutError),
        ("import sys; sys.exit('no packets')", RuntimeError),
    ],
    ids=["hung", "failed"],
)
def test_a_hung_or_failed_trainer_ends_the_run_naming_its_log(
    script: str, error: type[Exception], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trainer that hangs meets the federation's deadline (the wait for it had none, so the run waited
    forever); one that fails is reported with its status. Either way the error names its log."""
    runner = _trainer_runner(tmp_path, timeout_s=1.0)
    monkeypatch.setattr(
        runner, "_cloud", lambda name, *_, **__: runner._start(name, [sys.executable, "-c", script])
    )
    started = time.perf_counter()
    try:
        with pytest.raises(error, match=rf"trainer-r0.*{tmp_path / 'trainer-r0.log'}"):
            runner._train(0, _Watcher(), started + runner.plan.timeout_s)
    finally:
        runner._stop_all()
    assert time.perf_counter() - started < 30


def test_the_trainer_gets_every_core_and_the_other_services_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer runs while the devices wait for the release: torch's default threads, not one."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runner = _trainer_runner(tmp_path, timeout_s=60.0)
    report = "import os; print('threads', os.environ.get('OMP_NUM_THREADS'), flush=True)"
    started: list[tuple[str, int | None]] = []

    def cloud(name: str, *_: str, threads: int | None = 1) -> subprocess.Popen[bytes]:
        started.append((name, threads))
        return runner._start(name, [sys.executable, "-c", report], threads)

    monkeypatch.setattr(runner, "_cloud", cloud)
    try:
        runner._train(0, _Watcher(), time.perf_counter() + runner.plan.timeout_s)
        runner._start("ingest", [sys.executable, "-c", report]).wait(timeout=30)
    finally:
        runner._stop_all()
    assert started == [("trainer-r0", None)]
    assert (tmp_path / "trainer-r0.log").read_text().strip() == "threads None"
    assert (tmp_path / "ingest.log").read_text().strip() == "threads 1"
