"""Builds valid knowledge packets from random distributions, and raw wire bytes that skip validation."""

from __future__ import annotations

import numpy as np
import safetensors.numpy
import zstandard

from deepfusion.shared.packets import MAGIC, KnowledgePacket, PacketHeader, SequenceKnowledge

FINGERPRINT = "ab" * 32


def make_header(**overrides: object) -> PacketHeader:
    fields: dict[str, object] = {
        "federation": "fed",
        "round": 3,
        "device": "dev-1",
        "shard": "shard-0",
        "tokenizer": FINGERPRINT,
        "vocab_size": 1000,
        "top_k": 8,
        "stages": 4,
        "patches": 2,
        "feature_stages": (0, 1, 2, 3),
        "feature_width": 16,
    }
    fields.update(overrides)
    return PacketHeader.model_validate(fields)


def make_sequence(
    rng: np.random.Generator, header: PacketHeader, sequence_id: int, length: int
) -> SequenceKnowledge:
    """A sequence whose top-k rows are the true top-k of a random softmax over the vocabulary."""
    vocab, k = header.vocab_size, header.top_k
    logits = rng.normal(scale=3.0, size=(length, vocab)).astype(np.float32)
    logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    top = np.argsort(-logprobs, axis=1)[:, :k]
    starts = np.arange(length, dtype=np.uint32) * 5
    features = None
    if header.feature_stages:
        shape = (len(header.feature_stages), header.patches, header.feature_width)
        features = rng.normal(size=shape).astype(np.float16)
    return SequenceKnowledge(
        sequence_id=sequence_id,
        token_ids=rng.integers(0, vocab, size=length),
        offsets=np.stack([starts, starts + 4], axis=1),
        topk_ids=top,
        topk_logprobs=np.take_along_axis(logprobs, top, axis=1),
        nll=float(rng.uniform(1, 8)),
        features=features,
    )


def make_packet(seed: int = 0, sequences: int = 3, length: int = 12, **header: object) -> KnowledgePacket:
    rng = np.random.default_rng(seed)
    h = make_header(**header)
    seqs = [make_sequence(rng, h, i * 7, length + i) for i in range(sequences)]
    return KnowledgePacket.from_sequences(h, seqs)


def raw_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """Wire bytes for arbitrary tensors and metadata, bypassing the packet's own validation."""
    blob = safetensors.numpy.save(tensors, metadata=metadata)
    return MAGIC + zstandard.ZstdCompressor(write_content_size=True, write_checksum=True).compress(blob)
