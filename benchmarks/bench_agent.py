"""Edge agent end to end: a round through `Agent`, MQTT and ingest vs `deepfusion-edge score`, same shard.

    python benchmarks/bench_agent.py --model PATH [--backend torch] [--sequences 512] [--max-tokens 128]

- offline: `score_texts` (what `deepfusion-edge score` runs) on the shard's texts, tokens/s;
- agent: a real mosquitto, a local store, a harness that stores packets with `store_packet` and acks
  them, and the agent (in this process, model already loaded); the clock runs from publishing the
  RoundSpec until every assigned sequence is stored. tokens/s and the ratio to offline (goal >= 0.9);
- uplink: bytes per token of the MQTT PUBLISH packets the broker forwarded (fixed header, topic,
  packet id, properties and payload, resends included) vs the packet bytes alone.
Texts: `--input` (.jsonl with "text") or the default split's public set. Results: results/bench_agent.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_wire_bytes(topic: str, payload: int) -> int:
    """Bytes of an MQTT 5 QoS 1 PUBLISH without properties: header, topic, packet id, props length, body."""
    remaining = 2 + len(topic.encode()) + 2 + 1 + payload
    return 1 + _varint_len(remaining) + remaining


def _texts(args: argparse.Namespace) -> list[str]:
    from deepfusion.edge.scoring import read_texts

    if args.input:
        texts = list(read_texts(Path(args.input)))
    else:
        from deepfusion.shared.corpora import (
            SplitSpec,
            prepare_corpora,
            prepare_splits,
            read_jsonl,
            resolve_cache_root,
        )

        cache = resolve_cache_root()
        prepare_corpora(cache)
        split_dir, split = prepare_splits(cache, SplitSpec())
        texts = [d.text for e in split.public.values() for d in read_jsonl(split_dir / e.file)]
    return texts[: args.sequences]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="Checkpoint dir, ONNX export dir or .gguf file.")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--input", help="Public text (.jsonl); default: the default split's public set.")
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="results/bench_agent.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from deepfusion.cloud.ingest import IngestContext, store_packet
    from deepfusion.cloud.shards import publish_shard
    from deepfusion.edge.agent import Agent
    from deepfusion.edge.agent_config import DeviceConfig
    from deepfusion.edge.backends import load_backend
    from deepfusion.edge.modelinfo import load_tokenizer, model_info
    from deepfusion.edge.scoring import ScoreSettings, score_texts
    from deepfusion.shared.broker import EmbeddedBroker
    from deepfusion.shared.messages import RoundSpec, ShardAssignment, encode_message
    from deepfusion.shared.mqtt import Message, MqttClient
    from deepfusion.shared.store import open_store
    from deepfusion.shared.topics import TopicKind, ack_topic, device_filter, round_topic

    fed, device, shard = "bench", "dev-0", "public-0"
    info = model_info(args.model)
    backend_name = args.backend if args.backend != "auto" else info.backends[0]
    texts = _texts(args)
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    settings = ScoreSettings(
        federation=fed, round=1, device=device, shard=shard, top_k=args.top_k, stages=4, patches=4,
        max_tokens=args.max_tokens, batch_size=args.batch_size,
    )  # fmt: skip

    tokenizer = load_tokenizer(info.path)
    # A round scores line i as one window: cut each text to its first window so both sides see the same.
    from deepfusion.edge.scoring import windows

    firsts = {w.record: w for w in reversed(list(windows(tokenizer, texts, args.max_tokens)))}
    texts = [texts[r][w.char_start : w.char_end] for r, w in sorted(firsts.items())]
    with load_backend(backend_name, info.path, threads=args.threads) as runner:
        score_texts(runner, tokenizer, texts[: args.batch_size], work / "warmup", settings)
        offline = score_texts(runner, tokenizer, texts, work / "offline", settings)

    with EmbeddedBroker(workdir=work / "mosquitto") as broker:
        store = open_store(str(work / "store"))
        ref = publish_shard(store, fed, shard, texts)
        spec = RoundSpec(
            federation=fed, round=1, tokenizer=info.tokenizer_fingerprint, shards=[ref],
            assignments={device: [ShardAssignment(shard=shard, start=0, stop=len(texts))]},
            top_k=args.top_k, stages=4, patches=4, max_tokens=args.max_tokens,
            deadline=datetime.now(UTC) + timedelta(hours=1),
        )  # fmt: skip
        context = IngestContext(cards={device: spec.tokenizer}, rounds={1: spec})
        counts = {"messages": 0, "wire": 0, "payload": 0, "sequences": 0, "tokens": 0}
        done = threading.Event()
        lock = threading.Lock()
        seen: set[int] = set()
        refused: list[str] = []

        def on_packet(message: Message) -> None:
            from deepfusion.shared.packets import decode

            ack = store_packet(store, fed, message.topic, message.payload, max_bytes=1 << 20, context=context)
            cloud.publish(ack_topic(fed, device), encode_message(ack))
            if not ack.accepted:  # a refused packet is not stored: the round would never complete
                refused.append(f"{ack.reason}: {ack.detail}")
                done.set()
                return
            packet = decode(message.payload)
            with lock:
                counts["messages"] += 1
                counts["wire"] += publish_wire_bytes(message.topic, len(message.payload))
                counts["payload"] += len(message.payload)
                new = {int(i) for i in packet.sequence_ids} - seen
                seen.update(new)
                if new:
                    counts["tokens"] += int(packet.num_tokens)
                if len(seen) >= len(texts):
                    done.set()

        cloud = MqttClient(broker.config(), "bench-cloud")
        cloud.subscribe(device_filter(fed, TopicKind.KNOWLEDGE), on_packet)
        cloud.connect()
        config = DeviceConfig.model_validate(
            {
                "device": {"id": device, "federation": fed, "state_dir": str(work / "state")},
                "model": {"path": str(info.path), "backend": backend_name, "threads": args.threads,
                          "batch_size": args.batch_size},
                "data": {"embedding": [1] * 32},
                "spool": {"dir": str(work / "spool")},
                "mqtt": {"host": broker.host, "port": broker.port, "protocol": "5"},
            }
        )  # fmt: skip
        agent, stop = Agent(config), threading.Event()
        thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        thread.start()
        while agent._client is None or not agent._client.connected:  # joined: model loaded, connected
            time.sleep(0.05)
        started = time.perf_counter()
        cloud.publish_and_wait(round_topic(fed), encode_message(spec), retain=True)
        if not done.wait(600):
            raise SystemExit(f"the round did not complete: {len(seen)}/{offline.sequences} sequences")
        if refused:
            raise SystemExit(f"ingest refused a packet of the agent: {refused[0]}")
        seconds = time.perf_counter() - started
        stop.set()
        thread.join(60)
        cloud.close()

    agent_tps = offline.tokens / seconds
    result = {
        "model": str(info.path), "backend": backend_name, "sequences": offline.sequences,
        "tokens": offline.tokens, "offline_tokens_per_s": round(offline.tokens_per_second, 1),
        "agent_tokens_per_s": round(agent_tps, 1), "ratio": round(agent_tps / offline.tokens_per_second, 3),
        "messages": counts["messages"],
        "packet_bytes_per_token": round(counts["payload"] / offline.tokens, 2),
        "mqtt_bytes_per_token": round(counts["wire"] / offline.tokens, 2),
        "offline_packet_bytes_per_token": round(offline.bytes / offline.tokens, 2),
    }  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print("| " + " | ".join(result) + " |")
    print("|" + "---|" * len(result))
    print("| " + " | ".join(str(v) for v in result.values()) + " |")


if __name__ == "__main__":
    main()
