"""The tiny rounds of the trainer tests: names, random-init device models, packets from the real edge
scorer put in a round as ingest would, and a tiny Qwen2 student (2 layers, seeded)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from deepfusion.cloud.zoo.presets import get_preset
from deepfusion.shared.packets import KnowledgePacket, PacketHeader, SequenceKnowledge, encode
from deepfusion.shared.store import ObjectStore

FED, ROUND, SHARD = "fed", 0, "pub-0000"
DEVICES = {"dev-llama": "tiny-llama", "dev-gpt2": "tiny-gpt2"}  # device -> preset, one per cluster


def tiny_student(vocab: int) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(
        get_preset("student-tiny").config(vocab, num_hidden_layers=2, layer_types=["full_attention"] * 2)
    ).eval()


def random_device_model(preset: str, vocab: int, seed: int, directory: Path) -> Path:
    """A random-init model of a zoo preset, saved as a checkpoint in `directory`."""
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(get_preset(preset).config(vocab)).save_pretrained(directory)
    return directory


def score_into_round(
    store: ObjectStore, device: str, backend: Any, tokenizer: Any, texts: list[str], work: Path
) -> None:
    """`texts` scored by `backend` through the edge scorer; the packets stored in the round by content."""
    from deepfusion.edge.scoring import ScoreSettings, score_texts

    settings = ScoreSettings(
        federation=FED, round=ROUND, device=device, shard=SHARD, top_k=8, stages=2, patches=2, max_tokens=96
    )
    score_texts(backend, tokenizer.backend_tokenizer, texts, work, settings)
    for packet in sorted(work.glob("*.dfk")):
        data = packet.read_bytes()
        store.put(f"{FED}/rounds/{ROUND}/knowledge/{device}/{hashlib.sha256(data).hexdigest()}.dfk", data)


def put_sequences(store: ObjectStore, device: str, sequences: list[SequenceKnowledge], vocab: int) -> None:
    """One packet of `sequences` (top-4, no features) from `device`, stored in the round by content."""
    header = PacketHeader(
        federation=FED, round=ROUND, device=device, shard="s", tokenizer="0" * 64, vocab_size=vocab,
        top_k=4, stages=0, patches=1,
    )  # fmt: skip
    data = encode(KnowledgePacket.from_sequences(header, sequences))
    store.put(f"{FED}/rounds/{ROUND}/knowledge/{device}/{hashlib.sha256(data).hexdigest()}.dfk", data)
