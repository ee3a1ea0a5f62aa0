"""The federation view of retained topics, against a real mosquitto."""

from __future__ import annotations

import time

import pytest

from deepfusion.cloud.registry import FederationView
from deepfusion.shared.messages import DeviceState, DeviceStatus, ReleaseNote, encode_message
from deepfusion.shared.mqtt import Message, MqttClient
from deepfusion.shared.topics import card_topic, release_topic, status_topic
from tests.cloud.federation import FED, card_for
from tests.fixtures.broker import wait_for


def _publish_retained(client: MqttClient, *devices: str, release: bool = False) -> None:
    for device in devices:
        client.publish_and_wait(card_topic(FED, device), encode_message(card_for(device)), retain=True)
    if release:
        note = ReleaseNote(federation=FED, version="v1", round=0, uri="file:///r/v1")
        client.publish_and_wait(release_topic(FED), encode_message(note), retain=True)


@pytest.mark.parametrize("subscribed", ["before connecting", "once connected"])
def test_a_reconnected_view_forgets_what_the_broker_stopped_retaining_while_it_was_away(
    broker, subscribed: str
) -> None:
    """The broker resends what it retains to a client that comes back, and nothing for a topic cleared
    meanwhile (a closed round, a removed device): the view must not keep those for ever. Services
    subscribe it before connecting (ingest) or after (status)."""
    with MqttClient(broker.config(), "publisher") as publisher:
        _publish_retained(publisher, "pi-a", "pi-b", release=True)
    view = FederationView(FED, refresh_quiet_s=0.3)
    watcher = MqttClient(broker.config(), "watcher")
    if subscribed == "before connecting":
        view.subscribe(watcher)
    watcher.connect()
    if subscribed == "once connected":
        view.subscribe(watcher)
    try:
        view.wait_settled(0.3)
        assert set(view.cards()) == {"pi-a", "pi-b"} and view.release is not None
        # Down while everything is cleared but pi-a's card: a broker that comes back without its
        # database holds exactly what is published again.
        broker.stop()
        (broker.workdir / "mosquitto.db").unlink()
        broker.start()
        with MqttClient(broker.config(), "publisher-2") as publisher:
            _publish_retained(publisher, "pi-a")
        wait_for(lambda: set(view.cards()) == {"pi-a"}, 20, "pi-b's card to be dropped")
        wait_for(lambda: view.release is None, 5, "the release to be dropped")
        assert view.devices()["pi-a"].card == card_for("pi-a")  # heard again: kept
    finally:
        watcher.close()


def test_a_release_or_round_of_another_federation_on_our_topic_is_refused() -> None:
    """Like a garbled one: the view holds nothing valid there, and the coordinator publishes its own."""
    view = FederationView(FED)
    ours = ReleaseNote(federation=FED, version="v1", round=0, uri="file:///r/v1")
    view.handle(Message(release_topic(FED), encode_message(ours), qos=1, retain=True))
    assert view.release == ours
    foreign = ReleaseNote(federation="other", version="v9", round=0, uri="file:///r/v9")
    view.handle(Message(release_topic(FED), encode_message(foreign), qos=1, retain=True))
    assert view.release is None


def test_live_traffic_does_not_put_off_dropping_what_a_reconnect_did_not_bring_back() -> None:
    """The end of the broker's burst of retained messages is told by a quiet time. The statuses that
    devices keep publishing (every few seconds each: a large fleet never pauses) are live traffic, not
    the burst, and must not keep a round or release cleared while the view was away in it for ever."""
    view = FederationView(FED, refresh_quiet_s=0.2)
    note = ReleaseNote(federation=FED, version="v1", round=0, uri="file:///r/v1")
    view.handle(Message(release_topic(FED), encode_message(note), qos=1, retain=True))
    view._reconnected()  # the broker came back without the release
    status = encode_message(DeviceStatus(federation=FED, device="pi-a", state=DeviceState.SCORING))
    deadline = time.monotonic() + 2
    while view.release is not None and time.monotonic() < deadline:
        view.handle(Message(status_topic(FED, "pi-a"), status, qos=1, retain=False))
        time.sleep(0.05)
    assert view.release is None
