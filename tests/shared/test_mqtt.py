"""MqttClient and EmbeddedBroker against real brokers: mosquitto 2.x (MQTT 5) and amqtt (MQTT 3.1.1 only)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from deepfusion.shared.broker import EmbeddedBroker, free_port
from deepfusion.shared.config import MqttConfig
from deepfusion.shared.mqtt import MqttClient, MqttError, Will
from deepfusion.shared.topics import card_topic, knowledge_topic, round_topic, status_topic
from tests.fixtures.broker import AmqttBroker, Inbox, wait_for

pytestmark = pytest.mark.mqtt

FED = "fed-test"


def test_retained_message_reaches_late_subscriber_and_empty_payload_clears_it(broker, mqtt_client):
    topic = round_topic(FED)
    publisher = mqtt_client(broker.config(), "coordinator")
    publisher.publish_and_wait(topic, b'{"round": 1}', retain=True)

    late = Inbox()
    mqtt_client(broker.config(), "device-1").subscribe(topic, late)
    (message,) = late.wait_count(1)
    assert message.payload == b'{"round": 1}'
    assert message.retain is True

    publisher.publish_and_wait(topic, b"", retain=True)  # an empty retained payload clears it

    later = Inbox()
    watcher = mqtt_client(broker.config(), "device-2")
    watcher.subscribe(topic, later)
    # A retained message would be delivered before anything published after the SUBACK.
    watcher.publish_and_wait(topic, b"marker")
    first = later.wait_count(1)[0]
    assert first.payload == b"marker"
    assert first.retain is False


_WILL_CHILD = textwrap.dedent(
    """
    import sys, time
    from deepfusion.shared.config import MqttConfig
    from deepfusion.shared.mqtt import MqttClient, Will
    port, topic = int(sys.argv[1]), sys.argv[2]
    client = MqttClient(MqttConfig(port=port), "device-a", will=Will(topic, b"offline"))
    client.connect()
    client.publish_and_wait(topic, b"online", retain=True)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_last_will_fires_on_abrupt_disconnect(broker, mqtt_client):
    topic = status_topic(FED, "device-a")
    watched = Inbox()
    mqtt_client(broker.config(), "watcher").subscribe(topic, watched)

    child = subprocess.Popen(
        [sys.executable, "-c", _WILL_CHILD, str(broker.port), topic],
        stdout=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        watched.wait_until(lambda msgs: b"online" in [m.payload for m in msgs], what="online status")
        child.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker must publish the will
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()

    messages = watched.wait_until(lambda msgs: msgs[-1].payload == b"offline", what="the will")
    assert [m.payload for m in messages] == [b"online", b"offline"]

    late = Inbox()
    mqtt_client(broker.config(), "late-watcher").subscribe(topic, late)
    (retained,) = late.wait_count(1)
    assert (retained.payload, retained.retain) == (b"offline", True)


def test_clean_close_does_not_fire_the_will(broker, mqtt_client):
    topic = status_topic(FED, "device-b")
    watched = Inbox()
    watcher = mqtt_client(broker.config(), "watcher")
    watcher.subscribe(topic, watched)

    device = mqtt_client(broker.config(), "device-b", will=Will(topic, b"offline"))
    device.publish_and_wait(topic, b"online", retain=True)
    device.close()
    assert not device.connected

    watcher.publish_and_wait(topic, b"marker")  # anything the close caused arrives before this
    messages = watched.wait_until(lambda msgs: b"marker" in [m.payload for m in msgs], what="marker")
    assert [m.payload for m in messages] == [b"online", b"marker"]

    late = Inbox()
    mqtt_client(broker.config(), "late-watcher").subscribe(topic, late)
    assert late.wait_count(1)[0].payload == b"online"


def test_persistent_session_receives_qos1_messages_published_while_away(broker, mqtt_client):
    topic = knowledge_topic(FED, "device-1")
    first = Inbox()
    consumer = mqtt_client(broker.config(), "ingest-0", clean_start=False)
    consumer.subscribe(topic, first)
    consumer.close()

    publisher = mqtt_client(broker.config(), "device-1")
    sent = [f"packet-{i}".encode() for i in range(50)]
    for payload in sent:
        publisher.publish_and_wait(topic, payload, qos=1)

    back = Inbox()
    returning = mqtt_client(broker.config(), "ingest-0", clean_start=False, connect=False)
    returning.subscribe(topic, back)  # before connect: the queue is delivered right after CONNACK
    returning.connect()
    received = back.wait_count(len(sent))
    assert sorted(m.payload for m in received) == sorted(sent)
    assert all(m.qos == 1 for m in received)
    assert first.messages == []


def test_client_reconnects_by_itself_after_a_broker_restart(broker, mqtt_client, caplog):
    caplog.set_level(logging.INFO, logger="deepfusion.shared.mqtt")
    config = broker.config(reconnect_min_s=0.05, reconnect_max_s=0.5)
    topic = card_topic(FED, "device-1")
    inbox = Inbox()
    client = mqtt_client(config, "device-1")
    client.subscribe(topic, inbox)
    client.publish_and_wait(topic, b"card-v1", retain=True)
    inbox.wait_count(1)

    broker.restart()
    wait_for(lambda: client.connected, timeout=15, what="the client to reconnect")
    # Its own subscription is re-issued before this publish on the same connection.
    client.publish_and_wait(topic, b"card-v2", timeout=15)
    inbox.wait_until(lambda msgs: msgs[-1].payload == b"card-v2", what="the post-restart message")
    connects = [
        r
        for r in caplog.records
        if r.getMessage().startswith("mqtt connected") and "device-1" in r.getMessage()
    ]
    assert len(connects) >= 2, "the client never lost its connection: the restart did not happen"

    # With persistence on, the retained message published before the restart survives it.
    fresh = Inbox()
    mqtt_client(broker.config(), "device-2").subscribe(topic, fresh)
    assert fresh.wait_count(1)[0].payload == b"card-v1"


def test_subscribe_whose_suback_was_lost_with_the_connection_returns_after_the_reconnect(broker, mqtt_client):
    """The broker never answers a SUBSCRIBE and the connection drops: subscribe() asks again on the new
    connection instead of waiting out its timeout for a SUBACK that cannot come."""
    topic = status_topic(FED, "device-1")
    client = mqtt_client(broker.config(reconnect_min_s=0.05, reconnect_max_s=0.2), "watcher")
    inbox = Inbox()
    outcome: list[BaseException | None] = []

    def subscribe() -> None:
        try:
            client.subscribe(topic, inbox, timeout=8)
            outcome.append(None)
        except MqttError as exc:
            outcome.append(exc)

    frozen = broker._process
    assert frozen is not None
    frozen.send_signal(signal.SIGSTOP)  # the SUBSCRIBE reaches the broker, which never answers it
    subscribing = threading.Thread(target=subscribe)
    subscribing.start()
    time.sleep(0.3)
    broker.kill()  # the connection drops with the SUBACK still owed
    broker.start()
    restarted = time.monotonic()
    subscribing.join(10)
    assert outcome == [None]
    assert time.monotonic() - restarted < 4, "subscribe() waited for the SUBACK of the lost connection"
    mqtt_client(broker.config(), "device-1").publish_and_wait(topic, b"online")
    assert inbox.wait_count(1)[0].payload == b"online"


def test_120_kib_payload_arrives_byte_identical(broker, mqtt_client):
    topic = knowledge_topic(FED, "device-1")
    inbox = Inbox()
    mqtt_client(broker.config(), "ingest-0").subscribe(topic, inbox)
    payload = os.urandom(120 * 1024)
    mqtt_client(broker.config(), "device-1").publish_and_wait(topic, payload, qos=1)
    (message,) = inbox.wait_count(1)
    assert message.payload == payload


def test_burst_of_2000_qos1_messages_all_arrive(broker, mqtt_client):
    """Guards the queue-limit trap: mosquitto silently drops QoS 1 messages past max_queued_messages.

    With mosquitto's default limit (1000) this consumer loses about 40% of the burst.
    """
    topic = knowledge_topic(FED, "device-1")
    inbox = Inbox()

    def ingest(message):
        time.sleep(0.001)  # validating and storing a packet takes time: the broker's queue fills up
        inbox(message)

    consumer = mqtt_client(broker.config(), "ingest-0", clean_start=False)
    consumer.subscribe(topic, ingest)

    publisher = mqtt_client(broker.config(), "device-1")
    count, filler = 2000, os.urandom(1024 - 4)
    infos = [publisher.publish(topic, i.to_bytes(4, "big") + filler, qos=1) for i in range(count)]
    for info in infos:
        info.wait_for_publish(20)
        assert info.is_published()

    received = inbox.wait_count(count, timeout=30)
    assert sorted({int.from_bytes(m.payload[:4], "big") for m in received}) == list(range(count))
    assert all(len(m.payload) == 1024 for m in received)


def test_close_right_after_publishing_still_delivers_every_qos1_message(broker, mqtt_client):
    """A service that publishes its last Acks and stops at once: close() waits for them to be confirmed."""
    topic = knowledge_topic(FED, "device-1")
    inbox = Inbox()
    mqtt_client(broker.config(), "ingest-0").subscribe(topic, inbox)
    publisher = MqttClient(broker.config(), "device-1")
    publisher.connect()
    count, filler = 300, os.urandom(16 * 1024)
    for i in range(count):
        publisher.publish(topic, i.to_bytes(4, "big") + filler, qos=1)
    publisher.close()
    received = inbox.wait_count(count, timeout=20)
    assert sorted(int.from_bytes(m.payload[:4], "big") for m in received) == list(range(count))


def test_auto_protocol_falls_back_to_3_1_1_on_a_3_1_1_only_broker(amqtt_broker: AmqttBroker, mqtt_client):
    topic = status_topic(FED, "device-1")
    client = mqtt_client(amqtt_broker.config(protocol="auto"), "device-1")
    assert client.protocol_version == "3.1.1"
    inbox = Inbox()
    client.subscribe(topic, inbox)
    client.publish_and_wait(topic, b"hello over 3.1.1")
    assert inbox.wait_count(1)[0].payload == b"hello over 3.1.1"

    with pytest.raises(MqttError, match="does not accept MQTT 5"):
        MqttClient(amqtt_broker.config(protocol="5"), "device-2").connect(timeout=5)


def test_protocol_5_against_mosquitto(broker, mqtt_client):
    assert mqtt_client(broker.config(protocol="5"), "device-1").protocol_version == "5"
    assert mqtt_client(broker.config(protocol="auto"), "device-2").protocol_version == "5"
    assert mqtt_client(broker.config(protocol="3.1.1"), "device-3").protocol_version == "3.1.1"


def test_handler_exception_does_not_stop_delivery(broker, mqtt_client, caplog):
    topic = status_topic(FED, "device-1")
    inbox = Inbox()

    def flaky(message):
        inbox(message)
        if message.payload == b"boom":
            raise ValueError("handler bug")

    client = mqtt_client(broker.config(), "watcher")
    client.subscribe(topic, flaky)
    client.publish_and_wait(topic, b"boom")
    client.publish_and_wait(topic, b"after")
    assert [m.payload for m in inbox.wait_count(2)] == [b"boom", b"after"]
    assert any("handler failed" in r.getMessage() for r in caplog.records)
    assert client.connected


def test_connect_to_a_closed_port_fails_fast_with_a_clear_error():
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(MqttError, match=rf"cannot reach the MQTT broker at mqtt://127\.0\.0\.1:{port}"):
        MqttClient(MqttConfig(port=port), "device-1").connect(timeout=5)
    assert time.monotonic() - start < 2


def test_refused_credentials_raise(tmp_path):
    locked = EmbeddedBroker(workdir=tmp_path / "locked", extra_config=["allow_anonymous false"])
    with (
        locked,
        pytest.raises(MqttError, match=r"refused the connection: Not authorized; check mqtt\.username"),
    ):
        MqttClient(locked.config(), "device-1").connect(timeout=5)


def test_publish_after_close_raises(broker, mqtt_client):
    client = mqtt_client(broker.config(), "device-1")
    client.close()
    with pytest.raises(MqttError, match="closed"):
        client.publish_and_wait(status_topic(FED, "device-1"), b"late")
    with pytest.raises(MqttError, match="closed"):
        client.connect()
