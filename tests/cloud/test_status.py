"""`deepfusion-cloud status --watch` follows the federation live and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from deepfusion.cloud.registry import FederationView
from deepfusion.cloud.status import StatusWatch, collect_status, render_status
from deepfusion.shared.messages import ReleaseNote, encode_message
from deepfusion.shared.mqtt import Message, MqttClient
from deepfusion.shared.store import open_store
from deepfusion.shared.topics import card_topic, release_topic
from tests.cloud.federation import FED, SimDevice, base_overrides, card_for
from tests.fixtures.broker import wait_for

pytestmark = pytest.mark.mqtt


def _start_status(broker, store_dir: Path, *args: str) -> subprocess.Popen[str]:
    overrides = [*base_overrides(broker, str(store_dir)), "status.refresh_s=0.2"]
    return subprocess.Popen(
        [sys.executable, "-m", "deepfusion.cloud.cli", "status", *args]
        + [arg for item in overrides for arg in ("--set", item)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"},
    )


def _watch(broker, store_dir: Path, meanwhile: Callable[[], object]) -> str:
    """The output of `status --watch` that ran through `meanwhile` and then ended on SIGTERM with 0.

    Off a terminal, rich prints the live screen once, as it was last refreshed."""
    watch = _start_status(broker, store_dir, "--watch")
    try:
        wait_for(lambda: "as status-fed-" in broker.log_file.read_text(), 30, "status to connect")
        time.sleep(1.0)  # past its settle time: the first screen is drawn
        meanwhile()
        time.sleep(1.5)  # several refreshes
        watch.send_signal(signal.SIGTERM)
        out, err = watch.communicate(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
    assert watch.returncode == 0, err[-2000:]
    return out


def _break(pointer: Path) -> None:
    """Make the round pointer unreadable: a symlink to itself fails with ELOOP, which the local store
    reports as a StoreError, as the S3 store reports a dropped connection."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.symlink_to(pointer.name)


def test_status_watch_shows_a_device_that_joins_after_it_started(broker, tmp_path: Path) -> None:
    early = SimDevice(broker.config(), "pi-early")
    early.publish_card()
    devices = [early]

    def join() -> None:
        devices.append(SimDevice(broker.config(), "pi-late"))
        devices[-1].publish_card()

    try:
        out = _watch(broker, tmp_path / "store", join)
    finally:
        for device in devices:
            device.client.close()
    assert "pi-early" in out and "pi-late" in out, out


def test_view_settles_on_every_retained_card_even_after_a_slow_connect(broker) -> None:
    """The quiet time starts once connected: a view subscribed long before its connection returned still
    waits for the broker's burst of retained cards instead of reporting an empty federation."""
    with MqttClient(broker.config(), "publisher") as publisher:
        for i in range(20):
            card = card_for(f"pi-{i:02d}")
            publisher.publish_and_wait(card_topic(FED, card.device), encode_message(card), retain=True)
    view = FederationView(FED)
    client = MqttClient(broker.config(), "watcher")
    view.subscribe(client)
    time.sleep(0.6)  # longer than the quiet time below, as a connection over TLS to a far broker takes
    client.connect()
    try:
        view.wait_settled(0.5)
        assert len(view.cards()) == 20
    finally:
        client.close()


def test_a_card_with_an_absurd_parameter_count_does_not_break_the_status(tmp_path: Path) -> None:
    """A card is the device's own: a 400-digit model_params (float() of it overflows) is refused."""
    view = FederationView(FED)
    for device, params in (("pi-1", "2500000"), ("pi-odd", "1" + "0" * 400)):
        payload = encode_message(card_for(device)).replace(
            b'"model_params":2500000', b'"model_params":' + params.encode()
        )
        view.handle(Message(card_topic(FED, device), payload, qos=1, retain=True))
    assert set(view.cards()) == {"pi-1"}
    console = Console(width=200, record=True)
    console.print(render_status(collect_status(view, open_store(str(tmp_path / "store")), FED)))
    assert "llama 2.5M" in console.export_text()


def test_markup_in_a_card_or_release_is_shown_as_written(tmp_path: Path) -> None:
    """A card's model_family is the device's own text: "[/]" must not break the table for everybody,
    nor "[red]" restyle it, and a release's metric names show in full."""
    view = FederationView(FED)
    for device, family in (("pi-1", "llama[/]"), ("pi-2", "[bold red]gpt2")):
        card = card_for(device).model_copy(update={"model_family": family})
        view.handle(Message(card_topic(FED, device), encode_message(card), qos=1, retain=True))
    note = ReleaseNote(federation=FED, version="v1", round=0, uri="file:///r/[v1]", metrics={"acc[moe]": 0.5})
    view.handle(Message(release_topic(FED), encode_message(note), qos=1, retain=True))
    console = Console(width=200, record=True)
    console.print(render_status(collect_status(view, open_store(str(tmp_path / "store")), FED)))
    text = console.export_text()
    assert "llama[/] 2.5M" in text and "[bold red]gpt2 2.5M" in text
    assert "file:///r/[v1]" in text and "acc[moe]" in text


def test_status_watch_keeps_refreshing_after_a_store_error(broker, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    pointer = store_dir / FED / "coordinator.json"
    devices: list[SimDevice] = []

    def fail_then_recover() -> None:
        _break(pointer)
        time.sleep(1.0)  # several refreshes fail
        pointer.unlink()
        devices.append(SimDevice(broker.config(), "pi-late"))
        devices[-1].publish_card()

    try:
        out = _watch(broker, store_dir, fail_then_recover)
    finally:
        for device in devices:
            device.client.close()
    assert "pi-late" in out and "cannot read the store" not in out, out


def test_status_watch_says_when_the_broker_is_away(broker, tmp_path: Path) -> None:
    out = _watch(broker, tmp_path / "store", broker.stop)
    assert "the MQTT broker is unreachable, reconnecting" in out, out
    assert "Devices of federation 'fed'" in out, out


def test_status_once_ends_a_store_error_with_one_line(broker, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    _break(store_dir / FED / "coordinator.json")
    once = _start_status(broker, store_dir)
    out, err = once.communicate(timeout=60)
    assert once.returncode == 1, (out, err)
    assert err.startswith("error: cannot read object 'fed/coordinator.json'"), err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_status_watch_shows_a_failed_refresh_above_the_last_status(tmp_path: Path) -> None:
    view = FederationView(FED)
    view.handle(Message(card_topic(FED, "pi-1"), encode_message(card_for("pi-1")), qos=1, retain=True))
    store_dir = tmp_path / "store"
    connected = True
    screens = StatusWatch(view, open_store(str(store_dir)), FED, lambda: connected)

    def shown() -> str:
        console = Console(width=200, record=True)
        console.print(screens.screen())
        return console.export_text()

    assert "pi-1" in shown()
    _break(store_dir / FED / "coordinator.json")
    text = shown()
    assert "cannot read the store: cannot read object 'fed/coordinator.json'" in text
    assert "pi-1" in text
    connected = False
    assert "the MQTT broker is unreachable" in shown()
    (store_dir / FED / "coordinator.json").unlink()
    connected = True
    text = shown()
    assert "pi-1" in text and "cannot read" not in text and "unreachable" not in text
