"""A small MQTT client on paho-mqtt 2.x, shaped for the protocol (design sections 3, 4 and 7).

    with MqttClient(config.mqtt, "ingest-0", clean_start=False) as client:
        client.subscribe(shared_subscription("ingest", device_filter(fed, TopicKind.KNOWLEDGE)), on_packet)
        client.publish_and_wait(ack_topic(fed, device), ack.model_dump_json())

What it adds to paho:

- `connect()` blocks until the broker's CONNACK and fails with an `MqttError` that says what went wrong
  (nothing listening, credentials refused, no answer) instead of retrying silently forever.
- MQTT 5 by default; `protocol="auto"` falls back once to 3.1.1 when the broker refuses MQTT 5.
- Persistent sessions (`clean_start=False`) carry a Session Expiry Interval, so a restarting consumer finds
  the messages queued for it while it was away.
- Subscriptions are remembered and re-issued after every reconnect; a handler that raises is logged and
  never stops the network thread.
- Reconnects back off exponentially from a per-client random start, so a fleet that lost its broker does
  not come back in lockstep.

QoS 1 is not delivery: a broker drops messages past its queue limits (see the packaging's mosquitto
config). The device's spool with resend-until-acked is what guarantees that no packet is lost.
"""

from __future__ import annotations

import logging
import random
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from deepfusion.shared.config import MqttConfig

__all__ = ["Handler", "Message", "MqttClient", "MqttError", "Will"]

log = logging.getLogger(__name__)

ProtocolName = Literal["5", "3.1.1"]
_VERSIONS: dict[ProtocolName, MQTTProtocolVersion] = {
    "5": MQTTProtocolVersion.MQTTv5,
    "3.1.1": MQTTProtocolVersion.MQTTv311,
}
_UNSUPPORTED_PROTOCOL = 132  # MQTT 5 CONNACK reason; paho maps a 3.1.1 broker's "refused: protocol" to it
_MAX_INFLIGHT = (
    100  # QoS 1 messages awaiting PUBACK at once (paho's default of 20 throttles a 120 KiB stream)
)


class MqttError(RuntimeError):
    """The broker cannot be reached, refused us, or did not confirm an operation in time."""


@dataclass(frozen=True)
class Will:
    """Last Will: published by the broker when the client vanishes without a clean disconnect."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Message:
    """A message received on a subscription."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


Handler = Callable[[Message], None]


@dataclass
class _Subscription:
    topic_filter: str
    match_filter: str  # the filter without a `$share/{group}/` prefix, for matching incoming topics
    handler: Handler
    qos: int


def _match_filter(topic_filter: str) -> str:
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) == 3 and parts[2]:
            return parts[2]
    return topic_filter


def _failed(code: ReasonCode | int) -> bool:
    return (code.value if isinstance(code, ReasonCode) else int(code)) >= 0x80


def _step(client: paho.Client, timeout: float) -> bool:
    """Drive paho's network I/O once from this thread; False when the connection is gone.

    Uses paho's external-loop calls rather than `loop()`, which would leave behind a socket pair that
    `loop_start()` later replaces without closing.
    """
    sock = client.socket()
    if sock is None:
        return False
    pending = getattr(sock, "pending", None)  # TLS may hold decrypted bytes that select() cannot see
    if pending is not None and pending():
        readable = True
    else:
        want_write = [sock] if client.want_write() else []
        rlist, wlist, _ = select.select([sock], want_write, [], timeout)
        readable = bool(rlist)
        if wlist and client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
    if readable and client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
        return False
    client.loop_misc()
    return client.socket() is not None


