"""`deepfusion-edge run -c a.toml -c b.toml`: several devices hosted in one process, against a real broker.

Each device is a real agent on the tiny model with its own MQTT client and spool; the process is a real
child process, so signals and exit codes are the ones a simulator sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepfusion.shared.broker import EmbeddedBroker
from deepfusion.shared.config import ConfigError
from deepfusion.shared.messages import DeviceCard, DeviceState, DeviceStatus, decode_message
from deepfusion.shared.mqtt import Message
from deepfusion.shared.topics import TopicKind, device_filter, status_topic
from tests.edge.test_agent import FED, AgentProcess, write_config
from tests.fixtures.broker import Inbox


class HostProcess(AgentProcess):
    """`deepfusion-edge run -c A -c B ...` in a child process, log in a file."""

    def __init__(self, configs: list[Path], log: Path) -> None:
        super().__init__(configs[0], log)
        self.configs = configs

    def start(self) -> HostProcess:
        args = [sys.executable, "-c", "from deepfusion.edge.cli import main; main()", "run"]
        for config in self.configs:
            args += ["-c", str(config)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)


def device_config(tmp_path: Path, broker: EmbeddedBroker, model: Path, device: str) -> Path:
    """A device config in its own folder (own spool and state), written with test_agent's helper."""
    folder = tmp_path / device
    folder.mkdir()
    return write_config(folder / "device.toml", broker, model, device={"id": device})


@pytest.fixture
def hosts() -> Iterator[list[HostProcess]]:
    started: list[HostProcess] = []
    yield started
    for host in started:
        if host.process is not None and host.process.poll() is None:
            host.process.kill()
            host.process.wait(10)


def _cards(messages: list[Message]) -> dict[str, DeviceCard]:
    cards = (decode_message(DeviceCard, m.payload) for m in messages if m.topic.endswith("/card"))
    return {card.device: card for card in cards}


def _retained_states(broker: EmbeddedBroker, mqtt_client, devices: list[str]) -> dict[str, DeviceState]:
    """The retained status of each device, as a late subscriber sees it."""
    inbox = Inbox()
    watcher = mqtt_client(broker.config(), f"late-{time.monotonic_ns()}")
    topics = {status_topic(FED, device) for device in devices}
    for topic in topics:
        watcher.subscribe(topic, inbox)
    # A status the device publishes while the watcher subscribes arrives live too, with the retain
    # flag off, and may come first: the state a late subscriber is handed is the retained copy.
    messages = inbox.wait_until(
        lambda ms: {m.topic for m in ms if m.retain} >= topics, what="a retained status of each device"
    )
    retained = [m for m in messages if m.retain]
    return {m.topic.split("/")[-2]: decode_message(DeviceStatus, m.payload).state for m in retained}


def _card_watcher(broker: EmbeddedBroker, mqtt_client) -> Inbox:
    """Every card of the federation; a watcher that subscribes late gets the retained ones."""
    inbox = Inbox()
    watcher = mqtt_client(broker.config(), f"cards-{time.monotonic_ns()}")
    watcher.subscribe(device_filter(FED, TopicKind.CARD), inbox)
    return inbox


@pytest.mark.slow
def test_two_devices_in_one_process_join_and_stop_together(
    broker: EmbeddedBroker, tiny_llama: Path, tmp_path: Path, mqtt_client, hosts
) -> None:
    configs = [device_config(tmp_path, broker, tiny_llama, d) for d in ("dev-a", "dev-b")]
    live = _card_watcher(broker, mqtt_client)
    host = HostProcess(configs, tmp_path / "host.log").start()
    hosts.append(host)
    live.wait_until(lambda ms: len(_cards(ms)) == 2, timeout=60, what="both cards")

    messages = _card_watcher(broker, mqtt_client).wait_count(2)  # and both are retained
    assert all(m.retain for m in messages)
    assert sorted(_cards(messages)) == ["dev-a", "dev-b"]
    assert all(card.federation == FED for card in _cards(messages).values())
    assert _retained_states(broker, mqtt_client, ["dev-a", "dev-b"]) == {
        "dev-a": DeviceState.ONLINE,
        "dev-b": DeviceState.ONLINE,
    }

    assert host.stop() == 0
    assert _retained_states(broker, mqtt_client, ["dev-a", "dev-b"]) == {
        "dev-a": DeviceState.OFFLINE,
        "dev-b": DeviceState.OFFLINE,
    }
    text = host.text()
    assert "agent stopped device=dev-a" in text and "agent stopped device=dev-b" in text
    assert (tmp_path / "dev-a" / "spool").is_dir() and (tmp_path / "dev-b" / "spool").is_dir()


