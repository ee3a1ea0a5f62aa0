"""`deepfusion-cloud ingest`: the long-running worker that moves knowledge packets from MQTT to storage.

    IngestService(config).run(stop_event)

Two MQTT connections:

- a *watch* connection (clean session) that reads the retained cards, status and `rounds/current`
  into a `FederationView`; it is connected and settled first, so the context is known before packets
  are judged;
- a *knowledge* connection with a persistent session (clean start off, session expiry) on the shared
  subscription `$share/{group}/deepfusion/v1/{fed}/devices/+/knowledge`: the broker spreads packets
  over all workers of the group and keeps this worker's queue while it restarts.

Packets go through a bounded queue to a few threads (store writes are I/O), each doing: decode and
check, store under the content-addressed key, then publish the Ack. With `ingest.threads = 0` the
network thread does this itself: a slow store stalls reading, but no packet changes threads, which
costs CPU under the GIL. A packet whose device or round the view has not seen yet waits up to
`context_wait_s` for its card or RoundSpec (they travel on the other connection). Counters per
device and reason are written to `{fed}/ingest/{worker}.json` every `stats_interval_s` and at
shutdown; the worker reads its file back when it starts.

Restart semantics: a stopping worker (SIGTERM) stores and acks what it has queued before it
disconnects. paho acknowledges a message to the broker when the handler returns, i.e. once it is
queued (once it is stored and acked with `threads = 0`), so a worker killed with packets queued or
half-stored loses them from the broker's view; the devices resend
every packet that has no Ack, the resend finds the stored copy (if any) by its key, and the Ack says
`duplicate`. Nothing is lost and nothing is stored twice.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from deepfusion.cloud.ingest import (
    IngestContext,
    check_context,
    read_packet,
    save_packet,
    stored_duplicate,
)
from deepfusion.cloud.registry import FederationView
from deepfusion.cloud.settings import CloudConfig
from deepfusion.shared.messages import Ack, RejectReason, encode_message
from deepfusion.shared.mqtt import Message, MqttClient, MqttError
from deepfusion.shared.packets import KnowledgePacket
from deepfusion.shared.store import ObjectNotFound, ObjectStore, StoreError, open_store
from deepfusion.shared.topics import InvalidTopic, TopicKind, ack_topic, device_filter, shared_subscription

__all__ = ["DeviceCounts", "IngestCounters", "IngestService", "counters_key", "read_all_counters"]

log = logging.getLogger(__name__)


def counters_key(federation: str, worker_id: str) -> str:
    """Store key of one worker's counters."""
    return f"{federation}/ingest/{worker_id}.json"


@dataclass
class DeviceCounts:
    accepted: int = 0
    duplicates: int = 0
    bytes: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def add(self, other: DeviceCounts) -> None:
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.bytes += other.bytes
        self.rejected.update(other.rejected)

    def to_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "bytes": self.bytes,
            "rejected": dict(self.rejected),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceCounts:
        return cls(
            accepted=int(data.get("accepted", 0)),
            duplicates=int(data.get("duplicates", 0)),
            bytes=int(data.get("bytes", 0)),
            rejected=Counter({str(k): int(v) for k, v in dict(data.get("rejected", {})).items()}),
        )


