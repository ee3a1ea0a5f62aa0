"""`deepfusion-cloud simulate`: a federation round on this machine, through a real broker and store.

What runs today is the protocol end to end: a broker (mosquitto, embedded unless `--broker` names
one), an object store (a local folder unless `--store` names one), an ingest worker on an MQTT 5
shared subscription, and N devices. Each device announces its card and status (retained, with a Last
Will), reads the retained RoundSpec, fetches the public shard through the URL it names (checksum
verified), scores it with its own byte-level bigram model fitted on its private text, and publishes
knowledge packets until each one is acknowledged. One device also sends a corrupted packet, to show
a rejection with its reason code. Device models, the trainer and the MoE release build on this.
"""

from __future__ import annotations

import hashlib
import json
import operator
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial

import numpy as np
import typer
import zstandard
from rich.console import Console
from rich.table import Table

from deepfusion.cloud.ingest import knowledge_key, store_packet
from deepfusion.shared.broker import EmbeddedBroker
from deepfusion.shared.config import MqttConfig
from deepfusion.shared.fingerprint import tokenizer_fingerprint
from deepfusion.shared.messages import (
    EMBEDDING_DIM,
    Ack,
    DeviceCard,
    DeviceState,
    DeviceStatus,
    RoundSpec,
    ShardAssignment,
    ShardRef,
    decode_message,
    encode_message,
)
from deepfusion.shared.mqtt import Message, MqttClient, Will
from deepfusion.shared.packets import PacketBuilder, PacketHeader, SequenceKnowledge, apply_top_p
from deepfusion.shared.store import ObjectStore, open_store
from deepfusion.shared.topics import (
    TopicKind,
    ack_topic,
    card_topic,
    device_filter,
    knowledge_topic,
    round_topic,
    shared_subscription,
    status_topic,
)

BYTE_VOCAB = {bytes([b]).hex(): b for b in range(256)}  # the demo's tokenizer: UTF-8 bytes

PUBLIC_TEXT = [
    "The central bank held interest rates steady as inflation eased for a third month.",
    "Researchers reported that the new vaccine reduced hospital admissions among older patients.",
    "Shares of the retailer fell after quarterly revenue missed analyst expectations.",
    "The trial enrolled 240 patients with type 2 diabetes and measured blood glucose over a year.",
    "Oil prices rose on Tuesday as supply concerns outweighed a weaker demand outlook.",
    "Clinicians observed fewer adverse events in the treatment group than in the placebo group.",
    "The company announced a merger that would create the largest bank in the region.",
    "Chronic kidney disease was associated with a higher risk of cardiovascular events.",
]
PRIVATE_TEXT = {
    "medical": "Patients with hypertension received the drug daily; blood pressure, renal function and "
    "adverse events were recorded at each visit of the randomized controlled trial.",
    "finance": "Quarterly earnings beat forecasts as revenue grew; the board raised the dividend and "
    "investors expect the bank to expand lending while bond yields and inflation stay high.",
}


@dataclass
class DeviceReport:
    device: str
    domain: str
    packets: int = 0
    bytes: int = 0
    tokens: int = 0
    accepted: list[str] = field(default_factory=list)  # object-store keys the cloud acknowledged
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


def _bigram_logprobs(private_text: str) -> np.ndarray:
    """The device's model: add-one-smoothed byte bigram log-probs [256, 256], from private text only."""
    data = np.frombuffer(private_text.encode(), dtype=np.uint8)
    counts = np.ones((256, 256))
    np.add.at(counts, (data[:-1], data[1:]), 1.0)
    return np.log(counts / counts.sum(axis=1, keepdims=True))


def _score(
    sequence_id: int, text: str, model: np.ndarray, top_k: int, top_p: float | None
) -> SequenceKnowledge:
    ids = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)
    rows = model[ids]  # next-byte distribution after each byte
    top = np.argsort(-rows, axis=1)[:, :top_k]
    logprobs = np.take_along_axis(rows, top, axis=1).astype(np.float16)
    top_ids = top.astype(np.uint16)
    if top_p is not None:
        top_ids, logprobs = apply_top_p(top_ids, logprobs, top_p)
    nll = float(-rows[np.arange(len(ids) - 1), ids[1:]].mean())
    spans = np.arange(len(ids), dtype=np.uint32)
    return SequenceKnowledge(sequence_id, ids, np.stack([spans, spans + 1], axis=1), top_ids, logprobs, nll)


