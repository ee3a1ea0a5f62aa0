"""Ingest throughput: packets/s and MB/s from a local publisher through mosquitto into the store.

    python benchmarks/bench_ingest.py [--packets 1000] [--sequences 20] [--no-s3]

Runs, in one process tree and against one mosquitto:

1. raw: the same payloads published to a bare paho subscriber that drops them (the ceiling);
2. one ingest worker (a `deepfusion-cloud ingest` child process) into a local-folder store;
3. two workers on the shared subscription into the local store;
4. one and two workers into a SeaweedFS S3 server (when its `weed` binary is installed).

Every ingest run counts until the publisher has received every Ack, i.e. every packet was decoded,
checked against the federation's context, written (fsync'd locally) and acknowledged. Packets are
synthetic but shaped like a small LM's: k = 16 of a 4096 vocabulary, J = 4, P = 4, width 64; the
default 24 sequences of 64 tokens make 115 KiB packets, the size agents send (they fill the round's
120 KiB budget). The table is printed as Markdown; ratios are against the raw rate measured in the
same run. The CPU time the workers spent per packet (user + system, from /proc) is the cost that
does not depend on what else shares the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from deepfusion.shared.broker import EmbeddedBroker
from deepfusion.shared.messages import (
    Ack,
    DeviceCard,
    RoundSpec,
    ShardAssignment,
    ShardRef,
    decode_message,
    encode_message,
)
from deepfusion.shared.mqtt import Message, MqttClient
from deepfusion.shared.packets import KnowledgePacket, PacketHeader, SequenceKnowledge, encode
from deepfusion.shared.topics import ack_topic, card_topic, knowledge_topic, round_topic

ROOT = Path(__file__).resolve().parents[1]
FED = "bench"
TOKENIZER = "ab" * 32
VOCAB, K, STAGES, PATCHES, WIDTH, LENGTH = 4096, 16, 4, 4, 64, 64
DEVICES = 4


def make_packets(count: int, sequences: int, seed: int = 0) -> dict[str, list[bytes]]:
    """`count` packets spread over DEVICES devices; every packet covers new sequence ids."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[bytes]] = {f"dev-{d}": [] for d in range(DEVICES)}
    for n in range(count):
        device = f"dev-{n % DEVICES}"
        header = PacketHeader(
            federation=FED, round=0, device=device, shard="public-0", tokenizer=TOKENIZER, vocab_size=VOCAB,
            top_k=K, stages=STAGES, patches=PATCHES, feature_stages=(0, 1, 2, 3), feature_width=WIDTH,
        )  # fmt: skip
        seqs = []
        for s in range(sequences):
            logits = rng.normal(scale=3.0, size=(LENGTH, K + 1))
            logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            order = np.argsort(-logprobs[:, :K], axis=1)
            ids = np.stack([rng.choice(VOCAB, K, replace=False) for _ in range(LENGTH)])
            starts = np.arange(LENGTH, dtype=np.uint32) * 4
            seqs.append(
                SequenceKnowledge(
                    sequence_id=(n // DEVICES) * sequences + s,
                    token_ids=rng.integers(0, VOCAB, LENGTH),
                    offsets=np.stack([starts, starts + 3], axis=1),
                    topk_ids=ids,
                    topk_logprobs=np.take_along_axis(logprobs[:, :K], order, axis=1).astype(np.float16),
                    nll=float(rng.uniform(2, 6)),
                    features=rng.normal(size=(STAGES, PATCHES, WIDTH)).astype(np.float16),
                )
            )
        out[device].append(encode(KnowledgePacket.from_sequences(header, seqs)))
    return out


def raw_rate(broker: EmbeddedBroker, packets: dict[str, list[bytes]]) -> float:
    """Seconds for a bare paho subscriber to receive every payload (it drops them)."""
    total = sum(len(p) for p in packets.values())
    got = threading.Event()
    count = [0]

    def on_message(client, userdata, message) -> None:
        count[0] += 1
        if count[0] == total:
            got.set()

    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-sink", protocol=MQTTProtocolVersion.MQTTv5)
    sub.on_message = on_message
    sub.connect(broker.host, broker.port)
    sub.subscribe(f"deepfusion/v1/{FED}/devices/+/knowledge", qos=1)
    sub.loop_start()
    time.sleep(0.3)  # SUBACK round trip; no event to await with a bare client
    with MqttClient(broker.config(), "raw-publisher") as pub:
        start = time.perf_counter()
        _publish_all(pub, packets)
        if not got.wait(300):
            raise RuntimeError(f"raw subscriber got {count[0]} of {total}")
        elapsed = time.perf_counter() - start
    sub.loop_stop()
    sub.disconnect()
    return elapsed


def _publish_all(client: MqttClient, packets: dict[str, list[bytes]]) -> None:
    infos = []
    # Round-robin over the devices; zip_longest, since a count that is no multiple of DEVICES leaves
    # some devices one packet short (plain zip dropped the others' last packets, and the run hung).
    for batch in itertools.zip_longest(*packets.values()):
        for device, payload in zip(packets, batch, strict=True):
            if payload is not None:
                infos.append(client.publish(knowledge_topic(FED, device), payload, qos=1))
    for info in infos:
        info.wait_for_publish(300)


def announce(broker: EmbeddedBroker, packets: dict[str, list[bytes]], sequences: int) -> None:
    """Cards and a RoundSpec that covers every packet, as the coordinator would publish them."""
    per_device = max(len(p) for p in packets.values()) * sequences
    shard = ShardRef(shard="public-0", url="file:///dev/null", sha256="0" * 64, sequences=per_device)
    spec = RoundSpec(
        federation=FED, round=0, tokenizer=TOKENIZER, shards=[shard],
        assignments={d: [ShardAssignment(shard="public-0", start=0, stop=per_device)] for d in packets},
        top_k=K, stages=STAGES, patches=PATCHES, deadline=datetime.now(UTC) + timedelta(hours=1),
    )  # fmt: skip
    with MqttClient(broker.config(), "bench-coordinator") as client:
        client.publish_and_wait(round_topic(FED), encode_message(spec), retain=True)
        for device in packets:
            card = DeviceCard(
                federation=FED, device=device, model_family="llama", model_params=1, tokenizer=TOKENIZER,
                vocab_size=VOCAB, backend="torch", stages=STAGES, feature_width=WIDTH, embedding=[1] * 32,
            )  # fmt: skip
            client.publish_and_wait(card_topic(FED, device), encode_message(card), retain=True)


def ingest_rate(
    broker: EmbeddedBroker,
    packets: dict[str, list[bytes]],
    store: list[str],
    workers: int,
    env: dict[str, str],
    threads: int,
) -> tuple[float, float]:
    """(seconds from the first publish to the last Ack, CPU seconds the workers spent meanwhile)."""
    overrides = [
        f"federation={FED}", f"mqtt.port={broker.port}", 'mqtt.protocol="5"', "ingest.settle_s=0.2",
        f"ingest.threads={threads}", *store,
    ]  # fmt: skip
    logs = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    procs = []
    run = uuid.uuid4().hex[:6]  # fresh sessions: an old worker's session would still get its share
    for w in range(workers):
        worker_id = f'ingest.worker_id="bench-{run}-{w}"'
        args = [sys.executable, "-m", "deepfusion.cloud.cli", "ingest", "--set", worker_id]
        args += [a for o in overrides for a in ("--set", o)]
        log = (logs / f"worker-{w}.log").open("wb")
        procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}))
    for w in range(workers):
        deadline = time.monotonic() + 60
        while "ready" not in (logs / f"worker-{w}.log").read_text(errors="replace"):
            if time.monotonic() > deadline or procs[w].poll() is not None:
                raise RuntimeError((logs / f"worker-{w}.log").read_text(errors="replace"))
            time.sleep(0.05)
    expected = {hashlib.sha256(p).hexdigest() for ps in packets.values() for p in ps}
    acked: set[str] = set()
    cond = threading.Condition()

    def on_ack(message: Message) -> None:
        ack = decode_message(Ack, message.payload)
        if not ack.accepted:
            raise RuntimeError(f"rejected: {ack.reason} {ack.detail}")
        with cond:
            acked.add(ack.packet)
            cond.notify_all()

    try:
        client = MqttClient(broker.config(), f"bench-devices-{uuid.uuid4().hex[:6]}")
        for device in packets:
            client.subscribe(ack_topic(FED, device), on_ack)
        with client:
            cpu = sum(_cpu_seconds(p.pid) for p in procs)
            start = time.perf_counter()
            _publish_all(client, packets)
            with cond:
                if not cond.wait_for(lambda: expected <= acked, timeout=600):
                    raise RuntimeError(f"{len(expected - acked)} packets without an Ack")
            return time.perf_counter() - start, sum(_cpu_seconds(p.pid) for p in procs) - cpu
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        # Retire the workers: a clean start discards their sessions, which would otherwise keep getting
        # a share of the next run's packets while offline.
        for w in range(workers):
            with MqttClient(broker.config(), f"bench-{run}-{w}", clean_start=True):
                pass


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux /proc): the cost per packet, whatever else runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_s3(workdir: Path) -> tuple[object, list[str], dict[str, str], object]:
    sys.path.insert(0, str(ROOT))
    from tests.fixtures import s3server

    weed = Path(sys.executable).with_name("weed")
    if not weed.is_file():
        raise FileNotFoundError("weed")
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    data = workdir / "weed"
    data.mkdir()
    process, port = s3server._start(str(weed), data, workdir / "weed.log", {**os.environ, **env})
    keys = (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    server = s3server.S3Server(f"http://127.0.0.1:{port}", *keys, "bench", "us-east-1", workdir / "weed.log")
    deadline = time.monotonic() + 60
    while not s3server._answers(server.endpoint_url):
        time.sleep(0.1)
    s3server._create_bucket(server, process, deadline)
    return server, [f'store.endpoint_url="{server.endpoint_url}"'], env, process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=1000)
    parser.add_argument("--sequences", type=int, default=24, help="sequences per packet (24: 115 KiB)")
    parser.add_argument("--threads", type=int, default=16, help="store threads per ingest worker")
    parser.add_argument("--no-s3", action="store_true")
    args = parser.parse_args()
    packets = make_packets(args.packets, args.sequences)
    sizes = [len(p) for ps in packets.values() for p in ps]
    megabytes = sum(sizes) / 1e6
    rows: list[tuple[str, float, float | None]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp, EmbeddedBroker() as broker:
        work = Path(tmp)
        raw = raw_rate(broker, packets)
        rows.append(("raw: bare paho subscriber, payloads dropped", raw, None))
        announce(broker, packets, args.sequences)
        for workers in (1, 2):
            store = [f'store.uri="{work / f"local-{workers}"}"']
            seconds, cpu = ingest_rate(broker, packets, store, workers, {}, args.threads)
            rows.append((f"ingest, {workers} worker(s), local store", seconds, cpu))
        if not args.no_s3:
            try:
                _server, extra, env, process = start_s3(work)
            except FileNotFoundError:
                print("(no weed binary: S3 rows skipped)")
            else:
                try:
                    for workers in (1, 2):
                        store = [f'store.uri="s3://bench/run-{workers}"', *extra]
                        seconds, cpu = ingest_rate(broker, packets, store, workers, env, args.threads)
                        rows.append((f"ingest, {workers} worker(s), S3 (SeaweedFS)", seconds, cpu))
                finally:
                    process.terminate()
                    process.wait(30)
    print(
        f"\n{args.packets} packets of {np.mean(sizes) / 1024:.1f} KiB on average ({megabytes:.1f} MB), "
        f"{args.sequences} sequences x {LENGTH} tokens each, k={K}, J={STAGES}, P={PATCHES}, width {WIDTH}; "
        f"{args.threads} store threads per worker; {os.cpu_count()} CPU cores\n"
    )
    print("| path | packets/s | MB/s | vs raw | worker CPU ms per packet |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, cpu in rows:
        per_packet = "—" if cpu is None else f"{cpu / args.packets * 1e3:.2f}"
        print(
            f"| {name} | {args.packets / seconds:,.0f} | {megabytes / seconds:.1f} | {raw / seconds:.2f}x "
            f"| {per_packet} |"
        )


if __name__ == "__main__":
    main()
