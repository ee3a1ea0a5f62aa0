"""The tiny round of the trainer tests: its names, and a tiny Qwen2 student (2 layers, seeded)."""

from __future__ import annotations

import torch
from transformers import Qwen2ForCausalLM

from deepfusion.cloud.zoo.presets import get_preset

FED, ROUND, SHARD = "fed", 0, "pub-0000"
DEVICES = {"dev-llama": "tiny-llama", "dev-gpt2": "tiny-gpt2"}  # device -> preset, one per cluster


def tiny_student(vocab: int) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(
        get_preset("student-tiny").config(vocab, num_hidden_layers=2, layer_types=["full_attention"] * 2)
    ).eval()
