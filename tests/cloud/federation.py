"""Helpers for tests of the cloud services: configs, service subprocesses and simulated devices."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from deepfusion.cloud.settings import CloudConfig
from deepfusion.shared.broker import EmbeddedBroker
from deepfusion.shared.config import MqttConfig
from deepfusion.shared.messages import (
    EMBEDDING_DIM,
    Ack,
    DeviceCard,
    RoundSpec,
    ShardAssignment,
    ShardRef,
    decode_message,
    encode_message,
)
from deepfusion.shared.mqtt import Message, MqttClient
from deepfusion.shared.packets import KnowledgePacket, encode
from deepfusion.shared.topics import ack_topic, card_topic, knowledge_topic, round_topic
from tests.shared.packet_factory import FINGERPRINT, make_header, make_sequence

FED = "fed"


def base_overrides(broker: EmbeddedBroker, store_uri: str) -> list[str]:
    return [
        f"federation={FED}",
        f"mqtt.port={broker.port}",
        f'mqtt.host="{broker.host}"',
        'mqtt.protocol="5"',
        f'store.uri="{store_uri}"',
        "mqtt.reconnect_min_s=0.2",
        "mqtt.reconnect_max_s=1.0",
        "ingest.context_wait_s=0.3",
        "ingest.settle_s=0.2",
        "ingest.stats_interval_s=0.2",
        "status.settle_s=0.2",
    ]


def config_from(overrides: Iterable[str]) -> CloudConfig:
    from deepfusion.shared.config import load_config

    return load_config(CloudConfig, None, list(overrides))


class Service:
    """`deepfusion-cloud {command}` in a child process, with its log in a file."""

    def __init__(
        self, command: str, overrides: list[str], log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.log = log
        args = [sys.executable, "-m", "deepfusion.cloud.cli", command]
        for item in overrides:
            args += ["--set", item]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        with log.open("ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=full_env)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.process.poll() is not None:
                raise AssertionError(f"service exited ({self.process.returncode}):\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} in the log within {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def kill9(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise AssertionError(f"service did not stop on SIGTERM:\n{self.text()[-3000:]}") from None


def embedding_for(domain: int, seed: int) -> list[int]:
    """A synthetic int8 data embedding near one of a few well-separated domain directions."""
    base = np.random.default_rng(1000 + domain).normal(size=EMBEDDING_DIM)
    noisy = base + 0.2 * np.random.default_rng(seed).normal(size=EMBEDDING_DIM)
    return [int(v) for v in np.clip(np.rint(noisy / np.abs(noisy).max() * 127), -127, 127)]


def card_for(device: str, *, domain: int = 0, tokenizer: str = FINGERPRINT, **extra: object) -> DeviceCard:
    return DeviceCard(
        federation=FED,
        device=device,
        model_family="llama",
        model_params=2_500_000,
        tokenizer=tokenizer,
        vocab_size=1000,
        backend="torch",
        stages=4,
        feature_width=16,
        embedding=embedding_for(domain, int(hashlib.sha256(device.encode()).hexdigest()[:8], 16)),
        **extra,
    )


def open_round(
    client: MqttClient, devices: dict[str, list[ShardAssignment]], round_id: int = 3, sequences: int = 64
) -> RoundSpec:
    """Publish a RoundSpec the way the coordinator does (for tests of ingest alone)."""
    shard = ShardRef(shard="shard-0", url="file:///dev/null", sha256="0" * 64, sequences=sequences)
    spec = RoundSpec(
        federation=FED,
        round=round_id,
        tokenizer=FINGERPRINT,
        shards=[shard],
        assignments=devices,
        top_k=8,
        stages=4,
        patches=2,
        deadline=datetime.now(UTC) + timedelta(hours=1),
    )
    client.publish_and_wait(round_topic(FED), encode_message(spec), retain=True)
    return spec


def packets_for(
    device: str,
    round_id: int,
    shard: str,
    ids: list[int],
    per_packet: int = 2,
    seed: int = 0,
    **header_fields: object,
) -> list[bytes]:
    """Valid packets of `device` covering sequence `ids` of `shard`, `per_packet` sequences each; the
    header's k, J and P are `open_round`'s unless `header_fields` give the round's own."""
    header = make_header(device=device, round=round_id, shard=shard, federation=FED, **header_fields)
    rng = np.random.default_rng(seed + int(hashlib.sha256(device.encode()).hexdigest()[:8], 16))
    out = []
    for start in range(0, len(ids), per_packet):
        seqs = [make_sequence(rng, header, i, 6) for i in ids[start : start + per_packet]]
        out.append(encode(KnowledgePacket.from_sequences(header, seqs)))
    return out


class SimDevice:
    """A device's network side: card, acks, and resend-until-acked of its packets."""

    def __init__(self, mqtt: MqttConfig, device: str, *, domain: int = 0, **card_extra: object) -> None:
        self.device = device
        self.acks: dict[str, Ack] = {}
        self.ack_log: list[Ack] = []
        self.rounds: list[RoundSpec] = []
        self._cond = threading.Condition()
        self.client = MqttClient(mqtt, device)
        self.client.subscribe(ack_topic(FED, device), self._on_ack)
        self.client.subscribe(round_topic(FED), self._on_round)
        self.client.connect()
        self.card = card_for(device, domain=domain, **card_extra)

    def publish_card(self) -> None:
        self.client.publish_and_wait(card_topic(FED, self.device), encode_message(self.card), retain=True)

    def _on_ack(self, message: Message) -> None:
        ack = decode_message(Ack, message.payload)
        with self._cond:
            self.acks[ack.packet] = ack
            self.ack_log.append(ack)
            self._cond.notify_all()

    def _on_round(self, message: Message) -> None:
        with self._cond:
            if message.payload:
                self.rounds.append(decode_message(RoundSpec, message.payload))
            self._cond.notify_all()

    def wait_round(self, round_id: int, timeout: float = 30.0) -> RoundSpec:
        with self._cond:
            found = self._cond.wait_for(
                lambda: any(r.round == round_id for r in self.rounds), timeout=timeout
            )
            assert found, f"{self.device}: no RoundSpec for round {round_id} within {timeout} s"
            return [r for r in self.rounds if r.round == round_id][-1]

    def send(self, payload: bytes, timeout: float = 10.0) -> Ack:
        """Publish one packet and wait for its Ack."""
        digest = hashlib.sha256(payload).hexdigest()
        with self._cond:
            seen = len(self.ack_log)
        self.client.publish_and_wait(knowledge_topic(FED, self.device), payload)

        def answer() -> Ack | None:
            return next((a for a in self.ack_log[seen:] if a.packet == digest), None)

        with self._cond:
            assert self._cond.wait_for(lambda: answer() is not None, timeout), f"no Ack for {digest[:12]}"
            return answer()  # type: ignore[return-value]

    def deliver(self, payloads: list[bytes], *, resend_after: float = 1.0, timeout: float = 60.0) -> None:
        """Publish all, then resend every packet without an Ack until all have one (bounded)."""
        digests = {hashlib.sha256(p).hexdigest(): p for p in payloads}
        deadline = time.monotonic() + timeout
        pending = dict(digests)
        while pending:
            for payload in pending.values():
                self.client.publish(knowledge_topic(FED, self.device), payload)
            with self._cond:
                waiting = set(pending)
                self._cond.wait_for(lambda w=waiting: w <= self.acks.keys(), timeout=resend_after)
                pending = {d: p for d, p in pending.items() if d not in self.acks}
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.device}: {len(pending)} packets without an Ack after {timeout} s"
                )

    def close(self) -> None:
        self.client.close()
