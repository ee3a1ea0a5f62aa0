"""Config loading: TOML + dotted overrides, validated once, every bad key named."""

from __future__ import annotations

import re

import pytest
from pydantic import Field

from deepfusion.shared.config import (
    ConfigError,
    MqttConfig,
    Section,
    StoreConfig,
    TlsConfig,
    apply_overrides,
    load_config,
    mqtt_toml,
)


class DeviceSection(Section):
    name: str = "pi-1"
    threads: int = Field(2, ge=1)


class ExampleConfig(Section):
    device: DeviceSection = DeviceSection()
    mqtt: MqttConfig = MqttConfig()
    store: StoreConfig = StoreConfig()


def test_defaults_without_a_file():
    cfg = load_config(ExampleConfig)
    assert cfg.mqtt.port == 1883 and cfg.mqtt.protocol == "auto"


def test_file_then_overrides(tmp_path):
    path = tmp_path / "device.toml"
    path.write_text('[device]\nname = "jetson-3"\n[mqtt]\nhost = "broker.example"\nport = 8883\n')
    cfg = load_config(
        ExampleConfig,
        path,
        [
            "mqtt.port=1884",
            "device.threads=4",
            'mqtt.username="edge"',
            "mqtt.tls.insecure=true",
            "store.uri=s3://b/p",
        ],
    )
    assert cfg.device.name == "jetson-3"
    assert cfg.mqtt.host == "broker.example" and cfg.mqtt.port == 1884
    assert cfg.device.threads == 4
    assert cfg.mqtt.username == "edge"
    assert cfg.mqtt.tls is not None and cfg.mqtt.tls.insecure is True
    assert cfg.store.uri == "s3://b/p"  # not TOML, so kept as a plain string


def test_every_bad_key_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[mqtt]\nport = "eighteen"\nprotocol = "4"\n[devices]\nname = "typo"\n')
    with pytest.raises(ConfigError) as info:
        load_config(ExampleConfig, path, ["device.threads=0"])
    message = str(info.value)
    for where in ("mqtt.port", "mqtt.protocol", "devices", "device.threads", str(path)):
        assert where in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "does not exist"), ("[mqtt\nport=1", "not valid TOML")],
)
def test_unreadable_files(tmp_path, content, expected):
    path = tmp_path / "device.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=expected):
        load_config(ExampleConfig, path)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("mqtt://broker.example:1883", "not a URL; set mqtt.port, and mqtt.tls for TLS"),
        ("mqtts://broker.example", "not a URL"),
        ("broker.example:1883", "without a port; set mqtt.port"),
        ("[::1]:1883", "without a port"),
        ("", "at least 1 character"),
    ],
)
def test_a_broker_url_or_port_in_mqtt_host_is_refused(host, expected):
    """Accepted before, it failed only at connect, as "mqtt://mqtt://broker.example:1883:1883"."""
    with pytest.raises(ConfigError, match=r"mqtt\.host: .*" + re.escape(expected)):
        load_config(ExampleConfig, overrides=[f'mqtt.host="{host}"'])


@pytest.mark.parametrize("host", ["broker.example", "10.0.0.7", "::1", "fe80::1%eth0"])
def test_host_names_and_addresses_are_accepted(host):
    assert load_config(ExampleConfig, overrides=[f'mqtt.host="{host}"']).mqtt.host == host


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError):
        apply_overrides({}, [bad])


def test_override_cannot_descend_into_a_value():
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"mqtt": {"port": 1}}, ["mqtt.port.x=2"])


def test_overrides_do_not_mutate_the_input():
    data = {"mqtt": {"port": 1}}
    assert apply_overrides(data, ["mqtt.port=2"]) == {"mqtt": {"port": 2}}
    assert data == {"mqtt": {"port": 1}}


def test_mqtt_toml_reads_back_any_password_username_and_path(tmp_path):
    written = MqttConfig(
        host="broker.example",
        port=8883,
        username='dev "1" \\ \t ü',
        password="key-\U0001f511-\x7f-end",
        tls=TlsConfig(ca_file=tmp_path / "ca-\U00020000.pem", insecure=True),
    )
    path = tmp_path / "device.toml"
    path.write_text(mqtt_toml(written), encoding="utf-8")
    read = load_config(ExampleConfig, path).mqtt
    assert read == written
    assert read.password is not None and read.password.get_secret_value() == "key-\U0001f511-\x7f-end"
