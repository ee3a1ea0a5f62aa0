"""The cloud's config refuses, with a message naming the key, what would only fail once a service runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepfusion.cloud.cli import app
from deepfusion.cloud.settings import load_cloud_config
from deepfusion.shared.broker import free_port
from deepfusion.shared.config import ConfigError


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("federation=Demo", "federation"),
        ('federation="a/b"', "federation"),
        ('ingest.share_group="all+"', "ingest.share_group"),
        ("ingest.worker_id=", "ingest.worker_id"),  # `--set ingest.worker_id=$WORKER`, unset
        ('ingest.worker_id="../w"', "ingest.worker_id"),
    ],
)
def test_an_id_that_cannot_name_a_topic_level_or_key_is_a_config_error(override: str, key: str) -> None:
    """Each would otherwise end a service with a traceback once it subscribes, connects or writes."""
    with pytest.raises(ConfigError, match=rf"(?m)^  {key}: "):
        load_cloud_config(None, [override])


def test_a_service_started_with_a_bad_federation_id_says_so_without_a_traceback(tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["ingest", "--set", "federation=Demo", "--set", f'store.uri="{store}"'])
    assert result.exit_code == 2, result.output
    assert "federation: Value error, federation id 'Demo' must be lowercase" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("command", ["ingest", "coordinator", "status"])
def test_a_service_that_cannot_reach_the_broker_says_where_without_a_traceback(
    command: str, tmp_path: Path
) -> None:
    port = free_port("127.0.0.1")  # nothing listens there
    overrides = ["--set", f"mqtt.port={port}", "--set", f'store.uri="{tmp_path / "store"}"']
    result = CliRunner().invoke(app, [command, *overrides])
    assert result.exit_code == 1, result.output
    assert f"error: cannot reach the MQTT broker at mqtt://127.0.0.1:{port}" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    "key",
    [
        "ingest.context_wait_s",
        "ingest.stats_interval_s",
        "coordinator.round_s",
        "coordinator.tick_s",
        "status.refresh_s",
    ],
)
@pytest.mark.parametrize("value", ["inf", "1e300"])
def test_a_wait_too_long_for_a_timer_or_a_date_is_a_config_error(key: str, value: str) -> None:
    """TOML's `inf` reads as "wait forever", but `Event.wait` and datetimes overflow on it mid-run."""
    with pytest.raises(ConfigError, match=rf"(?m)^  {key}: "):
        load_cloud_config(None, [f"{key}={value}"])


def test_the_defaults_and_the_documented_example_still_load() -> None:
    config = load_cloud_config(
        None, ["federation=demo", "ingest.share_group=ingest-2", "coordinator.round_s=3600"]
    )
    assert config.federation == "demo" and config.ingest.share_group == "ingest-2"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["coordinator.stages=65"], "coordinator.stages: Input should be less than or equal to 64"),
        (["coordinator.patches=1025"], "coordinator.patches: Input should be less than or equal to 1024"),
        (["coordinator.top_k=4097"], "coordinator.top_k: Input should be less than or equal to 4096"),
        (
            ["coordinator.top_k=4096", "coordinator.max_tokens=4096"],
            "coordinator: Value error, max_tokens=4096 at top_k=4096",
        ),
        (
            ["coordinator.packet_budget=2000000"],
            "coordinator.packet_budget=2000000 is above ingest.max_packet_bytes=1048576",
        ),
    ],
)
def test_round_settings_no_device_or_ingest_could_satisfy_are_a_config_error(
    overrides: list[str], message: str
) -> None:
    """The packet codec's limits: the coordinator would otherwise publish a round whose packets no
    device can build, or that ingest refuses one by one."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_cloud_config(None, overrides)


def test_round_settings_at_the_codecs_limits_load() -> None:
    config = load_cloud_config(
        None,
        [
            "coordinator.top_k=4096", "coordinator.stages=64", "coordinator.patches=1024",
            "coordinator.max_tokens=2046", "coordinator.packet_budget=4000000",
            "ingest.max_packet_bytes=4000000",
        ],
    )  # fmt: skip
    assert config.coordinator.top_k == 4096 and config.coordinator.packet_budget == 4_000_000
