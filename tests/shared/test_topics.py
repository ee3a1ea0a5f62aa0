"""Topic names: every builder round-trips through the parser; unsafe ids never reach a topic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepfusion.shared import topics as t

ids = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True)

DEVICE_BUILDERS = [
    (t.card_topic, t.TopicKind.CARD),
    (t.status_topic, t.TopicKind.STATUS),
    (t.knowledge_topic, t.TopicKind.KNOWLEDGE),
    (t.ack_topic, t.TopicKind.ACK),
    (t.command_topic, t.TopicKind.COMMAND),
]
FEDERATION_BUILDERS = [
    (t.round_topic, t.TopicKind.ROUND),
    (t.release_topic, t.TopicKind.RELEASE),
    (t.metrics_topic, t.TopicKind.METRICS),
]


@given(federation=ids, device=ids)
def test_device_topics_round_trip(federation, device):
    for build, kind in DEVICE_BUILDERS:
        topic = build(federation, device)
        assert topic.startswith(f"deepfusion/v1/{federation}/devices/{device}/")
        assert t.parse_topic(topic) == t.TopicName(kind, federation, device)
        assert len(topic.split("/")) <= 7 and not topic.startswith("/")


@given(federation=ids)
def test_federation_topics_round_trip(federation):
    for build, kind in FEDERATION_BUILDERS:
        assert t.parse_topic(build(federation)) == t.TopicName(kind, federation)


def test_topics_are_the_documented_ones():
    assert t.round_topic("fed") == "deepfusion/v1/fed/rounds/current"
    assert t.release_topic("fed") == "deepfusion/v1/fed/releases/latest"
    assert t.metrics_topic("fed") == "deepfusion/v1/fed/trainer/metrics"
    assert t.knowledge_topic("fed", "pi-1") == "deepfusion/v1/fed/devices/pi-1/knowledge"
    assert t.ack_topic("fed", "pi-1") == "deepfusion/v1/fed/devices/pi-1/acks"
    assert t.device_filter("fed", t.TopicKind.CARD) == "deepfusion/v1/fed/devices/+/card"
    assert (
        t.shared_subscription("ingest", t.device_filter("fed", t.TopicKind.KNOWLEDGE))
        == "$share/ingest/deepfusion/v1/fed/devices/+/knowledge"
    )


@pytest.mark.parametrize(
    "bad", ["", "a/b", "a+b", "dev#1", "+", "#", "Upper", "with space", "-lead", "x" * 65, "é", "a\x00b"]
)
def test_unsafe_ids_are_refused(bad):
    with pytest.raises(t.InvalidTopic):
        t.knowledge_topic("fed", bad)
    with pytest.raises(t.InvalidTopic):
        t.round_topic(bad)


def test_longest_id_is_accepted():
    assert t.parse_topic(t.status_topic("f", "d" * 64)).device == "d" * 64


@pytest.mark.parametrize(
    "bad",
    [
        "deepfusion/v2/fed/rounds/current",
        "deepfusion/v1/fed/rounds/next",
        "deepfusion/v1/fed/devices/pi/secrets",
        "deepfusion/v1/fed/devices/+/card",
        "deepfusion/v1/Fed/rounds/current",
        "/deepfusion/v1/fed/rounds/current",
        "deepfusion/v1/fed/devices/pi/card/extra",
        "deepfusion/v1",
    ],
)
def test_parser_refuses_foreign_topics(bad):
    with pytest.raises(t.InvalidTopic):
        t.parse_topic(bad)


def test_device_filter_needs_a_device_topic():
    with pytest.raises(t.InvalidTopic):
        t.device_filter("fed", t.TopicKind.ROUND)
