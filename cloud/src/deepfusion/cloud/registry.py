"""The federation as its retained topics tell it: devices (cards, status), the open round, the release.

    view = FederationView("demo")
    view.subscribe(client)               # cards, status, rounds/current, releases/latest
    view.wait_settled(quiet_s=0.3)       # the broker's burst of retained messages is over
    view.devices()["pi-7"].card.embedding

A retained message is the broker's memory of a topic, so a service that restarts reads the whole
federation back in one burst. An empty retained payload clears a topic (the coordinator clears
`rounds/current` when a round closes). A client that reconnects gets the burst again, but nothing for a
topic cleared while it was away: once the burst is over (`refresh_quiet_s` without a retained message),
the view drops what it did not hear again. Malformed messages are logged and ignored, never fatal: one bad
device must not blind the cloud to the others.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from deepfusion.shared.messages import (
    DeviceCard,
    DeviceState,
    DeviceStatus,
    MessageError,
    ReleaseNote,
    RoundSpec,
    decode_message,
)
from deepfusion.shared.mqtt import Message, MqttClient
from deepfusion.shared.topics import (
    InvalidTopic,
    TopicKind,
    device_filter,
    parse_topic,
    release_topic,
    round_topic,
)

__all__ = ["THROUGHPUT_FIELD", "DeviceRecord", "FederationView"]

log = logging.getLogger(__name__)

THROUGHPUT_FIELD = "sequences_per_s"
"""Optional extra field of a DeviceCard or DeviceStatus: public sequences the device scores per second.
Round planning balances work by it; devices that do not announce it count as equally fast."""

MAX_THROUGHPUT = 1e6
"""Announced throughputs above this count as this: far beyond any device, finite in every sum."""

T = TypeVar("T")


@dataclass(frozen=True)
class DeviceRecord:
    """One device as the cloud knows it."""

    device: str
    card: DeviceCard | None = None
    status: DeviceStatus | None = None

    @property
    def online(self) -> bool:
        return self.status is not None and self.status.state != DeviceState.OFFLINE

    @property
    def offline(self) -> bool:
        """Its last status says offline (its Last Will, or a clean goodbye); no status yet is not that."""
        return self.status is not None and self.status.state == DeviceState.OFFLINE

    @property
    def throughput(self) -> float | None:
        """Announced sequences per second (status first: it is the fresher), or None.

        A device writes this field itself: anything but a finite positive number (JSON's 1e400 parses
        as inf) is ignored, and the rest is capped, so one device cannot upset the round's plan.
        """
        for message in (self.status, self.card):
            value = (message.model_extra or {}).get(THROUGHPUT_FIELD) if message is not None else None
            if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf:
                return float(min(value, MAX_THROUGHPUT))  # float() of a 400-digit JSON int overflows
        return None


class FederationView:
    """Thread-safe latest state of one federation's retained topics, updated by MQTT handlers."""

    def __init__(self, federation: str, refresh_quiet_s: float = 1.0) -> None:
        self.federation = federation
        self.refresh_quiet_s = refresh_quiet_s
        self._cond = threading.Condition()
        self._devices: dict[str, DeviceRecord] = {}
        self._round: RoundSpec | None = None
        self._release: ReleaseNote | None = None
        self._version = 0
        # When the last retained message (the burst after a subscribe) arrived. Live messages, delivered
        # without the retain flag, do not count: a large fleet's statuses would never leave a quiet time.
        self._last_retained = time.monotonic()
        # Topics heard since the last reconnect, (kind, device); None when no refresh is under way.
        self._heard: set[tuple[TopicKind, str | None]] | None = None

    # -- reading -------------------------------------------------------------------------------------

    def devices(self) -> dict[str, DeviceRecord]:
        with self._cond:
            return dict(self._devices)

    def cards(self) -> dict[str, DeviceCard]:
        with self._cond:
            return {name: r.card for name, r in self._devices.items() if r.card is not None}

    @property
    def round(self) -> RoundSpec | None:
        with self._cond:
            return self._round

    @property
    def release(self) -> ReleaseNote | None:
        with self._cond:
            return self._release

    @property
    def version(self) -> int:
        """Grows by one with every change; lets a waiter tell that something happened."""
        with self._cond:
            return self._version

    def wait_for(self, predicate: Callable[[FederationView], bool], timeout: float) -> bool:
        """Block until `predicate(self)` holds (True) or `timeout` seconds pass (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def wait_settled(self, quiet_s: float, timeout: float = 10.0) -> None:
        """Wait until no retained message arrived for `quiet_s` seconds (at most `timeout`).

        The quiet time counts from this call at the earliest: retained messages start to arrive only
        after the broker answered the subscriptions, which a returning `connect()` has not waited for.
        """
        start = time.monotonic()
        deadline = start + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                quiet_until = max(self._last_retained, start) + quiet_s
                if now >= quiet_until or now >= deadline:
                    return
                self._cond.wait(min(quiet_until, deadline) - now)

    # -- updating ------------------------------------------------------------------------------------

    def subscribe(self, client: MqttClient) -> None:
        """Subscribe `client` to every retained topic of the federation (before or after connect)."""
        client.add_reconnect_listener(self._reconnected)
        client.subscribe(device_filter(self.federation, TopicKind.CARD), self.handle)
        client.subscribe(device_filter(self.federation, TopicKind.STATUS), self.handle)
        client.subscribe(round_topic(self.federation), self.handle)
        client.subscribe(release_topic(self.federation), self.handle)

    def handle(self, message: Message) -> None:
        """An MQTT handler: apply one card, status, round or release message."""
        try:
            name = parse_topic(message.topic)
        except InvalidTopic:
            return
        if name.federation != self.federation:
            return
        with self._cond:
            if self._heard is not None:
                self._heard.add((name.kind, name.device))
        try:
            self._apply(name.kind, name.device, message.payload)
        except MessageError as exc:
            log.warning("ignored malformed message topic=%s: %s", message.topic, exc)
        finally:
            with self._cond:
                if message.retain:
                    self._last_retained = time.monotonic()
                self._cond.notify_all()

    def _apply(self, kind: TopicKind, device: str | None, payload: bytes) -> None:
        if kind in (TopicKind.ROUND, TopicKind.RELEASE):
            attribute, model = ("_round", RoundSpec) if kind == TopicKind.ROUND else ("_release", ReleaseNote)
            try:
                value: RoundSpec | ReleaseNote | None = _decode_or_none(model, payload)  # type: ignore[assignment]
                if value is not None and value.federation != self.federation:
                    raise MessageError(f"{model.__name__} of federation {value.federation!r} on our topic")
            except MessageError:
                # The broker now retains nothing valid there: the view says so (devices cannot read
                # it either), and the coordinator publishes its own again.
                self._update(lambda: setattr(self, attribute, None))
                raise
            self._update(lambda: setattr(self, attribute, value))
        elif kind in (TopicKind.CARD, TopicKind.STATUS) and device is not None:
            message: DeviceCard | DeviceStatus | None = (
                _decode_or_none(DeviceCard, payload)
                if kind == TopicKind.CARD
                else _decode_or_none(DeviceStatus, payload)
            )
            if message is not None and (message.device != device or message.federation != self.federation):
                name = type(message).__name__
                raise MessageError(f"{name} of {message.device!r} on the topic of {device!r}")
            field = "card" if kind == TopicKind.CARD else "status"

            def change() -> None:
                old = self._devices.get(device, DeviceRecord(device))
                new = DeviceRecord(
                    device,
                    card=message if field == "card" else old.card,  # type: ignore[arg-type]
                    status=message if field == "status" else old.status,  # type: ignore[arg-type]
                )
                if new.card is None and new.status is None:
                    self._devices.pop(device, None)
                else:
                    self._devices[device] = new

            self._update(change)

    def _reconnected(self) -> None:
        """A reconnect (network thread): start listening for what is retained now."""
        with self._cond:
            self._heard = set()
            self._last_retained = time.monotonic()
        threading.Thread(target=self._drop_unheard, name="view-refresh", daemon=True).start()

    def _drop_unheard(self) -> None:
        """Once the reconnect's burst is over, forget the retained state the broker did not send again."""
        with self._cond:
            while (remaining := self._last_retained + self.refresh_quiet_s - time.monotonic()) > 0:
                self._cond.wait(remaining)
            heard, self._heard = self._heard, None
            if heard is None:
                return  # an earlier refresh's thread took it
            dropped = []
            for kind, attribute in ((TopicKind.ROUND, "_round"), (TopicKind.RELEASE, "_release")):
                if getattr(self, attribute) is not None and (kind, None) not in heard:
                    setattr(self, attribute, None)
                    dropped.append(kind.value)
            for device, record in list(self._devices.items()):
                card = record.card if (TopicKind.CARD, device) in heard else None
                status = record.status if (TopicKind.STATUS, device) in heard else None
                if (card, status) == (record.card, record.status):
                    continue
                dropped.append(device)
                if card is None and status is None:
                    del self._devices[device]
                else:
                    self._devices[device] = DeviceRecord(device, card=card, status=status)
            if dropped:
                log.info("cleared while disconnected, dropped from the view: %s", ", ".join(dropped))
                self._version += 1
                self._cond.notify_all()

    def _update(self, change: Callable[[], None]) -> None:
        with self._cond:
            change()
            self._version += 1


def _decode_or_none(model: type[T], payload: bytes) -> T | None:
    """An empty payload is a cleared retained topic."""
    if not payload:
        return None
    return decode_message(model, payload)  # type: ignore[type-var]
