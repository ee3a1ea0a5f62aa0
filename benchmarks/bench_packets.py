"""Knowledge-packet codec: throughput and bytes per token, against raw float32 and np.savez_compressed.

    python benchmarks/bench_packets.py [--vocab 49152] [--width 576] [--stages 4] [--patches 4]

Synthetic but shaped like a small LM's output: top-k log-probs follow a Zipf-like decay with a random
exponent per token, ids are drawn from a Zipf-skewed vocabulary (frequent tokens recur, as in real
text), features are Gaussian (incompressible, the worst case) and travel as int8 blocks. MB/s count
the tensors as encoded, before compression; np.savez_compressed gets those same tensors. The table is
printed as Markdown; every ratio is measured in this one process.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np

from deepfusion.shared.packets import PacketBuilder, PacketHeader, SequenceKnowledge, decode


def synthetic_sequence(
    rng: np.random.Generator, sid: int, length: int, vocab: int, k: int, stages: int, patches: int, width: int
) -> SequenceKnowledge:
    exponent = rng.uniform(0.6, 2.0, size=(length, 1))
    scores = -exponent * np.log(np.arange(1, k + 2))  # k entries plus the rest of the vocabulary
    weights = np.exp(scores)
    weights[:, -1] *= rng.uniform(5, 50, size=length)  # the tail mass beyond the top k
    logprobs = np.log(weights[:, :k] / weights.sum(axis=1, keepdims=True))
    zipf = np.minimum(rng.zipf(1.2, size=(length, 4 * k)), vocab) - 1
    ids = np.empty((length, k), dtype=np.int64)
    for row in range(length):  # k distinct ids per row, frequent ones more likely
        ids[row] = np.unique(zipf[row])[:k] if len(np.unique(zipf[row])) >= k else rng.choice(vocab, k, False)
    starts = np.cumsum(rng.integers(1, 8, size=length)).astype(np.uint32)
    return SequenceKnowledge(
        sequence_id=sid,
        token_ids=np.minimum(rng.zipf(1.2, size=length), vocab) - 1,
        offsets=np.stack([starts, starts + rng.integers(1, 6, size=length).astype(np.uint32)], axis=1),
        topk_ids=ids,
        topk_logprobs=logprobs.astype(np.float16),
        nll=float(rng.uniform(2, 6)),
        features=rng.normal(size=(stages, patches, width)).astype(np.float32),
    )


def measure(k: int, args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(k)
    header = PacketHeader(
        federation="bench",
        round=0,
        device="dev-0",
        shard="shard-0",
        tokenizer="0" * 64,
        vocab_size=args.vocab,
        top_k=k,
        stages=args.stages,
        patches=args.patches,
        feature_stages=tuple(range(args.stages)),
        feature_width=args.width,
    )
    sequences = [
        synthetic_sequence(rng, i, args.length, args.vocab, k, args.stages, args.patches, args.width)
        for i in range(args.sequences)
    ]
    tokens = args.sequences * args.length

    start = time.perf_counter()
    builder = PacketBuilder(header)
    packets = [p for s in sequences for p in builder.add(s)] + builder.flush()
    encode_s = time.perf_counter() - start

    start = time.perf_counter()
    decoded = [decode(p) for p in packets]
    decode_s = time.perf_counter() - start

    raw_f32 = sum(  # every tensor as float32: the naive baseline
        4 * (p.token_ids.size + p.offsets.size + p.topk_ids.size + p.topk_logprobs.size + p.seq_nll.size)
        + 4 * (p.features.size if p.features is not None else 0)
        for p in decoded
    )
    npz = 0
    start = time.perf_counter()
    for p in decoded:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **p.wire_tensors())
        npz += buffer.tell()
    npz_s = time.perf_counter() - start
    wire = sum(len(p) for p in packets)
    uncompressed = sum(sum(a.nbytes for a in p.wire_tensors().values()) for p in decoded)
    return {
        "k": k,
        "packets": len(packets),
        "tokens": tokens,
        "encode_mb_s": uncompressed / encode_s / 1e6,
        "encode_pkt_s": len(packets) / encode_s,
        "decode_mb_s": uncompressed / decode_s / 1e6,
        "npz_mb_s": uncompressed / npz_s / 1e6,
        "decode_pkt_s": len(packets) / decode_s,
        "bytes_per_token": wire / tokens,
        "raw_f32_per_token": raw_f32 / tokens,
        "npz_per_token": npz / tokens,
        "fill": wire / (len(packets) * builder.budget),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (SmolLM2: 49152)")
    parser.add_argument("--width", type=int, default=576, help="feature width (SmolLM2-135M: 576)")
    parser.add_argument("--stages", type=int, default=4, help="J")
    parser.add_argument("--patches", type=int, default=4, help="P")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--sequences", type=int, default=400)
    args = parser.parse_args()
    print(
        f"vocab {args.vocab}, J={args.stages}, P={args.patches}, width {args.width}, "
        f"{args.sequences} sequences x {args.length} tokens, 120 KiB packets\n"
    )
    print(
        "| k | packets | fill | encode MB/s | encode pkt/s | decode MB/s | decode pkt/s "
        "| packet B/token | raw f32 B/token | npz B/token | npz write MB/s "
        "| packet / raw f32 | packet / npz |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k in (8, 16, 32):
        r = measure(k, args)
        print(
            f"| {r['k']} | {r['packets']} | {r['fill']:.2f} "
            f"| {r['encode_mb_s']:.0f} | {r['encode_pkt_s']:.0f} "
            f"| {r['decode_mb_s']:.0f} | {r['decode_pkt_s']:.0f} | {r['bytes_per_token']:.1f} "
            f"| {r['raw_f32_per_token']:.1f} | {r['npz_per_token']:.1f} | {r['npz_mb_s']:.0f} "
            f"| {r['bytes_per_token'] / r['raw_f32_per_token']:.2f} "
            f"| {r['bytes_per_token'] / r['npz_per_token']:.2f} |"
        )


if __name__ == "__main__":
    main()
