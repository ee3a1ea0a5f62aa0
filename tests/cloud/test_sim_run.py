"""`deepfusion-cloud simulate`'s checks of its options, before any asset or device is built."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepfusion.cloud.cli import app


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--store", "ftp://bucket/run"], "unsupported scheme 'ftp'"),
        (["--broker", "mqtt://localhost:18x3"], "--broker mqtt://localhost:18x3: expected mqtt://HOST:PORT"),
    ],
    ids=["store", "broker"],
)
def test_a_bad_store_or_broker_fails_before_the_assets(
    option: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """They were first used after the assets and devices were built (minutes to hours); a bad store
    then ended the run in a traceback (its error is neither a ValueError nor a RuntimeError)."""

    def assets(*_: object) -> None:
        raise AssertionError("the assets were prepared before the store and broker were checked")

    monkeypatch.setattr("deepfusion.cloud.sim.assets.prepare_assets", assets)
    result = CliRunner().invoke(app, ["simulate", "--quick", "--out", str(tmp_path), *option])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert message in " ".join(result.output.split())


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("what", ["broker", "store"])
def test_an_unreachable_store_or_broker_fails_before_the_assets(
    what: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only their syntax was checked early: an unreachable broker or S3 endpoint failed the run after the
    assets and every device build."""

    def assets(*_: object) -> None:
        raise AssertionError("the assets were prepared before the store and broker were reached")

    monkeypatch.setattr("deepfusion.cloud.sim.assets.prepare_assets", assets)
    url = f"127.0.0.1:{_closed_port()}"
    if what == "store":
        pytest.importorskip("boto3")
        # boto3 reads the endpoint from the environment: a local port where nothing listens.
        env = {"AWS_ENDPOINT_URL": f"http://{url}", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
        for name, value in {**env, "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        option, message = ["--store", "s3://bucket/run"], f"the S3 endpoint http://{url} is unreachable"
    else:
        option, message = ["--broker", f"mqtt://{url}"], f"cannot reach the MQTT broker at mqtt://{url}"
    result = CliRunner().invoke(app, ["simulate", "--quick", "--out", str(tmp_path), *option])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert message in " ".join(result.output.split())


def test_quick_with_another_profile_is_refused() -> None:
    """`--quick` is `--profile quick`: with `--profile real` it used to run the quick profile silently."""
    result = CliRunner().invoke(app, ["simulate", "--quick", "--profile", "real"])
    assert result.exit_code == 2, result.output
    assert "--quick is --profile quick; it cannot run with --profile real" in result.output


def test_the_cloud_config_holds_any_store_path(tmp_path: Path) -> None:
    from deepfusion.cloud.settings import load_cloud_config
    from deepfusion.cloud.sim.profile import load_profile
    from deepfusion.cloud.sim.run import _cloud_toml
    from deepfusion.shared.config import MqttConfig

    store = str(tmp_path / 'store "x"\\y')
    path = tmp_path / "cloud.toml"
    path.write_text(_cloud_toml(load_profile("quick", []), MqttConfig(), store, 4))
    assert load_cloud_config(path).store.uri == store


def test_a_rerun_starts_without_the_earlier_runs_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The logs folder kept an earlier run's files (hostile.log, devices-2.log, trainer-r1.log) beside the
    new run's, and a failed rerun left the earlier report.md and metrics.json as if they were its own."""

    def assets(*_: object) -> None:
        raise RuntimeError("stopped at the assets")

    monkeypatch.setattr("deepfusion.cloud.sim.assets.prepare_assets", assets)
    run = tmp_path / "quick"
    earlier = ["report.md", "metrics.json", "plots/clusters.png", "logs/hostile.log", "release/config.json"]
    for name in [*earlier, "work/devices/med-00/build.json"]:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("earlier run")
    result = CliRunner().invoke(app, ["simulate", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "stopped at the assets" in result.output, result.output
    assert not any((run / name.split("/")[0]).exists() for name in earlier)
    assert (run / "work/devices/med-00/build.json").read_text() == "earlier run"  # the device cache stays


def test_sigterm_stops_the_run_through_its_cleanup(tmp_path: Path) -> None:
    """SIGTERM ended the simulator at once: its `finally` blocks never ran, and the services, agents and
    embedded mosquitto it had started kept running (the broker still listening)."""
    cleaned = tmp_path / "cleaned"
    script = f"""
import os, signal, time
from pathlib import Path
from typer.testing import CliRunner
import deepfusion.cloud.sim.run as run
from deepfusion.cloud.cli import app

def federation(*_):
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    finally:
        Path({str(cleaned)!r}).write_text("broker and services stopped")

run.simulate_run = federation
result = CliRunner().invoke(app, ["simulate", "--quick", "--out", {str(tmp_path)!r}])
raise SystemExit(result.exit_code)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert cleaned.read_text() == "broker and services stopped"
