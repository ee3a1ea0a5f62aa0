"""The ingest service over a real mosquitto: shared subscription, every rejection rule, kill -9."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from deepfusion.cloud.ingest import knowledge_key
from deepfusion.cloud.ingest_service import IngestCounters, IngestService, counters_key, read_all_counters
from deepfusion.shared.messages import Ack, RejectReason, ShardAssignment
from deepfusion.shared.mqtt import Message, MqttError
from deepfusion.shared.packets import encode
from deepfusion.shared.store import ObjectStore, StoreError, open_store
from deepfusion.shared.store.local import LocalStore
from deepfusion.shared.topics import knowledge_topic
from tests.cloud.federation import (
    FED,
    Service,
    SimDevice,
    base_overrides,
    config_from,
    open_round,
    packets_for,
)
from tests.fixtures.broker import wait_for
from tests.shared.packet_factory import make_packet, raw_bytes

pytestmark = pytest.mark.mqtt


def _stored(store: ObjectStore, round_id: int) -> list[str]:
    return list(store.list(f"{FED}/rounds/{round_id}/knowledge/"))


def _assert_exactly_once(store: ObjectStore, round_id: int, device: str, payloads: list[bytes]) -> None:
    keys = [k for k in _stored(store, round_id) if f"/knowledge/{device}/" in k]
    expected = {knowledge_key(FED, round_id, device, hashlib.sha256(p).hexdigest()): p for p in payloads}
    assert sorted(keys) == sorted(expected), "every packet stored, and stored once"
    for key, payload in expected.items():
        assert store.get(key) == payload


@pytest.fixture
def in_process_ingest(broker, tmp_path) -> Iterator[IngestService]:
    config = config_from(base_overrides(broker, str(tmp_path / "store")))
    service = IngestService(config)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()
    assert service.ready.wait(20)
    yield service
    stop.set()
    thread.join(20)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store_uri(request, tmp_path) -> Iterator[tuple[str, list[str], dict[str, str]]]:
    """(uri, extra overrides, environment) of a local folder or a prefix in the S3 test server."""
    if request.param == "local":
        yield str(tmp_path / "store"), [], {}
        return
    server = request.getfixturevalue("s3_server")
    uri = f"s3://{server.bucket}/ingest-{uuid.uuid4().hex[:8]}"
    yield (
        uri,
        [f'store.endpoint_url="{server.endpoint_url}"', f'store.region="{server.region}"'],
        server.env(),
    )


def _open(uri: str, extra: list[str], env: dict[str, str], monkeypatch) -> ObjectStore:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return open_store(config_from([f'store.uri="{uri}"', *extra]).store)


@pytest.mark.parametrize("threads", [8, 0], ids=["store-threads", "network-thread"])
def test_two_workers_split_the_stream_and_store_every_packet_once(
    broker, mqtt_client, tmp_path, store_uri, monkeypatch, threads
):
    uri, extra, env = store_uri
    store = _open(uri, extra, env, monkeypatch)
    overrides = [*base_overrides(broker, uri), *extra, f"ingest.threads={threads}"]
    workers = [
        Service("ingest", [*overrides, f'ingest.worker_id="ingest-{i}"'], tmp_path / f"ingest-{i}.log", env)
        for i in range(2)
    ]
    devices = [SimDevice(broker.config(), f"dev-{i}") for i in range(3)]
    try:
        coordinator = mqtt_client(broker.config(), "test-coordinator")
        ranges = {d.device: [ShardAssignment(shard="shard-0", start=0, stop=64)] for d in devices}
        open_round(coordinator, ranges)
        for device in devices:
            device.publish_card()
        for worker in workers:
            worker.wait_log("ready")
        payloads = {
            d.device: packets_for(d.device, 3, "shard-0", list(range(64)), per_packet=1) for d in devices
        }
        # Resends only after 15 s: each packet is published once, so the workers' counters add up.
        threads = [
            threading.Thread(target=d.deliver, args=(payloads[d.device],), kwargs={"resend_after": 15.0})
            for d in devices
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        for device in devices:
            assert all(a.accepted for a in device.acks.values())
            _assert_exactly_once(store, 3, device.device, payloads[device.device])
    finally:
        for device in devices:
            device.close()
        codes = [w.stop() for w in workers]
    assert codes == [0, 0]
    per_worker = {}
    for i in range(2):
        from deepfusion.cloud.ingest_service import IngestCounters, counters_key

        counts = IngestCounters.from_bytes(store.get(counters_key(FED, f"ingest-{i}"))).snapshot()
        per_worker[i] = sum(c.accepted for c in counts.values())
        assert sum(sum(c.rejected.values()) for c in counts.values()) == 0
        assert sum(c.duplicates for c in counts.values()) == 0
    # Disjoint sets that add up: each packet was stored by exactly one of the two workers.
    assert per_worker[0] > 0 and per_worker[1] > 0, per_worker
    assert per_worker[0] + per_worker[1] == 3 * 64


def _bad_logprobs(kind: str) -> bytes:
    packet = make_packet(seed=5, device="dev-1", federation=FED, round=3)
    tensors = packet.tensors()
    logprobs = tensors["topk_logprobs"].copy()
    if kind == "nan":
        logprobs[2, 1] = np.nan
    else:  # two ids holding 0.6 each: the row's mass is 1.2
        logprobs[0, :2] = np.log(0.6)
        logprobs[0, 1] = np.log(0.6) - 1e-3
    tensors["topk_logprobs"] = logprobs.astype(np.float16)
    return raw_bytes(tensors, packet.header.to_metadata())


def _corrupt_middle(payload: bytes) -> bytes:
    body = bytearray(payload)
    for i in range(len(body) // 2, len(body) // 2 + 8):
        body[i] ^= 0xFF
    return bytes(body)


def _valid(**header: object) -> bytes:
    fields: dict[str, object] = {"device": "dev-1", "federation": FED, "round": 3, "shard": "shard-0"}
    fields.update(header)
    return encode(make_packet(seed=7, sequences=2, length=8, **fields))


CASES = [
    ("dev-1", lambda: _valid(device="dev-2"), RejectReason.DEVICE_MISMATCH),
    ("dev-9", lambda: _valid(device="dev-9"), RejectReason.UNKNOWN_DEVICE),
    ("dev-1", lambda: _valid(round=2), RejectReason.ROUND_CLOSED),
    ("dev-1", lambda: _valid(tokenizer="cd" * 32), RejectReason.TOKENIZER_MISMATCH),
    ("dev-1", lambda: _valid(shard="shard-9"), RejectReason.NOT_ASSIGNED),
    ("dev-1", lambda: _bad_logprobs("nan"), RejectReason.BAD_LOGPROBS),
    ("dev-1", lambda: _bad_logprobs("mass"), RejectReason.MASS_EXCEEDS_ONE),
    ("dev-1", lambda: encode(make_packet(seed=8, sequences=40, length=60, device="dev-1", federation=FED,
                                          round=3, shard="shard-0")), RejectReason.TOO_LARGE),
    ("dev-1", lambda: _valid()[:-11], RejectReason.CORRUPT_COMPRESSION),
    ("dev-1", lambda: _corrupt_middle(_valid()), RejectReason.CORRUPT_COMPRESSION),
]  # fmt: skip


def test_every_rejection_rule_reaches_the_device_and_is_counted(broker, mqtt_client, tmp_path):
    limits = ["ingest.max_packet_bytes=65536", "coordinator.packet_budget=65536"]  # the budget fits the limit
    config = config_from([*base_overrides(broker, str(tmp_path / "store")), *limits])
    service = IngestService(config)
    store = service.store
    coordinator = mqtt_client(broker.config(), "test-coordinator")
    ranges = [ShardAssignment(shard="shard-0", start=0, stop=64)]
    open_round(coordinator, {"dev-1": ranges, "dev-9": ranges})
    devices = {name: SimDevice(broker.config(), name) for name in ("dev-1", "dev-9")}
    devices["dev-1"].publish_card()  # dev-9 has no card
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert service.ready.wait(20)
        for topic_device, build, reason in CASES:
            payload = build()
            ack = devices[topic_device].send(payload)
            assert not ack.accepted and ack.reason == reason, (reason, ack)
            assert ack.device == topic_device and ack.detail
        payload = _valid()  # encode() is not byte-stable (metadata order), so send the same bytes twice
        good = devices["dev-1"].send(payload)
        assert good.accepted and not good.duplicate
        again = devices["dev-1"].send(payload)
        assert again.accepted and again.duplicate
    finally:
        stop.set()
        thread.join(20)
        for device in devices.values():
            device.close()
    assert len(_stored(store, 3)) == 1 and not _stored(store, 2)
    counts = read_all_counters(store, FED)
    expected: dict[str, dict[str, int]] = {}
    for topic_device, _, reason in CASES:
        bucket = expected.setdefault(topic_device, {})
        bucket[reason.value] = bucket.get(reason.value, 0) + 1
    assert {d: dict(c.rejected) for d, c in counts.items()} == expected
    assert counts["dev-1"].accepted == 1 and counts["dev-1"].duplicates == 1


def test_a_card_published_just_before_the_packets_is_waited_for(in_process_ingest, broker, mqtt_client):
    coordinator = mqtt_client(broker.config(), "test-coordinator")
    open_round(coordinator, {"dev-5": [ShardAssignment(shard="shard-0", start=0, stop=64)]})
    device = SimDevice(broker.config(), "dev-5")
    try:
        device.publish_card()
        ack = device.send(packets_for("dev-5", 3, "shard-0", [0, 1])[0])
        assert ack.accepted
    finally:
        device.close()


def test_kill9_between_store_write_and_ack_loses_and_duplicates_nothing(broker, tmp_path):
    store_dir = tmp_path / "store"
    store = open_store(str(store_dir))
    overrides = base_overrides(broker, str(store_dir))
    device = SimDevice(broker.config(), "dev-1")
    from deepfusion.shared.mqtt import MqttClient

    with MqttClient(broker.config(), "test-coordinator") as coordinator:
        open_round(coordinator, {"dev-1": [ShardAssignment(shard="shard-0", start=0, stop=64)]})
    device.publish_card()
    payloads = packets_for("dev-1", 3, "shard-0", list(range(20)), per_packet=2)
    # Failure drill: the worker SIGKILLs itself right after its 3rd store write, before that Ack.
    first = Service("ingest", [*overrides, "ingest.fault_kill_after_writes=3"], tmp_path / "ingest-a.log")
    second = None
    try:
        first.wait_log("ready")
        done = threading.Thread(target=device.deliver, args=(payloads,), kwargs={"resend_after": 1.0})
        done.start()
        first.process.wait(timeout=30)
        assert first.process.returncode == -9, first.text()[-2000:]
        written_before_kill = len(_stored(store, 3))
        acked_before_kill = len(device.acks)
        assert written_before_kill >= 3 and acked_before_kill < written_before_kill
        second = Service("ingest", overrides, tmp_path / "ingest-b.log")
        done.join(90)
        assert not done.is_alive()
    finally:
        if second is not None:
            assert second.stop() == 0
        device.close()
    _assert_exactly_once(store, 3, "dev-1", payloads)
    assert all(a.accepted for a in device.acks.values())
    # The packet stored just before the kill had no Ack; its resend found it and was acked as a duplicate.
    assert any(a.duplicate for a in device.ack_log)


def test_kill9_of_a_worker_in_the_middle_of_a_stream(broker, tmp_path):
    store_dir = tmp_path / "store"
    store = open_store(str(store_dir))
    overrides = base_overrides(broker, str(store_dir))
    from deepfusion.shared.mqtt import MqttClient

    with MqttClient(broker.config(), "test-coordinator") as coordinator:
        open_round(
            coordinator, {"dev-1": [ShardAssignment(shard="shard-0", start=0, stop=200)]}, sequences=200
        )
    device = SimDevice(broker.config(), "dev-1")
    device.publish_card()
    payloads = packets_for("dev-1", 3, "shard-0", list(range(200)), per_packet=1)
    first = Service("ingest", overrides, tmp_path / "ingest-a.log")
    second = None
    try:
        first.wait_log("ready")
        done = threading.Thread(target=device.deliver, args=(payloads,), kwargs={"resend_after": 2.0})
        done.start()
        wait_for(lambda: len(device.acks) >= 20, timeout=30, what="20 acks")
        first.kill9()
        second = Service("ingest", overrides, tmp_path / "ingest-b.log")
        done.join(120)
        assert not done.is_alive()
    finally:
        if second is not None:
            assert second.stop() == 0
        device.close()
    _assert_exactly_once(store, 3, "dev-1", payloads)
    assert len(device.acks) == len(payloads) and all(a.accepted for a in device.acks.values())


def test_a_stopping_worker_acks_and_counts_every_packet_it_stored(broker, mqtt_client, tmp_path):
    """SIGTERM with a backlog: what the store threads still write goes out with its Ack and is counted."""

    class SlowStore(LocalStore):
        def put(self, key: str, data: bytes) -> None:
            time.sleep(0.05)  # a backlog builds up in the worker's queue
            super().put(key, data)

    store = SlowStore(tmp_path / "store")
    config = config_from([*base_overrides(broker, str(tmp_path / "store")), "ingest.threads=2"])
    service = IngestService(config, store=store)
    stop = threading.Event()
    worker = threading.Thread(target=service.run, args=(stop,), daemon=True)
    coordinator = mqtt_client(broker.config(), "test-coordinator")
    open_round(coordinator, {"dev-1": [ShardAssignment(shard="shard-0", start=0, stop=64)]})
    device = SimDevice(broker.config(), "dev-1")
    try:
        device.publish_card()
        worker.start()
        assert service.ready.wait(20)
        for payload in packets_for("dev-1", 3, "shard-0", list(range(60)), per_packet=2):
            device.client.publish(knowledge_topic(FED, "dev-1"), payload)
        wait_for(lambda: len(_stored(store, 3)) >= 4, 20, "the first writes")
        stop.set()
        worker.join(30)
        assert not worker.is_alive()
        stored = {key.rsplit("/", 1)[1].removesuffix(".dfk") for key in _stored(store, 3)}
        assert len(stored) >= 4
        wait_for(lambda: stored <= device.acks.keys(), 10, "an Ack for every stored packet")
        assert all(device.acks[d].accepted and not device.acks[d].duplicate for d in stored)
        assert service.counters.snapshot()["dev-1"].accepted == len(stored)
        assert read_all_counters(store, FED)["dev-1"].accepted == len(stored)
    finally:
        device.close()


def test_counters_whose_write_failed_are_written_at_the_next_interval(tmp_path):
    """A store that fails one write must not leave the stored counters (what `status` shows, and what a
    restart reads back) behind until the next packet comes, which may be never."""

    class FlakyStore(LocalStore):
        failing = True

        def put(self, key: str, data: bytes) -> None:
            if self.failing:
                raise StoreError(f"{key}: store unavailable")
            super().put(key, data)

    store = FlakyStore(tmp_path / "store")
    service = IngestService(config_from([f'store.uri="{tmp_path / "store"}"', f"federation={FED}"]), store)
    digest = hashlib.sha256(b"packet").hexdigest()
    service.counters.record(Ack(federation=FED, device="dev-1", round=3, packet=digest, accepted=True), 100)
    key = counters_key(FED, service.settings.worker_id)
    service._flush_counters(key)  # the worker's interval flush; the write fails
    store.failing = False
    service._flush_counters(key)  # the next interval, nothing new received
    assert read_all_counters(store, FED)["dev-1"].accepted == 1


def test_counters_files_of_another_shape_are_skipped(tmp_path):
    """Valid JSON that is not a counters file must not break `status` (which sums every worker's file)
    or a worker's start (which reads its own back): both skip what `from_bytes` refuses."""
    store = LocalStore(tmp_path / "store")
    good = IngestCounters()
    good.record(Ack(federation=FED, device="dev-1", round=3, packet="ab" * 32, accepted=True), 100)
    store.put(counters_key(FED, "good"), good.to_bytes("good"))
    bad = (
        "[]",
        '{"devices": {"dev-1": null}}',
        '{"devices": {"dev-1": {"accepted": null}}}',
        '{"devices": 3}',
        '{"devices": {"dev-1": {"accepted": 1e400}}}',  # inf: int() overflows
    )
    for i, text in enumerate(bad):
        with pytest.raises(ValueError, match="not an ingest counters file"):
            IngestCounters.from_bytes(text.encode())
        store.put(counters_key(FED, f"bad-{i}"), text.encode())
    totals = read_all_counters(store, FED)
    assert set(totals) == {"dev-1"} and (totals["dev-1"].accepted, totals["dev-1"].bytes) == (1, 100)


def test_a_packet_received_as_the_worker_starts_to_stop_is_still_handled(tmp_path):
    """The network thread may have decided to queue a packet, but not yet queued it, when SIGTERM's
    drain begins: the drain must not finish without it (paho has acknowledged it to the broker)."""
    config = config_from([f'store.uri="{tmp_path / "store"}"', f"federation={FED}", "ingest.threads=2"])
    service = IngestService(config, LocalStore(tmp_path / "store"))
    handled: list[Message] = []
    service.handle = handled.append
    put = service._queue.put

    def preempted_put(item: object, block: bool = True, timeout: float | None = None) -> None:
        if isinstance(item, Message):
            time.sleep(0.3)  # the network thread loses the CPU between its check and its put
        put(item, block, timeout)

    service._queue.put = preempted_put
    threads = [threading.Thread(target=service._work, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    message = Message(knowledge_topic(FED, "dev-1"), b"packet", qos=1, retain=False)
    network = threading.Thread(target=service._enqueue, args=(message,), daemon=True)
    network.start()
    time.sleep(0.05)
    service._drain(threads)
    network.join(5)
    assert handled == [message]


def test_a_worker_that_cannot_connect_stops_instead_of_hanging(tmp_path):
    """Its store threads never started, so the drain must not wait for room for their stop markers."""
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    overrides = [f'store.uri="{tmp_path / "store"}"', f"federation={FED}", f"mqtt.port={port}"]
    config = config_from([*overrides, 'mqtt.host="127.0.0.1"', "ingest.threads=4", "ingest.queue=1"])
    service = IngestService(config)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            service.run(threading.Event())
        except MqttError as exc:
            errors.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(15)
    assert not worker.is_alive() and len(errors) == 1
