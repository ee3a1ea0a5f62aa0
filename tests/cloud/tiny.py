"""A tiny Qwen2 student for trainer tests (2 layers of the student-tiny preset, seeded)."""

from __future__ import annotations

import torch
from transformers import Qwen2ForCausalLM

from deepfusion.cloud.zoo.presets import get_preset


def tiny_student(vocab: int) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(
        get_preset("student-tiny").config(vocab, num_hidden_layers=2, layer_types=["full_attention"] * 2)
    ).eval()