def _embedding(text: str) -> list[int]:
    """A stand-in data embedding: byte histogram folded to 32 dims, int8 (the real one uses MiniLM)."""
    hist = np.bincount(np.frombuffer(text.encode(), dtype=np.uint8), minlength=256).astype(float)
    folded = hist.reshape(EMBEDDING_DIM, -1).sum(axis=1)
    folded = (folded - folded.mean()) / (folded.std() + 1e-9)
    return [int(v) for v in np.clip(np.round(folded * 40), -128, 127)]


def _publish_shard(store: ObjectStore, federation: str) -> ShardRef:
    body = zstandard.ZstdCompressor().compress("\n".join(f'{{"text": "{t}"}}' for t in PUBLIC_TEXT).encode())
    key = f"{federation}/shards/public-0.jsonl.zst"
    store.put(key, body)
    return ShardRef(
        shard="public-0",
        url=store.url(key),
        sha256=hashlib.sha256(body).hexdigest(),
        sequences=len(PUBLIC_TEXT),
    )


def _fetch_shard(ref: ShardRef) -> list[str]:
    with urllib.request.urlopen(ref.url, timeout=30) as response:  # file:// or presigned http(s)://
        body = response.read()
    if hashlib.sha256(body).hexdigest() != ref.sha256:
        raise RuntimeError(f"shard {ref.shard}: checksum mismatch")
    return [
        json.loads(line)["text"]
        for line in zstandard.ZstdDecompressor().decompress(body).decode().splitlines()
    ]


def _run_device(
    mqtt: MqttConfig, federation: str, device: str, domain: str, corrupt: bool, report: DeviceReport
) -> None:
    offline = DeviceStatus(federation=federation, device=device, state=DeviceState.OFFLINE)
    with MqttClient(
        mqtt, device, will=Will(status_topic(federation, device), encode_message(offline))
    ) as client:
        client.connect()
        acks: dict[str, Ack] = {}
        acked = threading.Condition()

        def on_ack(message: Message) -> None:
            ack = decode_message(Ack, message.payload)
            with acked:
                acks[ack.packet] = ack
                acked.notify_all()

        def on_round(message: Message) -> None:
            rounds.append(decode_message(RoundSpec, message.payload))

        rounds: list[RoundSpec] = []
        client.subscribe(ack_topic(federation, device), on_ack)
        client.subscribe(round_topic(federation), on_round)
        model = _bigram_logprobs(PRIVATE_TEXT[domain])
        card = DeviceCard(
            federation=federation, device=device, model_family="byte-bigram", model_params=model.size,
            tokenizer=tokenizer_fingerprint(BYTE_VOCAB), vocab_size=256, backend="torch", stages=0,
            feature_width=0, embedding=_embedding(PRIVATE_TEXT[domain]), hardware="simulated",
        )  # fmt: skip
        client.publish_and_wait(card_topic(federation, device), encode_message(card), retain=True)
        deadline = time.monotonic() + 30
        while not rounds and time.monotonic() < deadline:
            time.sleep(0.05)
        if not rounds:
            raise RuntimeError(f"{device}: no RoundSpec within 30 s")
        spec = rounds[-1]
        status = DeviceStatus(
            federation=federation, device=device, state=DeviceState.SCORING, round=spec.round
        )
        client.publish_and_wait(status_topic(federation, device), encode_message(status), retain=True)

        header = PacketHeader(
            federation=federation, round=spec.round, device=device, shard=spec.shards[0].shard,
            tokenizer=card.tokenizer, vocab_size=256, top_k=spec.top_k, top_p=spec.top_p,
            stages=spec.stages, patches=spec.patches,
        )  # fmt: skip
        builder = PacketBuilder(header, budget=spec.packet_budget)
        texts = _fetch_shard(spec.shards[0])
        packets: list[bytes] = []
        for assignment in spec.assignments[device]:
            for index in range(assignment.start, assignment.stop):
                packets += builder.add(_score(index, texts[index], model, spec.top_k, spec.top_p))
                report.tokens += len(texts[index].encode())
        packets += builder.flush()
        if corrupt:
            packets.append(packets[0][:-7])  # a truncated packet: ingest must refuse it, not crash
        for payload in packets:  # resend until acked: QoS 1 alone does not guarantee delivery
            digest = hashlib.sha256(payload).hexdigest()
            for _ in range(3):
                client.publish_and_wait(knowledge_topic(federation, device), payload)
                report.packets += 1
                report.bytes += len(payload)
                with acked:
                    if acked.wait_for(partial(operator.contains, acks, digest), timeout=10):
                        break
            ack = acks.get(digest)
            if ack is None:
                continue
            if ack.accepted and ack.round is not None:
                report.accepted.append(knowledge_key(federation, ack.round, device, digest))
                report.duplicates += ack.duplicate
            else:
                report.rejected[ack.reason.value if ack.reason else "?"] += 1
        done = DeviceStatus(federation=federation, device=device, state=DeviceState.ONLINE, round=spec.round)
        client.publish_and_wait(status_topic(federation, device), encode_message(done), retain=True)


