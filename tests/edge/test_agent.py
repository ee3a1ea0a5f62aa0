"""The edge agent against a real mosquitto, a local object store and a harness playing the cloud.

The harness stores packets with the real ingest code (`store_packet`, content-addressed keys) and acks
them; the agent runs as `deepfusion-edge run` in a child process, so kill -9 is a real crash.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from deepfusion.cloud.ingest import IngestContext, store_packet
from deepfusion.cloud.shards import list_shards, publish_shard
from deepfusion.edge.agent import RateLimiter
from deepfusion.edge.agent_config import load_device_config
from deepfusion.edge.fetch import FetchError, fetch_shard
from deepfusion.shared.broker import EmbeddedBroker
from deepfusion.shared.config import StoreConfig
from deepfusion.shared.messages import (
    DeviceCard,
    DeviceState,
    DeviceStatus,
    RoundSpec,
    ShardAssignment,
    decode_message,
    encode_message,
)
from deepfusion.shared.mqtt import Message, MqttClient
from deepfusion.shared.packets import decode
from deepfusion.shared.store import open_store
from deepfusion.shared.store.local import LocalStore
from deepfusion.shared.topics import (
    TopicKind,
    ack_topic,
    card_topic,
    device_filter,
    round_topic,
    status_topic,
)
from tests.fixtures.broker import Inbox
from tests.fixtures.s3server import S3Server

FED = "fed"
DEVICE = "dev-1"
SHARD = "public-0"
ROUND = dict(top_k=8, stages=2, patches=2, max_tokens=48)
EMBEDDING = [(i * 37) % 255 - 127 for i in range(32)]


@pytest.fixture(scope="module")
def shard_texts(held_out_texts: list[str]) -> list[str]:
    """30 short public texts (each one window of at most 48 tokens)."""
    pieces = [t[i : i + 100].strip() for t in held_out_texts for i in range(0, 400, 100)]
    return [p for p in pieces if len(p) > 20][:30]


@pytest.fixture(scope="module")
def fingerprint(tiny_llama: Path) -> str:
    from deepfusion.edge.modelinfo import model_info

    found = model_info(tiny_llama).tokenizer_fingerprint
    assert found is not None
    return found


class Cloud:
    """Plays the cloud: publishes the shard and the RoundSpec, stores packets once, acks them."""

    def __init__(self, broker: EmbeddedBroker, root: Path) -> None:
        self.store = open_store(str(root / "store"))
        self.spec: RoundSpec | None = None
        self.received = 0
        self.drop_acks = 0  # the next N accepted packets are stored but get no Ack
        self.rejected: list[str] = []
        self._cond = threading.Condition()
        config = broker.config(reconnect_min_s=0.2, reconnect_max_s=1.0)
        self.client = MqttClient(config, "cloud-harness", clean_start=False)
        self.client.subscribe(device_filter(FED, TopicKind.KNOWLEDGE), self._on_packet)
        self.client.connect()

    def open_round(self, texts: list[str], fingerprint: str, round_id: int = 1, **spec: object) -> RoundSpec:
        ref = publish_shard(self.store, FED, SHARD, texts)
        self.spec = RoundSpec(
            federation=FED,
            round=round_id,
            tokenizer=fingerprint,
            shards=[ref],
            assignments={DEVICE: [ShardAssignment(shard=SHARD, start=0, stop=len(texts))]},
            deadline=datetime.now(UTC) + timedelta(hours=1),
            **{**ROUND, **spec},  # type: ignore[arg-type]
        )
        self.client.publish_and_wait(round_topic(FED), encode_message(self.spec), retain=True)
        return self.spec

    def _on_packet(self, message: Message) -> None:
        spec = self.spec
        assert spec is not None
        context = IngestContext(cards={DEVICE: spec.tokenizer}, rounds={spec.round: spec})
        ack = store_packet(
            self.store, FED, message.topic, message.payload, max_bytes=1 << 20, context=context
        )
        with self._cond:
            self.received += 1
            if not ack.accepted:
                self.rejected.append(str(ack.reason))
            drop = ack.accepted and self.drop_acks > 0
            if drop:
                self.drop_acks -= 1
            self._cond.notify_all()
        if not drop:
            self.client.publish(ack_topic(FED, DEVICE), encode_message(ack))

    def wait_received(self, count: int, timeout: float = 60.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.received >= count, timeout), f"{self.received} packets"

    def sequence_ids(self, round_id: int = 1) -> list[int]:
        """Every sequence id in the stored packets of the round, duplicates included."""
        ids: list[int] = []
        for key in self.store.list(f"{FED}/rounds/{round_id}/knowledge/{DEVICE}/"):
            ids += [int(i) for i in decode(self.store.get(key)).sequence_ids]
        return sorted(ids)

    def payloads(self, round_id: int = 1) -> set[bytes]:
        return {self.store.get(k) for k in self.store.list(f"{FED}/rounds/{round_id}/knowledge/{DEVICE}/")}

    def wait_complete(self, count: int, timeout: float = 90.0, round_id: int = 1) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            ids = self.sequence_ids(round_id)
            if len(set(ids)) >= count or time.monotonic() > deadline:
                return ids
            with self._cond:
                self._cond.wait(0.2)

    def close(self) -> None:
        self.client.close()


class AgentProcess:
    """`deepfusion-edge run --config FILE` in a child process, log in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        args = [
            sys.executable,
            "-c",
            "from deepfusion.edge.cli import main; main()",
            "run",
            "-c",
            str(self.config),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, needle: str, timeout: float = 60.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.text().count(needle) < count:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited ({self.process.returncode}):\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} within {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"agent ignored SIGTERM:\n{self.text()[-3000:]}") from None