class IngestCounters:
    """Packets accepted (new), duplicates, stored bytes and rejections by reason, per device."""

    def __init__(self, devices: dict[str, DeviceCounts] | None = None) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceCounts] = devices or {}
        self.dirty = False

    def record(self, ack: Ack, size: int) -> None:
        with self._lock:
            counts = self._devices.setdefault(ack.device, DeviceCounts())
            if not ack.accepted:
                counts.rejected[ack.reason.value if ack.reason else "unknown"] += 1
            elif ack.duplicate:
                counts.duplicates += 1
            else:
                counts.accepted += 1
                counts.bytes += size
            self.dirty = True

    def snapshot(self) -> dict[str, DeviceCounts]:
        with self._lock:
            return {d: DeviceCounts.from_json(c.to_json()) for d, c in self._devices.items()}

    def to_bytes(self, worker_id: str) -> bytes:
        with self._lock:
            devices = {d: c.to_json() for d, c in sorted(self._devices.items())}
            self.dirty = False
        return json.dumps({"worker": worker_id, "at": time.time(), "devices": devices}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> IngestCounters:
        """Raises ValueError for anything but a counters file (callers skip such a file)."""
        try:
            parsed = json.loads(data)
            return cls({str(d): DeviceCounts.from_json(c) for d, c in parsed.get("devices", {}).items()})
        # Valid JSON of another shape: a list, nulls, a count of 1e400 (inf, which int() overflows), ...
        except (AttributeError, TypeError, OverflowError) as exc:
            raise ValueError(f"not an ingest counters file: {exc}") from None


def read_all_counters(store: ObjectStore, federation: str) -> dict[str, DeviceCounts]:
    """The counters of every worker that ever ran, summed per device."""
    total: dict[str, DeviceCounts] = {}
    for key in store.list(f"{federation}/ingest/"):
        if not key.endswith(".json"):
            continue
        try:
            counters = IngestCounters.from_bytes(store.get(key))
        except (ObjectNotFound, ValueError):
            continue
        for device, counts in counters.snapshot().items():
            total.setdefault(device, DeviceCounts()).add(counts)
    return total


_STOP = object()


class IngestService:
    """One ingest worker. `run(stop)` blocks until `stop` is set, then drains and flushes."""

    def __init__(self, config: CloudConfig, store: ObjectStore | None = None) -> None:
        self.config = config
        self.federation = config.federation
        self.settings = config.ingest
        self.store = store if store is not None else open_store(config.store)
        self.view = FederationView(self.federation)
        self.counters = IngestCounters()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.settings.queue)
        self._client: MqttClient | None = None
        self._writes = 0
        self._writes_lock = threading.Lock()
        self._context_version = -1
        self._context = IngestContext()
        self._max_round_seen = -1
        self._context_lock = threading.Lock()
        self.ready = threading.Event()  # set once the worker receives packets
        self._draining = threading.Event()
        # Held by the network thread from its draining check until its packet is queued, so the drain
        # cannot begin in between and leave that packet behind the stop markers, unhandled.
        self._enqueue_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        key = counters_key(self.federation, self.settings.worker_id)
        try:
            self.counters = IngestCounters.from_bytes(self.store.get(key))
        except ObjectNotFound:
            pass
        except ValueError:
            log.warning("ignored unreadable counters %s", key)
        watch = MqttClient(self.config.mqtt, f"{self.settings.worker_id}-watch")
        knowledge = MqttClient(self.config.mqtt, self.settings.worker_id, clean_start=False)
        self._client = knowledge
        threads = [
            threading.Thread(target=self._work, name=f"ingest-{i}", daemon=True)
            for i in range(self.settings.threads)
        ]
        try:
            self.view.subscribe(watch)
            watch.connect()
            self.view.wait_settled(self.settings.settle_s)
            for thread in threads:
                thread.start()
            # Subscribed before connecting: the broker hands over the session's queue at once.
            topic_filter = shared_subscription(
                self.settings.share_group, device_filter(self.federation, TopicKind.KNOWLEDGE)
            )
            knowledge.subscribe(topic_filter, self._enqueue)
            knowledge.connect()
            log.info("ingest %s ready filter=%s store=%s", self.settings.worker_id, topic_filter, self.store)
            self.ready.set()
            while not stop.wait(self.settings.stats_interval_s):
                self._flush_counters(key)
        finally:
            self._drain(threads)
            knowledge.close()
            watch.close()
            self._flush_counters(key, force=True)
            log.info("ingest %s stopped", self.settings.worker_id)

    def _drain(self, threads: list[threading.Thread]) -> None:
        """Store and ack what is queued while still connected, so that the Acks can go out.

        From here on the network thread handles what still arrives itself instead of queueing it, and
        what a thread stuck past its join left queued is handled here.
        """
        with self._enqueue_lock:
            self._draining.set()
        # Only started threads take their stop marker: after a failed start, markers for all of them
        # could fill the queue and block here for ever.
        started = [thread for thread in threads if thread.ident is not None]
        for _ in started:
            self._queue.put(_STOP)
        for thread in started:
            thread.join(timeout=30)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                self._handle_safely(item)

    def _flush_counters(self, key: str, force: bool = False) -> None:
        if not (force or self.counters.dirty):
            return
        try:
            self.store.put(key, self.counters.to_bytes(self.settings.worker_id))
        except StoreError as exc:
            # `to_bytes` marked them clean: without this, a worker that receives nothing more would
            # leave the store (and `status`) at the old counts until it stops.
            self.counters.dirty = True
            log.warning("cannot write ingest counters: %s", exc)

    # -- packets ---------------------------------------------------------------------------------------

    def _enqueue(self, message: Message) -> None:
        with self._enqueue_lock:
            queued = self.settings.threads > 0 and not self._draining.is_set()
            if queued:
                self._queue.put(message)  # blocks when full: the broker keeps the rest queued for us
        if not queued:
            self._handle_safely(message)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            self._handle_safely(item)

    def _handle_safely(self, message: Message) -> None:
        try:
            self.handle(message)
        except Exception:  # one packet must never stop a worker thread or the network loop
            log.exception("ingest failed on a packet topic=%s", message.topic)

    def handle(self, message: Message) -> Ack | None:
        """Judge, store and answer one message; None when nothing can be answered (or stored)."""
        try:
            device, digest, result = read_packet(
                self.federation, message.topic, message.payload, max_bytes=self.settings.max_packet_bytes
            )
        except InvalidTopic as exc:
            log.warning("ignored message: %s", exc)
            return None
        ack: Ack | None
        if isinstance(result, Ack):
            ack = result
        else:
            refused = self._check(digest, result)
            try:
                if refused is None:
                    ack = save_packet(self.store, self.federation, digest, result, message.payload)
                    if not ack.duplicate:
                        self._after_write()
                else:
                    ack = stored_duplicate(self.store, self.federation, digest, result) or refused
            except StoreError as exc:
                # No Ack: the device resends once the store is back.
                log.error("store failed for packet %s of %s: %s", digest[:12], device, exc)
                return None
        self._answer(ack, len(message.payload))
        return ack

    def _answer(self, ack: Ack, size: int) -> None:
        self.counters.record(ack, size)  # what the store holds counts, whether or not the Ack goes out
        client = self._client
        if client is None:
            return
        try:
            client.publish(ack_topic(self.federation, ack.device), encode_message(ack), qos=1)
        except MqttError as exc:  # closed or disconnected: the device resends and hears `duplicate`
            log.warning("no Ack for packet %s of %s: %s", ack.packet[:12], ack.device, exc)

    def _after_write(self) -> None:
        limit = self.settings.fault_kill_after_writes
        if limit is None:
            return
        with self._writes_lock:
            self._writes += 1
            if self._writes >= limit:
                log.critical("failure drill: SIGKILL after store write %d, before its Ack", self._writes)
                os.kill(os.getpid(), signal.SIGKILL)

    def context(self) -> IngestContext:
        """The context as the view holds it now (rebuilt only when the view changed)."""
        with self._context_lock:
            version = self.view.version
            if version != self._context_version:
                spec = self.view.round
                self._context = IngestContext(
                    cards={name: card.tokenizer for name, card in self.view.cards().items()},
                    rounds={spec.round: spec} if spec is not None else {},
                )
                if spec is not None:
                    self._max_round_seen = max(self._max_round_seen, spec.round)
                self._context_version = version
            return self._context

    def _check(self, digest: str, packet: KnowledgePacket) -> Ack | None:
        deadline = time.monotonic() + self.settings.context_wait_s
        while True:
            seen = self.view.version

            def changed(view: FederationView, seen: int = seen) -> bool:
                return view.version != seen

            problem = self.context().check(packet)
            if problem is None:
                return None
            remaining = deadline - time.monotonic()
            if (
                not self._may_appear(problem.reason, packet)
                or remaining <= 0
                or not self.view.wait_for(changed, remaining)
            ):
                return check_context(self.federation, digest, packet, self.context())

    def _may_appear(self, reason: RejectReason, packet: KnowledgePacket) -> bool:
        """Whether the missing card or round may simply not have reached the view yet."""
        if reason == RejectReason.UNKNOWN_DEVICE:
            return True
        return reason == RejectReason.ROUND_CLOSED and packet.header.round > self._max_round_seen