@pytest.mark.slow
def test_a_missing_model_fails_one_device_and_the_other_keeps_running(
    broker: EmbeddedBroker, tiny_llama: Path, tmp_path: Path, mqtt_client, hosts
) -> None:
    good = device_config(tmp_path, broker, tiny_llama, "dev-good")
    bad = device_config(tmp_path, broker, tmp_path / "no-such-model", "dev-bad")
    cards = _card_watcher(broker, mqtt_client)
    host = HostProcess([bad, good], tmp_path / "host.log").start()
    hosts.append(host)
    host.wait_log("agent failed device=dev-bad", timeout=60)
    assert "no-such-model does not exist" in host.text()

    assert sorted(_cards(cards.wait_count(1, timeout=60))) == ["dev-good"]
    time.sleep(0.5)
    assert host.process is not None and host.process.poll() is None  # the good device runs on
    assert _retained_states(broker, mqtt_client, ["dev-good"]) == {"dev-good": DeviceState.ONLINE}

    assert host.stop() == 1  # one device failed
    assert _retained_states(broker, mqtt_client, ["dev-good"]) == {"dev-good": DeviceState.OFFLINE}
    assert sorted(_cards(cards.messages)) == ["dev-good"]
    assert "1 of 2 agents failed: dev-bad" in host.text()


def test_a_bad_second_config_exits_2_before_any_device_starts(
    broker: EmbeddedBroker, tmp_path: Path, mqtt_client, hosts
) -> None:
    model = tmp_path / "model"  # never loaded: no device starts
    first = device_config(tmp_path, broker, model, "dev-a")
    second = device_config(tmp_path, broker, model, "dev-b")
    second.write_text(second.read_text().replace("[device]\n", "[device]\nbogus = 1\n"))
    host = HostProcess([first, second], tmp_path / "host.log").start()
    hosts.append(host)
    assert host.wait_exit() == 2
    text = host.text()
    assert text.startswith("error: ") and str(second) in text and "bogus" in text
    assert "agent joined" not in text and "agent stopped" not in text  # nothing was started

    cards = _card_watcher(broker, mqtt_client)
    time.sleep(0.5)  # retained cards would arrive at once
    assert cards.messages == []


def test_the_same_device_id_twice_exits_2(broker: EmbeddedBroker, tmp_path: Path, hosts) -> None:
    model = tmp_path / "model"
    first = device_config(tmp_path, broker, model, "dev-a")
    (tmp_path / "copy").mkdir()
    second = write_config(tmp_path / "copy" / "device.toml", broker, model, device={"id": "dev-a"})
    host = HostProcess([first, second], tmp_path / "host.log").start()
    hosts.append(host)
    assert host.wait_exit() == 2
    text = host.text()
    assert "device id 'dev-a'" in text and str(first) in text and str(second) in text


def test_hosted_configs_get_one_thread_and_every_override(broker: EmbeddedBroker, tmp_path: Path) -> None:
    from deepfusion.edge.agent import _load_configs

    model = tmp_path / "model"
    unset = device_config(tmp_path, broker, model, "dev-a")
    unset.write_text(unset.read_text().replace("threads = 1\n", ""))
    explicit = write_config(
        tmp_path / "device.toml", broker, model, device={"id": "dev-b"}, model={"threads": 3}
    )
    overrides = ["uplink.status_interval_s=3.5"]

    hosted = _load_configs([unset, explicit], overrides)
    assert [cfg.model.threads for cfg in hosted] == [1, 3]  # N agents x all cores would oversubscribe
    assert [cfg.uplink.status_interval_s for cfg in hosted] == [3.5, 3.5]
    (alone,) = _load_configs([unset], overrides)
    assert alone.model.threads is None  # one device alone: the runtime's choice, as before

    shared = write_config(tmp_path / "dev-a" / "other.toml", broker, model, device={"id": "dev-c"})
    with pytest.raises(ConfigError, match="each hosted device needs its own spool"):
        _load_configs([unset, shared], [])