def simulate(
    devices: int = typer.Option(
        4, min=1, max=64, help="Number of simulated devices (half medical, half finance)."
    ),
    broker: str | None = typer.Option(
        None, help="Broker as mqtt://HOST:PORT; default: start an embedded mosquitto."
    ),
    store: str = typer.Option(
        "results/simulate/store", help="Object store: a folder, file://PATH or s3://BUCKET/PREFIX."
    ),
    federation: str = typer.Option("demo", help="Federation id (lowercase, used in MQTT topics)."),
    top_k: int = typer.Option(
        16, min=1, max=256, help="Next-token log-probs kept per token (a cap when --top-p is set)."
    ),
    top_p: float | None = typer.Option(
        0.95, min=0.01, max=1.0, help="Keep the shortest top-k prefix reaching this mass."
    ),
) -> None:
    """Run a federation round on this machine: broker, object store, ingest and devices, over real MQTT."""
    console = Console()
    object_store = open_store(store)
    embedded = None
    if broker is None:
        embedded = EmbeddedBroker().start()
        mqtt = embedded.config()
        console.print(f"[bold]broker[/] embedded mosquitto at {embedded.url}")
    else:
        host, _, port = broker.removeprefix("mqtt://").partition(":")
        mqtt = MqttConfig(host=host, port=int(port or 1883))
        console.print(f"[bold]broker[/] {broker}")
    console.print(f"[bold]store[/]  {store}")
    try:
        with (
            MqttClient(mqtt, "ingest-0", clean_start=False) as ingest,
            MqttClient(mqtt, "coordinator") as coord,
        ):
            ingest.connect()
            coord.connect()

            def on_packet(message: Message) -> None:
                ack = store_packet(
                    object_store, federation, message.topic, message.payload, max_bytes=1 << 20
                )
                ingest.publish(ack_topic(federation, ack.device), encode_message(ack))

            ingest.subscribe(
                shared_subscription("ingest", device_filter(federation, TopicKind.KNOWLEDGE)), on_packet
            )
            names = [(f"dev-{i:02d}", "medical" if i % 2 == 0 else "finance") for i in range(devices)]
            shard = _publish_shard(object_store, federation)
            whole_shard = [ShardAssignment(shard=shard.shard, start=0, stop=shard.sequences)]
            spec = RoundSpec(
                federation=federation, round=0, tokenizer=tokenizer_fingerprint(BYTE_VOCAB), shards=[shard],
                assignments={name: whole_shard for name, _ in names}, top_k=top_k, top_p=top_p,
                stages=0, patches=1, deadline=datetime.now(UTC) + timedelta(minutes=10),
            )  # fmt: skip
            coord.publish_and_wait(round_topic(federation), encode_message(spec), retain=True)
            console.print(
                f"[bold]round 0[/] open: {devices} devices, shard of {shard.sequences} sequences, "
                f"k={top_k}, top_p={top_p}"
            )

            reports = [DeviceReport(name, domain) for name, domain in names]
            threads = [
                threading.Thread(
                    target=_run_device, args=(mqtt, federation, r.device, r.domain, i == 0, r), daemon=True
                )
                for i, r in enumerate(reports)
            ]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            elapsed = time.perf_counter() - started
        table = Table(title=f"Round 0 of federation '{federation}' ({elapsed:.1f} s)")
        for column in ("device", "domain", "sent", "acked", "dup", "refused", "bytes", "B/tok"):
            table.add_column(column, justify="left" if column in ("device", "domain") else "right")
        for r in reports:
            per_token = f"{r.bytes / r.tokens:.1f}" if r.tokens else "-"
            row = (r.packets, len(r.accepted), r.duplicates, sum(r.rejected.values()), r.bytes)
            table.add_row(r.device, r.domain, *map(str, row), per_token)
        console.print(table)
        for r in reports:
            for reason, count in r.rejected.items():
                console.print(f"{r.device}: {count} packet(s) refused by ingest: {reason}")
        accepted = [key for r in reports for key in r.accepted]
        missing = [key for key in accepted if not object_store.exists(key)]
        console.print(f"{len(accepted) - len(missing)} acknowledged packets are in the store under {store}")
        if missing or any(not r.accepted for r in reports):
            console.print(f"[red]lost[/]: {missing or 'a device had no packet acknowledged'}")
            raise typer.Exit(code=1)
    finally:
        if embedded is not None:
            embedded.close()
