"""MQTT topic names of the protocol: `deepfusion/v1/{federation}/...` (design section 4).

One builder per topic, one parser for all of them. Topics stay lowercase, at most 7 levels and without a
leading slash, so AWS IoT Core, EMQX, HiveMQ and mosquitto accept them unchanged. Identifiers are
checked before they reach a topic: a `+`, `#` or `/` inside an id would silently turn a topic into a
wildcard or shift its levels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "MAX_ID_LENGTH",
    "PREFIX",
    "InvalidTopic",
    "TopicKind",
    "TopicName",
    "ack_topic",
    "card_topic",
    "command_topic",
    "device_filter",
    "knowledge_topic",
    "metrics_topic",
    "parse_topic",
    "release_topic",
    "round_topic",
    "shared_subscription",
    "status_topic",
    "validate_id",
]

PREFIX = "deepfusion/v1"
MAX_ID_LENGTH = 64
_ID = re.compile(r"[a-z0-9][a-z0-9._-]*")


class InvalidTopic(ValueError):
    """An identifier or topic string that does not fit the protocol's topic scheme."""


class TopicKind(StrEnum):
    ROUND = "round"
    RELEASE = "release"
    METRICS = "metrics"
    CARD = "card"
    STATUS = "status"
    KNOWLEDGE = "knowledge"
    ACK = "ack"
    COMMAND = "command"


# Device-level topics: deepfusion/v1/{fed}/devices/{device}/{leaf}
_DEVICE_LEAVES = {
    TopicKind.CARD: "card",
    TopicKind.STATUS: "status",
    TopicKind.KNOWLEDGE: "knowledge",
    TopicKind.ACK: "acks",
    TopicKind.COMMAND: "commands",
}
# Federation-level topics: deepfusion/v1/{fed}/{a}/{b}
_FEDERATION_PATHS = {
    TopicKind.ROUND: ("rounds", "current"),
    TopicKind.RELEASE: ("releases", "latest"),
    TopicKind.METRICS: ("trainer", "metrics"),
}


def validate_id(value: str, what: str = "id") -> str:
    """Return `value` if it is a safe topic level: lowercase [a-z0-9._-], 1-64 chars, starting alnum."""
    if not isinstance(value, str) or not value:
        raise InvalidTopic(f"{what} must be a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidTopic(f"{what} {value[:20]!r}... is {len(value)} characters; at most {MAX_ID_LENGTH}")
    if not _ID.fullmatch(value):
        raise InvalidTopic(
            f"{what} {value!r} must be lowercase letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (no '/', '+', '#', spaces or upper case: they break MQTT topics)"
        )
    return value


def _federation(federation: str) -> str:
    return f"{PREFIX}/{validate_id(federation, 'federation id')}"


def _device(federation: str, device: str, kind: TopicKind) -> str:
    return f"{_federation(federation)}/devices/{validate_id(device, 'device id')}/{_DEVICE_LEAVES[kind]}"


def round_topic(federation: str) -> str:
    """Retained `RoundSpec` of the current round."""
    return f"{_federation(federation)}/rounds/current"


def release_topic(federation: str) -> str:
    """Retained `ReleaseNote` of the latest release."""
    return f"{_federation(federation)}/releases/latest"


def metrics_topic(federation: str) -> str:
    """Trainer and evaluation `Metrics` stream."""
    return f"{_federation(federation)}/trainer/metrics"


def card_topic(federation: str, device: str) -> str:
    """Retained `DeviceCard` of one device."""
    return _device(federation, device, TopicKind.CARD)


def status_topic(federation: str, device: str) -> str:
    """Retained `DeviceStatus` of one device (its Last Will marks it offline)."""
    return _device(federation, device, TopicKind.STATUS)


def knowledge_topic(federation: str, device: str) -> str:
    """Knowledge packets of one device, one packet per message, QoS 1."""
    return _device(federation, device, TopicKind.KNOWLEDGE)


def ack_topic(federation: str, device: str) -> str:
    """The cloud's `Ack` for each packet of one device."""
    return _device(federation, device, TopicKind.ACK)


def command_topic(federation: str, device: str) -> str:
    """Commands from the cloud to one device."""
    return _device(federation, device, TopicKind.COMMAND)


def device_filter(federation: str, kind: TopicKind) -> str:
    """Subscription filter for one device-level topic of every device, e.g. all cards."""
    if kind not in _DEVICE_LEAVES:
        raise InvalidTopic(f"{kind} is not a per-device topic")
    return f"{_federation(federation)}/devices/+/{_DEVICE_LEAVES[kind]}"


def shared_subscription(group: str, topic_filter: str) -> str:
    """MQTT 5 shared subscription: the broker spreads matching messages over the group's members."""
    return f"$share/{validate_id(group, 'share group')}/{topic_filter}"


@dataclass(frozen=True)
class TopicName:
    """A parsed protocol topic."""

    kind: TopicKind
    federation: str
    device: str | None = None


def parse_topic(topic: str) -> TopicName:
    """Parse a concrete protocol topic (no wildcards) into its kind, federation and device."""
    levels = topic.split("/")
    if len(levels) < 5 or "/".join(levels[:2]) != PREFIX:
        raise InvalidTopic(f"{topic!r} is not a {PREFIX}/... topic")
    federation = validate_id(levels[2], "federation id")
    rest = tuple(levels[3:])
    for kind, path in _FEDERATION_PATHS.items():
        if rest == path:
            return TopicName(kind, federation)
    if len(rest) == 3 and rest[0] == "devices":
        device = validate_id(rest[1], "device id")
        for kind, leaf in _DEVICE_LEAVES.items():
            if rest[2] == leaf:
                return TopicName(kind, federation, device)
    raise InvalidTopic(f"{topic!r} is not a known DeepFusion topic")
