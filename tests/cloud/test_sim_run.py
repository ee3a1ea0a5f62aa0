"""`deepfusion-cloud simulate`'s checks of its options, before any asset or device is built."""

from __future__ import annotations

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