class MqttClient:
    """One connection to the broker; thread-safe; the network runs in paho's background thread.

    Handlers run on that network thread: keep them short (hand heavy work to a queue), or the client
    stops reading from the broker while they run.
    """

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        *,
        will: Will | None = None,
        clean_start: bool = True,
    ) -> None:
        if not client_id:
            raise ValueError("client_id must be a non-empty string (a persistent session is keyed by it)")
        self._config = config
        self._client_id = client_id
        self._will = will
        self._clean_start = clean_start
        # Jitter: each client starts its backoff somewhere in [min, 2*min], then doubles up to max.
        first = min(
            random.uniform(config.reconnect_min_s, 2 * config.reconnect_min_s), config.reconnect_max_s
        )
        self._reconnect_delays = (first, max(config.reconnect_max_s, first))

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._subscriptions: dict[str, _Subscription] = {}
        self._suback_results: dict[int, list[ReasonCode]] = {}
        self._suback_ignored: set[int] = set()  # mids of re-subscriptions and abandoned waits
        # Counts accepted connections: a SUBSCRIBE sent on an earlier one gets no SUBACK on a later one.
        self._connections = 0
        self._reconnect_listeners: list[Callable[[], None]] = []
        self._puback_failures: dict[int, ReasonCode] = {}
        # QoS 1 publishes not yet acked; no more can be in flight than MQTT has packet ids.
        self._unconfirmed: deque[paho.MQTTMessageInfo] = deque(maxlen=65535)

        self._paho: paho.Client | None = None
        self._protocol: ProtocolName | None = None if config.protocol == "auto" else config.protocol
        self._negotiated: ProtocolName | None = None
        self._connack = threading.Event()
        self._connack_reason: ReasonCode | None = None
        self._handshake = False  # connect() is reading the CONNACK in the caller's thread
        self._in_handler = threading.local()  # .active while a message handler runs on this thread
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------------

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def connected(self) -> bool:
        client = self._paho
        return client is not None and not self._closed and client.is_connected()

    @property
    def protocol_version(self) -> ProtocolName | None:
        """The MQTT version the broker accepted ("5" or "3.1.1"); None before the first connect."""
        return self._negotiated

    def connect(self, timeout: float = 10) -> None:
        """Connect, start the network thread and block until the broker accepts us.

        Raises `MqttError` if the broker cannot be reached, refuses the connection (bad credentials, not
        authorized, unsupported protocol) or does not answer within `timeout` seconds.
        """
        if self._closed:
            raise MqttError(f"MQTT client {self._client_id!r} is closed; create a new one")
        if self._paho is not None:
            return
        deadline = time.monotonic() + timeout
        candidates: list[ProtocolName] = [self._protocol] if self._protocol else ["5", "3.1.1"]
        for attempt, version in enumerate(candidates):
            refused_protocol = self._attempt(version, deadline, timeout)
            if not refused_protocol:
                return
            if attempt + 1 < len(candidates):
                log.info(
                    "mqtt broker refused MQTT 5, falling back to 3.1.1 host=%s port=%s client_id=%s",
                    self._config.host,
                    self._config.port,
                    self._client_id,
                )
        raise MqttError(
            f"the MQTT broker at {self._where()} does not accept MQTT {candidates[-1]}; "
            "set mqtt.protocol to 'auto' or to a version the broker supports"
        )

    def _attempt(self, version: ProtocolName, deadline: float, timeout: float) -> bool:
        """One connection attempt; True when the broker refused this protocol version."""
        client = self._make_paho(version)
        self._connack.clear()
        self._connack_reason = None
        self._paho = client
        client.connect_timeout = max(0.1, deadline - time.monotonic())
        properties = None
        if version == "5" and not self._clean_start:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self._config.session_expiry_s
        try:
            if version == "5":
                client.connect(
                    self._config.host,
                    self._config.port,
                    self._config.keepalive_s,
                    clean_start=self._clean_start,
                    properties=properties,
                )
            else:
                client.connect(self._config.host, self._config.port, self._config.keepalive_s)
        except (OSError, ValueError) as exc:
            self._paho = None
            raise MqttError(f"cannot reach the MQTT broker at {self._where()}: {exc}") from exc

        # The handshake runs in this thread, so paho's retry logic cannot get in the way of a clear error.
        self._handshake = True
        try:
            while not self._connack.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._paho = None
                    self._shutdown(client, threaded=False)
                    raise MqttError(
                        f"the MQTT broker at {self._where()} did not accept the connection within "
                        f"{timeout:g} s (is it an MQTT listener? TLS expected but not configured, or the "
                        "other way round?)"
                    )
                if not _step(client, min(remaining, 0.05)):
                    break  # refused (on_connect has run) or hung up before CONNACK
        finally:
            self._handshake = False
        reason = self._connack_reason
        if reason is not None and not _failed(reason):
            client.loop_start()
            return False
        self._paho = None
        self._shutdown(client, threaded=False)
        if reason is None or reason.value == _UNSUPPORTED_PROTOCOL:
            # A 3.1.1-only broker answers MQTT 5 with "unacceptable protocol version" or hangs up.
            if self._config.protocol == "auto" and version == "5":
                return True
            if reason is None:
                raise MqttError(
                    f"the MQTT broker at {self._where()} closed the connection before accepting it "
                    f"(MQTT {version}; a wrong protocol version, TLS setting or a client id already banned?)"
                )
            return True
        hint = ""
        if reason.value in (134, 135):  # bad user name or password / not authorized
            hint = "; check mqtt.username and mqtt.password and the broker's ACL"
        raise MqttError(f"the MQTT broker at {self._where()} refused the connection: {reason}{hint}")

    def close(self, flush_s: float = 5.0) -> None:
        """Disconnect cleanly (the broker discards the Last Will) and stop the network thread.

        Waits up to `flush_s` for the QoS 1 messages still in flight: paho drops them at a disconnect.
        """
        if self._closed:
            return
        self._flush(flush_s)
        self._closed = True
        client, self._paho = self._paho, None
        if client is not None:
            self._shutdown(client)
            log.info("mqtt closed client_id=%s", self._client_id)
        with self._cond:
            self._cond.notify_all()

    def _flush(self, timeout: float) -> None:
        client = self._paho
        if client is None or not client.is_connected() or getattr(self._in_handler, "active", False):
            return  # nothing can be confirmed any more, or the caller is the thread that would confirm
        deadline = time.monotonic() + timeout
        with self._lock:
            pending = list(self._unconfirmed)
        for info in pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                info.wait_for_publish(remaining)
            except (RuntimeError, ValueError):
                continue  # refused or lost with the connection: nothing to wait for
        left = sum(not info.is_published() for info in pending)
        if left:
            log.warning("mqtt closing with %d messages unconfirmed client_id=%s", left, self._client_id)

    def __enter__(self) -> MqttClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _shutdown(self, client: paho.Client, *, threaded: bool = True) -> None:
        client.disable_logger()  # paho logs a spurious "not connected" error while its loop winds down
        client.disconnect()
        if threaded:
            client.loop_stop()
        else:
            _step(client, 0.1)  # writes the DISCONNECT, then paho closes the socket

    # -- publish ---------------------------------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False
    ) -> paho.MQTTMessageInfo:
        """Queue one message and return at once; QoS 1 messages wait in the client across a reconnect."""
        client = self._require_client()
        info = client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0:
            # paho keeps the message and sends it after the reconnect; it is queued, not failed.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise MqttError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
        if qos > 0:
            with self._lock:
                self._unconfirmed.append(info)
                while self._unconfirmed and self._unconfirmed[0].is_published():
                    self._unconfirmed.popleft()
        return info

    def publish_and_wait(
        self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False, timeout: float = 10
    ) -> None:
        """Publish and block until the broker confirms it (PUBACK for QoS 1, sent for QoS 0)."""
        if getattr(self._in_handler, "active", False):
            raise MqttError(
                "publish_and_wait() cannot be called from a message handler (the network thread would wait "
                "for itself); use publish()"
            )
        info = self.publish(topic, payload, qos=qos, retain=retain)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise MqttError(f"publish to {topic!r} failed: {exc}") from exc
        if not info.is_published():
            state = "connected" if self.connected else "disconnected"
            raise MqttError(
                f"the MQTT broker at {self._where()} did not confirm the publish to {topic!r} within "
                f"{timeout:g} s (client {state}); the message may still be delivered later"
            )
        with self._lock:
            failure = self._puback_failures.pop(info.mid, None)
        if failure is not None:
            raise MqttError(f"the MQTT broker rejected the publish to {topic!r}: {failure}")

    # -- subscribe -------------------------------------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, timeout: float = 10) -> None:
        """Call `handler(message)` for every message matching `topic_filter` (`$share/...` allowed).

        The subscription is remembered and re-issued after every reconnect. When connected, this waits
        for the broker's SUBACK (except inside a handler), so a message published after it returns is
        delivered. With a persistent session (`clean_start=False`) subscribe before `connect()`: the
        broker hands over the queued messages right after it accepts the connection.
        """
        sub = _Subscription(topic_filter, _match_filter(topic_filter), handler, qos)
        with self._lock:
            self._subscriptions[topic_filter] = sub
        deadline = time.monotonic() + timeout
        while True:
            client = self._paho
            if client is None or not client.is_connected():
                return  # issued by on_connect
            with self._lock:
                connection = self._connections
            rc, mid = client.subscribe(topic_filter, qos=qos)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                    return  # connection lost meanwhile: on_connect subscribes
                raise MqttError(f"subscribe to {topic_filter!r} failed: {paho.error_string(rc)}")
            if getattr(self._in_handler, "active", False):
                with self._lock:
                    self._suback_ignored.add(mid)  # a handler cannot wait for the thread it runs on
                return
            with self._cond:
                while (
                    mid not in self._suback_results and connection == self._connections and not self._closed
                ):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._suback_ignored.add(mid)
                        raise MqttError(f"no SUBACK for {topic_filter!r} within {timeout:g} s")
                    self._cond.wait(remaining)
                if mid in self._suback_results or self._closed:
                    codes = self._suback_results.pop(mid, [])
                    break
                # The connection was replaced before the SUBACK came: ask again on the new one, so that
                # returning still means the broker has the subscription. (Should this SUBSCRIBE have gone
                # out on the new connection after all, its SUBACK is dropped.)
                self._suback_ignored.add(mid)
        if self._closed:
            raise MqttError(f"MQTT client {self._client_id!r} was closed while subscribing")
        if any(_failed(code) for code in codes):
            with self._lock:
                self._subscriptions.pop(topic_filter, None)
            raise MqttError(f"the MQTT broker refused the subscription to {topic_filter!r}: {codes[0]}")

    def add_reconnect_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` on every accepted connection after the first, before any message it brings
        (on the network thread: keep it short). The broker then sends the retained messages again, but
        nothing for a topic cleared meanwhile: a view of retained state learns here that it must check."""
        with self._lock:
            self._reconnect_listeners.append(listener)

    def unsubscribe(self, topic_filter: str) -> None:
        """Forget a subscription and tell the broker."""
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
        client = self._paho
        if client is not None and client.is_connected():
            client.unsubscribe(topic_filter)

    # -- paho callbacks (network thread) ---------------------------------------------------------------

    def _make_paho(self, version: ProtocolName) -> paho.Client:
        protocol = _VERSIONS[version]
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=protocol,
            clean_session=None if version == "5" else self._clean_start,
            reconnect_on_failure=True,
        )
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        client.max_inflight_messages_set(_MAX_INFLIGHT)
        client.max_queued_messages_set(0)  # unbounded in memory; the device's on-disk spool bounds it
        client.reconnect_delay_set(*self._reconnect_delays)  # type: ignore[arg-type]  # floats work
        config = self._config
        if config.username is not None:
            password = config.password.get_secret_value() if config.password is not None else None
            client.username_pw_set(config.username, password)
        if config.tls is not None:
            tls = config.tls
            client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
            )
            if tls.insecure:
                client.tls_insecure_set(True)
        if self._will is not None:
            will = self._will
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        return client

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        if client is not self._paho:
            return  # an attempt that was already given up
        version: ProtocolName = "5" if client.protocol == MQTTProtocolVersion.MQTTv5 else "3.1.1"
        if _failed(reason):
            log.warning(
                "mqtt connection refused host=%s port=%s client_id=%s protocol=%s reason=%s",
                self._config.host,
                self._config.port,
                self._client_id,
                version,
                reason,
            )
        else:
            self._negotiated = version
            if self._config.protocol == "auto":
                self._protocol = version  # remembered: later connects skip the failed attempt
            log.info(
                "mqtt connected host=%s port=%s client_id=%s protocol=%s session_present=%s",
                self._config.host,
                self._config.port,
                self._client_id,
                version,
                flags.session_present,
            )
            with self._cond:
                # SUBACKs still awaited belong to the old connection and never come: forget their mids,
                # and wake the subscribe() calls waiting for them.
                self._connections += 1
                self._suback_ignored.clear()
                self._suback_results.clear()
                self._cond.notify_all()
                subscriptions = [(s.topic_filter, s.qos) for s in self._subscriptions.values()]
                listeners = list(self._reconnect_listeners) if self._connections > 1 else []
            for listener in listeners:
                try:
                    listener()
                except Exception:  # a listener must not stop the client from subscribing again
                    log.exception("mqtt reconnect listener failed client_id=%s", self._client_id)
            if subscriptions:
                # Its SUBACK is read only after this callback returns, so the mid is registered in time.
                rc, mid = client.subscribe(subscriptions)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                    with self._lock:
                        self._suback_ignored.add(mid)
        self._connack_reason = reason
        self._connack.set()

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        if client is not self._paho or self._closed or self._handshake:
            return  # during the handshake connect() sees the failure itself
        log.warning(
            "mqtt disconnected host=%s port=%s client_id=%s reason=%s; reconnecting",
            self._config.host,
            self._config.port,
            self._client_id,
            reason,
        )

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        message = Message(topic=msg.topic, payload=bytes(msg.payload), qos=msg.qos, retain=bool(msg.retain))
        with self._lock:
            handlers = [
                s.handler
                for s in self._subscriptions.values()
                if paho.topic_matches_sub(s.match_filter, message.topic)
            ]
        if not handlers:
            log.debug("mqtt message without a handler topic=%s", message.topic)
        self._in_handler.active = True
        try:
            for handler in handlers:
                try:
                    handler(message)
                except Exception:
                    log.exception("mqtt handler failed topic=%s handler=%r", message.topic, handler)
        finally:
            self._in_handler.active = False

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, codes: list[ReasonCode], properties: Any
    ) -> None:
        with self._cond:
            if mid in self._suback_ignored:
                self._suback_ignored.discard(mid)
                if any(_failed(code) for code in codes):
                    log.error("mqtt re-subscription refused client_id=%s reasons=%s", self._client_id, codes)
                return
            self._suback_results[mid] = list(codes)
            self._cond.notify_all()

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any
    ) -> None:
        with self._lock:
            if _failed(reason):
                self._puback_failures[mid] = reason
            else:
                self._puback_failures.pop(mid, None)  # a stale failure of a reused message id
        if _failed(reason):
            log.warning("mqtt publish rejected client_id=%s mid=%s reason=%s", self._client_id, mid, reason)

    # -- helpers ---------------------------------------------------------------------------------------

    def _require_client(self) -> paho.Client:
        if self._closed:
            raise MqttError(f"MQTT client {self._client_id!r} is closed")
        client = self._paho
        if client is None:
            raise MqttError(f"MQTT client {self._client_id!r} is not connected; call connect() first")
        return client

    def _where(self) -> str:
        scheme = "mqtts" if self._config.tls is not None else "mqtt"
        return f"{scheme}://{self._config.host}:{self._config.port}"
