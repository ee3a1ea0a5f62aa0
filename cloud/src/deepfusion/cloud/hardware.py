"""Where the trainer runs: the CPU in float32 by default, a GPU with bf16 autocast when there is one.

The code path is the same on both: models and batches move to one `torch.device`, forward passes run
under `autocast(device)`, and the losses upcast logits to float32 themselves.
"""

from __future__ import annotations

import os
from typing import TypeVar

import torch

__all__ = ["autocast", "move", "resolve_device"]

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` (a GPU when torch sees one, else the CPU), `cpu`, `cuda` or `cuda:N`.

    Under torchrun with GPUs, `auto` and `cuda` mean this rank's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no GPU (a CPU-only build, or no driver)")
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on a GPU; on the CPU the same code runs in float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def move(model: ModuleT, device: torch.device) -> ModuleT:
    """`model` on `device`, in place (transformers' own `.to` is not typed for it)."""
    torch.nn.Module.to(model, device)
    return model