def write_config(path: Path, broker: EmbeddedBroker, checkpoint: Path, **sections: dict[str, object]) -> Path:
    tables: dict[str, dict[str, object]] = {
        "device": {"id": DEVICE, "federation": FED, "state_dir": str(path.parent / "state")},
        "model": {"path": str(checkpoint), "threads": 1, "batch_size": 4, "stages": 2},
        "data": {"embedding": EMBEDDING},
        "spool": {"dir": str(path.parent / "spool"), "resend_s": 1.0},
        "uplink": {"status_interval_s": 0.2},
        "mqtt": {
            "host": broker.host,
            "port": broker.port,
            "protocol": "5",
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1.0,
        },
    }
    for name, values in sections.items():
        tables[name] = {**tables.get(name, {}), **values}
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items() if value is not None]
    path.write_text("\n".join(lines) + "\n")
    load_device_config(path)  # the file the agent reads is valid
    return path


@pytest.fixture
def cloud(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[Cloud]:
    harness = Cloud(broker, tmp_path)
    yield harness
    harness.close()


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        if agent.process is not None and agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait(10)


# -- units ---------------------------------------------------------------------------------------------


def test_fetch_checks_the_checksum(tmp_path: Path, shard_texts: list[str]) -> None:
    store = open_store(str(tmp_path / "store"))
    ref = publish_shard(store, FED, SHARD, shard_texts)
    assert ref.url.startswith("file://")
    assert fetch_shard(ref, tmp_path / "cache") == shard_texts
    assert fetch_shard(ref, tmp_path / "cache") == shard_texts  # from the cache
    bad = ref.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(FetchError, match="sha256"):
        fetch_shard(bad, tmp_path / "other")


def test_agents_sharing_a_cache_fetch_the_same_shard_at_once(tmp_path: Path) -> None:
    """Devices hosted in one process may share a state_dir: their cache writes must not collide."""
    texts = [f"public text number {i} " * 8 for i in range(4000)]
    ref = publish_shard(open_store(str(tmp_path / "store")), FED, SHARD, texts)
    errors: list[BaseException] = []

    def fetch(barrier: threading.Barrier, cache: Path) -> None:
        barrier.wait()
        try:
            assert fetch_shard(ref, cache) == texts
        except BaseException as exc:
            errors.append(exc)

    for attempt in range(10):
        barrier = threading.Barrier(6)
        threads = [
            threading.Thread(target=fetch, args=(barrier, tmp_path / f"cache-{attempt}")) for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert not errors, errors[:3]
    assert [p.name for p in (tmp_path / "cache-0").iterdir()] == [f"{ref.sha256}.jsonl.zst"]


def test_a_shard_that_cannot_be_cached_is_still_used(
    tmp_path: Path, shard_texts: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ref = publish_shard(open_store(str(tmp_path / "store")), FED, SHARD, shard_texts)
    write_bytes = Path.write_bytes

    def disk_full(path: Path, data: bytes) -> int:
        write_bytes(path, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with caplog.at_level(logging.WARNING, logger="deepfusion.edge.fetch"):
        assert fetch_shard(ref, tmp_path / "cache") == shard_texts
    assert "No space left" in caplog.text
    assert not list((tmp_path / "cache").iterdir())  # no half-written file keeps the disk full


def test_shard_texts_with_unicode_line_breaks_round_trip(tmp_path: Path) -> None:
    """U+2028, U+2029 and U+0085 stay inside their text: only an escaped-free newline ends a line."""
    texts = ["one\u2028two", "next\x85line", "para\u2029graph", "plain\nnewline", "ok"]
    store = open_store(str(tmp_path / "store"))
    ref = publish_shard(store, FED, SHARD, texts)
    assert ref.sequences == len(texts)
    assert fetch_shard(ref, tmp_path / "cache") == texts
    assert [s.sequences for s in list_shards(store, FED)] == [len(texts)]
    store.put(f"{FED}/shards/broken.jsonl.zst", b"not zstd")  # left out, the readable shard stays
    assert [s.shard for s in list_shards(store, FED)] == [SHARD]


def test_a_shard_deleted_while_the_shards_are_listed_is_left_out(tmp_path: Path) -> None:
    class DeletingStore(LocalStore):
        """Deletes the first listed shard right after listing, as a concurrent `delete` can."""

        def list(self, prefix: str = "") -> Iterator[str]:
            keys = list(super().list(prefix))
            self.delete(keys[0])
            return iter(keys)

    store = DeletingStore(tmp_path / "store")
    publish_shard(store, FED, "a-first", ["one text"])
    publish_shard(store, FED, "b-second", ["another text"])
    assert [s.shard for s in list_shards(store, FED)] == ["b-second"]


@pytest.mark.s3
def test_fetch_from_a_presigned_s3_url(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, shard_texts: list[str]
) -> None:
    """A shard in a real S3 store (SigV4), fetched by URL alone as a device does, checksum verified."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    uri = f"s3://{s3_server.bucket}/fetch-{os.urandom(6).hex()}"
    store = open_store(StoreConfig(uri=uri, endpoint_url=s3_server.endpoint_url))
    ref = publish_shard(store, FED, SHARD, shard_texts)
    assert ref.url.startswith(s3_server.endpoint_url + "/") and "X-Amz-Signature=" in ref.url
    unsigned = ref.url.split("?", 1)[0]
    with pytest.raises(FetchError, match="HTTP 403"):  # the signature is what grants access
        fetch_shard(ref.model_copy(update={"url": unsigned}), tmp_path / "unsigned")

    cache = tmp_path / "cache"
    assert fetch_shard(ref, cache) == shard_texts
    assert [p.name for p in cache.iterdir()] == [f"{ref.sha256}.jsonl.zst"]  # checked bytes, cached

    bad = ref.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(FetchError, match=r"sha256 [0-9a-f]{12}\.\.\. is not the RoundSpec's 000000000000"):
        fetch_shard(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing unverified is cached

    publish_shard(store, FED, SHARD, shard_texts[::-1])  # the object changed behind the same URL
    with pytest.raises(FetchError, match="damaged download or a changed object"):
        fetch_shard(ref, tmp_path / "changed")


def test_rate_limiter_holds_the_rate() -> None:
    limiter, stop = RateLimiter(50_000), threading.Event()
    started = time.monotonic()
    for _ in range(10):
        assert limiter.acquire(10_000, stop)
    assert 0.9 < time.monotonic() - started < 3.0  # 100 kB at 50 kB/s after a 50 kB burst


# -- the agent -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_join_publishes_card_and_status_and_will_marks_offline(
    broker: EmbeddedBroker, tiny_llama: Path, held_out_texts: list[str], tmp_path: Path, mqtt_client, agents
) -> None:
    private = tmp_path / "private.jsonl"
    private.write_text("".join(json.dumps({"text": t}) + "\n" for t in held_out_texts[:4]))
    config = write_config(
        tmp_path / "device.toml", broker, tiny_llama, data={"private": str(private), "embedding": None}
    )
    agent = AgentProcess(config, tmp_path / "agent.log").start()
    agents.append(agent)
    agent.wait_log("agent joined", timeout=120)

    watcher = mqtt_client(broker.config(), "watcher")
    inbox = Inbox()
    watcher.subscribe(card_topic(FED, DEVICE), inbox)
    watcher.subscribe(status_topic(FED, DEVICE), inbox)
    messages = inbox.wait_count(2)
    assert all(m.retain for m in messages[:2])
    card = decode_message(DeviceCard, next(m for m in messages if m.topic.endswith("/card")).payload)
    assert card.device == DEVICE and card.backend == "torch" and card.stages == 2
    assert len(card.embedding) == 32 and any(card.embedding)
    status = decode_message(DeviceStatus, next(m for m in messages if m.topic.endswith("/status")).payload)
    assert status.state == DeviceState.ONLINE and status.backend == "torch" and status.software

    agent.kill9()  # no clean disconnect: the broker publishes the Last Will
    inbox.wait_until(
        lambda ms: any(
            m.topic.endswith("/status")
            and decode_message(DeviceStatus, m.payload).state == DeviceState.OFFLINE
            for m in ms
        ),
        timeout=15,
        what="offline status",
    )
    late = Inbox()
    mqtt_client(broker.config(), "late-watcher").subscribe(status_topic(FED, DEVICE), late)
    retained = late.wait_count(1)[0]
    assert retained.retain and decode_message(DeviceStatus, retained.payload).state == DeviceState.OFFLINE


@pytest.mark.slow
def test_round_matches_offline_score_byte_for_byte(
    broker: EmbeddedBroker,
    cloud: Cloud,
    tiny_llama: Path,
    fingerprint: str,
    shard_texts: list[str],
    tmp_path: Path,
    agents,
) -> None:
    spec = cloud.open_round(shard_texts, fingerprint)
    agent = AgentProcess(
        write_config(tmp_path / "device.toml", broker, tiny_llama), tmp_path / "a.log"
    ).start()
    agents.append(agent)
    ids = cloud.wait_complete(len(shard_texts))
    assert ids == list(range(len(shard_texts)))

    public = tmp_path / "public.jsonl"
    public.write_text("".join(json.dumps({"text": t}) + "\n" for t in shard_texts))
    offline = tmp_path / "offline"
    score = [
        sys.executable, "-c", "from deepfusion.edge.cli import main; main()", "score", str(tiny_llama),
        "-i", str(public), "-o", str(offline), "--backend", "torch", "--top-k", str(spec.top_k),
        "--stages", str(spec.stages), "--patches", str(spec.patches), "--max-tokens", str(spec.max_tokens),
        "--batch-size", "4", "--threads", "1", "--federation", FED, "--round", "1", "--device", DEVICE,
        "--shard", SHARD,
    ]  # fmt: skip
    subprocess.run(score, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    assert len((offline / "sequences.jsonl").read_text().splitlines()) == len(shard_texts)  # one window each
    assert cloud.payloads() == {p.read_bytes() for p in offline.glob("*.dfk")}

    assert agent.stop() == 0  # SIGTERM: clean exit, spool empty, status offline
    assert "agent stopped device=dev-1 unacked=0" in agent.text()


@pytest.mark.slow
def test_the_same_round_on_llama_cpp(
    broker: EmbeddedBroker,
    cloud: Cloud,
    gguf_q8_0: Path,
    fingerprint: str,
    shard_texts: list[str],
    tmp_path: Path,
    agents,
) -> None:
    """The round of the torch test, run by llama.cpp on a GGUF export of the same model."""
    texts = shard_texts[:12]
    spec = cloud.open_round(texts, fingerprint, packet_budget=8 * 1024)  # a few packets
    config = write_config(tmp_path / "device.toml", broker, gguf_q8_0, model={"backend": "llama_cpp"})
    agent = AgentProcess(config, tmp_path / "a.log").start()
    agents.append(agent)
    ids = cloud.wait_complete(len(texts), timeout=120)
    assert ids == list(range(len(texts))), f"missing or duplicated sequences: {ids}"
    assert not cloud.rejected
    assert "backend=llama_cpp" in agent.text()

    packets = [decode(p) for p in cloud.payloads()]
    assert len(packets) > 1
    for packet in packets:
        header = packet.header
        # llama.cpp sees the last hidden state only: of J = 2 stages it declares the last one.
        assert header.stages == spec.stages and header.feature_stages == (spec.stages - 1,)
        assert header.feature_width > 0 and header.top_k == spec.top_k
        assert packet.features is not None
        assert packet.features.shape == (len(packet.sequence_ids), 1, spec.patches, header.feature_width)
        assert np.isfinite(packet.features.astype(np.float32)).all()
        assert np.isfinite(packet.seq_nll).all() and (packet.seq_nll > 0).all()
    assert agent.stop() == 0
    assert "agent stopped device=dev-1 unacked=0" in agent.text()


FAULT_ROUND = dict(packet_budget=6 * 1024)  # a few sequences per packet: many packets
SLOW_UPLINK = {"rate_limit_bytes_s": 30_000, "status_interval_s": 0.2}


def _assert_every_sequence_once(cloud: Cloud, count: int) -> None:
    ids = cloud.wait_complete(count)
    assert ids == list(range(count)), f"missing or duplicated sequences: {ids}"
    assert not cloud.rejected


@pytest.mark.slow
def test_broker_outage_mid_round_loses_nothing(
    broker: EmbeddedBroker,
    cloud: Cloud,
    tiny_llama: Path,
    fingerprint: str,
    shard_texts: list[str],
    tmp_path,
    agents,
) -> None:
    cloud.open_round(shard_texts, fingerprint, **FAULT_ROUND)
    config = write_config(tmp_path / "device.toml", broker, tiny_llama, uplink=SLOW_UPLINK)
    agents.append(AgentProcess(config, tmp_path / "a.log").start())
    cloud.wait_received(2, timeout=120)
    assert len(set(cloud.sequence_ids())) < len(shard_texts)
    broker.stop()
    time.sleep(1.0)  # an outage: nothing to wait for but time
    broker.start()
    _assert_every_sequence_once(cloud, len(shard_texts))


@pytest.mark.slow
def test_agent_kill9_mid_round_resumes_from_the_spool(
    broker: EmbeddedBroker,
    cloud: Cloud,
    tiny_llama: Path,
    fingerprint: str,
    shard_texts: list[str],
    tmp_path,
    agents,
) -> None:
    cloud.open_round(shard_texts, fingerprint, **FAULT_ROUND)
    # A small spool bound makes scoring wait for acks, so the kill lands mid-scoring as well as mid-uplink.
    config = write_config(
        tmp_path / "device.toml", broker, tiny_llama, uplink=SLOW_UPLINK, spool={"max_bytes": 16 * 1024}
    )
    first = AgentProcess(config, tmp_path / "a.log").start()
    agents.append(first)
    cloud.wait_received(2, timeout=120)
    first.kill9()
    assert len(set(cloud.sequence_ids())) < len(shard_texts)
    second = AgentProcess(config, tmp_path / "b.log").start()
    agents.append(second)
    _assert_every_sequence_once(cloud, len(shard_texts))
    assert "spool full" in first.text() + second.text()


@pytest.mark.slow
def test_dropped_acks_are_resent_until_acked(
    broker: EmbeddedBroker,
    cloud: Cloud,
    tiny_llama: Path,
    fingerprint: str,
    shard_texts: list[str],
    tmp_path,
    agents,
) -> None:
    cloud.drop_acks = 3
    cloud.open_round(shard_texts, fingerprint, **FAULT_ROUND)
    agent = AgentProcess(
        write_config(tmp_path / "device.toml", broker, tiny_llama), tmp_path / "a.log"
    ).start()
    agents.append(agent)
    _assert_every_sequence_once(cloud, len(shard_texts))
    stored = len(cloud.payloads())
    spool = tmp_path / "spool" / "index.json"
    deadline = time.monotonic() + 30
    while json.loads(spool.read_text())["packets"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert json.loads(spool.read_text())["packets"] == []  # every packet acked in the end
    assert cloud.received >= stored + 3  # the three unacked packets came again
    assert "resending unacked" in agent.text()
    digest = hashlib.sha256(next(iter(cloud.payloads()))).hexdigest()
    assert digest in {k.rsplit("/", 1)[1][:-4] for k in cloud.store.list(f"{FED}/rounds/1/knowledge/")}


@pytest.mark.slow
def test_new_round_cancels_stale_work(
    broker: EmbeddedBroker,
    cloud: Cloud,
    tiny_llama: Path,
    fingerprint: str,
    shard_texts: list[str],
    tmp_path,
    agents,
) -> None:
    cloud.open_round(shard_texts, fingerprint, round_id=1, **FAULT_ROUND)
    config = write_config(
        tmp_path / "device.toml", broker, tiny_llama, uplink=SLOW_UPLINK, spool={"max_bytes": 16 * 1024}
    )
    agent = AgentProcess(config, tmp_path / "a.log").start()
    agents.append(agent)
    agent.wait_log("spool full", timeout=120)  # round 1 is mid-way, waiting for acks
    cloud.open_round(shard_texts[:8], fingerprint, round_id=2, **FAULT_ROUND)
    agent.wait_log("round 1: scoring abandoned")
    assert cloud.wait_complete(8, round_id=2) == list(range(8))
    assert len(set(cloud.sequence_ids(1))) < len(shard_texts)  # round 1 was not finished
    agent.wait_log("round 2 scored=True")
    agent.wait_log("spool dropped rejected")  # round 1's leftovers: refused as round_closed, not retried
